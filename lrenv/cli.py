"""The ``lrenv`` command line: ``lrenv {episode,evaluate,train,bench,factorize} ...``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``lrenv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "episode": ("lrenv.episode", "run one episode on a problem with a simple schedule and print the curve"),
    "evaluate": ("lrenv.evaluate", "score schedules (baselines and trained agents) on held-out instances"),
    "train": ("lrenv.agents.train", "train a PPO agent that picks the learning rate"),
    "bench": ("lrenv.agents.bench", "measure environment and training throughput against the hardware"),
    "factorize": ("lrenv.factorize", "factorise your own matrix (NaN = missing) with any schedule or solver"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="lrenv", description="Learned learning-rate schedules for matrix "
                                     "factorisation: environments, baselines, PPO training and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported (heavy dependencies load lazily).
    chosen = next((a for a in (argv or []) if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, not a traceback
        print(f"lrenv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrenv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

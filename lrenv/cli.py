"""The ``lrenv`` command line: ``lrenv {episode,tune,evaluate,train,bench,benchmark,factorize} ...``.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``lrenv --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "episode": ("lrenv.episode", "run one episode on a problem with a simple schedule and print the curve"),
    "tune": ("lrenv.tune", "tune the baselines' settings on validation instances (for evaluate --methods tuned)"),
    "evaluate": ("lrenv.evaluate", "score schedules (baselines and trained agents) on held-out instances"),
    "train": ("lrenv.agents.train", "train a PPO agent that picks the learning rate"),
    "bench": ("lrenv.agents.bench", "measure environment and training throughput against the hardware"),
    "benchmark": ("lrenv.benchmark", "run a benchmark suite (training seeds x families x methods) on Ray and "
                  "report it with rliable"),
    "factorize": ("lrenv.factorize", "factorise your own matrix (NaN = missing) with any schedule or solver"),
}


def build_parser(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, str | None]:
    parser, chosen, _ = _parsers(argv)
    return parser, chosen


def _parsers(argv: list[str] | None) -> tuple[argparse.ArgumentParser, str | None, argparse.ArgumentParser | None]:
    """(top-level parser, chosen subcommand or None, the chosen subcommand's parser or None)."""
    parser = argparse.ArgumentParser(prog="lrenv", description="Learned learning-rate schedules for matrix "
                                     "factorisation: environments, baselines, PPO training and evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the chosen subcommand's module is imported (heavy dependencies load lazily).
    chosen = next((a for a in (argv or []) if a in SUBCOMMANDS), None)
    chosen_parser = None
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if name == chosen:
            importlib.import_module(module).add_arguments(p)
            chosen_parser = p
    return parser, chosen, chosen_parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; a subcommand's positional arguments (``train``'s ``KEY:VALUE`` overrides) may
    come before, between or after its options (argparse's intermixed parsing, which does not support
    subparsers itself: the subcommand's own parser parses what follows its name)."""
    parser, chosen, sub = _parsers(argv)
    if chosen is None or sub is None:
        return parser.parse_args(argv)
    i = argv.index(chosen)
    _parsers(None)[0].parse_args(argv[:i] + [chosen])  # top-level options (-h) before the subcommand (a bare
    # subcommand parser here: the chosen one's required arguments come after its name)
    args = sub.parse_intermixed_args(argv[i + 1:])
    args.command = chosen
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.command is None:
        build_parser(argv)[0].print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # bad input: a clear message, not a traceback
        print(f"lrenv {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written (no space, no permission, a file where a dir should be)
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"lrenv {args.command}: error: cannot write or read{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lrenv {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())

"""The source paper's experiment: paper size (10000x1000, rank 100), 1000-epoch budget, its baselines (fixed at the
bound 2/L and the best stable fixed c, random under the bound, Armijo) and any learned policies, on test instances;
writes the table, results.csv, config.json and a figure like the paper's Fig. 1 (library: lrenv.paper_experiment).

    python scripts/paper_experiment.py --model pretrained:small-relative \\
        --model ppo-paper=runs/paper-train/<run>/interrupted.zip --out runs/paper

Tiny smoke run: python scripts/paper_experiment.py --problem-param m=60 --problem-param n=20 \\
    --problem-param rank=3 --budget 20 --seeds 2 --out /tmp/paper-smoke
"""

from __future__ import annotations

import argparse
import shlex
import sys

from lrenv.paper_experiment import BEST_STABLE_C, FIGURE, run_paper_experiment
from lrenv.problems import parse_problem_params


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", default="paper", help="problem family (default: paper, 10000x1000 rank 100)")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE", default=[],
                   help="family parameter, e.g. m=60 (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="[LABEL=]PATH",
                   help="a learned policy: run directory, model .zip or pretrained:NAME; LABEL names its row "
                        "policy:LABEL (repeatable)")
    p.add_argument("--seeds", type=int, default=3, help="number of test instances (default 3)")
    p.add_argument("--budget", type=int, default=None, help="epoch budget (default: the family's; paper: 1000)")
    p.add_argument("--fixed-c", default=f"2,{BEST_STABLE_C:g}",
                   help="fixed lr = c/L schedules, comma list; c=2 is the bound 2/L itself (default: 2 and the best "
                        f"stable c, {BEST_STABLE_C:g}, chosen on medium's validation instances)")
    p.add_argument("--out", default="runs/paper", help="output directory (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0, help="base reset seed")
    p.add_argument("--batched", action="store_true",
                   help="step the runs of batchable methods together (default: one at a time, which at paper size "
                        "costs no more and stops paying for runs that already ended)")
    p.add_argument("--measure-epochs", type=int, default=10, help="epochs timed for the per-epoch cost (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        fixed_c = [float(c) for c in args.fixed_c.split(",") if c.strip()]
    except ValueError:
        print(f"--fixed-c: expected a comma list of numbers, got {args.fixed_c!r}", file=sys.stderr)
        return 2
    command = "python scripts/paper_experiment.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None
                                                                                          else argv))
    try:
        exp = run_paper_experiment(args.model, problem=args.problem, problem_params=parse_problem_params(
            args.problem_param), seeds=args.seeds, budget=args.budget, fixed_c=fixed_c, out_dir=args.out,
            progress=not args.no_progress, seed=args.seed, batched=args.batched, measure_epochs=args.measure_epochs,
            command=command)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if exp.figure:
        print(f"figure: {exp.out_dir}/{FIGURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

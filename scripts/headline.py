"""The headline experiment in one command: train PPO on `small`, then score the learned schedule against every
baseline on held-out instances, writing the table and figures into the run directory.

    python scripts/headline.py                       # train (200k steps by default) + evaluate on 10 held-out seeds
    python scripts/headline.py --model runs/<run>    # evaluate an existing run only
    python scripts/headline.py n_timesteps:300000 'env_kwargs.reward:{time_cost: 1.0}'   # zoo-style overrides
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from lrenv.agents.train import TrainConfig, load_hyperparams, train
from lrenv.evaluate import evaluate
from lrenv.schedules import load_policy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="KEY:VALUE", help="PPO hyperparameter overrides")
    p.add_argument("--problem", default="small", help="problem family")
    p.add_argument("--exp", default="headline", help="experiment name")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--seeds", type=int, default=10, help="held-out instances for the final evaluation")
    p.add_argument("--model", action="append", default=[], help="evaluate existing run(s) instead of training")
    p.add_argument("--methods", default="all", help="baseline methods (comma list, or 'all')")
    p.add_argument("--vec", default="batched", choices=("dummy", "subproc", "batched"), help="vector env for training")
    args = p.parse_args(argv)

    timings = {}
    runs = [Path(m) for m in args.model]
    if not runs:
        cfg = TrainConfig(problem=args.problem, exp=args.exp, seed=args.seed, vec=args.vec,
                          hyperparams=load_hyperparams(args.problem, args.overrides))
        start = time.time()
        runs = [train(cfg)]
        timings["train_wall_s"] = round(time.time() - start, 1)
    methods = [load_policy(r, name=r.name.split("__")[1]) for r in runs]
    methods += args.methods.split(",") if args.methods != "all" else ["all"]
    start = time.time()
    result = evaluate(methods, problem=args.problem, seeds=args.seeds, out_dir=str(runs[0] / "headline"))
    timings["evaluate_wall_s"] = round(time.time() - start, 1)
    timings["machine"] = f"{platform.machine()} {platform.processor() or ''}".strip()
    (runs[0] / "headline" / "timings.json").write_text(json.dumps(timings, indent=2))
    print(json.dumps(timings))
    print(f"results in {runs[0] / 'headline'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What per-epoch step-size control could reach: the greedy look-ahead oracle (lrenv.oracle) against every fixed c.

    python scripts/oracle_schedule.py --problem small --seeds 10 --out runs/oracle/small.json
    python scripts/oracle_schedule.py --problem small --seeds 10 --per-factor --out runs/oracle/small-pf.json
    python scripts/oracle_schedule.py --problem small --seeds 10 --hindsight --out runs/oracle/small-hindsight.json

Prints, per instance and as means, the epochs to target of every fixed c of the grid (the oracle with a one-value
grid, i.e. the fixed-c schedule), of the best fixed c per instance in hindsight, and of the greedy oracle (one c for
both factors, or with --per-factor every (c_W, c_H) pair), each also as a ratio to the best fixed c on average
(the normaliser of ``lrenv benchmark``); with --hindsight also the piecewise-constant schedule found per instance
in hindsight (lrenv.oracle.hindsight_schedule). Writes them as JSON with the command's settings. A miss counts
2 x budget epochs, as in the benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from lrenv.oracle import DEFAULT_GRID, greedy_oracle


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--problem", default="small")
    p.add_argument("--seeds", type=int, default=10, help="instances of the split")
    p.add_argument("--split", default="test")
    p.add_argument("--grid", default=",".join(str(c) for c in DEFAULT_GRID), help="candidate c of lr = c/L")
    p.add_argument("--per-factor", action="store_true", help="the oracle picks (c_W, c_H) from every pair of the grid")
    p.add_argument("--hindsight", action="store_true",
                   help="also search the best piecewise-constant schedule per instance in hindsight")
    p.add_argument("--segments", type=int, default=8, help="--hindsight: phases of the schedule")
    p.add_argument("--iterations", type=int, default=6, help="--hindsight: cross-entropy iterations")
    p.add_argument("--population", type=int, default=32, help="--hindsight: schedules per iteration")
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    grid = tuple(float(c) for c in args.grid.split(","))
    t0 = time.perf_counter()
    settings = dict(seeds=args.seeds, split=args.split)
    fixed = {c: greedy_oracle(args.problem, grid=(c,), **settings) for c in grid}
    oracle = greedy_oracle(args.problem, grid=grid, per_factor=args.per_factor, **settings)
    from lrenv.env import NMFEnv
    T = NMFEnv(args.problem, instances=args.split).task.budget
    miss = 2 * T

    def score(run) -> float:
        e = run.epochs_to_target
        return miss if math.isnan(e) else e

    table = {f"fixed c={c:g}": [score(r) for r in runs] for c, runs in fixed.items()}
    best_c = min(table, key=lambda k: np.mean(table[k]))
    hindsight = np.min(np.array(list(table.values())), axis=0).tolist()
    name = "greedy oracle (c_W, c_H)" if args.per_factor else "greedy oracle (c)"
    rows = {**table, "best fixed c per instance (hindsight)": hindsight, name: [score(r) for r in oracle]}
    searched = None
    if args.hindsight:
        from lrenv.oracle import hindsight_schedule
        searched = hindsight_schedule(args.problem, segments=args.segments, per_factor=args.per_factor,
                                      population=args.population, iterations=args.iterations,
                                      start_c=float(best_c.split("=")[1]), **settings)
        label = "hindsight piecewise (c_W, c_H)" if args.per_factor else "hindsight piecewise (c)"
        rows[f"{label}, {args.segments} phases"] = [r["epochs"] for r in searched]
    norm = float(np.mean(table[best_c]))
    summary = {k: {"mean_epochs": float(np.mean(v)), "ratio_to_best_fixed": float(np.mean(v)) / norm,
                   "per_instance_ratio_mean": float(np.mean(np.array(v) / np.array(table[best_c]))),
                   "misses": int(sum(x >= miss for x in v)), "epochs": v} for k, v in rows.items()}
    chosen = np.array([c for r in oracle for c in r.chosen])
    result = {"command": "python scripts/oracle_schedule.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "problem": args.problem, "split": args.split, "seeds": args.seeds, "grid": grid,
              "per_factor": args.per_factor, "budget": T, "miss_counts": miss, "best_fixed": best_c,
              "instances": [r.instance for r in oracle], "summary": summary,
              "oracle_choice_mean": chosen.mean(axis=0).tolist() if len(chosen) else None,
              "oracle_choices": [r.chosen for r in oracle], "hindsight_schedules": searched, "seconds": round(time.perf_counter() - t0, 1)}
    width = max(len(k) for k in rows)
    print(f"{args.problem}, {args.seeds} {args.split} instances, budget {T} (a miss counts {miss}); "
          f"normaliser: {best_c} (mean {norm:.1f} epochs)")
    for k, s in summary.items():
        print(f"  {k:<{width}}  mean {s['mean_epochs']:7.1f}  ratio {s['ratio_to_best_fixed']:.3f}  "
              f"misses {s['misses']}")
    if len(chosen):
        print(f"  the oracle's mean choice (c_W, c_H): ({chosen[:, 0].mean():.2f}, {chosen[:, 1].mean():.2f})")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.out)
        print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""``lrenv evaluate`` of this checkout against an older revision, timed side by side in one run.

    python scripts/evaluate_speed.py                  # against 43464f0, "today" in issue 14
    python scripts/evaluate_speed.py --rev 43464f0 --problem small --seeds 10 --rounds 2 --one-at-a-time

The old revision is checked out into a temporary ``git worktree`` (removed afterwards). Every measurement is a
fresh process running the command a user types (``python -m lrenv.cli evaluate --problem P --seeds N ...``,
writing its results, figures and TensorBoard logs), old and new alternating within each round:

- ``common``: the methods both revisions have (the old registry's names that the new one still has), passed as
  ``--methods`` to both: the like-for-like comparison;
- ``literal``: the command as typed, without ``--methods`` (each revision's ``all``; the new one has more methods);
- ``new --workers 1``: the new code's batched path with its jobs one after another (no worker processes), on the
  common methods: what batching alone gives, next to the default (one forked worker per core);
- with ``--one-at-a-time``, also the new code's ``--one-at-a-time`` path on the common methods.

Prints the wall seconds (best of the rounds), the processes' CPU seconds (user + system, summed over the rounds;
the honest measure on a shared machine) and the ratios, and how many runs of the common methods end alike in both
revisions (reached target / diverged / epochs to target): the code between the revisions changed more than the
evaluation's speed. Writes JSON (default ``runs/bench/evaluate_vs_<rev>.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(tree: str) -> dict:
    return {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}


def registry(tree: str) -> list[str]:
    """The method registry names of the checkout at ``tree``."""
    code = "import json; from lrenv.evaluate import REGISTRY; print(json.dumps(list(REGISTRY)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_env(tree), capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed(tree: str, args: list[str]) -> tuple[float, float]:
    """Run ``lrenv`` with ``args`` from the checkout at ``tree``; returns (wall, CPU) seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lrenv.cli", *args], cwd=tree, env=_env(tree), capture_output=True,
                         text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"lrenv {' '.join(args)} failed in {tree}:\n{out.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def outcomes(path: str) -> dict[tuple[str, str], tuple[str, str, str]]:
    with open(path, newline="") as f:
        return {(r["method"], r["instance"]): (r["reached_target"], r["diverged"], r["epochs_to_target"])
                for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", default="43464f0", help="the older revision (a commit, tag or branch)")
    p.add_argument("--problem", default="small")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=1, help="alternated rounds (each runs every command once)")
    p.add_argument("--one-at-a-time", action="store_true", help="also time the new code's --one-at-a-time path")
    p.add_argument("--out", default=None, help="JSON output (default runs/bench/evaluate_vs_<rev>.json)")
    args = p.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="lrenv-evalspeed-")
    old = os.path.join(tmp, "old")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", old, args.rev], check=True, capture_output=True)
    try:
        old_names, new_names = registry(old), registry(ROOT)
        common = [m for m in old_names if m in new_names]
        base = ["evaluate", "--problem", args.problem, "--seeds", str(args.seeds), "--no-progress"]
        commands = {("old", "common"): (old, [*base, "--methods", ",".join(common)]),
                    ("new", "common"): (ROOT, [*base, "--methods", ",".join(common)]),
                    ("new --workers 1", "common"): (ROOT, [*base, "--methods", ",".join(common), "--workers", "1"]),
                    ("old", "literal"): (old, base), ("new", "literal"): (ROOT, base)}
        if args.one_at_a_time:
            commands[("new --one-at-a-time", "common")] = (ROOT, [*base, "--methods", ",".join(common),
                                                                   "--one-at-a-time"])
        times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in commands}
        out_dir = {k: os.path.join(tmp, f"out{i}") for i, k in enumerate(commands)}
        for r in range(args.rounds):
            keys = list(commands) if r % 2 == 0 else list(commands)[::-1]
            for key in keys:
                tree, cmd = commands[key]
                shutil.rmtree(out_dir[key], ignore_errors=True)
                wall, cpu = timed(tree, [*cmd, "--out", out_dir[key]])
                times[key].append((wall, cpu))
                print(f"round {r}: {key[0]:22} {key[1]:8} {wall:7.1f} s wall, {cpu:7.1f} s CPU", flush=True)
        a = outcomes(os.path.join(out_dir[("old", "common")], "results.csv"))
        b = outcomes(os.path.join(out_dir[("new", "common")], "results.csv"))
        alike: dict[str, list[int]] = {}
        for k in a:
            alike.setdefault(k[0], [0, 0])
            alike[k[0]][0] += a[k] == b.get(k)
            alike[k[0]][1] += 1
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", old], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {f"{who} / {which}": {"wall_best_s": min(w for w, _ in t), "cpu_s": sum(c for _, c in t) / len(t),
                                    "walls_s": [w for w, _ in t]}
               for (who, which), t in times.items()}
    def ratio(slow: str, fast: str) -> dict:
        o, n = summary[slow], summary[fast]
        return {"wall": o["wall_best_s"] / n["wall_best_s"], "cpu": o["cpu_s"] / n["cpu_s"]}

    ratios = {which: ratio(f"old / {which}", f"new / {which}") for which in ("common", "literal")}
    ratios["old / new --workers 1, common"] = ratio("old / common", "new --workers 1 / common")
    if args.one_at_a_time:
        ratios["new one-at-a-time / batched, common"] = ratio("new --one-at-a-time / common", "new / common")
    print(f"\nlrenv evaluate --problem {args.problem} --seeds {args.seeds}: {args.rev} (old) vs this checkout (new), "
          f"{args.rounds} round(s); common methods ({len(common)}): {', '.join(common)}")
    print(f"{'':34} {'wall s (best)':>13} {'CPU s (mean)':>13}")
    for name, s in summary.items():
        print(f"{name:34} {s['wall_best_s']:>13.1f} {s['cpu_s']:>13.1f}")
    for name, r in ratios.items():
        print(f"ratio {name}: {r['wall']:.2f}x wall, {r['cpu']:.2f}x CPU")
    same = sum(v[0] for v in alike.values())
    total = sum(v[1] for v in alike.values())
    print(f"runs of the common methods ending alike in both revisions: {same}/{total}; differing: "
          + (", ".join(f"{m} {v[1] - v[0]}/{v[1]}" for m, v in alike.items() if v[0] < v[1]) or "none"))
    path = args.out or os.path.join(ROOT, "runs", "bench", f"evaluate_vs_{args.rev}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"rev": args.rev, "problem": args.problem, "seeds": args.seeds, "rounds": args.rounds,
                   "common_methods": common, "old_methods": old_names, "new_methods": new_names, "times": summary,
                   "ratios": ratios, "alike": alike, "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "load1_end": os.getloadavg()[0]}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

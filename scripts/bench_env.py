#!/usr/bin/env python
"""Single-environment speed: NMFEnv.step next to the raw epoch and the GEMM rate, all measured now.

    python scripts/bench_env.py [--presets small medium paper] [--seconds 2] [--threads 1]

raw epoch = ``engine.epoch`` + ``engine.loss()`` (the least a plain training loop does per epoch);
env step = ``NMFEnv.step`` (epoch + statistics + observation, reward and info). The goal (issue 2) is a
step within 1.3x of the raw epoch on ``small`` with one thread. The paper size runs only a few epochs.
"""

from __future__ import annotations

import argparse
import json

import torch

from lrenv.agents.bench import epoch_flops, gemm_rate, measure_raw_epoch, measure_single_env, preset_shape

GOAL = 1.3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=["small", "medium", "paper"])
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement (small, medium)")
    p.add_argument("--paper-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rate = gemm_rate(device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}; "
          f"GEMM {rate / 1e9:.0f} GFLOP/s (measured now)")
    print(f"{'preset':8} {'roofline ms':>11} {'raw epoch ms':>12} {'env step ms':>11} {'steps/s':>9} {'step/raw':>8}")
    rows = []
    for preset in args.presets:
        m, n, r = preset_shape(preset)
        slow = preset == "paper" and device.type == "cpu"
        kw = dict(seconds=0.0 if slow else args.seconds, max_calls=args.paper_epochs if slow else 1_000_000)
        raw = measure_raw_epoch(preset, device, **kw)
        step = measure_single_env(preset, device, **kw)
        roof = epoch_flops(m, n, r) / rate
        rows.append(dict(preset=preset, roofline_ms=roof * 1e3, raw_epoch_ms=raw * 1e3, env_step_ms=step * 1e3,
                         steps_per_s=1 / step, step_over_raw=step / raw))
        print(f"{preset:8} {roof * 1e3:>11.3f} {raw * 1e3:>12.3f} {step * 1e3:>11.3f} {1 / step:>9.0f} "
              f"{step / raw:>8.2f}", flush=True)
    small = next((r for r in rows if r["preset"] == "small"), None)
    if small is not None:
        met = small["step_over_raw"] <= GOAL
        print(f"goal: env step within {GOAL}x of the raw epoch on small: {small['step_over_raw']:.2f}x -> "
              f"{'MET' if met else 'NOT MET'}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(gemm_gflops=rate / 1e9, threads=args.threads, rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

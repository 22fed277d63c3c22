"""``lrenv episode``: run one episode of the environment with a fixed schedule and print its curve."""

from __future__ import annotations

import argparse

import numpy as np

from .env import NMFEnv
from .problems import DEFAULT_PROBLEM, EVAL_SEEDS, parse_problem_params


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--problem", default=DEFAULT_PROBLEM, help="problem family name or path to a matrix file")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE", help="family parameter (repeatable)")
    p.add_argument("--scale", type=float, default=0.5,
                   help="fixed learning rate as a fraction of the per-factor bound 2/L (log_bound mode)")
    p.add_argument("--budget", type=int, default=None, help="epoch budget (default: the family's)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed; the instance is held-out seed 0")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--every", type=int, default=10, help="print every N epochs")


def run(args: argparse.Namespace) -> int:
    if args.every < 1:
        raise ValueError(f"--every must be a positive number of epochs, got {args.every}")
    if not 0 < args.scale <= 10:
        raise ValueError(f"--scale must be in (0, 10], got {args.scale}")
    env = NMFEnv(args.problem, problem_params=parse_problem_params(args.problem_param), budget=args.budget,
                 device=args.device, instances="eval", log_range=2.0)
    obs, info = env.reset(seed=args.seed, options={"instance": EVAL_SEEDS[0]})
    action = env.task.action_for_scale(args.scale)
    print(f"{env.family.description}; target loss {info['target_loss']:.6g}; lr = {args.scale} x 2/L per factor")
    print(f"{'epoch':>6} {'loss':>12} {'grad norm':>12} {'lr_W':>10} {'lr_H':>10} {'reward':>9}")
    print(f"{0:>6} {info['loss']:>12.6g} {info['grad_norm']:>12.4g}")
    total = 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        if info["epoch"] % args.every == 0 or terminated or truncated:
            print(f"{info['epoch']:>6} {info['loss']:>12.6g} {info['grad_norm']:>12.4g} {info['lr_W']:>10.3g} "
                  f"{info['lr_H']:>10.3g} {reward:>9.3g}")
        if terminated or truncated:
            break
    outcome = ("reached the target" if info["reached_target"] else "diverged" if info["diverged"]
               else "ran out of budget")
    extra = f", held-out MSE {info['heldout_mse']:.4g}" if "heldout_mse" in info else ""
    print(f"{outcome} after {info['epoch']} epochs: loss {info['loss']:.6g}{extra}, return {total:.1f}")
    return 0 if np.isfinite(total) else 1

"""``lrenv.LearnedLR`` in plain PyTorch loops, each next to the same loop at its usual fixed learning rate.

1. The ill-conditioned two-layer linear net of the ``illcond`` family: ``W1 W2 ~ A``, A 10 x 6 with rows scaled
   by linspace(1, 1e-5) (kappa ~ 1e5), W1, W2 ~ N(0, 1); full-batch gradient descent, 10 steps per epoch; the
   usual fixed rate is the largest GD rate the source tried, 1e-3. Target: 1e-2 x ||A||^2 / 2 (the family's
   1e-6 needs Levenberg-Marquardt: no first-order loop here gets there in 3000 steps).
2. A small MLP regression (1 -> 32 -> 32 -> 1, tanh) of y = sin(3x) + noise (sd 0.1) on 256 points,
   minibatch SGD (batch 32); the usual fixed rate 0.05. Target: training MSE 0.02 (noise floor 0.01).

The scheduler starts from the fixed rate and multiplies it every epoch by what the policy decides
(``pretrained:small-relative`` by default: trained on synthetic NMF only, see its CARD.md). Epochs to target
(None = not reached within the budget) are printed for both, and for a third loop at a fixed rate equal to the
learned run's final rate, which tells whether the policy did more than find a larger constant. Run: ``python examples/torch_learnedlr.py``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Callable

import numpy as np
import torch

from lrenv import LearnedLR


def linear_net_problem(seed: int = 0, target_rel: float = 1e-2):
    """(params, full-batch loss closure, target) of the illcond two-layer linear net."""
    rng = np.random.default_rng([seed, 0x111C])
    A = torch.tensor(rng.uniform(size=(10, 6)) * np.linspace(1.0, 1e-5, 6))
    g = torch.Generator().manual_seed(seed)
    W1 = torch.nn.Parameter(torch.randn(10, 6, generator=g, dtype=torch.float64))
    W2 = torch.nn.Parameter(torch.randn(6, 6, generator=g, dtype=torch.float64))
    loss = lambda: 0.5 * ((W1 @ W2 - A) ** 2).sum()  # noqa: E731
    return [W1, W2], loss, target_rel * 0.5 * float((A ** 2).sum())


def run_linear_net(scheduler: str | None, lr: float = 1e-3, epochs: int = 300, steps_per_epoch: int = 10,
                   seed: int = 0, policy="pretrained:small-relative") -> dict:
    params, loss_fn, target = linear_net_problem(seed)
    opt = torch.optim.SGD(params, lr=lr)
    sched = LearnedLR(opt, policy, total_epochs=epochs) if scheduler == "learned" else None

    def epoch() -> float:
        for _ in range(steps_per_epoch):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        opt.zero_grad()
        f = loss_fn()
        f.backward()  # the gradient at the epoch's end: what the scheduler observes
        return float(f.detach())

    return _loop(epoch, sched, opt, epochs, target)


def mlp_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(256, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                              torch.nn.Linear(32, 1))
    return net, x, y


def run_mlp(scheduler: str | None, lr: float = 0.05, epochs: int = 300, seed: int = 0, target: float = 0.02,
            policy="pretrained:small-relative") -> dict:
    net, x, y = mlp_problem(seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    sched = LearnedLR(opt, policy, total_epochs=epochs) if scheduler == "learned" else None
    g = torch.Generator().manual_seed(seed + 1)

    def epoch() -> float:
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
            opt.step()
        return float(torch.nn.functional.mse_loss(net(x), y).detach())

    return _loop(epoch, sched, opt, epochs, target)


def _loop(epoch: Callable[[], float], sched, opt, epochs: int, target: float) -> dict:
    losses, reached = [], None
    for t in range(1, epochs + 1):
        f = epoch()
        losses.append(f)
        if reached is None and math.isfinite(f) and f <= target:
            reached = t
            break
        if sched is not None:
            sched.step(f)
    return {"epochs_to_target": reached, "final_loss": losses[-1], "best_loss": float(np.nanmin(losses)),
            "final_lr": opt.param_groups[0]["lr"], "divergences": getattr(sched, "divergences", 0),
            "target": target}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--policy", default="pretrained:small-relative")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report: dict = {}
    for name, fn in (("linear_net", run_linear_net), ("mlp", run_mlp)):
        learned_lr = None
        for kind in ("fixed", "learned", "fixed-at-learned-final"):
            if kind == "fixed-at-learned-final":
                runs = [fn("fixed", lr=lr, epochs=args.epochs, seed=s) for s, lr in enumerate(learned_lr)]
            else:
                runs = [fn(kind, epochs=args.epochs, seed=s, policy=args.policy) for s in range(args.seeds)]
            if kind == "learned":
                learned_lr = [r["final_lr"] for r in runs]
            report[f"{name}/{kind}"] = {"epochs_to_target": [r["epochs_to_target"] for r in runs],
                                        "final_loss": [r["final_loss"] for r in runs],
                                        "final_lr": [r["final_lr"] for r in runs],
                                        "divergences": [r["divergences"] for r in runs]}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

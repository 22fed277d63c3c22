"""How many epochs could *any* per-epoch step-size schedule save? Two oracles that cheat.

A learned schedule picks one step size per epoch (or one per factor). To tell whether a goal such as "0.75x the
epochs of the best fixed c/L" is within reach of that kind of control at all, :func:`greedy_oracle` runs, on the
same instances, initial points and minibatch orders as ``lrenv evaluate``, a schedule that cheats: before every
epoch it tries every candidate step size of a grid (``c / L`` per factor, with the same constants a fixed-c
schedule uses, recomputed every epoch) from the current iterate, and keeps the one whose epoch ends at the lowest
loss. All candidates of one epoch run together as the slots of one batched engine, so the look-ahead costs one
batched epoch per epoch. With a one-value grid it *is* the fixed-c schedule (a test checks it against the
evaluation harness), so the two are comparable epoch for epoch.

Greedy is myopic (one epoch of look-ahead), so :func:`hindsight_schedule` searches, per instance and in
hindsight, the piecewise-constant schedule (``segments`` equal phases, one c each, or one per factor) that reaches
the target in the fewest epochs: a cross-entropy search over whole runs, every candidate schedule a slot of one
batched engine, the best fixed c always among the candidates (so it never does worse). It knows the instance's
initial point and minibatch order, which no schedule does: an optimistic estimate of what a schedule of that form
can reach, not a bound over all schedules.

Command line: ``python scripts/oracle_schedule.py --problem small --seeds 10`` (see there).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium.utils import seeding

from .engine import STAT_L_H, STAT_L_W, SGDEngine
from .env import NMFEnv, load_instance
from .problems import reset_seed, split_seeds

DEFAULT_GRID = (0.2, 0.5, 0.8, 1.0, 1.1, 1.3, 1.6, 1.9)
"""Candidate c of ``lr = c / L`` (per factor): the fixed-scale grid of the evaluation, plus 0.8."""


@dataclass
class OracleRun:
    """One instance under the greedy oracle: the loss after every epoch (epoch 0 included) and the chosen c."""

    instance: int
    target: float
    loss: list[float]
    chosen: list[tuple[float, float]] = field(default_factory=list)
    """(c_W, c_H) picked at each epoch."""

    @property
    def epochs_to_target(self) -> float:
        """First epoch whose loss is at or below the target (NaN: not within the budget)."""
        hit = [t for t, f in enumerate(self.loss) if f <= self.target]
        return float(hit[0]) if hit else math.nan


def candidates(grid: tuple[float, ...], per_factor: bool) -> np.ndarray:
    """(G, 2) candidate (c_W, c_H): the grid on the diagonal, or every pair of it with ``per_factor``."""
    grid = tuple(float(c) for c in grid)
    if not grid or min(grid) <= 0:
        raise ValueError(f"the grid of c must be non-empty and positive, got {grid!r}")
    pairs = itertools.product(grid, grid) if per_factor else ((c, c) for c in grid)
    return np.array(list(pairs), dtype=np.float64)


def _load_copies(engine: SGDEngine, family, inst: int, seed: int, budget: int):
    """Every slot of ``engine``: instance ``inst`` with the initial point and minibatch order that
    ``NMFEnv.reset(seed=reset_seed(inst, seed), options={"instance": inst})`` draws. Returns (problem, order (G, T, K))."""
    prob = family.instance(inst)
    orders = []
    for g in range(engine.B):
        rng, _ = seeding.np_random(reset_seed(inst, seed))
        orders.append(load_instance(engine, g, prob, rng, budget))
    return prob, torch.as_tensor(np.stack(orders))


def greedy_oracle(problem: str = "small", *, seeds: int = 10, split: str = "test", seed: int = 0,
                  grid: tuple[float, ...] = DEFAULT_GRID, per_factor: bool = False, budget: int | None = None,
                  problem_params: dict | None = None, threads: int | None = 1) -> list[OracleRun]:
    """The greedy look-ahead schedule on the first ``seeds`` instances of ``split`` (the instances, initial points
    and minibatch orders of ``lrenv evaluate --problem PROBLEM --seeds N --split SPLIT --seed SEED``).

    Each epoch: the constants ``L_W, L_H`` at the current iterate (as a fixed-c schedule sees them), one batched
    epoch of every candidate ``(c_W / L_W, c_H / L_H)`` from that iterate, and the candidate with the lowest
    resulting loss becomes the iterate (ties: the first in grid order; a candidate whose loss is not finite
    never wins). Stops at the target or after the budget. The target is compared with the loss, so families
    whose target is on another metric (held-out error, the fit without regularisation) are refused."""
    env = _env_for(problem, problem_params, split, budget, threads)
    cand = candidates(grid, per_factor)
    G, T = len(cand), env.task.budget
    engine = SGDEngine(env.engine_cfg, batch=G)
    c = torch.as_tensor(cand, dtype=engine.cfg.dtype, device=engine.cfg.device)
    runs = []
    for inst in list(split_seeds(split))[:seeds]:
        prob, order = _load_copies(engine, env.family, inst, seed, T)
        stats = engine.evaluate(episode_start=True)
        run = OracleRun(int(inst), float(prob.target_loss), [float(stats[0, 0])])
        limit = env.task.divergence_factor * run.loss[0]
        for t in range(T):
            if run.loss[-1] <= run.target:
                break
            L = torch.stack([stats[:, STAT_L_W], stats[:, STAT_L_H]], dim=1)
            engine.epoch(c / L, order[:, t])
            loss = torch.nan_to_num(engine.loss().double(), nan=math.inf)
            best = int(torch.argmin(loss))
            if not float(loss[best]) <= limit:  # every candidate diverged, as the env counts it: the run ends
                run.loss.append(math.inf)
                break
            engine.W.copy_(engine.W[best].expand_as(engine.W))  # the chosen iterate into every slot
            engine.H.copy_(engine.H[best].expand_as(engine.H))
            stats = engine.evaluate([0], episode_start=False)  # every slot holds the same iterate: one is enough
            run.loss.append(float(stats[0, 0]))
            run.chosen.append((float(cand[best, 0]), float(cand[best, 1])))
        runs.append(run)
    return runs


def _env_for(problem: str, problem_params: dict | None, split: str, budget: int | None, threads: int | None) -> NMFEnv:
    env = NMFEnv(problem, problem_params=problem_params, instances=split, budget=budget, threads=threads)
    if env.family.target_metric != "loss":
        raise ValueError(f"the oracles compare the loss with the target; {env.family.name!r} targets its "
                         f"{env.family.target_metric!r}")
    return env


def run_schedules(engine: SGDEngine, family, inst: int, seed: int, budget: int, c: np.ndarray,
                  divergence_factor: float = 100.0) -> np.ndarray:
    """Run schedule ``c[g]`` ((G, T, 2): c_W, c_H per epoch) in slot ``g`` on instance ``inst`` for the whole budget
    (or until every slot has reached the target or diverged); returns each slot's epochs to target (NaN: missed)."""
    prob, order = _load_copies(engine, family, inst, seed, budget)
    ct = torch.as_tensor(c, dtype=engine.cfg.dtype, device=engine.cfg.device)
    stats = engine.evaluate(episode_start=True)
    limit = divergence_factor * float(stats[0, 0])
    hit = np.full(engine.B, np.nan)
    hit[stats[:, 0].double().cpu().numpy() <= prob.target_loss] = 0
    live = np.isnan(hit)
    for t in range(budget):
        if not live.any():
            break
        L = torch.stack([stats[:, STAT_L_W], stats[:, STAT_L_H]], dim=1)
        engine.epoch(ct[:, t] / L, order[:, t])
        stats = engine.evaluate(episode_start=False, gradient=False)
        loss = stats[:, 0].double().cpu().numpy()
        reached = live & (loss <= prob.target_loss)
        hit[reached] = t + 1
        live &= ~reached & (loss <= limit)  # divergence as the env counts it (NaN compares False)
    return hit


def hindsight_schedule(problem: str = "small", *, seeds: int = 10, split: str = "test", seed: int = 0,
                       segments: int = 8, per_factor: bool = False, population: int = 32, iterations: int = 6,
                       c_range: tuple[float, float] = (0.2, 1.95), start_c: float = 1.1, budget: int | None = None,
                       problem_params: dict | None = None, threads: int | None = 1,
                       search_seed: int = 0) -> list[dict]:
    """Per instance, the piecewise-constant schedule found in hindsight by a cross-entropy search.

    A schedule is ``segments`` phases of equal length, each with one c (``per_factor``: a (c_W, c_H) pair); the
    search draws ``population`` schedules per iteration as log c ~ N(mu, sigma) (clipped to ``c_range``), runs them
    all as slots of one batched engine on the instance (same initial point and minibatch order as the evaluation),
    scores epochs to target (a miss: 2 x budget) and refits mu, sigma to the best quarter. The first candidate
    of every iteration is the best schedule so far (at the start: fixed ``start_c``), so the result is never worse
    than that fixed c. Returns per instance ``{"instance", "epochs", "fixed_epochs", "schedule"}``."""
    env = _env_for(problem, problem_params, split, budget, threads)
    T, dims = env.task.budget, 2 if per_factor else 1
    if segments < 1 or population < 2 or iterations < 1:
        raise ValueError("segments >= 1, population >= 2 and iterations >= 1 are needed")
    engine = SGDEngine(env.engine_cfg, batch=population)
    phase = np.minimum(np.arange(T) * segments // T, segments - 1)  # epoch -> its phase
    lo, hi = np.log(c_range[0]), np.log(c_range[1])
    rng = np.random.default_rng(search_seed)
    out = []
    for inst in list(split_seeds(split))[:seeds]:
        mu, sigma = np.full((segments, dims), np.log(start_c)), np.full((segments, dims), 0.35)
        best = (math.inf, np.full((segments, dims), np.log(start_c)))
        fixed_epochs = None
        for _ in range(iterations):
            logc = np.clip(mu + sigma * rng.standard_normal((population, segments, dims)), lo, hi)
            logc[0] = best[1]
            per_epoch = np.exp(logc)[:, phase]  # (G, T, dims)
            c = per_epoch if per_factor else np.repeat(per_epoch, 2, axis=2)
            hit = run_schedules(engine, env.family, int(inst), seed, T, c, env.task.divergence_factor)
            score = np.where(np.isnan(hit), 2.0 * T, hit)
            if fixed_epochs is None:
                fixed_epochs = float(score[0])
            elite = np.argsort(score, kind="stable")[: max(2, population // 4)]
            if score[elite[0]] < best[0]:
                best = (float(score[elite[0]]), logc[elite[0]].copy())
            mu, sigma = logc[elite].mean(axis=0), np.maximum(logc[elite].std(axis=0), 0.05)
        out.append({"instance": int(inst), "epochs": best[0], "fixed_epochs": fixed_epochs,
                    "schedule": np.exp(best[1]).round(3).tolist()})
    return out

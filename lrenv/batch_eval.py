"""Evaluate many (schedule, instance) runs at once in one batched engine.

:func:`run_batched` runs ``schedules[j]`` on instance ``instances[j]`` for every ``j`` together in one
:class:`lrenv.vec_env.BatchedNMFVecEnv`: one epoch of all runs is a handful of batched matrix products
instead of one Python-driven epoch per run. Each slot is reset exactly as
:func:`lrenv.evaluate.run_schedule` resets its single environment (same instance, same reset seed, same
schedule generator), so the trajectories are the one-at-a-time ones up to the rounding of batched
products (a test checks it).

Only schedules whose decision needs nothing but the observation, the epoch and their own generator can
share an engine (``Schedule.batchable``: fixed, random, cosine, two-phase, trained policies); line
searches and rules that query the iterate (Armijo, Polyak, Barzilai-Borwein) and outside solvers stay per
instance. Runs must also share their environment settings (action mode and overrides): see
:func:`group_key`.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any, Sequence

import numpy as np

from .metrics import Trace, trace_from_infos
from .problems import reset_seed
from .schedules import PolicySchedule, Schedule, schedule_env_kwargs
from .task import TaskConfig

MAX_BATCH = 16
"""Slots per batched engine: on a CPU larger batches leave the cache (44 small slots per step ran slower per
slot than 16), and every run of a chunk waits for its longest."""


class SlotOracle:
    """The part of :class:`lrenv.env.LROracle` a batchable schedule may use: the task definition."""

    def __init__(self, task: TaskConfig):
        self.task = task

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"{name}: schedules that query the iterate run one instance at a time "
                             "(set batchable = False on the schedule)")


def group_key(schedule: Schedule) -> str:
    """Runs with equal keys can share one batched environment (same action mode and env overrides)."""
    return json.dumps([schedule.action_mode, schedule.env_overrides], sort_keys=True, default=str)


def run_batched(schedules: Sequence[Schedule], instances: Sequence[int], env_kwargs: dict, *, seed: int = 0,
                max_batch: int = MAX_BATCH) -> list[Trace]:
    """Run ``schedules[j]`` on instance ``instances[j]`` for all ``j``; returns one :class:`Trace` per run,
    in order. Every schedule must be batchable and share one :func:`group_key`. ``env_kwargs`` are the
    evaluation's :class:`lrenv.NMFEnv` keywords. A schedule object that appears several times is copied per
    run (its episode state is per run); a trained policy is shared and queried once per epoch for all its
    runs. ``wall`` in the traces is the batch's wall time divided by the number of runs (amortised)."""
    if len(schedules) != len(instances):
        raise ValueError(f"run_batched: {len(schedules)} schedules for {len(instances)} instances")
    if not schedules:
        return []
    keys = {group_key(s) for s in schedules}
    if len(keys) > 1:
        raise ValueError("run_batched: the schedules need different environment settings; group them with group_key")
    unbatchable = [s.name for s in schedules if not s.batchable]
    if unbatchable:
        raise ValueError(f"run_batched: {sorted(set(unbatchable))} query the iterate; run them one at a time")
    out: list[Trace] = []
    for start in range(0, len(schedules), max_batch):
        out.extend(_run_chunk(schedules[start:start + max_batch], instances[start:start + max_batch], env_kwargs, seed))
    return out


def _run_chunk(schedules: Sequence[Schedule], instances: Sequence[int], env_kwargs: dict, seed: int) -> list[Trace]:
    from .vec_env import BatchedNMFVecEnv

    B = len(schedules)
    venv = BatchedNMFVecEnv(num_envs=B, **schedule_env_kwargs(schedules[0], env_kwargs))
    venv.autoreset = False  # a finished run stays put: no new problem drawn for a slot nobody records
    if isinstance(schedules[0], PolicySchedule):
        schedules[0].check_spaces(venv.observation_space, venv.action_space)
    obs, infos = venv.reset_instances(instances, [reset_seed(i, seed) for i in instances])
    # per-run copies of stateful schedules; policies are shared and queried for all their slots at once
    seen: set[int] = set()
    runs: list[Schedule] = []
    for s in schedules:
        runs.append(s if isinstance(s, PolicySchedule) or id(s) not in seen else copy.deepcopy(s))
        seen.add(id(s))
    oracle = SlotOracle(venv.task)
    for s, inst in zip(runs, instances):
        s.reset(oracle, np.random.default_rng([seed, int(inst), 1]))
    policies: dict[int, tuple[PolicySchedule, list[int]]] = {}
    for j, s in enumerate(runs):
        if isinstance(s, PolicySchedule):
            policies.setdefault(id(s), (s, []))[1].append(j)

    episodes = [[info] for info in infos]  # per run: the reset info, then one per epoch
    active = np.ones(B, dtype=bool)
    actions = np.zeros((B,) + venv.action_space.shape, dtype=np.float32)
    t0 = time.perf_counter()
    walls = np.zeros(B)
    while active.any():
        for j in np.flatnonzero(active):
            if not isinstance(runs[j], PolicySchedule):
                actions[j] = runs[j].predict(obs[j])[0]
        for policy, slots in policies.values():
            live = [j for j in slots if active[j]]
            if live:
                actions[live] = policy.predict_batch(obs[live])
        obs, _, dones, step_infos = venv.step(actions)
        for j in np.flatnonzero(active):
            episodes[j].append(step_infos[j])
            if dones[j]:  # the slot is frozen from here on
                active[j] = False
                walls[j] = time.perf_counter() - t0
    venv.close()
    return [trace_from_infos(s.name, inst, episodes[j],
                             np.linspace(0.0, walls[j] / B, len(episodes[j])),  # amortised: the batch's time shared
                             budget=venv.task.budget, divergence_factor=venv.task.divergence_factor,
                             target_metric=venv.family.target_metric,
                             heldout_reference=float(venv.problems[j].info.get("truth_heldout_mse", np.nan)))
            for j, (s, inst) in enumerate(zip(runs, instances))]

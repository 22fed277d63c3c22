"""Evaluate many (schedule, instance) runs at once in one batched engine.

:func:`run_batched` runs ``schedules[j]`` on instance ``instances[j]`` for every ``j`` in one
:class:`lrenv.vec_env.BatchedNMFVecEnv` of up to :data:`MAX_BATCH` slots: one epoch of all running runs is a
handful of batched matrix products instead of one Python-driven epoch per run. A slot whose run ends takes
the next run that has not started (so every slot stays busy until the runs run out), and a slot with
nothing left to run is frozen and no longer computed. Each run is reset exactly as
:func:`lrenv.evaluate.run_schedule` resets its single environment (same instance, same reset seed, same
schedule generator), so the trajectories are the one-at-a-time ones up to the rounding of batched
products (a test checks it).

A schedule can share an engine when it is ``batchable``: its decision needs the observation, the epoch,
its own generator and at most what :class:`lrenv.env.LROracle` answers for its slot (fixed, random,
cosine, two-phase, the line searches Armijo, Polyak and Barzilai-Borwein, trained policies; a recurrent
policy keeps per-run state and is not). Runs must also share their environment settings (action mode and
overrides) and whether they use the gradient: see :func:`group_key`. Schedules that use neither the
observation's gradient norm nor the oracle's gradient (fixed, random, cosine, two-phase) run in an environment
whose statistics skip the gradient (``BatchedNMFVecEnv.gradient_stats``; the trajectories are the same).
"""

from __future__ import annotations

import copy
import json
import time
from typing import Sequence

import numpy as np

from .env import LROracle
from .metrics import Trace, trace_from_infos
from .problems import reset_seed
from .schedules import PolicySchedule, Schedule, schedule_env_kwargs

MAX_BATCH = 16
"""Slots per batched engine: on a CPU larger batches leave the cache (44 small slots per step ran slower per
slot than 16)."""


def group_key(schedule: Schedule) -> str:
    """Runs with equal keys share one batched environment: same action mode and env overrides, and all or none of
    them use the gradient (``Schedule.needs_gradient``; an environment without is cheaper)."""
    return json.dumps([schedule.action_mode, schedule.env_overrides, schedule.needs_gradient], sort_keys=True,
                      default=str)


def run_batched(schedules: Sequence[Schedule], instances: Sequence[int], env_kwargs: dict, *, seed: int = 0,
                max_batch: int = MAX_BATCH) -> list[Trace]:
    """Run ``schedules[j]`` on instance ``instances[j]`` for all ``j``; returns one :class:`Trace` per run,
    in order. Every schedule must be batchable and share one :func:`group_key`. ``env_kwargs`` are the
    evaluation's :class:`lrenv.NMFEnv` keywords. A schedule object that appears several times is copied per
    run (its episode state is per run); a trained policy is shared and queried once per epoch for all its
    running runs. ``wall`` in the traces is the run's wall time divided by the number of slots (amortised)."""
    if len(schedules) != len(instances):
        raise ValueError(f"run_batched: {len(schedules)} schedules for {len(instances)} instances")
    if max_batch < 1:
        raise ValueError(f"run_batched: max_batch must be a positive number of slots, got {max_batch!r}")
    if not schedules:
        return []
    keys = {group_key(s) for s in schedules}
    if len(keys) > 1:
        raise ValueError("run_batched: the schedules need different environment settings; group them with group_key")
    unbatchable = [s.name for s in schedules if not s.batchable]
    if unbatchable:
        raise ValueError(f"run_batched: {sorted(set(unbatchable))} cannot share an engine; run them one at a time")
    return _run_pool(schedules, [int(i) for i in instances], env_kwargs, seed, min(max_batch, len(schedules)))


def _run_pool(schedules: Sequence[Schedule], instances: list[int], env_kwargs: dict, seed: int,
              B: int) -> list[Trace]:
    from .vec_env import BatchedNMFVecEnv

    venv = BatchedNMFVecEnv(num_envs=B, **schedule_env_kwargs(schedules[0], env_kwargs))
    venv.autoreset = False  # a finished run's slot stays put until it gets the next run
    venv.gradient_stats = schedules[0].needs_gradient
    # per-run copies of stateful schedules; policies are shared and queried for all their slots at once
    seen: set[int] = set()
    runs: list[Schedule] = []
    for s in schedules:
        # a copy without the environment handle of a past run (deep-copying it would copy that whole environment)
        runs.append(s if isinstance(s, PolicySchedule) or id(s) not in seen
                    else copy.deepcopy(s, memo={id(s.oracle): None}))
        seen.add(id(s))
    for s in {id(s): s for s in runs if isinstance(s, PolicySchedule)}.values():
        s.check_spaces(venv.observation_space, venv.action_space)

    n = len(runs)
    slot_run = np.full(B, -1)  # the run in each slot (-1: none, frozen)
    episodes: list[list[dict]] = [[] for _ in range(n)]  # per run: the reset info, then one per epoch
    started, walls, heldout_ref = np.zeros(n), np.zeros(n), np.full(n, np.nan)
    pending = iter(range(n))

    def start(slots: list[int], obs: np.ndarray | None) -> np.ndarray:
        """The next runs into ``slots`` (as many as are left); returns the observations of all slots."""
        todo = list(zip(slots, pending))
        if not todo:
            return obs
        slots, js = [i for i, _ in todo], [j for _, j in todo]
        obs, infos = venv.reset_instances([instances[j] for j in js], [reset_seed(instances[j], seed) for j in js],
                                          slots=slots)
        for i, j, info in zip(slots, js, infos):
            slot_run[i] = j
            runs[j].reset(LROracle(venv, i), np.random.default_rng([seed, instances[j], 1]))
            episodes[j].append(info)
            heldout_ref[j] = venv.problems[i].info.get("truth_heldout_mse", np.nan)
            started[j] = time.perf_counter()
        return obs

    obs = start(list(range(B)), None)
    actions = np.zeros((B,) + venv.action_space.shape, dtype=np.float32)
    while (slot_run >= 0).any():
        live = np.flatnonzero(slot_run >= 0)
        policies: dict[int, tuple[PolicySchedule, list[int]]] = {}
        for i in live:
            s = runs[slot_run[i]]
            if isinstance(s, PolicySchedule):
                policies.setdefault(id(s), (s, []))[1].append(i)
            else:
                actions[i] = s.predict(obs[i])[0]
        for policy, slots in policies.values():
            actions[slots] = policy.predict_batch(obs[slots])
        obs, _, dones, step_infos = venv.step(actions)
        ended = []
        for i in live:
            j = slot_run[i]
            episodes[j].append(step_infos[i])
            if dones[i]:  # the slot is frozen until it gets the next run
                walls[j] = time.perf_counter() - started[j]
                slot_run[i] = -1
                ended.append(int(i))
        if ended:
            obs = start(ended, obs)
    venv.close()
    return [trace_from_infos(s.name, inst, episodes[j],
                             np.linspace(0.0, walls[j] / B, len(episodes[j])),  # amortised: the slots' time shared
                             budget=venv.task.budget, divergence_factor=venv.task.divergence_factor,
                             target_metric=venv.family.target_metric,
                             heldout_reference=float(heldout_ref[j]),
                             extra_loss_evals=s.extra_loss_evals)
            for j, (s, inst) in enumerate(zip(runs, instances))]

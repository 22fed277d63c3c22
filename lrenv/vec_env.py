"""A batched Stable-Baselines3 vector environment: ``B`` NMF environments stepped by one engine.

:class:`BatchedNMFVecEnv` is the vectorised form of :class:`lrenv.env.NMFEnv`: the same engine
(:class:`lrenv.engine.SGDEngine` with ``batch=B``), the same MDP rules (:class:`lrenv.task.EpisodeTracker`
over ``B`` slots) and the same instance loading (:func:`lrenv.env.load_instance`), so that with the same
seeds and actions it produces the trajectories of ``B`` :class:`NMFEnv` in a ``DummyVecEnv`` (up to
floating-point rounding of batched products), while one epoch of all ``B`` problems costs a handful of
batched matrix products instead of ``B`` separate Python-driven epochs.

Each slot has its own generator, drawn exactly as ``NMFEnv.np_random`` would be
(:func:`gymnasium.utils.seeding.np_random`), its own episode clock and its own divergence; a slot whose
episode ends is reset on its own (SB3 auto-reset: ``infos[i]["terminal_observation"]`` holds the last
observation, ``infos[i]["TimeLimit.truncated"]`` tells truncation from termination) and only that slot
is re-evaluated.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import seeding
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from .engine import EngineConfig, SGDEngine, bytes_per_instance
from .env import engine_config, load_instance, resolve_instances
from .problems import Problem, ProblemFamily, make_family
from .task import EpisodeTracker, TaskConfig

# Attributes that differ per slot; get_attr/set_attr address them per index.
_PER_SLOT = {"problem": "problems", "instance_seed": "instance_seeds", "np_random": "_rngs"}


def available_memory(device: str | torch.device) -> int:
    """Bytes that can still be allocated on ``device``: free CUDA memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def check_memory(cfg: EngineConfig, num_envs: int, *, fraction: float = 0.9) -> int:
    """Refuse (ValueError) a batch of ``num_envs`` instances that would not fit in ``fraction`` of the
    available memory of ``cfg.device``; returns the bytes the batch needs."""
    per = bytes_per_instance(cfg)
    need = per * num_envs
    avail = available_memory(cfg.device)
    usable = int(avail * fraction)
    if need > usable:
        largest = max(usable // per, 0)
        raise ValueError(
            f"num_envs={num_envs} instances of {cfg.m}x{cfg.n} rank {cfg.rank} ({cfg.dtype}) need "
            f"{_fmt_bytes(need)} ({_fmt_bytes(per)} per instance) but only {_fmt_bytes(avail)} is available "
            f"on {torch.device(cfg.device)} ({int(fraction * 100)}% usable); the largest batch that fits is "
            f"B={largest}")
    return need


class BatchedNMFVecEnv(VecEnv):
    """``num_envs`` :class:`lrenv.env.NMFEnv` environments of one family, stepped together on one device.

    Arguments are NMFEnv's (``problem, problem_params, instances, budget, num_blocks, grad_noise,
    device, dtype, threads`` and every :class:`lrenv.task.TaskConfig` field) plus ``num_envs``. Raises
    ValueError before allocating anything when the batch does not fit in memory.
    """

    def __init__(self, problem: str | ProblemFamily = "small", num_envs: int = 8, *,
                 problem_params: dict | None = None, instances: str | range | list[int] = "train",
                 budget: int | None = None, num_blocks: int | None = None, grad_noise: float = 0.0,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 threads: int | None = 1, **task_kwargs: Any):
        if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self.render_mode = None
        self.family = make_family(problem, **(problem_params or {}))
        self.instances = resolve_instances(instances)
        self.task = TaskConfig.from_kwargs(budget=self.family.budget if budget is None else budget,
                                          **task_kwargs).bind_family(self.family.name)
        cfg = engine_config(self.family, num_blocks, grad_noise, device, dtype, threads,
                            track_noise="grad_noise" in self.task.obs_features, optimizer=self.task.optimizer)
        self.memory_bytes = check_memory(cfg, int(num_envs))
        B = int(num_envs)
        self.engine = SGDEngine(cfg, batch=B)
        self.tracker = EpisodeTracker(self.task, B, self.family.has_heldout, self.family.target_metric)
        super().__init__(B, self.task.observation_space(), self.task.action_space())
        self.metadata = {"render_modes": []}
        self.problems: list[Problem | None] = [None] * B
        self.instance_seeds: list[int | None] = [None] * B
        self._rngs: list[np.random.Generator | None] = [None] * B
        self._orders = np.zeros((B, self.task.budget, cfg.num_blocks), dtype=np.int64)
        self._arange = np.arange(B)
        self._targets = np.zeros(B)
        self._actions: np.ndarray | None = None
        self._needs_reset = True
        self.autoreset = True
        """False: a finished slot stays frozen (no step, no new episode) instead of starting the next one; for
        evaluation, where a reset would draw a problem nobody records."""
        self._frozen = np.zeros(B, dtype=bool)
        self.gradient_stats = True
        """False: statistics without the gradient (a third of their cost; its norm reads NaN in observations and
        infos, and LROracle has no gradient), for evaluating schedules that use neither (:mod:`lrenv.batch_eval`)."""

    # -------------------------------------------------------------- slots
    def _reset_slots(self, slots: Sequence[int], seeds: Sequence[int | None] | None = None,
                     options: Sequence[dict] | None = None) -> list[dict]:
        """Start new episodes in ``slots`` exactly as ``NMFEnv.reset`` would; returns their reset infos."""
        for j, i in enumerate(slots):
            seed = None if seeds is None else seeds[j]
            opts = ({} if options is None else options[j]) or {}
            if seed is not None or self._rngs[i] is None:
                self._rngs[i], _ = seeding.np_random(seed)
            rng = self._rngs[i]
            if "instance" in opts:
                inst = int(opts["instance"])
            else:
                inst = int(self.instances[int(rng.integers(len(self.instances)))])
            self.instance_seeds[i] = inst
            self.problems[i] = self.family.instance(inst)
            self._targets[i] = self.problems[i].target_loss
            self._orders[i] = load_instance(self.engine, i, self.problems[i], rng, self.task.budget)
        all_slots = len(slots) == self.num_envs and list(slots) == list(range(self.num_envs))
        stats = self._stats(None if all_slots else slots)
        idx = np.asarray(slots, dtype=np.int64)
        self.tracker.reset(idx, stats, self._targets[idx])
        infos = []
        for i in slots:
            info = self.tracker.info(i)
            info["instance"] = self.instance_seeds[i]
            self.reset_infos[i] = info
            infos.append(info)
        return infos

    def _stats(self, slots=None, episode_start: bool | None = None) -> np.ndarray:
        return self.engine.evaluate(slots, episode_start=episode_start,
                                    gradient=self.gradient_stats).double().cpu().numpy()

    # -------------------------------------------------------------- VecEnv API
    def reset(self) -> VecEnvObs:
        self._reset_slots(list(range(self.num_envs)), seeds=self._seeds, options=self._options)
        self._reset_seeds()
        self._reset_options()
        self._needs_reset = False
        return self.tracker.observe()

    def reset_instances(self, instances: Sequence[int], seeds: Sequence[int],
                        slots: Sequence[int] | None = None) -> tuple[VecEnvObs, list[dict]]:
        """Start slot ``slots[k]`` (default: every slot, in order) on instance ``instances[k]`` with reset seed
        ``seeds[k]``, exactly as ``NMFEnv.reset(seed=seeds[k], options={"instance": instances[k]})``; a frozen
        slot (``autoreset = False``) runs again. Returns the observations of all slots and the infos of the
        listed ones. Resetting some slots needs a reset of all of them first."""
        slots = list(range(self.num_envs)) if slots is None else [int(i) for i in slots]
        if len(instances) != len(slots) or len(seeds) != len(slots):
            raise ValueError(f"reset_instances needs {len(slots)} instances and seeds, got "
                             f"{len(instances)} and {len(seeds)}")
        if self._needs_reset and sorted(slots) != list(range(self.num_envs)):
            raise RuntimeError("BatchedNMFVecEnv.reset_instances: reset every slot before resetting some of them")
        infos = self._reset_slots(slots, seeds=list(seeds), options=[{"instance": int(i)} for i in instances])
        self._needs_reset = False
        self._frozen[slots] = False
        return self.tracker.observe(), infos

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        if self._needs_reset:
            raise RuntimeError("BatchedNMFVecEnv.step() called before reset(); call reset()")
        B, cfg = self.num_envs, self.engine.cfg
        actions = np.asarray(self._actions, dtype=np.float64).reshape(B, -1)[:, :self.task.action_dim]
        lr, a, invalid = self.tracker.actions_to_lr(actions)
        t = np.minimum(self.tracker.epoch, self.task.budget - 1)
        order = self._orders[self._arange, t]  # (B, K): each slot's minibatch order for its epoch
        still = invalid | self._frozen
        any_invalid = bool(still.any())
        lr_run = np.where(still[:, None], 0.0, lr) if any_invalid else lr  # an invalid or frozen slot does not move
        if not (any_invalid and still.all()):
            lr_t = torch.as_tensor(lr_run, dtype=cfg.dtype, device=cfg.device)
            if self._frozen.any() and B > 1:  # frozen slots are not computed at all
                live = np.flatnonzero(~self._frozen)
                self.engine.epoch(lr_t[live], torch.as_tensor(order[live], device=cfg.device), index=live)
                stats = self.tracker.stats.copy()
                stats[live] = self._stats(live, episode_start=False)
            else:
                self.engine.epoch(lr_t, order if B == 1 else torch.as_tensor(order, device=cfg.device))
                stats = self._stats()
        else:
            stats = self.tracker.stats.copy()
        if any_invalid:
            stats[still] = self.tracker.stats[still]
        obs, reward, terminated, truncated, infos = self.tracker.step(stats, a, lr, invalid)
        dones = terminated | truncated
        for i in range(B):
            infos[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        if not self.autoreset:
            self._frozen |= dones
        elif dones.any():
            done_idx = np.flatnonzero(dones)
            for i in done_idx:
                infos[i]["terminal_observation"] = obs[i]
            self._reset_slots([int(i) for i in done_idx])
            obs = self.tracker.observe()
        return obs, reward.astype(np.float32), dones, infos

    def close(self) -> None:
        pass

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        return super().seed(seed)

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    # -------------------------------------------------------------- attributes
    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        idx = list(self._get_indices(indices))
        if attr_name in _PER_SLOT:
            values = getattr(self, _PER_SLOT[attr_name])
            if attr_name == "np_random":
                for i in idx:
                    if values[i] is None:
                        values[i], _ = seeding.np_random()
            return [values[i] for i in idx]
        if attr_name == "unwrapped":
            return [self] * len(idx)
        value = getattr(self, attr_name)
        return [value for _ in idx]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        idx = list(self._get_indices(indices))
        if attr_name in _PER_SLOT:
            values = getattr(self, _PER_SLOT[attr_name])
            for i in idx:
                values[i] = value
            return
        if len(idx) != self.num_envs:
            raise ValueError(f"{attr_name!r} is shared by all {self.num_envs} slots of a BatchedNMFVecEnv; "
                             "it can only be set for all of them (indices=None)")
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        idx = list(self._get_indices(indices))
        if method_name == "reset":  # reset single slots: returns (obs, info) per slot, like NMFEnv.reset
            seed = method_kwargs.get("seed")
            opts = method_kwargs.get("options")
            infos = self._reset_slots(idx, seeds=[seed] * len(idx), options=[opts] * len(idx))
            obs = self.tracker.observe()
            return [(obs[i], info) for i, info in zip(idx, infos)]
        method = getattr(self, method_name)
        return [method(*method_args, **method_kwargs) for _ in idx]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

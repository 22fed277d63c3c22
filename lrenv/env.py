"""The Gymnasium environment: choose the SGD learning rate of a matrix factorisation, epoch by epoch."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch

from .engine import STAT_GRAD_NORM, STAT_LOSS, EngineConfig, SGDEngine
from .problems import EVAL_SEEDS, TRAIN_SEEDS, Problem, ProblemFamily, make_family
from .task import EpisodeTracker, TaskConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_instances(instances: str | range | list[int]) -> range | list[int]:
    if isinstance(instances, str):
        if instances not in ("train", "eval"):
            raise ValueError(f"instances must be 'train', 'eval' or a list of seeds, got {instances!r}")
        return TRAIN_SEEDS if instances == "train" else EVAL_SEEDS
    seeds = list(instances)
    if not seeds:
        raise ValueError("instances: the list of instance seeds is empty")
    return seeds


def engine_config(family: ProblemFamily, num_blocks: int | None, grad_noise: float, device: str | torch.device,
                  dtype: str | torch.dtype, threads: int | None = None) -> EngineConfig:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if grad_noise < 0:
        raise ValueError(f"grad_noise must be >= 0, got {grad_noise}")
    return EngineConfig(m=family.m, n=family.n, rank=family.rank,
                        num_blocks=family.num_blocks if num_blocks is None else int(num_blocks),
                        nonneg=family.nonneg, reg=family.reg, grad_noise=grad_noise, masked=family.masked,
                        heldout=family.has_heldout, device=torch.device(device), dtype=dtype, threads=threads)


def load_instance(engine: SGDEngine, slot: int, problem: Problem, rng: np.random.Generator,
                  budget: int) -> np.ndarray:
    """Put ``problem`` into ``slot`` with initial factors, row shuffle and the episode's minibatch
    order (a (budget, K) table), all drawn from ``rng``; returns the order table."""
    W0, H0 = problem.init(rng)
    K = engine.cfg.num_blocks
    row_perm = rng.permutation(problem.shape[0])
    order = rng.permuted(np.tile(np.arange(K), (budget, 1)), axis=1)
    engine.load(slot, problem.V, W0, H0, row_perm=row_perm, mask=problem.mask, heldout=problem.heldout,
                free_W=problem.free_W, free_H=problem.free_H, noise_seed=int(rng.integers(2**62)))
    return order


class NMFEnv(gym.Env[np.ndarray, np.ndarray]):
    """Pick the learning rate of stochastic (projected) SGD on a matrix factorisation, one epoch per step.

    The underlying problem is minimising ``F = 1/2 ||M o (V - W H)||^2 (+ reg)`` over ``W, H >= 0``
    (no sign constraint for ``illcond`` and ``tutorial``) by minibatch SGD (see :mod:`lrenv.engine`).
    Each reset draws a problem instance from the family (training or held-out seed range) and fresh
    initial factors; a step runs one epoch at the chosen learning rate.

    ## Action Space
    ``Box(shape=(1,))``. ``action_mode="log_bound"`` (default): ``a in [-1, 1]`` sets the step size of
    each factor to ``action_center * (2/L) * 10^(log_range * a)`` with that factor's current Lipschitz
    constant, so one policy serves problems of any scale; ``a = 0`` (an untrained policy's mean) is
    ``action_center = 0.25`` of the full-batch bound, below where minibatch SGD starts to diverge.
    ``action_mode="paper"``: ``a in [0, lr_max]`` is the absolute learning rate of both factors.
    ``action_mode="relative"``: ``a in [-1, 1]`` multiplies each factor's step size in force by
    ``10^(relative_range * a)``, clipped to ``[lr_min, lr_max]``; before the first step it is ``lr_init``.
    With ``lr_reference="bound"`` (default) ``lr_init, lr_min, lr_max`` are fractions of each factor's own
    2/L at reset (per factor); with ``"absolute"`` they are step sizes shared by both factors.
    Finite actions outside the space are clipped to it; a NaN action ends the episode as a divergence.

    ## Observation Space
    ``Box(-obs_clip, obs_clip, float32)``, never NaN or inf. Features (``obs_features``, in this order):

    ============ ============================================= =========
    feature      value                                          default
    ============ ============================================= =========
    loss         log10(loss / initial loss)                     yes
    epoch        epoch / budget, in [0, 1]                      yes
    grad_norm    log10(||projected grad|| / initial norm)       yes
    bound        log10(2/L_W), log10(2/L_H) (two entries)       no
    prev_action  previous (clipped) action                      no
    target_gap   log10(loss / target loss)                      no
    lr_rel       log10(step size in force / lr_init)            no
                 (relative mode; mean over the two factors)
    loss_slope   log10(loss / previous epoch's loss)            no
    ============ ============================================= =========

    ## Rewards
    Each epoch: ``improvement * 100 * (best - loss) / best`` when the loss beats the best so far
    (else 0), minus ``time_cost``. Reaching the target loss adds ``remaining`` per epoch left of the
    budget; divergence subtracts ``divergence_penalty`` (see :class:`lrenv.task.RewardConfig`).

    ## Episode End
    Terminated when the loss reaches the target or the run diverges (a non-finite loss, a loss above
    ``divergence_factor`` times the initial one, or a NaN action); the next reset re-initialises the
    problem. Truncated after ``budget`` epochs.

    ## Info
    ``epoch, loss, best_loss, target_loss, grad_norm, lr_W, lr_H`` (step sizes applied),
    ``bound_W, bound_H`` (2/L per factor at the start of the epoch), ``diverged, reached_target,
    invalid_action``, and ``heldout_mse`` for families with held-out entries.

    ## Arguments
    ``problem`` (a family name or path, see :func:`lrenv.problems.make_family`) with ``problem_params``;
    ``instances``: ``'train'``, ``'eval'`` or explicit seeds; ``budget`` (default: the family's);
    ``num_blocks`` minibatches per epoch; ``grad_noise``; ``device``; ``dtype``; ``threads`` (torch threads
    while the engine computes on a CPU; default 1, which never collapses on a busy machine; None: as torch is set); and every
    :class:`lrenv.task.TaskConfig` field as a keyword (``action_mode``, ``reward``, ``obs_features``...).
    ``reset(options={"instance": seed})`` pins the instance.
    """

    metadata = {"render_modes": []}

    def __init__(self, problem: str | ProblemFamily = "small", *, problem_params: dict | None = None,
                 instances: str | range | list[int] = "train", budget: int | None = None,
                 num_blocks: int | None = None, grad_noise: float = 0.0, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = 1, **task_kwargs: Any):
        super().__init__()
        self.family = make_family(problem, **(problem_params or {}))
        self.instances = resolve_instances(instances)
        self.task = TaskConfig.from_kwargs(budget=self.family.budget if budget is None else budget, **task_kwargs)
        self.engine = SGDEngine(engine_config(self.family, num_blocks, grad_noise, device, dtype, threads),
                                 batch=1)
        self.tracker = EpisodeTracker(self.task, 1, self.family.has_heldout)
        self.observation_space = self.task.observation_space()
        self.action_space = self.task.action_space()
        self.problem: Problem | None = None
        self.instance_seed: int | None = None
        self._order = np.zeros((self.task.budget, self.engine.cfg.num_blocks), dtype=np.int64)
        self._needs_reset = True

    # -------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "instance" in options:
            self.instance_seed = int(options["instance"])
        else:
            self.instance_seed = int(self.instances[int(self.np_random.integers(len(self.instances)))])
        self.problem = self.family.instance(self.instance_seed)
        self._order = load_instance(self.engine, 0, self.problem, self.np_random, self.task.budget)
        stats = self._stats()
        self.tracker.reset([0], stats, np.array([self.problem.target_loss]))
        self._needs_reset = False
        info = self.tracker.info(0)
        info["instance"] = self.instance_seed
        return self._get_obs(), info

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("NMFEnv.step() called before reset() or after the episode ended; call reset()")
        lr, a, invalid = self.tracker.actions_to_lr(np.asarray(action).reshape(1))
        if not invalid[0]:
            t = int(self.tracker.epoch[0])
            self.engine.epoch(torch.as_tensor(lr, dtype=self.engine.cfg.dtype, device=self.engine.cfg.device),
                              self._order[t:t + 1])
            stats = self._stats()
        else:
            stats = self.tracker.stats.copy()
        obs, reward, terminated, truncated, infos = self.tracker.step(stats, a, lr, invalid)
        self._needs_reset = bool(terminated[0] or truncated[0])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), infos[0]

    def _stats(self) -> np.ndarray:
        return self.engine.evaluate().double().cpu().numpy()

    def _get_obs(self) -> np.ndarray:
        return self.tracker.observe()[0]

    # -------------------------------------------------------------- problem handle for schedules
    @property
    def oracle(self) -> "LROracle":
        """Documented handle for schedules that need the problem (bound, gradient, trial steps)."""
        return LROracle(self)


class LROracle:
    """What a schedule may ask of the environment it controls, without reaching into private state.

    All values refer to the current iterate (the start of the next epoch).
    """

    def __init__(self, env: NMFEnv):
        self._env = env

    @property
    def task(self) -> TaskConfig:
        return self._env.task

    def loss(self) -> float:
        return float(self._env.tracker.stats[0, STAT_LOSS])

    def grad_norm(self) -> float:
        return float(self._env.tracker.stats[0, STAT_GRAD_NORM])

    def bounds(self) -> np.ndarray:
        """(2/L_W, 2/L_H): the per-factor step-size bounds."""
        return 2.0 / self._env.tracker.lipschitz()[0]

    def lr_for(self, action) -> np.ndarray:
        """The step sizes (lr_W, lr_H) that ``action`` would apply now."""
        return self._env.tracker.actions_to_lr(np.asarray(action).reshape(1))[0][0]

    def params_and_grad(self) -> tuple[np.ndarray, np.ndarray]:
        """The current parameters (W, H) and full gradient, each flattened to one float64 vector."""
        e = self._env.engine
        x = torch.cat([e.W.reshape(-1), e.H.reshape(-1)]).double().cpu().numpy()
        g = torch.cat([e.gW.reshape(-1), e.gH.reshape(-1)]).double().cpu().numpy()
        return x, g

    def trial(self, action) -> tuple[float, float]:
        """Loss after one full-batch projected gradient step at ``action``'s step sizes, not committed,
        and the first-order decrease ``<grad, x - x_new>`` (Armijo's right-hand side without c)."""
        e = self._env.engine
        lr = torch.as_tensor(self.lr_for(action)[None], dtype=e.cfg.dtype, device=e.cfg.device)
        loss, dec = e.trial_loss(lr)
        return float(loss[0]), float(dec[0])

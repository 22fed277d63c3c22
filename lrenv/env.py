"""The Gymnasium environment: choose the SGD learning rate of a matrix factorisation, epoch by epoch."""

from __future__ import annotations

import os
import pickle
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from .engine import STAT_GRAD_NORM, STAT_LOSS, EngineConfig, SGDEngine, torch_threads
from .problems import SPLITS, Problem, ProblemFamily, make_family, split_seeds
from .task import EpisodeTracker, TaskConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64}
RENDER_MODES = ("rgb_array",)
CLIFF_SCALE = 0.55
"""Fraction of the full-batch bound 2/L above which minibatch SGD starts to diverge (SPEC §5; README)."""


def resolve_instances(instances: str | range | list[int]) -> range | list[int]:
    """Instance seeds from a split name ('train', 'validation', 'test'; 'eval' = 'test') or explicit seeds."""
    if isinstance(instances, str):
        if instances not in (*SPLITS, "eval"):
            raise ValueError(f"instances must be a split ({', '.join(SPLITS)}) or a list of seeds, got {instances!r}")
        return split_seeds(instances)
    seeds = list(instances)
    if not seeds:
        raise ValueError("instances: the list of instance seeds is empty")
    return seeds


def engine_config(family: ProblemFamily, num_blocks: int | None, grad_noise: float, device: str | torch.device,
                  dtype: str | torch.dtype, threads: int | None = None, track_noise: bool = False,
                  optimizer: str = "sgd") -> EngineConfig:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if grad_noise < 0:
        raise ValueError(f"grad_noise must be >= 0, got {grad_noise}")
    return EngineConfig(m=family.m, n=family.n, rank=family.rank,
                        num_blocks=family.num_blocks if num_blocks is None else int(num_blocks),
                        nonneg=family.nonneg, reg=family.reg, grad_noise=grad_noise, masked=family.masked,
                        heldout=family.has_heldout, device=torch.device(device), dtype=dtype, threads=threads,
                        track_noise=track_noise, optimizer=optimizer)


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
    ``Box(shape=(1,))`` (``(2,)`` in ``per_factor`` mode). ``action_mode="log_bound"`` (default):
    ``a in [-1, 1]`` sets the step size of
    each factor to ``action_center * (2/L) * 10^(log_range * a)`` with that factor's current Lipschitz
    constant, so one policy serves problems of any scale; ``a = 0`` (an untrained policy's mean) is
    ``action_center = 0.25`` of the full-batch bound, below where minibatch SGD starts to diverge. With
    ``action_center_final`` the centre decays along a cosine from ``action_center`` to it over the budget
    (:class:`lrenv.schedules.CosineDecay`'s formula): ``a = 0`` is then that cosine schedule and the policy learns a
    correction of it (also in ``per_factor`` mode, where ``factor_tilt = (t_W, t_H)`` scales each factor's centre:
    ``a = 0`` is then the per-factor cosine :class:`lrenv.schedules.CosineDecayPair`; ``factor_tilt='tuned'`` reads
    the pair from the family's shipped tuned per-factor fixed step, so with ``action_center=1`` ``a = 0`` is that step).
    With ``optimizer="adam"`` the env runs Adam on the same minibatches and the step sizes are Adam's learning
    rates; every mode's reference is then Adam's scale ``s`` (the RMS of the initial factors) in place of 2/L, so
    ``action_center = lr_rel`` makes ``a = 0`` the Adam baseline's ``lr = lr_rel * s`` (:mod:`lrenv.engine`).
    ``center_plateau = (patience, factor)`` (or ``'tuned'``, the family's tuned Adam rule) runs ReduceLROnPlateau on
    the centre instead: with ``optimizer="adam"``, ``factor_tilt='tuned'`` and ``action_center=1`` ``a = 0`` is then
    the tuned Adam baseline, plateau rule included, and the policy learns a correction of it.
    ``action_mode="paper"``: ``a in [0, lr_max]`` is the absolute learning rate of both factors.
    ``action_mode="relative"``: ``a in [-1, 1]`` multiplies each factor's step size in force by
    ``10^(relative_range * a)``, clipped to ``[lr_min, lr_max]``; before the first step it is ``lr_init``.
    With ``lr_reference="bound"`` (default) ``lr_init, lr_min, lr_max`` are fractions of each factor's own
    2/L at reset (per factor); with ``"absolute"`` they are step sizes shared by both factors.
    ``action_mode="per_factor"``: ``(a_W, a_H) in [-1, 1]^2`` sets
    ``lr_W = action_center * (2/L_W) * 10^(log_range * a_W)``
    and ``lr_H`` likewise from ``a_H``: each factor relative to its own bound (the minibatch H-step diverges near
    0.55 x 2/L_H, the exact W-step is stable to 2/L_W); ``task.action_for_scale((s_W, s_H))`` gives the action for
    ``lr = s * 2/L`` per factor.
    Finite actions outside the space are clipped to it; a NaN action (any component) ends the episode as a divergence.

    ## Observation Space
    ``Box(-obs_clip, obs_clip, float32)``, never NaN or inf. Features (``obs_features``, in this order):

    ============ ============================================= =========
    feature      value                                          default
    ============ ============================================= =========
    loss         log10(loss / initial loss)                     yes
    epoch        epoch / budget, in [0, 1]                      yes
    grad_norm    log10(||projected grad|| / initial norm)       yes
    bound        log10(2/L_W), log10(2/L_H) (two entries)       no
    prev_action  previous (clipped) action (one entry per           no
                 action component)
    target_gap   log10(loss / target loss)                      no
    lr_rel       log10(step size in force / lr_init)            no
                 (relative mode; mean over the two factors)
    loss_slope   log10(loss / previous epoch's loss)            no
    loss_slope_  exponential average of loss_slope              no
    ema          (weight ``slope_smoothing`` on the past; 0 at
                 reset)
    grad_noise   log10(1 + Var_k(g_k) / ||mean_k g_k||^2) over  no
                 the last epoch's minibatch H-gradient
                 estimates g_k (0 at reset and with one
                 minibatch; measured only when observed)
    lr_bound     log10(step in force / current 2/L), per        no
                 factor (two entries; the last epoch's step,
                 relative mode's state; 0 before a step)
    epochs_left  (budget - epoch) / budget                      no
    center_scale log10 of the plateau rule's multiplier of the      no
                 centre (``center_plateau``; 0 without one)
    ============ ============================================= =========
    All are scale-free (ratios and logs of ratios): a policy sees the same numbers on a problem scaled by any factor.

    ## Rewards
    Each epoch: ``improvement * gain`` when the loss beats the best so far (else 0), minus ``time_cost``.
    Reaching the target loss adds ``remaining`` per epoch left of the budget; divergence subtracts
    ``divergence_penalty``. ``reward={"kind": "paper"}`` (default, the paper's): ``gain = 100 * (best - loss) / best``;
    ``"progress"``: ``gain = ln(best / loss)``, which sums to ``ln(f0 / f_best)`` over an episode, so it keeps
    teaching where the target is out of reach (see :class:`lrenv.task.RewardConfig`; ``lrenv.task.PROGRESS_REWARD``
    holds weights on its scale).

    ## Episode End
    Terminated when the loss reaches the target or the run diverges (a non-finite loss, a loss above
    ``divergence_factor`` times the initial one, or a NaN action); the next reset re-initialises the
    problem. Truncated after ``budget`` epochs.

    ## Info
    ``epoch, loss, fit`` (the loss less its regularisation), ``best_loss, target_loss`` (compared with the
    loss, or with ``fit`` where the family's ``target_metric`` says so), ``grad_norm, lr_W, lr_H`` (step sizes applied),
    ``bound_W, bound_H`` (2/L per factor at the start of the epoch), ``diverged, reached_target,
    invalid_action``, and ``heldout_mse`` for families with held-out entries.

    ## Arguments
    ``problem`` (a family name or path, see :func:`lrenv.problems.make_family`) with ``problem_params``;
    ``instances``: a split (``'train'``, ``'validation'``, ``'test'``) or explicit seeds; ``budget`` (default: the family's);
    ``num_blocks`` minibatches per epoch; ``grad_noise``; ``device``; ``dtype``; ``threads`` (torch threads
    while the engine computes on a CPU; default 1, which never collapses on a busy machine; None: as torch is set); and every
    :class:`lrenv.task.TaskConfig` field as a keyword (``action_mode``, ``reward``, ``obs_features``...).
    ``reset(options={"instance": seed})`` pins the instance. ``render_mode``: None or ``"rgb_array"``
    (:meth:`render` draws the episode's loss / target and both factors' step sizes relative to their bound,
    with the bound and the stability cliff, as an (H, W, 3) uint8 array: record it as a video).

    ## Clients (gymnasium ids, pickling, processes)
    Registered ids: ``lrenv/NMF-v0`` (any family through ``problem=``) and one per family,
    ``lrenv/NMF-small-v0`` ... ``lrenv/NMF-digits-v0``, whose ``max_episode_steps`` is the family's budget
    (``gym.make("lrenv:lrenv/NMF-sales-v0")`` imports lrenv first); the generic id's is the largest family
    budget (1000), an upper bound: the env truncates itself at its own budget. Passing a ``budget`` above the
    id's ``max_episode_steps``? Pass ``max_episode_steps`` too, or gymnasium's TimeLimit cuts the episode
    while the ``epoch`` feature says time is left.
    Envs pickle (constructor arguments, generator and, mid-episode, the iterate), so ``copy.deepcopy`` and
    process-based vector envs work. The engine's tensors are allocated at the first reset, not in the
    constructor: a vector env that builds a probe env in the parent and then forks (gymnasium's
    ``make_vec(..., vectorization_mode="async")``) has done no torch work before the fork. Torch work of your
    own before forking (a model built first) can still deadlock OpenMP in the children: pass
    ``vector_kwargs={"context": "forkserver"}`` (SB3's SubprocVecEnv uses forkserver already).
    """

    metadata = {"render_modes": list(RENDER_MODES), "render_fps": 10}

    def __init__(self, problem: str | ProblemFamily = "small", *, problem_params: dict | None = None,
                 instances: str | range | list[int] = "train", budget: int | None = None,
                 num_blocks: int | None = None, grad_noise: float = 0.0, device: str = "cpu",
                 dtype: str = "float32", threads: int | None = 1, render_mode: str | None = None,
                 **task_kwargs: Any):
        super().__init__()
        if render_mode is not None and render_mode not in RENDER_MODES:
            raise ValueError(f"render_mode must be None or one of {RENDER_MODES}, got {render_mode!r}")
        self.render_mode = render_mode
        self._init_kwargs = dict(problem=problem, problem_params=problem_params, instances=instances, budget=budget,
                                 num_blocks=num_blocks, grad_noise=grad_noise, device=device, dtype=dtype,
                                 threads=threads, render_mode=render_mode, **task_kwargs)
        self.family = make_family(problem, **(problem_params or {}))
        self.instances = resolve_instances(instances)
        self.task = TaskConfig.from_kwargs(budget=self.family.budget if budget is None else budget,
                                          **task_kwargs).bind_family(self.family.name)
        self.engine_cfg = engine_config(self.family, num_blocks, grad_noise, device, dtype, threads,
                                        track_noise="grad_noise" in self.task.obs_features,
                                        optimizer=self.task.optimizer)
        self._engine: SGDEngine | None = None  # built at first use: no torch work in the constructor
        self.tracker = EpisodeTracker(self.task, 1, self.family.has_heldout, self.family.target_metric)
        self.observation_space = self.task.observation_space()
        self.action_space = self.task.action_space()
        self.problem: Problem | None = None
        self.instance_seed: int | None = None
        self._order = np.zeros((self.task.budget, self.engine_cfg.num_blocks), dtype=np.int64)
        self._needs_reset = True
        self._history: list[tuple[float, float, float]] = []  # (loss/target, lr_W/bound_W, lr_H/bound_H)

    @property
    def engine(self) -> SGDEngine:
        """The SGD engine, allocated on first use (under the env's thread setting, see the class docstring)."""
        if self._engine is None:
            with torch_threads(self.engine_cfg):
                self._engine = SGDEngine(self.engine_cfg, batch=1)
        return self._engine

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
        if self.render_mode is not None:
            self._history = [(info["loss"] / info["target_loss"], np.nan, np.nan)]
        return self._get_obs(), info

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("NMFEnv.step() called before reset() or after the episode ended; call reset()")
        lr, a, invalid = self.tracker.actions_to_lr(np.asarray(action).reshape(1, -1))
        if not invalid[0]:
            t = int(self.tracker.epoch[0])
            self.engine.epoch(torch.as_tensor(lr, dtype=self.engine.cfg.dtype, device=self.engine.cfg.device),
                              self._order[t:t + 1])
            stats = self._stats()
        else:
            stats = self.tracker.stats.copy()
        obs, reward, terminated, truncated, infos = self.tracker.step(stats, a, lr, invalid)
        self._needs_reset = bool(terminated[0] or truncated[0])
        info = infos[0]
        if self.render_mode is not None:
            with np.errstate(all="ignore"):
                self._history.append((info["loss"] / info["target_loss"], info["lr_W"] / info["bound_W"],
                                      info["lr_H"] / info["bound_H"]))
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        """``render_mode="rgb_array"``: the current episode's curves as an (H, W, 3) uint8 image; None otherwise."""
        if self.render_mode is None:
            gym.logger.warn("NMFEnv.render() called without a render_mode; create the env with render_mode='rgb_array'")
            return None
        return render_curves(np.array(self._history, dtype=np.float64).reshape(-1, 3), self.task.budget,
                             title=f"{self.family.name} instance {self.instance_seed}")

    # -------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        """Constructor arguments, the generator and (mid-episode) the iterate: the problem family holds
        closures, so it is rebuilt from its name on unpickling instead of being pickled."""
        problem = self._init_kwargs["problem"]
        if not isinstance(problem, (str, os.PathLike)):
            raise pickle.PicklingError("NMFEnv built from a ProblemFamily object cannot be pickled; build it from a "
                                       "family name or a matrix path (problem='small', problem='data.npy')")
        state: dict[str, Any] = {"init": self._init_kwargs, "np_random": self._np_random,
                                 "np_random_seed": self._np_random_seed, "instance_seed": self.instance_seed,
                                 "needs_reset": self._needs_reset, "history": self._history, "episode": None}
        if not self._needs_reset and self._engine is not None:
            state["episode"] = {"order": self._order, "tracker": dict(vars(self.tracker), cfg=None),
                                "engine": _engine_state(self._engine)}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["init"])
        self._np_random, self._np_random_seed = state["np_random"], state["np_random_seed"]
        self.instance_seed, self._history = state["instance_seed"], state["history"]
        episode = state["episode"]
        if episode is not None:
            self.problem = self.family.instance(self.instance_seed)
            self._order = episode["order"]
            vars(self.tracker).update({k: v for k, v in episode["tracker"].items() if k != "cfg"})
            _restore_engine(self.engine, episode["engine"])
            self._needs_reset = False

    def _stats(self) -> np.ndarray:
        return self.engine.evaluate().double().cpu().numpy()

    def _get_obs(self) -> np.ndarray:
        return self.tracker.observe()[0]

    # -------------------------------------------------------------- problem handle for schedules
    @property
    def oracle(self) -> "LROracle":
        """Documented handle for schedules that need the problem (bound, gradient, trial steps)."""
        return LROracle(self)


def _engine_state(engine: SGDEngine) -> dict:
    """The engine's attributes with its noise generators as their states (torch.Generator does not pickle)."""
    state = dict(vars(engine))
    state["_noise_gen"] = [None if g is None else (str(g.device), g.get_state()) for g in engine._noise_gen]
    return state


def _restore_engine(engine: SGDEngine, state: dict) -> None:
    gens = []
    for g in state["_noise_gen"]:
        if g is None:
            gens.append(None)
            continue
        gen = torch.Generator(device=g[0])
        gen.set_state(g[1])
        gens.append(gen)
    vars(engine).update(dict(state, _noise_gen=gens))


def render_curves(history: np.ndarray, budget: int, title: str = "") -> np.ndarray:
    """Draw (epochs, 3) rows of (loss/target, lr_W/bound_W, lr_H/bound_H) into an RGB uint8 array."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    del matplotlib  # the Agg canvas is used directly: no pyplot, no global backend change
    fig = Figure(figsize=(8, 3.2), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_lr = fig.subplots(1, 2)
    x = np.arange(len(history))
    with np.errstate(all="ignore"):
        ok = np.isfinite(history) & (history > 0)
    ax_loss.plot(x[ok[:, 0]], history[ok[:, 0], 0], color="C0", lw=1.6)
    ax_loss.axhline(1.0, color="k", ls="--", lw=0.8)
    ax_loss.set(yscale="log", xlim=(0, budget), xlabel="epoch", ylabel="loss / target", title=title or "loss")
    for col, name, color in ((1, "W", "C1"), (2, "H", "C2")):
        ax_lr.plot(x[ok[:, col]], history[ok[:, col], col], color=color, lw=1.4, label=f"lr_{name} / (2/L_{name})")
    ax_lr.axhline(1.0, color="k", ls="--", lw=0.8, label="bound 2/L")
    ax_lr.axhline(CLIFF_SCALE, color="r", ls=":", lw=0.8, label=f"cliff {CLIFF_SCALE} x 2/L")
    ax_lr.set(yscale="log", ylim=(1e-3, 3.0), xlim=(0, budget), xlabel="epoch", ylabel="step / bound",
              title="step sizes")
    ax_lr.legend(fontsize=7, loc="lower left")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].copy()


class LROracle:
    """What a schedule may ask of the environment it controls, without reaching into private state.

    All values refer to the current iterate (the start of the next epoch). ``env`` is an :class:`NMFEnv`
    or a :class:`lrenv.vec_env.BatchedNMFVecEnv`, whose slot ``slot`` the oracle then speaks for (same
    answers as a single env on that slot's instance, up to the rounding of batched products).
    """

    def __init__(self, env: Any, slot: int = 0):
        self._env = env
        self._slot = int(slot)

    @property
    def task(self) -> TaskConfig:
        return self._env.task

    def loss(self) -> float:
        return float(self._env.tracker.stats[self._slot, STAT_LOSS])

    def grad_norm(self) -> float:
        return float(self._env.tracker.stats[self._slot, STAT_GRAD_NORM])

    def bounds(self) -> np.ndarray:
        """(2/L_W, 2/L_H): the per-factor step-size bounds."""
        return 2.0 / self._env.tracker.lipschitz()[self._slot]

    def lr_for(self, action) -> np.ndarray:
        """The step sizes (lr_W, lr_H) that ``action`` would apply now."""
        return self._env.tracker.actions_to_lr(np.asarray(action).reshape(1, -1), slots=[self._slot])[0][0]

    def params_and_grad(self) -> tuple[np.ndarray, np.ndarray]:
        """The current parameters (W, H) and full gradient, each flattened to one float64 vector."""
        e, i = self._env.engine, self._slot
        x = torch.cat([e.W[i].reshape(-1), e.H[i].reshape(-1)]).double().cpu().numpy()
        g = torch.cat([e.gW[i].reshape(-1), e.gH[i].reshape(-1)]).double().cpu().numpy()
        return x, g

    def trial(self, action) -> tuple[float, float]:
        """Loss after one full-batch projected gradient step at ``action``'s step sizes, not committed,
        and the first-order decrease ``<grad, x - x_new>`` (Armijo's right-hand side without c)."""
        e = self._env.engine
        lr = torch.as_tensor(self.lr_for(action)[None], dtype=e.cfg.dtype, device=e.cfg.device)
        loss, dec = e.trial_loss(lr, index=None if e.B == 1 else [self._slot])
        return float(loss[0]), float(dec[0])

"""The learning-rate MDP shared by the single env and the batched vector env.

:class:`TaskConfig` holds everything that defines the decision problem apart from the data (action
mapping, observation features, reward weights, budget, divergence rule). :class:`EpisodeTracker`
keeps the per-instance episode state for ``B`` instances as numpy arrays and turns the engine's
statistics into observations, rewards and termination flags, for any ``B``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

import gymnasium as gym
import numpy as np

from .engine import NUM_STATS, OPTIMIZERS, STAT_FIT, STAT_GRAD_NOISE, STAT_GRAD_NORM, STAT_HELDOUT, STAT_L_H, STAT_L_W, STAT_LOSS

ACTION_MODES = ("log_bound", "paper", "relative", "per_factor")
OBS_FEATURES = ("loss", "epoch", "grad_norm", "bound", "prev_action", "target_gap", "lr_rel", "loss_slope",
                "loss_slope_ema", "grad_noise", "lr_bound", "epochs_left", "center_scale")
"""Observation features, in the order they appear in the vector (``bound`` and ``lr_bound`` contribute two,
``prev_action`` one per action component)."""
TWO_COLUMN_FEATURES = ("bound", "lr_bound")
REWARD_KINDS = ("paper", "progress")
DEFAULT_OBS = ("loss", "epoch", "grad_norm")
TARGET_METRICS = ("loss", "fit")
"""What the target is compared with: the loss, or its data term alone (``fit``, for regularised families
whose purpose is the fit itself, such as ``tutorial``)."""
RELATIVE_OBS = ("loss", "epoch", "grad_norm", "lr_rel", "loss_slope")
"""Features a relative-mode policy can be given in any training loop: none needs a Lipschitz constant."""
LR_REFERENCES = ("bound", "absolute")
TUNED_TILT = "tuned"
"""``factor_tilt`` value that reads each family's tuned per-factor fixed step (:meth:`TaskConfig.bind_family`)."""
_TINY = 1e-30


def cosine_decay(epoch: np.ndarray | int, budget: int, peak: float, final: float) -> np.ndarray | float:
    """The cosine from ``peak`` at the first epoch to ``final`` at the last of ``budget`` (elementwise in
    ``epoch``): the decaying centre here and the cosine schedules (:mod:`lrenv.schedules`) share this formula."""
    frac = np.minimum(np.asarray(epoch, dtype=np.float64) / max(budget - 1, 1), 1.0)
    return final + (peak - final) * 0.5 * (1.0 + np.cos(np.pi * frac))


@dataclass
class RewardConfig:
    """The reward: its kind and the weights of its terms (defaults: the paper's reward, SPEC §1).

    Every step's reward is the sum of four terms (reported in the info as ``reward_improvement``,
    ``reward_time``, ``reward_target``, ``reward_divergence``)::

        improvement * gain_t  -  time_cost  +  remaining * (budget - t) * [target reached at t]
                              -  divergence_penalty * [diverged at t]

    ``kind="paper"`` (the paper's reward, the default): ``gain_t = 100 * (best_{t-1} - f_t) / best_{t-1}``,
    the percentage decrease below the best loss so far (0 without improvement). Its sum over an episode
    depends on the path, and where the target is out of reach (``sales``) its only dense signal, the
    percentages, shrinks as the loss falls: the agent learned a timid step there (issue 12).

    ``kind="progress"``: ``gain_t = ln(best_{t-1} / best_t)`` (0 without improvement), so the gains of an
    episode telescope to ``ln(f_0 / f_best)`` whatever the path: a scale-free measure of how far the run got,
    which keeps teaching where the target is never reached. Over a whole episode ending at epoch ``T``::

        sum of rewards = improvement * ln(f_0 / f_best) - time_cost * T
                         + remaining * (budget - T) * [reached] - divergence_penalty * [diverged]

    Where the target is reachable, ``ln(f_0 / f_best)`` is about ``ln(f_0 / target)`` for every successful run,
    so what separates schedules is ``T``: the time cost and the target bonus. Use weights on the scale of the
    per-epoch gains, e.g. ``{kind: progress, improvement: 1, remaining: 0.05, time_cost: 0.05}``
    (:data:`PROGRESS_REWARD`); the divergence penalty must stay above ``time_cost * budget`` so that
    diverging never pays.
    """

    improvement: float = 1.0
    """Weight of the improvement gain (see the class docstring: a percentage for 'paper', a log ratio for
    'progress'; 0 if no improvement)."""
    remaining: float = 1.0
    """Bonus per epoch left of the budget when the target loss is reached."""
    divergence_penalty: float = 100.0
    """Subtracted once when the run diverges (the episode then ends)."""
    time_cost: float = 0.0
    """Subtracted every epoch (0 in the paper; a small cost teaches urgency, SPEC §5)."""
    kind: str = "paper"
    """'paper' (default) or 'progress': what the improvement term measures (see the class docstring)."""

    def __post_init__(self):
        if self.kind not in REWARD_KINDS:
            raise ValueError(f"unknown reward kind {self.kind!r}; choose one of {REWARD_KINDS} "
                             "('paper': percentage gains, the paper's; 'progress': log-ratio gains)")
        if self.divergence_penalty < 0 or self.time_cost < 0 or self.remaining < 0 or self.improvement < 0:
            raise ValueError(f"reward weights must be >= 0 (signs are fixed by the reward), got {self}")


PROGRESS_REWARD = {"kind": "progress", "improvement": 1.0, "remaining": 0.05, "time_cost": 0.05,
                   "divergence_penalty": 100.0}
"""A progress reward on the scale of its per-epoch gains (the setting measured in the README)."""


def _read_tuned(setting: str, family: str, read: Callable[[str], Any], what: str, method: str, pair: str) -> Any:
    """``read(family)`` for a ``'tuned'`` setting, its failures reworded as what to tune or write instead."""
    try:
        return read(family)
    except FileNotFoundError:
        raise ValueError(f"{setting}='tuned' reads the family's shipped tuned {what} (lrenv/tuned/<family>.yml), and "
                         f"there is none for {family!r}: tune it (lrenv tune --problem ... --methods {method} --out "
                         f"tuned.yml) and give {setting} as the pair {pair} of that file") from None
    except ValueError as e:
        raise ValueError(f"{setting}='tuned': {e}") from None


def resolve_tuned(family: str, *, optimizer: str = "sgd", factor_tilt: Any = None,
                  center_plateau: Any = None) -> dict[str, tuple]:
    """The numbers that the settings given as ``'tuned'`` stand for on ``family``, read from its shipped tuned file:
    ``center_plateau`` as ``(patience, factor)`` of its tuned Adam baseline, ``factor_tilt`` as ``(t_W, t_H)`` (its
    tuned per-factor fixed step, or its tuned Adam lr with ``optimizer='adam'``); settings given otherwise are left
    out. What :meth:`TaskConfig.bind_family` applies, and what a training run records in its config (the shipped
    files change when a baseline is retuned)."""
    from .tuned_files import tuned_adam_plateau, tuned_step_scales  # reads YAML only: no evaluation stack

    found: dict[str, tuple] = {}
    if isinstance(center_plateau, str) and center_plateau == TUNED_TILT:
        found["center_plateau"] = _read_tuned("center_plateau", family, tuned_adam_plateau, "Adam baseline", "adam",
                                              "[patience, factor]")
    if isinstance(factor_tilt, str) and factor_tilt == TUNED_TILT:
        what, method, pair = (("Adam learning rate", "adam", "[lr_rel, lr_rel]") if optimizer == "adam"
                              else ("per-factor fixed step", "fixed-cwch", "[c_W / 2, c_H / 2]"))
        found["factor_tilt"] = _read_tuned("factor_tilt", family, lambda f: tuned_step_scales(f, optimizer), what,
                                           method, pair)
    return found


@dataclass
class TaskConfig:
    """Definition of the learning-rate decision problem (everything except the data)."""

    budget: int = 200
    """Epoch budget T; the episode is truncated after T epochs."""
    action_mode: str = "log_bound"
    """'log_bound': a in [-1, 1] -> lr = action_center * (2/L) * 10^(log_range * a) per factor (scale-free,
    default); 'paper': a in [0, lr_max] is the absolute learning rate of both factors, as in the paper;
    'relative': a in [-1, 1] multiplies each factor's previous step size by 10^(relative_range * a), kept in
    [lr_min, lr_max] (needs no Lipschitz constant to act: the form a policy takes into an ordinary training loop);
    'per_factor': a 2-D action (a_W, a_H) in [-1, 1]^2 -> lr_X = action_center * (2/L_X) * 10^(log_range * a_X),
    each factor relative to its own bound (the minibatch H-step diverges near 0.55 x 2/L_H while the exact
    W-step is stable to 2/L_W, SPEC §5: one shared scale cannot use both)."""
    lr_max: float = 1.0
    """Upper end of the 'paper' action space (the paper: 1, about 10x its bound); in 'relative' mode the upper
    bound of the step size, in the units of ``lr_init`` (see ``lr_reference``)."""
    lr_min: float = 1e-4
    """'relative': lower bound of the step size, in the units of ``lr_init``."""
    lr_init: float = 0.1
    """'relative': the step size before the first action (the first epoch runs at lr_init * 10^(k a))."""
    lr_reference: str = "bound"
    """'relative': units of lr_init, lr_min and lr_max. 'bound' (default): fractions of each factor's own bound
    2/L *at reset* (so the two factors start at different absolute step sizes, per factor, and the episode never
    looks at L again); 'absolute': plain step sizes, the same for both factors."""
    relative_range: float = 0.5
    """'relative': decades one action can move the step size (k in 10^(k a)); 0.5 = a factor of ~3.16 per epoch."""
    log_range: float = 1.0
    """Decades covered on each side of the centre by the 'log_bound' action."""
    action_center: float = 0.25
    """'log_bound': the fraction of the bound 2/L that a = 0 selects, i.e. the untrained policy's mean step
    (0.25 = 0.5/L). Minibatch SGD already diverges at ~0.55-0.6 of 2/L (the bound holds for full-batch
    steps), so a policy centred on the bound would spend its first thousands of steps diverging."""
    action_center_final: float | None = None
    """'log_bound' / 'per_factor': when set, the centre decays along a cosine from ``action_center`` at the first
    epoch to this at the last (the formula of :class:`lrenv.schedules.CosineDecay`), so ``a = 0`` *is* that cosine
    schedule and the policy learns a bounded correction of it (``10^(log_range * a)``) instead of a schedule from
    scratch. None (default): a constant centre."""
    center_plateau: tuple[int, float] | str | None = None
    """'log_bound' / 'per_factor': ReduceLROnPlateau on the centre, ``(patience, factor)``: once the episode's loss
    has not fallen below its best so far by 1e-4 (relative) for more than ``patience`` epochs in a row, the centre
    is multiplied by ``factor`` (torch's rule: mode 'min', threshold 1e-4 'rel', no cooldown, no floor). ``'tuned'``
    reads the pair from the family's shipped tuned Adam baseline, so with ``optimizer='adam'``,
    ``factor_tilt='tuned'`` and ``action_center=1`` ``a = 0`` *is* that baseline -- Adam at its tuned lr with its tuned
    ReduceLROnPlateau -- and the policy learns a bounded correction of the strongest baseline users run. The state
    (the multiplier in force) is per episode (:attr:`EpisodeTracker.center_scale`; observation ``center_scale``).
    Not with ``action_center_final``. None (default): no plateau rule."""
    factor_tilt: tuple[float, float] | str | None = None
    """'per_factor' only: multipliers ``(t_W, t_H)`` of the centre for W and H, so ``a = 0`` steps at
    ``t_X * centre * 2/L_X`` -- with a decaying centre, a per-factor cosine
    (:class:`lrenv.schedules.CosineDecayPair` with ``peak_X = t_X * action_center`` and ``final_frac =
    action_center_final / action_center``). ``'tuned'``: each environment reads the pair from its family's
    shipped validation-tuned per-factor fixed step (``lrenv/tuned/<family>.yml``, ``fixed-cwch``: ``t_X = c_X / 2``;
    :func:`lrenv.tuned_files.tuned_step_scales`), so with ``action_center = 1`` ``a = 0`` *is* that tuned step
    on every family, and one policy trained over a suite learns a correction of each family's own tuned step
    (the form that transfers to a family left out of training). With ``optimizer='adam'`` the pair is the family's
    tuned Adam ``lr_rel`` for both factors (``a = 0``: constant Adam at the tuned baseline's learning rate, without
    its ReduceLROnPlateau). None (default): the same centre for both factors."""
    obs_features: tuple[str, ...] = DEFAULT_OBS
    """Observation features, a subset of OBS_FEATURES (see NMFEnv's docstring)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    divergence_factor: float = 100.0
    """A loss above this multiple of the initial loss (or a non-finite one) counts as divergence."""
    target_loss: float | None = None
    """Override of the family's target loss (absolute); None = the instance's own target."""
    obs_clip: float = 100.0
    """Observations are clipped to [-obs_clip, obs_clip] (and never non-finite)."""
    slope_smoothing: float = 0.8
    """'loss_slope_ema': weight of the previous average (ema_t = s * ema_{t-1} + (1 - s) * slope_t, ema_0 = 0)."""
    optimizer: str = "sgd"
    """The update the chosen step sizes drive: 'sgd' (projected minibatch SGD, default) or 'adam' (Adam on the same
    minibatches, the step sizes its learning rates, a schedule for the optimizer users already run). With 'adam'
    the reference of every action mode is Adam's scale ``s`` (the RMS of the initial factors, the unit of the Adam
    baseline's ``lr_rel``) in place of the bound 2/L: in 'log_bound' / 'per_factor' mode ``lr = action_center * s *
    10^(log_range * a)`` (with ``factor_tilt`` per factor), and the 'bound'/'lr_bound' features and the infos'
    ``bound_W``/``bound_H`` read ``s`` (see :mod:`lrenv.engine`)."""

    def __post_init__(self):
        if isinstance(self.reward, dict):
            self.reward = RewardConfig(**self.reward)
        self.obs_features = tuple(self.obs_features)
        if self.action_mode not in ACTION_MODES:
            raise ValueError(f"unknown action_mode {self.action_mode!r}; choose one of {ACTION_MODES}")
        bad = [f for f in self.obs_features if f not in OBS_FEATURES]
        if bad or not self.obs_features:
            raise ValueError(f"unknown observation features {bad}; choose from {OBS_FEATURES}")
        if not (isinstance(self.budget, (int, np.integer)) and self.budget >= 1):
            raise ValueError(f"budget must be a positive integer number of epochs, got {self.budget!r}")
        if not (self.lr_max > 0 and self.log_range > 0 and self.action_center > 0):
            raise ValueError(f"lr_max, log_range and action_center must be > 0, got {self.lr_max}, "
                             f"{self.log_range}, {self.action_center}")
        if self.lr_reference not in LR_REFERENCES:
            raise ValueError(f"unknown lr_reference {self.lr_reference!r}; choose one of {LR_REFERENCES}")
        if self.action_mode == "relative" and not (0 < self.lr_min <= self.lr_init <= self.lr_max
                                                   and self.relative_range > 0):
            raise ValueError(f"relative action mode needs 0 < lr_min <= lr_init <= lr_max and relative_range > 0, "
                             f"got lr_min={self.lr_min}, lr_init={self.lr_init}, lr_max={self.lr_max}, "
                             f"relative_range={self.relative_range}")
        if self.action_center_final is not None:
            if self.action_mode not in ("log_bound", "per_factor"):
                raise ValueError(f"action_center_final (a decaying centre) needs action_mode 'log_bound' or "
                                 f"'per_factor', not {self.action_mode!r}")
            if not 0 < self.action_center_final <= self.action_center:
                raise ValueError(f"action_center_final must be in (0, action_center={self.action_center}], "
                                 f"got {self.action_center_final}")
        self._plateau: tuple[int, float] | None = None  # center_plateau as numbers (bind_family resolves 'tuned')
        if self.center_plateau is not None:
            self._check_plateau()
        self._tilt: tuple[float, float] | None = None  # factor_tilt as numbers (bind_family resolves 'tuned')
        if self.factor_tilt is not None:
            tilt = tuple(self.factor_tilt) if isinstance(self.factor_tilt, (list, tuple, np.ndarray)) else ()
            tuned = isinstance(self.factor_tilt, str) and self.factor_tilt == TUNED_TILT
            if self.action_mode != "per_factor" or not (tuned or (len(tilt) == 2 and all(
                    isinstance(t, (int, float, np.number)) and math.isfinite(t) and t > 0 for t in tilt))):
                raise ValueError(f"factor_tilt must be a pair of positive numbers (t_W, t_H) or {TUNED_TILT!r} in the "
                                 f"'per_factor' action mode, got {self.factor_tilt!r} with action_mode "
                                 f"{self.action_mode!r}")
            if not tuned:
                self.factor_tilt = self._tilt = (float(tilt[0]), float(tilt[1]))
        if not 0 <= self.slope_smoothing < 1:
            raise ValueError(f"slope_smoothing must be in [0, 1), got {self.slope_smoothing}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")

    def _check_plateau(self) -> None:
        p = self.center_plateau
        if self.action_mode not in ("log_bound", "per_factor"):
            raise ValueError(f"center_plateau needs action_mode 'log_bound' or 'per_factor', not {self.action_mode!r}")
        if self.action_center_final is not None:
            raise ValueError("center_plateau and action_center_final both decay the centre: set one of them")
        if isinstance(p, str) and p == TUNED_TILT:
            return
        pair = tuple(p) if isinstance(p, (list, tuple)) else ()
        if not (len(pair) == 2 and isinstance(pair[0], (int, np.integer)) and not isinstance(pair[0], bool)
                and pair[0] >= 0 and isinstance(pair[1], (int, float, np.number)) and 0 < pair[1] < 1):
            raise ValueError(f"center_plateau must be a pair (patience, factor) with an integer patience >= 0 and "
                             f"0 < factor < 1, or {TUNED_TILT!r}, got {p!r}")
        self.center_plateau = self._plateau = (int(pair[0]), float(pair[1]))

    @classmethod
    def from_kwargs(cls, **kw) -> "TaskConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(kw) - names
        if unknown:
            raise ValueError(f"unknown task options {sorted(unknown)}; known: {sorted(names)}")
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["obs_features"] = list(self.obs_features)
        for key in ("factor_tilt", "center_plateau"):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        return d

    def bind_family(self, family: str) -> "TaskConfig":
        """Resolve ``factor_tilt='tuned'`` to ``family``'s tuned per-factor step and ``center_plateau='tuned'`` to its
        tuned Adam plateau rule (an environment calls this with its family's name); returns self. A no-op for every
        other setting."""
        found = resolve_tuned(family, optimizer=self.optimizer, factor_tilt=self.factor_tilt,
                              center_plateau=self.center_plateau)
        self._plateau = found.get("center_plateau", self._plateau)
        self._tilt = found.get("factor_tilt", self._tilt)
        return self

    def _resolved(self, name: str, value: Any) -> Any:
        if getattr(self, name) == TUNED_TILT and value is None:
            raise ValueError(f"{name}='tuned' is resolved per family: build the environment (NMFEnv or the batched "
                             f"env), which calls TaskConfig.bind_family(family), before mapping actions")
        return value

    @property
    def plateau(self) -> tuple[int, float] | None:
        """``center_plateau`` as numbers ``(patience, factor)`` (``'tuned'`` resolved by :meth:`bind_family`), or None."""
        return self._resolved("center_plateau", self._plateau)

    @property
    def tilt(self) -> tuple[float, float] | None:
        """``factor_tilt`` as numbers ``(t_W, t_H)`` (``'tuned'`` resolved by :meth:`bind_family`), or None."""
        return self._resolved("factor_tilt", self._tilt)

    # -------------------------------------------------------------- spaces
    @property
    def action_dim(self) -> int:
        """Components of one action: 2 for 'per_factor' (W, H), else 1."""
        return 2 if self.action_mode == "per_factor" else 1

    def feature_width(self, feature: str) -> int:
        """Entries ``feature`` contributes to the observation vector."""
        if feature in TWO_COLUMN_FEATURES:
            return 2
        return self.action_dim if feature == "prev_action" else 1

    @property
    def obs_dim(self) -> int:
        return sum(self.feature_width(f) for f in self.obs_features)

    def observation_space(self) -> gym.spaces.Box:
        c = self.obs_clip
        return gym.spaces.Box(-c, c, shape=(self.obs_dim,), dtype=np.float32)

    def _action_bounds(self) -> tuple[np.float32, np.float32]:
        """(low, high) of :meth:`action_space` (float32, as the Box stores them) without building a Box."""
        if self.action_mode == "paper":
            return np.float32(0.0), np.float32(self.lr_max)
        return np.float32(-1.0), np.float32(1.0)

    def action_space(self) -> gym.spaces.Box:
        low, high = self._action_bounds()
        return gym.spaces.Box(float(low), float(high), shape=(self.action_dim,), dtype=np.float32)

    def center(self, epoch: np.ndarray | int | None = None) -> np.ndarray | float:
        """The log-bound centre (a fraction of 2/L) for a step taken after ``epoch`` epochs: ``action_center``,
        or with ``action_center_final`` the cosine from one to the other over the budget."""
        if self.action_center_final is None:
            return self.action_center
        if epoch is None:
            raise ValueError("a decaying centre (action_center_final) needs the epoch of the step")
        return cosine_decay(epoch, self.budget, self.action_center, self.action_center_final)

    def _factor_center(self, epoch: np.ndarray | int | None, batched: bool,
                       center_scale: np.ndarray | float | None = None) -> np.ndarray | float:
        """:meth:`center` as the log-bound maps use it, times ``center_scale`` (the plateau rule's multiplier of
        each instance, :attr:`EpisodeTracker.center_scale`): (B, 1) for B epochs or scales when ``batched``, and
        with ``factor_tilt`` one centre per factor ((2,) or (B, 2))."""
        center = self.center(epoch)
        if self.center_plateau is not None:
            if center_scale is None:
                raise ValueError("with center_plateau the centre follows the episode's losses: pass center_scale "
                                 "(the env's tracker.center_scale)")
            center = center * np.asarray(center_scale, dtype=np.float64)
        if np.ndim(center) and batched:
            center = np.reshape(center, (-1, 1))
        tilt = self.tilt
        return center if tilt is None else center * np.asarray(tilt)

    def actions_to_lr(self, actions: np.ndarray, L: np.ndarray, prev_lr: np.ndarray | None = None,
                      lr_bounds: tuple[np.ndarray, np.ndarray] | None = None, epoch: np.ndarray | None = None,
                      center_scale: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map raw actions, (B,) or (B, 1) ((B, 2) in 'per_factor' mode), to (B, 2) step sizes for (W, H)
        given (B, 2) Lipschitz constants.

        'relative' mode ignores ``L`` and needs the state kept by :class:`EpisodeTracker`: ``prev_lr``
        (B, 2), the step sizes in force, and ``lr_bounds`` ((B, 2) low, (B, 2) high) in absolute units; a decaying
        centre (``action_center_final``) needs ``epoch`` (B,), the epochs each instance has run, and a plateau
        rule (``center_plateau``) ``center_scale`` (B,), each instance's multiplier in force.
        Returns ``(lr, clipped_action, invalid)`` with the clipped action (B,) ((B, 2) in 'per_factor' mode) and
        ``invalid`` (B,): finite actions are clipped into the action space (+-inf to its ends); a NaN in any
        component is *invalid* and the caller ends the episode as a divergence.
        """
        raw = np.asarray(actions, dtype=np.float64)
        if self.action_mode == "per_factor":
            if raw.size % 2:
                raise ValueError(f"per_factor action mode: actions need 2 components (a_W, a_H) each, got an "
                                 f"array of shape {raw.shape}")
            a = raw.reshape(-1, 2)
            invalid = np.isnan(a).any(axis=1)
        else:
            a = raw.reshape(-1)
            invalid = np.isnan(a)
        low, high = self._action_bounds()
        a = np.clip(np.where(np.isnan(a), low, a), low, high) if invalid.any() else np.clip(a, low, high)
        if self.action_mode == "paper":
            lr = np.repeat(a[:, None], 2, axis=1)
        elif self.action_mode == "relative":
            if prev_lr is None or lr_bounds is None:
                raise ValueError("relative action mode: actions_to_lr needs prev_lr and lr_bounds "
                                 "(EpisodeTracker.actions_to_lr supplies them)")
            lr = np.clip(prev_lr * 10.0 ** (self.relative_range * a[:, None]), lr_bounds[0], lr_bounds[1])
        else:  # log_bound (one scale for both factors) or per_factor (one per factor): broadcast over (B, 2)
            scale = a[:, None] if a.ndim == 1 else a
            center = self._factor_center(epoch, batched=True, center_scale=center_scale)
            lr = (2.0 * center / np.maximum(L, _TINY)) * 10.0 ** (self.log_range * scale)
        return lr, a, invalid

    def action_for_scale(self, scale: np.ndarray | float, epoch: np.ndarray | int | None = None,
                         center_scale: np.ndarray | float | None = None) -> np.ndarray:
        """The action that gives lr = scale * (2/L) per factor (scale clipped into the covered range); ``epoch``
        (the epochs run) only with a decaying centre, ``center_scale`` only with a plateau rule.

        'log_bound': shape (1,) (an element of :meth:`action_space`) for a scalar scale, (B,) for B scales.
        'per_factor': ``scale`` is a scalar (both factors), a pair ``(s_W, s_H)`` -> shape (2,), or (B, 2)
        pairs -> (B, 2); ``lr_W = s_W * 2/L_W`` and ``lr_H = s_H * 2/L_H``.
        """
        if self.action_mode not in ("log_bound", "per_factor"):
            raise ValueError(f"action_for_scale needs action_mode 'log_bound' or 'per_factor', "
                             f"not {self.action_mode!r}")
        s = np.maximum(np.asarray(scale, dtype=np.float64), _TINY)
        if self.action_mode == "per_factor":
            if s.ndim == 0:
                s = np.repeat(s, 2)
            if s.shape[-1] != 2 or s.ndim > 2:
                raise ValueError(f"per_factor action_for_scale: give a scalar, a pair (s_W, s_H) or (B, 2) pairs, "
                                 f"got shape {s.shape}")
        center = self._factor_center(epoch, batched=s.ndim == 2 or np.ndim(center_scale) > 0,
                                     center_scale=center_scale)
        a = np.clip(np.log10(s / center) / self.log_range, -1.0, 1.0).astype(np.float32)
        return a.reshape(1) if a.ndim == 0 else a


class EpisodeTracker:
    """Per-instance episode state of ``B`` instances and the MDP's observation and reward rules."""

    def __init__(self, cfg: TaskConfig, batch: int, has_heldout: bool, target_metric: str = "loss"):
        if target_metric not in TARGET_METRICS:
            raise ValueError(f"target_metric must be one of {TARGET_METRICS}, got {target_metric!r}")
        self.cfg = cfg
        self.B = batch
        self.has_heldout = has_heldout
        self._target_col = STAT_FIT if target_metric == "fit" else STAT_LOSS
        z = lambda: np.zeros(batch)  # noqa: E731
        self.f0, self.g0, self.best, self.target = z(), z(), z(), z()
        self.prev_action = np.zeros((batch, cfg.action_dim))
        self.prev_loss, self.slope_ema = z(), z()
        self.last_lr = np.full((batch, 2), np.nan)  # step sizes of the last epoch (NaN before the first)
        self.epoch = np.zeros(batch, dtype=np.int64)
        self.stats = np.zeros((batch, NUM_STATS))
        # 'relative' mode: step sizes in force (B, 2), their start values and absolute bounds
        self.lr, self.lr0 = np.zeros((batch, 2)), np.ones((batch, 2))
        self.lr_lo, self.lr_hi = np.zeros((batch, 2)), np.full((batch, 2), np.inf)
        self.done = np.zeros(batch, dtype=bool)
        # center_plateau: each instance's multiplier of the centre, and its ReduceLROnPlateau state
        self.center_scale = np.ones(batch)
        self.plateau_best, self.plateau_bad = np.full(batch, np.inf), np.zeros(batch, dtype=np.int64)

    def reset(self, idx: np.ndarray | list[int], stats: np.ndarray, target: np.ndarray) -> None:
        """Start new episodes in slots ``idx`` from their initial statistics."""
        idx = np.asarray(idx)
        self.stats[idx] = stats
        self.f0[idx] = np.maximum(stats[:, STAT_LOSS], _TINY)
        self.g0[idx] = np.maximum(stats[:, STAT_GRAD_NORM], _TINY)
        self.best[idx] = stats[:, STAT_LOSS]
        self.target[idx] = target if self.cfg.target_loss is None else self.cfg.target_loss
        self.prev_action[idx] = 0.0
        self.prev_loss[idx] = stats[:, STAT_LOSS]
        self.slope_ema[idx] = 0.0
        self.last_lr[idx] = np.nan
        self.epoch[idx] = 0
        self.done[idx] = False
        self.center_scale[idx], self.plateau_best[idx], self.plateau_bad[idx] = 1.0, np.inf, 0
        cfg = self.cfg
        ref = (2.0 / np.maximum(stats[:, [STAT_L_W, STAT_L_H]], _TINY) if cfg.lr_reference == "bound"
               else np.ones((len(idx), 2)))
        self.lr0[idx] = cfg.lr_init * ref
        self.lr[idx] = self.lr0[idx]
        self.lr_lo[idx] = cfg.lr_min * ref
        self.lr_hi[idx] = cfg.lr_max * ref

    def lipschitz(self) -> np.ndarray:
        return self.stats[:, [STAT_L_W, STAT_L_H]]

    def actions_to_lr(self, actions: np.ndarray, slots=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`TaskConfig.actions_to_lr` for the current state of every slot (any action mode), or of the
        listed ``slots`` (``actions`` then has one row per listed slot)."""
        if slots is None:
            return self.cfg.actions_to_lr(actions, self.lipschitz(), self.lr, (self.lr_lo, self.lr_hi), self.epoch,
                                          self.center_scale)
        slots = np.asarray(slots)
        return self.cfg.actions_to_lr(actions, self.lipschitz()[slots], self.lr[slots],
                                      (self.lr_lo[slots], self.lr_hi[slots]), self.epoch[slots],
                                      self.center_scale[slots])

    def lr_in_force(self) -> np.ndarray:
        """(B, 2) step sizes in force: 'relative' mode's state, else the last epoch's (NaN before the first)."""
        return self.lr if self.cfg.action_mode == "relative" else self.last_lr

    def observe(self) -> np.ndarray:
        """(B, obs_dim) float32 observations, always finite."""
        s = self.stats
        c = self.cfg.obs_clip
        cols = []
        with np.errstate(all="ignore"):
            for f in self.cfg.obs_features:
                if f == "loss":
                    cols.append(np.log10(s[:, STAT_LOSS] / self.f0))
                elif f == "epoch":
                    cols.append(self.epoch / self.cfg.budget)
                elif f == "grad_norm":
                    cols.append(np.log10(s[:, STAT_GRAD_NORM] / self.g0))
                elif f == "bound":
                    cols.append(np.log10(2.0 / s[:, STAT_L_W]))
                    cols.append(np.log10(2.0 / s[:, STAT_L_H]))
                elif f == "prev_action":
                    cols.extend(self.prev_action.T)
                elif f == "target_gap":
                    cols.append(np.log10(s[:, self._target_col] / self.target))
                elif f == "lr_rel":  # the step size in force relative to its start (mean over the factors)
                    cols.append(np.log10(self.lr / self.lr0).mean(axis=1))
                elif f == "loss_slope":  # log10 change of the loss over the last epoch (0 before the first)
                    cols.append(np.log10(s[:, STAT_LOSS] / self.prev_loss))
                elif f == "loss_slope_ema":  # exponential average of loss_slope (0 before the first epoch)
                    cols.append(self.slope_ema)
                elif f == "grad_noise":  # log10(1 + Var(minibatch H-gradient estimates) / ||their mean||^2)
                    cols.append(np.log10(1.0 + np.maximum(s[:, STAT_GRAD_NOISE], 0.0)))
                elif f == "lr_bound":  # log10(step in force / current bound 2/L), per factor; 0 before a step
                    rel = np.log10(self.lr_in_force() * s[:, [STAT_L_W, STAT_L_H]] / 2.0)
                    cols.extend(np.where(np.isnan(self.lr_in_force()), 0.0, rel).T)
                elif f == "epochs_left":  # (budget - epoch) / budget, in [0, 1]
                    cols.append((self.cfg.budget - self.epoch) / self.cfg.budget)
                elif f == "center_scale":  # log10 of the plateau rule's multiplier of the centre (0 without one)
                    cols.append(np.log10(self.center_scale))
        obs = np.stack(cols, axis=1)
        return np.clip(np.nan_to_num(obs, nan=c, posinf=c, neginf=-c), -c, c).astype(np.float32)

    def step(self, stats: np.ndarray, actions: np.ndarray, lr: np.ndarray, invalid: np.ndarray):
        """Advance all instances by one epoch given the new statistics; returns
        ``(obs, reward, terminated, truncated, infos)``."""
        cfg, w = self.cfg, self.cfg.reward
        prev_L = self.lipschitz().copy()
        self.prev_loss = self.stats[:, STAT_LOSS].copy()
        self.stats = stats
        self.last_lr = np.where(invalid[:, None], self.last_lr, lr)
        with np.errstate(all="ignore"):
            slope = np.log10(stats[:, STAT_LOSS] / self.prev_loss)
        slope = np.where(np.isfinite(slope), slope, 0.0)  # a diverged step ends the episode anyway
        self.slope_ema = cfg.slope_smoothing * self.slope_ema + (1.0 - cfg.slope_smoothing) * slope
        if cfg.action_mode == "relative":  # an invalid (NaN) action leaves the step size as it was
            self.lr = np.where(invalid[:, None], self.lr, lr)
        self.epoch += 1
        self.prev_action = np.asarray(actions, dtype=np.float64).reshape(self.B, -1)
        loss = stats[:, STAT_LOSS]
        with np.errstate(all="ignore"):
            diverged = invalid | ~np.isfinite(loss) | (loss > cfg.divergence_factor * self.f0)
            improved = ~diverged & (loss < self.best)
            if w.kind == "progress":  # ln(best_{t-1} / best_t): telescopes to ln(f0 / f_best)
                gain = np.where(improved, np.log(np.maximum(self.best, _TINY) / np.maximum(loss, _TINY)), 0.0)
            else:  # the paper's percentage decrease below the best loss so far
                gain = np.where(improved, 100.0 * (self.best - loss) / np.maximum(self.best, _TINY), 0.0)
        self.best = np.where(improved, loss, self.best)
        if cfg.plateau is not None:
            self._plateau_step(loss, *cfg.plateau)
        # the episode ends at the first epoch at or below the target, so "now" is "ever" here
        reached = ~diverged & (stats[:, self._target_col] <= self.target)
        remaining = cfg.budget - self.epoch
        terms = (w.improvement * gain, np.full(self.B, -w.time_cost), np.where(reached, w.remaining * remaining, 0.0),
                 np.where(diverged, -w.divergence_penalty, 0.0))
        reward = sum(terms)
        terminated = diverged | reached
        truncated = ~terminated & (self.epoch >= cfg.budget)
        self.done = terminated | truncated
        infos = self._infos(lr, 2.0 / np.maximum(prev_L, _TINY), diverged, reached, invalid, terms=terms)
        return self.observe(), reward, terminated, truncated, infos

    def _plateau_step(self, loss: np.ndarray, patience: int, factor: float) -> None:
        """torch's ReduceLROnPlateau (mode 'min', threshold 1e-4 'rel', no cooldown) on each instance's centre."""
        with np.errstate(invalid="ignore"):
            better = loss < self.plateau_best * (1.0 - 1e-4)  # a NaN loss is no better (the episode ends anyway)
        self.plateau_best = np.where(better, loss, self.plateau_best)
        self.plateau_bad = np.where(better, 0, self.plateau_bad + 1)
        cut = self.plateau_bad > patience
        self.center_scale = np.where(cut, self.center_scale * factor, self.center_scale)
        self.plateau_bad[cut] = 0

    _INFO_KEYS = ("epoch", "loss", "fit", "best_loss", "target_loss", "grad_norm", "lr_W", "lr_H", "bound_W",
                  "bound_H", "diverged", "reached_target", "invalid_action")
    REWARD_TERMS = ("reward_improvement", "reward_time", "reward_target", "reward_divergence")
    """The reward split into its terms (they sum to the reward): improvement bonus, time cost (<= 0), epochs
    remaining when the target is reached, divergence penalty (<= 0). In every step's info."""

    def _infos(self, lr, bound, diverged, reached, invalid, slots=slice(None), terms=None) -> list[dict]:
        """The info dicts of ``slots`` (all by default; the other arguments hold one row per listed slot),
        built from whole columns: one conversion per field, not one per slot and field (this runs every
        step of every env)."""
        s = self.stats[slots]
        flags = [np.asarray(f, dtype=bool).tolist() for f in (diverged, reached, invalid)]
        cols = [self.epoch[slots].tolist(), s[:, STAT_LOSS].tolist(), s[:, STAT_FIT].tolist(), self.best[slots].tolist(),
                self.target[slots].tolist(), s[:, STAT_GRAD_NORM].tolist(), lr[:, 0].tolist(), lr[:, 1].tolist(),
                bound[:, 0].tolist(), bound[:, 1].tolist(), *flags]
        if terms is None:  # episode start: no reward yet
            terms = (np.zeros(self.B),) * len(self.REWARD_TERMS)
        cols += [np.asarray(t)[slots].tolist() for t in terms]
        infos = [dict(zip(self._INFO_KEYS + self.REWARD_TERMS, row)) for row in zip(*cols)]
        if self.has_heldout:
            for info, mse in zip(infos, s[:, STAT_HELDOUT].tolist()):
                info["heldout_mse"] = mse
        return infos

    def info(self, i: int) -> dict:
        """Slot ``i``'s info at the start of an episode (no step taken yet: zero step sizes)."""
        bound = 2.0 / np.maximum(self.stats[[i]][:, [STAT_L_W, STAT_L_H]], _TINY)
        no = np.zeros(1, dtype=bool)
        return self._infos(np.zeros((1, 2)), bound, no, no, no, slots=[i])[0]

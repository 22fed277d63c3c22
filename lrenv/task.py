"""The learning-rate MDP shared by the single env and the batched vector env.

:class:`TaskConfig` holds everything that defines the decision problem apart from the data (action
mapping, observation features, reward weights, budget, divergence rule). :class:`EpisodeTracker`
keeps the per-instance episode state for ``B`` instances as numpy arrays and turns the engine's
statistics into observations, rewards and termination flags, for any ``B``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import gymnasium as gym
import numpy as np

from .engine import NUM_STATS, STAT_FIT, STAT_GRAD_NORM, STAT_HELDOUT, STAT_L_H, STAT_L_W, STAT_LOSS

ACTION_MODES = ("log_bound", "paper", "relative")
OBS_FEATURES = ("loss", "epoch", "grad_norm", "bound", "prev_action", "target_gap", "lr_rel", "loss_slope")
"""Observation features, in the order they appear in the vector (``bound`` contributes two)."""
DEFAULT_OBS = ("loss", "epoch", "grad_norm")
TARGET_METRICS = ("loss", "fit")
"""What the target is compared with: the loss, or its data term alone (``fit``, for regularised families
whose purpose is the fit itself, such as ``tutorial``)."""
RELATIVE_OBS = ("loss", "epoch", "grad_norm", "lr_rel", "loss_slope")
"""Features a relative-mode policy can be given in any training loop: none needs a Lipschitz constant."""
LR_REFERENCES = ("bound", "absolute")
_TINY = 1e-30


@dataclass
class RewardConfig:
    """Weights of the reward (the paper's reward with its defaults; SPEC §1)."""

    improvement: float = 1.0
    """Weight of the percentage decrease of the loss below the best loss so far (0 if no improvement)."""
    remaining: float = 1.0
    """Bonus per epoch left of the budget when the target loss is reached."""
    divergence_penalty: float = 100.0
    """Subtracted once when the run diverges (the episode then ends)."""
    time_cost: float = 0.0
    """Subtracted every epoch (0 in the paper; a small cost teaches urgency, SPEC §5)."""


@dataclass
class TaskConfig:
    """Definition of the learning-rate decision problem (everything except the data)."""

    budget: int = 200
    """Epoch budget T; the episode is truncated after T epochs."""
    action_mode: str = "log_bound"
    """'log_bound': a in [-1, 1] -> lr = action_center * (2/L) * 10^(log_range * a) per factor (scale-free,
    default); 'paper': a in [0, lr_max] is the absolute learning rate of both factors, as in the paper;
    'relative': a in [-1, 1] multiplies each factor's previous step size by 10^(relative_range * a), kept in
    [lr_min, lr_max] (needs no Lipschitz constant to act: the form a policy takes into an ordinary training loop)."""
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
    obs_features: tuple[str, ...] = DEFAULT_OBS
    """Observation features, a subset of OBS_FEATURES (see NMFEnv's docstring)."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    divergence_factor: float = 100.0
    """A loss above this multiple of the initial loss (or a non-finite one) counts as divergence."""
    target_loss: float | None = None
    """Override of the family's target loss (absolute); None = the instance's own target."""
    obs_clip: float = 100.0
    """Observations are clipped to [-obs_clip, obs_clip] (and never non-finite)."""

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
        if not self.divergence_factor > 1:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")

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
        return d

    # -------------------------------------------------------------- spaces
    @property
    def obs_dim(self) -> int:
        return sum(2 if f == "bound" else 1 for f in self.obs_features)

    def observation_space(self) -> gym.spaces.Box:
        c = self.obs_clip
        return gym.spaces.Box(-c, c, shape=(self.obs_dim,), dtype=np.float32)

    def _action_bounds(self) -> tuple[np.float32, np.float32]:
        """(low, high) of :meth:`action_space` (float32, as the Box stores them) without building a Box."""
        if self.action_mode == "paper":
            return np.float32(0.0), np.float32(self.lr_max)
        return np.float32(-1.0), np.float32(1.0)

    def action_space(self) -> gym.spaces.Box:
        if self.action_mode == "paper":
            return gym.spaces.Box(0.0, self.lr_max, shape=(1,), dtype=np.float32)
        return gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)

    def actions_to_lr(self, actions: np.ndarray, L: np.ndarray, prev_lr: np.ndarray | None = None,
                      lr_bounds: tuple[np.ndarray, np.ndarray] | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Map (B,) raw actions to (B, 2) step sizes for (W, H) given (B, 2) Lipschitz constants.

        'relative' mode ignores ``L`` and needs the state kept by :class:`EpisodeTracker`: ``prev_lr``
        (B, 2), the step sizes in force, and ``lr_bounds`` ((B, 2) low, (B, 2) high) in absolute units.
        Returns ``(lr, clipped_action, invalid)``: finite actions are clipped into the action space
        (+-inf to its ends); NaN is *invalid* and the caller ends the episode as a divergence.
        """
        a = np.asarray(actions, dtype=np.float64).reshape(-1)
        invalid = np.isnan(a)
        low, high = self._action_bounds()
        a = np.clip(np.where(invalid, low, a), low, high) if invalid.any() else np.clip(a, low, high)
        if self.action_mode == "paper":
            lr = np.repeat(a[:, None], 2, axis=1)
        elif self.action_mode == "relative":
            if prev_lr is None or lr_bounds is None:
                raise ValueError("relative action mode: actions_to_lr needs prev_lr and lr_bounds "
                                 "(EpisodeTracker.actions_to_lr supplies them)")
            lr = np.clip(prev_lr * 10.0 ** (self.relative_range * a[:, None]), lr_bounds[0], lr_bounds[1])
        else:
            lr = (2.0 * self.action_center / np.maximum(L, _TINY)) * 10.0 ** (self.log_range * a[:, None])
        return lr, a, invalid

    def action_for_scale(self, scale: np.ndarray | float) -> np.ndarray:
        """'log_bound' action that gives lr = scale * (2/L) (scale clipped into the covered range): an element
        of :meth:`action_space` (shape (1,)) for a scalar scale, shape (B,) for B scales."""
        if self.action_mode != "log_bound":
            raise ValueError("action_for_scale needs action_mode='log_bound'")
        s = np.maximum(np.asarray(scale, dtype=np.float64), _TINY)
        a = np.clip(np.log10(s / self.action_center) / self.log_range, -1.0, 1.0).astype(np.float32)
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
        self.f0, self.g0, self.best, self.target, self.prev_action = z(), z(), z(), z(), z()
        self.prev_loss = z()
        self.epoch = np.zeros(batch, dtype=np.int64)
        self.stats = np.zeros((batch, NUM_STATS))
        # 'relative' mode: step sizes in force (B, 2), their start values and absolute bounds
        self.lr, self.lr0 = np.zeros((batch, 2)), np.ones((batch, 2))
        self.lr_lo, self.lr_hi = np.zeros((batch, 2)), np.full((batch, 2), np.inf)
        self.done = np.zeros(batch, dtype=bool)

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
        self.epoch[idx] = 0
        self.done[idx] = False
        cfg = self.cfg
        ref = (2.0 / np.maximum(stats[:, [STAT_L_W, STAT_L_H]], _TINY) if cfg.lr_reference == "bound"
               else np.ones((len(idx), 2)))
        self.lr0[idx] = cfg.lr_init * ref
        self.lr[idx] = self.lr0[idx]
        self.lr_lo[idx] = cfg.lr_min * ref
        self.lr_hi[idx] = cfg.lr_max * ref

    def lipschitz(self) -> np.ndarray:
        return self.stats[:, [STAT_L_W, STAT_L_H]]

    def actions_to_lr(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`TaskConfig.actions_to_lr` for the current state of every slot (any action mode)."""
        return self.cfg.actions_to_lr(actions, self.lipschitz(), self.lr, (self.lr_lo, self.lr_hi))
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
                    cols.append(self.prev_action)
                elif f == "target_gap":
                    cols.append(np.log10(s[:, self._target_col] / self.target))
                elif f == "lr_rel":  # the step size in force relative to its start (mean over the factors)
                    cols.append(np.log10(self.lr / self.lr0).mean(axis=1))
                elif f == "loss_slope":  # log10 change of the loss over the last epoch (0 before the first)
                    cols.append(np.log10(s[:, STAT_LOSS] / self.prev_loss))
        obs = np.stack(cols, axis=1)
        return np.clip(np.nan_to_num(obs, nan=c, posinf=c, neginf=-c), -c, c).astype(np.float32)

    def step(self, stats: np.ndarray, actions: np.ndarray, lr: np.ndarray, invalid: np.ndarray):
        """Advance all instances by one epoch given the new statistics; returns
        ``(obs, reward, terminated, truncated, infos)``."""
        cfg, w = self.cfg, self.cfg.reward
        prev_L = self.lipschitz().copy()
        self.prev_loss = self.stats[:, STAT_LOSS].copy()
        self.stats = stats
        if cfg.action_mode == "relative":  # an invalid (NaN) action leaves the step size as it was
            self.lr = np.where(invalid[:, None], self.lr, lr)
        self.epoch += 1
        self.prev_action = actions
        loss = stats[:, STAT_LOSS]
        with np.errstate(all="ignore"):
            diverged = invalid | ~np.isfinite(loss) | (loss > cfg.divergence_factor * self.f0)
            improved = ~diverged & (loss < self.best)
            gain = np.where(improved, 100.0 * (self.best - loss) / np.maximum(self.best, _TINY), 0.0)
        self.best = np.where(improved, loss, self.best)
        # the episode ends at the first epoch at or below the target, so "now" is "ever" here
        reached = ~diverged & (stats[:, self._target_col] <= self.target)
        remaining = cfg.budget - self.epoch
        terms = (w.improvement * gain, np.full(self.B, -w.time_cost), np.where(reached, w.remaining * remaining, 0.0),
                 np.where(diverged, -w.divergence_penalty, 0.0))
        reward = terms[0] + terms[1] + terms[2] + terms[3]
        terminated = diverged | reached
        truncated = ~terminated & (self.epoch >= cfg.budget)
        self.done = terminated | truncated
        infos = self._infos(lr, 2.0 / np.maximum(prev_L, _TINY), diverged, reached, invalid, terms=terms)
        return self.observe(), reward, terminated, truncated, infos

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
        zero = np.zeros(len(cols[0]))
        cols += [np.asarray(t)[slots].tolist() if terms is not None else zero.tolist() for t in (terms or (0,) * 4)]
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

"""Learning-rate schedules: hand-made baselines and trained policies, all behind one small interface.

A :class:`Schedule` drives an :class:`lrenv.NMFEnv` exactly like a stable-baselines3 model does:
``action, state = schedule.predict(obs)``. Before each episode the harness calls
``schedule.reset(env.oracle, rng)``; schedules that need more than the observation (the bound 2/L,
the gradient, trial steps) ask the :class:`lrenv.env.LROracle`, which always refers to the current
iterate. A schedule states the environment it needs: ``action_mode`` and ``env_overrides`` (extra
:class:`lrenv.task.TaskConfig` keywords such as ``lr_max`` or ``log_range``).

Conventions: a *scale* ``s`` means ``lr = s * (2/L)`` per factor (``s < 1`` is below the stability
bound); the constant ``c`` of SPEC §5 is ``lr = c / L``, i.e. ``s = c / 2``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from typing import Any

import numpy as np

from .env import LROracle
from .suite import is_suite
from .task import TaskConfig, cosine_decay

LOG_RANGE = 3.0
"""Decades each side of the bound used by the log_bound schedules (lr from 1e-3 to 1e3 times 2/L)."""
# a constant centre, the same for both factors: scale() is the step
_BOUND_ENV = {"log_range": LOG_RANGE, "action_center_final": None, "factor_tilt": None, "center_plateau": None}


def _act(x: float | np.ndarray) -> np.ndarray:
    """One action as a flat float32 vector: shape (1,), or (2,) for a per-factor pair."""
    return np.asarray(x, dtype=np.float32).reshape(-1)


def schedule_env_kwargs(schedule: "Schedule", env_kwargs: dict) -> dict:
    """The env kwargs for ``schedule``: the evaluation's, its action mode and its overrides."""
    return {"instances": "test", **env_kwargs, "action_mode": schedule.action_mode, **schedule.env_overrides}


class Schedule:
    """Base class: a learning-rate rule with the SB3 ``predict`` signature."""

    name: str = "schedule"
    action_mode: str = "log_bound"
    env_overrides: dict[str, Any] = {}
    batchable: bool = False
    """True when the decision needs only the observation, the epoch, the schedule's own generator and what its
    :class:`lrenv.env.LROracle` answers, so that many runs can share one batched engine (each slot has its own
    oracle; :mod:`lrenv.batch_eval`). False (the default, for schedules written elsewhere) runs every instance
    in its own environment."""
    needs_gradient: bool = True
    """False when the decision uses neither the observation's ``grad_norm`` feature nor the oracle's gradient (nor
    its trial steps): the batched evaluation then skips the gradient in the environment's statistics."""

    def __init__(self) -> None:
        self.extra_loss_evals = 0
        self.oracle: LROracle | None = None
        self.rng = np.random.default_rng(0)
        self.epoch = 0

    def reset(self, oracle: LROracle, rng: np.random.Generator | None = None) -> None:
        """Start an episode: ``oracle`` is the handle of the environment just reset."""
        self.oracle = oracle
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.extra_loss_evals = 0
        self.epoch = 0

    @property
    def task(self) -> TaskConfig:
        if self.oracle is None:
            raise RuntimeError(f"{self.name}: call reset(env.oracle, rng) before predict()")
        return self.oracle.task

    def predict(self, obs: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        action = self._action(np.asarray(obs))
        self.epoch += 1
        return _act(action), state

    def _action(self, obs: np.ndarray) -> float | np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Name and settings (for config.json)."""
        return {"name": self.name, "class": type(self).__name__, "action_mode": self.action_mode,
                "env_overrides": dict(self.env_overrides)}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class ScaleSchedule(Schedule):
    """A schedule that picks a scale ``s`` of the per-factor bound each epoch (log_bound mode)."""

    action_mode = "log_bound"
    env_overrides = _BOUND_ENV
    batchable = True
    needs_gradient = False

    def _action(self, obs: np.ndarray) -> np.ndarray:
        return self.task.action_for_scale(self.scale())

    def scale(self) -> float:
        raise NotImplementedError


# ----------------------------------------------------------------------------- fixed
def fixed_grid(lo: float = 1e-5, hi: float = 10.0, n: int = 7) -> list[float]:
    """``n`` log-spaced learning rates from ``lo`` to ``hi`` (the paper's 1e-5 ... 10 grid)."""
    if not (n >= 1 and int(n) == n):
        raise ValueError(f"fixed grid: n must be a positive integer, got {n!r}")
    if not (0 < lo <= hi) or not math.isfinite(hi):
        raise ValueError(f"fixed grid: need 0 < lo <= hi < inf, got lo={lo}, hi={hi}")
    if n == 1:
        return [float(lo)]
    return [float(x) for x in np.logspace(math.log10(lo), math.log10(hi), int(n))]


class FixedLR(Schedule):
    """The same absolute learning rate for both factors every epoch (paper mode, as in the paper)."""

    action_mode = "paper"
    batchable = True
    needs_gradient = False

    def __init__(self, lr: float):
        super().__init__()
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"FixedLR: lr must be positive and finite, got {lr!r}")
        self.lr = float(lr)
        self.name = f"fixed lr={self.lr:.0e}"
        self.env_overrides = {"lr_max": max(1.0, self.lr)}

    def _action(self, obs: np.ndarray) -> float:
        return self.lr


class FixedScale(ScaleSchedule):
    """``lr = c / L`` per factor, recomputed every epoch (``c < 2`` is below the bound)."""

    def __init__(self, c: float):
        super().__init__()
        if not c > 0:
            raise ValueError(f"FixedScale: c must be > 0, got {c!r}")
        self.c = float(c)
        self.name = f"fixed c={self.c:g}"

    def scale(self) -> float:
        return self.c / 2.0


class FixedScalePair(Schedule):
    """``lr_W = c_W / L_W`` and ``lr_H = c_H / L_H``, recomputed every epoch ('per_factor' action mode).

    The per-factor counterpart of :class:`FixedScale` and the fair baseline for a policy with the 2-D action:
    the exact per-row W-step is stable up to ``c_W = 2`` while the minibatch H-step diverges from about
    ``c_H = 1.1`` (SPEC §5), so one shared ``c`` must stay under the H cliff and starves W.
    """

    action_mode = "per_factor"
    env_overrides = _BOUND_ENV
    batchable = True
    needs_gradient = False

    def __init__(self, c_W: float, c_H: float):
        super().__init__()
        if not (c_W > 0 and c_H > 0 and math.isfinite(c_W) and math.isfinite(c_H)):
            raise ValueError(f"FixedScalePair: c_W and c_H must be positive and finite, got {c_W!r}, {c_H!r}")
        self.c_W, self.c_H = float(c_W), float(c_H)
        self.name = f"fixed cW={self.c_W:g},cH={self.c_H:g}"

    def _action(self, obs: np.ndarray) -> np.ndarray:
        return self.task.action_for_scale(np.array([self.c_W, self.c_H]) / 2.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "c_W": self.c_W, "c_H": self.c_H}


class RandomUnderBound(ScaleSchedule):
    """``lr = u * 2/L`` with a fresh ``u ~ U(0, 1)`` each epoch (paper Fig. 3); mean ``c = 1``."""

    name = "random-bound"

    def scale(self) -> float:
        return float(self.rng.uniform(0.0, 1.0))


class RandomWalkBound(ScaleSchedule):
    """A random walk of the scale within +-``width`` of ``center`` (paper Fig. 4), always below the bound.

    Each epoch the scale moves by ``N(0, step)`` and is reflected into ``[center(1-width), center(1+width)]``.
    The default centre 0.5 (``c = 1``) gives the same mean as :class:`RandomUnderBound` and ``FixedScale(1)``.
    """

    name = "random-walk"

    def __init__(self, center: float = 0.5, width: float = 0.5, step: float = 0.1):
        super().__init__()
        if not (0 < width < 1 and center > 0 and center * (1 + width) <= 1.0):
            raise ValueError(f"RandomWalkBound: need 0 < width < 1 and center*(1+width) <= 1, got "
                             f"center={center}, width={width}")
        self.center, self.width, self.step = float(center), float(width), float(step)
        self.s = self.center

    def reset(self, oracle: LROracle, rng: np.random.Generator | None = None) -> None:
        super().reset(oracle, rng)
        self.s = self.center

    def scale(self) -> float:
        lo, hi = self.center * (1 - self.width), self.center * (1 + self.width)
        s = self.s + float(self.rng.normal(0.0, self.step))
        while not lo <= s <= hi:  # reflect at the edges
            s = 2 * lo - s if s < lo else 2 * hi - s
        self.s = s
        return s


class CosineDecay(ScaleSchedule):
    """Cosine decay of the scale from ``peak`` to ``final`` over the budget.

    The default peak 0.55 (``c = 1.1``) is the largest fixed scale that never diverged on ``small``
    (``c = 1.2`` diverged on half the seeds: minibatch steps of W rows and H together are less stable
    than one block step, whose bound is ``c = 2``).
    """

    name = "cosine"

    def __init__(self, peak: float = 0.55, final: float = 0.05):
        super().__init__()
        if not 0 < final <= peak:
            raise ValueError(f"CosineDecay: need 0 < final <= peak, got {final}, {peak}")
        self.peak, self.final = float(peak), float(final)

    def scale(self) -> float:
        return float(cosine_decay(self.epoch, self.task.budget, self.peak, self.final))


class CosineDecayPair(Schedule):
    """:class:`CosineDecay` per factor ('per_factor' action mode): each factor's scale decays along the cosine from
    its own ``peak_X`` to ``final_frac * peak_X`` over the budget.

    The matching baseline for a per-factor policy whose ``a = 0`` is a cosine (``factor_tilt``): on ``illcond`` a
    W-step above and an H-step below the shared cosine ended orders of magnitude lower on validation instances.
    """

    action_mode = "per_factor"
    env_overrides = _BOUND_ENV
    batchable = True
    needs_gradient = False
    name = "cosine-pf"

    def __init__(self, peak_W: float = 0.55, peak_H: float = 0.55, final_frac: float = 0.1):
        super().__init__()
        if not (peak_W > 0 and peak_H > 0 and 0 < final_frac <= 1
                and math.isfinite(peak_W) and math.isfinite(peak_H)):
            raise ValueError(f"CosineDecayPair: need peak_W, peak_H > 0 and 0 < final_frac <= 1, got "
                             f"{peak_W!r}, {peak_H!r}, {final_frac!r}")
        self.peak_W, self.peak_H, self.final_frac = float(peak_W), float(peak_H), float(final_frac)

    def _action(self, obs: np.ndarray) -> np.ndarray:
        shape = float(cosine_decay(self.epoch, self.task.budget, 1.0, self.final_frac))
        return self.task.action_for_scale(np.array([self.peak_W, self.peak_H]) * shape)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "peak_W": self.peak_W, "peak_H": self.peak_H, "final_frac": self.final_frac}


class TwoPhase(ScaleSchedule):
    """"High, then decay": ``c_high`` until ``switch`` (a fraction of the budget), then ``c_low``.

    SPEC §5's prototype used c = 1.8 then 0.8 from 30 % of the budget; in this environment c >= 1.2
    diverges (see :class:`CosineDecay`), so the defaults are c = 1.1, then 0.8 from half the budget.
    """

    name = "two-phase"

    def __init__(self, c_high: float = 1.1, c_low: float = 0.8, switch: float = 0.5):
        super().__init__()
        if not (0 < c_low and 0 < c_high and 0 <= switch <= 1):
            raise ValueError(f"TwoPhase: need c_low, c_high > 0 and 0 <= switch <= 1, got {c_high}, {c_low}, {switch}")
        self.c_high, self.c_low, self.switch = float(c_high), float(c_low), float(switch)

    def scale(self) -> float:
        high = self.epoch < self.switch * self.task.budget
        return (self.c_high if high else self.c_low) / 2.0


# ----------------------------------------------------------------------------- line search and friends
class Armijo(ScaleSchedule):
    """Backtracking line search on the full-batch loss: the largest ``s = alpha_max * shrink^k`` with
    ``F(x - lr grad) <= F(x) - c * <grad, x - x_new>`` (projected Armijo; ``lr * ||grad||^2`` without
    projection). The accepted step size is then used for the epoch's stochastic steps. Every trial
    costs one extra loss evaluation (counted in ``extra_loss_evals``). Defaults: the search starts at
    the bound (``alpha_max = 1``, scale of 2/L) and ``c = 0.5``, which on a quadratic accepts steps up
    to ``1/L``: with ``c = 1e-4`` it accepts full-batch steps near the bound that the stochastic epoch
    then cannot take (it diverged on ``small``).
    """

    name = "armijo"
    batchable = True  # one line search per run, on its slot's iterate (LROracle.trial)
    needs_gradient = True

    def __init__(self, c: float = 0.5, shrink: float = 0.5, alpha_max: float = 1.0, max_trials: int = 30):
        super().__init__()
        if not (0 < c < 1 and 0 < shrink < 1 and alpha_max > 0 and max_trials >= 1):
            raise ValueError(f"Armijo: need 0 < c < 1, 0 < shrink < 1, alpha_max > 0, got {c}, {shrink}, {alpha_max}")
        self.c, self.shrink, self.alpha_max, self.max_trials = float(c), float(shrink), float(alpha_max), int(max_trials)
        self.last_trial: tuple[float, float, float] | None = None
        """(loss before, trial loss, decrease) of the accepted step, for inspection."""

    def _action(self, obs: np.ndarray) -> np.ndarray:
        oracle = self.oracle
        assert oracle is not None
        f0 = oracle.loss()
        s = self.alpha_max
        action = self.task.action_for_scale(s)
        for _ in range(self.max_trials):
            action = self.task.action_for_scale(s)
            f_new, dec = oracle.trial(action)
            self.extra_loss_evals += 1
            if np.isfinite(f_new) and f_new <= f0 - self.c * dec:
                self.last_trial = (f0, f_new, dec)
                break
            s *= self.shrink
        return action


class Polyak(Schedule):
    """Polyak's step ``lr = (F - f*) / ||grad||^2`` for both factors (paper mode), with an ``f*``
    estimate that needs no oracle and a cap relative to the stability bound.

    ``f_star='level'`` (default): the running best loss minus an adaptive margin, Polyak's step with
    an adjustable target level (Brannlund; Nedic & Bertsekas 2001): ``f*_t = F_best - delta_t``,
    ``delta_0 = margin * F_0``; after each epoch ``delta`` grows by ``up`` if the loss fell below
    ``F_best - delta/2`` and shrinks by ``down`` otherwise. Why ``delta/2``: one epoch at
    ``lr = delta/||g||^2`` decreases a quadratic by about ``delta (1 - lr L/2)``, so the rule settles
    where ``lr`` is about ``1/L`` (``c = 1``) without knowing ``L`` or ``f*``.
    A number (``f_star=0.0``: the classic step, which assumes the loss can reach 0 and diverges on
    ``digits`` and ``medium``) fixes ``f*``.

    ``cap``: the step never exceeds ``cap`` times the *larger* per-factor bound ``2/L`` (SPS_max's
    ``gamma_b``; default 0.55, i.e. ``c = 1.1``, the largest fixed scale that never diverged on
    ``small``); ``None`` removes the cap (the classic method). Why the larger bound: one step size
    serves both factors, and capping at the smaller bound starves the other factor (measured with
    ``lrenv evaluate``, 4 seeds: success 0 on ``small`` and ``digits``, mean W step 0.08-0.19 x 2/L_W).
    Measured (4 seeds, family budgets): ``small`` 89.8 epochs to target (success 1.0; fixed c=1.1:
    115.8), ``digits`` success 0.5, no divergence (f* = 0: diverges 4/4), ``medium`` no divergence,
    median final loss 6.7e3 (fixed c=1.1: 1.1e4; f* = 0: diverges 2/4).
    """

    name = "polyak"
    action_mode = "paper"
    batchable = True

    def __init__(self, f_star: float | str = "level", lr_max: float = 1e6, *, margin: float = 0.5,
                 up: float = 1.5, down: float = 0.5, cap: float | None = 0.55):
        super().__init__()
        if isinstance(f_star, str):
            if f_star != "level":
                raise ValueError(f"Polyak: f_star must be 'level' or a number (0.0 = the classic step), "
                                 f"got {f_star!r}")
        elif not math.isfinite(f_star):
            raise ValueError(f"Polyak: f_star must be finite, got {f_star!r}")
        if not (0 < margin and up >= 1 and 0 < down < 1):
            raise ValueError(f"Polyak: need margin > 0, up >= 1 and 0 < down < 1, got {margin}, {up}, {down}")
        if cap is not None and not cap > 0:
            raise ValueError(f"Polyak: cap must be > 0 or None, got {cap!r}")
        self.f_star = f_star if isinstance(f_star, str) else float(f_star)
        self.lr_max, self.margin, self.up, self.down = float(lr_max), float(margin), float(up), float(down)
        self.cap = None if cap is None else float(cap)
        self.env_overrides = {"lr_max": self.lr_max}
        if self.f_star != "level":
            self.name = f"polyak f*={self.f_star:g}" + ("" if self.cap is None else f" cap={self.cap:g}")
        elif self.cap != 0.55:
            self.name = f"polyak cap={self.cap}"
        self._best = self._delta = math.nan

    def reset(self, oracle: LROracle, rng: np.random.Generator | None = None) -> None:
        super().reset(oracle, rng)
        self._best = self._delta = math.nan

    def estimate(self, f: float) -> float:
        """Update and return the ``f*`` estimate given the current loss ``f``."""
        if not isinstance(self.f_star, str):
            return self.f_star
        if not math.isfinite(self._best):
            self._best, self._delta = f, self.margin * abs(f)
        else:
            progressed = f <= self._best - 0.5 * self._delta
            self._delta *= self.up if progressed else self.down
            self._delta = max(self._delta, 1e-15 * abs(self._best))
            self._best = min(self._best, f)
        return self._best - self._delta

    def _action(self, obs: np.ndarray) -> float:
        assert self.oracle is not None
        g = self.oracle.grad_norm()
        f = self.oracle.loss()
        gap = max(f - self.estimate(f), 0.0) if math.isfinite(f) else 0.0
        lr = min(gap / g ** 2, self.lr_max) if g > 0 and math.isfinite(g) else 0.0
        if self.cap is not None:
            lr = min(lr, self.cap * float(np.max(self.oracle.bounds())))
        return lr

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "f_star": self.f_star, "margin": self.margin, "up": self.up,
                "down": self.down, "cap": self.cap}


class BarzilaiBorwein(Schedule):
    """Barzilai-Borwein step (the "short" BB2 form ``<s, y> / <y, y>``) from successive epochs'
    parameters and full gradients; the first epoch (and any non-positive curvature) uses
    ``fallback`` times the smaller per-factor bound. Paper mode: one absolute lr for both factors.
    """

    name = "bb"
    action_mode = "paper"
    batchable = True

    def __init__(self, fallback: float = 0.5, lr_max: float = 1e6):
        super().__init__()
        self.fallback, self.lr_max = float(fallback), float(lr_max)
        self.env_overrides = {"lr_max": self.lr_max}
        self._prev: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self, oracle: LROracle, rng: np.random.Generator | None = None) -> None:
        super().reset(oracle, rng)
        self._prev = None

    def _action(self, obs: np.ndarray) -> float:
        assert self.oracle is not None
        x, g = self.oracle.params_and_grad()
        lr = self.fallback * float(np.min(self.oracle.bounds()))
        if self._prev is not None:
            s, y = x - self._prev[0], g - self._prev[1]
            sy, yy = float(s @ y), float(y @ y)
            if sy > 0 and yy > 0 and math.isfinite(sy / yy):
                lr = sy / yy
        self._prev = (x, g)
        return min(max(lr, 0.0), self.lr_max)


# ----------------------------------------------------------------------------- trained policies
TASK_FIELDS = tuple(f.name for f in dataclasses.fields(TaskConfig))
"""Every field of the decision problem; all of them travel with a saved policy (lrenv.policy_io)."""
TASK_FIELDS_FROM_CONFIG = tuple(f for f in TASK_FIELDS if f != "budget")
"""The fields a policy imposes on the environment it is evaluated in. The budget is the evaluation's (every
method of a table shares it), but a policy trained with another budget is refused (the epoch feature and
the reward's remaining-epochs term depend on it): see :meth:`PolicySchedule.check_task`. A policy trained on a
suite (lrenv.suite) saw every entry's budget, so any budget is accepted for it."""


class PolicySchedule(Schedule):
    """A trained stable-baselines3 model (optionally with VecNormalize statistics) as a schedule.

    ``task``: the TaskConfig (as a dict) the model was trained on, when known; evaluating it in an environment
    that differs in any field is a ValueError naming the fields (checked at every :meth:`reset`), except the
    budget of a policy trained on a suite (``env_config["problem"]`` a suite; :attr:`suite_trained`): its
    episodes had each entry's budget, and the epoch feature is a fraction of it. The suite-only settings
    (``problem``, ``exclude``) never reach the evaluation environment: it takes the TaskConfig fields only."""

    def __init__(self, model: Any, *, name: str = "policy", env_config: dict | None = None,
                 obs_rms: Any = None, clip_obs: float = 10.0, epsilon: float = 1e-8, source: str | None = None,
                 task: dict | None = None):
        super().__init__()
        self.model = model
        self.name = name
        self.source = source
        self.env_config = dict(env_config or {})
        self.task_config = dict(task) if task is not None else {k: self.env_config[k] for k in TASK_FIELDS
                                                                  if k in self.env_config}
        self.env_overrides = {k: self.task_config[k] for k in TASK_FIELDS_FROM_CONFIG
                              if k in self.task_config and k != "action_mode"}
        self.action_mode = self.task_config.get("action_mode", "log_bound")
        self.obs_rms, self.clip_obs, self.epsilon = obs_rms, float(clip_obs), float(epsilon)
        self.suite_trained = is_suite(self.env_config.get("problem"))
        """Trained on a suite: evaluated with any budget (its budget is the suite's largest)."""

    def check_spaces(self, observation_space: Any, action_space: Any) -> None:
        """Raise ValueError unless the model's spaces match the environment's."""
        m_obs, m_act = self.model.observation_space, self.model.action_space
        if m_obs.shape != observation_space.shape or m_act.shape != action_space.shape or not (
                np.allclose(m_act.low, action_space.low) and np.allclose(m_act.high, action_space.high)):
            raise ValueError(f"policy {self.name!r}: its spaces (observation {m_obs}, action {m_act}) do not match "
                             f"the evaluation environment's (observation {observation_space}, action {action_space}); "
                             "evaluate it with the env settings it was trained with (config.json 'env')")

    def check_task(self, task: TaskConfig) -> None:
        """Raise ValueError naming every TaskConfig field in which ``task`` differs from the policy's."""
        from .policy_io import task_differences
        trained = {k: v for k, v in self.task_config.items() if not (k == "budget" and self.suite_trained)}
        diff = task_differences(trained, task.to_dict())
        if diff:
            hint = " (evaluate with --budget {})".format(self.task_config["budget"]) if any(
                d.startswith("budget:") for d in diff) else ""
            raise ValueError(f"policy {self.name!r} was trained on a different decision problem than the evaluation "
                             f"environment's: {'; '.join(diff)}{hint}")

    def reset(self, oracle: LROracle, rng: np.random.Generator | None = None) -> None:
        self.check_task(oracle.task)
        super().reset(oracle, rng)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        if self.obs_rms is None:
            return obs
        z = (obs - self.obs_rms.mean) / np.sqrt(self.obs_rms.var + self.epsilon)
        return np.clip(z, -self.clip_obs, self.clip_obs).astype(np.float32)

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        return not hasattr(self.model.policy, "lstm_actor")  # a recurrent policy keeps per-run state

    def predict_batch(self, obs: np.ndarray) -> np.ndarray:
        """Deterministic actions for a batch of observations (n, obs_dim) -> (n, action_dim)."""
        action, _ = self.model.predict(self.normalize(np.asarray(obs, dtype=np.float32)), deterministic=True)
        return np.asarray(action, dtype=np.float32).reshape(len(obs), -1)

    def predict(self, obs: np.ndarray, state: Any = None, episode_start: Any = None,
                deterministic: bool = True) -> tuple[np.ndarray, Any]:
        action, state = self.model.predict(self.normalize(np.asarray(obs, dtype=np.float32)), state=state,
                                           episode_start=episode_start, deterministic=deterministic)
        self.epoch += 1
        return _act(np.asarray(action).reshape(-1)[0]), state

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.source, "env_config": self.env_config,
                "task": self.task_config, "normalized": self.obs_rms is not None}


def _load_sb3_model(path: str) -> Any:
    from stable_baselines3 import A2C, DDPG, PPO, SAC, TD3
    errors = []
    for cls in (PPO, SAC, TD3, A2C, DDPG):
        try:
            return cls.load(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - try the next algorithm class
            errors.append(f"{cls.__name__}: {type(e).__name__}")
    raise ValueError(f"could not load a stable-baselines3 model from {path} ({'; '.join(errors)})")


def load_policy(path: str | os.PathLike, name: str | None = None) -> PolicySchedule:
    """Load a trained policy from a run directory (its ``model.zip``) or from any model ``.zip``.

    A model saved by lrenv carries its TaskConfig, env kwargs and VecNormalize statistics inside the archive
    (:mod:`lrenv.policy_io`); they are used first. For a model without them, the run directory's
    ``config.json`` ``"env"`` and ``vecnormalize.pkl`` are used, and without those the env defaults."""
    from .policy_io import read_extras
    path = os.fspath(path)
    if path.startswith(PRETRAINED_PREFIX):  # a policy shipped with the package
        return pretrained(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"policy not found: {path} (expected a run directory, a model .zip or "
                                f"pretrained:NAME)")
    run_dir = path if os.path.isdir(path) else os.path.dirname(path)
    model_path = os.path.join(path, "model.zip") if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no model.zip in run directory {path}")
    meta, vecnorm = read_extras(model_path)
    task = None
    if meta is not None:
        env_config, task = {**meta.get("env", {}), **meta["task"]}, meta["task"]
    else:
        env_config = {}
        cfg_path = os.path.join(run_dir, "config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path) as f:
                    env_config = json.load(f).get("env", {}) or {}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        vn_path = os.path.join(run_dir, "vecnormalize.pkl")
        if os.path.isfile(vn_path):
            with open(vn_path, "rb") as f:
                vecnorm = pickle.load(f)
    obs_rms, clip_obs, eps = None, 10.0, 1e-8
    if vecnorm is not None:
        if getattr(vecnorm, "norm_obs", True):
            obs_rms = vecnorm.obs_rms
        clip_obs, eps = float(getattr(vecnorm, "clip_obs", 10.0)), float(getattr(vecnorm, "epsilon", 1e-8))
    label = name or os.path.basename(os.path.normpath(run_dir if os.path.isdir(path) else path)).removesuffix(".zip")
    return PolicySchedule(_load_sb3_model(model_path), name=f"policy:{label}", env_config=env_config,
                          obs_rms=obs_rms, clip_obs=clip_obs, epsilon=eps, source=path, task=task)


# ----------------------------------------------------------------------------- policies shipped with the package
PRETRAINED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pretrained")
"""Where the package's trained policies live: one directory per policy (model.zip, config.json,
vecnormalize.pkl, CARD.md saying what it was trained on and how it scored)."""
PRETRAINED_PREFIX = "pretrained:"


def pretrained_names() -> list[str]:
    """Names of the policies shipped inside the package."""
    if not os.path.isdir(PRETRAINED_DIR):
        return []
    return sorted(d for d in os.listdir(PRETRAINED_DIR) if os.path.isfile(os.path.join(PRETRAINED_DIR, d, "model.zip")))


def pretrained(name: str) -> PolicySchedule:
    """Load the shipped policy ``name`` (see :func:`pretrained_names`) as a schedule."""
    name = name.removeprefix(PRETRAINED_PREFIX)
    names = pretrained_names()
    if name not in names:
        from .problems import suggest
        raise ValueError(f"no pretrained policy named {name!r}.{suggest(name, names)} "
                         f"Shipped: {', '.join(names) or 'none'}")
    return load_policy(os.path.join(PRETRAINED_DIR, name), name=name)


def resolve_policy(spec: Any) -> PolicySchedule:
    """A policy from ``'pretrained:NAME'``, a run directory or model .zip, or a PolicySchedule (returned as is)."""
    if isinstance(spec, PolicySchedule):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.startswith(PRETRAINED_PREFIX):
            return pretrained(text)
        return load_policy(text)
    raise ValueError(f"a policy must be 'pretrained:NAME', a run directory, a model .zip or a PolicySchedule, "
                     f"got {type(spec).__name__}")

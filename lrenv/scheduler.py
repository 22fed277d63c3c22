"""``lrenv.LearnedLR``: a trained learning-rate policy as a PyTorch LR scheduler, for any training loop.

The policy must have been trained in the *relative* action mode (:class:`lrenv.task.TaskConfig`,
``action_mode="relative"``): its action ``a in [-1, 1]`` multiplies the learning rate in force by
``10^(relative_range * a)``, so it never needs the Lipschitz constant of the user's problem. Once per epoch,
``scheduler.step(loss)`` builds the observation the policy was trained on from what any loop has:

============ ==================================================================================
loss         log10(loss / first loss passed to step)
epoch        epochs stepped / total_epochs
grad_norm    log10(||gradient|| / first gradient norm), over the optimizer's parameters' ``.grad``
             (the gradient of the last minibatch of the epoch: the environment used the full one)
lr_rel       log10(lr / the group's initial lr), averaged over the param groups
loss_slope   log10(loss / previous epoch's loss)
prev_action  the previous action
============ ==================================================================================

then sets every param group's ``lr`` to ``clip(lr * 10^(k a), initial_lr * min_factor, initial_lr * max_factor)``.
Features that need the problem's structure (``bound``, ``target_gap``) cannot be computed here: a policy
using them is refused with a clear error. A policy trained with ``optimizer='adam'`` learned to schedule Adam's
learning rate: give it a torch Adam-family optimizer (:data:`ADAM_FAMILY`), and an SGD-trained one anything else;
LearnedLR warns when the kinds differ.

Divergence guard: a non-finite loss, or one above ``divergence_factor`` times the best loss so far, is not
shown to the policy; every group's lr is multiplied by ``shrink`` instead, and with ``restore=True`` the
parameters and the optimizer state are put back to those of the last good epoch (the scheduler keeps one
copy of them: memory of one model plus its optimizer state). The reduced rate also becomes the group's ceiling,
so the policy cannot walk back to a rate that diverged.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from .task import RELATIVE_OBS

DEFAULT_POLICY = "pretrained:small-relative"
SUPPORTED_FEATURES = ("loss", "epoch", "grad_norm", "lr_rel", "loss_slope", "prev_action")


class _PolicyAdapter:
    """A uniform view of the policy: ``act(obs) -> float`` plus the settings it was trained with."""

    def __init__(self, policy: Any):
        from .schedules import PolicySchedule, resolve_policy
        if isinstance(policy, (str, bytes)) or hasattr(policy, "__fspath__"):
            policy = resolve_policy(policy)
        self.schedule = policy if isinstance(policy, PolicySchedule) else None
        cfg = dict(self.schedule.env_config) if self.schedule is not None else dict(getattr(policy, "env_config", {}))
        self.config = cfg
        self.predictor = policy
        mode = cfg.get("action_mode", "relative")
        if mode != "relative":
            raise ValueError(f"LearnedLR needs a policy trained with action_mode='relative'; this one used "
                             f"{mode!r}, whose actions are fractions of a scale only the matrix problem has "
                             "(each factor's 2/L, or for Adam the RMS of the initial factors). Train one with "
                             "lrenv train 'env_kwargs.action_mode:relative'")
        self.features = tuple(cfg.get("obs_features", RELATIVE_OBS))
        bad = [f for f in self.features if f not in SUPPORTED_FEATURES]
        if bad:
            raise ValueError(f"LearnedLR cannot compute the observation features {bad} outside the environment "
                             f"(they need the problem's structure); supported: {SUPPORTED_FEATURES}")
        self.relative_range = float(cfg.get("relative_range", 0.5))
        lr_init = float(cfg.get("lr_init", 0.1))
        self.min_factor = float(cfg.get("lr_min", 1e-4)) / lr_init
        self.max_factor = float(cfg.get("lr_max", 1.0)) / lr_init
        self.obs_clip = float(cfg.get("obs_clip", 100.0))
        self.optimizer = str(cfg.get("optimizer", "sgd"))

    def act(self, obs: np.ndarray) -> float:
        action, _ = self.predictor.predict(obs.astype(np.float32), deterministic=True)
        a = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        return a


ADAM_FAMILY = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)
"""torch optimizers whose learning rate means what Adam's does (a step per coordinate of about ``lr``)."""


def _check_optimizer_kind(trained_with: str, optimizer: torch.optim.Optimizer) -> None:
    """Warn when the policy learned to schedule another kind of optimizer than the one it is given: an Adam
    learning rate (a step of about lr per coordinate) and an SGD one (a step of lr times the gradient) are
    different quantities, so the schedule will not mean what it meant in training."""
    adam_like = isinstance(optimizer, ADAM_FAMILY)
    if (trained_with == "adam") != adam_like:
        warnings.warn(f"LearnedLR: this policy was trained to schedule {trained_with!r} but drives a "
                      f"{type(optimizer).__name__}: the schedule will not mean what it meant in training. "
                      f"Use a policy trained with lrenv train "
                      f"'env_kwargs.optimizer:{'adam' if adam_like else 'sgd'}' 'env_kwargs.action_mode:relative'",
                      stacklevel=3)


class LearnedLR(LRScheduler):
    """Set each param group's learning rate every epoch with a policy trained in lrenv's relative mode.

    Arguments: ``optimizer``; ``policy``: ``'pretrained:NAME'`` (default ``pretrained:small-relative``), a run
    directory or model .zip of ``lrenv train``, a :class:`lrenv.schedules.PolicySchedule`, or any object with
    ``predict(obs, deterministic=True) -> (action, state)`` (then ``env_config`` on it, if present, gives the
    settings below); ``total_epochs``: the run's epoch budget (the ``epoch`` feature; default: 200, the budget
    the pretrained policy was trained with); ``relative_range``, ``min_factor``, ``max_factor``: override the
    policy's settings (decades per action; lr bounds as multiples of each group's initial lr);
    ``divergence_factor`` (default 100), ``shrink`` (default 0.1) and ``restore`` (default True): the
    divergence guard (module docstring). Usage::

        sched = LearnedLR(opt, total_epochs=100)
        for epoch in range(100):
            loss = train_one_epoch(model, opt)   # the loss of the epoch (a float or a 0-d tensor)
            sched.step(loss)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, policy: Any = DEFAULT_POLICY, *,
                 total_epochs: int = 200, relative_range: float | None = None, min_factor: float | None = None,
                 max_factor: float | None = None, divergence_factor: float = 100.0, shrink: float = 0.1,
                 restore: bool = True, last_epoch: int = -1):
        self.policy = _PolicyAdapter(policy)
        _check_optimizer_kind(self.policy.optimizer, optimizer)
        if not (isinstance(total_epochs, (int, np.integer)) and total_epochs >= 1):
            raise ValueError(f"total_epochs must be a positive integer, got {total_epochs!r}")
        if not (divergence_factor > 1 and 0 < shrink < 1):
            raise ValueError(f"need divergence_factor > 1 and 0 < shrink < 1, got {divergence_factor}, {shrink}")
        self.total_epochs = int(total_epochs)
        self.relative_range = self.policy.relative_range if relative_range is None else float(relative_range)
        self.min_factor = self.policy.min_factor if min_factor is None else float(min_factor)
        self.max_factor = self.policy.max_factor if max_factor is None else float(max_factor)
        if not (0 < self.min_factor <= 1 <= self.max_factor and self.relative_range > 0):
            raise ValueError(f"need 0 < min_factor <= 1 <= max_factor and relative_range > 0, got {self.min_factor}, "
                             f"{self.max_factor}, {self.relative_range}")
        self.divergence_factor, self.shrink, self.restore = float(divergence_factor), float(shrink), bool(restore)
        self.loss0 = self.g0 = self.prev_loss = self.best_loss = math.nan
        self.prev_action = 0.0
        self.epochs_seen = 0
        self.divergences = 0
        self.caps: dict[int, float] = {}
        self.actions: list[float] = []
        self._good: dict | None = None
        super().__init__(optimizer, last_epoch)
        if self.restore:
            self._snapshot()

    # ------------------------------------------------------------------ torch API
    def get_lr(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def step(self, loss: float | torch.Tensor | None = None) -> None:  # type: ignore[override]
        """Call once per epoch, after the epoch's optimizer steps, with the epoch's loss."""
        if loss is None:
            if getattr(self, "_is_initial", False) or self.last_epoch < 0:  # the base class's initial call
                self.last_epoch += 1
                self._last_lr = self.get_lr()
                return
            raise ValueError("LearnedLR.step needs the epoch's loss: call scheduler.step(loss)")
        f = float(loss.detach().cpu().item() if torch.is_tensor(loss) else loss)
        self.last_epoch += 1
        if not math.isfinite(f) or (math.isfinite(self.best_loss) and f > self.divergence_factor * self.best_loss):
            self._diverged()
            self._last_lr = self.get_lr()
            return
        g = self._grad_norm()
        if self.epochs_seen == 0:
            self.loss0, self.g0, self.prev_loss = max(f, 1e-300), max(g, 1e-300), f
        self.epochs_seen += 1
        obs = self._observe(f, g)
        a = self.policy.act(obs)
        a = float(np.clip(a, -1.0, 1.0)) if math.isfinite(a) else 0.0  # NaN: keep the rate
        self.actions.append(a)
        self.prev_action, self.prev_loss = a, f
        self.best_loss = f if not math.isfinite(self.best_loss) else min(self.best_loss, f)
        factor = 10.0 ** (self.relative_range * a)
        for i, group in enumerate(self.optimizer.param_groups):
            lo, hi = self._bounds(i, group)
            group["lr"] = float(np.clip(float(group["lr"]) * factor, lo, hi))
        self._last_lr = self.get_lr()
        if self.restore:
            self._snapshot()

    def state_dict(self) -> dict[str, Any]:
        """Everything but the optimizer, the policy and the last-good snapshot (which a checkpoint of the model
        and optimizer already holds)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "policy", "_good")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update({k: v for k, v in state_dict.items() if k not in ("optimizer", "policy", "_good")})
        if self.restore:
            self._snapshot()

    # ------------------------------------------------------------------ internals
    def _observe(self, f: float, g: float) -> np.ndarray:
        lrs = np.array([float(gr["lr"]) / float(gr["initial_lr"]) for gr in self.optimizer.param_groups])
        values = {"loss": math.log10(max(f, 1e-300) / self.loss0), "epoch": self.epochs_seen / self.total_epochs,
                  "grad_norm": math.log10(max(g, 1e-300) / self.g0), "lr_rel": float(np.mean(np.log10(lrs))),
                  "loss_slope": math.log10(max(f, 1e-300) / max(self.prev_loss, 1e-300)),
                  "prev_action": self.prev_action}
        c = self.policy.obs_clip
        obs = np.array([values[k] for k in self.policy.features], dtype=np.float64)
        return np.clip(np.nan_to_num(obs, nan=c, posinf=c, neginf=-c), -c, c).astype(np.float32)

    def _bounds(self, i: int, group: dict) -> tuple[float, float]:
        """The group's lr range: [initial * min_factor, initial * max_factor], its top lowered below any rate
        that diverged (and its bottom below the guard's reduced rate)."""
        init = float(group["initial_lr"])
        hi = min(init * self.max_factor, self.caps.get(i, math.inf))
        lo = min(init * self.min_factor, hi)
        return lo, hi

    def _grad_norm(self) -> float:
        total = 0.0
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total += float(torch.linalg.vector_norm(p.grad.detach().float()) ** 2)
        return math.sqrt(total)

    def _snapshot(self) -> None:
        params = [p.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
        self._good = {"params": params, "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def _diverged(self) -> None:
        self.divergences += 1
        bad = [float(g["lr"]) for g in self.optimizer.param_groups]
        lrs = [lr * self.shrink for lr in bad]
        if self.restore and self._good is not None:
            with torch.no_grad():
                flat = [p for g in self.optimizer.param_groups for p in g["params"]]
                for p, saved in zip(flat, self._good["params"]):
                    p.copy_(saved)
            self.optimizer.load_state_dict(copy.deepcopy(self._good["optimizer"]))
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, lrs)):
            group["lr"] = lr
            self.caps[i] = min(self.caps.get(i, math.inf), lr)  # never again at or near the rate that diverged
        if self.restore:
            self._snapshot()  # the restored state with the smaller rate is the new last good one

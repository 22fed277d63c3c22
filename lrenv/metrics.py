"""One run's record (:class:`Trace`) and the metrics computed from it, shared by the evaluation harness
and the reference solvers (the metric definitions are listed in :mod:`lrenv.evaluate`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Trace:
    """The record of one run (a schedule in the env or an outside solver) on one instance.

    ``loss`` and ``wall`` have one entry per epoch *including* epoch 0 (the initial point); the
    learning-rate arrays have one entry per epoch run (NaN where not applicable).
    """

    method: str
    seed_index: int
    instance: int
    target_loss: float
    loss: np.ndarray
    wall: np.ndarray
    lr_W: np.ndarray
    lr_H: np.ndarray
    bound_W: np.ndarray
    bound_H: np.ndarray
    budget: int
    diverged: bool = False
    reached_target: bool = False
    heldout_mse: float = float("nan")
    extra_loss_evals: int = 0
    divergence_factor: float = 100.0
    notes: dict[str, Any] = field(default_factory=dict)
    fit: np.ndarray | None = None
    """The loss less its regularisation, per epoch like ``loss``; the target is compared with it when the
    family's ``target_metric`` is 'fit' (otherwise None or unused)."""
    target_metric: str = "loss"
    heldout_reference: float = float("nan")
    """The held-out MSE of the generating factors where the family knows it (sales), else NaN."""

    @property
    def target_curve(self) -> np.ndarray:
        """The per-epoch values compared with the target."""
        return self.fit if self.target_metric == "fit" and self.fit is not None else self.loss

    def metrics(self) -> dict[str, Any]:
        """The run's metrics row (see :func:`trace_metrics`)."""
        return trace_metrics(self)



def trace_from_infos(method: str, instance: int, infos: list[dict], wall, *, budget: int, divergence_factor: float,
                     target_metric: str = "loss", heldout_reference: float = float("nan"), seed_index: int = -1,
                     extra_loss_evals: int = 0) -> Trace:
    """The :class:`Trace` of one env episode from its infos: the reset info, then one per step (the last one
    ends the episode); ``wall`` has one entry per info."""
    steps, last = infos[1:], infos[-1]

    def col(key: str, rows: list[dict]) -> np.ndarray:
        return np.array([info[key] for info in rows], dtype=np.float64)

    return Trace(method=method, seed_index=seed_index, instance=int(instance), target_loss=last["target_loss"],
                 loss=col("loss", infos), wall=np.asarray(wall, dtype=np.float64), lr_W=col("lr_W", steps),
                 lr_H=col("lr_H", steps), bound_W=col("bound_W", steps), bound_H=col("bound_H", steps), budget=budget,
                 diverged=bool(last["diverged"]), reached_target=bool(last["reached_target"]),
                 heldout_mse=float(last.get("heldout_mse", math.nan)), extra_loss_evals=int(extra_loss_evals),
                 divergence_factor=divergence_factor, fit=col("fit", infos), target_metric=target_metric,
                 heldout_reference=heldout_reference)


RESULT_COLUMNS = ("method", "seed_index", "instance", "epochs", "reached_target", "diverged", "epochs_to_target",
                  "wall_to_target", "wall_time", "initial_loss", "final_loss", "best_loss", "target_loss",
                  "heldout_mse", "heldout_ratio", "auc_log_loss", "extra_loss_evals", "mean_lr_W", "mean_lr_H", "mean_scale_W",
                  "mean_scale_H")


def auc_log_loss(loss: np.ndarray, budget: int, *, diverged: bool = False, divergence_factor: float = 100.0) -> float:
    """Mean of ``log10(loss_t / loss_0)`` over epochs ``1..budget``: a run that ended early keeps its
    final value for the remaining epochs; non-finite values (and everything after a divergence) count
    as ``log10(divergence_factor)``."""
    loss = np.asarray(loss, dtype=np.float64)
    f0 = loss[0]
    cap = math.log10(divergence_factor)
    with np.errstate(all="ignore"):
        rel = np.log10(loss[1:budget + 1] / f0)
    rel = np.where(np.isfinite(rel), np.minimum(rel, cap), cap)
    if len(rel) == 0:
        return 0.0
    tail = cap if diverged else rel[-1]
    padded = np.concatenate([rel, np.full(budget - len(rel), tail)])
    return float(padded.mean())


def epochs_to_target(loss: np.ndarray, target: float) -> float:
    """First epoch index whose loss is <= ``target`` (0 = the initial point), NaN if none."""
    hit = np.nonzero(np.asarray(loss, dtype=np.float64) <= target)[0]
    return float(hit[0]) if len(hit) else math.nan


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def trace_metrics(tr: Trace) -> dict[str, Any]:
    """One results row from a :class:`Trace`."""
    ett = epochs_to_target(tr.target_curve, tr.target_loss)
    finite = tr.loss[np.isfinite(tr.loss)]
    with np.errstate(all="ignore"):
        sW, sH = tr.lr_W / tr.bound_W, tr.lr_H / tr.bound_H
    return {
        "method": tr.method, "seed_index": tr.seed_index, "instance": tr.instance, "epochs": len(tr.loss) - 1,
        "reached_target": not math.isnan(ett), "diverged": bool(tr.diverged), "epochs_to_target": ett,
        "wall_to_target": float(tr.wall[int(ett)]) if not math.isnan(ett) else math.nan,
        "wall_time": float(tr.wall[-1]), "initial_loss": float(tr.loss[0]), "final_loss": float(tr.loss[-1]),
        "best_loss": float(finite.min()) if len(finite) else math.nan, "target_loss": float(tr.target_loss),
        "heldout_mse": float(tr.heldout_mse), "heldout_ratio": (float(tr.heldout_mse) / tr.heldout_reference
                                                        if tr.heldout_reference > 0 else math.nan),
        "auc_log_loss": auc_log_loss(tr.loss, tr.budget, diverged=tr.diverged, divergence_factor=tr.divergence_factor),
        "extra_loss_evals": int(tr.extra_loss_evals), "mean_lr_W": _nanmean(tr.lr_W), "mean_lr_H": _nanmean(tr.lr_H),
        "mean_scale_W": _nanmean(sW), "mean_scale_H": _nanmean(sH),
    }



"""Figures of an evaluation: loss curves and learning-rate histories (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def pad_curves(curves: list[np.ndarray], length: int | None = None) -> np.ndarray:
    """Stack curves of different lengths, repeating each one's last value (a run that stopped early
    stays where it stopped); shape (runs, length)."""
    curves = [np.asarray(c, dtype=np.float64).reshape(-1) for c in curves if len(c)]
    if not curves:
        return np.zeros((0, length or 0))
    length = length or max(len(c) for c in curves)
    out = np.empty((len(curves), length))
    for i, c in enumerate(curves):
        c = c[:length]
        out[i, :len(c)] = c
        out[i, len(c):] = c[-1]
    return out


def _median_band(ax, x_curves: dict[str, list[np.ndarray]], ylabel: str, title: str) -> None:
    colors = plt.get_cmap("tab20" if len(x_curves) > 10 else "tab10")
    for i, (name, curves) in enumerate(x_curves.items()):
        arr = pad_curves(curves)
        if arr.size == 0:
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (e.g. no lr for a solver)
            arr = np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)
            med = np.nanmedian(arr, axis=0)
            lo, hi = np.nanpercentile(arr, 25, axis=0), np.nanpercentile(arr, 75, axis=0)
        x = np.arange(arr.shape[1])
        color = colors(i % colors.N)
        ax.plot(x, med, label=name, color=color, lw=1.4)
        if arr.shape[0] > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def loss_curve_figure(curves_by_method: dict[str, list[np.ndarray]], *, target: float | None = None,
                      title: str = "training loss (median, 25-75 % across seeds)") -> Figure:
    """Loss against epoch on a log scale: the median over seeds per method, shaded between the
    quartiles; runs that ended early (target or divergence) are extended with their last value."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    _median_band(ax, curves_by_method, "loss", title)
    if target is not None and np.isfinite(target) and target > 0:
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def lr_history_figure(lr_by_method: dict[str, list[np.ndarray]], *, relative: bool = True) -> Figure:
    """Learning rate of W per epoch (median over seeds): as a fraction of the bound 2/L_W when
    ``relative`` (1 = the bound), else absolute."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    label = "lr_W / (2/L_W)" if relative else "lr_W"
    _median_band(ax, lr_by_method, label, f"learning-rate history ({label}, median across seeds)")
    if relative:
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
    return fig


def save_figure(fig: Figure, path: str) -> None:
    """Save atomically (temp file + rename) and close the figure."""
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)

"""Figures of an evaluation: loss curves and learning-rate histories (matplotlib, Agg backend)."""

from __future__ import annotations

import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def pad_curves(curves: list[np.ndarray], length: int | None = None, fill: str = "last") -> np.ndarray:
    """Stack curves of different lengths, repeating each one's last value (``fill='last'``: a run that
    stopped early stays where it stopped) or with NaN (``fill='nan'``); shape (runs, length)."""
    curves = [np.asarray(c, dtype=np.float64).reshape(-1) for c in curves if len(c)]
    if not curves:
        return np.zeros((0, length or 0))
    length = length or max(len(c) for c in curves)
    out = np.empty((len(curves), length))
    for i, c in enumerate(curves):
        c = c[:length]
        out[i, :len(c)] = c
        out[i, len(c):] = c[-1] if fill == "last" else np.nan
    return out


_STYLES = ("-", "--", ":", "-.")


def _median_band(ax, x_curves: dict[str, list[np.ndarray]], ylabel: str, title: str,
                 ymax: float | None = None, fill: str = "last", valid: tuple[float, float] | None = None) -> None:
    """Median and quartile band per method; all curves padded to the longest one. Values above
    ``ymax`` (diverged runs) are drawn at ``ymax``."""
    colors = plt.get_cmap("tab10")
    length = max((len(c) for cs in x_curves.values() for c in cs), default=0)
    for i, (name, curves) in enumerate(x_curves.items()):
        arr = pad_curves(curves, length, fill)
        if valid is not None:
            arr = np.where((arr >= valid[0]) & (arr <= valid[1]), arr, np.nan)
        if arr.size == 0 or not np.isfinite(arr).any():
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (e.g. no lr for a solver)
            if ymax is not None:
                arr = np.where(np.isnan(arr) | (arr > ymax), ymax, arr)
            arr = np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)
            med = np.nanmedian(arr, axis=0)
            lo, hi = np.nanpercentile(arr, 25, axis=0), np.nanpercentile(arr, 75, axis=0)
        x = np.arange(arr.shape[1])
        color = colors(i % 10)
        ax.plot(x, med, label=name, color=color, lw=1.4, ls=_STYLES[(i // 10) % len(_STYLES)])
        if arr.shape[0] > 1:
            ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)


def loss_curve_figure(curves_by_method: dict[str, list[np.ndarray]], *, target: float | None = None,
                      title: str = "training loss (median, 25-75 % across seeds)", cap: float = 10.0) -> Figure:
    """Loss against epoch on a log scale: the median over seeds per method, shaded between the
    quartiles; runs that ended early (target or divergence) are extended with their last value, and
    losses above ``cap`` times the largest initial loss (diverged runs) are drawn at that level."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    starts = [float(c[0]) for cs in curves_by_method.values() for c in cs if len(c) and np.isfinite(c[0])]
    ymax = cap * max(starts) if starts else None
    _median_band(ax, curves_by_method, "loss", title + (f"; diverged runs drawn at {cap:g}x the initial loss"
                                                         if ymax else ""), ymax=ymax)
    if target is not None and np.isfinite(target) and target > 0:
        ax.axhline(target, color="k", ls="--", lw=0.8, label="target")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def lr_history_figure(lr_by_method: dict[str, list[np.ndarray]], *, relative: bool = True) -> Figure:
    """Learning rate of W per epoch (median over the seeds still running): as a fraction of the bound
    2/L_W when ``relative`` (1 = the bound), else absolute. Epochs where the bound itself blew up
    (a diverging run) are left out."""
    fig, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    label = "lr_W / (2/L_W)" if relative else "lr_W"
    _median_band(ax, lr_by_method, label, f"learning-rate history ({label}, median across seeds)", fill="nan",
                 valid=(1e-8, 1e8) if relative else None)
    if relative:
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
    return fig


def save_figure(fig: Figure, path: str) -> None:
    """Save atomically (temp file + rename) and close the figure."""
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)

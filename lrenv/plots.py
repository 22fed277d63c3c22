"""Figures of an evaluation, readable at a glance (matplotlib, Agg backend).

- One fixed colour per method, the same in every figure (:func:`method_color`); learned policies are drawn
  bold, on top, in strong colours no baseline uses.
- A short default set of methods (:func:`default_methods`: the best fixed schedule, the tuned baselines,
  Armijo, Adam, the best reference solver, the policies); the full sweep has its own figure.
- Loss relative to each run's target on a log scale (1 = target); a diverged run's line stops where it
  diverged and ends in a cross at the top of the axes, instead of a band that squashes the interesting range.
- Both factors' step sizes relative to their bound, with the bound (1) and the stability cliff (0.55).
- Legends outside the axes and ``layout="constrained"``: nothing clipped.

Entry point: :func:`evaluation_figures` (``{name: Figure}`` from an evaluation's traces).
"""

from __future__ import annotations

import os
import warnings
import zlib
from typing import Callable, Iterable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CLIFF_SCALE = 0.55
"""Step / (2/L) above which minibatch SGD starts to diverge (SPEC §5; same value as lrenv.env.CLIFF_SCALE)."""
LEARNED_COLOR = "#d62728"
"""The first learned policy's colour (strong red); further policies take the next of :data:`POLICY_COLORS`."""
POLICY_COLORS = ("#d62728", "#000000", "#e377c2", "#8c2d04")
BASELINE_COLORS = {
    "armijo": "#1f77b4", "adam": "#ff7f0e", "sklearn-cd": "#2ca02c", "sklearn-mu": "#98df8a", "lm": "#8c564b",
    "polyak": "#bcbd22", "bb": "#7f7f7f", "cosine": "#17becf", "two-phase": "#9467bd", "random-bound": "#c7c7c7",
    "random-walk": "#dbdb8d",
}
"""Fixed colours of the named baselines (policies' reds and black are not among them)."""
_SWEEP = plt.get_cmap("bone_r")


def is_policy(name: str) -> bool:
    return name.startswith(("policy", "learned", "ppo"))


def method_color(name: str, policies: Sequence[str] = ()) -> str | tuple:
    """The colour of ``name`` in every figure: policies in order of ``policies`` (red first), named baselines
    from :data:`BASELINE_COLORS`, fixed schedules along viridis by their value (``fixed c=1.1`` and
    ``fixed lr=1e-03``, drawn dashed), anything else by a stable hash."""
    if is_policy(name) or name in policies:
        i = list(policies).index(name) if name in policies else zlib.crc32(name.encode()) % len(POLICY_COLORS)
        return POLICY_COLORS[i % len(POLICY_COLORS)]
    base = name.split("#")[0].split(" (")[0]
    if base in BASELINE_COLORS:
        return BASELINE_COLORS[base]
    if "c=" in base:  # c from 0.1 to 2: light to dark grey-blue (no named baseline or policy uses these)
        try:
            c = float(base.split("c=")[1])
            return _SWEEP(0.3 + 0.6 * float(np.clip(np.log10(c / 0.1) / np.log10(20), 0, 1)))
        except ValueError:
            pass
    if "lr=" in base:  # 1e-5 ... 10: light to dark grey
        try:
            lr = float(base.split("lr=")[1])
            return plt.get_cmap("Greys")(0.3 + 0.6 * float(np.clip((np.log10(lr) + 5) / 6, 0, 1)))
        except ValueError:
            pass
    return plt.get_cmap("tab20")(zlib.crc32(base.encode()) % 20)


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


# ----------------------------------------------------------------------------- choosing methods
def _epochs_failures_at_budget(traces) -> float:
    """Mean epochs to target over runs, a failure counted at the budget (lower is better)."""
    out = []
    for t in traces:
        hit = np.flatnonzero(np.asarray(getattr(t, "target_curve", t.loss)) <= t.target_loss)
        out.append(float(hit[0]) if len(hit) and not t.diverged else float(t.budget))
    return float(np.mean(out)) if out else np.inf


def _final_ratio(traces) -> float:
    r = [np.nanmin(np.where(np.isfinite(t.loss), t.loss, np.nan)) / t.target_loss for t in traces]
    return float(np.nanmedian(r)) if r else np.inf


def rank_key(traces) -> tuple[float, float]:
    return _epochs_failures_at_budget(traces), _final_ratio(traces)


def default_methods(traces: dict[str, list]) -> list[str]:
    """The short set: the best fixed schedule (``fixed c=`` or ``fixed lr=``), the tuned baselines
    (cosine, two-phase), Armijo, Adam, the best reference solver (sklearn-cd, sklearn-mu, lm) and every
    policy; in that order, policies last (drawn on top)."""
    names = list(traces)
    fixed = [n for n in names if n.startswith("fixed ")]
    solvers = [n for n in names if n.split("#")[0] in ("sklearn-cd", "sklearn-mu", "lm")]
    chosen = []
    if fixed:
        chosen.append(min(fixed, key=lambda n: rank_key(traces[n])))
    chosen += [n for n in names if n.split("#")[0] in ("cosine", "two-phase", "armijo", "adam")]
    if solvers:
        chosen.append(min(solvers, key=lambda n: rank_key(traces[n])))
    chosen += [n for n in names if is_policy(n)]
    return chosen


# ----------------------------------------------------------------------------- drawing
def _style(name: str, policies: Sequence[str]) -> dict:
    if is_policy(name) or name in policies:
        return dict(color=method_color(name, policies), lw=2.6, zorder=10, alpha=1.0)
    return dict(color=method_color(name, policies), lw=1.4 if name.startswith("fixed ") else 1.3, zorder=3, alpha=0.9,
                ls="--" if name.startswith("fixed ") else "-")


def _until_divergence(curves: list[np.ndarray], runs: Sequence) -> tuple[list[np.ndarray], np.ndarray]:
    """Curves of runs as a (runs, epochs) array for plotting: a run that stopped keeps its last value, a diverged run
    loses its last point (the blow-up) and is NaN from there on, and non-positive or non-finite values are NaN.
    Also returns each run's curve without the blow-up (to mark where it diverged)."""
    alive = [c[:-1] if t.diverged else c for c, t in zip(curves, runs)]
    arr = pad_curves(alive, max(len(c) for c in curves), "last")
    for i, t in enumerate(runs):
        if t.diverged:
            arr[i, len(alive[i]):] = np.nan
    with np.errstate(all="ignore"):
        return alive, np.where(np.isfinite(arr) & (arr > 0), arr, np.nan)


def _draw_loss(ax, traces: dict[str, list], methods: Iterable[str], policies: Sequence[str], *, label_best: str | None,
               top: float) -> None:
    """Median over seeds of loss / target per method (runs that stopped keep their last value; a diverged
    run is dropped from the median from the epoch it diverged and marked with a cross at ``top``)."""
    for name in methods:
        runs = traces[name]
        style = _style(name, policies)
        alive, arr = _until_divergence([np.asarray(t.loss, dtype=float) / t.target_loss for t in runs], runs)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(arr, axis=0)
        n_div = sum(t.diverged for t in runs)
        label = name + (" (best fixed)" if name == label_best else "") + (f"  [{n_div}/{len(runs)} diverged]" if n_div else "")
        ax.plot(np.arange(arr.shape[1]), np.minimum(med, top), label=label, **style)
        div_at = [len(a) for a, t in zip(alive, runs) if t.diverged]
        if div_at:
            ax.plot(div_at, [top] * len(div_at), "x", color=style["color"], ms=7, mew=2, zorder=style["zorder"],
                    clip_on=False)


def _best_fixed(traces: dict[str, list]) -> str | None:
    fixed = [n for n in traces if n.startswith("fixed ")]
    return min(fixed, key=lambda n: rank_key(traces[n])) if fixed else None


def _draw_scale(ax, traces: dict[str, list], methods: Iterable[str], policies: Sequence[str], factor: str) -> None:
    best = _best_fixed(traces)
    for name in methods:
        runs = traces[name]
        with np.errstate(all="ignore"):
            curves = [np.asarray(getattr(t, f"lr_{factor}")) / np.asarray(getattr(t, f"bound_{factor}")) for t in runs]
        arr = pad_curves(curves, fill="nan")
        arr = np.where(np.isfinite(arr) & (arr > 1e-8) & (arr < 1e8), arr, np.nan)
        if arr.size == 0 or not np.isfinite(arr).any():
            continue  # solvers: no step size relative to the bound
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(arr, axis=0)
        ax.plot(np.arange(1, len(med) + 1), med, label=name + (" (best fixed)" if name == best else ""),
                **_style(name, policies))
    ax.axhline(1.0, color="k", ls="--", lw=0.9, label="bound 2/L")
    ax.axhline(CLIFF_SCALE, color="r", ls=":", lw=1.0, label=f"stability cliff {CLIFF_SCALE} x 2/L")
    ax.set(yscale="log", xlabel="epoch", ylabel=f"lr_{factor} / (2/L_{factor})", title=f"step size of {factor}")
    ax.grid(True, which="major", alpha=0.25)


def _loss_axes(ax, traces, methods, policies, title, label_best) -> None:
    top = 1e3
    _draw_loss(ax, traces, methods, policies, label_best=label_best, top=top)
    ax.axhline(1.0, color="k", ls="--", lw=0.9, label="target")
    ax.set(yscale="log", xlabel="epoch", ylabel="loss / target (median over seeds)", title=title)
    lo = min([np.nanmin([np.nanmin(np.asarray(t.loss, float) / t.target_loss) for t in traces[m]]) for m in methods]
             + [0.5])
    ax.set_ylim(max(lo * 0.7, 1e-6), top * 1.6)
    ax.grid(True, which="major", alpha=0.25)


def loss_figure(traces: dict[str, list], methods: Sequence[str] | None = None, title: str | None = None,
                learned: Sequence[str] = ()) -> Figure:
    """Loss / target against epoch for ``methods`` (default: :func:`default_methods`); ``learned`` names more
    methods to draw as learned policies (bold, in the policies' colours), e.g. a benchmark's agents."""
    methods = _ordered(traces, methods)
    policies = [m for m in methods if is_policy(m) or m in learned]
    fixed = [n for n in traces if n.startswith("fixed ")]
    best = min(fixed, key=lambda n: rank_key(traces[n])) if fixed else None
    fig, ax = plt.subplots(figsize=(10, 5.5), layout="constrained")
    _loss_axes(ax, traces, methods, policies, title or "loss relative to the target (x: diverged, median over the "
               "seeds still running)", best)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def lr_figure(traces: dict[str, list], methods: Sequence[str] | None = None) -> Figure:
    """Both factors' step size relative to its bound, median over seeds, with bound and cliff lines."""
    methods = _ordered(traces, methods)
    policies = [m for m in methods if is_policy(m)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), layout="constrained", sharey=True)
    for ax, factor in zip(axes, "WH"):
        _draw_scale(ax, traces, methods, policies, factor)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper", frameon=False)
    fig.suptitle("learning-rate history relative to the bound (median over seeds)")
    return fig


def sweep_figure(traces: dict[str, list]) -> Figure:
    """Every method: the loss figure for the full set (its own figure, not the default one)."""
    methods = _ordered(traces, list(traces))
    fig, ax = plt.subplots(figsize=(12, 7), layout="constrained")
    fixed = [n for n in traces if n.startswith("fixed ")]
    best = min(fixed, key=lambda n: rank_key(traces[n])) if fixed else None
    _loss_axes(ax, traces, methods, [m for m in methods if is_policy(m)], "every method: loss relative to the target "
               "(x: diverged)", best)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, ncol=2)
    return fig


def _ordered(traces: dict[str, list], methods: Sequence[str] | None) -> list[str]:
    """Known methods, policies last (drawn on top)."""
    methods = default_methods(traces) if methods is None else [m for m in methods if m in traces]
    return [m for m in methods if not is_policy(m)] + [m for m in methods if is_policy(m)]


EVALUATION_FIGURES: dict[str, Callable[[dict[str, list]], Figure]] = {
    "loss_curves": loss_figure, "lr_history": lr_figure, "loss_curves_all": sweep_figure}
"""The figures of an evaluation by name: ``loss_curves`` and ``lr_history`` (the short default set of methods)
and ``loss_curves_all`` (every method)."""


def evaluation_figures(traces: dict[str, list]) -> dict[str, Figure]:
    """The figures of an evaluation (:data:`EVALUATION_FIGURES`) drawn from its traces."""
    return {name: make(traces) for name, make in EVALUATION_FIGURES.items()}


def save_figure(fig: Figure, path: str) -> np.ndarray:
    """Save atomically (temp file + rename) and close the figure; returns the image written, (height, width, 3)
    uint8, so that TensorBoard can log it without drawing the figure again (a figure's layout is the slow part)."""
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=120)
    image = (plt.imread(tmp)[:, :, :3] * 255).round().astype(np.uint8)
    os.replace(tmp, path)
    plt.close(fig)
    return image


# ----------------------------------------------------------------------------- the paper's Fig. 1
def paper_loss_figure(traces: dict[str, list], methods: Sequence[str] | None = None, title: str | None = None,
                      figsize: tuple[float, float] = (8.0, 4.6), colors: dict[str, str] | None = None) -> Figure:
    """Loss against epoch like the paper's Fig. 1: absolute loss on a log axis, one line per method (every
    method by default), the mean over instances of log10 loss (a geometric mean) with a band from the lowest
    to the highest instance, and the target as a horizontal line (the mean of the instances' targets, which
    differ by a few percent). A run that reached the target stops there (the episode ends) and keeps its last
    value; a diverged run is dropped from the epoch it diverged and marked with a cross at its last finite loss.
    ``colors``: method name -> colour, overriding :func:`method_color` (e.g. to tell two fixed schedules apart)."""
    methods = _ordered(traces, list(traces) if methods is None else methods)
    policies = [m for m in methods if is_policy(m)]
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    ymax = 0.0
    for name in methods:
        runs = traces[name]
        style = _style(name, policies)
        if colors and name in colors:
            style["color"] = colors[name]
        alive, arr = _until_divergence([np.asarray(t.loss, dtype=float) for t in runs], runs)
        length = arr.shape[1]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            logs = np.log10(arr)
            mean, lo, hi = (10 ** np.nanmean(logs, axis=0), 10 ** np.nanmin(logs, axis=0),
                            10 ** np.nanmax(logs, axis=0))
        x = np.arange(length)
        n_div = sum(t.diverged for t in runs)
        label = name + (f"  [{n_div}/{len(runs)} diverged]" if n_div else "")
        ax.plot(x, mean, label=label, **style)
        ax.fill_between(x, lo, hi, color=style["color"], alpha=0.15, lw=0, zorder=style["zorder"] - 1)
        for a, t in zip(alive, runs):
            if t.diverged and len(a):
                ax.plot(len(a) - 1, a[-1], "x", color=style["color"], ms=8, mew=2, zorder=style["zorder"] + 1)
        if np.isfinite(hi).any():
            ymax = max(ymax, float(np.nanmax(hi)))
    targets = [t.target_loss for m in methods for t in traces[m]]
    if targets:
        ax.axhline(float(np.mean(targets)), color="k", ls="--", lw=1.0, label="target")
    ax.set(yscale="log", xlabel="epoch", ylabel="loss ½‖V − WH‖²")
    ax.set_title(title or "loss vs epoch (mean of log10 loss over instances; band: min–max)", fontsize=10)
    if ymax > 0 and targets:
        ax.set_ylim(min(targets) * 0.5, ymax * 2.0)
    ax.grid(True, which="major", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right", frameon=False)
    return fig

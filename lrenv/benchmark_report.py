"""Aggregate a benchmark's finished trials with rliable: normalised scores, IQM with stratified bootstrap CIs,
probability of improvement, performance profiles; ``report.md``, ``report.json``, PNG figures and one
TensorBoard HParams view (one row per trial).

Scores (lower is better), per method and test instance:

``epochs``      epochs to target / the best fixed-c schedule's on the same instance. A line search's extra loss
                evaluations (Armijo's trial steps, ``extra_loss_evals``) count as epochs, one each: the work a
                method spends beyond one epoch per step is not free. A run that misses the target counts
                ``penalty x budget`` epochs (and at least 1 epoch, so a start below the target is not 0/0).
``final_loss``  final loss / the best fixed-c schedule's final loss on the same instance; a diverged or
                non-finite run counts ``DIVERGED_LOSS x`` its initial loss.

"Best fixed-c" is, per family and score, the fixed ``c/L`` schedule (``fixed c=...``, ``tuned:fixed-c``) with the
best mean (epochs) or geometric mean (final loss) on the same instances among those the suite evaluated -- picked
on the test instances themselves, so it flatters the normaliser, never the agent. Its score is 1 by construction.

Each method's scores form a runs x tasks matrix (rliable's layout): rows are training seeds for agents and a single
row for baselines (deterministic given the instance), columns are family x instance. The statistics are rliable's
(:func:`rliable.library.get_interval_estimates`, :mod:`rliable.metrics`); nothing here re-implements them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any, Sequence

import numpy as np

FIXED_C = re.compile(r"^(tuned:)?fixed[ -]c\b")
"""Method names of fixed ``c/L`` schedules, the normaliser's candidates."""
BEST_FIXED = "best fixed-c"
DIVERGED_LOSS = 100.0
"""A diverged run's final loss counts as this many times its initial loss (NMFEnv's divergence factor)."""
SCORES = ("epochs", "final_loss")
TAUS = np.round(np.linspace(0.25, 3.0, 56), 4)
"""Performance-profile thresholds: the fraction of runs with normalised epochs <= tau."""


# ----------------------------------------------------------------------------- rliable
def import_rliable() -> tuple[Any, Any]:
    """``rliable.library`` and ``rliable.metrics``.

    rliable pins ``arch<8``, and arch 7's package ``__init__`` fails to import under pandas >= 3 (it calls pandas'
    private ``deprecate_kwarg`` with an old signature, in ``arch.univariate``). rliable only needs
    ``arch.bootstrap``, which imports fine on its own: when the normal import fails that way, ``arch`` is
    registered as a bare namespace over the same files so that ``arch.bootstrap`` loads without ``arch.univariate``.
    """
    try:
        return importlib.import_module("rliable.library"), importlib.import_module("rliable.metrics")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"lrenv benchmark aggregates with rliable, which is not installed ({e}); "
                                  'install it with: pip install "lrenv[benchmark]"') from e
    except TypeError as e:
        if "deprecate_kwarg" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "arch" or m.startswith(("arch.", "rliable"))]:
        del sys.modules[name]
    spec = importlib.util.find_spec("arch")
    assert spec is not None and spec.submodule_search_locations is not None
    pkg = types.ModuleType("arch")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__file__ = spec.origin
    sys.modules["arch"] = pkg
    return importlib.import_module("rliable.library"), importlib.import_module("rliable.metrics")


# ----------------------------------------------------------------------------- scores
def epochs_value(row: dict, budget: int, penalty: float) -> float:
    """Epochs to target of one run plus its extra loss evaluations (one epoch each), ``penalty x budget`` when
    missed, at least 1."""
    ett = row["epochs_to_target"]
    reached = bool(row["reached_target"]) and isinstance(ett, (int, float)) and math.isfinite(ett)
    extra = float(row.get("extra_loss_evals") or 0.0)
    return max(float(ett) + extra if reached else penalty * budget, 1.0)


def final_loss_value(row: dict) -> float:
    """Final loss of one run; a diverged or non-finite one counts DIVERGED_LOSS x its initial loss."""
    f = float(row["final_loss"])
    if row["diverged"] or not math.isfinite(f):
        return DIVERGED_LOSS * float(row["initial_loss"])
    return max(f, 1e-300)


def _values(rows: list[dict], budget: int, penalty: float) -> dict[str, dict[int, float]]:
    return {"epochs": {r["seed_index"]: epochs_value(r, budget, penalty) for r in rows},
            "final_loss": {r["seed_index"]: final_loss_value(r) for r in rows}}


def pick_normaliser(family_rows: list[dict], budget: int, penalty: float) -> dict[str, str]:
    """Per score, the fixed-c method with the best mean (epochs) / geometric mean (final loss) in one family."""
    by: dict[str, list[dict]] = {}
    for r in family_rows:
        if r["run"] == 0 and r["kind"] == "baseline" and FIXED_C.match(r["label"]):
            by.setdefault(r["label"], []).append(r)
    if not by:
        raise ValueError(f"family {family_rows[0]['family'] if family_rows else '?'}: no fixed-c baseline finished, "
                         "and scores are normalised by the best fixed c/L schedule; add fixed-scale (or fixed-c=C, "
                         "tuned:fixed-c) to the suite's baselines")
    n = max(len(v) for v in by.values())
    full = {k: v for k, v in by.items() if len(v) == n}  # compare on the same instances only
    mean_epochs = {k: np.mean(list(_values(v, budget, penalty)["epochs"].values())) for k, v in full.items()}
    mean_log = {k: np.mean(np.log(list(_values(v, budget, penalty)["final_loss"].values()))) for k, v in full.items()}
    return {"epochs": min(mean_epochs, key=mean_epochs.get), "final_loss": min(mean_log, key=mean_log.get)}


def score_matrices(rows: list[dict], families: list[dict], penalty: float) -> dict[str, Any]:
    """Runs x tasks matrices of both scores for every method.

    ``rows``: results rows tagged with ``family``, ``label`` (method), ``kind`` (agent/baseline), ``run``
    (training seed for agents, 0 for baselines). ``families``: ``{"label", "budget"}`` in report order.
    Returns ``{"tasks": [(family, seed_index)], "normaliser": {family: {score: method}}, "matrices": {score:
    {method: array}}, "kinds": {method: kind}, "runs": {method: [run ids]}}``; missing entries are NaN."""
    tasks: list[tuple[str, int]] = []
    normaliser: dict[str, dict[str, str]] = {}
    norm_values: dict[str, dict[str, dict[int, float]]] = {}
    for fam in families:
        frows = [r for r in rows if r["family"] == fam["label"]]
        if not frows:
            continue
        normaliser[fam["label"]] = pick_normaliser(frows, fam["budget"], penalty)
        for score in SCORES:
            nrows = [r for r in frows if r["label"] == normaliser[fam["label"]][score] and r["kind"] == "baseline"]
            norm_values.setdefault(fam["label"], {})[score] = _values(nrows, fam["budget"], penalty)[score]
        tasks += [(fam["label"], i) for i in sorted(norm_values[fam["label"]]["epochs"])]
    col = {t: j for j, t in enumerate(tasks)}
    budgets = {f["label"]: f["budget"] for f in families}
    kinds: dict[str, str] = {}
    runs: dict[str, list[int]] = {}
    for r in rows:
        kinds.setdefault(r["label"], r["kind"])
        if r["run"] not in runs.setdefault(r["label"], []):
            runs[r["label"]].append(r["run"])
    matrices: dict[str, dict[str, np.ndarray]] = {s: {} for s in SCORES}
    for label in kinds:
        runs[label].sort()
        for s in SCORES:
            matrices[s][label] = np.full((len(runs[label]), len(tasks)), np.nan)
    for r in rows:
        key = (r["family"], r["seed_index"])
        if key not in col:
            continue
        v = _values([r], budgets[r["family"]], penalty)
        for s in SCORES:
            matrices[s][r["label"]][runs[r["label"]].index(r["run"]), col[key]] = \
                v[s][r["seed_index"]] / norm_values[r["family"]][s][r["seed_index"]]
    for s in SCORES:
        matrices[s][BEST_FIXED] = np.ones((1, len(tasks)))
    kinds[BEST_FIXED], runs[BEST_FIXED] = "baseline", [0]
    return {"tasks": tasks, "normaliser": normaliser, "matrices": matrices, "kinds": kinds, "runs": runs}


def complete_rows(m: np.ndarray) -> np.ndarray:
    """The rows (runs) with a score on every task: rliable's matrices have no holes."""
    return m[np.isfinite(m).all(axis=1)]


# ----------------------------------------------------------------------------- statistics (rliable)
@contextlib.contextmanager
def _seeded_rliable(seed: int):
    """Seed numpy's *global* generator for an rliable call and restore it afterwards: rliable's stratified bootstraps
    draw their indices from it (``np.random.choice`` in ``_get_indices``), not from the ``random_state`` they are
    given, so the same data and seed give the same CIs only this way. Also silences arch's notice that RandomState
    is deprecated."""
    import warnings
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        np.random.set_state(state)


def _bootstrap(rly: Any, data: dict, func: Any, reps: int, seed: int) -> tuple[dict, dict]:
    """rliable's stratified bootstrap, seeded (:func:`_seeded_rliable`)."""
    with _seeded_rliable(seed):
        return rly.get_interval_estimates(data, func, reps=reps, random_state=np.random.RandomState(seed))


def iqm_with_ci(matrices: dict[str, np.ndarray], *, reps: int = 2000, seed: int = 0) -> dict[str, dict]:
    """IQM and its stratified-bootstrap 95 % CI per method (methods with no complete run are left out).

    A single-run matrix (a deterministic baseline) has nothing to resample: its CI is its IQM, computed with
    rliable's ``aggregate_iqm`` without the bootstrap's ``reps`` evaluations. Each method is resampled with its own
    generator seeded by ``seed``, so a method's CI is the same whichever methods share the report."""
    rly, metrics = import_rliable()
    data = {k: complete_rows(v) for k, v in matrices.items()}
    data = {k: v for k, v in data.items() if v.size}
    many = {k: v for k, v in data.items() if v.shape[0] > 1}
    point, ci = {}, {}
    for k, v in many.items():  # one seeded draw per method: its CI does not depend on the others or their order
        p_k, ci_k = _bootstrap(rly, {k: v}, lambda x: np.array([metrics.aggregate_iqm(x)]), reps, seed)
        point[k], ci[k] = p_k[k], ci_k[k]
    out = {}
    for k, v in data.items():
        if k in many:
            p, lo, hi = float(point[k][0]), float(ci[k][0, 0]), float(ci[k][1, 0])
        else:
            p = lo = hi = float(metrics.aggregate_iqm(v))
        out[k] = {"iqm": p, "ci95": [lo, hi], "runs": int(v.shape[0]), "tasks": int(v.shape[1])}
    return out


def probability_of_improvement(agent: np.ndarray, baseline: np.ndarray, *, reps: int | None = 1000,
                               seed: int = 0) -> dict[str, Any]:
    """P(agent's score < baseline's) averaged over tasks (ties count 1/2), with a bootstrap CI unless ``reps`` is
    None. Lower is better here, so rliable's P(X > Y) is applied to the negated scores."""
    rly, metrics = import_rliable()
    x, y = complete_rows(agent), complete_rows(baseline)
    if not (x.size and y.size):
        return {"poi": math.nan, "ci95": [math.nan, math.nan]}
    if reps is None or (x.shape[0] == 1 and y.shape[0] == 1):  # nothing to resample: the CI is the point
        p = float(metrics.probability_of_improvement(-x, -y))
        return {"poi": p, "ci95": [math.nan, math.nan] if reps is None else [p, p]}
    point, ci = _bootstrap(rly, {"p": (-x, -y)}, metrics.probability_of_improvement, reps, seed)
    lo, hi = (float(np.ravel(ci["p"][i])[0]) for i in (0, 1))
    return {"poi": float(np.ravel(point["p"])[0]), "ci95": [lo, hi]}


def per_task(mats: dict[str, np.ndarray], tasks: list[tuple[str, int]], agent: str, baseline: str) -> list[dict]:
    """Where an agent wins and loses against one baseline, task by task: the agent's median, lowest and highest
    score over its training seeds, the baseline's score (the median of its runs) and the per-task probability of
    improvement (ties 1/2). The aggregate probability of improvement is the mean of the ``poi`` column."""
    x, y = complete_rows(mats[agent]), complete_rows(mats[baseline])
    if not (x.size and y.size):
        return []
    less = (x[:, None, :] < y[None, :, :]).mean(axis=(0, 1))
    ties = (x[:, None, :] == y[None, :, :]).mean(axis=(0, 1))
    return [{"family": f, "instance": int(i), "agent_median": float(np.median(x[:, j])),
             "agent_min": float(x[:, j].min()), "agent_max": float(x[:, j].max()),
             "baseline": float(np.median(y[:, j])), "poi": float(less[j] + 0.5 * ties[j])}
            for j, (f, i) in enumerate(tasks)]


def performance_profiles(matrices: dict[str, np.ndarray], *, taus: np.ndarray = TAUS, reps: int = 1000,
                         seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fraction of runs (all tasks) with normalised score <= tau, with stratified-bootstrap CIs (rliable)."""
    rly, _ = import_rliable()
    data = {k: complete_rows(v) for k, v in matrices.items()}
    data = {k: v for k, v in data.items() if v.size}
    with _seeded_rliable(seed):
        return rly.create_performance_profile(
            data, taus, custom_profile_func=lambda s, t: np.array([np.mean(s <= tau) for tau in t]), reps=reps)


# ----------------------------------------------------------------------------- loading trials
def _read_rows(trial_dir: Path) -> tuple[list[dict], dict]:
    from lrenv.evaluate import read_results_csv
    rows = read_results_csv(str(trial_dir / "eval" / "results.csv"))
    config = json.loads((trial_dir / "eval" / "config.json").read_text())
    return rows, config


def load_rows(out_dir: Path, records: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """Every finished evaluation trial's results rows, tagged; and the budget each family was run with."""
    rows: list[dict] = []
    budgets: dict[str, int] = {}
    for rec in records:
        if rec["status"] != "done" or rec["kind"] == "train":
            continue
        trs, config = _read_rows(out_dir / rec["path"])
        budgets[rec["family"]] = int(config["budget"])
        for r in trs:
            label = rec["method"] if rec["kind"] == "agent" else r["method"]
            rows.append({**r, "family": rec["family"], "label": label, "kind": rec["kind"],
                         "run": rec["seed"] if rec["kind"] == "agent" else 0, "trial": rec["id"]})
    return rows, budgets


def load_curves(out_dir: Path, rec: dict) -> dict[str, list[np.ndarray]]:
    path = out_dir / rec["path"] / "curves.npz"
    out: dict[str, list[np.ndarray]] = {}
    if path.is_file():
        with np.load(path) as z:
            for key in sorted(z.files, key=lambda k: (k.rsplit("::", 1)[0], int(k.rsplit("::", 1)[1]))):
                out.setdefault(key.rsplit("::", 1)[0], []).append(z[key])
    return out


# ----------------------------------------------------------------------------- outputs
def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clean(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, np.generic):
        return _clean(o.item())
    return o


def _fmt_ratio(x: float) -> str:
    """A normalised score: three decimals, or three significant digits below 0.01 / above 1e4 (final-loss ratios
    on an out-of-reach target span decades: 5.4e-05 must not read 0.000)."""
    return f"{x:.3f}" if x == 0 or 1e-2 <= abs(x) < 1e4 else f"{x:.3g}"


def _fmt_ci(d: dict | None) -> str:
    if not d or d.get("iqm") is None or not math.isfinite(d["iqm"]):
        return "–"
    lo, hi = d["ci95"]
    return f"{_fmt_ratio(d['iqm'])} [{_fmt_ratio(lo)}, {_fmt_ratio(hi)}]"


def _figures(out_dir: Path, main: list[str], iqm: dict, per_family: dict, families: list[str],
             profiles: tuple[dict, dict], curves: dict[str, dict[str, list[np.ndarray]]],
             targets: dict[str, float], agents: Sequence[str] = ()) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    from types import SimpleNamespace

    from lrenv.plots import loss_figure, save_figure
    written = []
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(exist_ok=True)
    colors = dict(zip(main, plt.get_cmap("tab10")(np.arange(len(main)) % 10)))

    prof, prof_ci = profiles
    names = [m for m in main if m in prof]
    if names:
        fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
        plot_utils.plot_performance_profiles({m: prof[m] for m in names}, TAUS,
                                             performance_profile_cis={m: prof_ci[m] for m in names}, ax=ax,
                                             colors=colors, xlabel=r"epochs to target / best fixed-c ($\tau$)",
                                             ylabel=r"fraction of runs with score $\leq \tau$")
        ax.legend(fontsize=8, frameon=False)
        ax.set_title("performance profile (all families; 95 % stratified bootstrap CIs)")
        save_figure(fig, str(fig_dir / "performance_profile.png"))
        written.append("figures/performance_profile.png")

    cols = [*families, "overall"]
    algs = [m for m in main if all(m in (per_family.get(f, {}) if f != "overall" else iqm) for f in cols)]
    if algs:
        point = {m: np.array([(per_family[f] if f != "overall" else iqm)[m]["iqm"] for f in cols]) for m in algs}
        ci = {m: np.array([(per_family[f] if f != "overall" else iqm)[m]["ci95"] for f in cols]).T for m in algs}
        fig, _ = plot_utils.plot_interval_estimates(point, ci, cols, algorithms=algs, colors=colors,
                                                    xlabel="IQM of epochs to target / best fixed-c (lower is better)",
                                                    xlabel_y_coordinate=-0.25, subfigure_width=3.0, row_height=0.5)
        fig.savefig(fig_dir / ".iqm.tmp.png", dpi=110, bbox_inches="tight")
        os.replace(fig_dir / ".iqm.tmp.png", fig_dir / "iqm_per_family.png")
        plt.close(fig)
        written.append("figures/iqm_per_family.png")

    for fam, by_method in curves.items():
        if by_method:
            target = targets.get(fam) or 1.0
            runs = {m: [SimpleNamespace(loss=np.asarray(c, dtype=float), target_loss=target, budget=len(c) - 1,
                                        diverged=not np.isfinite(c[-1])) for c in cs] for m, cs in by_method.items()}
            fig = loss_figure(runs, methods=list(runs), title=f"{fam}: loss / target (median over runs)",
                              learned=agents)
            save_figure(fig, str(fig_dir / f"loss_curves_{fam}.png"))
            written.append(f"figures/loss_curves_{fam}.png")
    return written


def _tensorboard(out_dir: Path, records: list[dict], trial_scores: dict[str, dict]) -> None:
    """One HParams row per trial (same keys for every row so the table has one column per key)."""
    from torch.utils.tensorboard import SummaryWriter
    tmp = out_dir / ".tb.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    writer = SummaryWriter(str(tmp))
    for rec in records:
        spec = rec.get("spec", {})
        timesteps = rec.get("timesteps", 0) if rec["kind"] == "train" else 0
        hparams = {"trial": rec["id"], "kind": rec["kind"], "family": rec["family"], "method": rec["method"],
                   "seed": -1 if rec.get("seed") is None else int(rec["seed"]), "status": rec["status"],
                   "timesteps": int(timesteps or 0), "test_instances": int(spec.get("test_instances", 0) or 0)}
        sc = trial_scores.get(rec["id"], {})
        metrics = {"trial/wall_s": float(rec.get("wall_s", math.nan)), "trial/cpu_s": float(rec.get("cpu_s", math.nan)),
                   "score/epochs_mean": sc.get("epochs_mean", math.nan),
                   "score/final_loss_gmean": sc.get("final_loss_gmean", math.nan),
                   "score/success_rate": sc.get("success_rate", math.nan)}
        writer.add_hparams(hparams, metrics, run_name=rec["path"].replace("/", "__"))
    writer.close()
    final = out_dir / "tb"
    if final.exists():
        old = out_dir / ".tb.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def build_report(out_dir: str | os.PathLike, suite: dict, records: list[dict], *, reps: int | None = None,
                 poi_reps: int | None = None, seed: int = 0, figures: bool = True, tensorboard: bool = True) -> dict:
    """Aggregate the finished trials listed in ``records`` (the runner's trial records) and write the report.

    ``reps``: bootstrap replications of the IQM CIs (default: the suite's ``bootstrap_reps``), ``poi_reps``: of
    the probability-of-improvement CIs (default: half that; each one runs a Mann-Whitney U test per task).
    Returns the report as written to ``report.json`` (plus ``headline_markdown``)."""
    out = Path(out_dir)
    reps = int(reps or suite.get("bootstrap_reps", 2000))
    poi_reps = int(poi_reps or max(reps // 2, 100))
    rows, budgets = load_rows(out, records)
    families = [{"label": f["label"], "budget": budgets[f["label"]]} for f in suite["families"]
                if f["label"] in budgets]
    penalty = float(suite.get("penalty", 2.0))
    sm = score_matrices(rows, families, penalty)
    fam_labels = [f["label"] for f in families]
    agents = [a["name"] for a in suite.get("agents", []) if a["name"] in sm["kinds"]]
    others = [m for m, k in sm["kinds"].items() if k == "baseline" and m != BEST_FIXED and not FIXED_C.match(m)]
    main = [*agents, BEST_FIXED, *others]
    fixed = [m for m in sm["kinds"] if FIXED_C.match(m)]
    notes: list[str] = []

    columns = {f: [j for j, t in enumerate(sm["tasks"]) if t[0] == f] for f in fam_labels}
    result: dict[str, Any] = {"scores": {}, "normaliser": sm["normaliser"], "tasks": len(sm["tasks"])}
    for s in SCORES:
        mats = sm["matrices"][s]
        for m, mat in mats.items():
            if mat.size and not np.isfinite(mat).all():
                kept = complete_rows(mat).shape[0]
                notes.append(f"{s}: {m} has {mat.shape[0] - kept} of {mat.shape[0]} runs without a score on every "
                             "task; the overall numbers use its complete runs only")
        overall = iqm_with_ci(mats, reps=reps, seed=seed)
        per_family = {f: (overall if len(fam_labels) == 1 else
                          iqm_with_ci({m: v[:, columns[f]] for m, v in mats.items()}, reps=reps, seed=seed))
                      for f in fam_labels}
        result["scores"][s] = {"overall": overall, "per_family": per_family}
    mats = sm["matrices"]["epochs"]
    poi: dict[str, dict] = {}
    for a in agents:
        for b in [BEST_FIXED, *others]:
            key = f"{a} vs {b}"
            poi[key] = {"overall": probability_of_improvement(mats[a], mats[b], reps=poi_reps, seed=seed),
                        "per_family": {f: probability_of_improvement(mats[a][:, columns[f]], mats[b][:, columns[f]],
                                                                     reps=None)["poi"] for f in fam_labels}}
    # where the target is out of reach every run scores the same epochs: there the final loss tells them apart
    fl = sm["matrices"]["final_loss"]
    poi_fl = {f"{a} vs {b}": {f: probability_of_improvement(fl[a][:, columns[f]], fl[b][:, columns[f]], reps=None)["poi"]
                              for f in fam_labels} for a in agents for b in [BEST_FIXED, *others]}
    result["probability_of_improvement"] = poi
    # per agent, task by task against the baseline it is least often ahead of: where a PoI goal is won or lost
    hardest = {a: min((b for b in [BEST_FIXED, *others] if math.isfinite(poi[f"{a} vs {b}"]["overall"]["poi"])),
                      key=lambda b: poi[f"{a} vs {b}"]["overall"]["poi"], default=None) for a in agents}
    result["per_task"] = {a: {"baseline": b, "tasks": per_task(mats, sm["tasks"], a, b)}
                          for a, b in hardest.items() if b is not None}
    result["probability_of_improvement_final_loss"] = poi_fl
    prof = performance_profiles({m: mats[m] for m in main}, reps=min(reps, 1000), seed=seed)
    result["performance_profile"] = {"tau": TAUS.tolist(),
                                     "fraction_leq_tau": {m: v.tolist() for m, v in prof[0].items()}}

    # success rates and per-trial summaries (TensorBoard rows)
    success = {}
    for m in sm["kinds"]:
        mr = [r for r in rows if r["label"] == m]
        if mr:
            success[m] = sum(bool(r["reached_target"]) for r in mr) / len(mr)
    norm_rows = [r for r in rows if r["kind"] == "baseline"
                 and r["label"] == sm["normaliser"].get(r["family"], {}).get("epochs")]
    if norm_rows:
        success[BEST_FIXED] = sum(bool(r["reached_target"]) for r in norm_rows) / len(norm_rows)
    trial_scores: dict[str, dict] = {}
    col = {t: j for j, t in enumerate(sm["tasks"])}
    for rec in records:
        trs = [r for r in rows if r["trial"] == rec["id"]]
        if not trs:
            continue
        by_m: dict[str, list[dict]] = {}
        for r in trs:
            by_m.setdefault(r["label"], []).append(r)
        best = None
        for m, mr in by_m.items():
            ri = sm["runs"][m].index(mr[0]["run"])
            e = [mats[m][ri, col[(r["family"], r["seed_index"])]] for r in mr if (r["family"], r["seed_index"]) in col]
            fl = [sm["matrices"]["final_loss"][m][ri, col[(r["family"], r["seed_index"])]] for r in mr
                  if (r["family"], r["seed_index"]) in col]
            cand = {"method": m, "epochs_mean": float(np.mean(e)) if e else math.nan,
                    "final_loss_gmean": float(np.exp(np.mean(np.log(fl)))) if fl else math.nan,
                    "success_rate": sum(bool(r["reached_target"]) for r in mr) / len(mr)}
            if best is None or cand["epochs_mean"] < best["epochs_mean"]:
                best = cand
        trial_scores[rec["id"]] = best or {}

    # cost per trial kind (what a cluster run costs)
    cost: dict[str, dict] = {}
    for kind in ("train", "agent", "baseline"):
        done = [r for r in records if r["kind"] == kind and r["status"] == "done" and "cpu_s" in r]
        if done:
            cost[kind] = {"trials": len(done), "cpu_s_total": round(sum(r["cpu_s"] for r in done), 1),
                          "cpu_s_mean": round(float(np.mean([r["cpu_s"] for r in done])), 2),
                          "wall_s_mean": round(float(np.mean([r["wall_s"] for r in done])), 2)}
    failed = [{"id": r["id"], "status": r["status"], "error": str(r.get("error", ""))[:2000]}
              for r in records if r["status"] != "done"]
    if failed:
        notes.append(f"{len(failed)} of {len(records)} trials did not finish; the numbers cover the finished ones")

    # figures
    written: list[str] = []
    if figures:
        curves: dict[str, dict[str, list[np.ndarray]]] = {f: {} for f in fam_labels}
        for rec in records:
            if rec["status"] != "done" or rec["kind"] == "train":
                continue
            for m, cs in load_curves(out, rec).items():
                label = rec["method"] if rec["kind"] == "agent" else m
                norm = sm["normaliser"].get(rec["family"], {}).get("epochs")
                if rec["kind"] == "baseline" and FIXED_C.match(label):
                    if label != norm:
                        continue
                    label = f"{BEST_FIXED} ({label})"
                curves[rec["family"]].setdefault(label, []).extend(cs)
        targets = {f: float(np.median([r["target_loss"] for r in rows if r["family"] == f])) for f in fam_labels}
        written = _figures(out, main, result["scores"]["epochs"]["overall"], result["scores"]["epochs"]["per_family"],
                           fam_labels, prof, curves, targets, agents)
    if tensorboard:
        _tensorboard(out, records, trial_scores)
        written.append("tb/ (tensorboard --logdir tb: HPARAMS tab)")

    md = _markdown(suite, main, fixed, fam_labels, result, success, sm, cost, failed, notes)
    report = {"suite": suite.get("name"), "description": suite.get("description"), "complete": not failed,
              "penalty": penalty, "families": families, "agents": agents, "baselines": others,
              "fixed_c": fixed, "success_rate": success, **result, "cost": cost, "failed": failed,
              "trial_scores": trial_scores, "figures": written, "notes": notes, "reps": reps, "poi_reps": poi_reps,
              "seed": seed}
    from lrenv.evaluate import write_json
    write_json(str(out / "report.json"), _clean(report))
    _atomic_text(out / "report.md", md["full"])
    report["headline_markdown"] = md["headline"]
    return report


def _markdown(suite: dict, main: list[str], fixed: list[str], fams: list[str], result: dict, success: dict,
              sm: dict, cost: dict, failed: list[dict], notes: list[str]) -> dict[str, str]:
    ep, fl = result["scores"]["epochs"], result["scores"]["final_loss"]
    head = ["| method | runs | IQM epochs / best fixed-c [95% CI] | " + " | ".join(fams)
            + " | IQM final loss / best fixed-c [95% CI] | success |",
            "|---|---|---|" + "---|" * len(fams) + "---|---|"]
    for m in main:
        o = ep["overall"].get(m)
        runs = o["runs"] if o else len(sm["runs"].get(m, []))
        fam_cells = [_fmt_ci(ep["per_family"][f].get(m)) for f in fams]
        head.append(f"| {m} | {runs} | {_fmt_ci(o)} | " + " | ".join(fam_cells)
                    + f" | {_fmt_ci(fl['overall'].get(m))} | {success.get(m, math.nan):.2f} |")
    headline = "\n".join(head) + "\n"
    lines = [f"# Benchmark `{suite.get('name')}`", "", suite.get("description", ""), "",
             ("**Incomplete**: " + ", ".join(f["id"] for f in failed) + " did not finish; rerun the same command to "
              "resume.") if failed else "All trials finished.", "",
             "Scores are normalised per instance by the best fixed c/L schedule of the same family (lower is better; "
             f"a missed target counts {suite.get('penalty', 2.0):g} x budget epochs). IQM and 95 % stratified "
             "bootstrap CIs over training seeds (rliable); runs x tasks = training seeds x (family, instance); "
             "baselines are one deterministic run.", "", "## Headline", "", headline,
             "## Normaliser (best fixed-c per family)", "", "| family | epochs | final loss |", "|---|---|---|"]
    lines += [f"| {f} | {sm['normaliser'][f]['epochs']} | {sm['normaliser'][f]['final_loss']} |" for f in fams]
    lines += ["", "## Probability of improvement (P(agent needs fewer epochs than baseline), ties 1/2)", "",
              "| agent vs baseline | overall [95% CI] | " + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for key, v in result["probability_of_improvement"].items():
        o = v["overall"]
        cell = "–" if not math.isfinite(o["poi"]) else (
            f"{o['poi']:.3f}" + (f" [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}]" if math.isfinite(o["ci95"][0]) else ""))
        lines.append(f"| {key} | {cell} | " + " | ".join(
            "–" if not math.isfinite(v["per_family"][f]) else f"{v['per_family'][f]:.3f}" for f in fams) + " |")
    lines += ["", "## Probability of improvement on the final loss (P(agent ends lower than baseline), ties 1/2; what "
              "counts in a family whose target is out of reach)", "", "| agent vs baseline | " + " | ".join(fams) + " |",
              "|---|" + "---|" * len(fams)]
    for key, v in result["probability_of_improvement_final_loss"].items():
        lines.append(f"| {key} | " + " | ".join("–" if not math.isfinite(v[f]) else f"{v[f]:.3f}" for f in fams) + " |")
    for a, v in result.get("per_task", {}).items():
        if not v["tasks"]:
            continue
        lines += ["", f"## Per instance: {a} vs {v['baseline']} (the baseline it is least often ahead of)", "",
                  "Epochs / best fixed-c per test instance: the agent's median [lowest, highest] over its training "
                  "seeds, the baseline's score, and P(agent needs fewer epochs) on that instance; the overall "
                  "probability of improvement is the mean of the last column.", "",
                  "| family | instance | agent median [min, max] | baseline | PoI |", "|---|---|---|---|---|"]
        lines += [f"| {t['family']} | {t['instance']} | {t['agent_median']:.3f} [{t['agent_min']:.3f}, "
                  f"{t['agent_max']:.3f}] | {t['baseline']:.3f} | {t['poi']:.2f} |" for t in v["tasks"]]
    lines += ["", "## Every fixed-c schedule (IQM epochs / best fixed-c)", "", "| method | overall | "
              + " | ".join(fams) + " |", "|---|---|" + "---|" * len(fams)]
    for m in fixed:
        lines.append(f"| {m} | {_fmt_ci(ep['overall'].get(m))} | "
                     + " | ".join(_fmt_ci(ep["per_family"][f].get(m)) for f in fams) + " |")
    lines += ["", "## Cost (measured per trial, one CPU and one torch thread each)", "",
              "| kind | trials | CPU s total | CPU s mean | wall s mean |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {c['trials']} | {c['cpu_s_total']} | {c['cpu_s_mean']} | {c['wall_s_mean']} |"
              for k, c in cost.items()]
    if failed:
        lines += ["", "## Trials that did not finish", ""]
        lines += [f"- `{f['id']}` ({f['status']}): {f['error'].strip().splitlines()[0] if f['error'].strip() else ''}"
                  for f in failed]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Figures: `figures/performance_profile.png`, `figures/iqm_per_family.png`, "
              "`figures/loss_curves_<family>.png`; TensorBoard HParams: `tensorboard --logdir tb`.", ""]
    return {"headline": headline, "full": "\n".join(lines)}

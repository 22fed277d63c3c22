"""The source paper's own experiment (SPEC §1) through the evaluation harness: paper size, its baselines, a figure
like its Fig. 1 and a table.

The paper runs SGD on NMF of a 10000×1000 matrix at rank 100 for a 1000-epoch budget and compares a PPO-learned
learning-rate schedule with (a) a fixed LR at the per-epoch theoretical bound, (b) a random LR drawn below the bound
every epoch and (c) Armijo backtracking. Here (``problem='paper'``, :mod:`lrenv.problems`):

- **fixed at the bound**: ``lr = c/L`` per factor recomputed every epoch (:class:`lrenv.schedules.FixedScale`);
  ``c = 2`` *is* the bound 2/L (the paper's "fixed schedule at the bound"). SPEC §2: minibatch SGD diverges well
  below 2/L, so the table also has the best *stable* fixed ``c``: 1.1 by default, lrenv's default fixed ``c``
  and the value ``lrenv tune`` chose for ``medium`` on its validation instances (``lrenv/tuned/medium.yml``) —
  picked without looking at the paper-size test instances;
- **random under the bound**: ``lr = u·2/L``, ``u ~ U(0, 1)`` fresh each epoch (:class:`RandomUnderBound`);
- **Armijo**: backtracking from the bound on the full-batch loss (:class:`Armijo`, defaults); its trial loss
  evaluations are counted (``extra_loss_evals``) and are in its wall time;
- any number of **learned policies** (run directories, model ``.zip`` files, ``pretrained:NAME``). A policy
  trained with another epoch budget (``pretrained:small-relative``: 200) is run with this budget: the one
  budget-dependent input, the ``epoch`` feature (epoch / budget), then reads epoch / 1000 — a size *and* horizon
  transfer, noted in ``config.json``.

Every number comes from :func:`lrenv.evaluate.evaluate` (same instances of the test split, same initial points).
Entry point: :func:`run_paper_experiment`; command line: ``scripts/paper_experiment.py``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .evaluate import EvalResult, _atomic_write, evaluate, write_json
from .schedules import Armijo, FixedScale, PolicySchedule, RandomUnderBound, Schedule, resolve_policy

BEST_STABLE_C = 1.1
"""The best stable fixed ``c`` used by default: lrenv's default fixed c, and ``lrenv tune``'s choice for ``medium``
(``lrenv/tuned/medium.yml``, validation instances) — never tuned on the paper-size test instances."""
FIGURE = "paper_fig1.png"
"""The figure like the paper's Fig. 1, in the output directory."""
TRACES = "traces.npz"
"""Every run's per-epoch curves (loss, step sizes, bounds), so the figure can be redrawn without rerunning."""
_CURVES = ("loss", "lr_W", "lr_H", "bound_W", "bound_H")


def paper_baselines(fixed_c: Sequence[float] = (2.0, BEST_STABLE_C)) -> list[Schedule]:
    """The paper's baselines: fixed ``c/L`` for each ``c`` (``c = 2`` is the bound itself), random under the
    bound, Armijo — with lrenv's defaults (nothing tuned on the scored instances)."""
    out: list[Schedule] = []
    for c in fixed_c:
        s = FixedScale(float(c))
        if math.isclose(float(c), 2.0):
            s.name = "fixed c=2 (the bound 2/L)"
        out.append(s)
    return [*out, RandomUnderBound(), Armijo()]


def parse_model_spec(spec: str) -> tuple[str | None, str]:
    """``'LABEL=PATH'`` -> (LABEL, PATH); ``'PATH'`` or ``'pretrained:NAME'`` -> (None, spec)."""
    if "=" in spec and not spec.startswith("pretrained:"):
        label, path = spec.split("=", 1)
        if label and path and "/" not in label:
            return label, path
    return None, spec


def load_models(specs: Sequence[Any]) -> list[PolicySchedule]:
    """Policies from ``'LABEL=PATH'``, ``PATH``, ``'pretrained:NAME'`` or PolicySchedule objects; a label names the
    row ``policy:LABEL`` (a bare ``interrupted.zip`` would otherwise be called ``policy:interrupted``)."""
    from .schedules import load_policy
    out = []
    for spec in specs:
        if isinstance(spec, str):
            label, path = parse_model_spec(spec)
            out.append(load_policy(path, name=label) if label else resolve_policy(path))
        else:
            out.append(resolve_policy(spec))
    return out


def trained_budget(policy: PolicySchedule) -> int | None:
    """The epoch budget ``policy`` was trained with: its TaskConfig's, else its env config's, else the default budget
    of the family it was trained on (older models do not record it); None if unknown."""
    for source in (policy.task_config, policy.env_config):
        if source.get("budget") is not None:
            return int(source["budget"])
    problem = policy.env_config.get("problem")
    if problem:
        try:
            from .problems import make_family
            return int(make_family(problem, **dict(policy.env_config.get("problem_params") or {})).budget)
        except (ValueError, TypeError, OSError):
            return None
    return None


def adapt_budget(policy: PolicySchedule, budget: int) -> str | None:
    """Let ``policy`` run with ``budget`` epochs if it was trained with another budget (the harness refuses a
    policy whose recorded budget differs); returns a note saying so, or None. Only the ``epoch`` feature
    (epoch / budget) and the reward, which evaluation does not use, depend on the budget."""
    trained = trained_budget(policy)
    if trained is None or trained == int(budget):
        return None
    if "budget" in policy.task_config:
        policy.task_config["budget"] = int(budget)
    uses_epoch = "epoch" in (policy.task_config.get("obs_features") or policy.env_config.get("obs_features") or ())
    return (f"{policy.name}: trained with a {trained}-epoch budget, run with {budget}"
            + (f" (its epoch feature reads epoch/{budget} where it learned epoch/{trained})" if uses_epoch else ""))


def measure_epoch_cost(problem: str = "paper", problem_params: dict | None = None, *, epochs: int = 10,
                       c: float = 1.0, split: str = "validation", threads: int = 1) -> dict[str, float]:
    """Seconds per epoch of one environment (one SGD epoch plus the per-epoch loss, gradient norm and bounds) at
    ``lr = c/L``, measured on the first instance of ``split`` after one warm-up epoch: wall and CPU time per epoch,
    and the reset (instance generation + initial point) wall time."""
    import torch

    from .env import NMFEnv
    from .problems import reset_seed, split_seeds
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = FixedScale(c)
        env = NMFEnv(problem=problem, problem_params=dict(problem_params or {}), instances=split,
                     action_mode=s.action_mode, **s.env_overrides)
        instance = int(split_seeds(split)[0])
        t = time.perf_counter()
        obs, _ = env.reset(seed=reset_seed(instance), options={"instance": instance})
        reset_s = time.perf_counter() - t
        s.reset(env.oracle)
        env.step(s.predict(obs)[0])  # warm-up
        t, p, n = time.perf_counter(), time.process_time(), 0
        for _ in range(epochs):
            _, _, term, trunc, _ = env.step(s.predict(obs)[0])
            n += 1
            if term or trunc:
                break
        wall, cpu = (time.perf_counter() - t) / n, (time.process_time() - p) / n
    finally:
        torch.set_num_threads(previous)
    return {"epoch_wall_s": wall, "epoch_cpu_s": cpu, "reset_wall_s": reset_s, "epochs_timed": n,
            "problem": problem, "c": c}


def _fmt(x: float, spec: str = ".3g") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _mean(values: Sequence[float]) -> float:
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else math.nan


def paper_rows(result: EvalResult) -> list[dict[str, Any]]:
    """Per method: the numbers of the paper table (see :func:`paper_table`)."""
    out = []
    for name, s in result.summary.items():
        rows = [r for r in result.rows if r["method"] == name]
        epochs = sum(r["epochs"] for r in rows)
        wall = sum(r["wall_time"] for r in rows)
        ratio = [r["final_loss"] / r["target_loss"] for r in rows if not r["diverged"]]
        best = [r["best_loss"] / r["target_loss"] for r in rows]
        missed = [r["final_loss"] for r in rows if not r["reached_target"] and not r["diverged"]]
        out.append({
            "method": name, "runs": s["runs"], "success": s["success_rate"], "diverged": s["diverged_rate"],
            "epochs_to_target_mean": s["epochs_to_target_mean"], "epochs_to_target_ci95": s["epochs_to_target_ci95"],
            "final_loss_median": float(np.median(missed)) if missed else math.nan,
            "final_over_target_median": float(np.median(ratio)) if ratio else math.nan,
            "best_over_target_median": float(np.nanmedian(best)) if best else math.nan,
            "extra_loss_evals_mean": s["extra_loss_evals_mean"], "epochs_run_mean": epochs / max(len(rows), 1),
            "wall_per_run_s": wall / max(len(rows), 1), "ms_per_epoch": 1000 * wall / epochs if epochs else math.nan,
            "mean_scale_W": _mean([r["mean_scale_W"] for r in rows]),
            "mean_scale_H": _mean([r["mean_scale_H"] for r in rows]),
        })
    return out


def paper_table(result: EvalResult, *, budget: int | None = None) -> str:
    """The Markdown table: success, epochs to target (mean over the runs that reached it, bootstrap CI), final loss
    of the runs that did not (at the budget), final and best loss relative to the target (median), divergences,
    mean step relative to the bound, extra loss evaluations, wall time per run and per epoch run."""
    budget = budget or result.config.get("budget")
    cols = ["method", "success", "epochs to target: mean [95% CI]", f"final loss at {budget} (median, misses)",
            "final ÷ target (median)", "best ÷ target (median)", "diverged", "lr_W/(2/L_W), lr_H/(2/L_H)",
            "extra loss evals", "wall per run (s)", "ms per epoch"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in paper_rows(result):
        lo, hi = r["epochs_to_target_ci95"]
        ett = ("–" if not math.isfinite(r["epochs_to_target_mean"])
               else f"{r['epochs_to_target_mean']:.0f} [{lo:.0f}, {hi:.0f}]")
        cells = [r["method"], f"{r['success']:.2f}", ett, _fmt(r["final_loss_median"], ".4g"),
                 _fmt(r["final_over_target_median"], ".3f"), _fmt(r["best_over_target_median"], ".3f"),
                 f"{r['diverged']:.2f}", f"{_fmt(r['mean_scale_W'], '.2g')}, {_fmt(r['mean_scale_H'], '.2g')}",
                 _fmt(r["extra_loss_evals_mean"], ".0f"), _fmt(r["wall_per_run_s"], ".0f"),
                 _fmt(r["ms_per_epoch"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure_colors(traces: dict[str, list]) -> dict[str, str]:
    """Colours that tell the paper's baselines apart in one figure: the fixed schedules in distinct hues (the bound
    orange, the others green, purple, brown) and random-bound in a grey dark enough to read."""
    hues = iter(["#2ca02c", "#9467bd", "#8c564b", "#17becf"])
    out = {}
    for name in traces:
        if name.startswith("fixed c=2 "):
            out[name] = "#ff7f0e"
        elif name.startswith("fixed "):
            out[name] = next(hues, "#7f7f7f")
        elif name == "random-bound":
            out[name] = "#7f7f7f"
    return out


def save_traces(path: str, traces: dict[str, list]) -> None:
    """Write every run's curves to ``path`` (.npz, atomically): ``index`` holds one JSON record per run (method,
    instance, target, budget, diverged, reached_target) and ``run{i}_{curve}`` its arrays."""
    import json

    from .policy_io import unique_tmp
    index, arrays = [], {}
    for method, runs in traces.items():
        for t in runs:
            i = len(index)
            index.append({"method": method, "instance": int(t.instance), "seed_index": int(t.seed_index),
                          "target_loss": float(t.target_loss), "budget": int(t.budget), "diverged": bool(t.diverged),
                          "reached_target": bool(t.reached_target), "extra_loss_evals": int(t.extra_loss_evals)})
            for c in _CURVES:
                arrays[f"run{i}_{c}"] = np.asarray(getattr(t, c), dtype=np.float64)
    tmp = unique_tmp(path) + ".npz"
    try:
        np.savez_compressed(tmp, index=np.array(json.dumps(index)), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_traces(path: str) -> dict[str, list]:
    """The traces written by :func:`save_traces` (as :class:`lrenv.metrics.Trace`), by method in their order."""
    import json

    from .metrics import Trace
    out: dict[str, list] = {}
    with np.load(path) as z:
        for i, rec in enumerate(json.loads(str(z["index"]))):
            curves = {c: z[f"run{i}_{c}"] for c in _CURVES}
            out.setdefault(rec["method"], []).append(Trace(
                method=rec["method"], seed_index=rec["seed_index"], instance=rec["instance"],
                target_loss=rec["target_loss"], wall=np.zeros(len(curves["loss"])), budget=rec["budget"],
                diverged=rec["diverged"], reached_target=rec["reached_target"],
                extra_loss_evals=rec["extra_loss_evals"], **curves))
    return out


@dataclass
class PaperExperiment:
    """What :func:`run_paper_experiment` produced."""

    result: EvalResult
    table: str
    epoch_cost: dict[str, float] | None
    notes: list[str] = field(default_factory=list)
    out_dir: str | None = None
    figure: str | None = None


def run_paper_experiment(models: Sequence[Any] = (), *, problem: str = "paper", problem_params: dict | None = None,
                         seeds: int = 3, budget: int | None = None, fixed_c: Sequence[float] = (2.0, BEST_STABLE_C),
                         out_dir: str | None = "runs/paper", progress: bool = True, seed: int = 0,
                         batched: bool = False, measure_epochs: int = 10, verbose: bool = True,
                         command: str | None = None) -> PaperExperiment:
    """Run the paper's baselines and ``models`` on ``seeds`` test instances of ``problem`` and write, to ``out_dir``
    (must not exist or be empty; None writes nothing): ``results.csv`` (one row per run), ``summary.md`` (the paper
    table, then the harness's own table), ``summary.json``, ``config.json`` (settings, instances, per-epoch cost,
    CPU and wall time of the whole run, notes), :data:`FIGURE` (loss vs epoch like the paper's Fig. 1) and
    :data:`TRACES` (every run's curves: redraw with ``paper_loss_figure(load_traces(path))``), plus the harness's
    ``loss_curves*.png`` and ``lr_history.png``.

    ``batched=False`` (default) runs every instance in its own environment: at paper size an epoch is a few GEMMs,
    so stepping runs together saves nothing, while a batch keeps computing (at lr 0) the slots whose runs already
    diverged or reached the target until its last run ends. ``measure_epochs``: epochs timed by
    :func:`measure_epoch_cost` before the evaluation (0: skip)."""
    from .plots import paper_loss_figure, save_figure
    policies = load_models(models)
    probe_budget = budget
    if probe_budget is None:
        from .problems import make_family
        probe_budget = make_family(problem, **dict(problem_params or {})).budget
    notes = [n for n in (adapt_budget(p, probe_budget) for p in policies) if n]
    cost = measure_epoch_cost(problem, problem_params, epochs=measure_epochs) if measure_epochs > 0 else None
    methods: list[Schedule] = [*paper_baselines(fixed_c), *policies]
    t, p = time.perf_counter(), time.process_time()
    result = evaluate(methods, problem=problem, problem_params=problem_params, seeds=seeds, budget=budget,
                      out_dir=out_dir, progress=progress, seed=seed, save=out_dir is not None, tensorboard=False,
                      verbose=False, batched=batched, split="test")
    wall, cpu = time.perf_counter() - t, time.process_time() - p
    table = paper_table(result)
    notes += result.notes
    exp = PaperExperiment(result=result, table=table, epoch_cost=cost, notes=notes, out_dir=result.out_dir)
    if result.out_dir is not None:
        out = result.out_dir
        cfg = result.config
        title = (f"{cfg['description']}, {cfg['seeds']} {cfg['split']} instances {cfg['instances']}, budget "
                 f"{cfg['budget']}")
        fig = paper_loss_figure(result.traces, colors=figure_colors(result.traces),
                                title=f"{cfg['description']}, {cfg['seeds']} test instances, budget {cfg['budget']}\n"
                                      "loss vs epoch: mean of log10 over instances, band min–max")
        exp.figure = os.path.join(out, FIGURE)
        save_figure(fig, exp.figure)
        save_traces(os.path.join(out, TRACES), result.traces)
        text = [f"# The paper's experiment: {title}", "", table]
        if cost:
            text.append(f"Per-epoch cost (one environment, one thread, measured before the run): "
                        f"{1000 * cost['epoch_wall_s']:.0f} ms wall, {1000 * cost['epoch_cpu_s']:.0f} ms CPU; "
                        f"instance generation + reset {cost['reset_wall_s']:.1f} s.")
        text.append(f"Whole evaluation: {wall:.0f} s wall, {cpu:.0f} s CPU.")
        text += [f"- {n}" for n in notes]
        text += ["", "## The harness's table (lrenv.evaluate)", "", result.markdown]
        _atomic_write(os.path.join(out, "summary.md"), "\n".join(text) + "\n")
        write_json(os.path.join(out, "config.json"), {
            **cfg, "experiment": "paper (SPEC §1)", "command": command, "fixed_c": list(fixed_c),
            "best_stable_c_source": "lrenv default fixed c; lrenv tune on medium validation (lrenv/tuned/medium.yml)",
            "batched": batched, "epoch_cost": cost, "evaluation_wall_s": wall, "evaluation_cpu_s": cpu,
            "paper_notes": notes, "figure": FIGURE, "table": paper_rows(result)})
    if verbose:
        print(table)
        if cost:
            print(f"per-epoch cost: {1000 * cost['epoch_wall_s']:.0f} ms wall, {1000 * cost['epoch_cpu_s']:.0f} ms CPU")
        for n in notes:
            print(f"- {n}")
        if result.out_dir:
            print(f"results in {result.out_dir}")
    return exp

"""Score learning-rate schedules, reference solvers and trained agents on held-out instances.

Every method runs on the same instances ``SPLITS[split][:seeds]`` (the ``test`` split by default; tune
on ``validation``, see :mod:`lrenv.problems`) from the same initial point per instance (the environment is
reset with the same seed for every method), and is scored on the same loss. Python API: :func:`evaluate`; building blocks reused by training code: :func:`run_schedule`,
:func:`trace_metrics`, :func:`aggregate`. Command line: ``lrenv evaluate --help``.

Metrics per run (one row of ``results.csv``):

=================== ==========================================================================
epochs_to_target    first epoch whose loss is <= the target (NaN if never reached)
wall_to_target      seconds of wall time until then (schedule + environment, or solver)
final_loss          loss at the end of the run (NaN/inf if it diverged)
best_loss           lowest finite loss seen
heldout_mse         held-out mean squared error at the end (families with held-out entries)
auc_log_loss        mean over epochs 1..budget of log10(loss / initial loss); a run that stopped
                    early keeps its final value, a diverged one counts log10(divergence_factor)
diverged            the run diverged (non-finite loss or above divergence_factor x initial)
extra_loss_evals    loss evaluations beyond one per epoch (line searches, LM retries)
mean_lr_W, mean_lr_H  mean step size applied; mean_scale_W, mean_scale_H: mean of lr / (2/L)
=================== ==========================================================================

Aggregates per method (``summary.json``/``summary.md``): success rate, mean and median epochs to
target over the successful seeds with a seeded 95 % bootstrap CI of the mean, and the mean or median
of the other metrics.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import difflib
import functools
import io
import json
import math
import os
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .env import NMFEnv
from .problems import DEFAULT_PROBLEM, SPLITS, parse_problem_params, reset_seed, split_seeds
from .schedules import (Armijo, BarzilaiBorwein, CosineDecay, CosineDecayPair, FixedLR, FixedScale, PolicySchedule,
                        Polyak, RandomUnderBound, RandomWalkBound, Schedule, TwoPhase, fixed_grid, load_policy,
                        schedule_env_kwargs)
from .batch_eval import MAX_BATCH, group_key, run_batched
from .metrics import (RESULT_COLUMNS, Trace, auc_log_loss, epochs_to_target,  # noqa: F401 (re-exported)
                      trace_from_infos, trace_metrics)
from .parallel import MAX_WORKERS, can_fork, check_workers, default_workers, fork_map
from .solvers import TORCH_OPTIMIZERS, SolverUnavailable, applicability, run_solver, run_solvers

DEFAULT_SCALES = (0.2, 0.5, 1.0, 1.1, 1.3, 1.6, 1.9)
"""Fixed ``c`` of ``lr = c / L`` evaluated by ``fixed-scale`` (``c = 1`` is the mean of random-bound)."""
BOOTSTRAP_SAMPLES = 2000

Method = Schedule | str
"""A method is a schedule object or the name of an outside solver (see :data:`lrenv.solvers.SOLVERS`)."""


# ----------------------------------------------------------------------------- method registry
def _grid_methods(grid: Sequence[float] | None) -> list[Method]:
    return [FixedLR(lr) for lr in (grid if grid is not None else fixed_grid())]


REGISTRY: dict[str, tuple[str, Callable[[Sequence[float] | None], list[Method]]]] = {
    "fixed-grid": ("fixed absolute LR for both factors, the paper's 1e-5 ... 10 grid (or --grid)", _grid_methods),
    "fixed-scale": (f"lr = c/L per factor for c in {DEFAULT_SCALES}", lambda g: [FixedScale(c) for c in DEFAULT_SCALES]),
    "random-bound": ("lr = U(0,1) x 2/L, fresh each epoch (paper Fig. 3)", lambda g: [RandomUnderBound()]),
    "random-walk": ("random walk of the scale within +-50 % around 0.5 x 2/L (paper Fig. 4)", lambda g: [RandomWalkBound()]),
    "armijo": ("Armijo backtracking from the bound on the full-batch loss, c = 0.5 (extra loss evaluations)", lambda g: [Armijo()]),
    "polyak": ("Polyak step (F - f*) / ||grad||^2 for both factors, f* = running best minus an adaptive margin, "
               "capped at 0.55 x the larger 2/L", lambda g: [Polyak()]),
    "polyak-f0": ("classic Polyak step with f* = 0, uncapped (diverges where the loss cannot reach 0)",
                  lambda g: [Polyak(0.0, cap=None)]),
    "bb": ("Barzilai-Borwein step from successive epochs", lambda g: [BarzilaiBorwein()]),
    "cosine": ("cosine decay from 0.55 x 2/L (c = 1.1) to 0.05 x 2/L over the budget", lambda g: [CosineDecay()]),
    "cosine-pf": ("cosine decay per factor ('per_factor' mode): each factor from its peak (0.55 x its 2/L) to 0.1 "
                  "of it over the budget", lambda g: [CosineDecayPair()]),
    "two-phase": ("high then decay: c = 1.1 for the first half of the budget, then c = 0.8", lambda g: [TwoPhase()]),
    "adam": ("Adam + ReduceLROnPlateau on the same minibatches (outside the env)", lambda g: ["adam"]),
    "sklearn-cd": ("scikit-learn NMF, coordinate descent, one iteration per epoch", lambda g: ["sklearn-cd"]),
    "sklearn-mu": ("scikit-learn NMF, multiplicative updates, one iteration per epoch", lambda g: ["sklearn-mu"]),
    "lm": ("Levenberg-Marquardt, damped Gauss-Newton on all parameters (small problems)", lambda g: ["lm"]),
    "hals": ("HALS (Cichocki-Phan) for NMF, masked column/row updates on missing data, one sweep per epoch",
             lambda g: ["hals"]),
    "als-masked": ("alternating non-negative least squares over the observed entries, one sweep per epoch",
                   lambda g: ["als-masked"]),
    "als-grow": ("als-masked with the rank grown one component at a time (escapes the local minima of data whose "
                 "components differ in scale), one sweep per epoch", lambda g: ["als-grow"]),
    "prodigy": ("Prodigy (prodigyopt, lr 1) on the same minibatches; optional extra [baselines]", lambda g: ["prodigy"]),
    "dadapt-sgd": ("D-Adaptation SGD (dadaptation, lr 1) on the same minibatches; [baselines]", lambda g: ["dadapt-sgd"]),
    "dadapt-adam": ("D-Adaptation Adam (dadaptation, lr 1) on the same minibatches; [baselines]",
                    lambda g: ["dadapt-adam"]),
    "schedulefree-sgd": ("Schedule-Free SGD (schedulefree), lr = 1/L per factor at the start; [baselines]",
                         lambda g: ["schedulefree-sgd"]),
    "dog": ("DoG (dog-optimizer), one step size for W and H; [baselines]", lambda g: ["dog"]),
    "ldog": ("layer-wise DoG (dog-optimizer), one step size per factor; [baselines]", lambda g: ["ldog"]),
}
PARAMETRIC = {"fixed-lr": FixedLR, "fixed-c": FixedScale}
"""``fixed-lr=0.01`` and ``fixed-c=1.3`` name one fixed schedule."""


def expand_tuned(methods: Iterable[Method | str] | str, problem: str, tuned: str | None = None
                 ) -> tuple[list[Method | str], dict[str, dict]]:
    """Replace ``tuned`` (every tuned baseline of the family) and ``tuned:NAME`` (one) by the tuned schedules of
    the family's shipped settings (or of the file ``tuned``); returns the methods and the tuned solvers' options."""
    from .tune import tuned_methods
    from .tuned_files import load_tuned
    if isinstance(methods, str):
        methods = [s.strip() for s in methods.split(",") if s.strip()]
    out: list[Method | str] = []
    options: dict[str, dict] = {}
    for m in methods:
        if isinstance(m, str) and (m == "tuned" or m.startswith("tuned:")):
            doc = load_tuned(problem, tuned)
            found, opts = tuned_methods(doc, m.split(":", 1)[1] if ":" in m else None)
            out.extend(found)
            options.update(opts)
        else:
            out.append(m)
    return out, options


def method_name(m: Method) -> str:
    return m if isinstance(m, str) else m.name


def resolve_methods(methods: Iterable[Method | str] | str, grid: Sequence[float] | None = None) -> list[Method]:
    """Expand names (``'all'``, registry names, ``fixed-lr=X``, ``fixed-c=C``, comma lists) and keep
    schedule objects; unknown names raise ValueError with a close-match suggestion."""
    if isinstance(methods, str):
        methods = [s.strip() for s in methods.split(",") if s.strip()]
    out: list[Method] = []
    for m in methods:
        if isinstance(m, Schedule):
            out.append(m)
            continue
        if not isinstance(m, str):
            raise ValueError(f"a method must be a Schedule or a name, got {type(m).__name__}")
        if m == "all":
            for _, factory in REGISTRY.values():
                out.extend(factory(grid))
        elif m in REGISTRY:
            out.extend(REGISTRY[m][1](grid))
        elif "=" in m and m.split("=", 1)[0] in PARAMETRIC:
            key, value = m.split("=", 1)
            try:
                out.append(PARAMETRIC[key](float(value)))
            except ValueError as e:
                raise ValueError(f"bad method {m!r}: {e}") from e
        else:
            known = [*REGISTRY, "all", "tuned", "tuned:", *(f"{k}=" for k in PARAMETRIC)]
            close = difflib.get_close_matches(m, known, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown method {m!r}.{hint} Known methods: {', '.join(known)} "
                             "(fixed-lr=LR and fixed-c=C name one fixed schedule)")
    if not out:
        raise ValueError("no methods to evaluate")
    unique: list[Method] = []
    names: dict[str, int] = {}
    for m in out:  # unique names: results are keyed by them
        name = method_name(m)
        if name in names and isinstance(m, str):
            continue  # a solver named twice runs once
        if name in names:
            names[name] += 1
            m.name = f"{name}#{names[name]}"
        else:
            names[name] = 1
        unique.append(m)
    return unique


# ----------------------------------------------------------------------------- one run
def run_schedule(schedule: Schedule, env_kwargs: dict, seed_index: int, *, seed: int = 0,
                 env: NMFEnv | None = None, split: str = "test") -> Trace:
    """Run ``schedule`` for one episode on instance ``split_seeds(split)[seed_index]`` (reset seed
    :func:`lrenv.problems.reset_seed` of that instance and ``seed``, so every method starts from the same
    point) and return its :class:`Trace`.

    ``env_kwargs`` are :class:`lrenv.NMFEnv` keywords (problem, problem_params, budget, device, ...);
    the schedule's action mode and overrides are added. Pass ``env`` to reuse an environment built
    with :func:`schedule_env_kwargs`.
    """
    env = env or NMFEnv(**schedule_env_kwargs(schedule, env_kwargs))
    if isinstance(schedule, PolicySchedule):
        schedule.check_spaces(env.observation_space, env.action_space)
    instance = int(split_seeds(split)[seed_index])
    obs, info = env.reset(seed=reset_seed(instance, seed), options={"instance": instance})
    schedule.reset(env.oracle, np.random.default_rng([seed, instance, 1]))
    infos, wall = [info], [0.0]
    state, start = None, np.ones(1, dtype=bool)
    t0 = time.perf_counter()
    while True:
        action, state = schedule.predict(obs, state=state, episode_start=start, deterministic=True)
        start = np.zeros(1, dtype=bool)
        obs, _, terminated, truncated, info = env.step(action)
        wall.append(time.perf_counter() - t0)
        infos.append(info)
        if terminated or truncated:
            break
    return trace_from_infos(schedule.name, instance, infos, wall, budget=env.task.budget,
                            divergence_factor=env.task.divergence_factor, target_metric=env.family.target_metric,
                            heldout_reference=float(env.problem.info.get("truth_heldout_mse", math.nan)),
                            seed_index=seed_index, extra_loss_evals=schedule.extra_loss_evals)


# ----------------------------------------------------------------------------- aggregates
def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of the finite ``values`` (seeded); NaNs if none."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(samples, len(x)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _stat(rows: list[dict], key: str, fn: Callable[[np.ndarray], Any]) -> float:
    x = np.array([r[key] for r in rows], dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(fn(x)) if len(x) else math.nan


def aggregate(rows: list[dict], *, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Per-method aggregates of results rows, in the order methods first appear."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for name, rs in by.items():
        ett = [r["epochs_to_target"] for r in rs if r["reached_target"]]
        lo, hi = bootstrap_ci(ett, seed=seed)
        auc_lo, auc_hi = bootstrap_ci([r["auc_log_loss"] for r in rs], seed=seed)
        out[name] = {
            "runs": len(rs),
            "success_rate": sum(bool(r["reached_target"]) for r in rs) / len(rs),
            "diverged_rate": sum(bool(r["diverged"]) for r in rs) / len(rs),
            "epochs_to_target_mean": float(np.mean(ett)) if ett else math.nan,
            "epochs_to_target_median": float(np.median(ett)) if ett else math.nan,
            "epochs_to_target_ci95": [lo, hi],
            "wall_to_target_median": _stat(rs, "wall_to_target", np.median),
            "wall_time_mean": _stat(rs, "wall_time", np.mean),
            "final_loss_median": _stat(rs, "final_loss", np.median),
            "best_loss_median": _stat(rs, "best_loss", np.median),
            "heldout_mse_median": _stat(rs, "heldout_mse", np.median),
            "heldout_ratio_median": _stat(rs, "heldout_ratio", np.median),
            "auc_log_loss_mean": _stat(rs, "auc_log_loss", np.mean),
            "auc_log_loss_ci95": [auc_lo, auc_hi],
            "extra_loss_evals_mean": _stat(rs, "extra_loss_evals", np.mean),
            "mean_lr_W_mean": _stat(rs, "mean_lr_W", np.mean),
            "mean_scale_W_mean": _stat(rs, "mean_scale_W", np.mean),
        }
    return out


def _fmt(x: Any, spec: str = ".4g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def summary_markdown(summary: dict[str, dict[str, Any]], *, heldout: bool = False, title: str = "") -> str:
    """The per-method summary as a Markdown table."""
    cols = ["method", "success", "epochs to target: mean [95% CI]", "median", "time to target (s)",
            "final loss (median)", "AUC log10 loss", *(["held-out MSE", "÷ truth's"] if heldout else []), "diverged",
            "mean lr_W/(2/L_W)", "extra evals"]
    lines = ([f"### {title}", ""] if title else []) + ["| " + " | ".join(cols) + " |",
                                                       "|" + "|".join("---" for _ in cols) + "|"]
    for name, s in summary.items():
        lo, hi = s["epochs_to_target_ci95"]
        ett = ("–" if math.isnan(s["epochs_to_target_mean"]) else
               f"{s['epochs_to_target_mean']:.1f} [{lo:.1f}, {hi:.1f}]")
        cells = [name, f"{s['success_rate']:.2f}", ett, _fmt(s["epochs_to_target_median"], ".1f"),
                 _fmt(s["wall_to_target_median"], ".3f"), _fmt(s["final_loss_median"]), _fmt(s["auc_log_loss_mean"], ".3f"),
                 *([_fmt(s["heldout_mse_median"]), _fmt(s.get("heldout_ratio_median"), ".3g")] if heldout else []), f"{s['diverged_rate']:.2f}",
                 _fmt(s["mean_scale_W_mean"], ".3f"), _fmt(s["extra_loss_evals_mean"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- files
def _atomic_write(path: str, text: str) -> None:
    from .policy_io import unique_tmp
    tmp = unique_tmp(path)  # unique per writer: two evaluations never share a temporary file
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, range):
        return [o.start, o.stop]
    return str(o)


def _clean(o: Any) -> Any:
    """NaN/inf -> None so that the JSON is standard."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str, obj: Any) -> None:
    _atomic_write(path, json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


def write_results_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(RESULT_COLUMNS), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    _atomic_write(path, buf.getvalue())


def read_results_csv(path: str) -> list[dict]:
    """Read ``results.csv`` back with the types :func:`trace_metrics` produces."""
    ints = {"seed_index", "instance", "epochs", "extra_loss_evals"}
    bools = {"reached_target", "diverged"}
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (v if k == "method" else int(v) if k in ints else v == "True" if k in bools else float(v))
                         for k, v in r.items()})
    return rows


def default_out_dir(problem: str, seed: int, root: str = "runs") -> str:
    name = os.path.splitext(os.path.basename(str(problem)))[0] or "problem"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join(root, f"{name}__eval__{seed}__{stamp}")


CLAIM_FILE = ".lrenv-claim"
"""Created exclusively (O_EXCL) in an output directory by the evaluation that writes it."""


def _claim(directory: str) -> None:
    """Atomically claim ``directory`` for this process: exactly one of several concurrent callers succeeds."""
    try:
        fd = os.open(os.path.join(directory, CLAIM_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise ValueError(f"output directory {directory} is already used by another evaluation; refusing to mix "
                         "results (choose another --out)") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"pid {os.getpid()} {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')}\n")


def reserve_out_dir(out_dir: str | None, problem: str, seed: int) -> str:
    """Create and claim the result directory; never reuse one: an explicit existing non-empty ``out_dir`` is an
    error, a default name that exists gets a ``-2``, ``-3``... suffix. The claim is atomic (an exclusively created
    ``.lrenv-claim`` file), so of two evaluations started together into one ``--out`` exactly one proceeds."""
    try:
        if out_dir is not None:
            if os.path.exists(out_dir) and not os.path.isdir(out_dir):
                raise ValueError(f"--out {out_dir} is a file, not a directory (choose another --out)")
            if os.path.isdir(out_dir) and [f for f in os.listdir(out_dir) if f != CLAIM_FILE]:
                raise ValueError(f"output directory {out_dir} already exists and is not empty; refusing to overwrite "
                                 "results (choose another --out)")
            os.makedirs(out_dir, exist_ok=True)
            _claim(out_dir)
            return out_dir
        base = default_out_dir(problem, seed)
        candidate, k = base, 1
        while True:
            try:
                os.makedirs(candidate, exist_ok=False)
                _claim(candidate)
                return candidate
            except FileExistsError:
                k += 1
                candidate = f"{base}-{k}"
    except (NotADirectoryError, FileExistsError, PermissionError) as e:
        raise ValueError(f"cannot create output directory {out_dir or problem}: {e.strerror} ({e.filename}); "
                         "choose another --out") from None


# ----------------------------------------------------------------------------- the harness
@dataclass
class EvalResult:
    """Everything an evaluation produced."""

    rows: list[dict]
    summary: dict[str, dict[str, Any]]
    traces: dict[str, list[Trace]]
    config: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    out_dir: str | None = None
    markdown: str = ""


def _validate(seeds: int, budget: int | None, grid: Sequence[float] | None, split: str) -> None:
    n = len(split_seeds(split))
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or not 1 <= seeds <= n:
        raise ValueError(f"seeds must be an integer between 1 and {n} (number of {split} instances), got {seeds!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1):
        raise ValueError(f"budget must be a positive integer number of epochs, got {budget!r}")
    if grid is not None:
        grid = list(grid)
        if not grid:
            raise ValueError("the fixed learning-rate grid is empty")
        bad = [g for g in grid if not (isinstance(g, (int, float, np.floating)) and math.isfinite(g) and g > 0)]
        if bad:
            raise ValueError(f"fixed learning-rate grid values must be positive and finite, got {bad}")


def evaluate(methods: Iterable[Method] | str = "all", problem: str = DEFAULT_PROBLEM, problem_params: dict | None = None,
             seeds: int = 10, budget: int | None = None, device: str = "cpu", out_dir: str | None = None,
             progress: bool = True, *, seed: int = 0, grid: Sequence[float] | None = None, dtype: str = "float32",
             num_blocks: int | None = None, save: bool = True, tensorboard: bool = True,
             solver_options: dict[str, dict] | None = None, verbose: bool = True,
             threads: int | None = 1, split: str = "test", batched: bool = True,
             tuned: str | None = None, workers: int | None = None) -> EvalResult:
    """Run every method on the instances ``SPLITS[split][:seeds]`` and score them.

    ``methods``: schedules, solver names or registry names (``'all'``: every method applicable to the
    family; explicitly named solvers that do not apply are skipped with a note). ``save=False`` writes
    nothing. Returns an :class:`EvalResult`; with ``save`` the directory holds ``results.csv``,
    ``summary.json``, ``summary.md``, ``config.json``, ``loss_curves.png``, ``lr_history.png`` and
    TensorBoard logs in ``tb/``. ``threads``: torch CPU threads during the evaluation (default 1:
    these problems are too small to gain from more, and spinning threads on a busy machine cost
    10-1000x; None keeps torch's setting). ``batched`` (default): the batchable schedules step all their runs
    together (:func:`lrenv.batch_eval.run_batched`) and the torch optimizers run all instances together
    (:func:`lrenv.solvers.run_solvers`); ``False`` runs every instance on its own. Same results either way.
    ``workers``: how many of the evaluation's jobs (a batched group of runs, one method's runs) run at once, each in
    a forked process of its own on one torch thread (None: one per available core, at most
    :data:`lrenv.parallel.MAX_WORKERS`; jobs run one after another where :func:`lrenv.parallel.can_fork` says
    no: a GPU, ``threads`` other than 1, no fork). The figures are drawn in the same way. The results do not
    depend on it.
    """
    workers = default_workers() if workers is None else check_workers(workers)
    _validate(seeds, budget, grid, split)
    methods, tuned_options = expand_tuned(methods, problem, tuned)
    solver_options = {**tuned_options, **(solver_options or {})}
    from threadpoolctl import threadpool_limits
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        with threadpool_limits(threads):  # numpy/scikit-learn BLAS threads of the outside solvers
                return _evaluate(methods, problem, problem_params, seeds, budget, device, out_dir, progress, seed=seed,
                             grid=grid, dtype=dtype, num_blocks=num_blocks, save=save, tensorboard=tensorboard,
                             solver_options=solver_options, verbose=verbose, split=split, batched=batched,
                             workers=workers, threads=threads)
    finally:
        torch.set_num_threads(previous)


GROUP_CHUNK = 2 * MAX_BATCH
"""Runs per job of a batched group: a group larger than this is split into jobs of this many runs, so the groups
of fixed schedules spread over the workers. Fixed, not derived from the worker count, so the results never depend
on how many workers ran them."""


@dataclass
class _Job:
    """A piece of an evaluation that runs on its own environment: ``run()`` returns its traces and notes."""

    label: str
    runs: int
    run: Callable[[], tuple[list[Trace], list[str]]]
    solver: bool = False


def _jobs(runnable: Sequence[Method], instances: list[int], env_kwargs: dict, *, seed: int, split: str,
          batched: bool, solver_options: dict[str, dict]) -> list[_Job]:
    """The evaluation cut into independent jobs, in the order their results are assembled: batched groups of
    schedules (every run of every method that shares env settings, :data:`GROUP_CHUNK` runs a job), then one job
    per other method (the torch optimizers run all instances together)."""
    together = [m for m in runnable if batched and isinstance(m, Schedule) and m.batchable]
    groups: dict[str, list[Schedule]] = {}
    for m in together:
        groups.setdefault(group_key(m), []).append(m)
    jobs: list[_Job] = []
    for group in groups.values():
        runs = [(m, i) for m in group for i in instances]
        for start in range(0, len(runs), GROUP_CHUNK):
            chunk = runs[start:start + GROUP_CHUNK]
            label = ", ".join(dict.fromkeys(m.name for m, _ in chunk))

            def job(chunk=chunk) -> tuple[list[Trace], list[str]]:
                return run_batched([m for m, _ in chunk], [i for _, i in chunk], env_kwargs, seed=seed), []
            jobs.append(_Job(label, len(chunk), job))
    for m in runnable:
        if m not in together:
            jobs.append(_Job(method_name(m), len(instances), functools.partial(
                _run_method, m, len(instances), env_kwargs, seed=seed, split=split, batched=batched,
                options=solver_options.get(m) if isinstance(m, str) else None), solver=True))
    return jobs


def _run_method(m: Method, seeds: int, env_kwargs: dict, *, seed: int, split: str, batched: bool,
                options: dict | None) -> tuple[list[Trace], list[str]]:
    """Every run of one method that does not share a batched engine, on an environment of its own."""
    env = NMFEnv(**(schedule_env_kwargs(m, env_kwargs) if isinstance(m, Schedule) else env_kwargs))
    if batched and isinstance(m, str) and m in TORCH_OPTIMIZERS:  # batched gradients, one optimizer per run
        return run_solvers(m, env_kwargs, range(seeds), seed=seed, env=env, options=options, split=split), []
    traces: list[Trace] = []
    for i in range(seeds):
        if isinstance(m, Schedule):
            traces.append(run_schedule(m, env_kwargs, i, seed=seed, env=env, split=split))
            continue
        try:
            traces.append(run_solver(m, env_kwargs, i, seed=seed, env=env, options=options, split=split))
        except SolverUnavailable as e:  # pragma: no cover - filtered before the jobs are made
            return traces, [f"skipped {e}"]
    return traces, []


def _run_jobs(jobs: Sequence[_Job], workers: int, bar, *, parallel: bool,
              while_waiting: Callable[[], None] | None = None) -> list[tuple[list[Trace], list[str]]]:
    """Each job's (traces, notes), in the jobs' order: with ``parallel`` and more than one worker, up to ``workers``
    jobs at once in forked processes (:func:`lrenv.parallel.fork_map`), the solver jobs handed out first (they are
    the longest single pieces); else one after another."""
    if workers == 1 or len(jobs) <= 1 or not parallel:
        out = []
        for job in jobs:
            bar.set_postfix_str(job.label[:60])
            out.append(job.run())
            bar.update(job.runs)
        return out
    bar.set_postfix_str(f"{min(workers, len(jobs))} workers")
    order = sorted(range(len(jobs)), key=lambda k: not jobs[k].solver)  # stable: solvers first, then the groups
    return fork_map(lambda k: jobs[k].run(), len(jobs), workers, order=order,
                    on_done=lambda k: bar.update(jobs[k].runs), while_waiting=while_waiting)


def _import_output_modules() -> None:
    """Import what writing the outputs needs (matplotlib, TensorBoard: ~2 s) while the workers compute."""
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    from . import plots  # noqa: F401


def _evaluate(methods: Iterable[Method] | str, problem: str, problem_params: dict | None, seeds: int,
              budget: int | None, device: str, out_dir: str | None, progress: bool, *, seed: int,
              grid: Sequence[float] | None, dtype: str, num_blocks: int | None, save: bool, tensorboard: bool,
              solver_options: dict[str, dict] | None, verbose: bool, split: str = "test",
              batched: bool = True, workers: int = 1, threads: int | None = 1) -> EvalResult:
    from tqdm.auto import tqdm

    resolved = resolve_methods(methods, grid)
    env_kwargs: dict[str, Any] = {"problem": problem, "problem_params": dict(problem_params or {}), "budget": budget,
                                  "device": device, "dtype": dtype, "num_blocks": num_blocks}
    env_kwargs["instances"] = split
    probe = NMFEnv(**env_kwargs)  # validates problem, params and budget early
    budget = probe.task.budget
    env_kwargs["budget"] = budget
    notes: list[str] = []
    runnable: list[Method] = []
    for m in resolved:
        if isinstance(m, str):
            reason = applicability(m, probe)
            if reason:
                notes.append(f"skipped {reason}")
                continue
        runnable.append(m)
    if not runnable:
        raise ValueError("none of the requested methods applies to this problem: " + "; ".join(notes))
    out = reserve_out_dir(out_dir, problem, seed) if save else None

    bar = tqdm(total=len(runnable) * seeds, desc=f"evaluate {probe.family.name}", disable=not progress, unit="run")
    instances = [int(split_seeds(split)[i]) for i in range(seeds)]
    jobs = _jobs(runnable, instances, env_kwargs, seed=seed, split=split, batched=batched,
                 solver_options=solver_options or {})
    traces: dict[str, list[Trace]] = {}
    parallel = can_fork(device, threads)
    for runs, job_notes in _run_jobs(jobs, workers, bar, parallel=parallel,
                                     while_waiting=_import_output_modules if save else None):
        notes.extend(job_notes)
        for tr in runs:
            tr.seed_index = instances.index(tr.instance)
            traces.setdefault(tr.method, []).append(tr)
    bar.close()
    traces = {method_name(m): traces[method_name(m)] for m in runnable if method_name(m) in traces}
    rows = [trace_metrics(tr) for trs in traces.values() for tr in trs]

    summary = aggregate(rows, seed=seed)
    fam = probe.family
    config = {
        "problem": problem, "family": fam.name, "family_params": fam.params, "description": fam.description,
        "problem_params": env_kwargs["problem_params"], "seeds": seeds, "split": split,
        "instances": instances, "reset_seeds": [reset_seed(i, seed) for i in instances], "seed": seed, "budget": budget, "device": device, "dtype": dtype,
        "num_blocks": probe.engine.cfg.num_blocks, "grid": list(grid) if grid is not None else None,
        "methods": [m.describe() if isinstance(m, Schedule)
                    else {"name": m, "class": "solver", "options": dict((solver_options or {}).get(m) or {})}
                    for m in runnable],
        "notes": notes, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "bootstrap_samples": BOOTSTRAP_SAMPLES,
    }
    title = f"{fam.description}: {seeds} {split} instances, budget {budget}"
    markdown = summary_markdown(summary, heldout=fam.has_heldout, title=title)
    if notes:
        markdown += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    result = EvalResult(rows=rows, summary=summary, traces=traces, config=config, notes=notes, out_dir=out,
                        markdown=markdown)
    if out is not None:
        write_outputs(result, tensorboard=tensorboard, workers=workers if parallel else 1)
    if verbose:
        print(markdown)
        if out is not None:
            print(f"results in {out}")
    return result


def curves(traces: dict[str, list[Trace]]) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]]]:
    """Loss curves per method, and the W learning rate relative to its bound (schedules only)."""
    loss = {k: [t.loss for t in v] for k, v in traces.items()}
    with np.errstate(all="ignore"):
        scale = {k: [t.lr_W / t.bound_W for t in v] for k, v in traces.items()
                 if any(np.isfinite(t.bound_W).any() for t in v)}
    return loss, scale


def write_outputs(result: EvalResult, *, tensorboard: bool = True, workers: int = 1) -> None:
    """Write results.csv, summary.json/md, config.json, the figures and TensorBoard logs; with ``workers`` > 1 the
    figures are drawn in that many forked processes at once (:func:`lrenv.parallel.fork_map`; the caller checks
    :func:`lrenv.parallel.can_fork`)."""
    from .plots import EVALUATION_FIGURES, save_figure
    out = result.out_dir
    assert out is not None
    write_results_csv(os.path.join(out, "results.csv"), result.rows)
    write_json(os.path.join(out, "summary.json"), {"title": result.config.get("description"), "methods": result.summary,
                                                   "notes": result.notes})
    _atomic_write(os.path.join(out, "summary.md"), result.markdown)
    write_json(os.path.join(out, "config.json"), result.config)
    names = list(EVALUATION_FIGURES)
    tb_dir = os.path.join(out, "tb")

    def draw(k: int) -> np.ndarray:
        return save_figure(EVALUATION_FIGURES[names[k]](result.traces), os.path.join(out, f"{names[k]}.png"))
    if workers > 1:  # the method sub-runs of TensorBoard are written here while the workers draw
        order = sorted(range(len(names)), key=lambda k: -FIGURE_COST.get(names[k], 0))
        drawn = fork_map(draw, len(names), workers, order=order,
                         while_waiting=(lambda: write_tensorboard_methods(result, tb_dir)) if tensorboard else None)
    else:
        drawn = [draw(k) for k in range(len(names))]
        if tensorboard:
            write_tensorboard_methods(result, tb_dir)
    if tensorboard:
        write_tensorboard(result, tb_dir, images=dict(zip(names, drawn)), methods=False)


FIGURE_COST = {"loss_curves_all": 3, "lr_history": 2, "loss_curves": 1}
"""Relative drawing times of the evaluation figures (every method's curves take longest): the order to hand them
to workers."""


def write_tensorboard(result: EvalResult, tb_dir: str, images: dict[str, np.ndarray] | None = None, *,
                      methods: bool = True) -> None:
    """TensorBoard logs of an evaluation: one sub-run per method (``tb/<method>``) with shared tags, so a
    chart overlays every method: ``curve/log10_loss_over_target`` (median over seeds, per epoch; 0 = target),
    ``curve/scale_W`` and ``curve/scale_H`` (step / bound); each sub-run's HParams row holds the method and
    its metrics (failures counted at the budget), sortable in the HParams tab; the results table and the
    config as text, the figures as images (top-level run; ``images``: the figures already drawn, (height, width,
    3) uint8 by name, else they are drawn here). ``methods=False``: the top-level run only (the sub-runs are
    :func:`write_tensorboard_methods`)."""
    from torch.utils.tensorboard import SummaryWriter

    from .plots import evaluation_figures
    top = SummaryWriter(tb_dir)
    top.add_text("results", result.markdown, 0)
    top.add_text("config", "```\n" + json.dumps(_clean(result.config), indent=2, default=_json_default) + "\n```", 0)
    if images is None:
        for name, fig in evaluation_figures(result.traces).items():
            top.add_figure(name, fig, 0, close=True)
    else:
        for name, image in images.items():
            top.add_image(name, image, 0, dataformats="HWC")
    top.close()
    if methods:
        write_tensorboard_methods(result, tb_dir)


def write_tensorboard_methods(result: EvalResult, tb_dir: str) -> None:
    """The per-method sub-runs of :func:`write_tensorboard` (curves, HParams rows, metrics)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    from .plots import is_policy, pad_curves, rank_key
    for method, traces in result.traces.items():
        tag = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in method)
        # a queue for every event: at the default (10) each add_scalar waits for the writer thread (2-3 s in all)
        w = SummaryWriter(os.path.join(tb_dir, tag), max_queue=100_000)
        length = max(len(t.loss) for t in traces)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rel = pad_curves([np.where(np.isfinite(t.loss), t.loss, np.nan) / t.target_loss for t in traces], length)
            med = np.nanmedian(rel, axis=0)
            scales = {f: np.nanmedian(pad_curves([getattr(t, f"lr_{f}") / getattr(t, f"bound_{f}") for t in traces],
                                                 length - 1, "nan"), axis=0) for f in "WH"}
        for t in range(length):
            if np.isfinite(med[t]) and med[t] > 0:
                w.add_scalar("curve/log10_loss_over_target", float(np.log10(med[t])), t)
            for f, arr in scales.items():
                if t < len(arr) and np.isfinite(arr[t]) and arr[t] > 0:
                    w.add_scalar(f"curve/scale_{f}", float(arr[t]), t + 1)
        s = result.summary[method]
        ett, ratio = rank_key(traces)
        metrics = {"eval/epochs_to_target": ett, "eval/success_rate": s["success_rate"],
                   "eval/divergence_rate": s["diverged_rate"], "eval/final_loss_ratio": ratio}
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
        exp, ssi, sei = hparams_summary({"method": method, "learned": is_policy(method)}, metrics)
        for summ in (exp, ssi, sei):
            w.file_writer.add_summary(summ)
        for k, v in metrics.items():
            w.add_scalar(k, v, 0)
        w.close()


# ----------------------------------------------------------------------------- CLI
def parse_grid(text: str | None) -> list[float] | None:
    """``'1e-4,1e-3,0.01'`` or ``'lo:hi:n'`` (log-spaced) -> list of learning rates."""
    if text is None:
        return None
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            return fixed_grid(float(lo), float(hi), int(n))
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise ValueError(f"--grid: expected a comma list of learning rates or lo:hi:n, got {text!r} ({e})") from e


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{k}: {v[0]}" for k, v in REGISTRY.items()).replace("%", "%%")  # argparse formats help
    p.description = ("Score learning-rate schedules, reference solvers and trained agents on held-out instances "
                     "(the test split by default); every method starts from the same initial point per instance. Writes "
                     "results.csv, summary.json/.md, config.json, figures and TensorBoard logs to the output directory "
                     "and prints the summary table.")
    p.add_argument("--problem", default=DEFAULT_PROBLEM, help="problem family (small, medium, paper, sales, tutorial, "
                   "illcond, digits) or a path to a .npy/.npz/.csv/.mtx matrix")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE",
                   help="family parameter, e.g. m=200 or rank=5 (repeatable)")
    p.add_argument("--methods", default="all", help=f"comma-separated methods, 'all' = every one applicable to the "
                   f"family; fixed-lr=LR and fixed-c=C name one fixed schedule. Methods: {methods}")
    p.add_argument("--model", action="append", metavar="PATH", default=[],
                   help="a trained agent: run directory (model.zip, config.json, vecnormalize.pkl) or model .zip; "
                        "adds one row per model (repeatable)")
    p.add_argument("--tuned", default=None, metavar="FILE",
                   help="tuned settings for --methods tuned / tuned:NAME (default: the family's shipped "
                        "lrenv/tuned/<family>.yml, written by lrenv tune)")
    p.add_argument("--seeds", type=int, default=10, help="number of instances of the split")
    p.add_argument("--split", default="test", choices=[*SPLITS],
                   help="instances to score on: test (report), validation (tune, select), train")
    p.add_argument("--seed", type=int, default=0, help="base reset seed (initial factors, minibatch order, bootstrap)")
    p.add_argument("--budget", type=int, default=None, help="epoch budget (None: the family's)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--grid", default=None, metavar="LRS",
                   help="fixed learning-rate grid for fixed-grid: comma list or lo:hi:n log-spaced (None: 1e-5:10:7)")
    p.add_argument("--out", default=None, help="output directory (None: runs/{problem}__eval__{seed}__{time}); "
                   "an existing non-empty directory is never overwritten")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--workers", type=int, default=None,
                   help="evaluation jobs run at once, each single-threaded (default: one per available core, at most "
                        f"{MAX_WORKERS}; 1 = one after another); the results do not depend on it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run every instance in its own environment (default: the schedules, line searches and policies "
                        "step all their runs together in batched engines, and the torch optimizers run all instances "
                        "together with one optimizer each; same numbers, faster)")
    p.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")


def run(args: argparse.Namespace) -> int:
    names, solver_options = expand_tuned(args.methods or [], args.problem, args.tuned)
    methods: list[Method] = list(resolve_methods(names, parse_grid(args.grid))) if names else []
    for path in args.model:
        methods.append(load_policy(path))
    if not methods:
        raise ValueError("nothing to evaluate: give --methods and/or --model")
    evaluate(methods, problem=args.problem, problem_params=parse_problem_params(args.problem_param), seeds=args.seeds,
             split=args.split, budget=args.budget, device=args.device, out_dir=args.out, progress=not args.no_progress, seed=args.seed,
             grid=parse_grid(args.grid), tensorboard=not args.no_tensorboard, threads=args.threads or None,
             batched=not args.one_at_a_time, tuned=args.tuned, solver_options=solver_options, workers=args.workers)
    return 0

"""``lrenv factorize``: factorise a user's non-negative matrix with any schedule or reference solver.

Where ``lrenv evaluate`` *scores* schedules, this hands back the factors. The matrix is read and checked
exactly as the environment's ``matrix`` family does (:func:`lrenv.problems.matrix_family`: .npy/.npz/.csv/.mtx,
NaN = missing, the same error messages); ``--holdout F`` moves a fraction F of the observed entries into a
held-out set whose mean squared error is tracked every epoch.

Methods (``--schedule``):

================== ===========================================================================
fixed-c=C          projected minibatch SGD at lr = C/L per factor (lrenv's engine)
fixed-lr=LR        SGD at an absolute step size
armijo (and every  any schedule name ``lrenv evaluate`` knows that names a single schedule
other schedule)
RUN_DIR            a policy trained with ``lrenv train`` (its run directory or model .zip)
pretrained:NAME    a policy shipped with the package (``lrenv.schedules.pretrained_names()``)
hals               hierarchical ALS (numpy, masks supported)        :mod:`lrenv.reference`
als-masked         alternating non-negative least squares on the observed entries
als-grow           als-masked with the rank grown one component at a time (:func:`lrenv.reference.grow_rank`)
sklearn-cd         scikit-learn's coordinate-descent NMF (fully observed data only)
auto               the best measured method for the data, see :func:`choose_auto`
================== ===========================================================================

Every method runs at most ``--epochs`` epochs (solver iterations) and stops early when the best loss
improved by less than ``--tol`` (relative) over the last :data:`TOL_WINDOW` epochs (``--tol 0``: never). The loss is lrenv's
``1/2 ||M o (V - W H)||^2`` summed over the observed training entries. Results are written atomically:
``OUT.npz`` (W, H, curves, held-out mask), ``OUT.json`` (the full config and the result) and ``OUT.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .problems import ProblemFamily, loss_of, matrix_family

SOLVER_METHODS = ("als-grow", "hals", "als-masked", "sklearn-cd")
TOL_WINDOW = 10
"""Epochs over which the relative improvement of the best loss is compared with ``tol``."""


@dataclass
class FactorizeResult:
    """Factors, curves and provenance of one ``factorize`` run."""

    W: np.ndarray
    H: np.ndarray
    loss: np.ndarray
    """Training loss at epochs 0..epochs (entry 0: the initial factors)."""
    heldout_mse: np.ndarray
    """Held-out MSE at the same epochs (NaN without a held-out set)."""
    lr_W: np.ndarray
    lr_H: np.ndarray
    """Step sizes applied per epoch (SGD schedules; NaN for solvers)."""
    method: str
    stopped: str
    """'tolerance', 'budget' or 'diverged'."""
    config: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    heldout: np.ndarray | None = None
    """The held-out mask (bool, m x n), None without --holdout."""

    @property
    def epochs(self) -> int:
        return len(self.loss) - 1

    @property
    def final_heldout_mse(self) -> float:
        return float(self.heldout_mse[-1]) if len(self.heldout_mse) else math.nan

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "stopped": self.stopped, "epochs": self.epochs,
                "initial_loss": float(self.loss[0]), "final_loss": float(self.loss[-1]),
                "best_loss": float(np.nanmin(self.loss)), "heldout_mse": self.final_heldout_mse,
                "wall_s": round(self.wall_s, 3)}


# ----------------------------------------------------------------------------- choosing a method
def choose_auto(family: ProblemFamily) -> tuple[str, str]:
    """``auto``: the method that measured best on data like this (SPEC §6), and why.

    Learned and hand-made SGD schedules are not picked: on every family measured so far a reference solver
    was ahead of the best SGD schedule (sklearn-cd 0.28x the epochs on ``small``, best on ``medium`` and
    ``digits``; on ``sales`` no SGD schedule got within 10^3 of the achievable held-out error while masked ALS
    reached it)."""
    if family.masked:
        return "als-grow", ("the data has missing or held-out entries: masked non-negative ALS is the only method "
                            "measured to reach the achievable error on partially observed data (SPEC §6, sales: "
                            "held-out MSE 5.7e-5 vs 0.02-0.5 for the best SGD schedule), and growing its rank one "
                            "component at a time avoids the poor local minima that plain ALS from a random start "
                            "falls into on data whose components differ in scale (lrenv.reference.grow_rank)")
    return "sklearn-cd", ("the data is fully observed: scikit-learn's coordinate descent needed 0.28x the epochs of "
                          "the best SGD schedule on small and was the fastest method on medium and digits (SPEC §6)")


def resolve_schedule(spec: str):
    """A single SGD schedule (or policy) from its ``--schedule`` text."""
    from .evaluate import resolve_methods
    from .schedules import PRETRAINED_PREFIX, load_policy
    if spec.startswith(PRETRAINED_PREFIX) or os.path.isdir(spec) or spec.endswith(".zip"):
        return load_policy(spec)
    methods = resolve_methods(spec)
    if len(methods) != 1 or isinstance(methods[0], str):
        raise ValueError(f"--schedule {spec!r} names {len(methods)} methods; give one schedule "
                         f"(e.g. fixed-c=1.1, armijo, a run directory, pretrained:NAME) or one of "
                         f"{', '.join(SOLVER_METHODS)}, auto")
    return methods[0]


# ----------------------------------------------------------------------------- running
class _Monitor:
    """Records the curves, drives the progress bar and decides when to stop."""

    def __init__(self, family: ProblemFamily, problem, epochs: int, tol: float, progress: bool, label: str):
        self.problem, self.epochs, self.tol = problem, epochs, tol
        self.V_full = problem.V  # held-out entries keep their true values there
        self.loss: list[float] = []
        self.held: list[float] = []
        self.lr_W: list[float] = []
        self.lr_H: list[float] = []
        self.stopped = "budget"
        self.tol_from = 0
        """Epoch from which the tolerance applies (after a warm-up phase such as grow_rank's)."""
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=epochs, desc=label, unit="epoch", file=sys.stderr, dynamic_ncols=True)

    def heldout_mse(self, W: np.ndarray, H: np.ndarray) -> float:
        h = self.problem.heldout
        if h is None:
            return math.nan
        return float(np.mean((W @ H - self.V_full)[h] ** 2))

    def record(self, W: np.ndarray, H: np.ndarray, loss: float | None = None, lr=(math.nan, math.nan)) -> bool:
        """Add an epoch's state; True when the run should stop (tolerance, budget or divergence)."""
        f = loss_of(self.problem.V, W, H, self.problem.mask) if loss is None else float(loss)
        self.loss.append(f)
        self.held.append(self.heldout_mse(W, H) if np.isfinite(f) else math.nan)
        first = len(self.loss) == 1
        if not first:
            self.lr_W.append(float(lr[0]))
            self.lr_H.append(float(lr[1]))
        if self.bar is not None and not first:
            post = {"loss": f"{f:.4g}"}
            if self.problem.heldout is not None:
                post["heldout_mse"] = f"{self.held[-1]:.3g}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        if not np.isfinite(f) or f > 100.0 * self.loss[0]:
            self.stopped = "diverged"
            return True
        t = len(self.loss) - 1
        if self.tol > 0 and t >= self.tol_from + TOL_WINDOW:  # tol = 0: run the whole budget
            before, now = min(self.loss[:t - TOL_WINDOW + 1]), min(self.loss)
            if before - now <= self.tol * max(abs(before), 1e-300):
                self.stopped = "tolerance"
                return True
        return t >= self.epochs

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_solver(method: str, problem, W0: np.ndarray, H0: np.ndarray, mon: _Monitor, epochs: int):
    from .reference import grow_rank, hals, masked_als
    mon.record(W0, H0)
    cb = lambda it, W, H: mon.record(W, H)  # noqa: E731
    if method == "als-grow":
        r = W0.shape[1]
        per = max(1, min(25, epochs // (2 * r)))
        mon.tol_from = (r - 1) * per
        return grow_rank(masked_als, problem.V, W0, H0, mask=problem.mask, iters=epochs, iters_per_rank=per,
                         callback=cb)
    if method == "hals":
        return hals(problem.V, W0, H0, mask=problem.mask, iters=epochs, callback=cb)
    if method == "als-masked":
        return masked_als(problem.V, W0, H0, mask=problem.mask, iters=epochs, callback=cb)
    if problem.mask is not None:
        raise ValueError("sklearn-cd: scikit-learn's NMF cannot skip missing or held-out entries; use als-masked "
                         "or hals (both handle NaN as missing), or --schedule auto")
    from sklearn.decomposition import non_negative_factorization
    from sklearn.exceptions import ConvergenceWarning
    W, H = W0.copy(), H0.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for _ in range(epochs):
            W, H, _ = non_negative_factorization(problem.V, W=np.ascontiguousarray(W), H=np.ascontiguousarray(H),
                                                 n_components=W.shape[1], init="custom", solver="cd",
                                                 beta_loss="frobenius", max_iter=1, tol=0.0, random_state=0)
            if mon.record(W, H):
                break
    return W, H


def _run_sgd(schedule, family: ProblemFamily, mon: _Monitor, epochs: int, seed: int, device: str,
             num_blocks: int | None):
    from .env import NMFEnv
    from .schedules import PolicySchedule
    # no target: the run stops on the tolerance or the budget; divergence is the monitor's rule
    env = NMFEnv(family, instances=[0], budget=epochs, device=device, num_blocks=num_blocks,
                 **{**schedule.env_overrides, "action_mode": schedule.action_mode, "target_loss": 0.0,
                    "divergence_factor": 1e300})
    if isinstance(schedule, PolicySchedule):
        schedule.check_spaces(env.observation_space, env.action_space)
    obs, info = env.reset(seed=seed, options={"instance": 0})
    schedule.reset(env.oracle, np.random.default_rng(seed))
    W, H = env.engine.factors(0)
    mon.record(W, H, loss=info["loss"])
    state, start = None, np.ones(1, dtype=bool)
    best = (W, H, info["loss"])
    while True:
        action, state = schedule.predict(obs, state=state, episode_start=start, deterministic=True)
        start = np.zeros(1, dtype=bool)
        obs, _, terminated, truncated, info = env.step(action)
        W, H = env.engine.factors(0)
        if np.isfinite(info["loss"]) and info["loss"] < best[2]:
            best = (W, H, info["loss"])
        if mon.record(W, H, loss=info["loss"], lr=(info["lr_W"], info["lr_H"])) or terminated or truncated:
            break
    if mon.stopped == "diverged":  # hand back the best factors seen, not the diverged ones
        return best[0], best[1]
    return W, H


def factorize(data: str | os.PathLike | np.ndarray, rank: int, *, schedule: str = "auto", epochs: int = 300,
              holdout: float = 0.0, tol: float = 1e-6, device: str = "cpu", seed: int = 0,
              num_blocks: int | None = None, progress: bool = False) -> FactorizeResult:
    """Factorise ``data`` (a matrix file or array; NaN = missing) at ``rank`` with ``schedule`` (see the module
    docstring). Raises ValueError with a clear message for bad input."""
    kw = dict(rank=rank, holdout=holdout, budget=max(int(epochs), 1) if isinstance(epochs, (int, np.integer)) else 1)
    if isinstance(data, np.ndarray):
        family = matrix_family(array=data, name="array", **kw)
        source, raw = "array", np.asarray(data, dtype=np.float64)
    else:
        family = matrix_family(data, **kw)
        source, raw = os.fspath(data), load_raw(data)
    result = fit_family(family, schedule, epochs=epochs, tol=tol, device=device, seed=seed, num_blocks=num_blocks,
                        progress=progress)
    result.config.update(data=source, holdout=float(holdout), missing_entries=int(np.isnan(raw).sum()))
    return result


def fit_family(family: ProblemFamily, schedule: str = "auto", *, epochs: int = 300, tol: float = 1e-6,
               device: str = "cpu", seed: int = 0, num_blocks: int | None = None, progress: bool = False,
               problem=None) -> FactorizeResult:
    """Run method ``schedule`` on ``family``'s instance 0 (or ``problem``) from the family's initialisation
    drawn with ``seed``; the building block of :func:`factorize` and :class:`lrenv.SGDNMF`."""
    if not (isinstance(epochs, (int, np.integer)) and epochs >= 1):
        raise ValueError(f"--epochs must be a positive integer, got {epochs!r}")
    if not tol >= 0:
        raise ValueError(f"--tol must be >= 0, got {tol}")
    problem = family.instance(0) if problem is None else problem
    method, reason = schedule, ""
    if schedule == "auto":
        method, reason = choose_auto(family)
    sched = None if method in SOLVER_METHODS else resolve_schedule(method)
    if sched is not None and num_blocks is not None and not 1 <= num_blocks <= family.m:
        raise ValueError(f"--num-blocks must be between 1 and the number of rows ({family.m}), got {num_blocks}")
    label = method if sched is None else sched.name
    mon = _Monitor(family, problem, int(epochs), tol, progress, label)
    t0 = time.perf_counter()
    try:
        if sched is None:
            W0, H0 = problem.init(np.random.default_rng(seed))
            W, H = _run_solver(method, problem, W0, H0, mon, int(epochs))
        else:
            W, H = _run_sgd(sched, family, mon, int(epochs), seed, device, num_blocks)
    finally:
        mon.close()
    wall = time.perf_counter() - t0
    m, n = family.m, family.n
    config = {"shape": [m, n], "rank": int(family.rank), "schedule": schedule, "method": label,
              "auto_reason": reason, "epochs": int(epochs), "tol": float(tol), "tol_window": TOL_WINDOW,
              "device": device if sched is not None else "cpu (numpy solver)", "seed": int(seed),
              "num_blocks": num_blocks,
              "observed_train_entries": m * n if problem.mask is None else int(problem.mask.sum()),
              "heldout_entries": 0 if problem.heldout is None else int(problem.heldout.sum()),
              "loss": "1/2 sum over observed training entries of (V - WH)^2",
              "schedule_settings": sched.describe() if sched is not None else {"name": method}}
    nan = np.full(max(len(mon.loss) - 1, 0), np.nan)
    return FactorizeResult(W=np.asarray(W), H=np.asarray(H), loss=np.array(mon.loss), heldout_mse=np.array(mon.held),
                           lr_W=np.array(mon.lr_W) if mon.lr_W else nan, lr_H=np.array(mon.lr_H) if mon.lr_H else nan,
                           method=label, stopped=mon.stopped, config=config, wall_s=wall, heldout=problem.heldout)


def load_raw(path) -> np.ndarray:
    from .problems import load_matrix
    return np.asarray(load_matrix(path), dtype=np.float64)


# ----------------------------------------------------------------------------- writing
def _atomic(path: str, write) -> None:
    """Write through a temporary file in the same directory, then rename: never a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def output_paths(out: str | os.PathLike) -> tuple[str, str, str]:
    """``OUT.npz``, ``OUT.json``, ``OUT.png`` for ``--out OUT`` (a trailing .npz/.json/.png is dropped)."""
    out = os.fspath(out)
    base, ext = os.path.splitext(out)
    if ext.lower() not in (".npz", ".json", ".png"):
        base = out
    return base + ".npz", base + ".json", base + ".png"


def write_result(result: FactorizeResult, out: str | os.PathLike) -> tuple[str, str, str]:
    """Write ``result`` atomically; returns the three paths."""
    npz, js, png = output_paths(out)
    directory = os.path.dirname(os.path.abspath(npz))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"--out: directory {directory} does not exist; create it first")
    arrays = dict(W=result.W, H=result.H, loss=result.loss, heldout_mse=result.heldout_mse, lr_W=result.lr_W,
                  lr_H=result.lr_H)
    if result.heldout is not None:
        arrays["heldout_mask"] = result.heldout

    def save_npz(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    import stable_baselines3
    import torch
    from . import __version__
    doc = {"config": result.config, "result": result.summary(),
           "versions": {"lrenv": __version__, "numpy": np.__version__, "torch": torch.__version__,
                        "stable_baselines3": stable_baselines3.__version__, "python": sys.version.split()[0]}}
    text = json.dumps(doc, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))

    def save_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    _atomic(npz, save_npz)
    _atomic(png, lambda tmp: plot_curve(result, tmp))
    _atomic(js, save_json)  # last: its presence means the run's files are complete
    return npz, js, png


def plot_curve(result: FactorizeResult, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(np.arange(len(result.loss)), result.loss, label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (1/2 sum of squared errors, observed entries)")
    if np.isfinite(result.heldout_mse).any():
        ax2 = ax.twinx()
        ax2.semilogy(np.arange(len(result.heldout_mse)), result.heldout_mse, color="C1", label="held-out MSE")
        ax2.set_ylabel("held-out MSE")
        ax2.legend(loc="lower left", bbox_to_anchor=(0.0, 0.08))
    ax.legend(loc="lower left")
    ax.set_title(f"{result.method}: {result.stopped} after {result.epochs} epochs")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="matrix file: .npy, .npz, .csv or .mtx (NaN = missing entry)")
    p.add_argument("--rank", type=int, required=True, help="number of components")
    p.add_argument("--schedule", default="auto",
                   help="fixed-c=C, fixed-lr=LR, armijo, cosine, ..., a run directory, pretrained:NAME, "
                        f"{', '.join(SOLVER_METHODS)}, or auto (the best measured method for the data)")
    p.add_argument("--epochs", type=int, default=300, help="epoch (solver iteration) budget")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction of observed entries held out")
    p.add_argument("--tol", type=float, default=1e-6,
                   help=f"stop when the best loss improved by less than this (relative) over {TOL_WINDOW} epochs "
                        "(0: run the whole budget)")
    p.add_argument("--device", default="cpu", help="torch device of SGD schedules (cpu, cuda); solvers run on numpy")
    p.add_argument("--num-blocks", type=int, default=None, help="row minibatches per SGD epoch (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial factors and the minibatch order")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.npz, OUT.json and OUT.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    output_paths(args.out)
    directory = os.path.dirname(os.path.abspath(output_paths(args.out)[0]))
    if not os.path.isdir(directory):  # before the work, not after it
        raise FileNotFoundError(f"--out: directory {directory} does not exist; create it first")
    result = factorize(args.data, args.rank, schedule=args.schedule, epochs=args.epochs, holdout=args.holdout,
                       tol=args.tol, device=args.device, seed=args.seed, num_blocks=args.num_blocks,
                       progress=not args.no_progress)
    npz, js, png = write_result(result, args.out)
    s = result.summary()
    why = f" ({result.config['auto_reason']})" if result.config["auto_reason"] else ""
    held = f", held-out MSE {s['heldout_mse']:.4g}" if np.isfinite(s["heldout_mse"]) else ""
    print(f"method: {result.method}{why}")
    print(f"{result.stopped} after {result.epochs} epochs: loss {s['final_loss']:.6g}{held}; wrote {npz}, {js}, {png}")
    if result.stopped == "diverged":
        print("the run diverged (the factors written are the best seen); try a smaller step (fixed-c=0.5), "
              "armijo, or a reference solver (--schedule auto)", file=sys.stderr)
        return 1
    return 0

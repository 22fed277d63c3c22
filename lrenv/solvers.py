"""Reference solvers outside the environment, scored on the same instance, init and metric.

Every solver starts from the environment's initial factors for the same (instance, seed) pair and
records the loss ``F`` (the engine's convention: ``1/2 ||M o (WH - V)||^2 + reg/2 ||x||^2``) after
each of its iterations; one iteration counts as one "epoch". Like an episode, a run stops when the
loss reaches the instance's target or diverges.

- ``adam``: Adam on the same row minibatches as the engine's (the engine's row partition, a fresh
  visiting order each epoch), with ReduceLROnPlateau on the epoch loss; projected onto >= 0 for
  non-negative families. The learning rate is relative to the RMS of the initial parameters.
- Tuning-free optimizers through their own PyPI packages (the optional extra
  ``pip install "lrenv[baselines]"``), on exactly Adam's minibatches and projection, with their
  published defaults: ``prodigy`` (prodigyopt), ``dadapt-sgd`` / ``dadapt-adam`` (dadaptation),
  ``schedulefree-sgd`` (schedulefree; its loss is evaluated at the averaged iterate, ``eval()`` mode),
  ``dog`` / ``ldog`` (dog-optimizer). A missing package makes :func:`applicability` give a one-line
  reason, so the harness skips the method with a note. :func:`run_solvers` runs the instances of an evaluation
  together: their minibatch gradients in batched products, one optimizer object per instance (so the optimizers'
  global statistics stay per instance) — except Adam, DoG/LDoG and schedule-free SGD, whose updates
  :class:`_BatchedAdam`, :class:`_BatchedDoG` and :class:`_BatchedScheduleFree` apply to all instances at once
  (learning rates, distances, gradient sums and averaging weights per instance); the same trajectories as one at a
  time.
- ``hals`` / ``als-masked``: :func:`lrenv.reference.hals` (non-negative families without
  regularisation, masked or not) and :func:`lrenv.reference.masked_als` (alternating non-negative --
  or, for signed families, plain -- least squares over the observed entries; the reference for
  families with missing or held-out entries), one iteration per epoch.
- ``sklearn-cd`` / ``sklearn-mu``: scikit-learn's NMF, one solver iteration per epoch (warm started
  with ``init='custom'``). Fully observed, unregularised non-negative families only.
- ``lm``: Levenberg-Marquardt (damped Gauss-Newton on all parameters, explicit Jacobian); the
  reference floor of ``illcond``. Small problems only. The damping is capped (``lam_max``): when no
  step decreases the loss even at the cap, the point is stationary to working precision and the run
  ends there (``notes['stopped'] = 'damping saturated'``), so retries cost at most ``max_tries`` extra
  loss evaluations per epoch and a converged run does not burn the rest of the budget on them.

Held-out MSE is computed against the true values of the held-out entries (the problem's V keeps them; the mask keeps them out of training).
"""

from __future__ import annotations

import importlib.util
import inspect
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .batch_eval import MAX_BATCH
from .engine import ADAM_PLATEAU_DEFAULTS, adam_reference_scale
from .engine import _sqnorm
from .env import NMFEnv
from .metrics import Trace
from .problems import reset_seed, split_seeds

BASELINES_EXTRA = 'pip install "lrenv[baselines]"'
BATCHED_RULES = True
"""Run Adam, DoG/LDoG and schedule-free SGD through their batched rules (:class:`_BatchedAdam`, :class:`_BatchedDoG`,
:class:`_BatchedScheduleFree`: all instances in one update) where their options allow; False: one package optimizer per instance, the reference path (tests
compare the two)."""
_Made = tuple[torch.optim.Optimizer, dict]
"""An optimizer and the notes to record about it."""


@dataclass(frozen=True)
class TorchOptimizer:
    """A torch optimizer run by :func:`_torch_opt` on the engine's minibatches."""

    package: str | None
    """Import name of the PyPI package it needs (None: torch itself)."""
    pip_name: str | None
    """Its name on PyPI."""
    make: Callable[[torch.Tensor, torch.Tensor, "_Problem", dict], _Made]
    """``make(W, H, prob, options) -> (optimizer, notes)``."""
    description: str


def _import(name: str) -> Any:
    """Import an optional package (only called after :func:`applicability` found it)."""
    return importlib.import_module(name)


def _adam_lr(prob: "_Problem", o: dict) -> float:
    """Adam's lr: ``lr_rel`` (popped from ``o``, default 0.02) times the RMS of the initial factors."""
    return float(o.pop("lr_rel", 0.02)) * adam_reference_scale(prob.W0, prob.H0)


def _make_adam(W: torch.Tensor, H: torch.Tensor, prob: "_Problem", o: dict) -> _Made:
    lr = _adam_lr(prob, o)
    return torch.optim.Adam([W, H], lr=lr, **o), {"lr0": lr}


def _make_prodigy(W: torch.Tensor, H: torch.Tensor, prob: "_Problem", o: dict) -> _Made:
    return _import("prodigyopt").Prodigy([W, H], **{"lr": 1.0, **o}), {}


def _make_dadapt(cls: str) -> Callable[..., _Made]:
    def make(W: torch.Tensor, H: torch.Tensor, prob: "_Problem", o: dict) -> _Made:
        return getattr(_import("dadaptation"), cls)([W, H], **{"lr": 1.0, **o}), {}
    return make


def _make_schedulefree_sgd(W: torch.Tensor, H: torch.Tensor, prob: "_Problem", o: dict) -> _Made:
    """Schedule-free SGD takes a learning rate (its defaults: lr 1, momentum 0.9): lr = c/L per factor at
    the initial point (``c``, default 1, the middle of the stable range), the same scale as ``fixed c``."""
    c = float(o.pop("c", 1.0))
    bW, bH = prob.bounds0
    lrW, lrH = c * bW / 2.0, c * bH / 2.0
    opt = _import("schedulefree").SGDScheduleFree([{"params": [W], "lr": lrW}, {"params": [H], "lr": lrH}], **o)
    return opt, {"lr_W0": lrW, "lr_H0": lrH, "c": c}


def _make_dog(cls: str) -> Callable[..., _Made]:
    def make(W: torch.Tensor, H: torch.Tensor, prob: "_Problem", o: dict) -> _Made:
        return getattr(_import("dog"), cls)([W, H], **o), {}
    return make


TORCH_OPTIMIZERS: dict[str, TorchOptimizer] = {
    "adam": TorchOptimizer(None, None, _make_adam, "Adam + ReduceLROnPlateau"),
    "prodigy": TorchOptimizer("prodigyopt", "prodigyopt", _make_prodigy, "Prodigy (lr 1)"),
    "dadapt-sgd": TorchOptimizer("dadaptation", "dadaptation", _make_dadapt("DAdaptSGD"), "D-Adaptation SGD (lr 1)"),
    "dadapt-adam": TorchOptimizer("dadaptation", "dadaptation", _make_dadapt("DAdaptAdam"),
                                  "D-Adaptation Adam (lr 1)"),
    "schedulefree-sgd": TorchOptimizer("schedulefree", "schedulefree", _make_schedulefree_sgd,
                                       "Schedule-Free SGD, lr = 1/L per factor at the start"),
    "dog": TorchOptimizer("dog", "dog-optimizer", _make_dog("DoG"), "DoG (one step size for W and H)"),
    "ldog": TorchOptimizer("dog", "dog-optimizer", _make_dog("LDoG"), "layer-wise DoG (one step size per factor)"),
}
"""Optimizers run on the engine's minibatches; all but Adam come from optional packages."""

SOLVERS = ("adam", "sklearn-cd", "sklearn-mu", "lm", "hals", "als-masked", "als-grow",
           *(k for k in TORCH_OPTIMIZERS if k != "adam"))
LM_MAX_JACOBIAN = 4_000_000
"""Largest Jacobian (residuals x parameters) the Levenberg-Marquardt solver builds."""


class SolverUnavailable(ValueError):
    """The solver cannot run on this problem family (the reason says why)."""


def applicability(name: str, env: NMFEnv) -> str | None:
    """None if solver ``name`` applies to ``env``'s problem family, else the reason it does not."""
    fam = env.family
    if name in ("sklearn-cd", "sklearn-mu"):
        if not fam.nonneg:
            return f"{name}: scikit-learn's NMF needs a non-negative problem; {fam.name} has no sign constraint"
        if fam.masked:
            return f"{name}: scikit-learn's NMF cannot handle missing or held-out entries ({fam.name} is masked)"
        if env.engine.cfg.reg:
            return f"{name}: regularised loss differs from scikit-learn's objective"
    if name in TORCH_OPTIMIZERS:
        opt = TORCH_OPTIMIZERS[name]
        if opt.package is not None and importlib.util.find_spec(opt.package) is None:
            return (f"{name}: needs the optional package {opt.pip_name} (pip install {opt.pip_name}, or "
                    f"{BASELINES_EXTRA})")
    if name == "hals":
        if not fam.nonneg:
            return f"hals: HALS is a non-negative factorisation; {fam.name} has no sign constraint (try als-masked)"
        if env.engine.cfg.reg:
            return "hals: the regularised loss differs from HALS's objective (try als-masked)"
    if name in ("als-masked", "als-grow"):
        p = env.problem if env.problem is not None else fam.instance(split_seeds('validation')[0])
        if _pinned(p):
            return (f"als-masked: {fam.name} pins bias components (fixed columns of W / rows of H), which "
                    "alternating least squares does not model; lm is this family's reference")
    if name == "lm":
        n_params = (fam.m + fam.n) * fam.rank
        if n_params * fam.m * fam.n > LM_MAX_JACOBIAN:
            return (f"lm: the explicit Jacobian would have {fam.m * fam.n} x {n_params} entries "
                    f"(limit {LM_MAX_JACOBIAN}); Levenberg-Marquardt is a reference for small problems")
    if name not in SOLVERS:
        return f"unknown solver {name!r}"
    return None


def _pinned(p: Any) -> bool:
    """Whether a problem has fixed (bias) components."""
    return bool((p.free_W is not None and not np.all(p.free_W)) or (p.free_H is not None and not np.all(p.free_H)))


class _Problem:
    """The instance and start point of an env reset, in float64 numpy, with the engine's loss."""

    def __init__(self, env: NMFEnv, info: dict):
        p = env.problem
        assert p is not None
        self.V = p.V
        self.M = None if p.mask is None else p.mask.astype(np.float64)
        self.heldout = p.heldout
        self.nonneg = p.nonneg
        self.reg = env.engine.cfg.reg
        r = p.rank
        self.free_W = np.ones(r) if p.free_W is None else p.free_W.astype(np.float64)
        self.free_H = np.ones(r) if p.free_H is None else p.free_H.astype(np.float64)
        self.W0, self.H0 = env.engine.factors(0)
        self.target = float(info["target_loss"])
        self.f0 = float(info["loss"])
        self.fit0 = float(info["fit"])
        self.target_metric = env.family.target_metric
        self.heldout_reference = float(p.info.get("truth_heldout_mse", float("nan")))
        self.row_index = env.engine.row_index[0].copy()
        self.num_blocks = env.engine.cfg.num_blocks
        self.bounds0 = tuple(float(b) for b in env.oracle.bounds())
        """(2/L_W, 2/L_H) at the initial point."""

    def fit(self, W: np.ndarray, H: np.ndarray) -> float:
        """The data term 1/2 ||M o (W H - V)||^2 (the loss less its regularisation)."""
        D = W @ H - self.V
        if self.M is not None:
            D = D * self.M
        return 0.5 * float(np.sum(D * D))

    def loss(self, W: np.ndarray, H: np.ndarray) -> float:
        f = self.fit(W, H)
        if self.reg:
            f += 0.5 * self.reg * (float(np.sum((W * self.free_W) ** 2)) + float(np.sum((H * self.free_H[:, None]) ** 2)))
        return f

    def heldout_mse(self, W: np.ndarray, H: np.ndarray) -> float:
        if self.heldout is None:
            return float("nan")
        return float(np.mean((W @ H - self.V)[self.heldout] ** 2))  # V holds the held-out entries' true values


class _Recorder:
    """Collects the loss curve and wall time of an outside solver and applies the stopping rules."""

    def __init__(self, prob: _Problem, budget: int, divergence_factor: float):
        self.prob, self.budget, self.div = prob, budget, divergence_factor
        self.loss = [prob.f0]
        self.fit = [prob.fit0]
        self.wall = [0.0]
        self.lr: list[float] = []
        self.t0 = time.perf_counter()
        self.diverged = self.reached = False

    def start(self) -> None:
        """Start the clock (after one-off costs such as imports and optimizer construction)."""
        self.t0 = time.perf_counter()

    def record(self, f: float, lr: float = float("nan"), fit: float | None = None, wall: float | None = None) -> bool:
        """Add an epoch (loss ``f``; ``fit``, the loss less its regularisation, when it differs; ``wall``, the
        seconds since :meth:`start` when not the clock's, e.g. a batch's time shared among its runs); True
        when the run should stop."""
        self.loss.append(f)
        self.fit.append(f if fit is None else fit)
        self.wall.append(time.perf_counter() - self.t0 if wall is None else wall)
        self.lr.append(lr)
        self.diverged = not np.isfinite(f) or f > self.div * self.prob.f0
        curve = self.fit if self.prob.target_metric == "fit" else self.loss
        self.reached = not self.diverged and curve[-1] <= self.prob.target
        return self.diverged or self.reached or len(self.lr) >= self.budget

    def trace(self, name: str, seed_index: int, instance: int, W: np.ndarray, H: np.ndarray,
              extra: int = 0, notes: dict | None = None) -> Trace:
        nan = np.full(len(self.lr), np.nan)
        return Trace(method=name, seed_index=seed_index, instance=instance, target_loss=self.prob.target,
                     loss=np.array(self.loss), wall=np.array(self.wall), lr_W=np.array(self.lr), lr_H=np.array(self.lr),
                     bound_W=nan, bound_H=nan.copy(), budget=self.budget, diverged=self.diverged,
                     reached_target=self.reached, heldout_mse=self.prob.heldout_mse(W, H) if not self.diverged else float("nan"),
                     extra_loss_evals=extra, divergence_factor=self.div, notes=notes or {}, fit=np.array(self.fit),
                     target_metric=self.prob.target_metric, heldout_reference=self.prob.heldout_reference)


# ----------------------------------------------------------------------------- torch optimizers
ADAM_BATCHED_OPTIONS = frozenset({"lr_rel", "patience", "factor", "betas", "eps"})
"""Adam options the batched rule (:class:`_BatchedAdam`) reproduces; any other (weight_decay, amsgrad, ...) runs
torch.optim.Adam objects, one per instance."""


class _PlateauHolder(torch.optim.Optimizer):
    """A parameterless stand-in optimizer carrying one instance's lr, for its ReduceLROnPlateau (which wants an
    Optimizer) and the trace's lr column. ``Optimizer.__init__`` is skipped on purpose: there is nothing to
    register, and its first call in a process imports ``torch._dynamo`` (~2.4 s: a third of Adam's evaluation)."""

    def __init__(self, lr: float):  # noqa: D107 - no super().__init__, see the class docstring
        self.defaults = {"lr": lr}
        self.param_groups = [{"lr": lr, "params": []}]
        self.state = {}


class _BatchedAdam:
    """``torch.optim.Adam`` (its single-tensor CPU path: no weight decay, amsgrad, maximize) for ``B`` instances
    in a few tensor operations per step instead of one ``step()`` per instance, with a learning rate per instance
    (each has its own ReduceLROnPlateau). The same arithmetic in the same order as torch's, so the trajectories
    are those of one optimizer per instance (a test compares them); state for all instances, updated for the
    active ones. ``holders[b]``: a parameterless stand-in optimizer carrying instance ``b``'s lr, so that
    ReduceLROnPlateau and the trace's lr column work on it unchanged."""

    def __init__(self, params: list[torch.Tensor], lrs: list[float], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, (self.beta1, self.beta2), self.eps = params, betas, float(eps)
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0
        self.holders = [_PlateauHolder(lr) for lr in lrs]

    def step(self, grads: list[torch.Tensor], active: list[int], at: torch.Tensor, every: bool) -> None:
        """One step of the ``active`` instances (``at`` as a tensor; ``every``: all of them) with their gradients
        ``grads`` (one per parameter, rows in ``active`` order). Active instances have all taken the same number
        of steps: they start together and a stopped one never steps again."""
        self.steps += 1
        bc1 = 1 - self.beta1 ** self.steps
        bc2_sqrt = (1 - self.beta2 ** self.steps) ** 0.5
        lr = torch.tensor([self.holders[b].param_groups[0]["lr"] for b in active], dtype=self.params[0].dtype)
        for p, m_all, v_all, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m = m_all if every else m_all.index_select(0, at)
            v = v_all if every else v_all.index_select(0, at)
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            update = (m * (-(lr / bc1)).reshape(shape)).div_(denom)  # addcdiv's order: (value * m) / denom
            if every:
                p.add_(update)
            else:
                p.index_add_(0, at, update)
                m_all.index_copy_(0, at, m)
                v_all.index_copy_(0, at, v)


DOG_BATCHED_OPTIONS = frozenset({"reps_rel", "eps"})
"""DoG/LDoG options the batched rule (:class:`_BatchedDoG`) reproduces (the package defaults otherwise: lr 1, no
weight decay, no init_eta)."""


class _EtaHolder:
    """What :func:`_effective_lr` reads of a DoG optimizer: ``param_groups[0]`` with its ``lr`` (1, the package's
    default) and, from the first step on, its ``eta``."""

    def __init__(self):
        self.param_groups: list[dict] = [{"lr": 1.0}]


class _BatchedDoG:
    """dog-optimizer's ``DoG`` (one step size for all parameters, ``layerwise=False``) and ``LDoG`` (one per
    parameter tensor) for ``B`` instances at once: per instance ``rbar = max(reps_rel (1 + ||x_0||), max_t ||x_t -
    x_0||)``, ``G = eps + sum_t ||g_t||^2``, step ``x -= (rbar / sqrt(G)) g`` (the package's ``lr`` 1), the norms
    taken over W and H together (DoG) or each factor alone (LDoG), as the package does; per-instance reductions
    in batched form. A test compares it with the package's optimizers, one per instance."""

    def __init__(self, params: list[torch.Tensor], layerwise: bool, reps_rel: float = 1e-6, eps: float = 1e-8):
        self.params, self.layerwise, self.reps_rel, self.eps = params, layerwise, float(reps_rel), float(eps)
        B = params[0].shape[0]
        self.init = [p.clone() for p in params]
        self.rbar = torch.zeros(B, len(params) if layerwise else 1, dtype=params[0].dtype)
        self.G = torch.zeros_like(self.rbar)
        self.started = False
        self.holders = [_EtaHolder() for _ in range(B)]

    def _combine(self, per_param: torch.Tensor, square: bool) -> torch.Tensor:
        """(A, P) per-parameter norms (``square``: squared sums) -> (A, P) for LDoG, or (A, 1) over all of them."""
        if self.layerwise:
            return per_param
        return per_param.sum(dim=1, keepdim=True) if square else per_param.norm(dim=1, keepdim=True)

    def step(self, grads: list[torch.Tensor], active: list[int], at: torch.Tensor, every: bool) -> None:
        pick = (lambda t: t) if every else (lambda t: t.index_select(0, at))  # noqa: E731
        flat = lambda t: t.reshape(t.shape[0], -1)  # noqa: E731
        g2 = self._combine(torch.stack([flat(g).square().sum(dim=1) for g in grads], dim=1), square=True)
        if not self.started:  # every instance takes its first step together
            x_norm = torch.stack([torch.linalg.vector_norm(flat(pick(p)), dim=1) for p in self.params], dim=1)
            rbar = self.reps_rel * (1 + self._combine(x_norm, square=False))
            G = g2 + self.eps
            self.started = True
        else:
            d = torch.stack([torch.linalg.vector_norm(flat(pick(p) - pick(p0)), dim=1)
                             for p, p0 in zip(self.params, self.init)], dim=1)
            rbar = torch.maximum(pick(self.rbar), self._combine(d, square=False))
            G = pick(self.G) + g2
        if every:
            self.rbar, self.G = rbar, G
        else:
            self.rbar[at], self.G[at] = rbar, G
        eta = rbar / torch.sqrt(G)  # (A, P or 1)
        for j, (p, g) in enumerate(zip(self.params, grads)):
            e = eta[:, j if self.layerwise else 0].reshape((-1,) + (1,) * (p.dim() - 1))
            if every:
                p.sub_(g * e)
            else:
                p.index_add_(0, at, g * -e)
        for i, b in enumerate(active):
            self.holders[b].param_groups[0]["eta"] = [float(v) for v in eta[i]]


class _LrHolder:
    """What :func:`_effective_lr` reads of a schedule-free optimizer: its first group's ``lr`` and ``scheduled_lr``
    (0 before the first step, as the package's)."""

    def __init__(self, lr: float):
        self.param_groups: list[dict] = [{"lr": lr, "scheduled_lr": 0.0}]


class _BatchedScheduleFree:
    """schedulefree's ``SGDScheduleFree`` with one parameter group per factor (lr per factor and instance) and its
    defaults (no warmup, r 0, weight_lr_power 2, no weight decay), for ``B`` instances at once. Per group, with the
    constant lr: ``c = w / sum w`` (``w = lr^2``, the package's float arithmetic, kept per instance on the host),
    ``y <- lerp(y, z, c)``, ``y += lr (beta (1 - c) - 1) g``, ``z -= lr g``; ``eval``/``train`` move the stored
    ``y`` to the average ``x`` and back. A test compares it with the package's optimizers, one per instance."""

    def __init__(self, params: list[torch.Tensor], lrs: list[list[float]], momentum: float):
        self.params, self.momentum = params, float(momentum)
        self.lr = np.asarray(lrs, dtype=np.float64)  # (B, P)
        self.weight_sum = np.zeros_like(self.lr)
        self.z: list[torch.Tensor] | None = None  # created at the first step, as the package does
        self.holders = [_LrHolder(float(lr[0])) for lr in lrs]

    def _rows(self, at: torch.Tensor, every: bool, fn) -> None:
        """Apply ``fn(y, z)`` in place to the active rows of every parameter and its ``z``."""
        for p, z_all in zip(self.params, self.z or []):
            if every:
                fn(p, z_all)
                continue
            y, z = p.index_select(0, at), z_all.index_select(0, at)
            fn(y, z)
            p.index_copy_(0, at, y)
            z_all.index_copy_(0, at, z)

    def eval(self, at: torch.Tensor, every: bool) -> None:
        self._rows(at, every, lambda y, z: y.lerp_(z, 1 - 1 / self.momentum))

    def train(self, at: torch.Tensor, every: bool) -> None:
        self._rows(at, every, lambda y, z: y.lerp_(z, 1 - self.momentum))

    def project(self, at: torch.Tensor, every: bool) -> None:
        """Project the average ``x`` and ``z`` onto >= 0 and rebuild ``y`` (the per-instance loop's eval, clamp,
        train)."""
        self.eval(at, every)
        if self.z is None:
            for p in self.params:
                if every:
                    p.clamp_(min=0)
                else:
                    p.index_copy_(0, at, p.index_select(0, at).clamp_(min=0))
        else:
            self._rows(at, every, lambda y, z: (y.clamp_(min=0), z.clamp_(min=0)))
        self.train(at, every)

    def step(self, grads: list[torch.Tensor], active: list[int], at: torch.Tensor, every: bool) -> None:
        if self.z is None:
            self.z = [p.clone() for p in self.params]
        a = np.asarray(active)
        lr = self.lr[a]
        weight = 1.0 * lr ** 2  # ((k + 1) ** r) * lr_max ** weight_lr_power with r 0 and a constant lr
        self.weight_sum[a] = self.weight_sum[a] + weight
        ckp1 = weight / self.weight_sum[a]
        alpha = lr * (self.momentum * (1 - ckp1) - 1)
        dtype = self.params[0].dtype
        for j, (p, z_all, g) in enumerate(zip(self.params, self.z, grads)):
            shape = (-1,) + (1,) * (p.dim() - 1)
            col = lambda v: torch.as_tensor(v[:, j], dtype=dtype).reshape(shape)  # noqa: E731
            c, al, step = col(ckp1), col(alpha), col(lr)
            y = p if every else p.index_select(0, at)
            z = z_all if every else z_all.index_select(0, at)
            y.lerp_(z, c)
            y.add_(g * al)
            z.sub_(g * step)
            if not every:
                p.index_copy_(0, at, y)
                z_all.index_copy_(0, at, z)
        for b in active:
            self.holders[b].param_groups[0]["scheduled_lr"] = float(self.lr[b, 0])


def _effective_lr(opt: torch.optim.Optimizer) -> float:
    """The step size the optimizer applies now (first parameter group), for the trace's lr column:
    D-Adaptation/Prodigy's ``d * lr`` (SGD form: ``/ ||g_0||``), DoG's ``eta``, else ``lr``."""
    g = opt.param_groups[0]
    if "eta" in g:
        eta = g["eta"][0] if isinstance(g["eta"], (list, tuple)) else g["eta"]
        return float(eta)
    if "d" in g:
        return float(g["d"] * g["lr"] / g["g0_norm"]) if "g0_norm" in g else float(g["d"] * g["lr"])
    return float(g.get("scheduled_lr", g["lr"]))


def _torch_opt(probs: list[_Problem], recs: list[_Recorder], rngs: list[np.random.Generator], name: str,
               **options: Any) -> list[tuple[np.ndarray, np.ndarray, dict]]:
    """Run optimizer ``name`` of :data:`TORCH_OPTIMIZERS` on the engine's minibatches, for ``B = len(probs)``
    instances of one shape together; returns ``(W, H, notes)`` per instance. One instance is ``B = 1``.

    Each epoch visits the instance's row minibatches (the engine's partition) in a fresh random order from its
    own generator ``rngs[b]``; a minibatch's loss is ``K`` times its share (an unbiased estimate of the full
    loss, the engine's convention), so its gradient is ``K (M o R) H^T`` for the minibatch rows of ``W`` and
    ``K W_I^T (M o R)`` for ``H`` (``R = W_I H - V_I``), plus ``reg`` times the free components of all of
    ``W`` and ``H``, computed analytically for all instances in batched products; pinned components get no
    gradient, and non-negative families are projected after every step. The factors of all instances are
    stacked, ``(B, m, r)`` and ``(B, r, n)``; every instance has **its own optimizer object** over views of
    them (in-place updates write through; ``.grad`` is a view of the batched gradient), so optimizers with
    global statistics (Prodigy, D-Adaptation) stay per instance and exact; Adam, DoG/LDoG and schedule-free SGD step
    all instances in one update (:class:`_BatchedAdam`, :class:`_BatchedDoG`, :class:`_BatchedScheduleFree`, unless
    an option they do not reproduce is set). Schedule-
    free optimizers (``train()``/``eval()``) are projected on both of their sequences and scored at the
    averaged iterate. Adam (only) reduces its lr on plateaus of the epoch loss (``patience``, ``factor``),
    per instance; other ``options`` go to the optimizer's constructor. An instance that stops (target,
    divergence, budget) is recorded and frozen; the others go on. Wall times are the batch's, shared
    among the instances still running (amortised).
    """
    dt = torch.float64
    B = len(probs)
    stack = lambda arrays: torch.tensor(np.stack(arrays), dtype=dt)  # noqa: E731
    W = stack([p.W0 for p in probs])
    H = stack([p.H0 for p in probs])
    V = stack([p.V for p in probs])
    M = None if probs[0].M is None else stack([p.M for p in probs])
    fW = stack([p.free_W for p in probs])[:, None, :]
    fH = stack([p.free_H for p in probs])[:, :, None]
    pinned = not (bool((fW == 1).all()) and bool((fH == 1).all()))
    reg = probs[0].reg
    Wv, Hv = [W[b] for b in range(B)], [H[b] for b in range(B)]  # the optimizers' parameters: views
    opts, notes, plateaus = [], [], []
    adam_batched = name == "adam" and set(options) <= ADAM_BATCHED_OPTIONS and BATCHED_RULES
    for b in range(B):
        o = dict(options)
        plateau_kw = {k: o.pop(k, v) for k, v in ADAM_PLATEAU_DEFAULTS.items()} if name == "adam" else None
        if adam_batched:  # the batched rule needs only the lr (no torch Adam objects: see _PlateauHolder)
            notes.append({"lr0": _adam_lr(probs[b], o)})
            continue
        opt, note = TORCH_OPTIMIZERS[name].make(Wv[b], Hv[b], probs[b], o)
        opts.append(opt)
        notes.append(note)
    schedule_free = bool(opts) and callable(getattr(opts[0], "eval", None)) and callable(getattr(opts[0], "train", None))
    batched = None
    if adam_batched:
        defaults = inspect.signature(torch.optim.Adam).parameters  # torch's own defaults, as its objects would hold
        batched = _BatchedAdam([W, H], [n["lr0"] for n in notes],
                               betas=tuple(options.get("betas", defaults["betas"].default)),
                               eps=float(options.get("eps", defaults["eps"].default)))
        opts = batched.holders  # the lr each instance's ReduceLROnPlateau lowers
    elif name in ("dog", "ldog") and set(options) <= DOG_BATCHED_OPTIONS and BATCHED_RULES:
        batched = _BatchedDoG([W, H], layerwise=name == "ldog", **options)
        opts = batched.holders
    elif name == "schedulefree-sgd" and set(options) <= {"c"} and BATCHED_RULES:
        batched = _BatchedScheduleFree([W, H], [[n["lr_W0"], n["lr_H0"]] for n in notes],
                                       momentum=opts[0].param_groups[0]["momentum"])
        opts = batched.holders
    sf_batched = schedule_free and batched is not None
    for b in range(B):
        plateaus.append(torch.optim.lr_scheduler.ReduceLROnPlateau(opts[b], mode="min", **plateau_kw)
                        if plateau_kw is not None else None)
    if schedule_free and not sf_batched:
        for opt in opts:
            opt.train()
    blocks = _minibatches(probs)  # (B, K, b) row indices, padding rows marked -1
    K, b_rows = blocks.shape[1:]
    rows = blocks.clamp(min=0).reshape(B * K, b_rows)
    # the data of every minibatch as one contiguous (B * K, b, n) block: a minibatch is an index_select away
    flat_rows = rows.reshape(B, K * b_rows)
    take = lambda t: t.gather(1, flat_rows[..., None].expand(-1, -1, t.shape[2])).reshape(B * K, b_rows, -1)  # noqa: E731
    V_blocks = take(V)
    weight = None if M is None else take(M)  # the mask, times the padding rows' zero weight
    if bool((blocks < 0).any()):
        pad = (blocks >= 0).reshape(B * K, b_rows, 1).to(dt)
        weight = pad if weight is None else weight * pad

    def project(active: list[int]) -> None:
        if not schedule_free:
            W.clamp_(min=0)  # every slot: a frozen one is no longer read
            H.clamp_(min=0)
            return
        if sf_batched:
            batched.project(torch.as_tensor(active), len(active) == B)
            return
        for b in active:  # y = (1 - beta) z + beta x is stored in the parameters: project x and z, rebuild y
            opt = opts[b]
            opt.eval()
            for p in (Wv[b], Hv[b]):
                p.clamp_(min=0)
                if "z" in opt.state[p]:
                    opt.state[p]["z"].clamp_(min=0)
            opt.train()

    results: list[tuple[np.ndarray, np.ndarray, dict] | None] = [None] * B
    active = list(range(B))
    wall = np.zeros(B)  # amortised seconds per instance
    t_last = time.perf_counter()
    while active:
        lr_now = [_effective_lr(opts[b]) for b in active]
        order = torch.as_tensor(np.stack([rngs[b].permutation(K) for b in active]))
        at = torch.as_tensor(active)
        every = len(active) == B
        pick = (lambda t: t) if every else (lambda t: t.index_select(0, at))  # noqa: E731
        for t in range(K):
            blk = order[:, t] + at * K  # each active instance's minibatch, as a row of the (B * K) blocks
            idx = rows.index_select(0, blk)  # (A, b): its rows of W
            Wa, Ha = pick(W), pick(H)
            WI = Wa.gather(1, idx[..., None].expand(-1, -1, Wa.shape[2]))
            R = V_blocks.index_select(0, blk).baddbmm_(WI, Ha, beta=-1)  # W_I H - V_I (a private copy)
            if weight is not None:
                R.mul_(weight.index_select(0, blk))
            R.mul_(K)  # K * minibatch loss: an unbiased estimate of the full loss (the engine's convention)
            gWI = torch.bmm(R, Ha.transpose(1, 2))
            gH = torch.bmm(WI.transpose(1, 2), R)
            gW = reg * Wa * pick(fW) * pick(fW) if reg else torch.zeros_like(Wa)
            gW.scatter_add_(1, idx[..., None].expand_as(gWI), gWI)  # padding rows add exact zeros
            if reg:
                gH.add_(reg * Ha * pick(fH) * pick(fH))
            if pinned:
                gW.mul_(pick(fW))
                gH.mul_(pick(fH))
            if batched is not None:
                batched.step([gW, gH], active, at, every)
            else:
                for i, b in enumerate(active):
                    Wv[b].grad, Hv[b].grad = gW[i], gH[i]
                    opts[b].step()
            if probs[0].nonneg:
                project(active)
        if sf_batched:
            batched.eval(at, every)  # score the averaged iterate x
        elif schedule_free:
            for b in active:
                opts[b].eval()  # score the averaged iterate x
        Wa, Ha = pick(W).clone(), pick(H).clone()
        fit, loss = _fit_and_loss(Wa, Ha, pick(V), None if M is None else pick(M), reg, pick(fW), pick(fH))
        if sf_batched:
            batched.train(at, every)
        elif schedule_free:
            for b in active:
                opts[b].train()
        now = time.perf_counter()
        wall[active] += (now - t_last) / len(active)
        t_last = now
        still = []
        for i, b in enumerate(active):
            f = float(loss[i])
            if recs[b].record(f, lr_now[i], float(fit[i]) if reg else None, wall=float(wall[b])):
                results[b] = (Wa[i].numpy().copy(), Ha[i].numpy().copy(), notes[b])
            else:
                if plateaus[b] is not None:
                    plateaus[b].step(f)
                still.append(b)
        active = still
    return results  # type: ignore[return-value]


def _minibatches(probs: list[_Problem]) -> torch.Tensor:
    """(B, K, b) row indices of each instance's minibatches (the engine's partition of its layout rows;
    padding rows -1). The padding rows sit at the end of the layout, so every instance has the same
    minibatch sizes; blocks that hold only padding are dropped."""
    K = probs[0].num_blocks
    rows = np.stack([p.row_index for p in probs]).reshape(len(probs), K, -1)
    keep = (rows >= 0).any(axis=(0, 2))
    return torch.as_tensor(np.ascontiguousarray(rows[:, keep]))


def _fit_and_loss(W: torch.Tensor, H: torch.Tensor, V: torch.Tensor, M: torch.Tensor | None, reg: float,
                  fW: torch.Tensor, fH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per instance the data term ``1/2 ||M o (W H - V)||^2`` and the loss (plus ``reg/2`` times the squared
    free components): :meth:`_Problem.fit` and :meth:`_Problem.loss` for a stack of instances."""
    D = torch.baddbmm(V, W, H, beta=-1)
    if M is not None:
        D.mul_(M)
    fit = 0.5 * _sqnorm(D)
    if not reg:
        return fit, fit
    return fit, fit + 0.5 * reg * (_sqnorm(W * fW) + _sqnorm(H * fH))


# ----------------------------------------------------------------------------- HALS and masked ALS
def _reference(prob: _Problem, rec: _Recorder, name: str, **options: Any) -> tuple[np.ndarray, np.ndarray, dict]:
    """:func:`lrenv.reference.hals` / :func:`~lrenv.reference.masked_als` with one iteration per epoch
    and the recorder's stopping rules as the callback. ALS uses the family's regularisation when it
    has one, else the small ridge ``reg`` (default 1e-6)."""
    from .reference import grow_rank, hals, masked_als
    mask = None if prob.M is None else prob.M.astype(bool)

    def callback(it: int, W: np.ndarray, H: np.ndarray) -> bool:
        return rec.record(prob.loss(W, H), fit=prob.fit(W, H) if prob.reg else None)

    rec.start()
    if name == "hals":
        W, H = hals(prob.V, prob.W0, prob.H0, mask=mask, iters=rec.budget, callback=callback, **options)
        return W, H, {}
    reg = float(options.pop("reg", prob.reg or 1e-6))
    if name == "als-grow":  # masked ALS with the rank grown one component at a time (reference.grow_rank)
        W, H = grow_rank(masked_als, prob.V, prob.W0, prob.H0, mask=mask, iters=rec.budget, callback=callback,
                         reg=reg, nonneg=prob.nonneg, **options)
        return W, H, {"reg": reg}
    W, H = masked_als(prob.V, prob.W0, prob.H0, mask=mask, reg=reg, nonneg=prob.nonneg, iters=rec.budget,
                      callback=callback, **options)
    return W, H, {"reg": reg}


# ----------------------------------------------------------------------------- scikit-learn
def sklearn_update(solver: str, public: bool = False) -> Callable[[np.ndarray, np.ndarray, np.ndarray],
                                                                   tuple[np.ndarray, np.ndarray]]:
    """One iteration of scikit-learn's NMF ``solver`` ('cd' or 'mu', Frobenius loss, no regularisation) from
    ``(W, H)``: ``update(V, W, H) -> (W, H)``, the iterate ``non_negative_factorization(..., init='custom',
    max_iter=1)`` returns. By default it calls the function that one wraps, ``sklearn.decomposition._nmf``'s
    ``_fit_coordinate_descent`` / ``_fit_multiplicative_update``, directly: the public call validates its
    arguments and the whole matrix every time, ~75 % of an iteration at the small size, and the harness calls it
    once per epoch. Where those private functions are missing or take other parameters (another scikit-learn
    version), and with ``public=True``, it is the public call (a test checks both give the same iterates)."""
    from sklearn.decomposition import non_negative_factorization

    def public_update(V: np.ndarray, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W, H, _ = non_negative_factorization(V, W=np.ascontiguousarray(W), H=np.ascontiguousarray(H),
                                             n_components=W.shape[1], init="custom", solver=solver,
                                             beta_loss="frobenius", max_iter=1, tol=0.0, random_state=0)
        return W, H

    if public:
        return public_update
    try:
        from sklearn.decomposition import _nmf
        fit = {"cd": _nmf._fit_coordinate_descent, "mu": _nmf._fit_multiplicative_update}[solver]
        expected = {"cd": ["X", "W", "H", "tol", "max_iter", "l1_reg_W", "l1_reg_H", "l2_reg_W", "l2_reg_H",
                           "update_H", "verbose", "shuffle", "random_state"],
                    "mu": ["X", "W", "H", "beta_loss", "max_iter", "tol", "l1_reg_W", "l1_reg_H", "l2_reg_W",
                           "l2_reg_H", "update_H", "verbose"]}[solver]
        if list(inspect.signature(fit).parameters) != expected:
            return public_update
    except (ImportError, AttributeError):  # pragma: no cover - another scikit-learn
        return public_update

    def update(V: np.ndarray, W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        W, H = np.ascontiguousarray(W), np.ascontiguousarray(H)
        if solver == "cd":
            W, H, _ = fit(V, W, H, tol=0.0, max_iter=1, shuffle=False, random_state=0)
        else:
            W, H, *_ = fit(V, W, H, beta_loss=2, max_iter=1, tol=0.0)
        return W, H
    return update


def _sklearn(prob: _Problem, rec: _Recorder, solver: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.exceptions import ConvergenceWarning
    update = sklearn_update(solver)
    W, H = prob.W0.copy(), prob.H0.copy()
    rec.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        while True:
            # zeros are fixed points of multiplicative updates: nudge them like scikit-learn's inits do
            if solver == "mu":
                W, H = np.maximum(W, 1e-12), np.maximum(H, 1e-12)
            W, H = update(prob.V, W, H)
            if rec.record(prob.loss(W, H)):
                return W, H, {}


# ----------------------------------------------------------------------------- Levenberg-Marquardt
def _lm(prob: _Problem, rec: _Recorder, lam0: float = 1e-3, up: float = 3.0, down: float = 3.0,
        max_tries: int = 20, lam_min: float = 1e-12, lam_max: float = 1e10) -> tuple[np.ndarray, np.ndarray, dict]:
    """Marquardt's damped Gauss-Newton: solve ``(J^T J + lam diag(J^T J)) d = -J^T r``; accept and
    decrease ``lam`` if the loss drops, else increase ``lam`` and retry (each retry is an extra loss
    evaluation, at most ``max_tries`` per epoch). Non-negative families are projected after the step.

    ``lam`` stays in ``[lam_min, lam_max]``. When a trial at ``lam_max`` still does not decrease the
    loss, the step is about ``-J^T r / (lam_max diag)``, a tiny gradient step: the point is stationary
    to working precision, and the run stops there (``notes['stopped']``) instead of retrying until the
    budget ends. Trial points that overflow count as failed trials (no floating-point warnings)."""
    if not (0 < lam_min <= lam0 <= lam_max and up > 1 and down > 1 and max_tries >= 1):
        raise ValueError(f"lm: need 0 < lam_min <= lam0 <= lam_max, up > 1, down > 1, max_tries >= 1; got "
                         f"lam0={lam0}, lam_min={lam_min}, lam_max={lam_max}, up={up}, down={down}, "
                         f"max_tries={max_tries}")
    m, r = prob.W0.shape
    n = prob.H0.shape[1]
    W, H = prob.W0.copy(), prob.H0.copy()
    obs = np.ones((m, n), dtype=bool) if prob.M is None else prob.M.astype(bool)
    ii, jj = np.nonzero(obs)
    free = np.concatenate([np.tile(prob.free_W, m), np.repeat(prob.free_H, n)]).astype(bool)
    lam, extra = lam0, 0
    notes: dict[str, Any] = {}

    def residual(W: np.ndarray, H: np.ndarray) -> np.ndarray:
        res = (W @ H - prob.V)[ii, jj]
        if prob.reg:
            res = np.concatenate([res, np.sqrt(prob.reg) * (W * prob.free_W).ravel(),
                                  np.sqrt(prob.reg) * (H * prob.free_H[:, None]).ravel()])
        return res

    def jacobian(W: np.ndarray, H: np.ndarray) -> np.ndarray:
        nres = len(ii)
        J = np.zeros((nres, (m + n) * r))
        rows = np.arange(nres)
        for k in range(r):  # d r_ij / d W_ik = H_kj, d r_ij / d H_kj = W_ik
            J[rows, ii * r + k] = H[k, jj]
            J[rows, m * r + k * n + jj] = W[ii, k]
        if prob.reg:
            J = np.vstack([J, np.sqrt(prob.reg) * np.diag(free.astype(float))])
        return J[:, free]

    f = prob.loss(W, H)
    rec.start()
    while True:
        res = residual(W, H)
        J = jacobian(W, H)
        A = J.T @ J
        g = J.T @ res
        d_diag = np.maximum(np.diag(A), 1e-12)
        saturated, evals = False, 0
        for _ in range(max_tries):
            try:
                step = np.linalg.solve(A + lam * np.diag(d_diag), -g)
            except np.linalg.LinAlgError:
                step = None
            if step is not None:
                x = np.concatenate([W.ravel(), H.ravel()])
                x[free] += step
                Wn, Hn = x[:m * r].reshape(m, r), x[m * r:].reshape(r, n)
                if prob.nonneg:
                    Wn, Hn = np.maximum(Wn, 0), np.maximum(Hn, 0)
                with np.errstate(over="ignore", invalid="ignore"):
                    fn = prob.loss(Wn, Hn)
                evals += 1
                if np.isfinite(fn) and fn < f:
                    W, H, f = Wn, Hn, fn
                    lam = max(lam / down, lam_min)
                    break
            if lam >= lam_max:
                saturated = True
                break
            lam = min(lam * up, lam_max)
        extra += max(evals - 1, 0)  # one loss evaluation per epoch is the normal cost
        stop = rec.record(f, lam, prob.fit(W, H) if prob.reg else None)
        if saturated and not stop:
            notes["stopped"] = f"damping saturated at lam_max={lam_max:g} after epoch {len(rec.lr)}: stationary point"
            stop = True
        if stop:
            notes["extra"] = extra
            return W, H, notes


# ----------------------------------------------------------------------------- entry point
def run_solver(name: str, env_kwargs: dict, seed_index: int, *, seed: int = 0, options: dict | None = None,
               env: NMFEnv | None = None, split: str = "test") -> Trace:
    """Run solver ``name`` on instance ``split_seeds(split)[seed_index]`` from the same initial point as
    :func:`lrenv.evaluate.run_schedule` with the same ``seed``. Raises :class:`SolverUnavailable`
    when the solver does not apply to the family."""
    return run_solvers(name, env_kwargs, [seed_index], seed=seed, options=options, env=env, split=split)[0]


def run_solvers(name: str, env_kwargs: dict, seed_indices: Sequence[int], *, seed: int = 0,
                options: dict | None = None, env: NMFEnv | None = None, split: str = "test",
                max_batch: int = MAX_BATCH) -> list[Trace]:
    """:func:`run_solver` on every instance of ``seed_indices``, one :class:`Trace` each, in order. The torch
    optimizers run up to ``max_batch`` instances together (:func:`_torch_opt`: batched gradients, one optimizer
    per instance; the same trajectories as one at a time up to the rounding of batched products, and wall
    times shared among the instances of a batch); the other solvers run one instance at a time."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {SOLVERS}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be a positive number of instances, got {max_batch!r}")
    env = env or NMFEnv(**{"instances": split, **env_kwargs})
    reason = applicability(name, env)
    if reason:
        raise SolverUnavailable(reason)
    together = max_batch if name in TORCH_OPTIMIZERS else 1
    traces: list[Trace] = []
    for start in range(0, len(seed_indices), together):
        chunk = [int(i) for i in seed_indices[start:start + together]]
        instances = [int(split_seeds(split)[i]) for i in chunk]
        probs, recs = [], []
        for instance in instances:
            _, info = env.reset(seed=reset_seed(instance, seed), options={"instance": instance})
            probs.append(_Problem(env, info))
            recs.append(_Recorder(probs[-1], env.task.budget, env.task.divergence_factor))
        opts = dict(options or {})
        if name in TORCH_OPTIMIZERS:
            rngs = [np.random.default_rng([seed, instance, 7]) for instance in instances]
            outs = _torch_opt(probs, recs, rngs, name, **opts)
        elif name in ("hals", "als-masked", "als-grow"):
            outs = [_reference(probs[0], recs[0], name, **opts)]
        elif name == "lm":
            outs = [_lm(probs[0], recs[0], **opts)]
        else:
            outs = [_sklearn(probs[0], recs[0], name.split("-")[1])]
        for i, instance, rec, (W, H, notes) in zip(chunk, instances, recs, outs):
            extra = int(notes.pop("extra", 0))
            traces.append(rec.trace(name, i, instance, W, H, extra=extra, notes=notes))
    return traces

"""Reference solvers outside the environment, scored on the same instance, init and metric.

Every solver starts from the environment's initial factors for the same (instance, seed) pair and
records the loss ``F`` (the engine's convention: ``1/2 ||M o (WH - V)||^2 + reg/2 ||x||^2``) after
each of its iterations; one iteration counts as one "epoch". Like an episode, a run stops when the
loss reaches the instance's target or diverges.

- ``adam``: Adam on the same row minibatches as the engine's (the engine's row partition, a fresh
  visiting order each epoch), with ReduceLROnPlateau on the epoch loss; projected onto >= 0 for
  non-negative families. The learning rate is relative to the RMS of the initial parameters.
- ``sklearn-cd`` / ``sklearn-mu``: scikit-learn's NMF, one solver iteration per epoch (warm started
  with ``init='custom'``). Fully observed, unregularised non-negative families only.
- ``lm``: Levenberg-Marquardt (damped Gauss-Newton on all parameters, explicit Jacobian); the
  reference floor of ``illcond``. Small problems only.
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch

from .env import NMFEnv
from .metrics import Trace
from .problems import reset_seed, split_seeds

SOLVERS = ("adam", "sklearn-cd", "sklearn-mu", "lm")
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
    if name == "lm":
        n_params = (fam.m + fam.n) * fam.rank
        if n_params * fam.m * fam.n > LM_MAX_JACOBIAN:
            return (f"lm: the explicit Jacobian would have {fam.m * fam.n} x {n_params} entries "
                    f"(limit {LM_MAX_JACOBIAN}); Levenberg-Marquardt is a reference for small problems")
    if name not in SOLVERS:
        return f"unknown solver {name!r}"
    return None


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

    def record(self, f: float, lr: float = float("nan"), fit: float | None = None) -> bool:
        """Add an epoch (loss ``f``; ``fit``, the loss less its regularisation, when it differs); True when
        the run should stop."""
        self.loss.append(f)
        self.fit.append(f if fit is None else fit)
        self.wall.append(time.perf_counter() - self.t0)
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


# ----------------------------------------------------------------------------- Adam
def _adam(prob: _Problem, rec: _Recorder, rng: np.random.Generator, lr_rel: float = 0.02, patience: int = 5,
          factor: float = 0.5) -> tuple[np.ndarray, np.ndarray, dict]:
    dt = torch.float64
    W = torch.tensor(prob.W0, dtype=dt, requires_grad=True)
    H = torch.tensor(prob.H0, dtype=dt, requires_grad=True)
    V = torch.tensor(prob.V, dtype=dt)
    M = None if prob.M is None else torch.tensor(prob.M, dtype=dt)
    fW = torch.tensor(prob.free_W, dtype=dt)
    fH = torch.tensor(prob.free_H, dtype=dt)[:, None]
    scale = float(np.sqrt(np.mean(np.concatenate([prob.W0.ravel(), prob.H0.ravel()]) ** 2))) or 1.0
    lr = lr_rel * scale
    opt = torch.optim.Adam([W, H], lr=lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=factor, patience=patience)
    K = prob.num_blocks
    rows = prob.row_index
    blocks = [torch.as_tensor(b[b >= 0]) for b in rows.reshape(K, -1)]  # the engine's minibatches
    blocks = [b for b in blocks if len(b)]
    rec.start()
    while True:
        lr_now = opt.param_groups[0]["lr"]
        for k in rng.permutation(len(blocks)):
            idx = blocks[k]
            opt.zero_grad()
            R = W[idx] @ H - V[idx]
            if M is not None:
                R = R * M[idx]
            # K * minibatch loss: an unbiased estimate of the full loss (same convention as the engine)
            f = 0.5 * len(blocks) * (R * R).sum()
            if prob.reg:
                f = f + 0.5 * prob.reg * (((W * fW) ** 2).sum() + ((H * fH) ** 2).sum())
            f.backward()
            with torch.no_grad():
                W.grad.mul_(fW)
                H.grad.mul_(fH)
            opt.step()
            if prob.nonneg:
                with torch.no_grad():
                    W.clamp_(min=0)
                    H.clamp_(min=0)
        Wn, Hn = W.detach().numpy(), H.detach().numpy()
        loss = prob.loss(Wn, Hn)
        if rec.record(loss, lr_now, prob.fit(Wn, Hn) if prob.reg else None):
            return Wn.copy(), Hn.copy(), {"lr0": lr}
        plateau.step(loss)


# ----------------------------------------------------------------------------- scikit-learn
def _sklearn(prob: _Problem, rec: _Recorder, solver: str) -> tuple[np.ndarray, np.ndarray, dict]:
    from sklearn.decomposition import non_negative_factorization
    from sklearn.exceptions import ConvergenceWarning
    W, H = prob.W0.copy(), prob.H0.copy()
    rec.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        while True:
            # zeros are fixed points of multiplicative updates: nudge them like scikit-learn's inits do
            if solver == "mu":
                W, H = np.maximum(W, 1e-12), np.maximum(H, 1e-12)
            W, H, _ = non_negative_factorization(prob.V, W=np.ascontiguousarray(W), H=np.ascontiguousarray(H),
                                                 n_components=W.shape[1], init="custom", solver=solver,
                                                 beta_loss="frobenius", max_iter=1, tol=0.0, random_state=0)
            if rec.record(prob.loss(W, H)):
                return W, H, {}


# ----------------------------------------------------------------------------- Levenberg-Marquardt
def _lm(prob: _Problem, rec: _Recorder, lam0: float = 1e-3, up: float = 3.0, down: float = 3.0,
        max_tries: int = 20) -> tuple[np.ndarray, np.ndarray, dict]:
    """Marquardt's damped Gauss-Newton: solve ``(J^T J + lam diag(J^T J)) d = -J^T r``; accept and
    decrease ``lam`` if the loss drops, else increase ``lam`` and retry (each retry is an extra loss
    evaluation). Non-negative families are projected after the step."""
    m, r = prob.W0.shape
    n = prob.H0.shape[1]
    W, H = prob.W0.copy(), prob.H0.copy()
    obs = np.ones((m, n), dtype=bool) if prob.M is None else prob.M.astype(bool)
    ii, jj = np.nonzero(obs)
    free = np.concatenate([np.tile(prob.free_W, m), np.repeat(prob.free_H, n)]).astype(bool)
    lam, extra = lam0, 0

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
        for _ in range(max_tries):
            try:
                step = np.linalg.solve(A + lam * np.diag(d_diag), -g)
            except np.linalg.LinAlgError:
                lam *= up
                continue
            x = np.concatenate([W.ravel(), H.ravel()])
            x[free] += step
            Wn, Hn = x[:m * r].reshape(m, r), x[m * r:].reshape(r, n)
            if prob.nonneg:
                Wn, Hn = np.maximum(Wn, 0), np.maximum(Hn, 0)
            fn = prob.loss(Wn, Hn)
            extra += 1
            if np.isfinite(fn) and fn < f:
                W, H, f = Wn, Hn, fn
                lam = max(lam / down, 1e-12)
                break
            lam *= up
        extra -= 1  # one loss evaluation per epoch is the normal cost
        if rec.record(f, lam, prob.fit(W, H) if prob.reg else None):
            return W, H, {"extra": max(extra, 0)}


# ----------------------------------------------------------------------------- entry point
def run_solver(name: str, env_kwargs: dict, seed_index: int, *, seed: int = 0, options: dict | None = None,
               env: NMFEnv | None = None, split: str = "test") -> Trace:
    """Run solver ``name`` on instance ``split_seeds(split)[seed_index]`` from the same initial point as
    :func:`lrenv.evaluate.run_schedule` with the same ``seed``. Raises :class:`SolverUnavailable`
    when the solver does not apply to the family."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose from {SOLVERS}")
    env = env or NMFEnv(**{"instances": split, **env_kwargs})
    reason = applicability(name, env)
    if reason:
        raise SolverUnavailable(reason)
    instance = int(split_seeds(split)[seed_index])
    _, info = env.reset(seed=reset_seed(instance, seed), options={"instance": instance})
    prob = _Problem(env, info)
    rec = _Recorder(prob, env.task.budget, env.task.divergence_factor)
    opts = dict(options or {})
    if name == "adam":
        W, H, notes = _adam(prob, rec, np.random.default_rng([seed, instance, 7]), **opts)
    elif name == "lm":
        W, H, notes = _lm(prob, rec, **opts)
    else:
        W, H, notes = _sklearn(prob, rec, name.split("-")[1])
    extra = int(notes.pop("extra", 0))
    return rec.trace(name, seed_index, instance, W, H, extra=extra, notes=notes)

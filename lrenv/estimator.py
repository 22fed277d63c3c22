"""``lrenv.SGDNMF``: non-negative matrix factorisation as a scikit-learn estimator, fitted by lrenv's SGD engine.

The epochs run through :class:`lrenv.engine.SGDEngine` (batch 1) under any lrenv schedule, so the schedules
scored by ``lrenv evaluate`` (``fixed-c=1``, ``armijo``, a trained policy, ``pretrained:NAME``) and the reference
solvers of ``lrenv factorize`` (``hals``, ``als-masked``, ``sklearn-cd``) fit the same model:
``X ~ W H`` with ``W, H >= 0``, loss ``1/2 ||M o (X - W H)||^2`` over the observed entries ``M`` (NaN = missing).

``transform(X)`` solves for ``W`` with ``components_`` fixed: a convex non-negative least-squares problem per
row, solved exactly (batched non-negative least squares, :func:`lrenv.reference._als_rows`) rather than by SGD, so
``fit_transform(X)`` equals ``fit(X).transform(X)`` and the rows of a new ``X`` get their best codes.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data

from .problems import Problem, ProblemFamily, _nmf_init


class SGDNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Non-negative matrix factorisation ``X ~ W H`` fitted with a learning-rate schedule of lrenv.

    Parameters
    ----------
    n_components : int, default=10
        Rank of the factorisation (any rank >= 1; the SGD engine does not need it below min(n_samples, n_features)).
    schedule : str, default="armijo"
        An lrenv schedule (``fixed-c=C``, ``fixed-lr=LR``, ``armijo``, ``cosine``, a run directory,
        ``pretrained:NAME``) or a reference solver (``hals``, ``als-masked``, ``sklearn-cd``) or ``auto``
        (see :func:`lrenv.factorize.choose_auto`). The default, Armijo backtracking from the bound 2/L, costs
        a few extra loss evaluations per epoch but adapts to any data: ``fixed-c=1`` (lr = 1/L per factor)
        diverged on some of scikit-learn's random test matrices.
    max_iter : int, default=200
        Epoch (solver iteration) budget.
    tol : float, default=1e-4
        Stop when the best loss improved by less than this fraction over the last 10 epochs (0: never).
    random_state : int, RandomState or None
        Seed of the initial factors and of the minibatch order.
    num_blocks : int, default=10
        Row minibatches per SGD epoch (at most the number of samples).
    transform_max_iter : int, default=1000
        Unused since ``transform`` solves its non-negative least squares exactly (block principal pivoting);
        kept so that saved parameter grids still apply.
    device : str, default="cpu"
        Torch device of the SGD engine.

    Attributes
    ----------
    components_ : ndarray (n_components, n_features)   ``H``
    reconstruction_err_ : float   Frobenius norm of ``M o (X - W H)`` at the fitted ``W`` (observed entries)
    n_iter_ : int   epochs run
    loss_curve_ : ndarray   training loss per epoch (entry 0: the initial factors)
    n_features_in_, feature_names_in_ : as in scikit-learn
    """

    def __init__(self, n_components: int = 10, *, schedule: str = "armijo", max_iter: int = 200,
                 tol: float = 1e-4, random_state: Any = None, num_blocks: int = 10, transform_max_iter: int = 1000,
                 device: str = "cpu"):
        self.n_components = n_components
        self.schedule = schedule
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.num_blocks = num_blocks
        self.transform_max_iter = transform_max_iter
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True  # NaN marks a missing entry
        tags.input_tags.positive_only = True
        return tags

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        if not (isinstance(self.n_components, (int, np.integer)) and self.n_components >= 1):
            raise ValueError(f"n_components must be a positive integer, got {self.n_components!r}")
        if not (isinstance(self.max_iter, (int, np.integer)) and self.max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")
        if not (isinstance(self.num_blocks, (int, np.integer)) and self.num_blocks >= 1):
            raise ValueError(f"num_blocks must be a positive integer, got {self.num_blocks!r}")
        if not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol!r}")

    @staticmethod
    def _split(X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(X with missing entries as 0, mask of observed entries or None); refuses negative entries."""
        missing = np.isnan(X)
        if np.any(X[~missing] < 0):
            raise ValueError("Negative values in data passed to SGDNMF: NMF needs a non-negative matrix "
                             "(NaN marks a missing entry)")
        if missing.all():
            raise ValueError("SGDNMF: every entry of X is missing (NaN); nothing to factorise")
        return np.where(missing, 0.0, X), (~missing if missing.any() else None)

    def _seed(self) -> int:
        rs = self.random_state
        if rs is None:
            return int(np.random.default_rng().integers(2**31))
        if isinstance(rs, (int, np.integer)):
            return int(rs)
        return int(rs.randint(2**31))  # a RandomState

    # ------------------------------------------------------------------ API
    def fit(self, X, y=None):
        """Fit the factorisation to ``X`` (n_samples, n_features); NaN entries are missing."""
        self._fit(X)
        return self

    def fit_transform(self, X, y=None, **params):
        """Fit, then return ``W`` for ``X`` (see the module docstring: the same as ``fit(X).transform(X)``)."""
        return self._fit(X)

    def _fit(self, X) -> np.ndarray:
        from .factorize import fit_family
        self._check_params()
        X = validate_data(self, X, dtype=np.float64, ensure_all_finite="allow-nan", ensure_min_samples=1)
        V, mask = self._split(X)
        m, n = V.shape
        r = int(self.n_components)
        init = _nmf_init(V, r, mask)
        problem = Problem(V=V, rank=r, init=init, target_loss=0.0, mask=mask)
        family = ProblemFamily(name="X", m=m, n=n, rank=r, budget=int(self.max_iter),
                               num_blocks=min(int(self.num_blocks), m), make=lambda seed: problem,
                               masked=mask is not None, description=f"X {m}x{n}, rank {r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # gymnasium's space-precision notes
            res = fit_family(family, self.schedule, epochs=int(self.max_iter), tol=float(self.tol),
                             device=self.device, seed=self._seed(), num_blocks=min(int(self.num_blocks), m),
                             problem=problem)
        if res.stopped == "diverged":
            warnings.warn(f"SGDNMF: schedule {self.schedule!r} diverged after {res.epochs} epochs; the best factors "
                          "seen are kept. Use a smaller step (e.g. schedule='fixed-c=0.5') or 'armijo'.",
                          ConvergenceWarning, stacklevel=3)
        elif res.stopped == "budget" and self.tol > 0:
            warnings.warn(f"SGDNMF: max_iter={self.max_iter} reached before the tolerance {self.tol}; increase "
                          "max_iter to fit further.", ConvergenceWarning, stacklevel=3)
        self.components_ = np.ascontiguousarray(res.H)
        self.n_components_ = r
        self.n_iter_ = res.epochs
        self.loss_curve_ = res.loss
        self.stopped_ = res.stopped
        self.method_ = res.method
        W = self._codes(V, mask)  # as transform computes it, so fit_transform(X) == fit(X).transform(X)
        self.reconstruction_err_ = self._err(V, mask, W)
        return W

    def _codes(self, V: np.ndarray, mask: np.ndarray | None, init: np.ndarray | None = None) -> np.ndarray:
        """Exact non-negative least-squares codes W for V with H = components_ fixed (observed entries only)."""
        from .reference import _als_rows
        warm = None if init is None else np.nan_to_num(np.array(init, dtype=np.float64))
        return _als_rows(np.where(np.isfinite(V), V, 0.0), mask, self.components_, 0.0, True, warm=warm)

    def _err(self, V: np.ndarray, mask: np.ndarray | None, W: np.ndarray) -> float:
        D = W @ self.components_ - V
        if mask is not None:
            D = D * mask
        return float(np.linalg.norm(D))

    def transform(self, X):
        """Codes ``W`` (n_samples, n_components) of ``X`` given the fitted ``components_``."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=np.float64, ensure_all_finite="allow-nan", reset=False)
        V, mask = self._split(X)
        return self._codes(V, mask)

    def inverse_transform(self, X):
        """``W @ components_``: the data the codes ``X`` (n_samples, n_components) stand for."""
        check_is_fitted(self)
        from sklearn.utils import check_array
        W = check_array(X, dtype=np.float64)
        if W.shape[1] != self.components_.shape[0]:
            raise ValueError(f"inverse_transform expects {self.components_.shape[0]} components, got {W.shape[1]}")
        return W @ self.components_

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0]

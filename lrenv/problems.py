"""Problem families: seeded generators of factorisation instances (SPEC §3).

A *family* (``ProblemFamily``) fixes the shape and the kind of problem; ``family.instance(seed)``
draws one instance (``Problem``) reproducibly from the seed.

Splits (:data:`SPLITS`): three disjoint seed ranges. ``train`` is what training samples; ``validation``
is for every choice made by looking at results (training-time evaluation and model selection, baseline
tuning with ``lrenv tune``); ``test`` is what ``lrenv evaluate`` reports by default and nothing is ever
tuned on. Families built on fixed data (``tutorial``, ``digits``, a user's ``matrix``) have one matrix:
there the splits separate initialisations and minibatch orders, which evaluation derives from the
instance seed (:func:`reset_seed`).

Names accepted by :func:`make_family`:

========== ===================================================================================
small      synthetic NMF V = W0 H0 (+ noise), 1000 x 100, rank 10, 200-epoch budget
medium     same, 3000 x 300, rank 30, 1000 epochs
paper      same at the paper's size, 10000 x 1000, rank 100, 1000 epochs
sales      partially observed grocery sales, 1000 x 100, true rank 12, model rank 8; half the
           entries held out (held-out MSE reported)
tutorial   biased matrix factorisation of a 4 x 5 ratings matrix with 2 unknown entries, rank 2,
           global/row/column biases, L2 regularisation
illcond    two-layer linear net W1 W2 ~ A, A 10 x 6 with condition number ~1e5, unconstrained
digits     scikit-learn's 8x8 digits (1797 x 64 pixel intensities), NMF rank 16
matrix     a user's own non-negative matrix (``path=``): .npy, .npz, .csv, .mtx; NaN = missing
========== ===================================================================================

A path to an existing file may be given as the name itself (``make_family("data/x.npy")``).
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import inspect
import math
import os
import time
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

TRAIN_SEEDS = range(0, 1_000_000)
"""Instance seeds used for training."""
TEST_SEEDS = range(1_000_000, 2_000_000)
"""Instance seeds results are reported on; disjoint from the others."""
VALIDATION_SEEDS = range(2_000_000, 3_000_000)
"""Instance seeds for model selection and baseline tuning; disjoint from the others."""
EVAL_SEEDS = TEST_SEEDS
"""The test split (the name used before validation existed)."""
SPLITS: dict[str, range] = {"train": TRAIN_SEEDS, "validation": VALIDATION_SEEDS, "test": TEST_SEEDS}


def split_seeds(split: str) -> range:
    """The instance seeds of ``split`` ('train', 'validation' or 'test'; 'eval' is 'test')."""
    name = "test" if split == "eval" else split
    if name not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS[name]


def reset_seed(instance: int, seed: int = 0) -> int:
    """The environment reset seed that evaluation uses for ``instance``: initial factors and minibatch
    order follow from it. Derived from the instance, so on fixed-data families the splits still differ."""
    return int(np.random.SeedSequence([int(seed), int(instance)]).generate_state(1)[0])

MAX_MATRIX_ENTRIES = int(float(os.environ.get("LRENV_MAX_MATRIX_ENTRIES", 5e7)))
"""Largest matrix (m x n entries) a family accepts: 5e7 entries are 400 MB as float64, about 1 GB with the
engine's float32 copy, masks and factors. Files are checked from their header before anything is loaded.
Raise it with the environment variable ``LRENV_MAX_MATRIX_ENTRIES`` on a machine with the memory."""
REFERENCE_TIME_LIMIT_S = float(os.environ.get("LRENV_REFERENCE_TIME_S", 60.0))
"""Wall-clock limit of the scikit-learn reference solve that sets a user matrix's target (checked between
chunks of iterations; the best loss so far is used when it runs out, with a warning)."""
REFERENCE_MAX_WORK = 2e9
"""m * n * rank above which the reference solve is skipped (one iteration would take seconds): the target
then falls back to ``target_rel`` times the zero model's loss, with a warning."""
LOSS_RANGE = (1e-30, 1e30)
"""1/2 ||V||^2 must lie in this range: the engine computes in float32 (max 3.4e38, min normal 1.2e-38), and
losses, gradients and the divergence test (100x the initial loss) must neither overflow nor underflow."""


@dataclass
class Problem:
    """One factorisation instance, in float64 numpy; the engine converts it to the device dtype."""

    V: np.ndarray
    """Data matrix (m, n). Only entries in ``mask`` are trained on; held-out entries keep their true values
    (the held-out error compares with them) and truly missing entries hold 0."""
    rank: int
    """Inner dimension of the model (bias components included)."""
    init: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
    """Draws initial factors (W0 (m, rank), H0 (rank, n)) from the environment's generator."""
    target_loss: float
    """Loss at which an episode counts as converged."""
    mask: np.ndarray | None = None
    """Observed training entries (bool, (m, n)); None = all observed."""
    heldout: np.ndarray | None = None
    """Held-out entries (bool, (m, n)) whose MSE is reported but never trained on."""
    nonneg: bool = True
    reg: float = 0.0
    free_W: np.ndarray | None = None
    """Free columns of W (bool, (rank,)); pinned columns (biases) are never updated."""
    free_H: np.ndarray | None = None
    """Free rows of H (bool, (rank,))."""
    info: dict[str, Any] = field(default_factory=dict)
    """Reference values (loss at the generating factors, held-out MSE of the truth, ...)."""

    @property
    def shape(self) -> tuple[int, int]:
        return self.V.shape  # type: ignore[return-value]


@dataclass
class ProblemFamily:
    """A named generator of same-shape instances plus its defaults for the environment."""

    name: str
    m: int
    n: int
    rank: int
    budget: int
    """Default epoch budget T of an episode."""
    num_blocks: int
    """Default number of row minibatches per epoch."""
    make: Callable[[int], Problem]
    masked: bool = False
    has_heldout: bool = False
    nonneg: bool = True
    reg: float = 0.0
    """L2 regularisation weight of every instance (the engine's setting, known without drawing one)."""
    target_metric: str = "loss"
    """What the target is compared with: 'loss', or 'fit' (the loss less its regularisation)."""
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def instance(self, seed: int) -> Problem:
        """The instance for ``seed`` (deterministic)."""
        return self.make(int(seed))


# ----------------------------------------------------------------------------- helpers
def _nmf_init(V: np.ndarray, rank: int, mask: np.ndarray | None = None):
    """scikit-learn's 'random' NMF initialisation: |N(0,1)| scaled so that W0 H0 matches V's mean."""
    mean = float(V[mask].mean()) if mask is not None else float(V.mean())
    scale = np.sqrt(max(mean, 1e-12) / rank)

    def init(rng: np.random.Generator):
        W0 = scale * np.abs(rng.standard_normal((V.shape[0], rank)))
        H0 = scale * np.abs(rng.standard_normal((rank, V.shape[1])))
        return W0, H0

    return init


def _check_rank(name: str, rank: int, m: int, n: int) -> None:
    if min(m, n) < 2:
        raise ValueError(f"{name}: a {m} x {n} matrix cannot be factorised: NMF needs min(m, n) >= 2 (at least 2 "
                         "rows and 2 columns, so that some rank 1 <= r < min(m, n) exists)")
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{name}: rank must be a positive integer, got {rank!r}")
    if rank >= min(m, n):
        raise ValueError(f"{name}: rank {rank} must be smaller than min(m, n) = {min(m, n)} for a "
                         f"{m} x {n} matrix; choose rank <= {min(m, n) - 1}")


def loss_of(V: np.ndarray, W: np.ndarray, H: np.ndarray, mask: np.ndarray | None = None) -> float:
    """1/2 ||M o (V - W H)||^2 in float64 (reference values; the engine computes its own).

    Summed elementwise on purpose: a BLAS dot here wakes OpenBLAS's threads, which then spin against torch's
    for the same cores (measured: the batched env stepped 2x slower after instance generation used one)."""
    D = W @ H - V
    if mask is not None:
        D = D * mask
    return 0.5 * float(np.sum(D * D))


# ----------------------------------------------------------------------------- synthetic NMF
PAPER_PRESETS = {
    "small": dict(m=1000, n=100, rank=10, budget=200, num_blocks=10),
    "medium": dict(m=3000, n=300, rank=30, budget=1000, num_blocks=10),
    "paper": dict(m=10000, n=1000, rank=100, budget=1000, num_blocks=10),
}


def paper_family(preset: str = "small", *, m: int | None = None, n: int | None = None,
                 rank: int | None = None, density: float = 0.5, noise: float = 0.1,
                 target_factor: float = 1.0, budget: int | None = None,
                 num_blocks: int | None = None) -> ProblemFamily:
    """Synthetic NMF like the paper's: ``V = max(W0 H0 + noise, 0)`` with sparse non-negative factors.

    ``W0``, ``H0`` have U(0, 1) entries kept with probability ``density``; ``noise`` is the standard
    deviation of the additive Gaussian noise relative to the standard deviation of ``W0 H0``.
    The target loss is ``target_factor`` times the loss of the generating factors: reaching it means
    fitting the data as well as the truth does (a pure rank-r fit gets 7-9 % below it, so the target is
    crossed while the loss still falls, not decided on the final plateau). Measured on validation instances
    (fixed c = 0.8 ... 1.1): ``small`` reaches it in 70-220 epochs, ``medium`` in 460-875 — hence medium's
    budget of 1000 epochs (the paper's; at 300 no SGD schedule reached it) — and scikit-learn's coordinate
    descent in ~30 and ~77 iterations.
    """
    if preset not in PAPER_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PAPER_PRESETS)}")
    p = dict(PAPER_PRESETS[preset])
    p.update({k: v for k, v in dict(m=m, n=n, rank=rank, budget=budget, num_blocks=num_blocks).items()
              if v is not None})
    m_, n_, r_ = p["m"], p["n"], p["rank"]
    _check_rank("paper", r_, m_, n_)
    if not 0 < density <= 1:
        raise ValueError(f"paper: density must be in (0, 1], got {density}")
    if noise < 0:
        raise ValueError(f"paper: noise must be >= 0, got {noise}")

    def make(seed: int) -> Problem:
        rng = np.random.default_rng([seed, 0xA11CE])
        W0 = rng.uniform(size=(m_, r_)) * (rng.uniform(size=(m_, r_)) < density)
        H0 = rng.uniform(size=(r_, n_)) * (rng.uniform(size=(r_, n_)) < density)
        clean = W0 @ H0
        V = rng.standard_normal(clean.shape)  # in place from here on: resets are on PPO's critical path
        V *= noise * clean.std()
        V += clean
        np.maximum(V, 0.0, out=V)
        truth = loss_of(V, W0, H0)
        init = _nmf_init(V, r_)
        target = target_factor * truth if truth > 0 else 1e-6 * loss_of(V, *init(np.random.default_rng(seed)))
        return Problem(V=V, rank=r_, init=init, target_loss=target, info={"truth_loss": truth})

    return ProblemFamily(name=preset if preset != "paper" else "paper", m=m_, n=n_, rank=r_,
                         budget=p["budget"], num_blocks=p["num_blocks"], make=make,
                         description=f"synthetic NMF {m_}x{n_} rank {r_}",
                         params=dict(preset=preset, density=density, noise=noise,
                                     target_factor=target_factor, **p))


# ----------------------------------------------------------------------------- sales
def sales_family(*, products: int = 1000, stores: int = 100, true_rank: int = 12, rank: int = 8,
                 observed: float = 0.5, target_factor: float = 1.0, budget: int = 500,
                 num_blocks: int = 10) -> ProblemFamily:
    """Partially observed sales matrix (SPEC §3.2).

    ``A_p = exp(N(0,1)) * w``, ``A_s = exp(N(0,1)) * w`` with ``w = 10^linspace(0, -2, true_rank)``;
    ``sales = A_p A_s^T``; each entry is observed with probability ``observed`` and the rest is the
    held-out set. The target is ``target_factor`` times the training loss of the true top-``rank``
    factors; ``info['truth_heldout_mse']`` is their held-out MSE (the forum's reference, ~7e-5), and results
    report the held-out MSE relative to it (``heldout_ratio``): the family's point is generalisation.
    Masked ALS (the reference a user would pick) reaches the target in 110-215 iterations on most instances
    (hence the 500-epoch budget); no SGD schedule does, so SGD runs are compared by final loss and held-out error.
    """
    _check_rank("sales", rank, products, stores)
    if not 0 < observed < 1:
        raise ValueError(f"sales: observed must be in (0, 1), got {observed}")

    def make(seed: int) -> Problem:
        rng = np.random.default_rng([seed, 0x5A1E5])
        w = 10.0 ** np.linspace(0, -2, true_rank)
        Ap = np.exp(rng.standard_normal((products, true_rank))) * w
        As = np.exp(rng.standard_normal((stores, true_rank))) * w
        V = Ap @ As.T
        mask = rng.uniform(size=V.shape) < observed
        heldout = ~mask
        Wt, Ht = Ap[:, :rank], As[:, :rank].T
        truth = loss_of(V, Wt, Ht, mask)
        truth_mse = float(np.mean((Wt @ Ht - V)[heldout] ** 2))
        return Problem(V=V, rank=rank, init=_nmf_init(V, rank, mask), target_loss=target_factor * truth,
                       mask=mask, heldout=heldout, info={"truth_loss": truth, "truth_heldout_mse": truth_mse})

    return ProblemFamily(name="sales", m=products, n=stores, rank=rank, budget=budget, num_blocks=num_blocks,
                         make=make, masked=True, has_heldout=True,
                         description=f"sales {products}x{stores}, {observed:.0%} observed, rank {rank}",
                         params=dict(products=products, stores=stores, true_rank=true_rank, rank=rank,
                                     observed=observed, target_factor=target_factor, budget=budget,
                                     num_blocks=num_blocks))


# ----------------------------------------------------------------------------- tutorial
TUTORIAL_MATRIX = np.array([[3, 1, 1, 3, 1], [1, 2, 4, 1, 3], [3, 1, 1, 3, 1], [4, 3, 5, 4, 4]], dtype=float)
TUTORIAL_UNKNOWN = ((0, 4), (2, 1))
"""The two entries treated as unknown (rated by nobody)."""


def tutorial_family(*, rank: int = 2, reg: float = 0.02, target_sse: float = 1e-2, budget: int = 500,
                    num_blocks: int = 2) -> ProblemFamily:
    """Biased matrix factorisation: ``V_ij ~ mu + b_i + c_j + W_i . H_j`` on the observed entries.

    The global bias ``mu`` (mean of the observed entries) is subtracted from the data; the row and
    column biases are extra factor components against pinned ones: ``W = [P, b, 1]``,
    ``H = [Q; 1; c]``. The loss counts observed entries only and adds ``reg/2`` times the squared norm
    of every learned parameter (the gradient *adds* ``reg * x``: the original bug had the sign flipped).
    No sign constraint.

    Target: what the source's user asked for, a squared error below ``target_sse = 1e-2`` summed over the
    observed entries, *without* the regularisation term (``target_metric='fit'``: the regularised loss cannot
    go below ~0.124 here, so a target on it tests nothing about the fit). Armijo and a fixed lr of 0.1
    reach it in about 200 epochs (SPEC §6), hence the 500-epoch budget; the fitted model then predicts the
    two unknown entries within a few percent of the values the source expected.
    """
    if not target_sse > 0:
        raise ValueError(f"tutorial: target_sse must be > 0, got {target_sse}")
    m, n = TUTORIAL_MATRIX.shape
    if rank < 1 or rank >= min(m, n):
        raise ValueError(f"tutorial: rank must be between 1 and {min(m, n) - 1}, got {rank}")
    mask = np.ones((m, n), dtype=bool)
    for i, j in TUTORIAL_UNKNOWN:
        mask[i, j] = False
    mu = float(TUTORIAL_MATRIX[mask].mean())
    V = (TUTORIAL_MATRIX - mu) * mask
    R = rank + 2
    free_W = np.ones(R, dtype=bool)
    free_W[rank + 1] = False
    free_H = np.ones(R, dtype=bool)
    free_H[rank] = False

    def init(rng: np.random.Generator):
        W0 = np.zeros((m, R))
        H0 = np.zeros((R, n))
        W0[:, :rank] = 0.5 * rng.standard_normal((m, rank))
        H0[:rank] = 0.5 * rng.standard_normal((rank, n))
        W0[:, rank + 1] = 1.0
        H0[rank] = 1.0
        return W0, H0

    def make(seed: int) -> Problem:  # fit = 1/2 * squared error, hence the 1/2
        return Problem(V=V, rank=R, init=init, target_loss=0.5 * target_sse, mask=mask, nonneg=False, reg=reg,
                       free_W=free_W, free_H=free_H, info={"global_bias": mu})

    return ProblemFamily(name="tutorial", m=m, n=n, rank=R, budget=budget, num_blocks=num_blocks, make=make,
                         masked=True, nonneg=False, reg=reg, target_metric="fit",
                         description="biased MF of a 4x5 ratings matrix",
                         params=dict(rank=rank, reg=reg, target_sse=target_sse, budget=budget, num_blocks=num_blocks))


# ----------------------------------------------------------------------------- illcond
def illcond_family(*, m: int = 10, n: int = 6, hidden: int = 6, kappa: float = 1e5, target_rel: float = 0.1,
                   budget: int = 500, num_blocks: int = 2) -> ProblemFamily:
    """Factorisation in thin disguise: a two-layer linear net ``W1 W2 ~ A`` with no sign constraint.

    ``A`` (m x n) has U(0, 1) entries, each row multiplied elementwise by ``linspace(1, 1/kappa, n)``;
    ``W1`` (m x hidden) and ``W2`` (hidden x n) start N(0, 1). With the defaults ``cond(A)`` is 2e5-7e5
    (``kappa`` scales the columns; the U(0, 1) entries add their own factor: ``info['cond']``).

    Target, so that reaching it requires fitting the *smallest* singular direction the model can hold (what
    the family is for): ``F*_h + target_rel * sigma_h^2 / 2`` with ``h = min(hidden, m, n)``,
    ``sigma_h`` the h-th singular value of ``A`` and ``F*_h = 1/2 sum_{i>h} sigma_i^2`` the best rank-h loss
    (Eckart-Young; 0 by default: the problem is realisable). A schedule that fits the h-1 large directions and
    leaves the smallest one alone stops at ~``sigma_h^2 / 2``, 10x above the target: measured, cosine and
    two-phase end there after 2000 epochs, Adam and Armijo far above, while Levenberg-Marquardt (the
    family's reference floor) reaches ~1e-30 in 15-80 iterations. The old target, ``1e-6 ||A||^2 / 2``,
    sat ~1e5 above ``sigma_h^2 / 2`` and only tested the well-conditioned directions.
    """
    if not target_rel > 0:
        raise ValueError(f"illcond: target_rel must be > 0, got {target_rel}")
    if hidden < 1:
        raise ValueError(f"illcond: hidden must be >= 1, got {hidden}")
    if kappa < 1:
        raise ValueError(f"illcond: kappa must be >= 1, got {kappa}")

    def init(rng: np.random.Generator):
        return rng.standard_normal((m, hidden)), rng.standard_normal((hidden, n))

    def make(seed: int) -> Problem:
        rng = np.random.default_rng([seed, 0x111C])
        A = rng.uniform(size=(m, n)) * np.linspace(1.0, 1.0 / kappa, n)  # every row times linspace
        sv = np.linalg.svd(A, compute_uv=False)
        h = min(hidden, len(sv))
        best = 0.5 * float(np.sum(sv[h:] ** 2))
        return Problem(V=A, rank=hidden, init=init, target_loss=best + target_rel * 0.5 * float(sv[h - 1] ** 2),
                       nonneg=False, info={"cond": float(sv[0] / sv[-1]), "singular_values": sv.tolist(),
                                           "best_loss": best})

    return ProblemFamily(name="illcond", m=m, n=n, rank=hidden, budget=budget, num_blocks=num_blocks, make=make,
                         nonneg=False, description=f"two-layer linear net, A {m}x{n}, kappa ~{kappa:.0e}",
                         params=dict(m=m, n=n, hidden=hidden, kappa=kappa, target_rel=target_rel, budget=budget,
                                     num_blocks=num_blocks))


# ----------------------------------------------------------------------------- user data
def _check_entries(source: str, shape: tuple[int, ...]) -> None:
    """Refuse a matrix above :data:`MAX_MATRIX_ENTRIES` (from its shape alone, before loading it)."""
    entries = math.prod(int(d) for d in shape)
    if entries > MAX_MATRIX_ENTRIES:
        dims = " x ".join(str(int(d)) for d in shape)
        raise ValueError(f"{source}: {dims} = {entries:.3g} entries ({entries * 8 / 1e9:.3g} GB as float64) is above "
                         f"the limit of {MAX_MATRIX_ENTRIES:.3g} entries (about {MAX_MATRIX_ENTRIES * 8 / 1e9:.2g} GB "
                         "per dense copy); subsample rows or columns, or on a machine with the memory (a GPU for "
                         "training) raise the limit with LRENV_MAX_MATRIX_ENTRIES")


def _check_header(source: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    if np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"{source}: the matrix is complex ({dtype}); NMF needs real non-negative entries "
                         "(save np.abs(V) or V.real explicitly)")
    if len(shape) != 2:
        raise ValueError(f"{source}: expected a 2-D matrix, found an array of shape {tuple(shape)}")
    _check_entries(source, shape)


def validate_matrix(V: np.ndarray, source: str, *, nan_is_missing: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Check a non-negative data matrix; return ``(V with missing entries set to 0, mask or None)``.

    Refused with a message naming ``source``: non-numeric or complex data, not 2-D, min(m, n) < 2, above
    :data:`MAX_MATRIX_ENTRIES`, infinite or negative entries, every observed entry 0, and scales whose loss
    1/2 ||V||^2 falls outside :data:`LOSS_RANGE` (float32 overflow or underflow: rescale V). The float64 matrix
    is made without a second copy (no conversion when V already is float64)."""
    V = np.asarray(V)
    if np.iscomplexobj(V):
        raise ValueError(f"{source}: the matrix is complex ({V.dtype}); NMF needs real non-negative entries "
                         "(pass np.abs(V) or V.real explicitly)")
    if V.dtype == object or not np.issubdtype(V.dtype, np.number):
        raise ValueError(f"{source}: expected a numeric matrix, found dtype {V.dtype}")
    if V.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D matrix, found an array of shape {V.shape}")
    if V.size == 0:
        raise ValueError(f"{source}: the matrix is empty (shape {V.shape})")
    m, n = V.shape
    if min(m, n) < 2:
        raise ValueError(f"{source}: a {m} x {n} matrix cannot be factorised: NMF needs min(m, n) >= 2 (at least 2 "
                         "rows and 2 columns)")
    _check_entries(source, V.shape)
    V = np.array(V, dtype=np.float64) if isinstance(V, np.memmap) else V.astype(np.float64, copy=False)
    inf = np.isinf(V)
    if inf.any():
        i, j = np.argwhere(inf)[0]
        raise ValueError(f"{source}: {int(inf.sum())} infinite entries (first at row {i}, column {j}); "
                         "replace them with finite values, or with NaN to mark them missing")
    del inf
    missing = np.isnan(V)
    has_missing = bool(missing.any())
    if has_missing and not nan_is_missing:
        i, j = np.argwhere(missing)[0]
        raise ValueError(f"{source}: {int(missing.sum())} NaN entries (first at row {i}, column {j}) but "
                         "missing entries are not allowed here; pass nan_is_missing=True to treat NaN as missing")
    if has_missing and missing.all():
        raise ValueError(f"{source}: every entry is missing (NaN); nothing to factorise")
    neg = V < 0  # NaN compares False
    if neg.any():
        i, j = np.argwhere(neg)[0]
        raise ValueError(f"{source}: {int(neg.sum())} negative entries (first at row {i}, column {j}: "
                         f"{V[i, j]:g}); NMF needs a non-negative matrix")
    del neg
    if has_missing:
        V = np.where(missing, 0.0, V)
    top = float(V.max())
    if top == 0.0:
        raise ValueError(f"{source}: every observed entry is 0; there is nothing to factorise (the zero model is "
                         "exact and every target would be 0)")
    half = 0.5 * float(np.einsum("ij,ij->", V, V)) if top <= 1e15 else math.inf  # einsum: no temporary copy
    if not half <= LOSS_RANGE[1]:
        raise ValueError(f"{source}: entries up to {top:.3g} make the loss 1/2 ||V||^2 = {half:.3g} overflow float32 "
                         f"arithmetic (limit {LOSS_RANGE[1]:.0e}); divide the matrix by a constant (e.g. its maximum "
                         f"{top:.3g}) and scale the factors back")
    if half < LOSS_RANGE[0]:
        raise ValueError(f"{source}: entries at most {top:.3g} make the loss 1/2 ||V||^2 = {half:.3g} underflow "
                         f"float32 arithmetic (below {LOSS_RANGE[0]:.0e}); multiply the matrix by a constant (e.g. "
                         f"1/{top:.3g}) and scale the factors back")
    return V, (~missing if has_missing else None)


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def _read_npz(path: str) -> np.ndarray:
    with zipfile.ZipFile(path) as zf:  # headers first: nothing is decompressed before the size check
        names = [n.removesuffix(".npy") for n in zf.namelist()]
        if "format" in names and "shape" in names:  # scipy.sparse.save_npz
            with np.load(path, allow_pickle=False) as z:
                shape = tuple(int(d) for d in z["shape"])
            _check_header(path, shape, np.dtype(np.float64))
            import scipy.sparse
            return scipy.sparse.load_npz(path).toarray()
        if len(names) != 1 and "V" not in names:
            raise ValueError(f"expected one array (or one named 'V'), found {names}")
        key = "V" if "V" in names else names[0]
        with zf.open(f"{key}.npy") as f:
            shape, dtype = _npy_header(f)
        _check_header(path, shape, dtype)
    with np.load(path, allow_pickle=False) as z:
        return z[key]


def _parse_cell(text: str, row: int, col: int, path: str) -> float:
    t = text.strip()
    if t == "" or t.lower() in ("nan", "na", "n/a", "null", "none"):
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"{path}: row {row}, column {col}: {text.strip()!r} is not a number (leave the cell empty "
                         "or write NaN to mark a missing entry)") from None


def _read_csv(path: str) -> np.ndarray:
    """Delimiter sniffed (, ; tab space |); the first row is a header only when one of its cells is not a number;
    a non-numeric cell is an error naming its row and column (1-based, as a spreadsheet shows them)."""
    with open(path, newline="") as f:
        sample = f.read(64 * 1024)
        try:
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t |")
        except csv.Error:
            dialect = csv.excel  # one column, or no clear delimiter: commas
        f.seek(0)
        rows: list[list[float]] = []
        width = None
        for line_no, cells in enumerate(csv.reader(f, dialect), start=1):
            if not cells or all(not c.strip() for c in cells):
                continue
            if dialect.delimiter == " ":
                cells = [c for c in cells if c != ""]
            if line_no == 1 and not rows:
                try:
                    [float(c) for c in cells if c.strip() and c.strip().lower() not in ("nan", "na", "n/a", "null")]
                except ValueError:
                    continue  # a header row
            row = [_parse_cell(c, line_no, j + 1, path) for j, c in enumerate(cells)]
            if width is None:
                width = len(row)
            elif len(row) != width:
                raise ValueError(f"{path}: row {line_no} has {len(row)} cells, the rows above have {width}")
            rows.append(row)
            if len(rows) * width > MAX_MATRIX_ENTRIES:
                _check_entries(path, (len(rows), width))
    if not rows:
        raise ValueError(f"{path}: no numeric rows")
    return np.array(rows, dtype=np.float64)


def _is_header(line: str) -> bool:
    """A CSV line is a header when one of its fields is not a number (``1e-3``, ``nan`` and ``inf`` are numbers:
    looking for letters instead dropped the first row of every file numpy.savetxt writes)."""
    for cell in line.strip().split(","):
        cell = cell.strip().strip('"')
        if not cell:
            continue
        try:
            float(cell)
        except ValueError:
            return True
    return False


def load_matrix(path: str | os.PathLike) -> np.ndarray:
    """Read a matrix from .npy, .npz (dense array or scipy sparse), .csv or Matrix Market .mtx.

    Sparse formats are densified: unstored entries are zeros; NaN marks a missing entry. Binary formats are
    checked from their header (shape, dtype, :data:`MAX_MATRIX_ENTRIES`) before any data is read; a damaged
    file is a ValueError naming it.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"matrix file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            with open(path, "rb") as f:
                shape, dtype = _npy_header(f)
            _check_header(path, shape, dtype)
            return np.load(path, mmap_mode="r", allow_pickle=False)  # paged in once by the float64 conversion
        if ext == ".npz":
            return _read_npz(path)
        if ext == ".csv":
            return _read_csv(path)
        if ext == ".mtx":
            import scipy.io
            rows, cols, _, _, field, _ = scipy.io.mminfo(path)
            _check_header(path, (rows, cols), np.dtype(np.complex128 if field == "complex" else np.float64))
            M = scipy.io.mmread(path)
            return M.toarray() if hasattr(M, "toarray") else np.asarray(M)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        msg = str(e).removeprefix(f"{path}: ")
        kind = "" if isinstance(e, ValueError) and str(e).startswith(path) else f"{type(e).__name__}: "
        raise ValueError(f"could not read a matrix from {path}: {kind}{msg}") from e
    raise ValueError(f"unsupported matrix file {path}: expected .npy, .npz, .csv or .mtx, found {ext or 'no extension'!r}")


_REFERENCE_CACHE: dict[tuple[str, tuple[int, int], int], tuple[float, str]] = {}


def _reference_loss(source: str, V: np.ndarray, rank: int) -> tuple[float, str]:
    """``(loss, note)`` of scikit-learn's NMF (coordinate descent) on a fixed matrix, cached per matrix content.

    Bounded: above :data:`REFERENCE_MAX_WORK` the solve is skipped (loss NaN, note says why); a larger solve runs
    in chunks of iterations and stops at :data:`REFERENCE_TIME_LIMIT_S` with the loss reached (noted)."""
    V = np.ascontiguousarray(V, dtype=np.float64)
    key = (hashlib.blake2b(memoryview(V).cast("B"), digest_size=16).hexdigest(), V.shape, int(rank))
    if key in _REFERENCE_CACHE:
        return _REFERENCE_CACHE[key]
    from sklearn.decomposition import NMF
    m, n = V.shape
    work = m * n * rank
    if work > REFERENCE_MAX_WORK:
        out = (math.nan, f"reference NMF solve skipped: m*n*rank = {work:.3g} is above {REFERENCE_MAX_WORK:.0e}")
        _REFERENCE_CACHE[key] = out
        return out
    note = ""
    with warnings.catch_warnings():  # a reference only needs to be close to converged
        warnings.simplefilter("ignore")
        if work <= 1e8:  # small: one solve, as always (same targets as before)
            model = NMF(n_components=rank, init="nndsvda", solver="cd", max_iter=500, tol=1e-6, random_state=0)
            W = model.fit_transform(V)
            H = model.components_
        else:
            start, done, W, H = time.perf_counter(), 0, None, None
            while done < 500:
                model = NMF(n_components=rank, init="nndsvda" if W is None else "custom", solver="cd", max_iter=25,
                            tol=1e-6, random_state=0)
                W = model.fit_transform(V, W=W, H=H) if W is not None else model.fit_transform(V)
                H = model.components_
                done += model.n_iter_
                if model.n_iter_ < 25:
                    break
                if time.perf_counter() - start > REFERENCE_TIME_LIMIT_S:
                    note = (f"reference NMF solve stopped at the {REFERENCE_TIME_LIMIT_S:g} s limit after {done} "
                            "iterations; the target uses the loss it reached")
                    break
    out = (loss_of(V, W, H), note)
    _REFERENCE_CACHE[key] = out
    return out


def matrix_family(path: str | os.PathLike | None = None, *, array: np.ndarray | None = None, rank: int = 10,
                  name: str = "matrix", nan_is_missing: bool = True, holdout: float = 0.0,
                  target_factor: float = 1.2, target_rel: float = 0.1, budget: int = 200,
                  num_blocks: int = 10) -> ProblemFamily:
    """NMF of a fixed non-negative matrix (a file, or ``array=``); the seed varies the initialisation.

    ``holdout`` moves that fraction of the observed entries (chosen once, seed 0) into a held-out set.
    Target: ``target_factor`` times the loss of scikit-learn's NMF (cd) at the same rank when fully
    observed; with missing entries ``target_rel`` times the loss of the zero model. Why 1.2 and not closer:
    on ``digits`` every solver ends on a plateau 0-7 % above the reference (different local minima per
    initialisation), so a target within a few percent decides success by which plateau a run lands on; at
    1.2x runs cross it while the loss still falls steeply (fixed c = 1.1 after ~40 epochs, c = 0.6 after
    ~70, scikit-learn's cd after ~10), so epochs to target measure speed.
    """
    if (path is None) == (array is None):
        raise ValueError("matrix: give exactly one of path= (a .npy/.npz/.csv/.mtx file) or array=")
    source = os.fspath(path) if path is not None else name
    V, mask = validate_matrix(load_matrix(path) if path is not None else array, source, nan_is_missing=nan_is_missing)
    m, n = V.shape
    _check_rank(source, rank, m, n)
    if not 0 <= holdout < 1:
        raise ValueError(f"{source}: holdout must be in [0, 1), got {holdout}")
    heldout = None
    if holdout > 0:
        observed = np.ones_like(V, dtype=bool) if mask is None else mask
        heldout = observed & (np.random.default_rng(0).uniform(size=V.shape) < holdout)
        mask = observed & ~heldout
    note = ""
    if mask is None:
        ref, note = _reference_loss(source, V, rank)
        target = target_factor * ref
        if not math.isfinite(ref):
            target = target_rel * 0.5 * float(np.einsum("ij,ij->", V, V))
            note += f"; the target is target_rel = {target_rel:g} times the zero model's loss instead"
    else:
        target = target_rel * 0.5 * float(np.sum((V * mask) ** 2))
    if note:
        warnings.warn(f"{source}: {note}", stacklevel=2)
    init = _nmf_init(V, rank, mask)

    def make(seed: int) -> Problem:  # V holds the held-out entries' true values; the mask keeps them out of training
        return Problem(V=V, rank=rank, init=init, target_loss=target, mask=mask, heldout=heldout)

    blocks = min(num_blocks, m)
    return ProblemFamily(name=name, m=m, n=n, rank=rank, budget=budget, num_blocks=blocks, make=make,
                         masked=mask is not None, has_heldout=heldout is not None,
                         description=f"{source}: {m}x{n} matrix, rank {rank}",
                         params=dict(path=os.fspath(path) if path is not None else None, rank=rank, holdout=holdout,
                                     target_factor=target_factor, target_rel=target_rel, budget=budget,
                                     num_blocks=blocks, **({"target_note": note} if note else {})))


def digits_family(*, rank: int = 16, holdout: float = 0.0, target_factor: float = 1.2, target_rel: float = 0.1,
                  budget: int = 200, num_blocks: int = 10) -> ProblemFamily:
    """scikit-learn's digits (1797 x 64 non-negative pixel intensities, ships with the package); the parameters
    are :func:`matrix_family`'s."""
    from sklearn.datasets import load_digits
    fam = matrix_family(array=load_digits().data, rank=rank, name="digits", holdout=holdout,
                        target_factor=target_factor, target_rel=target_rel, budget=budget, num_blocks=num_blocks)
    fam.params["path"] = "sklearn.datasets.load_digits"
    return fam


# ----------------------------------------------------------------------------- registry
FAMILIES: dict[str, Callable[..., ProblemFamily]] = {
    "small": functools.partial(paper_family, "small"),
    "medium": functools.partial(paper_family, "medium"),
    "paper": functools.partial(paper_family, "paper"),
    "sales": sales_family,
    "tutorial": tutorial_family,
    "illcond": illcond_family,
    "digits": digits_family,
    "matrix": matrix_family,
}
DEFAULT_PROBLEM = "small"


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_problem_params(pairs: list[str] | None) -> dict[str, Any]:
    """``['m=200', 'noise=0.1']`` (the CLI's --problem-param) -> dict, numbers and booleans parsed."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--problem-param expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


def suggest(name: str, choices) -> str:
    """' Did you mean X?' for a close match, else ''."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


_SIZE_PARAMS = (("m", "n"), ("products", "stores"))
"""Parameter pairs that give a generated matrix's shape (checked against MAX_MATRIX_ENTRIES before building)."""


def check_family_params(label: str, fn: Callable[..., ProblemFamily], params: dict[str, Any],
                        exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Names, types and ranges of family parameters, from the family function's signature: an unknown name, a
    non-integer count (``m=abc``, ``rank=2.5``), a count below 1 (``m=-5``) or a generated matrix above
    :data:`MAX_MATRIX_ENTRIES` (``m=1e7 n=1e5``) is a one-line ValueError. Integral floats (``m=1e3``) become
    ints. Returns the cleaned parameters."""
    sig = inspect.signature(fn)
    known = {k: v for k, v in sig.parameters.items()
             if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD) and k not in exclude}
    out = {}
    for key, value in params.items():
        if key not in known:
            raise ValueError(f"{label}: unknown parameter {key!r}.{suggest(key, known)} Known: {', '.join(known)}")
        ann = str(known[key].annotation)
        if value is None and "None" in ann:
            out[key] = value
        elif "bool" in ann:
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"{label}: parameter {key} must be true or false, got {value!r}")
            out[key] = bool(value)
        elif "int" in ann and "float" not in ann:
            ok = isinstance(value, (int, np.integer)) or (isinstance(value, float) and math.isfinite(value)
                                                          and value.is_integer())
            if isinstance(value, bool) or not ok:
                raise ValueError(f"{label}: parameter {key} must be a positive integer, got {value!r}")
            if value < 1:
                raise ValueError(f"{label}: parameter {key} must be a positive integer (>= 1), got {value!r}")
            out[key] = int(value)
        elif "float" in ann:
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(value):
                raise ValueError(f"{label}: parameter {key} must be a finite number, got {value!r}")
            out[key] = float(value)
        else:
            out[key] = value
    preset = getattr(fn, "args", ())
    defaults = PAPER_PRESETS.get(preset[0], {}) if preset else {}
    for a, b in _SIZE_PARAMS:
        if a in known and b in known:
            dims = [out.get(k, defaults.get(k, known[k].default)) for k in (a, b)]
            if all(isinstance(d, int) for d in dims):
                _check_entries(f"{label} ({a}={dims[0]}, {b}={dims[1]})", tuple(dims))
    return out


def make_family(problem: str | ProblemFamily = DEFAULT_PROBLEM, **params) -> ProblemFamily:
    """A problem family by name (see the module docstring), or a path to a matrix file."""
    if isinstance(problem, ProblemFamily):
        if params:
            raise ValueError("parameters cannot be applied to an already built ProblemFamily")
        return problem
    if problem in FAMILIES:
        params = check_family_params(f"problem {problem!r}", FAMILIES[problem], params)
        try:
            return FAMILIES[problem](**params)
        except TypeError as e:
            raise ValueError(f"bad parameters for problem {problem!r}: {e}") from e
    if isinstance(problem, (str, os.PathLike)) and os.path.splitext(os.fspath(problem))[1].lower() in (
            ".npy", ".npz", ".csv", ".mtx"):
        params = check_family_params(f"matrix file {os.fspath(problem)}", matrix_family, params,
                                     exclude=("path", "array", "name"))
        return matrix_family(problem, **params)
    hint = (" A suite (suite, suite:NAME, a suite .yml) is a training environment (lrenv.SuiteEnv, lrenv train "
            "--problem suite); evaluate its policy on one family at a time (--problem digits)."
            if str(problem) == "suite" or str(problem).startswith("suite:")
            or str(problem).lower().endswith((".yml", ".yaml")) else "")
    raise ValueError(f"unknown problem {problem!r}.{suggest(problem, FAMILIES)} "
                     f"Known problems: {', '.join(FAMILIES)}, or a path to a .npy/.npz/.csv/.mtx file.{hint}")

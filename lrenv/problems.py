"""Problem families: seeded generators of factorisation instances (SPEC §3).

A *family* (``ProblemFamily``) fixes the shape and the kind of problem; ``family.instance(seed)``
draws one instance (``Problem``) reproducibly from the seed. Training and evaluation use disjoint
seed ranges (:data:`TRAIN_SEEDS`, :data:`EVAL_SEEDS`), so an agent is always scored on instances it
never trained on. Families built on fixed data (``tutorial``, ``digits``, a user's ``matrix``) vary
only the initialisation with the seed.

Names accepted by :func:`make_family`:

========== ===================================================================================
small      synthetic NMF V = W0 H0 (+ noise), 1000 x 100, rank 10, 200-epoch budget
medium     same, 3000 x 300, rank 30, 300 epochs
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

import difflib
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

TRAIN_SEEDS = range(0, 1_000_000)
"""Instance seeds used for training."""
EVAL_SEEDS = range(1_000_000, 2_000_000)
"""Held-out instance seeds used for evaluation; disjoint from :data:`TRAIN_SEEDS`."""


@dataclass
class Problem:
    """One factorisation instance, in float64 numpy; the engine converts it to the device dtype."""

    V: np.ndarray
    """Data matrix (m, n); missing entries hold 0 and are excluded by ``mask``."""
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
    if not isinstance(rank, (int, np.integer)) or rank < 1:
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
    "medium": dict(m=3000, n=300, rank=30, budget=300, num_blocks=10),
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
    fitting the data as well as the truth does (a pure rank-r fit can get a little below it).
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
                 observed: float = 0.5, target_factor: float = 1.0, budget: int = 300,
                 num_blocks: int = 10) -> ProblemFamily:
    """Partially observed sales matrix (SPEC §3.2).

    ``A_p = exp(N(0,1)) * w``, ``A_s = exp(N(0,1)) * w`` with ``w = 10^linspace(0, -2, true_rank)``;
    ``sales = A_p A_s^T``; each entry is observed with probability ``observed`` and the rest is the
    held-out set. The target is ``target_factor`` times the training loss of the true top-``rank``
    factors; ``info['truth_heldout_mse']`` is their held-out MSE (the forum's reference, ~7e-5).
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
        return Problem(V=V * mask, rank=rank, init=_nmf_init(V, rank, mask), target_loss=target_factor * truth,
                       mask=mask, heldout=heldout,
                       info={"truth_loss": truth, "truth_heldout_mse": truth_mse, "V_full": V})

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


def tutorial_family(*, rank: int = 2, reg: float = 0.02, target_rel: float = 0.05, budget: int = 200,
                    num_blocks: int = 2) -> ProblemFamily:
    """Biased matrix factorisation: ``V_ij ~ mu + b_i + c_j + W_i . H_j`` on the observed entries.

    The global bias ``mu`` (mean of the observed entries) is subtracted from the data; the row and
    column biases are extra factor components against pinned ones: ``W = [P, b, 1]``,
    ``H = [Q; 1; c]``. The loss counts observed entries only and adds ``reg/2`` times the squared norm
    of every learned parameter (the gradient *adds* ``reg * x``: the original bug had the sign flipped).
    No sign constraint. The target is ``target_rel`` times the loss of the global-bias-only model.
    """
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

    base = 0.5 * float(np.sum(V * V))  # loss of the bias-only model mu

    def make(seed: int) -> Problem:
        return Problem(V=V, rank=R, init=init, target_loss=target_rel * base, mask=mask, nonneg=False, reg=reg,
                       free_W=free_W, free_H=free_H, info={"global_bias": mu})

    return ProblemFamily(name="tutorial", m=m, n=n, rank=R, budget=budget, num_blocks=num_blocks, make=make,
                         masked=True, nonneg=False, reg=reg, description="biased MF of a 4x5 ratings matrix",
                         params=dict(rank=rank, reg=reg, target_rel=target_rel, budget=budget,
                                     num_blocks=num_blocks))


# ----------------------------------------------------------------------------- illcond
def illcond_family(*, m: int = 10, n: int = 6, hidden: int = 6, kappa: float = 1e5, target_rel: float = 1e-6,
                   budget: int = 500, num_blocks: int = 2) -> ProblemFamily:
    """Factorisation in thin disguise: a two-layer linear net ``W1 W2 ~ A`` with no sign constraint.

    ``A`` (m x n) has U(0, 1) entries, each row multiplied elementwise by ``linspace(1, 1/kappa, n)``,
    so its condition number is about ``kappa``; ``W1`` (m x hidden) and ``W2`` (hidden x n) start N(0, 1).
    The problem is realisable (F* = 0) but badly conditioned: plain GD and Adam stall, while
    Levenberg-Marquardt reaches ~5e-8 (the family's reference floor). Target: ``target_rel * ||A||^2/2``.
    """
    if hidden < 1:
        raise ValueError(f"illcond: hidden must be >= 1, got {hidden}")
    if kappa < 1:
        raise ValueError(f"illcond: kappa must be >= 1, got {kappa}")

    def init(rng: np.random.Generator):
        return rng.standard_normal((m, hidden)), rng.standard_normal((hidden, n))

    def make(seed: int) -> Problem:
        rng = np.random.default_rng([seed, 0x111C])
        A = rng.uniform(size=(m, n)) * np.linspace(1.0, 1.0 / kappa, n)  # every row times linspace
        return Problem(V=A, rank=hidden, init=init, target_loss=target_rel * 0.5 * float(np.sum(A * A)),
                       nonneg=False, info={"cond": float(np.linalg.cond(A))})

    return ProblemFamily(name="illcond", m=m, n=n, rank=hidden, budget=budget, num_blocks=num_blocks, make=make,
                         nonneg=False, description=f"two-layer linear net, A {m}x{n}, kappa ~{kappa:.0e}",
                         params=dict(m=m, n=n, hidden=hidden, kappa=kappa, target_rel=target_rel, budget=budget,
                                     num_blocks=num_blocks))


# ----------------------------------------------------------------------------- user data
def validate_matrix(V: np.ndarray, source: str, *, nan_is_missing: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Check a non-negative data matrix; return ``(V with missing entries set to 0, mask or None)``."""
    V = np.asarray(V)
    if V.dtype == object or not np.issubdtype(V.dtype, np.number):
        raise ValueError(f"{source}: expected a numeric matrix, found dtype {V.dtype}")
    V = V.astype(np.float64)
    if V.ndim != 2:
        raise ValueError(f"{source}: expected a 2-D matrix, found an array of shape {V.shape}")
    if V.size == 0:
        raise ValueError(f"{source}: the matrix is empty (shape {V.shape})")
    inf = np.isinf(V)
    if inf.any():
        i, j = np.argwhere(inf)[0]
        raise ValueError(f"{source}: {int(inf.sum())} infinite entries (first at row {i}, column {j}); "
                         "replace them with finite values, or with NaN to mark them missing")
    missing = np.isnan(V)
    if missing.any() and not nan_is_missing:
        i, j = np.argwhere(missing)[0]
        raise ValueError(f"{source}: {int(missing.sum())} NaN entries (first at row {i}, column {j}) but "
                         "missing entries are not allowed here; pass nan_is_missing=True to treat NaN as missing")
    if missing.all():
        raise ValueError(f"{source}: every entry is missing (NaN); nothing to factorise")
    neg = (V < 0) & ~missing
    if neg.any():
        i, j = np.argwhere(neg)[0]
        raise ValueError(f"{source}: {int(neg.sum())} negative entries (first at row {i}, column {j}: "
                         f"{V[i, j]:g}); NMF needs a non-negative matrix")
    mask = ~missing if missing.any() else None
    return np.where(missing, 0.0, V), mask


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

    Sparse formats are densified: unstored entries are zeros; NaN marks a missing entry.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"matrix file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            return np.load(path, allow_pickle=False)
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "format" in keys and "shape" in keys:  # scipy.sparse.save_npz
                    import scipy.sparse
                    return scipy.sparse.load_npz(path).toarray()
                if len(keys) != 1 and "V" not in keys:
                    raise ValueError(f"expected one array (or one named 'V'), found {keys}")
                return z["V" if "V" in keys else keys[0]]
        if ext == ".csv":
            with open(path) as f:
                first = f.readline()
            header = _is_header(first)
            return np.genfromtxt(path, delimiter=",", skip_header=int(header), invalid_raise=True, ndmin=2)
        if ext == ".mtx":
            import scipy.io
            M = scipy.io.mmread(path)
            return M.toarray() if hasattr(M, "toarray") else np.asarray(M)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"could not read a matrix from {path}: {e}") from e
    raise ValueError(f"unsupported matrix file {path}: expected .npy, .npz, .csv or .mtx, found {ext or 'no extension'!r}")


@functools.lru_cache(maxsize=8)
def _reference_loss(key: str, V_bytes: bytes, shape: tuple[int, int], rank: int) -> float:
    """Loss of scikit-learn's NMF (coordinate descent) on a fixed matrix; cached per matrix."""
    from sklearn.decomposition import NMF
    V = np.frombuffer(V_bytes, dtype=np.float64).reshape(shape)
    model = NMF(n_components=rank, init="nndsvda", solver="cd", max_iter=500, tol=1e-6, random_state=0)
    with warnings.catch_warnings():  # a reference only needs to be close to converged
        warnings.simplefilter("ignore")
        W = model.fit_transform(V)
    return loss_of(V, W, model.components_)


def matrix_family(path: str | os.PathLike | None = None, *, array: np.ndarray | None = None, rank: int = 10,
                  name: str = "matrix", nan_is_missing: bool = True, holdout: float = 0.0,
                  target_factor: float = 1.05, target_rel: float = 0.1, budget: int = 200,
                  num_blocks: int = 10) -> ProblemFamily:
    """NMF of a fixed non-negative matrix (a file, or ``array=``); the seed varies the initialisation.

    ``holdout`` moves that fraction of the observed entries (chosen once, seed 0) into a held-out set.
    Target: ``target_factor`` times the loss of scikit-learn's NMF (cd) at the same rank when fully
    observed; with missing entries ``target_rel`` times the loss of the zero model.
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
    if mask is None:
        target = target_factor * _reference_loss(source, V.tobytes(), V.shape, rank)
    else:
        target = target_rel * 0.5 * float(np.sum((V * mask) ** 2))
    V_train = V if mask is None else V * mask
    init = _nmf_init(V_train, rank, mask)
    full = V

    def make(seed: int) -> Problem:
        return Problem(V=V_train, rank=rank, init=init, target_loss=target, mask=mask, heldout=heldout,
                       info={"V_full": full} if heldout is not None else {})

    blocks = min(num_blocks, m)
    return ProblemFamily(name=name, m=m, n=n, rank=rank, budget=budget, num_blocks=blocks, make=make,
                         masked=mask is not None, has_heldout=heldout is not None,
                         description=f"{source}: {m}x{n} matrix, rank {rank}",
                         params=dict(path=os.fspath(path) if path is not None else None, rank=rank, holdout=holdout,
                                     target_factor=target_factor, target_rel=target_rel, budget=budget,
                                     num_blocks=blocks))


def digits_family(*, rank: int = 16, **kw) -> ProblemFamily:
    """scikit-learn's digits (1797 x 64 non-negative pixel intensities, ships with the package)."""
    from sklearn.datasets import load_digits
    fam = matrix_family(array=load_digits().data, rank=rank, name="digits", **kw)
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


def make_family(problem: str | ProblemFamily = DEFAULT_PROBLEM, **params) -> ProblemFamily:
    """A problem family by name (see the module docstring), or a path to a matrix file."""
    if isinstance(problem, ProblemFamily):
        if params:
            raise ValueError("parameters cannot be applied to an already built ProblemFamily")
        return problem
    if problem in FAMILIES:
        try:
            return FAMILIES[problem](**params)
        except TypeError as e:
            raise ValueError(f"bad parameters for problem {problem!r}: {e}") from e
    if isinstance(problem, (str, os.PathLike)) and os.path.splitext(os.fspath(problem))[1].lower() in (
            ".npy", ".npz", ".csv", ".mtx"):
        return matrix_family(problem, **params)
    raise ValueError(f"unknown problem {problem!r}.{suggest(problem, FAMILIES)} "
                     f"Known problems: {', '.join(FAMILIES)}, or a path to a .npy/.npz/.csv/.mtx file.")

"""Batched stochastic projected SGD for (masked, biased, regularised) matrix factorisation.

Every tensor carries a leading batch dimension ``B``: one engine holds ``B`` independent problem
instances of the same shape and steps all of them with batched matrix products. The single
environment is the case ``B = 1``; the batched vector environment uses the same code with ``B > 1``.

Model and loss (per instance)::

    F(W, H) = 1/2 * || M o (W H - V) ||_F^2  +  reg/2 * (||W o Fw||^2 + ||H o Fh||^2)

``M`` is the 0/1 mask of observed training entries (all ones when the family has none), ``Fw``/``Fh``
mark the *free* components (biased factorisation pins one column of ``W`` and one row of ``H`` to 1).
The loss is a **sum** over observed entries, not a mean: the step-size bounds below are stated for this
convention. Dividing the loss by the number of entries would multiply both Lipschitz constants and
divide every safe learning rate by the same factor.

Step-size theory (SPEC §2, correcting the paper's swapped constants): with ``H`` fixed the gradient
in ``W`` is Lipschitz with ``L_W = max_i ||H diag(M_i) H^T||_2 + reg`` (``||H H^T||_2`` when
unmasked); with ``W`` fixed, ``L_H = max_j ||W^T diag(M_:j) W||_2 + reg``. A block step with
``0 < lr < 2/L`` of that block decreases ``F``.

Masked bounds at the cost of plain ones: the exact masked constants need one r x r Gram matrix per row
and per column and their largest eigenvalues. Two facts make them cheap. (1) Computing them: the Gram
matrices come from one matrix product each (mask times the packed outer products of the factor's
columns, upper triangle only), and the largest eigenvalue of a PSD matrix is at most its Frobenius norm,
which for these Perron-dominated Grams is within a few percent of it: only the rows with the largest
Frobenius norms need an eigensolver (checked each time; all rows when the check fails). (2) Not
computing them every epoch: with ``D_i = diag(M_i)``, ``sqrt(lambda_max(H D_i H^T)) = ||H D_i^(1/2)||_2``
is a norm, so from the factor ``H0`` of the last exact computation (constant ``L0``) the triangle
inequality gives, for every row at once and with ``d = ||H - H0||_F >= ||(H - H0) D_i^(1/2)||_2``,
``(sqrt(L0) - d)^2 <= L_W <= (sqrt(L0) + d)^2`` (same for ``L_H`` with ``W``). :meth:`SGDEngine.evaluate`
reports the upper end and recomputes the exact constant of an instance's block when the interval is wider
than ``1 + EngineConfig.bound_tol`` (upper / lower), after :meth:`SGDEngine.load`, and for the slots passed
to ``evaluate(index=...)`` (episode starts, unless ``episode_start=False``). The reported constant is therefore
always valid (>= exact, so ``2/L`` stays safe), within ``1 + bound_tol`` of it, and exact right after a
recomputation. (The plain
``||H H^T||_2`` also bounds ``L_W``, but with half the entries observed (``sales``) it is ~1.4x the masked
constant, never below the cached bound for any ``bound_tol`` < 0.4, so it is not computed.)

One epoch: the rows are split into ``K`` minibatches (fixed per episode after a random row shuffle at
load time), visited in a random order drawn from the environment's generator. Each minibatch ``I``
updates its own rows of ``W`` with the exact block gradient and ``H`` with the unbiased estimate
``K * W_I^T (M_I o (W_I H - V_I))`` of the full gradient, both from the same point, followed by the
projection onto ``>= 0`` for non-negative families.

``EngineConfig.optimizer = "adam"`` runs Adam (``torch.optim.Adam``'s update, betas and eps) on the same minibatches
instead: the minibatch loss is ``K`` times its share plus the whole regularisation (an unbiased estimate of ``F``,
the convention of :func:`lrenv.solvers.run_solvers`' Adam baseline), one Adam step of all of ``W`` (rows outside
the minibatch have no data gradient; their moments decay, as Adam over ``W`` does) and of ``H`` per minibatch,
then the projection. The step sizes are Adam's learning rates, and the statistics report, in place of the
Lipschitz constants, ``L = 2 / s`` with Adam's reference scale ``s``, the RMS of the instance's initial factors
(its baseline's ``lr = lr_rel * s``): every action mode then maps an action relative to ``s`` where SGD's is
relative to ``2/L``, and no eigenvalue is computed.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field

import numpy as np
import torch

# Layout of the per-instance statistics row returned by :meth:`SGDEngine.evaluate`.
STAT_LOSS, STAT_GRAD_NORM, STAT_L_W, STAT_L_H, STAT_HELDOUT, STAT_FIT, STAT_GRAD_NOISE = range(7)
NUM_STATS = 7
"""``STAT_FIT`` is the data term 1/2 ||M o (W H - V)||^2 alone (the loss less its regularisation).
``STAT_GRAD_NOISE`` is the last epoch's minibatch gradient noise (see :meth:`SGDEngine.epoch`; 0 after a load
and when ``EngineConfig.track_noise`` is off)."""
OPTIMIZERS = ("sgd", "adam")
"""Values of ``EngineConfig.optimizer``."""
ADAM_PLATEAU_DEFAULTS = {"patience": 5, "factor": 0.5}
"""The ``adam`` baseline's ReduceLROnPlateau settings where none are given (its own defaults; torch's are patience 10,
factor 0.1)."""

BOUND_TOL_ENV = "LRENV_BOUND_TOL"
DEFAULT_BOUND_TOL = 0.05
"""Masked families: the reported Lipschitz constant may exceed the exact one by at most this fraction
(step sizes relative to 2/L at most ~5 % smaller) before the exact constant is recomputed."""
_EXACT_CANDIDATES = 8
"""Rows (columns) with the largest Frobenius norms whose Gram matrices go to the eigensolver."""


def default_bound_tol() -> float:
    """``EngineConfig.bound_tol`` unless set: ``$LRENV_BOUND_TOL`` (0 = exact masked constants every
    evaluation, the reference path) or :data:`DEFAULT_BOUND_TOL`. An environment variable so that an
    evaluation or a benchmark can be rerun on the exact path without changing any code."""
    raw = os.environ.get(BOUND_TOL_ENV)
    if raw is None or raw.strip() == "":
        return DEFAULT_BOUND_TOL
    try:
        tol = float(raw)
    except ValueError:
        tol = float("nan")
    if not tol >= 0:
        raise ValueError(f"{BOUND_TOL_ENV} must be a number >= 0 (0: exact masked bounds every epoch), got {raw!r}")
    return tol


@dataclass
class EngineConfig:
    """Shape and numerics shared by all instances held by one engine."""

    m: int
    """Rows of the data matrix."""
    n: int
    """Columns of the data matrix."""
    rank: int
    """Inner dimension of the factorisation, bias components included."""
    num_blocks: int = 10
    """Row minibatches per epoch (1 = full-batch gradient descent)."""
    nonneg: bool = True
    """Project both factors onto >= 0 after every update (NMF); False for unconstrained families."""
    reg: float = 0.0
    """L2 regularisation weight on the free components."""
    grad_noise: float = 0.0
    """Extra Gaussian gradient noise, as a multiple of the minibatch gradient's RMS."""
    masked: bool = False
    """Whether instances carry a mask of observed entries (missing data or held-out entries)."""
    heldout: bool = False
    """Whether instances carry held-out entries whose mean squared error is reported."""
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32
    track_noise: bool = False
    """Measure the minibatch gradient noise of every epoch (``STAT_GRAD_NOISE``): two small reductions per
    minibatch on the r x n H-gradient, off unless an observation needs it."""
    threads: int | None = None
    """Torch intra-op threads while the engine computes on a CPU (None: as torch is set). Training runs
    PPO's small networks on one thread; the engine's batched products still use every core."""
    bound_tol: float = field(default_factory=default_bound_tol)
    """Masked families only: relative slack allowed in the reported Lipschitz constants before their exact
    recomputation (0: recompute every evaluation). See the module docstring."""
    optimizer: str = "sgd"
    """The update the step sizes drive: 'sgd' (projected minibatch SGD, default) or 'adam' (Adam on the same
    minibatches, step sizes its learning rates; see the module docstring)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __post_init__(self):  # checked here, so that an env can refuse a bad setting before building its engine
        if self.num_blocks < 1 or self.num_blocks > self.m:
            raise ValueError(f"num_blocks must be between 1 and the number of rows ({self.m}), got {self.num_blocks}")
        if self.threads is not None and not (isinstance(self.threads, (int, np.integer)) and self.threads >= 1):
            raise ValueError(f"threads must be a positive number of torch threads or None, got {self.threads!r}")
        if not self.bound_tol >= 0:
            raise ValueError(f"bound_tol must be >= 0 (0: exact masked bounds every evaluation), got {self.bound_tol!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")

    @property
    def block_rows(self) -> int:
        return -(-self.m // self.num_blocks)

    @property
    def padded_rows(self) -> int:
        return self.block_rows * self.num_blocks


def bytes_per_instance(cfg: EngineConfig) -> int:
    """Device memory one instance occupies (data, masks, factors, gradients and temporaries)."""
    itemsize = torch.finfo(cfg.dtype).bits // 8
    mn = cfg.padded_rows * cfg.n
    dense = 1 + int(cfg.masked) + int(cfg.heldout)  # V, mask, held-out mask
    temporaries = 2  # full residual and product during evaluate()
    # W, H, their gradients and a trial point; masked: the factors of the last exact bound too; Adam: its moments
    # and a full W gradient
    copies = 3 + int(cfg.masked) + 3 * int(cfg.optimizer == "adam")
    factors = copies * (cfg.padded_rows * cfg.rank + cfg.rank * cfg.n)
    return itemsize * (mn * (dense + temporaries) + factors)


def adam_reference_scale(W0: np.ndarray, H0: np.ndarray) -> float:
    """Adam's reference scale: the RMS of the initial factors (1 where they are all zero), the unit of the Adam
    baseline's ``lr_rel`` (:func:`lrenv.solvers.run_solvers`) and of the Adam engine's actions."""
    return float(np.sqrt(np.mean(np.concatenate([np.ravel(W0), np.ravel(H0)]) ** 2))) or 1.0


def _largest_eigenvalue(G: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue of each symmetric matrix in ``G`` (..., r, r).

    Non-finite entries are zeroed first so that one diverged instance cannot make the solver fail for
    the whole batch; that instance's non-finite loss already marks it as diverged.
    """
    return torch.linalg.eigvalsh(torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0))[..., -1]


def _packed_gram_max(G: torch.Tensor, unpack: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Largest eigenvalue over the ``q`` symmetric PSD matrices of each instance, given packed (B, q, p)
    as their upper triangles (``unpack``: r*r positions into p; ``weight``: 1 on the diagonal, 2 off it).

    lambda_max <= ||G||_F, so rows outside the :data:`_EXACT_CANDIDATES` largest Frobenius norms cannot hold
    the maximum once a candidate's eigenvalue reaches the largest excluded norm; that is checked, and all
    rows are solved when it fails. Non-finite entries are zeroed first (see :func:`_largest_eigenvalue`).
    """
    B, q, p = G.shape
    r = int(round(len(unpack) ** 0.5))
    G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)
    k = min(q, _EXACT_CANDIDATES)
    if k == q:
        return torch.linalg.eigvalsh(G[..., unpack].reshape(B, q, r, r))[..., -1].amax(dim=1)
    fro2 = torch.matmul(G.square(), weight)  # (B, q)
    top_fro2, top = fro2.topk(k, dim=1)
    cand = G.gather(1, top.unsqueeze(-1).expand(B, k, p))
    lam = torch.linalg.eigvalsh(cand[..., unpack].reshape(B, k, r, r))[..., -1].amax(dim=1)
    excluded = top_fro2[:, -1].clamp(min=0).sqrt()  # every excluded row's norm is at most the k-th largest
    if bool((lam < excluded).any()):  # rare: the maximum may lie outside the candidates
        lam = torch.linalg.eigvalsh(G[..., unpack].reshape(B, q, r, r))[..., -1].amax(dim=1)
    return lam


def _sqnorm(t: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm per instance (leading dim); much faster than pow(2).sum() on CPU."""
    flat = t.reshape(t.shape[0], -1)
    return torch.linalg.vector_norm(flat, dim=1).square()


def _times_transpose(R: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """R @ H^T, computed as (H @ R^T)^T: several times faster on CPU for tall R and small rank."""
    return torch.bmm(H, R.transpose(1, 2)).transpose(1, 2)


def _switch_threads(cfg: EngineConfig, on_gpu: bool) -> int | None:
    """Switch torch to ``cfg.threads`` threads on a CPU (~0.3 us: cheap enough per call); returns the count to
    restore afterwards, or None when nothing changed."""
    wanted = cfg.threads
    if wanted is None or on_gpu:
        return None
    before = torch.get_num_threads()
    if before == wanted:
        return None
    torch.set_num_threads(int(wanted))
    return before


@contextlib.contextmanager
def torch_threads(cfg: EngineConfig):
    """``cfg.threads`` torch threads for the enclosed work (CPU only); the caller's count is restored."""
    before = _switch_threads(cfg, torch.device(cfg.device).type != "cpu")
    try:
        yield
    finally:
        if before is not None:
            torch.set_num_threads(before)


def _with_threads(method):
    """Run an engine method with ``cfg.threads`` torch threads on a CPU, restoring the caller's count (the
    per-call form of :func:`torch_threads`, without a context manager on the per-epoch path)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        before = _switch_threads(self.cfg, self._on_gpu)
        if before is None:
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(before)
    return wrapper


class SGDEngine:
    """``B`` factorisation instances of one shape, stepped together by projected minibatch SGD.

    Data is loaded per instance with :meth:`load` (so a vector env can re-initialise one instance
    without touching the others); :meth:`epoch` runs one SGD epoch on all instances with
    per-instance step sizes; :meth:`evaluate` returns loss, gradient norm, both Lipschitz constants and
    the held-out error for every instance in one tensor.
    """

    def __init__(self, cfg: EngineConfig, batch: int = 1):
        self.cfg = cfg
        self.B = batch
        K, b, n, r = cfg.num_blocks, cfg.block_rows, cfg.n, cfg.rank
        opts = dict(device=cfg.device, dtype=cfg.dtype)
        self.V = torch.zeros(batch, K, b, n, **opts)
        self.W = torch.zeros(batch, K, b, r, **opts)
        self.H = torch.zeros(batch, r, n, **opts)
        # Rows added to make the blocks equal have V = 0 and W = 0 and a zero weight.
        needs_weight = cfg.masked or cfg.padded_rows != cfg.m
        self.weight = torch.zeros(batch, K, b, n if cfg.masked else 1, **opts) if needs_weight else None
        self.heldout = torch.zeros(batch, K, b, n, **opts) if cfg.heldout else None
        self.heldout_count = torch.ones(batch, **opts)
        self.free_W = torch.ones(r, **opts)  # broadcast over rows
        self.free_H = torch.ones(r, 1, **opts)  # broadcast over columns
        self.has_fixed = False
        self.row_index = np.zeros((batch, cfg.padded_rows), dtype=np.int64)  # layout row -> data row
        self.gW = torch.zeros_like(self.W)
        self.gH = torch.zeros_like(self.H)
        self._arange = torch.arange(batch, device=cfg.device)
        self._noise_gen: list[torch.Generator | None] = [None] * batch
        self.grad_noise = torch.zeros(batch, **opts)  # last epoch's STAT_GRAD_NOISE
        self._residual_buf: torch.Tensor | None = None  # see _residual
        self._on_gpu = torch.device(cfg.device).type != "cpu"
        # masked bounds: the exact constants (L_W, L_H, without reg) at each block's last exact computation,
        # the factors they were computed from, whether they are valid for the loaded instance, and a count of
        # exact computations per instance and block (for tests and benchmarks)
        self._L0 = np.zeros((batch, 2))
        self._ref_H = torch.zeros_like(self.H) if cfg.masked else None
        self._ref_W = torch.zeros_like(self.W) if cfg.masked else None
        self._bound_fresh = np.zeros((batch, 2), dtype=bool)
        self.exact_bound_count = np.zeros((batch, 2), dtype=np.int64)
        iu = torch.triu_indices(r, r)
        pos = torch.zeros(r, r, dtype=torch.long)
        pos[iu[0], iu[1]] = torch.arange(iu.shape[1])
        pos[iu[1], iu[0]] = torch.arange(iu.shape[1])
        self._pairs = (iu[0].to(cfg.device), iu[1].to(cfg.device))
        self._unpack = pos.reshape(-1).to(cfg.device)
        self._pair_weight = torch.where(iu[0] == iu[1], 1.0, 2.0).to(**opts)
        self.adam = cfg.optimizer == "adam"
        if self.adam:  # Adam's moments, its step count and reference scale per slot (reset by load)
            self.adam_m = [torch.zeros_like(self.W), torch.zeros_like(self.H)]
            self.adam_v = [torch.zeros_like(self.W), torch.zeros_like(self.H)]
            self.adam_steps = torch.zeros(batch, dtype=torch.float64, device=cfg.device)
            self.adam_scale = torch.ones(batch, **opts)

    # ------------------------------------------------------------------ loading
    def load(self, i: int, V: np.ndarray, W0: np.ndarray, H0: np.ndarray, *, row_perm: np.ndarray,
             mask: np.ndarray | None = None, heldout: np.ndarray | None = None,
             free_W: np.ndarray | None = None, free_H: np.ndarray | None = None,
             noise_seed: int | None = None) -> None:
        """Place one instance in slot ``i``. ``row_perm`` shuffles the rows into minibatches."""
        cfg = self.cfg
        pad = cfg.padded_rows - cfg.m
        self.row_index[i] = np.concatenate([row_perm, np.full(pad, -1, dtype=np.int64)])
        self.grad_noise[i] = 0.0
        rows = torch.as_tensor(row_perm)

        def put(out: torch.Tensor, a: np.ndarray) -> None:
            """Rows of ``a`` in layout order into slot tensor ``out`` (K, b, .); padding rows are zero."""
            flat = out.view(cfg.padded_rows, -1)
            src = torch.as_tensor(np.ascontiguousarray(a)).reshape(cfg.m, -1)
            flat[:cfg.m].copy_(src.index_select(0, rows))  # copy_ casts (bool masks too) and moves
            flat[cfg.m:].zero_()

        put(self.V[i], V)
        put(self.W[i], W0)
        self.H[i] = torch.as_tensor(H0, dtype=cfg.dtype, device=cfg.device)
        if self.weight is not None:  # the mask, or a row weight that zeroes the padding rows
            put(self.weight[i], np.ones(V.shape if cfg.masked else (cfg.m, 1), dtype=bool) if mask is None else mask)
        if self.heldout is not None:
            h = np.zeros(V.shape, dtype=bool) if heldout is None else heldout
            put(self.heldout[i], h)
            self.heldout_count[i] = max(float(np.count_nonzero(h)), 1.0)
        if free_W is not None:
            self.free_W = torch.as_tensor(free_W, dtype=cfg.dtype, device=cfg.device)
            self.free_H = torch.as_tensor(free_H, dtype=cfg.dtype, device=cfg.device).reshape(-1, 1)
            self.has_fixed = not (bool(free_W.all()) and bool(free_H.all()))
        self._bound_fresh[i] = False  # the next evaluate() computes this instance's exact bounds
        if self.adam:
            for t in (*self.adam_m, *self.adam_v):
                t[i].zero_()
            self.adam_steps[i] = 0.0
            self.adam_scale[i] = adam_reference_scale(W0, H0)
        if cfg.grad_noise > 0:
            gen = torch.Generator(device=cfg.device)
            gen.manual_seed(int(noise_seed or 0))
            self._noise_gen[i] = gen

    def factors(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Instance ``i``'s factors ``(W, H)`` in the data's original row order."""
        cfg = self.cfg
        W = self.W[i].reshape(cfg.padded_rows, cfg.rank).double().cpu().numpy()
        order = self.row_index[i]
        out = np.zeros((cfg.m, cfg.rank))
        out[order[order >= 0]] = W[order >= 0]
        return out, self.H[i].double().cpu().numpy()

    # ------------------------------------------------------------------ one epoch
    @_with_threads
    def epoch(self, lr: torch.Tensor, order: torch.Tensor | np.ndarray, index=None) -> None:
        """One SGD epoch on every instance, or on the slots listed in ``index`` (the others stay as they are).

        ``lr``: (B, 2) step sizes for W and H. ``order``: (B, K) minibatch visiting order; a numpy
        array when ``B == 1`` (the blocks are then views updated in place, no gather). With ``index``,
        both have one row per listed slot.

        With ``cfg.track_noise`` the epoch also measures its gradient noise: the W-step of a minibatch is the
        exact block gradient, so the noise is in the H-step's estimates ``g_k = K * gH_k``; with their mean
        ``S = sum_k gH_k``, ``noise = (mean_k ||g_k||^2 - ||S||^2) / ||S||^2``, the variance across the epoch's
        minibatch estimates relative to their mean (the full gradient, up to the drift of the iterate within
        the epoch); 0 with one minibatch.
        """
        cfg = self.cfg
        K = cfg.num_blocks
        lr_W = lr[:, 0].reshape(-1, 1, 1)
        lr_H = lr[:, 1].reshape(-1, 1, 1) * K  # K: the H gradient estimate is K * (minibatch gradient)
        single = self.B == 1
        if single and index is not None and list(np.asarray(index).reshape(-1)) != [0]:
            raise ValueError(f"epoch: a one-instance engine has only slot 0, got index {index!r}")
        slots = None if single or index is None else torch.as_tensor(np.asarray(index), dtype=torch.long,
                                                                     device=self.V.device)
        if self.adam:
            return self._adam_epoch(lr, order, slots)
        H = self.H if slots is None else self.H.index_select(0, slots)
        gens = self._noise_gen if slots is None else [self._noise_gen[int(i)] for i in slots]
        if not single:  # gather/scatter blocks through flat (B*K, b, .) views: index_select is cheap
            first = self._arange if slots is None else slots
            flat_idx = (torch.as_tensor(order, device=self.V.device) + first[:, None] * K).long()
            Vflat = self.V.view(self.B * K, *self.V.shape[2:])
            Wflat = self.W.view(self.B * K, *self.W.shape[2:])
            wflat = None if self.weight is None else self.weight.view(self.B * K, *self.weight.shape[2:])
        track = cfg.track_noise
        if track:
            g_sum, g_sq = torch.zeros_like(H), torch.zeros(H.shape[0], dtype=H.dtype, device=H.device)
        for k in range(K):
            if single:
                blk = int(order[0, k])
                Vk, Wk = self.V[:, blk], self.W[:, blk]
                wk = None if self.weight is None else self.weight[:, blk]
            else:
                idx = flat_idx[:, k]
                Vk, Wk = Vflat.index_select(0, idx), Wflat.index_select(0, idx)
                wk = None if wflat is None else wflat.index_select(0, idx)
            # Wk H - Vk; a gathered Vk (B > 1) is a private copy, so the product can overwrite it
            R = torch.baddbmm(Vk, Wk, H, beta=-1) if single else Vk.baddbmm_(Wk, H, beta=-1)
            if wk is not None:
                R.mul_(wk)
            gW = _times_transpose(R, H)
            gH = torch.bmm(Wk.transpose(1, 2), R)
            if cfg.reg:
                gW.add_(Wk * self.free_W, alpha=cfg.reg)
                gH.add_(H * self.free_H, alpha=cfg.reg / K)
            if cfg.grad_noise > 0:
                gW = self._add_noise(gW, wk, gens)
                gH = self._add_noise(gH, None, gens)
            if self.has_fixed:
                gW.mul_(self.free_W)
                gH.mul_(self.free_H)
            if track:
                g_sum.add_(gH)
                g_sq.add_(_sqnorm(gH))
            Wk.addcmul_(gW, lr_W, value=-1)  # in place: Wk is a view of self.W when B == 1
            H.addcmul_(gH, lr_H, value=-1)
            if cfg.nonneg:
                Wk.clamp_(min=0)
                H.clamp_(min=0)
            if not single:
                Wflat.index_copy_(0, idx, Wk)
        if slots is not None:
            self.H.index_copy_(0, slots, H)
        if track:
            self._store_noise(g_sum, g_sq, slots)

    def _store_noise(self, g_sum: torch.Tensor, g_sq: torch.Tensor, slots: torch.Tensor | None) -> None:
        """STAT_GRAD_NOISE of the epoch from the sum of its minibatch H-gradients and of their squared norms."""
        K = self.cfg.num_blocks
        mean_sq = _sqnorm(g_sum)
        noise = ((K * g_sq - mean_sq) / mean_sq.clamp(min=torch.finfo(g_sum.dtype).tiny)).clamp(min=0.0)
        if slots is None:
            self.grad_noise = noise
        else:
            self.grad_noise[slots] = noise

    def _adam_epoch(self, lr: torch.Tensor, order: torch.Tensor | np.ndarray, slots: torch.Tensor | None) -> None:
        """:meth:`epoch` with ``cfg.optimizer = 'adam'`` (module docstring): per minibatch, the gradient of ``K``
        times its loss share plus the whole regularisation, then ``torch.optim.Adam``'s update of all of ``W``
        and of ``H`` (same arithmetic, in the order of :class:`lrenv.solvers._BatchedAdam`) with each slot's own
        step count, then the projection. ``slots``: the slots to step (None: all)."""
        cfg = self.cfg
        K, b, r = cfg.num_blocks, cfg.block_rows, cfg.rank
        pick = (lambda t: t) if slots is None else (lambda t: t.index_select(0, slots))  # noqa: E731
        W, H = pick(self.W), pick(self.H)  # the tensors themselves for all slots (updated in place), else copies
        m, v = [pick(t) for t in self.adam_m], [pick(t) for t in self.adam_v]
        steps = pick(self.adam_steps)
        gens = self._noise_gen if slots is None else [self._noise_gen[int(i)] for i in slots]
        A = W.shape[0]
        first = self._arange if slots is None else slots
        order = torch.as_tensor(order, device=self.V.device).long()
        v_idx = order + first[:, None] * K  # blocks of the data, (B * K) rows
        w_idx = order + torch.arange(A, device=W.device)[:, None] * K  # blocks of W (its selected slots)
        Vflat, Wflat = self.V.view(self.B * K, b, cfg.n), W.view(A * K, b, r)
        wflat = None if self.weight is None else self.weight.view(self.B * K, *self.weight.shape[2:])
        gW_full = torch.zeros_like(W)
        gW_flat = gW_full.view(A * K, b, r)
        beta1, beta2 = cfg.adam_betas
        shape_W, shape_H = (-1, 1, 1, 1), (-1, 1, 1)
        lr_W, lr_H = lr[:, 0].to(W.dtype), lr[:, 1].to(H.dtype)
        track = cfg.track_noise
        if track:
            g_sum, g_sq = torch.zeros_like(H), torch.zeros(A, dtype=H.dtype, device=H.device)
        for k in range(K):
            Vk, Wk = Vflat.index_select(0, v_idx[:, k]), Wflat.index_select(0, w_idx[:, k])
            wk = None if wflat is None else wflat.index_select(0, v_idx[:, k])
            R = Vk.baddbmm_(Wk, H, beta=-1)  # a private copy of the data block
            if wk is not None:
                R.mul_(wk)
            gH = torch.bmm(Wk.transpose(1, 2), R)
            if track:  # on the minibatch gradient itself, as the SGD epoch measures it
                g_sum.add_(gH)
                g_sq.add_(_sqnorm(gH))
            R.mul_(K)
            gWk = _times_transpose(R, H)
            gH.mul_(K)
            if cfg.reg:
                gW_full.copy_(W).mul_(self.free_W).mul_(cfg.reg)
                gWk.add_(Wk * self.free_W, alpha=cfg.reg)
                gH.add_(H * self.free_H, alpha=cfg.reg)
            if cfg.grad_noise > 0:
                gWk = self._add_noise(gWk, wk, gens)
                gH = self._add_noise(gH, None, gens)
            gW_flat.index_copy_(0, w_idx[:, k], gWk)
            if self.has_fixed:
                gW_full.mul_(self.free_W)
                gH.mul_(self.free_H)
            steps += 1
            bc1 = 1 - beta1 ** steps
            bc2_sqrt = (1 - beta2 ** steps).sqrt()
            for p, g, m_p, v_p, lr_p, shape in ((W, gW_full, m[0], v[0], lr_W, shape_W),
                                                (H, gH, m[1], v[1], lr_H, shape_H)):
                m_p.lerp_(g, 1 - beta1)
                v_p.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v_p.sqrt() / bc2_sqrt.to(p.dtype).reshape(shape)).add_(cfg.adam_eps)
                p.add_((m_p * (-(lr_p / bc1.to(p.dtype))).reshape(shape)).div_(denom))
            if cfg.nonneg:
                W.clamp_(min=0)
                H.clamp_(min=0)
            if not cfg.reg:
                gW_flat.index_fill_(0, w_idx[:, k], 0.0)  # zero again for the next block
        if slots is not None:
            for full, part in ((self.W, W), (self.H, H), *zip(self.adam_m, m), *zip(self.adam_v, v)):
                full.index_copy_(0, slots, part)
            self.adam_steps[slots] = steps
        if track:
            self._store_noise(g_sum, g_sq, slots)

    def _add_noise(self, g: torch.Tensor, row_weight: torch.Tensor | None,
                   gens: list[torch.Generator | None]) -> torch.Tensor:
        rms = (_sqnorm(g) / g[0].numel()).sqrt().reshape(-1, 1, 1)
        noise = torch.stack([torch.randn(g.shape[1:], generator=gen, device=g.device, dtype=g.dtype)
                             for gen in gens])
        if row_weight is not None and row_weight.shape[-1] == 1:
            noise.mul_(row_weight)  # padding rows stay at zero
        return g.add_(noise.mul_(rms).mul_(self.cfg.grad_noise))

    # ------------------------------------------------------------------ statistics
    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], self.cfg.padded_rows, t.shape[-1])

    def _residual(self, W: torch.Tensor, H: torch.Tensor, V: torch.Tensor | None = None) -> torch.Tensor:
        """The unweighted residual W H - V, flattened to (B, rows, n). For all slots it is written into one buffer
        that every call reuses (a fresh tensor of this size costs a page fault per page on a CPU: half the
        product's time at the small size), so it is valid until the next call; callers use it at once."""
        V = self._flat(self.V if V is None else V)
        out = self._residual_buf
        if V.shape[0] != self.B:  # a subset of the slots: rare, a fresh tensor
            return torch.baddbmm(V, self._flat(W), H, beta=-1)
        if out is None or out.shape != V.shape or out.dtype != V.dtype:
            out = self._residual_buf = torch.empty_like(V)
        return torch.baddbmm(V, self._flat(W), H, beta=-1, out=out)

    def _weighted(self, D: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """M o D (a new tensor when weighted, D itself otherwise)."""
        weight = self.weight if weight is None else weight
        return D if weight is None else D * self._flat(weight)

    def _loss(self, W: torch.Tensor, H: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return self._fit_and_loss(W, H, R)[1]

    def _fit_and_loss(self, W: torch.Tensor, H: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fit, loss): the data term 1/2 ||R||^2 and the loss, which adds the regularisation when there is one."""
        fit = 0.5 * _sqnorm(R)
        if not self.cfg.reg:
            return fit, fit
        return fit, fit + 0.5 * self.cfg.reg * (_sqnorm(W * self.free_W) + _sqnorm(H * self.free_H))

    def _slots(self, index) -> tuple[torch.Tensor | None, tuple]:
        """The per-instance tensors of all slots (index None) or of the listed slots: views when they
        are consecutive (a single slot, typically), gathered copies otherwise."""
        if index is None:
            return None, (self.V, self.W, self.H, self.weight, self.heldout, self.heldout_count)
        index = np.asarray(index, dtype=np.int64)
        idx = torch.as_tensor(index, device=self.V.device)
        if len(index) and np.array_equal(index, np.arange(index[0], index[0] + len(index))):
            sel = slice(int(index[0]), int(index[0]) + len(index))
        else:
            sel = idx
        pick = lambda t: None if t is None else t[sel]  # noqa: E731
        return idx, (pick(self.V), pick(self.W), pick(self.H), pick(self.weight), pick(self.heldout),
                     pick(self.heldout_count))

    @_with_threads
    def evaluate(self, index=None, *, episode_start: bool | None = None, gradient: bool = True) -> torch.Tensor:
        """(B, NUM_STATS) statistics at the current iterate; also stores the full gradients.

        ``index`` (a sequence of slots) evaluates only those slots and returns (len(index), NUM_STATS)
        rows in that order; the stored gradients of the other slots are left as they are. The listed slots
        are taken to start episodes (exact masked bounds) unless ``episode_start=False`` (the slots that
        go on while others are frozen: the cached bounds, as if every slot were evaluated).

        The gradient norm is the norm of the *projected* gradient for non-negative families
        (components at the bound whose gradient points outwards are dropped), so it vanishes at a
        constrained stationary point. ``gradient=False`` skips the gradient (a third of the work): its norm
        is NaN and the stored gradients are left as they are.
        """
        cfg = self.cfg
        idx, (V, W, H, weight, heldout, heldout_count) = self._slots(index)
        Wf = self._flat(W)
        D = self._residual(W, H, V)
        R = self._weighted(D, weight)
        fit, loss = self._fit_and_loss(W, H, R)
        gnorm = self._gradient(W, H, Wf, R, idx) if gradient else torch.full_like(loss, float("nan"))
        L_W, L_H = self._bounds(Wf, H, weight, idx, idx is not None if episode_start is None else episode_start)
        if heldout is None:
            held = torch.full_like(loss, float("nan"))
        else:
            held = _sqnorm(D * self._flat(heldout)) / heldout_count
        noise = self.grad_noise if idx is None else self.grad_noise[idx]
        return torch.stack([loss, gnorm, L_W, L_H, held, fit, noise], dim=1)

    def _gradient(self, W: torch.Tensor, H: torch.Tensor, Wf: torch.Tensor, R: torch.Tensor,
                  idx: torch.Tensor | None) -> torch.Tensor:
        """Store the full gradients of the slots ``idx`` (all when None) at ``W, H`` (weighted residual ``R``);
        returns the norm of the (projected) gradient."""
        cfg = self.cfg
        gW = _times_transpose(R, H).reshape(W.shape)
        gH = torch.bmm(Wf.transpose(1, 2), R)
        if cfg.reg:
            gW.add_(W * self.free_W, alpha=cfg.reg)
            gH.add_(H * self.free_H, alpha=cfg.reg)
        if self.has_fixed:
            gW.mul_(self.free_W)
            gH.mul_(self.free_H)
        if idx is None:
            self.gW, self.gH = gW, gH
        else:
            self.gW[idx] = gW
            self.gH[idx] = gH
        if cfg.nonneg:  # at x = 0 only a negative gradient component can move x
            pgW = torch.where(W > 0, gW, gW.clamp(max=0))
            pgH = torch.where(H > 0, gH, gH.clamp(max=0))
        else:
            pgW, pgH = gW, gH
        return (_sqnorm(pgW) + _sqnorm(pgH)).sqrt()

    @_with_threads
    def loss(self) -> torch.Tensor:
        """(B,) loss at the current iterate (what a plain training loop computes each epoch)."""
        return self._loss(self.W, self.H, self._weighted(self._residual(self.W, self.H)))

    @_with_threads
    def lipschitz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-instance exact block Lipschitz constants (L_W, L_H), each of shape (B,). For masked families
        :meth:`evaluate` reports valid upper bounds within ``1 + bound_tol`` of these (module docstring)."""
        return self._lipschitz(self._flat(self.W), self.H, self.weight)

    def _lipschitz(self, Wf: torch.Tensor, H: torch.Tensor, weight: torch.Tensor | None):
        """The exact block constants (L_W, L_H) of the given instances, regularisation included."""
        cfg = self.cfg
        if self.has_fixed:  # fixed components are not stepped
            Wf = Wf * self.free_W
            H = H * self.free_H
        if cfg.masked:
            # max over rows i of ||H diag(M_i) H^T||, and over columns j of ||W^T diag(M_:j) W||
            M = self._flat(weight)  # (B, rows, n)
            L_W, L_H = self._masked_exact_W(H, M), self._masked_exact_H(Wf, M)
        else:  # one eigensolver call for both r x r Gram matrices
            G = torch.stack([torch.bmm(H, H.transpose(1, 2)), torch.bmm(Wf.transpose(1, 2), Wf)], dim=1)
            L_W, L_H = _largest_eigenvalue(G).unbind(dim=1)
        return self._plus_reg(L_W, L_H)

    def _plus_reg(self, L_W: torch.Tensor, L_H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cfg.reg:
            return L_W + self.cfg.reg, L_H + self.cfg.reg
        return L_W, L_H

    def _masked_exact_W(self, H: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """max_i lambda_max(H diag(M_i) H^T) per instance: the packed Grams of all rows in one product
        (mask times the upper-triangle outer products of H's columns), several times cheaper than an einsum."""
        ia, ib = self._pairs
        P = H.index_select(1, ia) * H.index_select(1, ib)  # (B, p, n)
        return _packed_gram_max(torch.bmm(M, P.transpose(1, 2)), self._unpack, self._pair_weight)

    def _masked_exact_H(self, Wf: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
        """max_j lambda_max(W^T diag(M_:j) W) per instance (see :meth:`_masked_exact_W`)."""
        ia, ib = self._pairs
        Wt = Wf.transpose(1, 2).contiguous()  # (B, r, rows): index_select along rows is several times faster
        P = Wt.index_select(1, ia) * Wt.index_select(1, ib)  # (B, p, rows)
        return _packed_gram_max(torch.bmm(P, M).transpose(1, 2), self._unpack, self._pair_weight)

    def _bounds(self, Wf: torch.Tensor, H: torch.Tensor, weight: torch.Tensor | None,
                idx: torch.Tensor | None, start: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The constants :meth:`evaluate` reports: exact for unmasked families; for masked ones the upper bound
        of the module docstring from each block's last exact constant, with the exact constant recomputed for
        every block whose bound may be more than ``bound_tol`` loose, that was not computed since load(), or
        whose slot starts an episode (``start``: every slot of ``idx``). ``Wf``, ``H``, ``weight`` hold the
        slots of ``idx`` (all slots when None). The distances use Frobenius norms (>= the spectral norm, so
        still valid): two reductions and scalar arithmetic on the host per evaluation, no eigensolver."""
        cfg = self.cfg
        if self.adam:  # Adam's reference scale s in place of 2/L (module docstring)
            L = 2.0 / (self.adam_scale if idx is None else self.adam_scale[idx])
            return L, L
        if not cfg.masked or cfg.bound_tol == 0:
            return self._lipschitz(Wf, H, weight)
        Wm, Hm = (Wf * self.free_W, H * self.free_H) if self.has_fixed else (Wf, H)
        slots = np.arange(self.B) if idx is None else idx.cpu().numpy()
        if start:  # episode starts: exact for every listed slot
            upper = np.zeros((len(slots), 2))
            need = np.ones((len(slots), 2), dtype=bool)
        else:
            ref_H, ref_W = (self._ref_H, self._ref_W) if idx is None else (self._ref_H[idx], self._ref_W[idx])
            dH, dW = H - ref_H, Wf - self._flat(ref_W)
            if self.has_fixed:
                dW, dH = dW * self.free_W, dH * self.free_H
            # ||H - H0|| bounds the W block's change, ||W - W0|| the H block's; float64 host arithmetic from here
            dist = np.sqrt(torch.stack([_sqnorm(dH), _sqnorm(dW)], dim=1).double().cpu().numpy())
            root = np.sqrt(self._L0[slots])
            with np.errstate(invalid="ignore"):
                upper = np.square(root + dist)
                loose = ~(upper <= (1.0 + cfg.bound_tol) * np.square(np.maximum(root - dist, 0.0)))  # NaN: loose
            need = loose | ~self._bound_fresh[slots]
        M = self._flat(weight)
        for side in (0, 1):
            rows = np.flatnonzero(need[:, side])
            if rows.size == 0:
                continue
            if rows.size == len(slots):
                pick = lambda t: t  # noqa: E731
            else:
                at_rows = torch.as_tensor(rows, device=H.device)
                pick = lambda t: t.index_select(0, at_rows)  # noqa: E731
            at = torch.as_tensor(slots[rows], device=H.device)
            if side == 0:
                exact = self._masked_exact_W(pick(Hm), pick(M))
                self._ref_H[at] = pick(H)
            else:
                exact = self._masked_exact_H(pick(Wm), pick(M))
                self._ref_W.view(self.B, -1, cfg.rank)[at] = pick(Wf)
            exact = exact.double().cpu().numpy()
            upper[rows, side] = exact
            self._L0[slots[rows], side] = exact
            self._bound_fresh[slots[rows], side] = True
            self.exact_bound_count[slots[rows], side] += 1
        L = torch.as_tensor(upper, device=H.device).to(H.dtype)
        return self._plus_reg(L[:, 0], L[:, 1])

    @_with_threads
    def trial_loss(self, lr: torch.Tensor, index=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss after a full-batch projected gradient step with step sizes ``lr`` (B, 2), not committed.

        Returns ``(loss, decrease)`` where ``decrease = <grad, x - x_new>`` is the first-order decrease
        the Armijo condition compares against (``lr * ||grad||^2`` when no projection is active).
        Uses the gradients stored by the last :meth:`evaluate`. ``index`` (a sequence of slots): only those
        slots, ``lr`` then has one row per listed slot.
        """
        idx, (V, W0, H0, weight, _, _) = self._slots(index)
        gW, gH = (self.gW, self.gH) if idx is None else (self.gW[idx], self.gH[idx])
        lr_W = lr[:, 0].reshape(-1, 1, 1, 1)
        lr_H = lr[:, 1].reshape(-1, 1, 1)
        W = W0 - lr_W * gW
        H = H0 - lr_H * gH
        if self.cfg.nonneg:
            W.clamp_(min=0)
            H.clamp_(min=0)
        R = self._weighted(self._residual(W, H, V), weight)
        decrease = (gW * (W0 - W)).sum(dim=(1, 2, 3)) + (gH * (H0 - H)).sum(dim=(1, 2))
        return self._loss(W, H, R), decrease

"""Reference (non-SGD) NMF solvers on numpy float64, with missing entries: HALS and masked non-negative ALS.

Minimal versions written for ``lrenv factorize`` (issue 13); another module of the same name and signatures
may replace them. Both minimise ``1/2 ||M o (V - W H)||^2`` (+ ``reg/2 (||W||^2 + ||H||^2)`` for ALS) over
``W, H >= 0`` and call ``callback(it, W, H)`` after every iteration (one sweep over both factors); a true
return value stops the run. They exist because SPEC §6 found that on partially observed data (``sales``) no
SGD schedule gets within 10^3 of the achievable held-out error while masked ALS reaches it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Callback = Callable[[int, np.ndarray, np.ndarray], bool]
_EPS = 1e-12


def _check(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, mask: np.ndarray | None, iters: int):
    V = np.asarray(V, dtype=np.float64)
    W, H = np.array(W0, dtype=np.float64), np.array(H0, dtype=np.float64)
    if V.ndim != 2 or W.shape != (V.shape[0], W.shape[1]) or H.shape != (W.shape[1], V.shape[1]):
        raise ValueError(f"shapes do not chain: V {V.shape}, W0 {W.shape}, H0 {H.shape}; need V (m, n), "
                         "W0 (m, r), H0 (r, n)")
    if mask is not None and np.shape(mask) != V.shape:
        raise ValueError(f"mask has shape {np.shape(mask)}, the data {V.shape}")
    if not (isinstance(iters, (int, np.integer)) and iters >= 0):
        raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
    M = None if mask is None else np.asarray(mask, dtype=bool)
    return np.where(M, V, 0.0) if M is not None else V, W, H, M


def hals(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, *, mask: np.ndarray | None = None, iters: int,
         callback: Callback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hierarchical ALS (Cichocki & Phan): exact non-negative minimisation over one column of W, then
    one row of H, at a time. With a mask each coordinate update weights by the observed entries
    (``w_k = max(0, sum_j M_ij R_ij h_kj / sum_j M_ij h_kj^2)``, ``R`` the residual without component k),
    so it is still exact per coordinate block."""
    V, W, H, M = _check(V, W0, H0, mask, iters)
    r = W.shape[1]
    for it in range(1, iters + 1):
        if M is None:  # Gram form: O(r (m + n) r) per sweep after two products
            VH, HH = V @ H.T, H @ H.T
            for k in range(r):
                W[:, k] = np.maximum(W[:, k] + (VH[:, k] - W @ HH[:, k]) / max(HH[k, k], _EPS), 0.0)
            WV, WW = W.T @ V, W.T @ W
            for k in range(r):
                H[k] = np.maximum(H[k] + (WV[k] - WW[k] @ H) / max(WW[k, k], _EPS), 0.0)
        else:
            R = M * (V - W @ H)  # observed residual, kept up to date
            for k in range(r):
                Rk = R + M * np.outer(W[:, k], H[k])
                W[:, k] = np.maximum((Rk @ H[k]) / np.maximum(M @ (H[k] ** 2), _EPS), 0.0)
                R = Rk - M * np.outer(W[:, k], H[k])
            for k in range(r):
                Rk = R + M * np.outer(W[:, k], H[k])
                H[k] = np.maximum((W[:, k] @ Rk) / np.maximum((W[:, k] ** 2) @ M, _EPS), 0.0)
                R = Rk - M * np.outer(W[:, k], H[k])
        if callback is not None and callback(it, W, H):
            break
    return W, H


def nnls_rows(V: np.ndarray, M: np.ndarray, F: np.ndarray, reg: float, out: np.ndarray,
               sweeps: int = 20, rtol: float = 1e-8) -> None:
    """For every row i: out[i] = argmin_{x >= 0} ||F[:, Omega_i]^T x - V[i, Omega_i]||^2 + reg ||x||^2.

    Each row's problem is the r x r quadratic ``1/2 x^T G_i x - b_i^T x`` with its masked Gram matrix
    ``G_i = F diag(M_i) F^T + reg I``; all rows are solved together by cyclic coordinate descent (exact
    minimisation over one coordinate at a time, projected onto >= 0), warm-started from ``out`` and run until
    no coordinate moves by more than ``rtol`` of the row's scale. Vectorised over rows, this is ~100x faster
    than one ``scipy.optimize.nnls`` call per row (85 % of sales rows have an active constraint, so an
    unconstrained solve plus fix-ups does not help), and converges to the same solution (convex problem)."""
    r = F.shape[0]
    Mf = M.astype(np.float64)
    outer = (F[:, None, :] * F[None, :, :]).reshape(r * r, -1)
    G = (Mf @ outer.T).reshape(-1, r, r) + reg * np.eye(r)
    b = (Mf * V) @ F.T
    diag = np.maximum(np.einsum("ikk->ik", G), _EPS)
    x = np.maximum(out, 0.0)
    for _ in range(sweeps):
        moved = 0.0
        for k in range(r):
            grad_k = np.einsum("ij,ij->i", G[:, k, :], x) - b[:, k]
            new = np.maximum(x[:, k] - grad_k / diag[:, k], 0.0)
            moved = max(moved, float(np.max(np.abs(new - x[:, k]))))
            x[:, k] = new
        if moved <= rtol * max(float(np.max(np.abs(x))), _EPS):
            break
    out[:] = x


def masked_als(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, *, mask: np.ndarray | None, reg: float = 1e-6,
               iters: int, callback: Callback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Alternating non-negative least squares over the observed entries only: each row of W (then each
    column of H) is the non-negative ridge solution on its own observed entries (batched coordinate descent, see
    :func:`nnls_rows`).
    ``reg`` keeps rows with few observations well posed; ``mask=None`` means every entry is observed."""
    V, W, H, M = _check(V, W0, H0, mask, iters)
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    if M is None:
        M = np.ones(V.shape, dtype=bool)
    Ht = np.ascontiguousarray(H.T)
    for it in range(1, iters + 1):
        nnls_rows(V, M, Ht.T, reg, W)
        nnls_rows(V.T, M.T, W.T, reg, Ht)
        H = Ht.T
        if callback is not None and callback(it, W, np.ascontiguousarray(H)):
            break
    return W, np.ascontiguousarray(Ht.T)


def grow_rank(solver: Callable[..., tuple[np.ndarray, np.ndarray]], V: np.ndarray, W0: np.ndarray, H0: np.ndarray,
              *, mask: np.ndarray | None = None, iters: int, iters_per_rank: int | None = None, scale: float = 0.1,
              callback: Callback | None = None, **solver_kw) -> tuple[np.ndarray, np.ndarray]:
    """Run ``solver`` (``hals`` or ``masked_als``) at rank 1, 2, ..., r, adding one component of the initial
    factors (times ``scale``) at a time, ``iters_per_rank`` iterations each, then at full rank for the rest of
    the ``iters`` budget. Every iteration (at any rank) counts against ``iters`` and reaches ``callback`` with
    the global iteration number and the current (possibly lower-rank) factors.

    Why: on data whose components differ in scale by orders of magnitude (``sales``: weights 1 ... 0.01), ALS
    started at full rank from a random point often settles where a large component is shared out wrongly
    between several: a similar training loss, held-out errors 10^4 x the truth's on a few large entries.
    Growing the rank fits the components roughly in order of energy, like a deflation; measured on a
    ``sales`` instance with a 10 % hold-out: held-out MSE 2.6e-5 after 8 x 25 iterations (generating factors:
    5.5e-5) against 4.2 for plain ALS from the same start after 400."""
    V, W0, H0, M = _check(V, W0, H0, mask, iters)
    r = W0.shape[1]
    per = max(1, min(25, iters // (2 * r))) if iters_per_rank is None else int(iters_per_rank)
    done = 0
    stop = False

    def cb(it: int, W: np.ndarray, H: np.ndarray) -> bool:
        nonlocal stop
        stop = bool(callback is not None and callback(done + it, W, H)) or done + it >= iters
        return stop

    W, H = W0[:, :1].copy(), H0[:1].copy()
    for k in range(1, r + 1):
        if k > 1:
            W = np.hstack([W, scale * W0[:, k - 1:k]])
            H = np.vstack([H, scale * H0[k - 1:k]])
        n_it = per if k < r else iters - done
        if n_it <= 0:
            break
        W, H = solver(V, W, H, mask=M, iters=n_it, callback=cb, **solver_kw)
        done += n_it
        if stop:
            break
    if W.shape[1] < r:  # the budget ran out while growing: pad with zero components
        W = np.hstack([W, np.zeros((W.shape[0], r - W.shape[1]))])
        H = np.vstack([H, np.zeros((r - H.shape[0], H.shape[1]))])
    return W, H

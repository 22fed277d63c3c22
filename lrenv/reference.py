"""Reference factorisation algorithms in plain numpy float64: what a user would run instead of SGD.

Both algorithms are block-coordinate methods whose every block update is an *exact* minimisation, so
their objective never increases: they are the floor a learned SGD schedule is compared with on the
families with missing data, and the solvers behind ``lrenv factorize``.

- :func:`hals` -- Hierarchical Alternating Least Squares for NMF (Cichocki & Phan, 2009; Gillis &
  Glineur, 2012): one column of W (then one row of H) at a time, each the exact non-negative
  minimiser with everything else fixed. Fully observed data uses the usual Gram-matrix form
  (``V H^T`` and ``H H^T`` once per sweep). **With a mask it uses masked column/row updates, not the
  weighted/EM form**: the coordinate minimiser of ``1/2 ||M o (V - WH)||^2`` in ``W[i, k]`` is
  ``max(0, sum_j M_ij R^k_ij H_kj / sum_j M_ij H_kj^2)`` with ``R^k`` the residual without component
  ``k``, computed for all rows at once from a maintained masked residual. EM-style imputation
  (filling the missing entries with the current ``WH``) would also decrease the masked loss but
  needs many more sweeps when half the entries are missing.
- :func:`masked_als` -- alternating (non-negative) least squares over the observed entries only:
  every row of W (then every column of H) is the exact minimiser of its own small ridge problem
  ``1/2 ||M_i o (V_i - w H)||^2 + reg/2 ||w||^2``, with ``w >= 0`` solved by an active-set NNLS
  (:func:`scipy.optimize.nnls` on the Gram form; rows whose unconstrained solution is already
  non-negative skip it, which is most rows near convergence).

Common conventions: ``V`` is (m, n), ``W0`` (m, r), ``H0`` (r, n); ``mask`` is a boolean (m, n)
array of observed entries (None: all observed); entries outside the mask are never read (they may
be NaN). The inputs are not modified. ``callback(it, W, H)`` is called after every iteration
(``it`` = iterations completed, from 1) with the current factors -- read them, copy them if you keep
them, do not modify them -- and a true return value stops the run early. Both functions return
``(W, H)``. :func:`masked_loss` is the objective they decrease.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

Callback = Callable[[int, np.ndarray, np.ndarray], bool]
"""``callback(it, W, H) -> bool``: called after every iteration; True stops the run."""


def masked_loss(V: np.ndarray, W: np.ndarray, H: np.ndarray, mask: np.ndarray | None = None,
                reg: float = 0.0) -> float:
    """``1/2 ||M o (V - WH)||_F^2 + reg/2 (||W||_F^2 + ||H||_F^2)`` over the observed entries ``M``
    (missing entries of ``V`` may hold anything, NaN included)."""
    D = W @ H - V
    if mask is not None:
        D = np.where(mask, D, 0.0)
    f = 0.5 * float(np.sum(D * D))
    if reg:
        f += 0.5 * reg * (float(np.sum(W * W)) + float(np.sum(H * H)))
    return f


# ----------------------------------------------------------------------------- input checks
def _prepare(name: str, V: np.ndarray, W0: np.ndarray, H0: np.ndarray, mask: np.ndarray | None, iters: int,
             nonneg: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Validate shapes and values; return float64 copies ``(V with missing set to 0, W, H, mask)``."""
    V = np.asarray(V, dtype=np.float64)
    W = np.array(W0, dtype=np.float64)
    H = np.array(H0, dtype=np.float64)
    if V.ndim != 2:
        raise ValueError(f"{name}: V must be a 2-D matrix, got shape {V.shape}")
    m, n = V.shape
    if W.ndim != 2 or H.ndim != 2 or W.shape[0] != m or H.shape[1] != n or W.shape[1] != H.shape[0]:
        raise ValueError(f"{name}: need W0 of shape (m, r) and H0 of shape (r, n) for V of shape {V.shape}; "
                         f"got W0 {W.shape} and H0 {H.shape}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"{name}: iters must be a non-negative integer, got {iters!r}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != V.shape or mask.dtype != bool:
            raise ValueError(f"{name}: mask must be a boolean array of V's shape {V.shape}, got "
                             f"{mask.dtype} {mask.shape}")
        V = np.where(mask, V, 0.0)
    if not np.all(np.isfinite(V)):
        raise ValueError(f"{name}: V has NaN or infinite observed entries; pass mask=~np.isnan(V) to treat "
                         "NaN as missing")
    if not (np.all(np.isfinite(W)) and np.all(np.isfinite(H))):
        raise ValueError(f"{name}: the initial factors W0, H0 must be finite")
    if nonneg:
        if np.any(V < 0):
            raise ValueError(f"{name}: non-negative factorisation needs V >= 0 on the observed entries "
                             f"(min {V.min():.3g}); use nonneg=False for a signed matrix")
        if np.any(W < 0) or np.any(H < 0):
            raise ValueError(f"{name}: the initial factors must be non-negative (project them with "
                             "np.maximum(W0, 0))")
    return V, W, H, mask


# ----------------------------------------------------------------------------- HALS
def _hals_dense_W(A: np.ndarray, B: np.ndarray, W: np.ndarray) -> None:
    """One HALS sweep over the columns of W for ``min 1/2 ||V - W H||^2`` given ``A = V H^T`` and
    ``B = H H^T`` (in place). Column k's exact minimiser: ``max(0, W_k + (A_k - W B_k) / B_kk)``."""
    for k in range(W.shape[1]):
        if B[k, k] > 0:
            W[:, k] = np.maximum(W[:, k] + (A[:, k] - W @ B[:, k]) / B[k, k], 0.0)


def _hals_masked_W(M: np.ndarray, R: np.ndarray, W: np.ndarray, H: np.ndarray) -> None:
    """One masked HALS sweep over the columns of W (in place). ``R = M o (V - WH)`` is kept current.

    With ``R^k = R + M o (w_k h_k)`` (the residual without component k), the minimiser of
    ``1/2 ||R^k - M o (w h_k)||^2`` over ``w >= 0`` is ``max(0, (R^k h_k) / (M h_k^2))`` row by row;
    rows that observe no entry where ``h_k != 0`` keep their value (the loss does not depend on it).
    """
    for k in range(W.shape[1]):
        h = H[k]
        den = M @ (h * h)
        if not np.any(den > 0):
            continue
        Rk = R + M * np.outer(W[:, k], h)
        num = Rk @ h
        w = np.where(den > 0, np.maximum(num / np.where(den > 0, den, 1.0), 0.0), W[:, k])
        W[:, k] = w
        R[...] = Rk - M * np.outer(w, h)


def hals(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, *, mask: np.ndarray | None = None, iters: int,
         callback: Callback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """HALS for NMF, ``min 1/2 ||M o (V - WH)||_F^2`` over ``W, H >= 0`` (``M``: ``mask``, default all).

    One iteration = one sweep over the r columns of W, then the r rows of H, each set to its exact
    non-negative minimiser with the rest fixed (masked data: masked column/row updates, see the
    module docstring), so the loss never increases. Runs ``iters`` iterations unless ``callback``
    stops it earlier. Cost per iteration: O(mnr) dense, about 3x that with a mask.
    """
    V, W, H, mask = _prepare("hals", V, W0, H0, mask, iters, nonneg=True)
    M = None if mask is None else mask.astype(np.float64)
    R = None if M is None else M * (V - W @ H)
    for it in range(1, iters + 1):
        if M is None:
            _hals_dense_W(V @ H.T, H @ H.T, W)
            Ht = H.T.copy()  # the H-step is the W-step of the transposed problem
            _hals_dense_W(V.T @ W, W.T @ W, Ht)
            H = Ht.T.copy()
        else:
            assert R is not None
            _hals_masked_W(M, R, W, H)
            Ht, Rt = H.T.copy(), R.T.copy()
            _hals_masked_W(M.T, Rt, Ht, W.T)
            H, R = Ht.T.copy(), Rt.T.copy()
        if callback is not None and callback(it, W, H):
            break
    return W, H


# ----------------------------------------------------------------------------- masked ALS
def _nnls_gram(G: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``argmin_{w >= 0} 1/2 w^T G w - c^T w`` for a symmetric positive semidefinite G, via
    :func:`scipy.optimize.nnls` on ``||A w - b||`` with ``A^T A = G`` and ``A^T b = c``."""
    from scipy.optimize import nnls
    lam, Q = np.linalg.eigh(G)
    keep = lam > lam.max(initial=0.0) * 1e-13
    if not np.any(keep):
        return np.zeros_like(c)
    s = np.sqrt(lam[keep])
    A = (Q[:, keep] * s).T  # A^T A = Q diag(lam) Q^T = G on its range
    b = (Q[:, keep].T @ c) / s
    w, _ = nnls(A, b, maxiter=50 * len(c))
    return w


_PIVOT_ROUNDS = 10
"""Batched principal-pivoting rounds before the remaining rows go to the one-row active-set solver."""


def _solve_passive(G: np.ndarray, C: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Batched ``w_F = G_FF^{-1} c_F``, ``w_A = 0`` per row for the active sets ``active`` (m, r)."""
    r = G.shape[-1]
    pinned = active[:, :, None] | active[:, None, :]
    Gm = np.where(pinned, np.eye(r), G)
    Cm = np.where(active, 0.0, C)
    try:
        return np.linalg.solve(Gm, Cm[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:  # singular rows (reg = 0 and too few observations): least norm
        return np.einsum("ikl,il->ik", np.linalg.pinv(Gm, hermitian=True), Cm)


def _als_rows(V: np.ndarray, M: np.ndarray | None, H: np.ndarray, reg: float, nonneg: bool,
              warm: np.ndarray | None = None) -> np.ndarray:
    """Every row ``w_i = argmin 1/2 ||M_i o (V_i - w H)||^2 + reg/2 ||w||^2`` (``w >= 0`` if nonneg).

    Non-negative rows are solved exactly: a row is accepted from a batched solve only when it meets
    the NNLS optimality (KKT) conditions -- first with no active constraint, then by batched block
    principal pivoting from the active set of ``warm`` (the previous iterate: near convergence it
    rarely changes) -- and rows still open after :data:`_PIVOT_ROUNDS` rounds (pivoting can cycle)
    go to the one-row active-set solver. The KKT test allows a gradient of -1e-10 x the row's scale
    on the active set (rounding)."""
    m, r = V.shape[0], H.shape[0]
    if M is None:  # one Gram matrix for every row
        G = np.broadcast_to(H @ H.T + reg * np.eye(r), (m, r, r))
        C = V @ H.T
    else:
        G = np.einsum("kj,ij,lj->ikl", H, M, H, optimize=True) + reg * np.eye(r)
        C = (V * M) @ H.T
    Wn = _solve_passive(G, C, np.zeros((m, r), dtype=bool))
    if not nonneg:
        return Wn
    todo = np.any(Wn < 0, axis=1)
    if np.any(todo):
        # block principal pivoting (Kim & Park 2011), all rows at once: start from the previous
        # iterate's zeros (or the negative entries), swap every variable that violates KKT, repeat
        idx = np.nonzero(todo)[0]
        active = (warm[idx] <= 0) if warm is not None else (Wn[idx] < 0)
        Gi, Ci = G[idx], C[idx]
        tol = 1e-10 * (np.abs(Ci).max(axis=1, keepdims=True) + 1e-300)
        for _ in range(_PIVOT_ROUNDS):
            w = _solve_passive(Gi, Ci, active)
            grad = np.einsum("ikl,il->ik", Gi, w) - Ci
            bad = np.where(active, grad < -tol, w < 0)
            ok = ~np.any(bad, axis=1)
            Wn[idx[ok]] = np.where(active[ok], 0.0, w[ok])
            todo[idx[ok]] = False
            keep = ~ok
            if not np.any(keep):
                break
            idx, Gi, Ci, tol, active = idx[keep], Gi[keep], Ci[keep], tol[keep], active[keep] ^ bad[keep]
    for i in np.nonzero(todo)[0]:
        Wn[i] = _nnls_gram(G[i], C[i])
    return Wn


def masked_als(V: np.ndarray, W0: np.ndarray, H0: np.ndarray, *, mask: np.ndarray | None, reg: float = 1e-6,
               nonneg: bool = True, iters: int, callback: Callback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Alternating (non-negative) least squares over the observed entries only.

    Minimises ``1/2 ||M o (V - WH)||_F^2 + reg/2 (||W||_F^2 + ||H||_F^2)`` (:func:`masked_loss`): one
    iteration solves every row of W exactly with H fixed, then every column of H with W fixed. ``reg``
    (a small ridge, default 1e-6) keeps rows and columns with few observations well-posed; ``reg = 0``
    takes least-norm solutions. ``nonneg=False`` gives plain (signed) ALS with closed-form solves.
    The objective never increases. ``mask=None`` means every entry is observed.
    """
    if not (isinstance(reg, (int, float, np.floating)) and np.isfinite(reg) and reg >= 0):
        raise ValueError(f"masked_als: reg must be a finite number >= 0, got {reg!r}")
    V, W, H, mask = _prepare("masked_als", V, W0, H0, mask, iters, nonneg=nonneg)
    M = None if mask is None else mask.astype(np.float64)
    Vt, Mt = V.T.copy(), None if M is None else M.T.copy()
    for it in range(1, iters + 1):
        W = _als_rows(V, M, H, float(reg), nonneg, warm=W)
        H = _als_rows(Vt, Mt, W.T, float(reg), nonneg, warm=H.T).T.copy()
        if callback is not None and callback(it, W, H):
            break
    return W, H


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
    M = mask
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

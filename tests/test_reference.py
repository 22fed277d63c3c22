"""lrenv.reference: HALS and masked ALS against numpy/scipy/scikit-learn references and their optimality conditions."""

import numpy as np
import pytest
from scipy.optimize import nnls

from lrenv.reference import hals, masked_als, masked_loss


def low_rank(m=30, n=20, r=3, seed=0, observed=None):
    """A noiseless non-negative rank-r matrix, its factors and (optionally) a random mask."""
    rng = np.random.default_rng(seed)
    Wt, Ht = rng.uniform(0.2, 1.0, (m, r)), rng.uniform(0.2, 1.0, (r, n))
    mask = None if observed is None else rng.uniform(size=(m, n)) < observed
    return Wt @ Ht, Wt, Ht, mask


def init(m, n, r, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 1.0, (m, r)), rng.uniform(0.1, 1.0, (r, n))


def history(fn, V, W0, H0, mask, loss_reg=0.0, **kw):
    """Loss (with ridge ``loss_reg``) after every iteration, through the callback."""
    out = []
    fn(V, W0, H0, mask=mask, callback=lambda it, W, H: out.append(masked_loss(V, W, H, mask, loss_reg)), **kw)
    return np.array(out)


def kkt_violation(V, W, H, mask, reg=0.0):
    """Largest violation of the non-negative KKT conditions (W >= 0, grad >= 0, W o grad = 0), relative."""
    M = np.ones_like(V) if mask is None else mask.astype(float)
    R = M * (W @ H - V)
    gW, gH = R @ H.T + reg * W, W.T @ R + reg * H
    scale = np.abs(M * V).max() * max(np.abs(W).max(), np.abs(H).max())
    v = max(-min(W.min(), H.min(), 0.0), -min(gW.min(), gH.min(), 0.0) / scale,
            np.abs(W * gW).max() / scale / np.abs(W).max(), np.abs(H * gH).max() / scale / np.abs(H).max())
    return v


@pytest.mark.parametrize("observed", [None, 0.6])
def test_losses_never_increase(observed):
    rng = np.random.default_rng(5)
    V = rng.uniform(size=(40, 25))  # not low rank: no exact fit, a real descent path
    mask = None if observed is None else rng.uniform(size=V.shape) < observed
    W0, H0 = init(40, 25, 4)
    for f, kw, reg in [(hals, {}, 0.0), (masked_als, {"reg": 1e-6}, 1e-6), (masked_als, {"reg": 0.1}, 0.1),
                       (masked_als, {"reg": 1e-6, "nonneg": False}, 1e-6)]:
        h = history(f, V, W0, H0, mask, reg, iters=40, **kw)
        assert len(h) == 40
        assert np.all(np.diff(h) <= 1e-12 * h[:-1]), (f.__name__, kw)
        assert h[-1] < 0.5 * masked_loss(V, W0, H0, mask, reg)


def test_hals_equals_scikit_learn_coordinate_descent():
    """Unmasked HALS is scikit-learn's 'cd' solver (same update order): identical iterates."""
    from sklearn.decomposition import non_negative_factorization
    rng = np.random.default_rng(2)
    V = rng.uniform(size=(50, 30))
    W0, H0 = init(50, 30, 5)
    W, H = hals(V, W0, H0, iters=7)
    Ws, Hs, _ = non_negative_factorization(V, W=W0.copy(), H=H0.copy(), n_components=5, init="custom", solver="cd",
                                           max_iter=7, tol=0.0, random_state=0)
    np.testing.assert_allclose(W, Ws, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(H, Hs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pivot_rounds", [0, 10])
def test_one_als_step_matches_row_by_row_nnls(pivot_rounds, monkeypatch):
    """Each row of W after one ALS iteration is scipy's NNLS on that row's observed entries (+ ridge rows),
    whether the batched pivoting or the one-row active-set solver settles it."""
    import lrenv.reference as reference
    monkeypatch.setattr(reference, "_PIVOT_ROUNDS", pivot_rounds)
    rng = np.random.default_rng(3)
    V = rng.uniform(size=(15, 12))
    mask = rng.uniform(size=V.shape) < 0.5
    W0, H0 = init(15, 12, 4)
    W0 = 3.0 * W0  # push the least-squares solutions of some rows below zero
    reg = 1e-3
    steps = []
    masked_als(V, W0, H0, mask=mask, reg=reg, iters=1, callback=lambda it, W, H: steps.append((W.copy(), H.copy())))
    W1, H1 = steps[0]
    sq = np.sqrt(reg) * np.eye(4)
    for i in range(15):
        o = mask[i]
        ref, _ = nnls(np.vstack([H0[:, o].T, sq]), np.concatenate([V[i, o], np.zeros(4)]))
        np.testing.assert_allclose(W1[i], ref, atol=1e-10)
    for j in range(12):
        o = mask[:, j]
        ref, _ = nnls(np.vstack([W1[o], sq]), np.concatenate([V[o, j], np.zeros(4)]))
        np.testing.assert_allclose(H1[:, j], ref, atol=1e-10)
    assert (W1 == 0).any(), "the instance must exercise the active-set path"


@pytest.mark.parametrize("observed", [None, 0.7])
def test_fixed_point_satisfies_kkt(observed):
    """Sparse truth plus noise: the limit has active constraints (zeros with a positive gradient), and
    both methods end at a KKT point that one more iteration leaves in place. (Seed 9: both converge in
    well under 2000 iterations; other instances sit in swamps for thousands.)"""
    rng = np.random.default_rng(9)
    Wt = rng.uniform(0.2, 1, (12, 3)) * (rng.uniform(size=(12, 3)) < 0.6)
    Ht = rng.uniform(0.2, 1, (3, 8)) * (rng.uniform(size=(3, 8)) < 0.6)
    V = Wt @ Ht + 0.02 * rng.uniform(size=(12, 8))
    mask = rng.uniform(size=V.shape) < 0.7 if observed else None
    W0, H0 = init(12, 8, 3)
    for f, kw, reg in [(hals, {}, 0.0), (masked_als, {"reg": 0.1}, 0.1)]:
        W, H = f(V, W0, H0, mask=mask, iters=2000, **kw)
        assert kkt_violation(V, W, H, mask, reg) < 1e-9, f.__name__
        assert (W <= 1e-12).sum() + (H <= 1e-12).sum() >= 2, "the limit must have active constraints"
        W2, H2 = f(V, W, H, mask=mask, iters=1, **kw)
        np.testing.assert_allclose(W2 @ H2, W @ H, rtol=1e-9, atol=1e-12)


def test_exact_recovery_of_a_noiseless_low_rank_matrix_with_a_mask():
    """Half the entries hidden: both methods fill them in (the error is on *all* entries)."""
    V, _, _, mask = low_rank(m=40, n=30, r=3, observed=0.5)
    W0, H0 = init(40, 30, 3)
    W, H = masked_als(np.where(mask, V, np.nan), W0, H0, mask=mask, reg=0.0, iters=300)
    assert np.abs(W @ H - V).max() < 1e-6 * V.max()
    W, H = hals(np.where(mask, V, np.nan), W0, H0, mask=mask, iters=3000)
    assert np.abs(W @ H - V).max() < 1e-4 * V.max()


def test_signed_als_solves_an_unconstrained_factorisation():
    rng = np.random.default_rng(4)
    V = rng.standard_normal((10, 3)) @ rng.standard_normal((3, 8))  # signed, rank 3
    W0, H0 = rng.standard_normal((10, 3)), rng.standard_normal((3, 8))
    W, H = masked_als(V, W0, H0, mask=None, reg=0.0, nonneg=False, iters=200)
    assert np.abs(W @ H - V).max() < 1e-8 * np.abs(V).max()
    with pytest.raises(ValueError, match="nonneg=False"):
        masked_als(V, np.abs(W0), np.abs(H0), mask=None, iters=1)


def test_callback_stops_and_inputs_are_not_modified():
    V, _, _, mask = low_rank(observed=0.8)
    W0, H0 = init(30, 20, 3)
    W0c, H0c = W0.copy(), H0.copy()
    for f in (hals, masked_als):
        seen = []
        f(V, W0, H0, mask=mask, iters=50, callback=lambda it, W, H: seen.append(it) or it == 3)
        assert seen == [1, 2, 3], f.__name__
        np.testing.assert_array_equal(W0, W0c)
        np.testing.assert_array_equal(H0, H0c)
        W, H = f(V, W0, H0, mask=mask, iters=0)
        np.testing.assert_array_equal(W, W0)


def test_clear_errors():
    V, _, _, _ = low_rank()
    W0, H0 = init(30, 20, 3)
    Vn = V.copy()
    Vn[0, 0] = np.nan
    with pytest.raises(ValueError, match="mask=~np.isnan"):
        hals(Vn, W0, H0, iters=1)
    hals(Vn, W0, H0, mask=~np.isnan(Vn), iters=1)  # NaN outside the mask is never read
    with pytest.raises(ValueError, match="shape"):
        masked_als(V, W0[:, :2], H0, mask=None, iters=1)
    with pytest.raises(ValueError, match="V >= 0"):
        hals(-V, W0, H0, iters=1)
    with pytest.raises(ValueError, match="initial factors must be non-negative"):
        hals(V, -W0, H0, iters=1)
    with pytest.raises(ValueError, match="boolean"):
        hals(V, W0, H0, mask=np.ones(V.shape), iters=1)
    with pytest.raises(ValueError, match="iters"):
        masked_als(V, W0, H0, mask=None, iters=-1)
    with pytest.raises(ValueError, match="reg"):
        masked_als(V, W0, H0, mask=None, reg=-1.0, iters=1)

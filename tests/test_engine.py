"""The SGD engine: the algorithm against a numpy reference, the step-size theory, and the statistics."""

import numpy as np
import pytest
import torch

from lrenv.engine import STAT_GRAD_NORM, STAT_HELDOUT, STAT_L_H, STAT_L_W, STAT_LOSS, EngineConfig, SGDEngine
from lrenv.problems import make_family


def make_engine(V, W0, H0, *, K=1, nonneg=True, mask=None, heldout=None, reg=0.0, perm=None):
    m, n = V.shape
    cfg = EngineConfig(m=m, n=n, rank=W0.shape[1], num_blocks=K, nonneg=nonneg, reg=reg,
                       masked=mask is not None, heldout=heldout is not None, dtype=torch.float64)
    eng = SGDEngine(cfg)
    eng.load(0, V, W0, H0, row_perm=np.arange(m) if perm is None else perm, mask=mask, heldout=heldout)
    return eng


def random_problem(m=60, n=20, r=4, seed=0):
    rng = np.random.default_rng(seed)
    V = rng.uniform(size=(m, r)) @ rng.uniform(size=(r, n)) + 0.05 * rng.uniform(size=(m, n))
    return V, rng.uniform(size=(m, r)), rng.uniform(size=(r, n))


def reference_epoch(V, W, H, lr_W, lr_H, blocks, order, mask=None, nonneg=True):
    """Plain numpy statement of one epoch: each minibatch of rows updates its W rows and H from the same
    point with the unbiased estimate K * (minibatch gradient) for H, then projects."""
    W, H = W.copy(), H.copy()
    K = len(blocks)
    M = np.ones_like(V) if mask is None else mask
    for k in order:
        rows = blocks[k]
        R = M[rows] * (W[rows] @ H - V[rows])
        gW, gH = R @ H.T, K * W[rows].T @ R
        W[rows] -= lr_W * gW
        H -= lr_H * gH
        if nonneg:
            W[rows] = np.maximum(W[rows], 0)
            H = np.maximum(H, 0)
    return W, H


@pytest.mark.parametrize("masked", [False, True])
def test_epoch_matches_numpy_reference(masked):
    V, W0, H0 = random_problem(m=63)  # 63 rows in 4 blocks of 16: one padding row
    rng = np.random.default_rng(1)
    mask = rng.uniform(size=V.shape) < 0.7 if masked else None
    perm = rng.permutation(63)
    eng = make_engine(V, W0, H0, K=4, mask=mask, perm=perm)
    order = np.array([[2, 0, 3, 1]])
    lr = (0.01, 0.002)
    eng.epoch(torch.tensor([lr], dtype=torch.float64), order)
    b = 16
    blocks = [perm[k * b:(k + 1) * b] for k in range(4)]
    W_ref, H_ref = reference_epoch(V, W0, H0, *lr, blocks, order[0], mask=mask)
    W, H = eng.factors(0)
    np.testing.assert_allclose(W, W_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(H, H_ref, rtol=1e-10, atol=1e-12)


def test_statistics_match_definitions():
    V, W0, H0 = random_problem()
    rng = np.random.default_rng(2)
    mask = rng.uniform(size=V.shape) < 0.6
    held = ~mask
    eng = make_engine(V, W0, H0, K=3, mask=mask, heldout=held)
    s = eng.evaluate()[0].numpy()
    D = W0 @ H0 - V
    assert s[STAT_LOSS] == pytest.approx(0.5 * np.sum((mask * D) ** 2), rel=1e-12)
    assert s[STAT_HELDOUT] == pytest.approx(np.mean(D[held] ** 2), rel=1e-12)
    # masked Lipschitz constants: max over rows / columns of the masked Gram matrices' top eigenvalue
    L_W = max(np.linalg.eigvalsh((H0 * mask[i]) @ H0.T)[-1] for i in range(V.shape[0]))
    L_H = max(np.linalg.eigvalsh(W0.T @ (W0 * mask[:, [j]]))[-1] for j in range(V.shape[1]))
    assert s[STAT_L_W] == pytest.approx(L_W, rel=1e-10)
    assert s[STAT_L_H] == pytest.approx(L_H, rel=1e-10)
    gW, gH = (mask * D) @ H0.T, W0.T @ (mask * D)
    pg = np.concatenate([np.where(W0 > 0, gW, np.minimum(gW, 0)).ravel(), np.where(H0 > 0, gH, np.minimum(gH, 0)).ravel()])
    assert s[STAT_GRAD_NORM] == pytest.approx(np.linalg.norm(pg), rel=1e-10)


def test_trial_loss_equals_committed_full_batch_step():
    V, W0, H0 = random_problem()
    eng = make_engine(V, W0, H0, K=1)
    eng.evaluate()
    lr = torch.tensor([[0.003, 0.001]], dtype=torch.float64)
    trial, decrease = eng.trial_loss(lr)
    before = eng.W.clone(), eng.H.clone()
    assert torch.equal(eng.W, before[0])  # nothing committed
    eng.epoch(lr, np.array([[0]]))
    assert float(trial[0]) == pytest.approx(float(eng.loss()[0]), rel=1e-12)
    assert float(decrease[0]) > 0


def _block_losses(V, W0, H0, factor, which, steps=300):
    """Loss sequence of unconstrained full-batch block GD on one factor at ``factor / L`` of that block."""
    eng = make_engine(V, W0, H0, K=1, nonneg=False)
    L = eng.evaluate()[0, STAT_L_W if which == "W" else STAT_L_H].item()
    lr = torch.tensor([[factor / L, 0.0] if which == "W" else [0.0, factor / L]], dtype=torch.float64)
    losses = []
    for _ in range(steps):
        eng.epoch(lr, np.array([[0]]))
        losses.append(eng.loss().item())
    return np.array(losses), L


@pytest.mark.parametrize("which", ["W", "H"])
def test_step_size_bound_two_over_L(which):
    """SPEC §2: a block step at 1.9/L decreases the loss monotonically, at 2.1/L it rises along the
    worst direction (the top eigenvector of the block's Gram matrix)."""
    V, W0, H0 = random_problem(m=80, n=30, r=5, seed=3)
    down, L = _block_losses(V, W0, H0, 1.9, which)
    assert np.all(np.diff(down) <= 1e-9 * down[0]), "1.9/L must decrease the loss monotonically"
    # the block optimum plus a small push along the worst direction: 2.1/L amplifies it by 1.1 per step
    if which == "W":
        Wstar = np.linalg.lstsq(H0.T, V.T, rcond=None)[0].T
        u = np.linalg.eigh(H0 @ H0.T)[1][:, -1]
        Wp, Hp = Wstar + 1e-3 * np.outer(np.ones(V.shape[0]), u), H0
        optimum = make_engine(V, Wstar, H0, nonneg=False).loss().item()
    else:
        Hstar = np.linalg.lstsq(W0, V, rcond=None)[0]
        u = np.linalg.eigh(W0.T @ W0)[1][:, -1]
        Wp, Hp = W0, Hstar + 1e-3 * np.outer(u, np.ones(V.shape[1]))
        optimum = make_engine(V, W0, Hstar, nonneg=False).loss().item()
    up, _ = _block_losses(V, Wp, Hp, 2.1, which, steps=60)
    assert np.all(np.diff(up) > 0), "2.1/L must make the loss rise along the worst direction"
    excess = up - optimum  # grows by (2.1 - 1)^2 = 1.21 per step
    assert excess[-1] > 1.21 ** 50 * excess[0]


def test_paper_swapped_constant_is_unsafe_for_H():
    """The paper's L = ||W||^2 for the W-step is the H-step's constant; using ||H||^2 (its 'symmetric'
    choice) for the H-step diverges here even at 1.9/L while the correct L_H = ||W^T W|| does not."""
    fam = make_family("small", m=200, n=100, rank=10)
    p = fam.instance(0)
    W0, H0 = p.init(np.random.default_rng(0))
    ok, L_H = _block_losses(p.V, W0, H0, 1.9, "H", steps=100)
    assert ok[-1] < ok[0]
    swapped = np.linalg.norm(H0, 2) ** 2  # the paper's constant for the H-step
    assert swapped < L_H / 2  # far too small: its "safe" step 1.9/swapped is more than 2x past 2/L_H
    eng = make_engine(p.V, W0, H0, K=1, nonneg=False)
    lr = torch.tensor([[0.0, 1.9 / swapped]], dtype=torch.float64)
    for _ in range(30):
        eng.epoch(lr, np.array([[0]]))
    assert not np.isfinite(eng.loss().item()) or eng.loss().item() > 1e3 * ok[0]


def test_batched_engine_matches_single_instances():
    """B instances stepped together equal the same instances stepped one by one."""
    probs = [random_problem(seed=s) for s in range(3)]
    m, n = probs[0][0].shape
    cfg = EngineConfig(m=m, n=n, rank=4, num_blocks=5, dtype=torch.float64)
    batched = SGDEngine(cfg, batch=3)
    singles = []
    rng = np.random.default_rng(0)
    orders = np.stack([rng.permutation(5) for _ in range(3)])
    for i, (V, W0, H0) in enumerate(probs):
        batched.load(i, V, W0, H0, row_perm=np.arange(m))
        e = SGDEngine(cfg)
        e.load(0, V, W0, H0, row_perm=np.arange(m))
        singles.append(e)
    lr = torch.tensor([[0.01, 0.002], [0.005, 0.001], [0.02, 0.003]], dtype=torch.float64)
    batched.epoch(lr, torch.as_tensor(orders))
    for i, e in enumerate(singles):
        e.epoch(lr[i:i + 1], orders[i:i + 1])
        np.testing.assert_allclose(batched.factors(i)[0], e.factors(0)[0], rtol=1e-12)
        np.testing.assert_allclose(batched.evaluate()[i].numpy(), e.evaluate()[0].numpy(), rtol=1e-10)


def test_engine_computes_with_its_thread_count_and_restores_the_callers(monkeypatch):
    """cfg.threads: the engine's products run on that many torch threads (training keeps PPO on one), and
    the caller's setting is back afterwards, also after an error; bad counts are refused."""
    V, W0, H0 = random_problem()
    m, n = V.shape
    cfg = EngineConfig(m=m, n=n, rank=4, num_blocks=2, threads=2)
    eng = SGDEngine(cfg)
    eng.load(0, V, W0, H0, row_perm=np.arange(m))
    seen = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: seen.append(torch.get_num_threads()) or bmm(*a, **k))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eng.epoch(torch.tensor([[1e-3, 1e-3]]), np.array([[0, 1]]))
        eng.evaluate()
        assert seen and set(seen) == {2}
        assert torch.get_num_threads() == 1
        with pytest.raises(IndexError):
            eng.epoch(torch.tensor([[1e-3, 1e-3]]), np.array([[0, 5]]))  # no block 5
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="threads must be a positive"):
            SGDEngine(EngineConfig(m=m, n=n, rank=4, threads=bad))

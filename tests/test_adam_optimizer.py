"""``optimizer='adam'``: the engine's Adam against torch.optim.Adam, the action's reference scale, the env plumbing."""

import copy

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from lrenv.agents.validate import validate_hyperparams
from lrenv.engine import STAT_L_H, STAT_L_W, EngineConfig, SGDEngine
from lrenv.env import NMFEnv
from lrenv.task import TaskConfig
from lrenv.vec_env import BatchedNMFVecEnv

KW = dict(problem="small", problem_params=dict(m=120, n=30, rank=4), budget=6, num_blocks=4, dtype="float64",
          optimizer="adam")


def torch_adam(V, W0, H0, perm, K, orders, lr, reg=0.0, mask=None):
    """torch.optim.Adam over (W, H) on the minibatch losses K * 1/2 ||M_I o (W_I H - V_I)||^2 + reg/2 ||(W, H)||^2,
    the rows ``perm`` cut into K blocks visited in ``orders``, projected onto >= 0 after each step."""
    b = -(-V.shape[0] // K)
    W = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    H = torch.tensor(H0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([W, H], lr=lr)
    Vt = torch.tensor(V)
    M = None if mask is None else torch.tensor(mask, dtype=torch.float64)
    for order in orders:
        for k in order:
            rows = torch.as_tensor(perm[k * b:(k + 1) * b])
            R = W[rows] @ H - Vt[rows]
            if M is not None:
                R = R * M[rows]
            loss = K * 0.5 * (R ** 2).sum() + 0.5 * reg * ((W ** 2).sum() + (H ** 2).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                W.clamp_(min=0)
                H.clamp_(min=0)
    return W.detach().numpy(), H.detach().numpy()


@pytest.mark.parametrize("reg,masked,m", [(0.0, False, 40), (0.1, True, 42)])  # 42 rows: padded blocks
def test_engine_adam_is_torch_adam(reg, masked, m):
    rng = np.random.default_rng(0)
    n, r, K, B = 12, 3, 4, 3
    eng = SGDEngine(EngineConfig(m=m, n=n, rank=r, num_blocks=K, dtype=torch.float64, optimizer="adam", reg=reg,
                                 masked=masked), batch=B)
    probs = []
    for i in range(B):
        V, W0, H0, perm = rng.random((m, n)), rng.random((m, r)), rng.random((r, n)), rng.permutation(m)
        mask = (rng.random((m, n)) < 0.7) if masked else None
        eng.load(i, V, W0, H0, row_perm=perm, mask=mask)
        probs.append((V, W0, H0, perm, mask))
        # the reference scale: the RMS of the initial factors, reported as L = 2 / s
        s = np.sqrt(np.mean(np.concatenate([W0.ravel(), H0.ravel()]) ** 2))
        assert float(eng.adam_scale[i]) == pytest.approx(s, rel=1e-12)
    lrs = [0.01, 0.03, 0.002]
    lr = torch.tensor([[x, x] for x in lrs], dtype=torch.float64)
    orders = [np.stack([rng.permutation(K) for _ in range(B)]) for _ in range(5)]
    for t, o in enumerate(orders):
        if t == 2:  # slot 1 sits out an epoch: the others step alone, with their own step counts
            eng.epoch(lr[[0, 2]], o[[0, 2]], index=[0, 2])
        else:
            eng.epoch(lr, o)
    stats = eng.evaluate().numpy()
    for i, (V, W0, H0, perm, mask) in enumerate(probs):
        ref_W, ref_H = torch_adam(V, W0, H0, perm, K, [o[i] for t, o in enumerate(orders) if (t, i) != (2, 1)],
                                  lrs[i], reg, mask)
        W, H = eng.factors(i)
        np.testing.assert_allclose(W, ref_W, rtol=0, atol=1e-12)
        np.testing.assert_allclose(H, ref_H, rtol=0, atol=1e-12)
        assert stats[i, STAT_L_W] == stats[i, STAT_L_H] == pytest.approx(2.0 / float(eng.adam_scale[i]))
    assert eng.adam_steps.tolist() == [20.0, 16.0, 20.0]


def test_adam_env_action_reference_and_reload():
    env = NMFEnv(**KW, action_mode="per_factor", action_center=0.3, factor_tilt=(2.0, 0.5), log_range=0.5)
    _, info = env.reset(seed=3)
    s = float(env.engine.adam_scale[0])
    assert info["bound_W"] == info["bound_H"] == pytest.approx(s)
    _, _, _, _, info = env.step(np.array([0.0, 1.0], dtype=np.float32))
    assert info["lr_W"] == pytest.approx(0.6 * s) and info["lr_H"] == pytest.approx(0.15 * s * 10 ** 0.5)
    twin = copy.deepcopy(env)  # mid-episode: Adam's moments and step count travel with the env
    a = np.array([-0.3, 0.2], dtype=np.float32)
    o1, r1, *_ = env.step(a)
    o2, r2, *_ = twin.step(a)
    np.testing.assert_array_equal(o1, o2)
    assert r1 == r2
    env.reset(seed=4)  # a new instance starts Adam afresh
    assert float(env.engine.adam_steps[0]) == 0.0 and float(env.engine.adam_m[0].abs().sum()) == 0.0


def test_adam_relative_mode_starts_at_lr_init_times_adam_scale():
    # relative mode's units are Adam's scale s (the reference of every action mode in Adam mode), so a policy
    # trained here multiplies an Adam learning rate that starts at lr_init * s (the form LearnedLR runs)
    env = NMFEnv(**KW, action_mode="relative", lr_init=0.3, lr_min=0.003, lr_max=1.0, relative_range=0.25)
    _, info = env.reset(seed=2)
    s = float(env.engine.adam_scale[0])
    _, _, _, _, info = env.step(np.array([0.0], dtype=np.float32))
    assert info["lr_W"] == pytest.approx(0.3 * s) and info["lr_H"] == pytest.approx(0.3 * s)
    _, _, _, _, info = env.step(np.array([1.0], dtype=np.float32))
    assert info["lr_W"] == pytest.approx(0.3 * s * 10 ** 0.25)
    for _ in range(2):  # 0.3 * 10^0.75 > 1: held at the ceiling lr_max * s
        _, _, term, trunc, info = env.step(np.array([1.0], dtype=np.float32))
        assert not (term or trunc)
    assert info["lr_W"] == pytest.approx(1.0 * s) and info["lr_H"] == pytest.approx(1.0 * s)


def test_adam_batched_env_matches_single_envs():
    B = 2
    batched = BatchedNMFVecEnv(num_envs=B, **KW)
    single = DummyVecEnv([lambda: NMFEnv(**KW) for _ in range(B)])
    batched.seed(5)
    single.seed(5)
    np.testing.assert_allclose(batched.reset(), single.reset(), rtol=1e-6, atol=1e-6)
    rng = np.random.default_rng(1)
    for _ in range(9):  # budget 6: across an auto-reset
        a = rng.uniform(-1, 1, size=(B, 1)).astype(np.float32)
        ob, rb, db, _ = batched.step(a)
        os_, rs, ds, _ = single.step(a)
        np.testing.assert_allclose(ob, os_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rb, rs, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(db, ds)


def test_adam_bad_optimizer_named():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        TaskConfig(optimizer="adamw")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        EngineConfig(m=10, n=5, rank=2, optimizer="lbfgs")
    with pytest.raises(ValueError, match="env_kwargs.optimizer"):
        validate_hyperparams({"env_kwargs": {"optimizer": "rmsprop"}})
    validate_hyperparams({"env_kwargs": {"optimizer": "adam"}})

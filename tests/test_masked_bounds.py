"""Masked Lipschitz bounds: the constants evaluate() reports for masked families are valid (>= the exact masked
constants, so 2/L stays a safe step size), within 1 + bound_tol of them, exact after every recomputation, and
recomputed after load() and at episode starts; the batched engine and single envs agree."""

import json
import os

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from lrenv import engine as E
from lrenv.engine import STAT_L_H, STAT_L_W, EngineConfig, SGDEngine
from lrenv.env import NMFEnv
from lrenv.vec_env import BatchedNMFVecEnv


def exact_masked(eng: SGDEngine, i: int = 0) -> tuple[float, float]:
    """Reference: max over rows / columns of the top eigenvalue of every masked Gram matrix, in float64 numpy
    (every row through the eigensolver: no pruning)."""
    W, H = eng.factors(i)
    W, H = W * eng.free_W.double().numpy(), H * eng.free_H.double().numpy()  # fixed components are not stepped
    rows = eng.row_index[i]
    M = np.zeros((eng.cfg.m, eng.cfg.n))
    M[rows[rows >= 0]] = eng.weight[i].reshape(eng.cfg.padded_rows, -1).double().numpy()[rows >= 0]
    r = H.shape[0]
    GW = (M @ (H[:, None, :] * H[None, :, :]).reshape(r * r, -1).T).reshape(-1, r, r)
    GH = (M.T @ (W[:, :, None] * W[:, None, :]).reshape(-1, r * r)).reshape(-1, r, r)
    reg = eng.cfg.reg
    return np.linalg.eigvalsh(GW)[:, -1].max() + reg, np.linalg.eigvalsh(GH)[:, -1].max() + reg


@pytest.mark.parametrize("scale", [0.05, 0.3, 0.6])
def test_bound_is_valid_and_tight_along_sgd_on_sales(scale):
    """Full-size sales (1000 x 100, rank 8, half observed), 150 epochs of SGD at a fixed fraction of the bound:
    every reported constant is >= the exact one and <= (1 + tol) times it, equal to it whenever it was just
    recomputed, and recomputed at well under every epoch (the point of caching)."""
    env = NMFEnv("sales", threads=1)
    env.reset(seed=3)
    eng = env.engine
    tol = eng.cfg.bound_tol
    assert tol == E.DEFAULT_BOUND_TOL
    action = env.task.action_for_scale(scale)
    epochs, fresh_seen = 150, 0
    for _ in range(epochs):
        before = eng.exact_bound_count.copy()
        _, _, term, trunc, info = env.step(action)
        assert not info["diverged"]
        reported = env.tracker.stats[0, [STAT_L_W, STAT_L_H]]
        exact = np.array(exact_masked(eng))
        assert np.all(reported >= exact * (1 - 1e-5)), (reported, exact)  # float32 rounding only
        assert np.all(reported <= exact * (1 + tol) * (1 + 1e-5)), (reported, exact)
        fresh = eng.exact_bound_count[0] > before[0]
        np.testing.assert_allclose(reported[fresh], exact[fresh], rtol=1e-5)
        fresh_seen += int(fresh.sum())
        assert not (term or trunc)
    assert 2 <= fresh_seen < 0.6 * 2 * epochs


def test_bound_is_valid_on_tutorial_with_fixed_components_and_reg():
    """The biased, regularised tutorial family: pinned bias components and reg enter the bound as in the exact one."""
    env = NMFEnv("tutorial", threads=1)
    env.reset(seed=0)
    eng = env.engine
    assert eng.has_fixed and eng.cfg.reg > 0
    a = env.task.action_for_scale(0.5)
    for _ in range(100):
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
        reported = env.tracker.stats[0, [STAT_L_W, STAT_L_H]]
        exact = np.array(exact_masked(eng))
        assert np.all(reported >= exact * (1 - 1e-5)), (reported, exact)
        assert np.all(reported <= exact * (1 + eng.cfg.bound_tol) * (1 + 1e-5)), (reported, exact)
    # (4 x 5 factors move by more than the tolerance every epoch: exact every time, which costs nothing here)


def test_recomputed_after_load_and_at_episode_start():
    env = NMFEnv("sales", problem_params=dict(products=200, stores=40), threads=1)
    env.reset(seed=0)
    eng = env.engine
    a = env.task.action_for_scale(0.3)
    for _ in range(30):
        env.step(a)
    assert eng.exact_bound_count[0].min() < 31  # some evaluations used the cached bound
    env.reset(seed=1)  # a new instance through load(): both blocks recomputed, reported exactly
    count = eng.exact_bound_count[0].copy()
    s = eng.evaluate()[0].double().numpy()
    np.testing.assert_array_equal(eng.exact_bound_count[0], count)  # reset's own evaluate() did it
    np.testing.assert_allclose(s[[STAT_L_W, STAT_L_H]], exact_masked(eng), rtol=1e-5)
    # a new instance loaded behind the engine's back is recomputed at the next evaluate(), not bounded from the old
    rng = np.random.default_rng(0)
    V = rng.uniform(size=(200, 40))
    mask = rng.uniform(size=V.shape) < 0.5
    eng.load(0, V, 3 * rng.uniform(size=(200, 8)), rng.uniform(size=(8, 40)), row_perm=rng.permutation(200),
             mask=mask, heldout=~mask)
    count = eng.exact_bound_count[0].copy()
    s = eng.evaluate()[0].double().numpy()
    np.testing.assert_array_equal(eng.exact_bound_count[0], count + 1)
    np.testing.assert_allclose(s[[STAT_L_W, STAT_L_H]], exact_masked(eng), rtol=1e-5)
    count = eng.exact_bound_count[0].copy()
    eng.evaluate(index=[0])  # episode starts always recompute
    np.testing.assert_array_equal(eng.exact_bound_count[0], count + 1)
    eng.evaluate()  # nothing moved: the cached constants are exact, no recomputation
    np.testing.assert_array_equal(eng.exact_bound_count[0], count + 1)


def test_batched_env_matches_single_envs_on_sales():
    kw = dict(problem="sales", problem_params=dict(products=200, stores=40), budget=25, dtype="float64")
    B = 3
    batched = BatchedNMFVecEnv(num_envs=B, **kw)
    single = DummyVecEnv([lambda: NMFEnv(**kw) for _ in range(B)])
    batched.seed(5)
    single.seed(5)
    batched.reset()
    single.reset()
    rng = np.random.default_rng(0)
    dones = 0
    for t in range(60):  # budget 25: every slot restarts twice
        actions = batched.task.action_for_scale(rng.choice([0.05, 0.2, 0.4], size=B)).reshape(B, 1)
        _, _, db, ib = batched.step(actions)
        _, _, ds, is_ = single.step(actions)
        np.testing.assert_array_equal(db, ds)
        for i in range(B):
            for key in ("bound_W", "bound_H", "loss"):
                assert ib[i][key] == pytest.approx(is_[i][key], rel=1e-9), (t, i, key)
        dones += int(db.sum())
    assert dones >= 2 * B
    counts = np.stack([e.engine.exact_bound_count[0] for e in single.envs])
    np.testing.assert_array_equal(batched.engine.exact_bound_count, counts)
    assert counts.sum() < 2 * B * 60  # the cached bound was used


def _psd(rng, q, r, dominant):
    A = rng.uniform(size=(q, r, 3 * r)) if dominant else rng.normal(size=(q, r, 3 * r))
    return A @ A.transpose(0, 2, 1)


@pytest.mark.parametrize("dominant", [True, False])
def test_pruned_eigensolver_is_exact(dominant):
    """Few candidates suffice for Perron-dominated Grams (positive factors); for isotropic ones the check
    fails and every row is solved: exact either way."""
    rng = np.random.default_rng(1)
    r, q = 5, 40
    G = _psd(rng, 2 * q, r, dominant).reshape(2, q, r, r)
    iu = np.triu_indices(r)
    packed = torch.as_tensor(G[:, :, iu[0], iu[1]])
    pos = np.zeros((r, r), dtype=np.int64)
    pos[iu] = np.arange(len(iu[0]))
    pos[iu[1], iu[0]] = np.arange(len(iu[0]))
    weight = torch.as_tensor(np.where(iu[0] == iu[1], 1.0, 2.0))
    got = E._packed_gram_max(packed, torch.as_tensor(pos.ravel()), weight).numpy()
    np.testing.assert_allclose(got, np.linalg.eigvalsh(G)[..., -1].max(axis=1), rtol=1e-12)


def test_bound_tol_zero_recomputes_every_evaluation_and_env_variable(monkeypatch):
    monkeypatch.setenv(E.BOUND_TOL_ENV, "0")
    env = NMFEnv("sales", problem_params=dict(products=200, stores=40), threads=1)
    env.reset(seed=0)
    assert env.engine.cfg.bound_tol == 0.0
    a = env.task.action_for_scale(0.3)
    for _ in range(5):
        env.step(a)
        np.testing.assert_allclose(env.tracker.stats[0, [STAT_L_W, STAT_L_H]], exact_masked(env.engine), rtol=1e-5)
    monkeypatch.setenv(E.BOUND_TOL_ENV, "five percent")
    with pytest.raises(ValueError, match="LRENV_BOUND_TOL must be a number >= 0"):
        EngineConfig(m=4, n=3, rank=2)
    monkeypatch.delenv(E.BOUND_TOL_ENV)
    with pytest.raises(ValueError, match="bound_tol must be >= 0"):
        SGDEngine(EngineConfig(m=4, n=3, rank=2, num_blocks=1, bound_tol=-0.1))


def test_diverged_instance_gets_finite_constants():
    """A non-finite factor cannot be bounded from the cache: the exact path zeroes non-finite entries as before."""
    env = NMFEnv("sales", problem_params=dict(products=200, stores=40), threads=1)
    env.reset(seed=0)
    eng = env.engine
    eng.H[0, 0, 0] = float("nan")
    s = eng.evaluate()[0]
    assert torch.isfinite(s[[STAT_L_W, STAT_L_H]]).all()


def test_bench_masked_smoke(tmp_path, monkeypatch, capsys):
    """`lrenv bench --masked` writes both measurements, and leaves the caller's LRENV_BOUND_TOL as it was."""
    from lrenv.agents import bench
    monkeypatch.setenv(E.BOUND_TOL_ENV, "0.07")
    out = tmp_path / "masked.json"
    assert bench.main(["--masked", "--masked-rounds", "1", "--masked-steps", "3", "--masked-seeds", "1",
                       "--masked-budget", "3", "--out", str(out)]) == 0
    assert os.environ[E.BOUND_TOL_ENV] == "0.07"
    r = json.loads(out.read_text())
    step = r["step"]
    for name in ("small", "sales", "sales_exact"):
        assert step[name]["cpu_ms"] > 0 and step[name]["wall_ms"] > 0
    assert step["sales_over_small_cpu"] == pytest.approx(step["sales"]["cpu_ms"] / step["small"]["cpu_ms"])
    ev = r["evaluation"]
    assert {m["method"] for m in ev["methods"]} >= {"cosine", "armijo"}
    assert "--budget 3" in ev["command"]
    assert "target sales_over_small_cpu" in capsys.readouterr().out

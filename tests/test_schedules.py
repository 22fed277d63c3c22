"""Baseline schedules: the step-size rules do what they claim inside the environment."""

import numpy as np
import pytest
import torch

from lrenv import EVAL_SEEDS, NMFEnv
from lrenv.evaluate import run_schedule, schedule_env_kwargs
from lrenv.schedules import (Armijo, BarzilaiBorwein, CosineDecay, FixedLR, FixedScale, Polyak, RandomUnderBound,
                             RandomWalkBound, TwoPhase, fixed_grid, load_policy)

SMALL = dict(problem="small", problem_params=dict(m=200, n=50, rank=5), budget=20)


@pytest.fixture(autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def start(schedule, kwargs=SMALL, seed_index=0):
    env = NMFEnv(**schedule_env_kwargs(schedule, kwargs))
    obs, info = env.reset(seed=seed_index, options={"instance": EVAL_SEEDS[seed_index]})
    schedule.reset(env.oracle, np.random.default_rng(0))
    return env, obs, info


def test_armijo_accepted_step_satisfies_sufficient_decrease():
    sched = Armijo(c=0.5, shrink=0.5, alpha_max=8.0)  # start far above the bound: must backtrack
    env, obs, _ = start(sched)
    oracle = env.oracle
    backtracked = False
    for _ in range(8):
        f0 = oracle.loss()
        evals_before = sched.extra_loss_evals
        action, _ = sched.predict(obs)
        f_new, dec = oracle.trial(action)
        assert dec > 0
        assert f_new <= f0 - 0.5 * dec  # Armijo's condition at the returned step
        backtracked |= sched.extra_loss_evals - evals_before > 1
        # the step before the accepted one (twice as long) violated it, unless it was the first trial
        s = 10 ** (env.task.log_range * float(action[0]))
        if s < 8.0 * 0.99:
            f_long, dec_long = oracle.trial(env.task.action_for_scale(min(2 * s, 8.0)))
            assert not f_long <= f0 - 0.5 * dec_long
        obs, _, term, trunc, _ = env.step(action)
        if term or trunc:
            break
    assert backtracked and sched.extra_loss_evals > 8


def test_random_under_bound_never_exceeds_bound():
    tr = run_schedule(RandomUnderBound(), {**SMALL, "budget": 40}, 0)
    assert len(tr.lr_W) > 5
    assert np.all(tr.lr_W <= tr.bound_W * (1 + 1e-6)) and np.all(tr.lr_H <= tr.bound_H * (1 + 1e-6))
    scales = tr.lr_W / tr.bound_W
    assert scales.std() > 0.1  # actually random, not a constant


def test_random_walk_stays_in_its_band_below_the_bound():
    sched = RandomWalkBound(center=0.6, width=0.5, step=0.2)
    tr = run_schedule(sched, SMALL, 1)
    s = tr.lr_W / tr.bound_W
    assert np.all(s >= 0.3 - 1e-6) and np.all(s <= 0.9 + 1e-6) and s.std() > 0


def test_fixed_lr_is_fixed_and_fixed_scale_follows_the_bound():
    tr = run_schedule(FixedLR(1e-3), SMALL, 0)
    np.testing.assert_allclose(tr.lr_W, 1e-3, rtol=1e-6)
    np.testing.assert_allclose(tr.lr_H, 1e-3, rtol=1e-6)
    tr = run_schedule(FixedScale(1.0), SMALL, 0)
    np.testing.assert_allclose(tr.lr_W / tr.bound_W, 0.5, rtol=1e-5)
    np.testing.assert_allclose(tr.lr_H / tr.bound_H, 0.5, rtol=1e-5)
    assert tr.bound_W.std() > 0  # the bound moves, the lr follows it


def test_same_seed_same_start_for_every_schedule():
    a = run_schedule(FixedLR(1e-3), SMALL, 1)
    b = run_schedule(CosineDecay(), SMALL, 1)
    assert a.loss[0] == b.loss[0] and a.instance == b.instance == EVAL_SEEDS[1]


def test_cosine_and_two_phase_shapes():
    tr = run_schedule(CosineDecay(peak=0.5, final=0.01), {**SMALL, "budget": 30}, 0)
    s = tr.lr_W / tr.bound_W
    assert s[0] == pytest.approx(0.5, rel=1e-4) and np.all(np.diff(s) <= 1e-6)
    tr = run_schedule(TwoPhase(c_high=1.0, c_low=0.4, switch=0.5), {**SMALL, "budget": 20}, 0)
    s = tr.lr_W / tr.bound_W
    np.testing.assert_allclose(s[:10], 0.5, rtol=1e-5)
    np.testing.assert_allclose(s[10:], 0.2, rtol=1e-5)


def test_polyak_and_bb_steps():
    sched = Polyak(0.0, cap=None)  # the classic step; the default's f* estimate: tests/test_solvers_tuning_free.py
    env, obs, _ = start(sched)
    action, _ = sched.predict(obs)
    o = env.oracle
    assert float(action[0]) == pytest.approx(o.loss() / o.grad_norm() ** 2, rel=1e-5)
    bb = BarzilaiBorwein()
    tr = run_schedule(bb, SMALL, 0)
    assert np.all(np.isfinite(tr.lr_W)) and np.all(tr.lr_W > 0) and tr.lr_W.std() > 0


def test_fixed_grid_and_validation():
    g = fixed_grid(1e-5, 10, 7)
    assert len(g) == 7 and g[0] == pytest.approx(1e-5) and g[-1] == pytest.approx(10)
    with pytest.raises(ValueError):
        fixed_grid(1, 0.1, 3)
    with pytest.raises(ValueError):
        FixedLR(-1)


def test_policy_space_mismatch_is_a_clear_error(tmp_path):
    from stable_baselines3 import PPO
    env = NMFEnv(**{**SMALL, "budget": 5}, obs_features=("loss", "epoch"))
    model = PPO("MlpPolicy", env, n_steps=8, batch_size=8, device="cpu")
    model.save(tmp_path / "model.zip")
    policy = load_policy(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="observation"):
        run_schedule(policy, SMALL, 0)  # evaluated with the default three observation features
    (tmp_path / "config.json").write_text('{"env": {"obs_features": ["loss", "epoch"], "action_mode": "log_bound"}}')
    policy = load_policy(tmp_path)
    tr = run_schedule(policy, SMALL, 0)
    assert len(tr.loss) > 1 and policy.name == f"policy:{tmp_path.name}"


def test_policy_with_vecnormalize_normalises_observations(tmp_path):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize
    env_kwargs = {**SMALL, "budget": 5}
    venv = VecNormalize(DummyVecEnv([lambda: NMFEnv(**env_kwargs)]), clip_obs=3.0)
    venv.obs_rms.mean[:] = [1.0, 2.0, 3.0]
    venv.obs_rms.var[:] = [4.0, 4.0, 4.0]
    model = PPO("MlpPolicy", venv, n_steps=8, batch_size=8, device="cpu")
    model.save(tmp_path / "model.zip")
    venv.save(str(tmp_path / "vecnormalize.pkl"))
    (tmp_path / "config.json").write_text('{"env": {"problem": "small", "action_mode": "log_bound"}}')
    policy = load_policy(tmp_path)
    z = policy.normalize(np.array([3.0, 2.0, -100.0], dtype=np.float32))
    np.testing.assert_allclose(z, [1.0, 0.0, -3.0], atol=1e-5)
    assert run_schedule(policy, SMALL, 0).metrics()["epochs"] >= 1

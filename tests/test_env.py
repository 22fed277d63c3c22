"""The Gymnasium environment: API conformance, determinism, rewards, episodes on every family, bad actions."""

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import lrenv
from lrenv import NMFEnv

torch.set_num_threads(1)

# Small shapes keep the checks fast; the families' own shapes run in test_full_episode_every_family.
FAMILY_PARAMS = {
    "small": dict(m=200, n=40, rank=5),
    "sales": dict(products=200, stores=40),
    "tutorial": {},
    "illcond": {},
    "digits": {},
}


@pytest.fixture
def matrix_file(tmp_path):
    path = tmp_path / "data.npy"
    rng = np.random.default_rng(0)
    V = rng.uniform(size=(60, 20))
    V[3, 4] = np.nan  # one missing entry
    np.save(path, V)
    return str(path)


def all_envs(matrix_file):
    for name, params in FAMILY_PARAMS.items():
        yield name, lambda name=name, params=params: NMFEnv(name, problem_params=params)
    yield "matrix", lambda: NMFEnv("matrix", problem_params=dict(path=matrix_file, rank=4))


def test_check_env_every_family(matrix_file):
    """Both checkers pass on every family with no warnings at all (nothing to justify)."""
    for name, make in all_envs(matrix_file):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gym_check_env(make(), skip_render_check=True)
            sb3_check_env(make(), warn=True)
        messages = [str(w.message) for w in caught if "lrenv" in str(w.filename) or "env_checker" in str(w.filename)]
        assert messages == [], f"{name}: {messages}"


def test_registered_with_gymnasium():
    env = gym.make(lrenv.ENV_ID, problem="small", problem_params=FAMILY_PARAMS["small"])
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert {"loss", "best_loss", "grad_norm", "bound_W", "bound_H", "lr_W", "lr_H", "diverged"} <= set(info)


def rollout(env, seed, actions):
    obs, info = env.reset(seed=seed)
    out = [(obs, 0.0, False, False, info)]
    for a in actions:
        step = env.step(np.array([a], dtype=np.float32))
        out.append(step)
        if step[2] or step[3]:
            break
    return out


def test_same_seed_same_actions_same_trajectory():
    actions = np.random.default_rng(5).uniform(-1, 0, size=40)
    kw = dict(problem_params=FAMILY_PARAMS["small"], budget=40)
    a, b = rollout(NMFEnv("small", **kw), 7, actions), rollout(NMFEnv("small", **kw), 7, actions)
    assert len(a) == len(b) == 41
    for (o1, r1, te1, tr1, i1), (o2, r2, te2, tr2, i2) in zip(a, b):
        np.testing.assert_array_equal(o1, o2)
        assert (r1, te1, tr1) == (r2, te2, tr2)
        assert i1 == i2
    c = rollout(NMFEnv("small", **kw), 8, actions)  # another seed: another instance and start
    assert c[0][4]["loss"] != a[0][4]["loss"]


def test_train_and_eval_instances_are_disjoint():
    env_train = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], instances="train")
    env_eval = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], instances="eval")
    seen_train = {env_train.reset(seed=s)[1]["instance"] for s in range(20)}
    seen_eval = {env_eval.reset(seed=s)[1]["instance"] for s in range(20)}
    assert all(s in lrenv.TRAIN_SEEDS for s in seen_train)
    assert all(s in lrenv.EVAL_SEEDS for s in seen_eval)
    assert len(seen_train) > 15


def episode_return(env, scale=None, action=None, seed=1):
    obs, info = env.reset(seed=seed)
    a = env.task.action_for_scale(scale) if action is None else np.array([action], dtype=np.float32)
    total = 0.0
    while True:
        obs, r, te, tr, info = env.step(a)
        total += r
        if te or tr:
            return total, info


def test_reward_orders_fast_slow_and_diverging_schedules():
    """A schedule that converges sooner earns more than a slower one; a diverging one earns the least."""
    env = NMFEnv("small")
    fast, info_fast = episode_return(env, scale=0.5)
    slow, info_slow = episode_return(env, scale=0.2)
    bad, info_bad = episode_return(env, action=1.0)  # 10x the bound
    assert info_fast["reached_target"] and info_fast["epoch"] < info_slow["epoch"]
    assert info_bad["diverged"] and info_bad["epoch"] < 20
    assert fast > slow > bad


def test_reward_components():
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], budget=30,
                 reward=dict(improvement=0.0, remaining=2.0, divergence_penalty=7.0, time_cost=0.5))
    env.reset(seed=0)
    _, r, *_ = env.step(env.task.action_for_scale(0.3))
    assert r == pytest.approx(-0.5)  # improvement weight 0: only the time cost
    env.reset(seed=0)
    _, r, te, _, info = env.step(np.array([np.nan], dtype=np.float32))
    assert te and info["diverged"] and info["invalid_action"]
    assert r == pytest.approx(-7.5)


def test_full_episode_every_family(matrix_file):
    for name, make in all_envs(matrix_file):
        env = make()
        obs, info = env.reset(seed=0)
        steps = 0
        while True:
            obs, r, te, tr, info = env.step(env.task.action_for_scale(0.3))
            steps += 1
            assert np.all(np.isfinite(obs)) and np.isfinite(r)
            if te or tr:
                break
        assert te or steps == env.task.budget
        if name == "sales":
            assert np.isfinite(info["heldout_mse"]) and info["heldout_mse"] > 0
        if name == "illcond":  # unconstrained: factors take negative values
            W, H = env.engine.factors(0)
            assert (W < 0).any() and (H < 0).any()
        if name in ("small", "digits"):
            W, H = env.engine.factors(0)
            assert (W >= 0).all() and (H >= 0).all()


@pytest.mark.parametrize("action", [np.inf, -np.inf, 5.0, -5.0, 1e30])
def test_out_of_space_actions_are_clipped(action):
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"])
    env.reset(seed=0)
    obs, r, te, tr, info = env.step(np.array([action], dtype=np.float32))
    assert np.all(np.isfinite(obs)) and np.isfinite(r)
    expected = env.task.log_range if action > 0 else -env.task.log_range
    assert info["lr_W"] == pytest.approx(env.task.action_center * info["bound_W"] * 10 ** expected, rel=1e-6)
    assert not info["invalid_action"]


def test_nan_action_ends_episode_with_finite_observation():
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"])
    env.reset(seed=0)
    obs, r, te, tr, info = env.step(np.array([np.nan], dtype=np.float32))
    assert te and info["diverged"] and np.all(np.isfinite(obs))
    assert r == pytest.approx(-env.task.reward.divergence_penalty)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.0], dtype=np.float32))
    obs, info = env.reset()  # re-initialised problem
    assert not info["diverged"] and np.all(np.isfinite(obs))


def test_divergence_keeps_observations_finite_and_resets():
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], action_mode="paper", lr_max=1e3)
    env.reset(seed=0)
    for _ in range(50):
        obs, r, te, tr, info = env.step(np.array([1e3], dtype=np.float32))
        assert np.all(np.isfinite(obs))
        if te:
            break
    assert te and info["diverged"]


@pytest.mark.parametrize("center", [0.25, 1.0])
def test_zero_action_is_the_centre_fraction_of_the_bound(center):
    """a = 0 (an untrained policy's mean) steps at action_center * 2/L; action_for_scale inverts the map."""
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], action_center=center)
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.zeros(1, dtype=np.float32))
    assert info["lr_W"] == pytest.approx(center * info["bound_W"], rel=1e-6)
    assert info["lr_H"] == pytest.approx(center * info["bound_H"], rel=1e-6)
    _, _, _, _, info = env.step(env.task.action_for_scale(0.4))
    assert info["lr_W"] == pytest.approx(0.4 * info["bound_W"], rel=1e-5)


def test_default_centre_keeps_an_untrained_policy_from_diverging():
    """The default centre is below the minibatch stability cliff: a = 0 runs a whole episode."""
    env = NMFEnv("small")  # the real preset: the cliff depends on the minibatch size
    _, info0 = env.reset(seed=3)
    for _ in range(env.task.budget):
        _, _, te, tr, info = env.step(np.zeros(1, dtype=np.float32))
        if te or tr:
            break
    assert not info["diverged"] and info["loss"] < 0.1 * info0["loss"]


def test_paper_action_mode_is_absolute():
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"], action_mode="paper")
    assert env.action_space.low[0] == 0 and env.action_space.high[0] == 1
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([1e-4], dtype=np.float32))
    assert info["lr_W"] == pytest.approx(1e-4) and info["lr_H"] == pytest.approx(1e-4)


def test_optional_observation_features():
    env = NMFEnv("small", problem_params=FAMILY_PARAMS["small"],
                 obs_features=("loss", "epoch", "grad_norm", "bound", "prev_action", "target_gap"))
    assert env.observation_space.shape == (7,)
    obs, info = env.reset(seed=0)
    assert obs[3] == pytest.approx(np.log10(info["bound_W"]), abs=1e-5)
    obs, *_ , info = env.step(np.array([-0.25], dtype=np.float32))
    assert obs[5] == pytest.approx(-0.25)
    assert obs[6] == pytest.approx(np.log10(info["loss"] / info["target_loss"]), abs=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(action_mode="absolute"), "action_mode"),
    (dict(obs_features=("loss", "lr")), "observation features"),
    (dict(budget=0), "budget"),
    (dict(action_center=0.0), "action_center"),
    (dict(dtype="float16"), "dtype"),
    (dict(instances="testing"), "instances"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(rewards=1), "unknown task options"),
])
def test_bad_env_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NMFEnv("small", problem_params=FAMILY_PARAMS["small"], **kwargs)

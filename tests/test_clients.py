"""Common RL clients drive the env unmodified: gymnasium (make, make_vec sync/async, checkers, pickling),
stable-baselines3 (make_vec_env with Dummy and Subproc), a CleanRL-style loop, rl-zoo (slow, optional extra
"zoo") and Ray RLlib (slow; needs ray[rllib] and a gymnasium it accepts).

Problems are shrunk through ``problem_params`` so that each test takes seconds; the ids and their specs are
the real ones."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import lrenv
from lrenv import ENV_ID, ENV_IDS, FAMILY_BUDGETS
from lrenv.problems import make_family

TINY = {"problem_params": {"m": 60, "n": 12, "rank": 3}}
"""A small-family instance small enough for a client test."""
REPO = Path(__file__).resolve().parents[1]


def _env_vars(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)
    env.pop("OMP_NUM_THREADS", None)  # the hang this guards against needs OpenMP's default thread pool
    return env


# ----------------------------------------------------------------------------- ids and specs
@pytest.mark.parametrize("name", sorted(FAMILY_BUDGETS))
def test_family_id_spec_has_the_family_budget(name):
    spec = gym.spec(ENV_IDS[name])
    assert spec.max_episode_steps == make_family(name).budget == FAMILY_BUDGETS[name]
    assert spec.kwargs == {"problem": name}


def test_generic_id_bounds_every_family_budget():
    assert gym.spec(ENV_ID).max_episode_steps == max(FAMILY_BUDGETS.values())


def test_make_with_module_prefix_and_render_mode():
    env = gym.make("lrenv:lrenv/NMF-small-v0", render_mode="rgb_array", **TINY)
    assert env.spec.max_episode_steps == 200 and env.unwrapped.render_mode == "rgb_array"
    env.reset(seed=0)
    for _ in range(3):
        env.step(env.action_space.sample())
    frame = env.render()
    assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3
    assert frame.std() > 5  # curves drawn, not a blank canvas
    assert gym.make(ENV_ID, render_mode=None, **TINY).render_mode is None


def test_unknown_render_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="render_mode must be None or one of"):
        lrenv.NMFEnv(render_mode="human", **TINY)


def test_action_for_scale_is_in_the_action_space():
    env = lrenv.NMFEnv(**TINY)
    for scale in (1e-6, 0.25, 0.5, 1.0, 100.0):
        a = env.task.action_for_scale(scale)
        assert a.shape == (1,) and env.action_space.contains(a)
    assert env.task.action_for_scale(np.array([0.25, 0.5])).shape == (2,)


def test_checkers_pass():
    from gymnasium.utils.env_checker import check_env as gym_check
    from stable_baselines3.common.env_checker import check_env as sb3_check
    gym_check(gym.make(ENV_IDS["small"], render_mode="rgb_array", **TINY).unwrapped, skip_render_check=False)
    sb3_check(lrenv.NMFEnv(**TINY), warn=True)


# ----------------------------------------------------------------------------- pickling
def test_pickle_mid_episode_continues_the_same_trajectory():
    env = lrenv.NMFEnv(grad_noise=0.1, **TINY)  # noise: the torch generator state must travel too
    env.reset(seed=3)
    for _ in range(4):
        env.step(np.array([0.3], dtype=np.float32))
    clone = pickle.loads(pickle.dumps(env))
    twin = copy.deepcopy(env)
    for t in range(6):
        a = np.array([0.3 - 0.1 * t], dtype=np.float32)
        ref, got, got2 = env.step(a), clone.step(a), twin.step(a)
        np.testing.assert_array_equal(ref[0], got[0])
        np.testing.assert_array_equal(ref[0], got2[0])
        assert ref[1] == got[1] and ref[4]["loss"] == got[4]["loss"]
    # the generator travels too: the next reset draws the same instance and start
    assert env.reset()[1]["instance"] == clone.reset()[1]["instance"]


def test_pickle_before_reset_and_refusal_for_family_objects():
    env = pickle.loads(pickle.dumps(lrenv.NMFEnv(**TINY)))
    assert env.reset(seed=0)[0].shape == env.observation_space.shape
    with pytest.raises(pickle.PicklingError, match="family name or a matrix path"):
        pickle.dumps(lrenv.NMFEnv(make_family("small", m=60, n=12, rank=3)))


def test_constructor_does_no_torch_allocation():
    env = lrenv.NMFEnv(**TINY)
    assert env._engine is None  # built at first reset: nothing to inherit across a fork
    with pytest.raises(ValueError, match="num_blocks must be between 1 and the number of rows"):
        lrenv.NMFEnv(num_blocks=1000, **TINY)  # still validated in the constructor


# ----------------------------------------------------------------------------- stable-baselines3
@pytest.mark.parametrize("vec", ["dummy", "subproc"])
def test_sb3_make_vec_env(vec):
    """SubprocVecEnv starts its workers with forkserver: a worker imports only what the id names, so the id
    carries its module (``lrenv:``), as for any gymnasium plugin; a script that imports lrenv at the top
    level may use the bare id (the workers re-import the main module; see the subprocess test below)."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
    cls = DummyVecEnv if vec == "dummy" else SubprocVecEnv
    env_id = ENV_IDS["small"] if vec == "dummy" else "lrenv:" + ENV_IDS["small"]
    venv = make_vec_env(env_id, n_envs=2, seed=0, vec_env_cls=cls, env_kwargs=TINY)
    try:
        obs = venv.reset()
        assert obs.shape == (2, 3)
        for _ in range(5):
            obs, reward, done, infos = venv.step(np.zeros((2, 1), dtype=np.float32))
        assert np.isfinite(obs).all() and np.isfinite(reward).all() and all(i["epoch"] == 5 for i in infos)
    finally:
        venv.close()


SB3_SCRIPT = textwrap.dedent("""
    import numpy as np
    import lrenv  # a user's script: the forkserver workers re-import it, and with it the ids
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import SubprocVecEnv
    if __name__ == "__main__":
        venv = make_vec_env("lrenv/NMF-v0", n_envs=2, seed=0, vec_env_cls=SubprocVecEnv,
                            env_kwargs={"problem_params": {"m": 60, "n": 12, "rank": 3}})
        venv.reset()
        obs, *_ = venv.step(np.zeros((2, 1), dtype=np.float32))
        venv.close()
        print("ok", obs.shape)
""")


def test_sb3_subproc_with_the_bare_id_from_a_script(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(SB3_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=_env_vars(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (2, 3)" in out.stdout


# ----------------------------------------------------------------------------- gymnasium make_vec
def test_gymnasium_make_vec_sync_matches_single_envs():
    envs = gym.make_vec(ENV_IDS["small"], num_envs=2, vectorization_mode="sync", **TINY)
    obs, _ = envs.reset(seed=[5, 6])
    single = gym.make(ENV_IDS["small"], **TINY)
    ref, _ = single.reset(seed=6)
    np.testing.assert_array_equal(obs[1], ref)
    a = np.full((2, 1), 0.2, dtype=np.float32)
    obs, *_ = envs.step(a)
    np.testing.assert_array_equal(obs[1], single.step(a[1])[0])
    envs.close()


ASYNC_SCRIPT = textwrap.dedent("""
    import gymnasium as gym, numpy as np, torch
    import lrenv
    torch.set_num_threads(4)  # a multi-thread OpenMP pool in the parent, if anything uses it before the fork
    envs = gym.make_vec("lrenv/NMF-small-v0", num_envs=2, vectorization_mode="async",
                        problem_params={"m": 60, "n": 12, "rank": 3})
    envs.reset(seed=0)
    for _ in range(3):
        obs, r, term, trunc, info = envs.step(np.zeros((2, 1), dtype=np.float32))
    envs.close()
    print("ok", obs.shape, info["epoch"].tolist())
""")


def test_gymnasium_make_vec_async_does_not_hang_with_default_fork():
    """gymnasium builds a probe env in the parent and forks the workers; torch work in that probe used to
    deadlock OpenMP in the children (hung forever). Run in a fresh process with a time limit."""
    out = subprocess.run([sys.executable, "-c", ASYNC_SCRIPT], env=_env_vars(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok (2, 3) [3, 3]" in out.stdout


# ----------------------------------------------------------------------------- CleanRL style
def test_cleanrl_style_loop():
    """The wrapper stack of CleanRL's ppo_continuous_action.py around SyncVectorEnv; episodes end (tiny
    budget) and RecordEpisodeStatistics reports them."""
    def make_env():
        env = gym.make(ENV_IDS["small"], budget=6, **TINY)
        env = gym.wrappers.FlattenObservation(env)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        env = gym.wrappers.ClipAction(env)
        env = gym.wrappers.NormalizeObservation(env)
        env = gym.wrappers.TransformObservation(env, lambda o: np.clip(o, -10, 10), env.observation_space)
        env = gym.wrappers.NormalizeReward(env, gamma=0.99)
        return gym.wrappers.TransformReward(env, lambda r: float(np.clip(r, -10, 10)))

    envs = gym.vector.SyncVectorEnv([make_env for _ in range(2)])
    obs, _ = envs.reset(seed=1)
    lengths = []
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, reward, term, trunc, infos = envs.step(rng.normal(size=(2, 1)).astype(np.float32))
        assert np.isfinite(obs).all() and np.isfinite(reward).all()
        if "episode" in infos:
            lengths += [int(n) for n, d in zip(infos["episode"]["l"], infos["_episode"]) if d]
    envs.close()
    assert lengths and max(lengths) <= 6


# ----------------------------------------------------------------------------- rl-zoo (optional extra "zoo")
@pytest.mark.slow
def test_rl_zoo_train_and_enjoy_with_the_shipped_file(tmp_path):
    pytest.importorskip("rl_zoo3")
    conf = REPO / "lrenv" / "agents" / "hyperparams" / "ppo.yml"
    env_kwargs = ["--env-kwargs", "problem_params:{'m':60,'n':12,'rank':3}"]
    train = [sys.executable, "-m", "rl_zoo3.train", "--algo", "ppo", "--env", ENV_IDS["small"], "--gym-packages",
             "lrenv", "--conf-file", str(conf), "-n", "512", "-f", str(tmp_path), "--seed", "0", "--eval-freq", "-1",
             "--hyperparams", "n_envs:2", "n_steps:128", "batch_size:64", "n_epochs:1", *env_kwargs]
    out = subprocess.run(train, env=_env_vars(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Hyperparameters not found" not in out.stdout
    run = tmp_path / "ppo" / "lrenv-NMF-small-v0_1"
    assert (run / "lrenv-NMF-small-v0.zip").exists() and (run / "lrenv-NMF-small-v0" / "vecnormalize.pkl").exists()
    enjoy = [sys.executable, "-m", "rl_zoo3.enjoy", "--algo", "ppo", "--env", ENV_IDS["small"], "--gym-packages",
             "lrenv", "-f", str(tmp_path), "--exp-id", "1", "-n", "300", "--no-render", "--deterministic"]
    out = subprocess.run(enjoy, env=_env_vars(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Episode Reward" in out.stdout or "Atari Episode" in out.stdout or out.stdout.count("Episode") >= 1


# ----------------------------------------------------------------------------- Ray RLlib (optional)
@pytest.mark.slow
def test_ray_rllib_ppo_iterations():
    pytest.importorskip("ray.rllib")
    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    register_env("lrenv-tiny", lambda cfg: gym.make(ENV_IDS["small"], budget=20, **TINY))
    config = (PPOConfig().environment("lrenv-tiny").env_runners(num_env_runners=0)
              .training(train_batch_size_per_learner=200, minibatch_size=50, num_epochs=1)
              .resources(num_cpus_for_main_process=1))
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        algo = config.build_algo()
        for _ in range(2):
            result = algo.train()
        algo.stop()
    finally:
        ray.shutdown()
    assert result["env_runners"]["num_episodes_lifetime"] >= 10  # 400 steps of 20-epoch episodes

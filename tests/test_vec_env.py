"""The batched vector env against B single NMFEnv in a DummyVecEnv, auto-reset, NaN actions, memory."""

import numpy as np
import pytest
import torch
from stable_baselines3.common.vec_env import DummyVecEnv

from lrenv import vec_env as ve
from lrenv.env import NMFEnv, engine_config
from lrenv.problems import make_family
from lrenv.vec_env import BatchedNMFVecEnv

KW = dict(problem="small", problem_params=dict(m=120, n=30, rank=4), budget=6, num_blocks=4, dtype="float64")


def make_pair(B=3, seed=7, **extra):
    kw = {**KW, **extra}
    batched = BatchedNMFVecEnv(num_envs=B, **kw)
    single = DummyVecEnv([lambda: NMFEnv(**kw) for _ in range(B)])
    batched.seed(seed)
    single.seed(seed)
    return batched, single


def assert_infos_close(a, b):
    assert set(a) == set(b)
    for k in a:
        if k == "terminal_observation":
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6)
        elif isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-12, nan_ok=True), k
        else:
            assert a[k] == b[k], k


def test_matches_dummy_vec_env_across_auto_reset():
    B = 3
    batched, single = make_pair(B)
    ob, os_ = batched.reset(), single.reset()
    np.testing.assert_allclose(ob, os_, rtol=1e-6, atol=1e-6)
    for i in range(B):
        assert_infos_close(batched.reset_infos[i], single.reset_infos[i])
    rng = np.random.default_rng(0)
    resets = 0
    for t in range(15):  # budget 6: every slot resets at least twice
        actions = rng.uniform(-1, 0.3, size=(B, 1)).astype(np.float32)
        ob, rb, db, ib = batched.step(actions)
        os_, rs, ds, is_ = single.step(actions)
        np.testing.assert_allclose(ob, os_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rb, rs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(db, ds)
        assert rb.dtype == rs.dtype and db.dtype == ds.dtype
        for i in range(B):
            assert_infos_close(ib[i], is_[i])
        resets += int(db.sum())
    assert resets >= 2 * B
    assert batched.get_attr("instance_seed") == single.get_attr("instance_seed")


def test_auto_reset_terminal_observation_and_truncation_flag():
    env = BatchedNMFVecEnv(num_envs=2, **KW)
    env.seed(1)
    env.reset()
    for t in range(KW["budget"]):
        obs, rew, dones, infos = env.step(np.full((2, 1), -0.5, dtype=np.float32))
    assert dones.all()
    for i in range(2):
        assert infos[i]["TimeLimit.truncated"] is True
        term = infos[i]["terminal_observation"]
        assert term.shape == (3,) and term[1] == pytest.approx(1.0)  # epoch feature at the end
        assert obs[i, 1] == 0.0 and obs[i, 0] == 0.0  # new episode's first observation
    assert (env.tracker.epoch == 0).all()


def test_nan_action_ends_only_that_episode():
    B = 3
    batched, single = make_pair(B)
    batched.reset()
    single.reset()
    actions = np.array([[-0.5], [np.nan], [-0.5]], dtype=np.float32)
    ob, rb, db, ib = batched.step(actions)
    os_, rs, ds, is_ = single.step(actions)
    assert db.tolist() == [False, True, False]
    assert ib[1]["invalid_action"] and ib[1]["diverged"] and not ib[1]["TimeLimit.truncated"]
    assert not ib[0]["diverged"] and not ib[2]["diverged"]
    np.testing.assert_allclose(ob, os_, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rb, rs, rtol=1e-5)
    assert batched.tracker.epoch.tolist() == [1, 0, 1]


def test_memory_refusal_message(monkeypatch):
    fam = make_family("small")
    per = ve.bytes_per_instance(engine_config(fam, None, 0.0, "cpu", "float32"))
    monkeypatch.setattr(ve, "available_memory", lambda device: int(per * 10.5 / 0.9))
    with pytest.raises(ValueError) as e:
        BatchedNMFVecEnv("small", num_envs=64)
    msg = str(e.value)
    assert "num_envs=64" in msg and "per instance" in msg and "available" in msg and "B=10" in msg
    BatchedNMFVecEnv("small", num_envs=10)  # fits


def test_vecenv_sanity_spaces_and_attrs():
    env = BatchedNMFVecEnv(num_envs=4, problem="small", problem_params=dict(m=100, n=20, rank=3), budget=5,
                           obs_features=("loss", "epoch", "grad_norm", "bound", "prev_action"))
    env.seed(0)
    obs = env.reset()
    assert obs.shape == (4, env.observation_space.shape[0]) == (4, 6)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs[0])
    actions = np.stack([env.action_space.sample() for _ in range(4)])
    obs, rew, dones, infos = env.step(actions)
    assert obs.shape == (4, 6) and obs.dtype == np.float32 and np.isfinite(obs).all()
    assert rew.shape == (4,) and rew.dtype == np.float32
    assert dones.shape == (4,) and dones.dtype == bool
    assert isinstance(infos, list) and len(infos) == 4 and all(isinstance(i, dict) for i in infos)
    assert env.get_attr("task")[0] is env.task
    assert len(env.get_attr("problem", indices=[1, 2])) == 2
    assert env.env_is_wrapped(object) == [False] * 4
    out = env.env_method("reset", indices=[2], options={"instance": 5})
    assert out[0][1]["instance"] == 5 and env.get_attr("instance_seed", 2) == [5]
    with pytest.raises(ValueError):
        BatchedNMFVecEnv(num_envs=0)


def test_float32_close_to_single_envs():
    batched, single = make_pair(2, dtype="float32")
    np.testing.assert_allclose(batched.reset(), single.reset(), rtol=1e-4, atol=1e-4)
    a = np.full((2, 1), -0.2, dtype=np.float32)
    for _ in range(3):
        ob, *_ = batched.step(a)
        os_, *_ = single.step(a)
    np.testing.assert_allclose(ob, os_, rtol=1e-3, atol=1e-3)


def test_bench_smoke(tmp_path, capsys):
    import argparse
    import json

    from lrenv.agents import bench
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    out = tmp_path / "b.json"
    args = p.parse_args(["--presets", "small", "--batch", "2", "--seconds", "0.02", "--ppo-steps", "0",
                         "--devices", "cpu", "--threads", "0", "--out", str(out)])
    assert bench.run(args) == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["preset"] == "small" and row["B"] == 2 and row["bytes_per_instance"] > 0
    assert row["batched_env_epochs_per_s"] > 0 and row["roofline_epochs_per_s"] > row["raw_epochs_per_s"]
    assert "cpu_small_batched_over_dummy" in res["targets"]
    assert "bat/dum" in capsys.readouterr().out


def test_bench_ppo_runs_the_training_setup():
    """The PPO benchmark builds PPO as `lrenv train` does and counts episodes; the null env's are exact."""
    from lrenv.agents.bench import measure_ppo
    null = measure_ppo("null", 2, 512, torch.device("cpu"))
    # after the 512-step warm-up each env is at step 256 % 200 = 56; 256 more steps end one episode each
    assert null["steps"] == 512 and null["episodes_per_1000_steps"] == pytest.approx(1000 * 2 / 512)
    assert null["n_steps"] == 256 and null["steps_per_s"] > 0
    real = measure_ppo("batched", 2, 512, torch.device("cpu"))
    assert real["steps"] == 512 and real["steps_per_s"] > 0


def test_bench_ppo_default_env_processes():
    """The PPO benchmark's default is `lrenv train`'s: the batched env in one process per core where the
    problems are large enough (small, 8 envs), and `batched-1proc` keeps it in PPO's process."""
    from lrenv.agents.bench import measure_ppo
    from lrenv.sharded_vec_env import auto_workers
    default = measure_ppo("batched", 8, 2048, torch.device("cpu"))
    assert default["env_workers"] == auto_workers(8, 1000 * 100 * 10) and default["steps"] == 2048
    assert measure_ppo("batched-1proc", 8, 2048, torch.device("cpu"))["env_workers"] == 1

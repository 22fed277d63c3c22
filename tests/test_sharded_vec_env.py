"""ShardedVecEnv: batched envs spread over processes step exactly as one BatchedNMFVecEnv (issue 14)."""

import numpy as np
import pytest

from lrenv.sharded_vec_env import MIN_SHARD_WORK, ShardedVecEnv, auto_workers, batched_vec_env, shard_bounds
from lrenv.vec_env import BatchedNMFVecEnv

KW = dict(problem="small", problem_params=dict(m=120, n=30, rank=4), budget=30)


def _rollout(venv, steps: int, seed: int = 7):
    """Observations, rewards, dones and infos (terminal observations included) under fixed random actions."""
    rng = np.random.default_rng(0)
    venv.seed(seed)
    out = [venv.reset()]
    for _ in range(steps):
        # wide actions: some slots diverge and reset, some reach the budget
        out.append(venv.step(rng.uniform(-1, 1, size=(venv.num_envs, venv.action_space.shape[0])).astype(np.float32)))
    return out


def _assert_same(a, b):
    assert np.array_equal(a[0], b[0])
    resets = 0
    for (oa, ra, da, ia), (ob, rb, db, ib) in zip(a[1:], b[1:]):
        assert np.array_equal(oa, ob) and np.array_equal(ra, rb) and np.array_equal(da, db)
        for x, y in zip(ia, ib):
            assert x.keys() == y.keys()
            for k in x:
                if isinstance(x[k], np.ndarray):
                    assert np.array_equal(x[k], y[k]), k
                else:
                    assert x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]), k  # NaN == NaN
        resets += int(da.sum())
    return resets


@pytest.mark.parametrize("workers", [2, 3])
def test_same_trajectories_as_one_batched_env(workers):
    one = BatchedNMFVecEnv(num_envs=7, **KW)
    with ShardedVecEnv(num_envs=7, workers=workers, **KW) as sharded:
        assert sharded.workers == workers and len(sharded._procs) == workers - 1
        assert sharded.observation_space == one.observation_space and sharded.action_space == one.action_space
        resets = _assert_same(_rollout(one, 80), _rollout(sharded, 80))
        assert resets >= 7  # episodes ended and restarted inside the shards (auto-reset with terminal observations)
        assert sharded.get_attr("instance_seed") == one.get_attr("instance_seed")


def test_attributes_and_methods_reach_the_right_slots():
    one = BatchedNMFVecEnv(num_envs=6, **KW)
    with ShardedVecEnv(num_envs=6, workers=2, **KW) as sharded:
        for venv in (one, sharded):
            venv.seed(3)
            venv.reset()
        # out of order and across shards
        assert sharded.get_attr("instance_seed", [5, 0, 3]) == one.get_attr("instance_seed", [5, 0, 3])
        assert sharded.get_attr("task", [4])[0] == one.get_attr("task", [4])[0]
        (obs_s, info_s), = sharded.env_method("reset", indices=[4], seed=11, options={"instance": 5})
        (obs_o, info_o), = one.env_method("reset", indices=[4], seed=11, options={"instance": 5})
        assert np.array_equal(obs_s, obs_o) and info_s["instance"] == info_o["instance"] == 5
        sharded.set_attr("gradient_stats", False)  # shared attribute: every shard
        assert sharded.get_attr("gradient_stats") == [False] * 6
        with pytest.raises(ValueError, match="shared by all"):  # a shared attribute set for some slots only
            sharded.set_attr("gradient_stats", True, indices=[4])
        with pytest.raises(IndexError, match="out of range"):
            sharded.get_attr("instance_seed", [6])


def test_errors_name_the_problem_and_close_ends_the_workers():
    with pytest.raises(ValueError, match="exceeds num_envs"):
        ShardedVecEnv(num_envs=2, workers=3, **KW)
    with pytest.raises(ValueError, match="positive integer"):
        ShardedVecEnv(num_envs=2, workers=0, **KW)
    with pytest.raises(ValueError, match="one torch thread"):
        ShardedVecEnv(num_envs=2, workers=2, threads=2, **KW)
    with pytest.raises(ValueError, match="unknown problem|no problem|not a"):  # validated before any worker starts
        ShardedVecEnv(num_envs=2, workers=2, problem="no-such-family")
    sharded = ShardedVecEnv(num_envs=4, workers=2, **KW)
    sharded.reset()
    with pytest.raises(AttributeError, match=r"in the worker of envs 2\.\.3"):
        sharded.env_method("no_such_method", indices=[3])
    sharded.step(np.zeros((4, sharded.action_space.shape[0]), np.float32))  # the worker goes on after an error
    procs = list(sharded._procs)
    sharded.close()
    assert not any(p.is_alive() for p in procs)
    with pytest.raises(RuntimeError, match="closed"):
        sharded.reset()
    sharded.close()  # twice is fine


def test_shards_and_automatic_worker_count(monkeypatch):
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(8, 2) == [(0, 4), (4, 8)]
    monkeypatch.setattr("lrenv.sharded_vec_env.available_cores", lambda: 4)
    small = 1000 * 100 * 10
    assert auto_workers(8, small) == 4  # one per core
    assert auto_workers(2, 5 * small) == 2  # at most one per env
    assert auto_workers(2, small) == 1  # two small problems: one process
    assert auto_workers(8, 4 * 5 * 4) == 1  # tutorial: too little work per step for the pipes
    assert auto_workers(8, MIN_SHARD_WORK // 8 * 3) == 3  # each shard keeps at least MIN_SHARD_WORK
    assert auto_workers(8, small, threads=2) == 1  # several torch threads: no fork
    assert auto_workers(8, small, device="cuda") == 1
    assert isinstance(batched_vec_env(4, workers=1, **KW), BatchedNMFVecEnv)
    venv = batched_vec_env(4, workers=2, **KW)
    try:
        assert isinstance(venv, ShardedVecEnv) and venv.workers == 2
    finally:
        venv.close()


def test_training_uses_the_sharded_env(tmp_path):
    """`lrenv train` with --env-workers 2: a short PPO run ends normally, its config records the setting, and a
    worker count larger than n_envs is refused before anything is written."""
    from lrenv.agents.train import TrainConfig, load_hyperparams, make_vec_env, train
    from lrenv.agents.validate import validate_config
    hp = load_hyperparams("small", ["n_envs:4", "n_timesteps:256", "n_steps:64", "batch_size:64",
                                    "env_kwargs.budget:30"])
    cfg = TrainConfig(problem="small", problem_params=KW["problem_params"], hyperparams=hp, env_workers=2,
                      eval_freq=0, checkpoint_freq=0, runs_dir=str(tmp_path), progress=False)
    venv = make_vec_env(cfg, 4)
    try:
        assert isinstance(venv.venv, ShardedVecEnv) and venv.venv.workers == 2
    finally:
        venv.close()
    run_dir = train(cfg)
    assert (run_dir / "model.zip").exists()
    import json
    assert json.loads((run_dir / "config.json").read_text())["train"]["env_workers"] == 2
    bad = TrainConfig(problem="small", problem_params=KW["problem_params"], hyperparams=hp, env_workers=5,
                      runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="env-workers.*exceeds n_envs = 4"):
        validate_config(bad)
    bad = TrainConfig(problem="small", problem_params=KW["problem_params"], hyperparams=hp, env_workers=2,
                      env_threads=2, runs_dir=str(tmp_path))
    with pytest.raises(ValueError, match="env-workers.*needs --env-threads 1"):
        validate_config(bad)


def test_an_error_in_one_shard_leaves_the_pipes_in_step():
    with ShardedVecEnv(num_envs=4, workers=2, **KW) as sharded:
        sharded.seed(1)
        sharded.reset()
        for indices in ([0, 3], [3, 0], [0]):  # the local shard fails, the remote one answers (or fails too)
            with pytest.raises(AttributeError):
                sharded.env_method("no_such_method", indices=indices)
        assert sharded.get_attr("instance_seed", [3, 0]) == sharded.get_attr("instance_seed", [3, 0])
        one = BatchedNMFVecEnv(num_envs=4, **KW)
        one.seed(1)
        one.reset()
        assert sharded.get_attr("instance_seed") == one.get_attr("instance_seed")


def test_forks_safely_after_multithreaded_torch_work():
    """A model built first (torch's OpenMP team running in the parent) does not hang the forked workers: they
    compute on one thread and never enter OpenMP. In a fresh process, with a timeout."""
    import subprocess
    import sys
    code = ("import torch, numpy as np\n"
            "torch.set_num_threads(2)\n"
            "x = torch.rand(1500, 1500)\n"
            "for _ in range(3): x @ x\n"
            "from lrenv.sharded_vec_env import ShardedVecEnv\n"
            "env = ShardedVecEnv(num_envs=4, workers=2, problem='small', problem_params=dict(m=120, n=30, rank=4))\n"
            "env.seed(0); env.reset()\n"
            "for _ in range(10): env.step(np.zeros((4, env.action_space.shape[0]), np.float32))\n"
            "env.close(); print('done')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]

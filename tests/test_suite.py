"""The suite env (lrenv.SuiteEnv): draws families and shapes as configured, deterministic per seed, exclude,
refused settings, env checkers, vector envs, and a suite-trained policy evaluated on one family."""

import copy
import json
import pickle
from collections import Counter

import numpy as np
import pytest
import yaml

from lrenv import NMFEnv, SuiteEnv, load_suite
from lrenv.suite import SUITES, is_suite, make_env

# three synthetic sizes, weights 1 : 2 : 3 (episodes of a few epochs: resets cost ~2 ms)
TINY = {"name": "tiny", "entries": [
    {"name": "a", "problem": "small", "problem_params": {"m": 20, "n": 8, "rank": 2, "budget": 5}, "weight": 1},
    {"name": "b", "problem": "small", "problem_params": {"m": 30, "n": 10, "rank": 2, "budget": 6}, "weight": 2},
    {"name": "c", "problem": "small", "problem_params": {"m": 40, "n": 12, "rank": 3, "budget": 7}, "weight": 3},
]}
SHAPES = {"a": (20, 8), "b": (30, 10), "c": (40, 12)}
RELATIVE = dict(action_mode="relative", obs_features=["loss", "epoch", "grad_norm", "lr_rel", "loss_slope"])


def draws(env, n, seed):
    env.reset(seed=seed)
    out = [(env.entry, env.current_env.instance_seed)]
    for _ in range(n - 1):
        env.reset()
        out.append((env.entry, env.current_env.instance_seed))
    return out


def test_draws_follow_the_weights_and_shapes():
    env = SuiteEnv(TINY)
    assert env.entry_names == ["a", "b", "c"] and env.budgets == [5, 6, 7] and env.task.budget == 7
    np.testing.assert_allclose(env.probabilities, [1 / 6, 2 / 6, 3 / 6])
    seen = Counter()
    env.reset(seed=0)
    for _ in range(600):
        _, info = env.reset()
        seen[info["entry"]] += 1
        assert env.current_env.problem.shape == SHAPES[info["entry"]]  # the entry's shape, the family's budget
        assert info["budget"] == env.current_env.task.budget == {"a": 5, "b": 6, "c": 7}[info["entry"]]
        assert info["family"] == "small" and info["instance"] < 1_000_000  # the train split
    for name, p in zip("abc", env.probabilities):
        assert abs(seen[name] / 600 - p) < 0.06, (name, seen)


def test_builtin_suites():
    gen = load_suite("generalist")
    assert [e.problem for e in gen.entries] == ["small", "tutorial", "illcond", "digits", "sales"]
    assert "medium" in SUITES["generalist"]["description"]  # why medium and paper are left out
    sizes = load_suite("sizes-small")
    assert all(e.problem == "small" and e.problem_params.get("m", 1000) <= 1000 for e in sizes.entries)
    assert len({e.problem_params.get("m", 1000) for e in sizes.entries}) == 3
    assert is_suite("suite") and is_suite("suite:sizes-small") and is_suite("my.yml") and not is_suite("digits")


def test_same_seed_same_draws_and_trajectory_other_seed_differs():
    a, b = SuiteEnv(TINY, **RELATIVE), SuiteEnv(TINY, **RELATIVE)
    assert draws(a, 20, seed=7) == draws(b, 20, seed=7)
    assert draws(a, 20, seed=7) != draws(a, 20, seed=8)
    actions = [np.array([x], dtype=np.float32) for x in (0.5, -0.3, 1.0)]
    runs = []
    for env in (a, b):
        obs, info = env.reset(seed=11)
        steps = [obs]
        for act in actions:
            obs, reward, *_ = env.step(act)
            steps += [obs, np.array([reward])]
        runs.append((info["entry"], info["instance"], np.concatenate(steps)))
    assert runs[0][:2] == runs[1][:2]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def test_pinned_reset_is_the_entry_envs_episode():
    """options pin entry and instance; a seeded reset passes its seed to the entry's NMFEnv."""
    env = SuiteEnv(TINY, **RELATIVE)
    obs, info = env.reset(seed=5, options={"entry": "b", "instance": 1_000_003})
    assert (info["entry"], info["instance"]) == ("b", 1_000_003)
    single = NMFEnv("small", problem_params=TINY["entries"][1]["problem_params"], **RELATIVE)
    obs1, _ = single.reset(seed=5, options={"instance": 1_000_003})
    np.testing.assert_array_equal(obs, obs1)
    for act in (0.2, -0.1):
        np.testing.assert_array_equal(env.step(np.array([act], np.float32))[0],
                                      single.step(np.array([act], np.float32))[0])
    assert env.reset(seed=5, options={"entry": 2})[1]["entry"] == "c"  # by index too
    with pytest.raises(ValueError, match="no entry 'd'"):
        env.reset(options={"entry": "d"})


def test_exclude_leaves_families_out():
    assert [e.name for e in load_suite("generalist", exclude=["digits"]).entries] == [
        "small", "tutorial", "illcond", "sales"]
    env = SuiteEnv(TINY, exclude="c")
    assert env.entry_names == ["a", "b"] and "c" not in {e for e, _ in draws(env, 30, seed=0)}
    with pytest.raises(ValueError, match="leaves suite 'tiny' without entries"):
        load_suite(TINY, exclude=["small"])  # by family name: every entry
    with pytest.raises(ValueError, match="no entry or family 'digit'. Did you mean 'digits'"):
        load_suite("generalist", exclude=["digit"])
    with pytest.raises(ValueError, match="applies to a suite"):
        make_env("small", exclude=["digits"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(action_mode="paper"), "action_mode 'paper' is an absolute learning rate"),
    (dict(action_mode="relative", lr_reference="absolute"), "lr_reference 'absolute'"),
    (dict(obs_features=["loss", "bound"]), "the 'bound' observation is log10\\(2/L\\) itself"),
    (dict(target_loss=1.0), "target_loss is an absolute loss"),
])
def test_scale_dependent_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=f"suite 'tiny': {message}"):
        SuiteEnv(TINY, **kwargs)


def test_entry_settings_and_bad_entries_are_refused():
    entry = dict(TINY["entries"][0])
    with pytest.raises(ValueError, match="entry 'a': 'action_mode' is a setting of the whole suite"):
        SuiteEnv([dict(entry, action_mode="relative")])
    with pytest.raises(ValueError, match="entry 'a': the budget is the family's; give it as problem_params"):
        SuiteEnv([dict(entry, budget=3)])
    with pytest.raises(ValueError, match="entry 'a': problem 'small': parameter m must be a positive integer"):
        SuiteEnv([dict(entry, problem_params={"m": -3})])
    with pytest.raises(ValueError, match="two entries are named 'small'"):
        load_suite(["small", "small"])
    with pytest.raises(ValueError, match="weight must be a positive number"):
        load_suite([dict(entry, weight=0)])
    with pytest.raises(ValueError, match="unknown suite 'generalst'. Did you mean 'generalist'"):
        load_suite("generalst")


def test_env_checkers_pickling_and_vector_envs():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
    check_env(SuiteEnv(TINY, **RELATIVE), skip_render_check=True)
    sb3_check_env(SuiteEnv(TINY, **RELATIVE))

    env = SuiteEnv(TINY, **RELATIVE)  # mid-episode pickle: the copy continues the same trajectory
    env.reset(seed=3)
    env.step(np.array([0.3], np.float32))
    twin = pickle.loads(pickle.dumps(env))
    clone = copy.deepcopy(env)
    step = [e.step(np.array([-0.2], np.float32)) for e in (env, twin, clone)]
    for other in step[1:]:
        np.testing.assert_array_equal(step[0][0], other[0])
        assert step[0][4]["entry"] == other[4]["entry"]
    assert draws(env, 5, 1) == draws(twin, 5, 1)

    from stable_baselines3.common.env_util import make_vec_env
    results = []
    for cls in (DummyVecEnv, SubprocVecEnv):  # through the registered id ("lrenv:" imports lrenv in the workers)
        venv = make_vec_env("lrenv:lrenv/NMF-suite-v0", n_envs=2, seed=4, vec_env_cls=cls,
                            env_kwargs=dict(suite=TINY, **RELATIVE))
        obs = [venv.reset()]
        for _ in range(8):  # past the end of every entry's episode (budgets 5-7): auto-reset draws again
            obs.append(venv.step(np.full((2, 1), 0.1, np.float32))[0])
        results.append(np.stack(obs))
        venv.close()
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_train_on_a_suite_then_evaluate_on_a_left_out_family(tmp_path, capsys):
    """lrenv train --problem <suite .yml> with env_kwargs.exclude (DummyVecEnv, 2 envs, a few hundred PPO steps),
    then lrenv evaluate on the family it left out: the policy runs an episode there."""
    from lrenv.cli import main
    suite = dict(TINY, entries=TINY["entries"] + [{"problem": "illcond", "problem_params": {"budget": 8}}])
    path = tmp_path / "tiny.yml"
    path.write_text(yaml.safe_dump(suite))
    assert main(["train", "--problem", str(path), "n_timesteps:256", "n_envs:2", "n_steps:64", "batch_size:64",
                 "n_epochs:1", "env_kwargs.exclude:[illcond]", "--eval-freq", "128", "--eval-episodes", "3",
                 "--checkpoint-freq", "0", "--runs-dir", str(tmp_path / "runs"), "--no-progress"]) == 0
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("suite-tiny__ppo__0__")
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["train"]["vec"] == "dummy" and doc["env"]["exclude"] == ["illcond"]
    assert [e["name"] for e in doc["suite"]["entries"]] == ["a", "b", "c"] and doc["suite"]["excluded"] == ["illcond"]
    assert doc["result"]["timesteps"] == 256 and (run_dir / "best_model.zip").exists()
    assert "--problem F" in capsys.readouterr().out

    out = tmp_path / "eval"
    assert main(["evaluate", "--problem", "illcond", "--problem-param", "budget=8", "--model", str(run_dir),
                 "--methods", "fixed-c=1.1", "--seeds", "2", "--out", str(out), "--no-progress",
                 "--no-tensorboard"]) == 0
    rows = [r for r in (out / "results.csv").read_text().splitlines()[1:] if r.startswith("policy:")]
    assert len(rows) == 2  # the suite's largest budget is 7, illcond's 8: a suite-trained policy takes any budget
    config = json.loads((out / "config.json").read_text())
    policy = next(m for m in config["methods"] if m["name"].startswith("policy:"))
    assert policy["task"]["action_mode"] == "relative" and policy["env_config"]["problem"] == str(path)

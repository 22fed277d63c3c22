"""Saved policies carry their whole decision problem (issue 10, item 6): every TaskConfig field and the
VecNormalize statistics travel inside every model .zip lrenv writes, and load back."""

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback

from lrenv import NMFEnv
from lrenv.agents.train import TrainConfig, load_hyperparams, train
from lrenv.evaluate import run_schedule, schedule_env_kwargs
from lrenv.policy_io import read_extras, task_differences
from lrenv.schedules import load_policy
from lrenv.task import TaskConfig

TINY = dict(m=60, n=20, rank=3)
BUDGET = 30


def tiny_config(tmp_path, *overrides, **kw) -> TrainConfig:
    hp = load_hyperparams("small", ["n_timesteps:512", "n_envs:2", "n_steps:64", "batch_size:64", "n_epochs:1",
                                    f"env_kwargs.budget:{BUDGET}", *overrides])
    options = dict(eval_freq=128, eval_episodes=1, checkpoint_freq=256, progress=False)
    return TrainConfig(problem="small", problem_params=TINY, hyperparams=hp, runs_dir=str(tmp_path), **{**options, **kw})


class Interrupt(BaseCallback):
    """Ctrl-C after ``at`` timesteps; remembers the normalisation statistics at that moment."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.mean, self.var = at, None, None

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.at:
            rms = self.model.get_vec_normalize_env().obs_rms
            self.mean, self.var = rms.mean.copy(), rms.var.copy()
            raise KeyboardInterrupt
        return True


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One finished tiny run with a non-default action_center (and log_range)."""
    tmp = tmp_path_factory.mktemp("runs")
    return train(tiny_config(tmp, "env_kwargs.action_center:0.1", "env_kwargs.log_range:0.5"))


def test_every_saved_model_carries_every_task_field_and_statistics(run_dir):
    names = {f.name for f in fields(TaskConfig)}
    saved = [run_dir / "model.zip", run_dir / "best_model.zip", *sorted((run_dir / "checkpoints").glob("*.zip"))]
    assert len(saved) >= 3, saved  # final, best and at least one checkpoint
    for path in saved:
        meta, vecnorm = read_extras(path)
        assert meta is not None and set(meta["task"]) == names, path
        assert meta["task"]["action_center"] == 0.1 and meta["task"]["log_range"] == 0.5
        assert meta["task"]["budget"] == BUDGET and meta["env"]["problem_params"] == TINY
        assert vecnorm is not None and vecnorm.obs_rms.count > 1, path


def test_policy_with_non_default_action_center_evaluates_with_it(run_dir):
    policy = load_policy(run_dir)
    assert policy.task_config["action_center"] == 0.1 and policy.env_overrides["action_center"] == 0.1
    env_kwargs = dict(problem="small", problem_params=TINY, budget=BUDGET)
    env = NMFEnv(**schedule_env_kwargs(policy, env_kwargs))
    assert env.task.action_center == 0.1 and env.task.log_range == 0.5
    trace = run_schedule(policy, env_kwargs, 0, env=env)
    # the first step: lr / (2/L) = action_center * 10^(log_range * a) for the policy's own first action
    obs, _ = env.reset(seed=0, options={"instance": trace.instance})
    policy.reset(env.oracle)
    a = float(np.clip(policy.predict(obs)[0][0], -1, 1))
    assert trace.lr_W[0] / trace.bound_W[0] == pytest.approx(0.1 * 10 ** (0.5 * a), rel=1e-5)
    # the default centre would have given 2.5x that step: a policy that lost it would act differently
    assert trace.lr_W[0] / trace.bound_W[0] != pytest.approx(0.25 * 10 ** (0.5 * a), rel=1e-2)


def test_policy_on_a_different_decision_problem_is_an_error_naming_the_field(run_dir):
    policy = load_policy(run_dir)
    with pytest.raises(ValueError, match=r"budget: policy 30, environment 20.*--budget 30"):
        run_schedule(policy, dict(problem="small", problem_params=TINY, budget=20), 0)
    env = NMFEnv(problem="small", problem_params=TINY, budget=BUDGET, instances="eval", action_center=0.3,
                 log_range=0.5)
    with pytest.raises(ValueError, match=r"action_center: policy 0.1, environment 0.3"):
        run_schedule(policy, {}, 0, env=env)
    assert task_differences({"reward": {"time_cost": 0.0}}, {"reward": {"time_cost": 0.1}}) == [
        "reward.time_cost: policy 0.0, environment 0.1"]


def test_interrupted_model_evaluates_with_its_normalisation(tmp_path):
    stop = Interrupt(at=200)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, eval_freq=0), extra_callbacks=[stop])
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "interrupted.zip").exists() and not (run_dir / "model.zip").exists()
    policy = load_policy(run_dir / "interrupted.zip")
    np.testing.assert_array_equal(policy.obs_rms.mean, stop.mean)
    np.testing.assert_array_equal(policy.obs_rms.var, stop.var)
    obs = np.array([0.5, 0.5, 0.5], dtype=np.float32)
    expected = np.clip((obs - stop.mean) / np.sqrt(stop.var + 1e-8), -10, 10)
    np.testing.assert_allclose(policy.normalize(obs), expected, rtol=1e-5)
    trace = run_schedule(policy, dict(problem="small", problem_params=TINY, budget=BUDGET), 0)
    assert len(trace.loss) > 1

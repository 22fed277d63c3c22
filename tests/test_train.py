"""PPO training end to end: train, save, reload, evaluate, TensorBoard tags, resume after a crash."""

import glob
import json
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrenv.agents.train import TrainConfig, latest_checkpoint, load_hyperparams, train
from lrenv import NMFEnv
from lrenv.problems import EVAL_SEEDS

SMALL = dict(m=200, n=40, rank=5)


def tiny_config(tmp_path, **kw) -> TrainConfig:
    hp = load_hyperparams("small", ["n_timesteps:2048", "n_envs:2", "n_steps:256", "batch_size:128", "n_epochs:2",
                                    "env_kwargs.budget:60"])
    options = dict(eval_freq=1024, eval_episodes=2, checkpoint_freq=512, progress=False)
    return TrainConfig(problem="small", problem_params=SMALL, hyperparams=hp, runs_dir=str(tmp_path),
                       **{**options, **kw})


def test_train_save_reload_evaluate_and_tensorboard(tmp_path):
    run_dir = train(tiny_config(tmp_path))
    assert run_dir.name.startswith("small__ppo__0__")
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["train"]["hyperparams"]["n_envs"] == 2 and cfg["result"]["timesteps"] == 2048
    assert cfg["env"]["problem_params"] == SMALL
    for name in ("model.zip", "vecnormalize.pkl", "best_model.zip"):
        assert (run_dir / name).exists(), name

    # reload and run the learned schedule on a held-out instance
    model = PPO.load(run_dir / "model.zip")
    env = NMFEnv(instances="eval", **cfg["env"])
    obs, info = env.reset(seed=0, options={"instance": EVAL_SEEDS[0]})
    assert model.observation_space.shape == env.observation_space.shape
    while True:
        obs, r, te, tr, info = env.step(model.predict(obs, deterministic=True)[0])
        if te or tr:
            break
    assert np.all(np.isfinite(obs)) and (te or tr)  # a few thousand steps may still diverge: finite obs anyway

    events = EventAccumulator(glob.glob(str(run_dir / "tb_*"))[0])
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("train/value_loss", "train/policy_gradient_loss", "heldout/mean_return", "heldout/epochs_to_target",
                "heldout/success_rate", "heldout/divergence_rate", "heldout/final_loss_ratio",
                "heldout/learned_over_best_fixed", "heldout/above_cliff_W", "episode/epochs_to_target",
                "episode/success_rate", "episode/divergence_rate", "episode/reward_improvement", "episode/reward_target"):
        assert tag in scalars, tag
    learned = events.Scalars("heldout/epochs_to_target")
    assert [e.step for e in learned] == [1024, 2048]  # one held-out evaluation, on the timestep axis
    assert all(0 < e.value <= 60 for e in learned)  # failures count at the budget (60): never NaN
    assert "heldout/schedule" in events.Tags()["images"]
    assert {"heldout/log10_scale_W", "heldout/log10_scale_H", "rollout/log10_scale_W"} <= set(events.Tags()["histograms"])
    assert {"config/text_summary", "heldout/table/text_summary"} <= set(events.Tags()["tensors"])
    baselines = glob.glob(str(run_dir / "tb_*" / "baselines" / "*"))
    assert len(baselines) == 3  # sub-runs with the same tags: overlaid with the learned curve
    base = EventAccumulator(baselines[0])
    base.Reload()
    assert [e.step for e in base.Scalars("heldout/epochs_to_target")] == [1024, 2048]
    raw = b"".join(Path(p).read_bytes() for p in glob.glob(str(run_dir / "tb_*" / "events*")))
    assert b"_hparams_/session_start_info" in raw  # the HParams tab


class Crash(BaseCallback):
    """Simulates a crash (not a graceful interrupt) after ``at`` timesteps."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def _on_step(self):
        if self.num_timesteps >= self.at:
            raise RuntimeError("simulated crash")
        return True


def test_resume_after_crash_reaches_total_timesteps(tmp_path):
    cfg = tiny_config(tmp_path, eval_freq=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, extra_callbacks=[Crash(1300)])
    run_dir = next(Path(tmp_path).iterdir())
    assert not (run_dir / "model.zip").exists()
    _, pkl, steps = latest_checkpoint(run_dir)
    assert steps == 1024 and pkl is not None
    train(cfg, resume=run_dir)
    model = PPO.load(run_dir / "model.zip")
    assert model.num_timesteps == 2048
    assert json.loads((run_dir / "config.json").read_text())["result"]["timesteps"] == 2048


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_checkpoint(tmp_path / "run")


def test_hyperparameter_overrides_and_errors():
    hp = load_hyperparams("small", ["learning_rate:0.01", "env_kwargs.action_mode:paper", "n_envs:4"])
    assert hp["learning_rate"] == 0.01 and hp["env_kwargs"]["action_mode"] == "paper" and hp["n_envs"] == 4
    paper = load_hyperparams("paper")
    assert paper["learning_rate"] == 0.01 and paper["env_kwargs"]["action_mode"] == "paper"
    with pytest.raises(ValueError, match="Did you mean 'learning_rate'"):
        load_hyperparams("small", ["learning_rat:0.1"])
    with pytest.raises(ValueError, match="key:value"):
        load_hyperparams("small", ["learning_rate=0.1"])


def test_env_threads_reach_the_environments_engines(tmp_path):
    """The envs' engines run on one torch thread by default (more collapse on a busy machine), on every core
    with env_threads=0, and on exactly the count asked for otherwise."""
    import os

    from lrenv.agents.train import env_threads, make_vec_env
    cores = len(os.sched_getaffinity(0))
    assert env_threads(tiny_config(tmp_path, vec="batched")) == 1
    assert env_threads(tiny_config(tmp_path, vec="subproc")) == 1
    assert env_threads(tiny_config(tmp_path, vec="batched", env_threads=0)) == cores
    assert env_threads(tiny_config(tmp_path, vec="dummy", env_threads=3)) == 3
    with pytest.raises(ValueError, match="env_threads must be >= 0"):
        env_threads(tiny_config(tmp_path, env_threads=-1))
    batched = make_vec_env(tiny_config(tmp_path, vec="batched", env_threads=2), 2)
    assert batched.venv.engine.cfg.threads == 2
    dummy = make_vec_env(tiny_config(tmp_path, vec="dummy", env_threads=0), 2)
    assert {e.engine.cfg.threads for e in dummy.venv.envs} == {cores}
    from lrenv import NMFEnv
    assert NMFEnv("small", problem_params=dict(m=40, n=10, rank=2)).engine.cfg.threads == 1


def test_bad_config_fails_before_a_run_directory_is_made(tmp_path):
    for bad in (dict(env_threads=-1), dict(vec="threads")):
        with pytest.raises(ValueError, match="--env-threads.*>= 0|--vec: unknown value"):
            train(tiny_config(tmp_path, **bad))
    with pytest.raises(ValueError, match="env_kwargs.action_mode: unknown value .fast."):
        load_hyperparams("small", ["n_timesteps:100", "env_kwargs.action_mode:fast"])
    assert list(tmp_path.iterdir()) == []


def test_config_records_what_tuned_settings_stood_for():
    """'tuned' a = 0 settings resolve per family from the shipped files, which change when a baseline is retuned:
    the run's config keeps the numbers (left-out families excluded)."""
    from lrenv.agents.train import TrainConfig, tuned_settings
    from lrenv.tuned_files import tuned_adam_plateau, tuned_step_scales
    kw = dict(optimizer="adam", action_mode="per_factor", center_plateau="tuned", factor_tilt="tuned", exclude=["digits"])
    got = tuned_settings(TrainConfig(problem="suite:generalist", hyperparams={"env_kwargs": kw}))
    assert "digits" not in got and {"small", "sales"} <= set(got)
    for family, values in got.items():
        assert values == {"center_plateau": list(tuned_adam_plateau(family)),
                          "factor_tilt": list(tuned_step_scales(family, "adam"))}
    sgd = tuned_settings(TrainConfig(problem="small", hyperparams={"env_kwargs": {"action_mode": "per_factor",
                                                                                  "factor_tilt": "tuned"}}))
    assert sgd == {"small": {"factor_tilt": list(tuned_step_scales("small"))}}
    assert tuned_settings(TrainConfig(problem="small")) == {}

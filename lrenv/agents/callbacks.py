"""stable-baselines3 callbacks that put the learning-rate problem's own quantities into TensorBoard."""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Figure, HParam

NOT_TO_TEXT = ("stdout", "log", "json", "csv")


class EpisodeStatsCallback(BaseCallback):
    """Per finished training episode: final loss / initial, epochs, reached target, diverged, mean LR scale."""

    def _on_training_start(self) -> None:
        n = self.training_env.num_envs
        self._scale_sum = np.zeros(n)
        self._steps = np.zeros(n)
        self._first_loss = np.full(n, np.nan)

    def _on_step(self) -> bool:
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
            if np.isnan(self._first_loss[i]):
                self._first_loss[i] = info.get("loss", np.nan)
            if info.get("bound_W", 0) > 0:
                self._scale_sum[i] += info["lr_W"] / info["bound_W"]
                self._steps[i] += 1
            if done:
                self.logger.record_mean("episode/final_loss_ratio", info["best_loss"] / info["target_loss"])
                self.logger.record_mean("episode/epochs", info["epoch"])
                self.logger.record_mean("episode/reached_target", float(info["reached_target"]))
                self.logger.record_mean("episode/diverged", float(info["diverged"]))
                if info["reached_target"]:
                    self.logger.record_mean("episode/epochs_to_target", info["epoch"])
                if self._steps[i]:
                    self.logger.record_mean("episode/mean_lr_scale", self._scale_sum[i] / self._steps[i])
                self._scale_sum[i] = self._steps[i] = 0
                self._first_loss[i] = np.nan
        return True


class HParamCallback(BaseCallback):
    """The run's hyperparameters with the metrics they produced, for TensorBoard's HParams tab."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def _on_training_start(self) -> None:
        hp = self.cfg.hyperparams
        hparams = {"problem": self.cfg.problem, "seed": self.cfg.seed, "vec": self.cfg.vec}
        for k, v in hp.items():
            if isinstance(v, (int, float, str, bool)):
                hparams[k] = v
        for k, v in hp.get("env_kwargs", {}).items():
            hparams[f"env/{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
        metrics = {"eval/mean_reward": 0.0, "episode/epochs_to_target": 0.0, "episode/reached_target": 0.0,
                   "eval/learned_epochs_to_target": 0.0}
        self.logger.record("hparams", HParam(hparams, metrics), exclude=NOT_TO_TEXT)

    def _on_step(self) -> bool:
        return True


def rollout(env, seed: int, instance: int, policy) -> dict:
    """One deterministic episode on a pinned instance: per-epoch loss and LR scale (lr / bound)."""
    obs, info = env.reset(seed=seed, options={"instance": instance})
    loss, scale = [info["loss"]], []
    while True:
        obs, _, terminated, truncated, info = env.step(policy(obs))
        loss.append(info["loss"])
        scale.append(info["lr_W"] / info["bound_W"])
        if terminated or truncated:
            break
    return {"loss": np.array(loss), "scale": np.array(scale), "reached": info["reached_target"],
            "epochs": info["epoch"], "target": info["target_loss"]}


class ScheduleFigureCallback(BaseCallback):
    """Every ``freq`` vector steps: the learned schedule's loss curve and LR history on held-out instances,
    drawn next to the fixed schedule at half the bound (the best fixed scale on ``small``)."""

    BASELINE_SCALE = 0.5

    def __init__(self, cfg, instances: list[int], freq: int):
        super().__init__()
        self.cfg, self.instances, self.freq = cfg, instances, freq

    def _env(self, **overrides):
        from lrenv import NMFEnv
        kwargs = dict(self.cfg.env_kwargs, **overrides)
        return NMFEnv(instances=self.instances, **kwargs)

    def _on_training_start(self) -> None:
        env = self._env(action_mode="log_bound", log_range=1.0)
        action = env.task.action_for_scale(self.BASELINE_SCALE)
        self.baseline = [rollout(env, 0, inst, lambda obs: action) for inst in self.instances]
        self.env = self._env()

    def _policy(self, obs):
        norm = self.model.get_vec_normalize_env()
        if norm is not None:
            obs = norm.normalize_obs(obs)
        return self.model.predict(obs, deterministic=True)[0]

    def _on_step(self) -> bool:
        if self.n_calls % self.freq:
            return True
        learned = [rollout(self.env, 0, inst, self._policy) for inst in self.instances]
        mean_epochs = lambda runs: float(np.mean([r["epochs"] if r["reached"] else np.nan for r in runs]))  # noqa
        self.logger.record("eval/learned_epochs_to_target", mean_epochs(learned))
        self.logger.record("eval/fixed_half_bound_epochs_to_target", mean_epochs(self.baseline))
        self.logger.record("eval/learned_success", float(np.mean([r["reached"] for r in learned])))
        self.logger.record("eval/schedule", Figure(schedule_figure(learned, self.baseline), close=True),
                           exclude=NOT_TO_TEXT)
        return True


def schedule_figure(learned: list[dict], baseline: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    for i, (lr_run, base) in enumerate(zip(learned, baseline)):
        color = f"C{i}"
        ax_loss.semilogy(lr_run["loss"] / lr_run["target"], color=color, label="learned" if i == 0 else None)
        ax_loss.semilogy(base["loss"] / base["target"], color=color, ls="--",
                         label="fixed 0.5 x 2/L" if i == 0 else None)
        ax_lr.plot(lr_run["scale"], color=color)
        ax_lr.plot(base["scale"], color=color, ls="--")
    ax_loss.axhline(1.0, color="k", lw=0.8)
    ax_loss.set(xlabel="epoch", ylabel="loss / target", title="held-out instances")
    ax_loss.legend()
    ax_lr.set(xlabel="epoch", ylabel="lr_W / (2/L_W)", title="learning rate (relative to the bound)", yscale="log")
    fig.tight_layout()
    return fig


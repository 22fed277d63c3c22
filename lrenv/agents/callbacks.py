"""stable-baselines3 callbacks that put the learning-rate problem's own quantities into TensorBoard.

What a researcher finds in ``tensorboard --logdir runs`` (one run directory = one training run):

- ``heldout/*`` (one held-out evaluation, one step axis: timesteps): epochs to target with failures counted
  at the budget, success rate, divergence rate, final-loss ratio (best loss / target, geometric mean),
  learned / best fixed, mean episodic return; the same tags from sub-runs ``baselines/<method>`` (constant
  lines), so TensorBoard overlays learned and baselines in one chart per metric.
- ``heldout/scale_W``, ``heldout/scale_H`` histograms of the chosen step / bound per factor, and
  ``heldout/above_cliff_W|H``: the fraction of epochs above the stability cliff (0.55 x 2/L).
- ``episode/*`` (training episodes): the same failure-counting metrics and the return split into its terms
  (``episode/reward_improvement``, ``_time``, ``_target``, ``_divergence``).
- ``rollout/log10_scale_W|H`` histograms of the training policy's step / bound per factor, ``rollout/above_cliff_W|H``.
- Images: ``heldout/schedule`` (loss / target and both factors' step sizes, fixed axes, bound and cliff lines).
- Text: ``config`` (the run's config.json) and ``heldout/table`` (learned vs baselines, Markdown).
- HParams: every hyperparameter flattened (``policy_kwargs.net_arch``, ``env.reward.time_cost``...), the
  timesteps as run, and the final held-out metrics.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam, TensorBoardOutputFormat

from lrenv.env import CLIFF_SCALE
from lrenv.task import EpisodeTracker

NOT_TO_TEXT = ("stdout", "log", "json", "csv")
BASELINE_SCALES = (0.5, 0.8, 1.1)
"""Fixed ``c`` of ``lr = c/L`` (= c/2 of the bound) run once on the held-out instances; the best is "best fixed"."""
HELDOUT_METRICS = ("heldout/epochs_to_target", "heldout/success_rate", "heldout/divergence_rate",
                   "heldout/final_loss_ratio", "heldout/learned_over_best_fixed", "heldout/mean_return")


# ----------------------------------------------------------------------------- metrics that count failures
def episode_metrics(runs: list[dict], budget: int) -> dict[str, float]:
    """Metrics over finished episodes in which failures count: epochs to target with a failure (never
    reached, or diverged) counted at the budget (a run's own ``"budget"`` where it has one: a suite's entries
    differ), success and divergence rates, and the geometric mean of best loss / target (1 = reached; diverged
    runs count their best loss)."""
    if not runs:
        return {}
    reached = np.array([bool(r["reached"]) for r in runs])
    epochs = np.where(reached, [r["epochs"] for r in runs], [r.get("budget", budget) for r in runs]).astype(float)
    with np.errstate(all="ignore"):
        ratio = np.array([r["best_loss"] / r["target"] for r in runs], dtype=float)
    ratio = np.where(np.isfinite(ratio) & (ratio > 0), ratio, np.nan)
    return {"epochs_to_target": float(epochs.mean()), "success_rate": float(reached.mean()),
            "divergence_rate": float(np.mean([bool(r["diverged"]) for r in runs])),
            "final_loss_ratio": float(10 ** np.nanmean(np.log10(ratio))) if np.isfinite(ratio).any() else math.nan}


def selection_key(m: dict[str, float]) -> tuple[float, float]:
    """What ranks held-out evaluations for ``best_model.zip``: epochs to target (failures at the budget), then the
    geometric-mean best loss / target (NaN last), which still orders policies where no run reaches the target."""
    ratio = m.get("final_loss_ratio", math.nan)
    return m["epochs_to_target"], ratio if math.isfinite(ratio) else math.inf


def improves(m: dict[str, float], best: tuple[float, float]) -> bool:
    """True when held-out metrics ``m`` beat the best :func:`selection_key` so far; on equal epochs a run that
    reached the target keeps the later policy (it has trained longer)."""
    key = selection_key(m)
    if key[0] != best[0]:
        return key[0] < best[0]
    return m["success_rate"] > 0 or key[1] < best[1]


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> ``a.b.c`` keys with scalar values (lists and other values as strings): the HParams
    plugin takes only bool, number and string."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = "None" if v is None else v
        else:
            out[key] = str(v)
    return out


def tb_writer(logger):
    """The SummaryWriter behind SB3's TensorBoard output (text and sub-runs share its step axis), or None."""
    for fmt in logger.output_formats:
        if isinstance(fmt, TensorBoardOutputFormat):
            return fmt.writer
    return None


# ----------------------------------------------------------------------------- training episodes
class EpisodeStatsCallback(BaseCallback):
    """Per finished training episode: failure-counting metrics, the return's terms, the mean scale; per
    rollout: histograms of the chosen scale per factor and the fraction of epochs above the cliff."""

    def __init__(self, budget: int):
        super().__init__()
        self.budget = budget

    def _on_training_start(self) -> None:
        n = self.training_env.num_envs
        self._terms = np.zeros((n, len(EpisodeTracker.REWARD_TERMS)))
        self._scale: list[list[float]] = [[], []]

    def _on_rollout_start(self) -> None:
        self._scale = [[], []]

    def _on_step(self) -> bool:
        finished = []
        for i, (info, done) in enumerate(zip(self.locals["infos"], self.locals["dones"])):
            if info.get("bound_W", 0) > 0 and info.get("epoch", 0) > 0:
                self._scale[0].append(info["lr_W"] / info["bound_W"])
                self._scale[1].append(info["lr_H"] / max(info["bound_H"], 1e-300))
            self._terms[i] += [info.get(k, 0.0) for k in EpisodeTracker.REWARD_TERMS]
            if done:
                finished.append({"reached": info["reached_target"], "diverged": info["diverged"],
                                 "epochs": info["epoch"], "best_loss": info["best_loss"], "target": info["target_loss"],
                                 "budget": info.get("budget", self.budget)})
                for k, v in zip(EpisodeTracker.REWARD_TERMS, self._terms[i]):
                    self.logger.record_mean(f"episode/{k}", float(v))
                self._terms[i] = 0.0
        for k, v in episode_metrics(finished, self.budget).items():
            if math.isfinite(v):
                self.logger.record_mean(f"episode/{k}", v)
        return True

    def _on_rollout_end(self) -> None:
        import torch
        for name, values in zip("WH", self._scale):
            x = np.asarray(values, dtype=float)
            x = x[np.isfinite(x) & (x > 0)]
            if len(x):
                self.logger.record(f"rollout/log10_scale_{name}", torch.as_tensor(np.log10(x)), exclude=NOT_TO_TEXT)
                self.logger.record(f"rollout/above_cliff_{name}", float(np.mean(x > CLIFF_SCALE)))


# ----------------------------------------------------------------------------- the held-out evaluation
def rollout(env, seed: int, pin: dict, policy: Callable[[np.ndarray], np.ndarray]) -> dict:
    """One deterministic episode on a pinned instance (``pin``: the reset options, ``{"instance": seed}`` and for a
    suite ``"entry"``): per-epoch loss, both factors' scale (lr / bound), return, the episode's budget."""
    obs, info = env.reset(seed=seed, options=pin)
    budget = info.get("budget", env.task.budget)
    loss, scale_W, scale_H, ret = [info["loss"]], [], [], 0.0
    while True:
        obs, reward, terminated, truncated, info = env.step(policy(obs))
        ret += reward
        loss.append(info["loss"])
        with np.errstate(all="ignore"):
            scale_W.append(info["lr_W"] / info["bound_W"])
            scale_H.append(info["lr_H"] / info["bound_H"])
        if terminated or truncated:
            break
    return {"loss": np.array(loss), "scale_W": np.array(scale_W), "scale_H": np.array(scale_H),
            "reached": info["reached_target"], "diverged": info["diverged"], "epochs": info["epoch"],
            "target": info["target_loss"], "best_loss": info["best_loss"], "return": ret, "budget": budget}


class HeldoutEvalCallback(BaseCallback):
    """Every ``freq`` vector steps: the deterministic policy on the held-out instances, scored with
    failures counted; fixed-scale baselines on the same instances once at the start, written as sub-runs
    with the same tags; the schedule figure, scale histograms and a results table. Saves
    ``best_model.zip`` when the held-out score improves (:func:`improves`: epochs to target with failures at the
    budget, then the best loss's ratio to the target, what ranks runs where the target is out of reach).

    ``env_kwargs`` may name a suite (lrenv.suite): held-out instance ``i`` then runs on entry ``i mod
    entries``, so as many instances as entries cover each entry once; failures count at each entry's budget."""

    def __init__(self, env_kwargs: dict, instances: list[int], freq: int, run_dir: str | Path, seed: int = 0,
                 on_eval: Callable[[int, dict], None] | None = None,
                 save_best: Callable[[Path], None] | None = None):
        super().__init__()
        self.env_kwargs, self.instances, self.freq = env_kwargs, list(instances), freq
        self.run_dir, self.seed, self.on_eval = Path(run_dir), seed, on_eval
        self.save_best = save_best
        """Writes best_model.zip (atomically); default: the bare SB3 model. Training passes lrenv.policy_io's
        save, which embeds the task and the normalisation statistics."""
        self.best: tuple[float, float] = (math.inf, math.inf)
        self.last: dict[str, float] = {}

    def _env(self, **overrides):
        from lrenv.suite import make_env
        return make_env(instances=self.instances, **dict(self.env_kwargs, **overrides))

    def _on_training_start(self) -> None:
        self.env = self._env()
        self.budget = self.env.task.budget
        entries = getattr(self.env, "entry_names", None)  # a suite: cycle through its entries
        self.pins = [{"instance": inst, **({"entry": entries[i % len(entries)]} if entries else {})}
                     for i, inst in enumerate(self.instances)]
        base_env = self._env(action_mode="log_bound", log_range=1.0, action_center=0.25, action_center_final=None,
                             factor_tilt=None, center_plateau=None)
        self.baselines: dict[str, list[dict]] = {}
        for c in BASELINE_SCALES:  # lr = c / L = (c/2) x 2/L
            action = base_env.task.action_for_scale(c / 2)
            self.baselines[f"fixed c={c:g}"] = [rollout(base_env, self.seed + i, pin, lambda obs: action)
                                                for i, pin in enumerate(self.pins)]
        self.baseline_metrics = {k: episode_metrics(v, self.budget) for k, v in self.baselines.items()}
        self.best_fixed = min(self.baseline_metrics, key=lambda k: (self.baseline_metrics[k]["epochs_to_target"],
                                                                     self.baseline_metrics[k]["final_loss_ratio"]))
        self._sub_writers = {}
        writer = tb_writer(self.logger)
        if writer is not None:
            from torch.utils.tensorboard import SummaryWriter
            root = Path(writer.log_dir)
            for name in self.baselines:
                self._sub_writers[name] = SummaryWriter(str(root / "baselines" / name.replace("=", "").replace(" ", "_")))

    def _policy(self, obs):
        norm = self.model.get_vec_normalize_env()
        if norm is not None:
            obs = norm.normalize_obs(obs)
        return self.model.predict(obs, deterministic=True)[0]

    def _on_step(self) -> bool:
        if self.n_calls % self.freq == 0:
            self.evaluate()
        return True

    def evaluate(self) -> dict[str, float]:
        step = self.num_timesteps
        learned = [rollout(self.env, self.seed + i, pin, self._policy) for i, pin in enumerate(self.pins)]
        m = episode_metrics(learned, self.budget)
        m["mean_return"] = float(np.mean([r["return"] for r in learned]))
        best = self.baseline_metrics[self.best_fixed]
        m["learned_over_best_fixed"] = m["epochs_to_target"] / best["epochs_to_target"]
        writer = tb_writer(self.logger)
        for k, v in m.items():  # TensorBoard at this evaluation's step (the sub-runs' step); stdout/csv via the logger
            self.logger.record(f"heldout/{k}", v, exclude="tensorboard")
            if writer is not None and math.isfinite(v):
                writer.add_scalar(f"heldout/{k}", v, step)
        for name, runs in (("W", "scale_W"), ("H", "scale_H")):
            x = np.concatenate([r[runs] for r in learned])
            x = x[np.isfinite(x) & (x > 0)]
            if len(x) and writer is not None:
                writer.add_histogram(f"heldout/log10_scale_{name}", np.log10(x), step)
                writer.add_scalar(f"heldout/above_cliff_{name}", float(np.mean(x > CLIFF_SCALE)), step)
        if writer is not None:
            writer.add_figure("heldout/schedule", schedule_figure(learned, self.baselines[self.best_fixed],
                                                                  self.best_fixed), step, close=True)
        for name, w in self._sub_writers.items():
            bm = self.baseline_metrics[name]
            for k, v in bm.items():
                if math.isfinite(v):
                    w.add_scalar(f"heldout/{k}", v, step)
            w.add_scalar("heldout/learned_over_best_fixed", bm["epochs_to_target"] / best["epochs_to_target"], step)
            w.add_scalar("heldout/mean_return", float(np.mean([r["return"] for r in self.baselines[name]])), step)
            w.flush()
        if writer is not None:
            writer.add_text("heldout/table", self.table(m), step)
            writer.flush()
        if improves(m, self.best):
            self.best = selection_key(m)
            if self.save_best is not None:
                self.save_best(self.run_dir / "best_model.zip")
            else:
                tmp = self.run_dir / ".best_model.tmp.zip"
                self.model.save(tmp)
                os.replace(tmp, self.run_dir / "best_model.zip")
        self.last = m
        if self.on_eval is not None:
            self.on_eval(step, m)
        return m

    def table(self, learned: dict[str, float]) -> str:
        rows = {"learned (this run)": learned, **self.baseline_metrics}
        where = ", ".join(f"{p['instance']} ({p['entry']})" if "entry" in p else str(p["instance"]) for p in self.pins)
        budget = "each entry's budget" if "entry" in self.pins[0] else f"the budget ({self.budget})"
        lines = [f"held-out instances {where}; failures count at {budget}; best fixed: {self.best_fixed}", "",
                 "| method | epochs to target | success | diverged | final loss / target |", "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['epochs_to_target']:.1f} | {r['success_rate']:.2f} | {r['divergence_rate']:.2f}"
                         f" | {r['final_loss_ratio']:.3g} |")
        return "\n".join(lines)

    def _on_training_end(self) -> None:
        for w in self._sub_writers.values():
            w.close()


def schedule_figure(learned: list[dict], baseline: list[dict], baseline_name: str = "best fixed"):
    """Loss / target and both factors' step / bound of the learned policy (bold) and a baseline (thin),
    per held-out instance; fixed axes across evaluations, the bound and the stability cliff marked."""
    from lrenv.plots import LEARNED_COLOR, method_color
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    budget = max([len(r["loss"]) - 1 for r in learned + baseline] + [1])
    base_color = method_color(baseline_name)
    for i, (lr_run, base) in enumerate(zip(learned, baseline)):
        for run, color, lw, z, label in ((base, base_color, 1.0, 2, baseline_name), (lr_run, LEARNED_COLOR, 2.2, 3, "learned")):
            ax_loss.semilogy(run["loss"] / run["target"], color=color, lw=lw, zorder=z, label=label if i == 0 else None)
            if run["diverged"]:
                ax_loss.plot(len(run["loss"]) - 1, 1e4, "x", color=color, ms=8, zorder=z)
            ax_lr.plot(run["scale_W"], color=color, lw=lw, zorder=z, label=f"{label}: W" if i == 0 else None)
            ax_lr.plot(run["scale_H"], color=color, lw=lw, ls="--", zorder=z, label=f"{label}: H" if i == 0 else None)
    ax_loss.axhline(1.0, color="k", lw=0.8, label="target")
    ax_loss.set(xlabel="epoch", ylabel="loss / target", title="held-out instances (x: diverged)", ylim=(0.3, 3e4),
                xlim=(0, budget))
    ax_loss.legend(fontsize=8)
    ax_lr.axhline(1.0, color="k", lw=0.8, ls="--", label="bound 2/L")
    ax_lr.axhline(CLIFF_SCALE, color="r", lw=0.8, ls=":", label=f"cliff {CLIFF_SCALE} x 2/L")
    ax_lr.set(xlabel="epoch", ylabel="step / (2/L)", title="step sizes (solid W, dashed H)", yscale="log",
              ylim=(1e-3, 3.0), xlim=(0, budget))
    ax_lr.legend(fontsize=7, loc="lower left", ncol=2)
    return fig


# ----------------------------------------------------------------------------- HParams and config text
class HParamCallback(BaseCallback):
    """Every hyperparameter (flattened), the timesteps as run and the held-out metrics, for the HParams tab;
    the config as text."""

    def __init__(self, cfg, metrics: tuple[str, ...] = HELDOUT_METRICS):
        super().__init__()
        self.cfg, self.metrics = cfg, metrics

    def _on_training_start(self) -> None:
        import dataclasses
        model = self.model
        per_rollout = model.n_steps * model.n_envs if hasattr(model, "n_steps") else model.n_envs
        as_run = int(math.ceil(model._total_timesteps / per_rollout) * per_rollout)
        hp = dict(self.cfg.hyperparams)
        hparams = flatten({"problem": self.cfg.problem, "seed": self.cfg.seed, "vec": self.cfg.vec,
                           "problem_params": self.cfg.problem_params, **{k: v for k, v in hp.items() if k != "env_kwargs"},
                           "env": self.cfg.env_kwargs})
        hparams.pop("env.problem", None)
        hparams.pop("env.problem_params", None)
        hparams["n_timesteps_requested"] = hparams.get("n_timesteps", as_run)
        hparams["n_timesteps"] = as_run
        self.logger.record("hparams", HParam(hparams, {k: 0.0 for k in self.metrics}), exclude=NOT_TO_TEXT)
        writer = tb_writer(self.logger)
        if writer is not None:
            doc = {"train": dataclasses.asdict(self.cfg), "env": self.cfg.env_kwargs}
            writer.add_text("config", "```\n" + json.dumps(doc, indent=2, default=str) + "\n```", 0)

    def _on_step(self) -> bool:
        return True


# ----------------------------------------------------------------------------- progress
class ProgressCallback(BaseCallback):
    """Progress with a correct ETA: the total is the timesteps as run (whole rollouts), and the rate is
    measured over whole rollouts (collection + update), not over the fast collection alone. On a terminal:
    a bar; otherwise (output redirected): one line per checkpoint and per evaluation."""

    def __init__(self, every: list[int], bar: bool = True, stream=None):
        super().__init__()
        self.every = [e for e in every if e > 0]
        self.stream = stream or sys.stderr
        self.want_bar = bar

    def _on_training_start(self) -> None:
        model = self.model
        per_rollout = model.n_steps * model.n_envs if hasattr(model, "n_steps") else model.n_envs
        self.start_steps = model.num_timesteps
        self.total = int(math.ceil(model._total_timesteps / per_rollout) * per_rollout)
        self.t0 = time.perf_counter()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self._mark = (self.start_steps, self.t0)
        if self.tty and self.want_bar:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=self.start_steps, unit="step", file=self.stream,
                            dynamic_ncols=True, smoothing=0)

    def _on_rollout_start(self) -> None:
        self._mark = (self.model.num_timesteps, time.perf_counter())  # whole rollouts so far, updates included
        if self.bar is not None:
            self.bar.update(self.model.num_timesteps - self.bar.n)

    def _on_step(self) -> bool:
        if self.bar is None:
            t, n = self.model.num_timesteps, self.model.n_envs
            if any(t // e != (t - n) // e for e in self.every):
                self.line(t)
        return True

    def eta(self, t: int) -> tuple[float, float]:
        """(steps/s, seconds left) from the whole rollouts (collection + update) completed so far; within the
        first rollout, from the steps so far."""
        steps, when = self._mark
        if steps <= self.start_steps:
            steps, when = t, time.perf_counter()
        rate = (steps - self.start_steps) / max(when - self.t0, 1e-9)
        return rate, (self.total - t) / max(rate, 1e-9)

    def line(self, t: int) -> None:
        if t == getattr(self, "_last_line", None):
            return
        self._last_line = t
        rate, eta = self.eta(t)
        print(f"[{t:>{len(str(self.total))}d}/{self.total}] {100 * t / self.total:5.1f}%  {rate:7.0f} steps/s  "
              f"elapsed {_hms(time.perf_counter() - self.t0)}  ETA {_hms(eta)}", file=self.stream, flush=True)

    def _on_training_end(self) -> None:
        if self.bar is not None:
            self.bar.update(self.model.num_timesteps - self.bar.n)
            self.bar.close()
        else:
            self.line(self.model.num_timesteps)


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

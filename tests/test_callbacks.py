"""TensorBoard metrics that count failures, flattened HParams, progress lines, run names, hyperparameter keys
and the evaluation figures' rules (colours, default set, nothing clipped)."""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import yaml

from lrenv import ENV_ID, ENV_IDS, SUITE_ENV_ID
from lrenv.agents.callbacks import ProgressCallback, episode_metrics, flatten
from lrenv.agents.train import HYPERPARAMS, hyperparams_key, load_hyperparams, run_name
from lrenv.metrics import Trace
from lrenv.plots import (LEARNED_COLOR, default_methods, evaluation_figures, is_policy, method_color)


def test_failures_count_at_the_budget_and_never_give_nan():
    runs = [dict(reached=True, diverged=False, epochs=50, best_loss=1.0, target=1.0),
            dict(reached=False, diverged=False, epochs=200, best_loss=4.0, target=1.0),
            dict(reached=False, diverged=True, epochs=10, best_loss=16.0, target=1.0)]
    m = episode_metrics(runs, budget=200)
    assert m["epochs_to_target"] == pytest.approx((50 + 200 + 200) / 3)
    assert m["success_rate"] == pytest.approx(1 / 3) and m["divergence_rate"] == pytest.approx(1 / 3)
    assert m["final_loss_ratio"] == pytest.approx(4.0)  # geometric mean of 1, 4, 16
    # an improving agent (more successes, sooner) lowers the metric; the old successes-only mean rose
    better = episode_metrics([dict(runs[0], epochs=80)] * 2 + [runs[1]], budget=200)
    assert better["epochs_to_target"] < m["epochs_to_target"]
    # a suite's runs carry their own budget: a failure counts at its entry's budget
    mixed = episode_metrics([runs[0], dict(runs[1], budget=500), dict(runs[2], budget=30)], budget=200)
    assert mixed["epochs_to_target"] == pytest.approx((50 + 500 + 30) / 3)


def test_flatten_keeps_every_hyperparameter():
    flat = flatten({"policy_kwargs": {"net_arch": [64, 64], "log_std_init": -1.0}, "normalize": {"norm_obs": True},
                    "env": {"reward": {"time_cost": 0.1}}, "target_kl": None})
    assert flat == {"policy_kwargs.net_arch": "[64, 64]", "policy_kwargs.log_std_init": -1.0,
                    "normalize.norm_obs": True, "env.reward.time_cost": 0.1, "target_kl": "None"}


class _Model:
    n_steps, n_envs, num_timesteps, _total_timesteps = 100, 4, 0, 1000


def test_progress_lines_when_not_a_terminal_with_the_total_as_run():
    stream = io.StringIO()
    cb = ProgressCallback([400], stream=stream)
    cb.model = _Model()
    cb.locals, cb.globals = {}, {}
    cb._on_training_start()
    assert cb.total == 1200  # whole rollouts of 400: what learn() runs, no overshoot past 100 %
    for t in range(4, 1204, 4):
        cb.model.num_timesteps = t
        if t % 400 == 4:
            cb._on_rollout_start()
        cb._on_step()
    cb._on_training_end()
    lines = stream.getvalue().splitlines()
    assert [ln.split("]")[0] for ln in lines] == ["[ 400/1200", "[ 800/1200", "[1200/1200"]
    assert "ETA 0:00:00" in lines[-1] and "100.0%" in lines[-1]


def test_one_run_name_scheme_for_train_and_evaluate():
    from lrenv.evaluate import default_out_dir
    pattern = r"^small__(ppo|eval)__3__\d{8}-\d{6}$"
    assert re.match(pattern, run_name("small", "ppo", 3))
    assert re.match(pattern, os.path.basename(default_out_dir("small", 3)))
    assert run_name("data/x.npy", "ppo", 0).startswith("x__ppo__0__")
    assert run_name("suite", "ppo", 0).startswith("suite-generalist__ppo__0__")
    assert run_name("suite:sizes-small", "ppo", 0).startswith("suite-sizes-small__ppo__0__")
    assert run_name("cfg/my.yml", "ppo", 0).startswith("suite-my__ppo__0__")


def test_hyperparams_file_is_keyed_by_env_id_and_family_names_still_work(tmp_path):
    table = yaml.safe_load(HYPERPARAMS.read_text())
    assert set(table) == {*ENV_IDS.values(), ENV_ID, SUITE_ENV_ID}
    assert hyperparams_key("small", table) == "lrenv/NMF-small-v0"
    assert hyperparams_key("data.npy", table) == ENV_ID
    assert hyperparams_key("suite", table) == hyperparams_key("my_suite.yml", table) == SUITE_ENV_ID
    with pytest.raises(ValueError, match="looked for 'lrenv/NMF-suite-v0'"):
        hyperparams_key("suite:generalist", {ENV_ID: {}})
    assert load_hyperparams("paper")["env_kwargs"]["action_mode"] == "paper"
    legacy = tmp_path / "old.yml"
    legacy.write_text("small: {n_envs: 2, n_timesteps: 100}\nmatrix: {n_envs: 3, n_timesteps: 100}\n")
    assert load_hyperparams("small", path=legacy)["n_envs"] == 2
    assert load_hyperparams("x.csv", path=legacy)["n_envs"] == 3
    with pytest.raises(ValueError, match="looked for 'lrenv/NMF-small-v0'"):
        hyperparams_key("small", {"medium": {}})


# ----------------------------------------------------------------------------- figures
def _trace(method, seed, losses, scale=0.4, diverged=False, budget=30):
    loss = np.asarray(losses, dtype=float)
    n = len(loss) - 1
    return Trace(method=method, seed_index=seed, instance=seed, target_loss=1.0, loss=loss, wall=np.arange(n + 1.0),
                 lr_W=np.full(n, scale), lr_H=np.full(n, scale / 2), bound_W=np.ones(n), bound_H=np.ones(n),
                 budget=budget, diverged=diverged, reached_target=bool(loss[-1] <= 1.0))


def _traces():
    decay = lambda rate, n=30: 100 * np.exp(-rate * np.arange(n + 1))  # noqa: E731
    out = {f"fixed c={c:g}": [_trace(f"fixed c={c:g}", s, decay(0.1 * c)) for s in range(3)] for c in (0.5, 1.1)}
    out["fixed c=1.9"] = [_trace("fixed c=1.9", s, [100, 1e3, np.inf], diverged=True) for s in range(3)]
    out["armijo"] = [_trace("armijo", s, decay(0.3)) for s in range(3)]
    out["random-bound"] = [_trace("random-bound", s, decay(0.05)) for s in range(3)]
    out["policy:run"] = [_trace("policy:run", s, decay(0.25)) for s in range(3)]
    return out


def test_default_set_and_colours_are_stable_and_policies_stand_out():
    traces = _traces()
    chosen = default_methods(traces)
    assert chosen == ["fixed c=1.1", "armijo", "policy:run"]  # best fixed, tuned/named baselines, policies last
    assert method_color("policy:run", ["policy:run"]) == LEARNED_COLOR and is_policy("policy:run")
    assert method_color("armijo") == method_color("armijo") != method_color("adam")
    assert method_color("fixed c=0.5") != method_color("fixed c=1.1")


def test_figures_draw_policies_on_top_and_clip_nothing():
    figs = evaluation_figures(_traces())
    assert set(figs) == {"loss_curves", "lr_history", "loss_curves_all"}
    ax = figs["loss_curves"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert lines["policy:run"].get_zorder() > max(ln.get_zorder() for k, ln in lines.items() if k != "policy:run")
    assert lines["policy:run"].get_linewidth() > lines["armijo"].get_linewidth()
    assert any("diverged" in k for k in {ln.get_label() for ln in figs["loss_curves_all"].axes[0].get_lines()})
    assert len(figs["lr_history"].axes) == 2  # both factors
    for fig in figs.values():
        fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())
        w, h = fig.get_size_inches()
        assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01


def test_best_model_selection_ranks_by_the_loss_where_the_target_is_out_of_reach():
    """Epochs to target first (failures at the budget); where every run fails, the best-loss / target ratio
    decides, so a policy that ends lower replaces the first one (it was never replaced before)."""
    from lrenv.agents.callbacks import improves, selection_key
    failed = lambda ratio: {"epochs_to_target": 500.0, "success_rate": 0.0, "final_loss_ratio": ratio}  # noqa: E731
    best = (float("inf"), float("inf"))
    assert improves(failed(1e3), best)
    best = selection_key(failed(1e3))
    assert improves(failed(10.0), best) and not improves(failed(1e4), best) and not improves(failed(float("nan")), best)
    reached = {"epochs_to_target": 120.0, "success_rate": 0.4, "final_loss_ratio": 3.0}
    assert improves(reached, best)  # fewer epochs beat any loss ratio
    best = selection_key(reached)
    assert not improves({**reached, "epochs_to_target": 130.0, "final_loss_ratio": 1.0}, best)
    assert improves({**reached, "final_loss_ratio": 5.0}, best)  # equal epochs with successes: the later policy
    assert selection_key(failed(float("nan"))) == (500.0, float("inf"))

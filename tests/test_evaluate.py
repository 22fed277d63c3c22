"""Evaluation harness: metric arithmetic, files, method registry and small end-to-end runs."""

import json
import math
import os

import numpy as np
import pytest

from lrenv.cli import main
from lrenv.evaluate import (aggregate, auc_log_loss, bootstrap_ci, epochs_to_target, evaluate, read_results_csv,
                            resolve_methods, trace_metrics, write_results_csv)
from lrenv.schedules import FixedLR, FixedScale
from lrenv.metrics import Trace

SMALL = dict(m=200, n=50, rank=5)


def hand_trace(loss, target, budget, diverged=False, name="m", seed_index=0):
    loss = np.asarray(loss, dtype=float)
    T = len(loss) - 1
    return Trace(method=name, seed_index=seed_index, instance=1_000_000 + seed_index, target_loss=target, loss=loss,
                 wall=np.linspace(0, 0.1 * T, T + 1), lr_W=np.full(T, 0.5), lr_H=np.full(T, 0.25),
                 bound_W=np.full(T, 1.0), bound_H=np.full(T, 1.0), budget=budget, diverged=diverged,
                 reached_target=bool(np.any(loss <= target)))


def test_metric_arithmetic_on_a_hand_made_curve():
    loss = [100.0, 10.0, 1.0]  # reaches target 1 at epoch 2, then stops (budget 4)
    tr = hand_trace(loss, target=1.0, budget=4)
    row = trace_metrics(tr)
    assert row["epochs_to_target"] == 2 and row["reached_target"]
    assert row["wall_to_target"] == pytest.approx(0.2)
    # log10(loss/100) over epochs 1..4, the last value repeated: (-1 - 2 - 2 - 2) / 4
    assert row["auc_log_loss"] == pytest.approx(-7 / 4)
    assert row["final_loss"] == 1.0 and row["best_loss"] == 1.0
    assert row["mean_scale_W"] == pytest.approx(0.5) and row["mean_scale_H"] == pytest.approx(0.25)
    assert math.isnan(epochs_to_target(np.array([5.0, 4.0]), 1.0))
    assert epochs_to_target(np.array([0.5, 4.0]), 1.0) == 0
    # divergence: non-finite values and the rest of the budget count log10(divergence_factor)
    assert auc_log_loss(np.array([1.0, 0.1, np.inf]), 4, diverged=True, divergence_factor=100) == pytest.approx(
        (-1 + 2 + 2 + 2) / 4)


def test_bootstrap_ci_and_aggregate():
    rng = np.random.default_rng(3)
    x = rng.normal(50, 10, size=30)
    lo, hi = bootstrap_ci(x, seed=1)
    assert lo < x.mean() < hi and hi - lo < 20
    assert bootstrap_ci(x, seed=1) == (lo, hi)  # seeded
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    rows = [trace_metrics(hand_trace([100.0, 10.0, 1.0], 1.0, 4, seed_index=0)),
            trace_metrics(hand_trace([100.0, 1.0], 1.0, 4, seed_index=1)),
            trace_metrics(hand_trace([100.0, 50.0, 40.0, 30.0, 20.0], 1.0, 4, seed_index=2))]
    s = aggregate(rows)["m"]
    assert s["success_rate"] == pytest.approx(2 / 3) and s["epochs_to_target_mean"] == 1.5
    lo, hi = s["epochs_to_target_ci95"]
    assert lo <= 1.5 <= hi


def test_results_csv_round_trip(tmp_path):
    rows = [trace_metrics(hand_trace([100.0, 10.0, 1.0], 1.0, 4)),
            trace_metrics(hand_trace([100.0, np.inf], 1.0, 4, diverged=True, seed_index=1))]
    path = str(tmp_path / "results.csv")
    write_results_csv(path, rows)
    back = read_results_csv(path)
    assert len(back) == 2
    for a, b in zip(rows, back):
        assert set(a) == set(b)
        for k in a:
            if isinstance(a[k], float) and math.isnan(a[k]):
                assert math.isnan(b[k]), k
            else:
                assert a[k] == b[k] and type(a[k]) is type(b[k]), k


def test_unknown_method_suggests_a_close_name():
    with pytest.raises(ValueError, match="Did you mean 'armijo'"):
        resolve_methods("armjio")
    with pytest.raises(ValueError, match="unknown method"):
        resolve_methods(["fixed-grid", "nonsense-xyz"])
    ms = resolve_methods("fixed-lr=0.01,fixed-c=1.3,adam,adam")
    assert [m if isinstance(m, str) else m.name for m in ms] == ["fixed lr=1e-02", "fixed c=1.3", "adam"]


@pytest.mark.parametrize("kw", [dict(seeds=0), dict(seeds=2.5), dict(budget=0), dict(grid=[]), dict(grid=[1e-3, -1])])
def test_invalid_arguments_are_clear_errors(kw):
    with pytest.raises(ValueError):
        evaluate("fixed-grid", problem="small", problem_params=SMALL, save=False, progress=False, verbose=False,
                 **{"seeds": 2, "budget": 5, **kw})


def test_harness_on_small_writes_every_output(tmp_path):
    out = str(tmp_path / "ev")
    r = evaluate(["fixed-c=1.0", "random-bound", "armijo", "sklearn-cd", "adam"], problem="small",
                 problem_params=SMALL, seeds=2, budget=20, out_dir=out, progress=False, verbose=False)
    for f in ("results.csv", "summary.json", "summary.md", "config.json", "loss_curves.png", "lr_history.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert os.listdir(os.path.join(out, "tb"))
    rows = read_results_csv(os.path.join(out, "results.csv"))
    assert len(rows) == 5 * 2 and {r["instance"] for r in rows} == {1_000_000, 1_000_001}
    summary = json.load(open(os.path.join(out, "summary.json")))["methods"]
    assert set(summary) == {"fixed c=1", "random-bound", "armijo", "sklearn-cd", "adam"}
    assert summary["armijo"]["extra_loss_evals_mean"] > 0
    # same start for every method on a seed
    starts = {(r["seed_index"], r["initial_loss"]) for r in rows}
    assert len(starts) == 2
    assert "| armijo |" in r.markdown
    with pytest.raises(ValueError, match="refusing to overwrite"):
        evaluate(["fixed-c=1.0"], problem="small", problem_params=SMALL, seeds=1, budget=5, out_dir=out,
                 progress=False, verbose=False)


def test_sales_reports_heldout_and_skips_sklearn():
    r = evaluate(["fixed-c=1.0", "sklearn-cd"], problem="sales", problem_params=dict(products=200, stores=40),
                 seeds=2, budget=10, save=False, progress=False, verbose=False)
    assert all(np.isfinite(row["heldout_mse"]) for row in r.rows)
    assert "held-out MSE" in r.markdown and any("sklearn-cd" in n for n in r.notes)
    assert {row["method"] for row in r.rows} == {"fixed c=1"}


def test_illcond_levenberg_marquardt_reaches_far_below_sgd():
    r = evaluate(["fixed-c=1.0", "lm"], problem="illcond", seeds=2, budget=100, save=False, progress=False,
                 verbose=False)
    s = r.summary
    assert s["lm"]["success_rate"] == 1.0 and s["lm"]["epochs_to_target_mean"] < 50
    assert s["lm"]["final_loss_median"] < 1e-2 * s["fixed c=1"]["final_loss_median"]


def test_a_method_that_always_diverges_still_has_rows():
    r = evaluate([FixedLR(10.0), FixedScale(1.0)], problem="small", problem_params=SMALL, seeds=2, budget=10,
                 save=False, progress=False, verbose=False)
    rows = [row for row in r.rows if row["method"] == "fixed lr=1e+01"]
    assert len(rows) == 2 and all(row["diverged"] and not row["reached_target"] for row in rows)
    assert r.summary["fixed lr=1e+01"]["diverged_rate"] == 1.0
    assert r.summary["fixed lr=1e+01"]["auc_log_loss_mean"] == pytest.approx(2.0, abs=0.2)


def test_cli_runs_and_rejects_unknown_methods(tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = main(["evaluate", "--problem", "small", "--problem-param", "m=200", "--problem-param", "n=50",
               "--problem-param", "rank=5", "--methods", "fixed-grid,bb", "--grid", "1e-4,1e-3", "--seeds", "1",
               "--budget", "5", "--out", out, "--no-progress", "--no-tensorboard"])
    assert rc == 0
    assert "fixed lr=1e-04" in capsys.readouterr().out
    assert len(read_results_csv(os.path.join(out, "results.csv"))) == 3
    rc = main(["evaluate", "--methods", "polyack", "--seeds", "1", "--budget", "2", "--no-progress"])
    assert rc == 2 and "Did you mean 'polyak'" in capsys.readouterr().err


def test_cli_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "random-walk" in text and "--model" in text and "+-50 %" in text

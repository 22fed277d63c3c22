"""lrenv tune: settings chosen on validation instances, written to YAML, used by evaluate --methods tuned."""

import pytest
import yaml

from lrenv.cli import main
from lrenv.evaluate import evaluate
from lrenv.problems import TEST_SEEDS, VALIDATION_SEEDS
from lrenv.tune import SEARCH_SPACES, make_tuned, run_scores, tune
from lrenv.tuned_files import load_tuned

TINY = dict(problem="small", problem_params=dict(m=60, n=20, rank=3, target_factor=1.1), budget=40)


def test_run_scores_counts_misses_at_twice_the_budget():
    rows = [dict(epochs_to_target=10.0, reached_target=True, best_loss=1.0, target_loss=1.0, diverged=False),
            dict(epochs_to_target=float("nan"), reached_target=False, best_loss=10.0, target_loss=1.0, diverged=False)]
    score, gap = run_scores(rows, budget=50)
    assert score == pytest.approx((10 + 100) / 2)
    assert gap == pytest.approx(0.5)


def test_tune_picks_the_best_validation_setting_and_evaluate_uses_it(tmp_path):
    out = tmp_path / "t.yml"
    doc = tune(**TINY, methods=["fixed-c", "cosine"], seeds=2, out=out, progress=False, verbose=False)
    assert doc["split"] == "validation"
    assert set(doc["methods"]) == {"fixed-c", "cosine"}
    # the winner really is the best of the grid on the validation instances (recomputed here)
    grid = [make_tuned("fixed-c", p) for p in SEARCH_SPACES["fixed-c"][1]]
    res = evaluate(grid, **TINY, seeds=2, split="validation", save=False, progress=False, verbose=False)
    assert {r["instance"] for r in res.rows} <= set(VALIDATION_SEEDS)
    scores = {m: run_scores([r for r in res.rows if r["method"] == m], 40) for m in res.summary}
    best = min(scores, key=scores.get)
    assert best == f"fixed c={doc['methods']['fixed-c']['params']['c']:g} (tuned)"
    assert doc["methods"]["fixed-c"]["score"] == pytest.approx(scores[best][0], abs=1e-3)
    assert doc["methods"]["fixed-c"]["score"] <= doc["methods"]["fixed-c"]["default_score"]
    assert yaml.safe_load(out.read_text()) == doc
    # evaluate --methods tuned reports the tuned schedules on the test split
    ev = evaluate("tuned", **TINY, seeds=2, tuned=str(out), save=False, progress=False, verbose=False)
    assert set(ev.summary) == {best, "cosine (tuned)"}
    assert {r["instance"] for r in ev.rows} <= set(TEST_SEEDS)


def test_tuned_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tuned settings shipped for 'nosuch'"):
        load_tuned("nosuch")
    bad = tmp_path / "bad.yml"
    bad.write_text("methods: [1, 2]\n")
    with pytest.raises(ValueError, match="not a tuned-settings file"):
        load_tuned("small", bad)
    with pytest.raises(ValueError, match="cannot tune \\['fixed-x'\\]"):
        tune(**TINY, methods=["fixed-x"], out=None, verbose=False)


def test_cli_tune_then_evaluate_tuned(tmp_path, capsys):
    out = tmp_path / "t.yml"
    args = ["--problem", "small", "--problem-param", "m=60", "--problem-param", "n=20", "--problem-param", "rank=3",
            "--problem-param", "target_factor=1.1", "--budget", "30"]
    assert main(["tune", *args, "--methods", "fixed-c", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    assert "tuned on 2 validation instances" in capsys.readouterr().out
    assert main(["evaluate", *args, "--methods", "tuned:fixed-c", "--tuned", str(out), "--seeds", "2",
                 "--out", str(tmp_path / "ev"), "--no-progress", "--no-tensorboard"]) == 0
    assert "(tuned)" in capsys.readouterr().out


def test_shipped_adam_settings_include_the_plateau_knobs_and_reach_the_config():
    # the Adam baseline is tuned over lr_rel, patience and factor; the settings used are written to config.json
    doc = load_tuned("small")
    params = doc["methods"]["adam"]["params"]
    assert set(params) == {"lr_rel", "patience", "factor"}
    grid = SEARCH_SPACES["adam"][1]
    assert params in grid and len(grid) == 140
    ev = evaluate("tuned:adam", problem="small", problem_params=dict(m=60, n=20, rank=3), budget=5, seeds=1,
                  save=False, progress=False, verbose=False)
    (adam,) = [m for m in ev.config["methods"] if m["name"] == "adam"]
    assert adam["options"] == params


def test_grid_overrides_replace_one_axis_and_are_recorded(tmp_path, capsys):
    from lrenv.tune import override_grid, parse_grid_overrides
    axes = parse_grid_overrides(["fixed-cwch.c_W=0.3,3", "adam.patience=50"])
    assert axes == {"fixed-cwch": {"c_W": [0.3, 3.0]}, "adam": {"patience": [50]}}
    grid = override_grid(SEARCH_SPACES["fixed-cwch"][1], axes["fixed-cwch"])
    c_H = sorted({g["c_H"] for g in SEARCH_SPACES["fixed-cwch"][1]})
    assert sorted((g["c_W"], g["c_H"]) for g in grid) == sorted((w, h) for w in (0.3, 3.0) for h in c_H)
    for bad, msg in [("adam.lr=1", "adam has no setting 'lr'; its settings: lr_rel"), ("nope.c=1", "unknown baseline"),
                     ("fixed-c.c=x", "'x' is not a number"), ("fixed-c=1", "expected METHOD.SETTING=")]:
        with pytest.raises(ValueError, match=msg):
            parse_grid_overrides([bad])
    with pytest.raises(ValueError, match="not being tuned"):
        tune(**TINY, methods=["fixed-c"], grids={"cosine": {"peak": [0.3]}}, verbose=False)
    # the searched values are the override's (plus the default), and the file says so; the tuned c is one of them
    out = tmp_path / "t.yml"
    args = ["--problem", "small", "--problem-param", "m=60", "--problem-param", "n=20", "--problem-param", "rank=3",
            "--problem-param", "target_factor=1.1", "--budget", "30"]
    assert main(["tune", *args, "--methods", "fixed-c", "--grid", "fixed-c.c=0.05,0.1", "--seeds", "2", "--out",
                 str(out), "--no-progress"]) == 0
    doc = yaml.safe_load(out.read_text())
    assert doc["grid_overrides"] == {"fixed-c": {"c": [0.05, 0.1]}}
    assert doc["methods"]["fixed-c"]["settings_tried"] == 3  # 0.05, 0.1 and the default 1.1
    assert doc["methods"]["fixed-c"]["params"]["c"] in (0.05, 0.1, 1.1)


def test_merge_replaces_the_tuned_entries_keeps_the_others_and_notes_it(tmp_path):
    from lrenv.tune import merge_tuned
    base = tmp_path / "base.yml"
    tune(**TINY, methods=["fixed-c", "cosine"], seeds=2, out=base, progress=False, verbose=False)
    before = yaml.safe_load(base.read_text())
    fresh = tune(**TINY, methods=["fixed-c"], seeds=2, grids={"fixed-c": {"c": [0.6, 0.8]}}, progress=False,
                 verbose=False)
    merged = merge_tuned(fresh, base)
    assert yaml.safe_load(base.read_text()) == merged
    assert merged["methods"]["cosine"] == before["methods"]["cosine"]
    new = merged["methods"]["fixed-c"]
    assert new["params"] == fresh["methods"]["fixed-c"]["params"] and new["retuned"] == fresh["created"]
    assert new["grid_overrides"] == {"c": [0.6, 0.8]}
    assert merged["notes"][-1].startswith("fixed-c retuned on ") and "--grid fixed-c.c=0.6,0.8" in merged["notes"][-1]
    assert f"score {before['methods']['fixed-c']['score']}" in merged["notes"][-1]
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump({**before, "family": "digits"}))
    with pytest.raises(ValueError, match="its family is 'digits'"):
        merge_tuned(fresh, other)
    args = ["--problem", "small", "--problem-param", "m=60", "--problem-param", "n=20", "--problem-param", "rank=3",
            "--problem-param", "target_factor=1.1", "--budget", "40", "--seeds", "2", "--no-progress"]
    assert main(["tune", *args, "--methods", "cosine", "--out", str(tmp_path / "m.yml"), "--merge",
                 str(tmp_path / "missing.yml")]) != 0  # refused before any tuning, with the CLI's error line
    assert not (tmp_path / "m.yml").exists()
    assert main(["tune", *args, "--methods", "cosine", "--out", str(tmp_path / "c.yml"), "--merge", str(base)]) == 0
    assert yaml.safe_load(base.read_text())["methods"]["cosine"]["retuned"]

"""The paper's experiment (scripts/paper_experiment.py, lrenv.paper_experiment) on a tiny problem: the table, the CSV,
the config and the figure are written, with every method present."""
import csv
import importlib.util
import json
import os

import pytest

from lrenv.paper_experiment import FIGURE, TRACES, adapt_budget, load_traces, parse_model_spec, run_paper_experiment
from lrenv.schedules import pretrained

TINY = {"m": 60, "n": 20, "rank": 3}
ARGS = ["--problem-param", "m=60", "--problem-param", "n=20", "--problem-param", "rank=3", "--budget", "20",
        "--seeds", "2", "--measure-epochs", "2", "--no-progress"]
METHODS = ["fixed c=2 (the bound 2/L)", "fixed c=1.1", "random-bound", "armijo", "policy:small-relative"]


def _script():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "paper_experiment.py")
    spec = importlib.util.spec_from_file_location("paper_experiment_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_script_writes_table_csv_config_and_figure(tmp_path):
    out = tmp_path / "paper"
    assert _script().main([*ARGS, "--model", "pretrained:small-relative", "--out", str(out)]) == 0
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["method"] for r in rows}) == sorted(METHODS)
    assert len(rows) == 2 * len(METHODS)  # every method on both instances
    assert {r["instance"] for r in rows} == {rows[0]["instance"], rows[1]["instance"]} and len(
        {r["instance"] for r in rows}) == 2
    summary = (out / "summary.md").read_text()
    table = summary.split("## The harness")[0]
    for m in METHODS:
        assert f"| {m} |" in table
    assert "final loss at 20" in table and "extra loss evals" in table and "ms per epoch" in table
    with open(out / FIGURE, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out / FIGURE) < 200_000
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["budget"] == 20 and cfg["split"] == "test" and cfg["seeds"] == 2
    assert cfg["epoch_cost"]["epoch_wall_s"] > 0 and cfg["fixed_c"] == [2.0, 1.1]
    assert [r["method"] for r in cfg["table"]] == METHODS
    assert any("small-relative: trained with a 200-epoch budget, run with 20" in n for n in cfg["paper_notes"])
    # the bound itself diverges on every instance; Armijo pays its line searches
    by = {r["method"]: r for r in cfg["table"]}
    assert by["fixed c=2 (the bound 2/L)"]["diverged"] == 1.0
    assert by["armijo"]["extra_loss_evals_mean"] > 0
    # the curves behind the figure come back as traces, and redraw
    traces = load_traces(str(out / TRACES))
    assert list(traces) == METHODS and all(len(v) == 2 for v in traces.values())
    assert all(t.diverged for t in traces["fixed c=2 (the bound 2/L)"])
    assert all(len(t.loss) == 21 for t in traces["fixed c=1.1"] if not t.diverged)
    from lrenv.plots import paper_loss_figure
    assert paper_loss_figure(traces).axes[0].get_yscale() == "log"
    # never overwrites a finished experiment
    assert _script().main([*ARGS, "--out", str(out)]) == 2


def test_library_without_output_and_labels():
    exp = run_paper_experiment([], problem_params=TINY, budget=5, seeds=1, fixed_c=(0.5,), out_dir=None,
                               progress=False, measure_epochs=0, verbose=False)
    assert exp.out_dir is None and exp.figure is None and exp.epoch_cost is None
    assert [r["method"] for r in exp.result.rows] == ["fixed c=0.5", "random-bound", "armijo"]
    assert "| fixed c=0.5 |" in exp.table
    assert parse_model_spec("ppo=runs/x/interrupted.zip") == ("ppo", "runs/x/interrupted.zip")
    assert parse_model_spec("runs/a=b/model.zip") == (None, "runs/a=b/model.zip")
    assert parse_model_spec("pretrained:small-relative") == (None, "pretrained:small-relative")


def test_adapt_budget_notes_and_lets_the_policy_run():
    policy = pretrained("small-relative")
    assert adapt_budget(policy, 200) is None
    note = adapt_budget(policy, 1000)
    assert "trained with a 200-epoch budget, run with 1000" in note and "epoch/1000" in note
    policy.task_config["budget"] = 200  # a model that records its budget: the harness would refuse it at 1000
    adapt_budget(policy, 1000)
    assert policy.task_config["budget"] == 1000


def test_bad_fixed_c_is_a_usage_error(tmp_path, capsys):
    assert _script().main(["--fixed-c", "two", "--out", str(tmp_path / "x")]) == 2
    assert "--fixed-c" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _script().main(["--help"])

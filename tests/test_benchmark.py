"""lrenv benchmark: suites, trials on Ray with resume after a killed worker, and the rliable report's numbers."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from lrenv.benchmark import MARKER, expand, load_suite, parse_suite, run_benchmark
from lrenv.benchmark_report import BEST_FIXED, build_report, epochs_value, final_loss_value
from lrenv.evaluate import read_results_csv, write_json, write_results_csv
from lrenv.metrics import RESULT_COLUMNS


# ----------------------------------------------------------------------------- suites
def test_shipped_suites_expand_to_the_trials_they_name():
    smoke = load_suite("smoke")
    trials = expand(smoke)
    kinds = [t.kind for t in trials]
    assert kinds.count("train") == kinds.count("agent") == len(smoke.seeds) * len(smoke.agents) * len(smoke.families)
    assert kinds.count("baseline") == len(smoke.baselines) * len(smoke.families)
    agent = next(t for t in trials if t.kind == "agent")
    assert agent.depends == (f"train/{agent.family}/{agent.method}/s{agent.seed}",)
    assert all(t.gpus == 0 for t in trials)
    gpu = parse_suite({"families": {"small": {}}, "agents": {"ppo": {}}, "baselines": ["cosine"],
                       "train": {"env_device": "cuda"}, "gpus_per_trial": 0.25})
    assert {t.kind: t.gpus for t in expand(gpu)} == {"train": 0.25, "agent": 0.0, "baseline": 0.0}
    core = load_suite("core")
    assert {f.label for f in core.families} == {"small", "medium", "sales", "tutorial", "illcond", "digits"}
    assert len(core.seeds) == 5


def test_suite_errors_name_the_problem():
    base = {"families": {"small": {}}, "baselines": ["fixed-scale"]}
    with pytest.raises(ValueError, match="unknown keys.*'seed'"):
        parse_suite({**base, "seed": 1})
    with pytest.raises(ValueError, match="'baselines' is missing"):
        parse_suite({"families": {"small": {}}})
    with pytest.raises(ValueError, match="override 'n_timesteps' is not key:value"):
        parse_suite({**base, "agents": {"ppo": {"overrides": ["n_timesteps"]}}})
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        parse_suite({**base, "families": {"small": {"budget": 0}}})
    with pytest.raises(ValueError, match="unknown suite 'smok'.*shipped suites are core, core-lite, smoke"):
        load_suite("smok")
    from lrenv.benchmark import SUITES_DIR
    variants = sorted(p.stem for p in SUITES_DIR.glob("variants-*.yml"))  # issue 12's searches: every one loads
    assert len(variants) >= 18
    for name in variants:
        suite = load_suite(name)
        assert len(suite.agents) >= 1 and len(suite.seeds) >= 5 and expand(suite)


# ----------------------------------------------------------------------------- the report on a toy table
def _rows(method, ett, budget, finals=None, diverged=()):
    rows = []
    for i, e in enumerate(ett):
        row = {c: 0.0 for c in RESULT_COLUMNS}
        reached = e is not None
        final = (finals or [1.0] * len(ett))[i]
        row.update(method=method, seed_index=i, instance=1_000_000 + i, epochs=e if reached else budget,
                   reached_target=reached, diverged=i in diverged, epochs_to_target=float(e) if reached else math.nan,
                   final_loss=math.inf if i in diverged else final, initial_loss=10.0, target_loss=0.5,
                   extra_loss_evals=0)
        rows.append(row)
    return rows


def _write_trial(out: Path, rec: dict, rows: list[dict], budget: int) -> dict:
    d = out / rec["path"] / "eval"
    d.mkdir(parents=True)
    write_results_csv(str(d / "results.csv"), rows)
    write_json(str(d / "config.json"), {"budget": budget})
    return {**rec, "status": "done", "wall_s": 1.0, "cpu_s": 1.0}


def test_report_numbers_match_a_hand_computation(tmp_path):
    """IQM and probability of improvement on a toy table, computed by hand below.

    budget 10, penalty 2 (a miss counts 20 epochs). Fixed c=1: 4, 5, 8, miss -> mean 9.25; fixed c=0.5: 8, 10, 10,
    10 -> 9.5, so c=1 is the normaliser (4, 5, 8, 20). cosine 2, 5, 4, 10 -> scores .5, 1, .5, .5. ppo seed 0: 2, 10,
    8, 10 -> .5, 2, 1, .5; seed 1: 4, miss, 4, 5 -> 1, 4, .5, .25. The IQM of ppo's 8 scores drops 2 at each end of
    (.25 .5 .5 .5 1 1 2 4): (.5 + .5 + 1 + 1) / 4 = 0.75. P(ppo < cosine) per instance (ties 1/2): .25, 0, .25, .75 ->
    0.3125; P(ppo < best fixed = 1): .75, 0, .75, 1 -> 0.625."""
    budget = 10
    suite = {"name": "toy", "penalty": 2.0, "families": [{"label": "toy"}], "agents": [{"name": "ppo"}],
             "bootstrap_reps": 500}
    recs = []
    base = lambda m: {"id": f"baseline/toy/{m}", "path": f"baseline/toy/{m}", "kind": "baseline",  # noqa: E731
                      "family": "toy", "method": m, "seed": None}
    recs.append(_write_trial(tmp_path, base("fixed-scale"), _rows("fixed c=1", [4, 5, 8, None], budget,
                                                                  finals=[2.0, 2.0, 4.0, 8.0])
                             + _rows("fixed c=0.5", [8, 10, 10, 10], budget), budget))
    recs.append(_write_trial(tmp_path, base("cosine"), _rows("cosine", [2, 5, 4, 10], budget,
                                                             finals=[1.0, 1.0, 1.0, 1.0], diverged=(3,)), budget))
    for seed, ett in ((0, [2, 10, 8, 10]), (1, [4, None, 4, 5])):
        rec = {"id": f"agent/toy/ppo/s{seed}", "path": f"agent/toy/ppo/s{seed}", "kind": "agent", "family": "toy",
               "method": "ppo", "seed": seed}
        recs.append(_write_trial(tmp_path, rec, _rows("policy:ppo", ett, budget), budget))
    rep = build_report(tmp_path, suite, recs, figures=False, tensorboard=False)

    assert rep["normaliser"]["toy"]["epochs"] == "fixed c=1"
    ep = rep["scores"]["epochs"]["overall"]
    assert ep["ppo"]["iqm"] == pytest.approx(0.75)
    assert ep["ppo"]["runs"] == 2 and ep["ppo"]["tasks"] == 4
    lo, hi = ep["ppo"]["ci95"]
    assert lo <= 0.75 <= hi and lo < hi  # two training seeds: a real interval
    assert ep[BEST_FIXED]["iqm"] == 1.0
    # cosine's scores .5 1 .5 .5: the IQM of 4 values keeps the middle 2: (.5 + .5) / 2
    assert ep["cosine"]["iqm"] == pytest.approx(0.5) and ep["cosine"]["ci95"] == [pytest.approx(0.5)] * 2
    # fixed c=0.5 against c=1: 8/4, 10/5, 10/8, 10/20 -> sorted .5 1.25 2 2 -> IQM (1.25 + 2) / 2
    assert ep["fixed c=0.5"]["iqm"] == pytest.approx(1.625)
    poi = rep["probability_of_improvement"]
    assert poi["ppo vs cosine"]["overall"]["poi"] == pytest.approx(0.3125)
    assert poi[f"ppo vs {BEST_FIXED}"]["overall"]["poi"] == pytest.approx(0.625)
    lo, hi = poi["ppo vs cosine"]["overall"]["ci95"]
    assert lo <= 0.3125 <= hi
    # final-loss score: cosine's diverged instance counts 100 x its initial loss (10) against c=1's final 8
    fl = rep["scores"]["final_loss"]["overall"]
    assert rep["normaliser"]["toy"]["final_loss"] == "fixed c=0.5"  # finals 1,1,1,1 beat 2,2,4,8 in geometric mean
    assert fl["cosine"]["iqm"] == pytest.approx(1.0)  # 1, 1, 1, 1000 -> middle two are 1
    # PoI on the final loss (the score of a family whose target is out of reach): ppo ends at 1 everywhere, cosine at
    # 1, 1, 1 and diverged (1000): ties 1/2, then a win -> (3 x .5 + 1) / 4
    assert rep["probability_of_improvement_final_loss"]["ppo vs cosine"]["toy"] == pytest.approx(0.625)
    assert rep["success_rate"]["ppo"] == pytest.approx(7 / 8)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["scores"]["epochs"]["overall"]["ppo"]["iqm"] == pytest.approx(0.75)
    assert "| ppo | 2 | 0.750 [" in (tmp_path / "report.md").read_text()
    # per instance against the baseline ppo is least often ahead of (cosine, 0.3125): ppo's scores per instance
    # (.5, 1), (2, 4), (1, .5), (.5, .25) against cosine's .5, 1, .5, .5; the PoI column averages to the overall one
    pt = rep["per_task"]["ppo"]
    assert pt["baseline"] == "cosine"
    assert [t["poi"] for t in pt["tasks"]] == pytest.approx([0.25, 0.0, 0.25, 0.75])
    assert [t["agent_median"] for t in pt["tasks"]] == pytest.approx([0.75, 3.0, 0.75, 0.375])
    assert [(t["agent_min"], t["agent_max"]) for t in pt["tasks"]][1] == pytest.approx((2.0, 4.0))
    assert [t["baseline"] for t in pt["tasks"]] == pytest.approx([0.5, 1.0, 0.5, 0.5])
    assert "| toy | 1 | 3.000 [2.000, 4.000] | 1.000 | 0.00 |" in (tmp_path / "report.md").read_text()


def test_score_rules():
    row = {"epochs_to_target": 0.0, "reached_target": True, "final_loss": 3.0, "diverged": False, "initial_loss": 5.0}
    assert epochs_value(row, 50, 2.0) == 1.0  # a start below the target counts one epoch, not 0/0
    assert epochs_value({**row, "reached_target": False, "epochs_to_target": math.nan}, 50, 2.0) == 100.0
    # a line search's extra loss evaluations count as epochs (issue 12: "its extra evaluations counted as epochs")
    assert epochs_value({**row, "epochs_to_target": 20.0, "extra_loss_evals": 35}, 50, 2.0) == 55.0
    assert epochs_value({**row, "reached_target": False, "epochs_to_target": math.nan, "extra_loss_evals": 35},
                        50, 2.0) == 100.0
    assert final_loss_value({**row, "diverged": True, "final_loss": math.nan}) == 500.0


# ----------------------------------------------------------------------------- running suites
TINY = {"description": "two tiny trials per kind", "test_instances": 2, "seeds": [0], "penalty": 2.0,
        "families": {"toy": {"problem": "small", "params": {"m": 40, "n": 12, "rank": 2, "target_factor": 1.1},
                             "budget": 30}},
        "agents": {"ppo": {"overrides": ["n_timesteps:256", "n_envs:2", "n_steps:64", "batch_size:64", "n_epochs:1"]}},
        "train": {"eval_freq": 0, "checkpoint_freq": 100000},
        "baselines": ["fixed-c=0.5", "fixed-c=1", "cosine"], "bootstrap_reps": 100}


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from lrenv.benchmark import init_ray
    started = init_ray(num_cpus=2)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
    assert not ray.is_initialized()


def test_killed_worker_then_rerun_completes_and_leaves_other_trials_untouched(tmp_path, ray_local):
    suite_file = tmp_path / "tiny.yml"
    suite_file.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "out"
    # the training trial's worker process dies (os._exit) after training, before its completion marker
    first = run_benchmark(suite_file, out, progress=False, faults={"train/toy/ppo/s0": "exit"}, log=lambda s: None)
    status = {t["id"]: t for t in first.trials}
    assert status["train/toy/ppo/s0"]["status"] == "failed"
    error = status["train/toy/ppo/s0"]["error"].lower()
    assert "died" in error or "crash" in error  # Ray's WorkerCrashedError, reported as the trial's error
    assert status["agent/toy/ppo/s0"]["status"] == "blocked"
    baselines = [t for t in first.trials if t["kind"] == "baseline"]
    assert all(t["status"] == "done" for t in baselines) and len(baselines) == 3
    assert (out / "train/toy/ppo/s0/run/model.zip").exists()  # the work was done: only the marker is missing
    assert not (out / "train/toy/ppo/s0" / MARKER).exists()
    assert first.report is not None and first.report["complete"] is False
    assert "did not finish" in (out / "report.md").read_text()
    marker = json.loads((out / "baseline/toy/cosine" / MARKER).read_text())
    assert marker["torch_threads"] == 1 and marker["omp_num_threads"] == "1"
    assert marker["lrenv"] == os.path.dirname(__import__("lrenv").__file__)  # workers run this checkout's code
    before = {t["path"]: _snapshot(out / t["path"]) for t in baselines}

    second = run_benchmark(suite_file, out, progress=False, log=lambda s: None)
    assert all(t["status"] == "done" for t in second.trials)
    assert {t["id"] for t in second.trials if not t["reused"]} == {"train/toy/ppo/s0", "agent/toy/ppo/s0"}
    for path, snap in before.items():
        assert _snapshot(out / path) == snap, f"{path} was rewritten"
    assert not (out / "train/toy/ppo/s0/failed.json").exists()
    assert second.report["complete"] is True
    assert set(second.report["scores"]["epochs"]["overall"]) == {"ppo", BEST_FIXED, "cosine", "fixed c=0.5",
                                                                 "fixed c=1"}


def test_local_mode_reports_a_failing_trial_and_resumes(tmp_path, capsys):
    doc = {**TINY, "agents": {}, "baselines": ["fixed-c=1", "cosine"]}
    out = tmp_path / "out"
    first = run_benchmark(parse_suite(doc, name="tiny"), out, local=True, progress=False,
                          faults={"baseline/toy/cosine": "raise"})
    printed = capsys.readouterr().out
    assert "FAILED   baseline/toy/cosine: RuntimeError: fault injected into trial baseline/toy/cosine" in printed
    assert "done     baseline/toy/fixed-c=1" in printed
    assert [t["id"] for t in first.failed] == ["baseline/toy/cosine"]
    assert json.loads((out / "baseline/toy/cosine/failed.json").read_text())["error"].startswith("RuntimeError")
    second = run_benchmark(parse_suite(doc, name="tiny"), out, local=True, progress=False)
    assert not second.failed and [t["id"] for t in second.trials if not t["reused"]] == ["baseline/toy/cosine"]
    # a finished trial is never reused under a different configuration
    changed = {**doc, "families": {"toy": {**doc["families"]["toy"], "budget": 31}}}
    with pytest.raises(ValueError, match="finished with a different configuration"):
        run_benchmark(parse_suite(changed, name="tiny"), out, local=True, progress=False)


def test_smoke_suite_runs_on_ray_and_its_report_matches_its_trials(tmp_path, ray_local):
    """`lrenv benchmark smoke` end to end (CLI), then the report's IQM and probability of improvement recomputed by
    hand from the trials' own results.csv files."""
    from lrenv.cli import main
    out = tmp_path / "smoke"
    assert main(["benchmark", "smoke", "--out", str(out), "--no-progress"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["suite"] == "smoke"
    for name in ("performance_profile.png", "iqm_per_family.png", "loss_curves_small.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    mux = EventMultiplexer().AddRunsFromDirectory(str(out / "tb"))
    mux.Reload()
    assert len([r for r in mux.Runs() if r]) >= 8  # one HParams run per trial

    suite = load_suite("smoke")
    budget, penalty = suite.families[0].budget, suite.penalty
    def ett(r):  # noqa: E306
        return max(r["epochs_to_target"] if r["reached_target"] else penalty * budget, 1.0)
    fixed = read_results_csv(str(out / "baseline/small/fixed-scale/eval/results.csv"))
    by = {}
    for r in fixed:
        by.setdefault(r["method"], []).append(r)
    best = min(by, key=lambda m: np.mean([ett(r) for r in by[m]]))
    assert rep["normaliser"]["small"]["epochs"] == best
    norm = {r["seed_index"]: ett(r) for r in by[best]}
    scores = np.array([[ett(r) / norm[r["seed_index"]]
                        for r in read_results_csv(str(out / f"agent/small/ppo/s{s}/eval/results.csv"))]
                       for s in suite.seeds])
    flat = np.sort(scores.ravel())
    k = len(flat) // 4
    assert rep["scores"]["epochs"]["overall"]["ppo"]["iqm"] == pytest.approx(flat[k:len(flat) - k].mean())
    cosine = {r["seed_index"]: ett(r) / norm[r["seed_index"]]
              for r in read_results_csv(str(out / "baseline/small/cosine/eval/results.csv"))}
    per_task = [np.mean([1.0 if a < cosine[j] else 0.5 if a == cosine[j] else 0.0 for a in scores[:, j]])
                for j in range(scores.shape[1])]
    assert rep["probability_of_improvement"]["ppo vs cosine"]["overall"]["poi"] == pytest.approx(np.mean(per_task))


# ----------------------------------------------------------------------------- agents trained on a problem suite
def _suite_file(tmp_path: Path) -> Path:
    """A two-family training suite of tiny problems (small and tutorial)."""
    path = tmp_path / "train-suite.yml"
    path.write_text(yaml.safe_dump({"name": "two", "entries": [
        {"problem": "small", "problem_params": {"m": 40, "n": 12, "rank": 2, "target_factor": 1.1, "budget": 12}},
        {"problem": "tutorial", "problem_params": {"budget": 12}}]}))
    return path


RELATIVE_ENV = {"action_mode": "relative", "obs_features": ["loss", "epoch", "grad_norm", "lr_rel", "loss_slope"],
                "reward": {"kind": "progress"}}


def test_agents_trained_on_a_suite_expand_to_shared_and_leave_one_out_trainings(tmp_path):
    train_on = str(_suite_file(tmp_path))
    doc = {"families": {"toy": {"problem": "small", "params": {"m": 40, "n": 12, "rank": 2}},
                        "tut": {"problem": "tutorial"}, "ill": {"problem": "illcond"}},
           "seeds": [0, 1], "baselines": ["cosine"],
           "agents": {"gen": {"train_on": train_on, "env_kwargs": RELATIVE_ENV},
                      "lofo": {"train_on": train_on, "leave_out": True, "env_kwargs": RELATIVE_ENV},
                      "own": {"families": ["tut"]}}}
    trials = {t.id: t for t in expand(parse_suite(doc))}
    train = sorted(i for i, t in trials.items() if t.kind == "train")
    assert train == ["train/suite-train-suite/gen/s0", "train/suite-train-suite/gen/s1",
                     # illcond is not in the training suite: it is scored by the whole suite's training
                     "train/suite-train-suite/lofo/s0", "train/suite-train-suite/lofo/s1",
                     "train/toy/lofo/s0", "train/toy/lofo/s1", "train/tut/lofo/s0", "train/tut/lofo/s1",
                     "train/tut/own/s0", "train/tut/own/s1"]
    assert trials["train/toy/lofo/s0"].spec["env_kwargs"]["exclude"] == ["small"]
    doc["agents"]["lofo"]["env_kwargs"] = {**RELATIVE_ENV, "exclude": "illcond"}  # one name as a string: kept whole
    assert {t.id: t for t in expand(parse_suite(doc))}["train/toy/lofo/s0"].spec["env_kwargs"]["exclude"] == [
        "illcond", "small"]
    assert trials["train/tut/lofo/s1"].spec["env_kwargs"]["exclude"] == ["tutorial"]
    assert "exclude" not in trials["train/suite-train-suite/lofo/s0"].spec["env_kwargs"]
    assert trials["agent/ill/lofo/s0"].depends == ("train/suite-train-suite/lofo/s0",)
    assert trials["train/suite-train-suite/gen/s0"].spec["problem"] == train_on
    # the shared training serves every family; the agent scored per family
    for fam in ("toy", "tut", "ill"):
        assert trials[f"agent/{fam}/gen/s1"].depends == ("train/suite-train-suite/gen/s1",)
    assert trials["agent/tut/lofo/s0"].depends == ("train/tut/lofo/s0",)
    assert {i for i in trials if i.startswith("agent/") and "/own/" in i} == {"agent/tut/own/s0", "agent/tut/own/s1"}


def test_agent_scope_errors_name_the_problem(tmp_path):
    base = {"families": {"toy": {"problem": "small"}}, "baselines": ["cosine"]}
    with pytest.raises(ValueError, match=r"agent 'a': families \['digits'\] are not in the suite \(its families: toy\)"):
        parse_suite({**base, "agents": {"a": {"families": ["digits"]}}})
    with pytest.raises(ValueError, match="agent 'a': 'leave_out' needs 'train_on'"):
        parse_suite({**base, "agents": {"a": {"leave_out": True}}})
    with pytest.raises(ValueError, match="agent 'a': 'train_on' is a problem suite.*got 'small'"):
        parse_suite({**base, "agents": {"a": {"train_on": "small"}}})
    with pytest.raises(ValueError, match="agent 'a': train_on 'suite:nope'"):
        parse_suite({**base, "agents": {"a": {"train_on": "suite:nope"}}})
    one = tmp_path / "one.yml"
    one.write_text(yaml.safe_dump({"entries": ["small"]}))
    with pytest.raises(ValueError, match="leaving 'small' out of .* leaves nothing to train on"):
        expand(parse_suite({**base, "agents": {"a": {"train_on": str(one), "leave_out": True}}}))


def test_leave_one_family_out_benchmark_runs_end_to_end(tmp_path):
    """Train on a suite without the tested family, score on it, report: the policy never saw that family."""
    train_on = str(_suite_file(tmp_path))
    ppo = ["n_timesteps:128", "n_envs:2", "n_steps:64", "batch_size:64", "n_epochs:1"]
    doc = {**TINY, "families": {"toy": TINY["families"]["toy"], "tut": {"problem": "tutorial", "budget": 12}},
           "agents": {"lofo": {"train_on": train_on, "leave_out": True, "overrides": ppo, "env_kwargs": RELATIVE_ENV}},
           "baselines": ["fixed-c=1", "cosine"]}
    result = run_benchmark(parse_suite(doc, name="lofo"), tmp_path / "out", local=True, progress=False)
    assert not result.failed, result.failed
    for fam, left_out in (("toy", "small"), ("tut", "tutorial")):
        config = json.loads(next((tmp_path / "out" / f"train/{fam}/lofo/s0/run").rglob("config.json")).read_text())
        assert [e["problem"] for e in config["suite"]["entries"]] == [p for p in ("small", "tutorial") if p != left_out]
        assert config["suite"]["excluded"] == [left_out]
    assert set(result.report["scores"]["epochs"]["per_family"]["tut"]) >= {"lofo", BEST_FIXED, "cosine"}


def test_report_prints_tiny_and_huge_ratios_with_significant_digits():
    from lrenv.benchmark_report import _fmt_ci
    assert _fmt_ci({"iqm": 5.427e-05, "ci95": [1.1e-05, 0.00119]}) == "5.43e-05 [1.1e-05, 0.00119]"
    assert _fmt_ci({"iqm": 0.869, "ci95": [0.8631, 2675488.9]}) == "0.869 [0.863, 2.68e+06]"
    assert _fmt_ci({"iqm": float("nan"), "ci95": [0, 0]}) == "–"


def test_agent_model_best_scores_the_checkpoint_chosen_on_validation(tmp_path):
    """``model: best`` evaluates the training's best_model.zip (chosen on validation instances), ``final`` (the
    default) its model.zip; the setting is checked and only a non-default one enters the trial's configuration."""
    ppo = ["n_timesteps:256", "n_envs:2", "n_steps:64", "batch_size:64", "n_epochs:1"]
    doc = {**TINY, "agents": {"ppo": {"overrides": ppo, "model": "best"}, "last": {"overrides": ppo}},
           "train": {"eval_freq": 128, "eval_episodes": 2, "checkpoint_freq": 100000}, "baselines": ["fixed-c=1"]}
    trials = {t.id: t for t in expand(parse_suite(doc))}
    assert trials["agent/toy/ppo/s0"].spec["model"] == "best" and "model" not in trials["agent/toy/last/s0"].spec
    result = run_benchmark(parse_suite(doc, name="best"), tmp_path / "out", local=True, progress=False)
    assert not result.failed, result.failed
    for agent, file in (("ppo", "best_model.zip"), ("last", "model.zip")):
        config = json.loads((tmp_path / "out" / f"agent/toy/{agent}/s0/eval/config.json").read_text())
        sources = [m.get("source") for m in config["methods"] if isinstance(m, dict) and m.get("source")]
        assert sources and all(os.path.basename(s) == file for s in sources), sources
    with pytest.raises(ValueError, match="'model' is final or best"):
        parse_suite({**doc, "agents": {"ppo": {"model": "last"}}})


def test_bootstrap_cis_are_reproducible_and_per_method():
    """The same scores and seed give the same CIs (rliable draws its indices from numpy's global generator, which the
    report seeds per call), a method's CI does not depend on the other methods in the report, and the caller's global
    generator state is left as it was."""
    from lrenv.benchmark_report import iqm_with_ci, probability_of_improvement
    rng = np.random.default_rng(3)
    a, b = rng.random((5, 10)), rng.random((5, 10)) + 0.2
    np.random.seed(7)
    before = np.random.random()
    np.random.seed(7)
    one = iqm_with_ci({"a": a, "b": b}, reps=200)
    assert np.random.random() == before  # global state untouched
    assert iqm_with_ci({"a": a, "b": b}, reps=200) == one
    assert iqm_with_ci({"b": b, "c": a[::-1]}, reps=200)["b"] == one["b"]
    assert iqm_with_ci({"a": a}, reps=200)["a"] == one["a"]
    lo, hi = one["a"]["ci95"]
    assert lo < one["a"]["iqm"] < hi
    assert probability_of_improvement(a, b, reps=200) == probability_of_improvement(a, b, reps=200)
    from lrenv.benchmark_report import performance_profiles
    (p1, c1), (p2, c2) = (performance_profiles({"a": a}, reps=100) for _ in range(2))
    np.testing.assert_array_equal(c1["a"], c2["a"])

"""Batched evaluation gives the one-at-a-time results: the schedules stepped together in one engine (a slot whose
run ends takes the next run, frozen slots are not computed, the line searches ask a per-slot oracle) and the torch
optimizers run together with batched gradients and one optimizer per instance."""

import importlib.util

import numpy as np
import torch
import pytest

from lrenv.batch_eval import run_batched
from lrenv.evaluate import evaluate, resolve_methods, run_schedule
from lrenv.solvers import TORCH_OPTIMIZERS, run_solver, run_solvers

# 205 rows in 10 minibatches: the last one is short (padding rows); target_factor 1.5: some runs reach it in 40 epochs
SMALL = dict(problem="small", problem_params=dict(m=205, n=40, rank=5, target_factor=1.5), budget=40)
SCHEDULES = "fixed-grid,fixed-scale,random-bound,random-walk,cosine,cosine-pf,two-phase,armijo,polyak,polyak-f0,bb"
INSTALLED = [k for k, v in TORCH_OPTIMIZERS.items() if v.package is None or importlib.util.find_spec(v.package)]
OUTCOME = ("method", "instance", "reached_target", "diverged", "epochs_to_target", "epochs", "extra_loss_evals")


def both_paths(methods, seeds=3, **kw):
    common = dict(seeds=seeds, save=False, progress=False, verbose=False, **{**SMALL, **kw})
    return evaluate(methods, batched=False, **common), evaluate(methods, batched=True, **common)


def assert_same_outcomes(one, batched, rtol=1e-6):
    assert len(one.rows) == len(batched.rows) > 0
    for a, b in zip(one.rows, batched.rows):
        assert [a[k] for k in OUTCOME] == pytest.approx([b[k] for k in OUTCOME], nan_ok=True), a["method"]
        if np.isfinite(a["final_loss"]):
            assert b["final_loss"] == pytest.approx(a["final_loss"], rel=rtol), a["method"]
        else:
            assert not np.isfinite(b["final_loss"]), a["method"]


def test_batched_schedules_match_one_at_a_time():
    one, batched = both_paths(SCHEDULES, dtype="float64")
    assert_same_outcomes(one, batched)
    reached = {r["method"] for r in batched.rows if r["reached_target"]}
    diverged = {r["method"] for r in batched.rows if r["diverged"]}
    assert {"armijo", "bb", "two-phase"} <= reached and "fixed lr=1e+01" in diverged  # both kinds of ending covered
    for name in ("armijo", "polyak", "bb"):  # the line searches ran in the batched engine, not one at a time
        assert not np.allclose(np.diff([t.wall[-1] for t in batched.traces[name]]), 0)
    assert batched.summary["armijo"]["extra_loss_evals_mean"] == one.summary["armijo"]["extra_loss_evals_mean"] > 0


def test_runs_refill_slots_and_frozen_slots_keep_cached_masked_bounds():
    """More runs than slots on a masked family (cached bounds): every slot takes the next run when its own ends, and
    the slots still running when others are frozen keep the single env's bounds."""
    kw = {"problem": "sales", "problem_params": dict(products=300, stores=100), "budget": 30}
    lengths = set()
    for methods, max_batch in (("fixed-c=0.5,fixed-c=3,cosine,random-walk", 5), ("armijo", 2)):
        methods = resolve_methods(methods)  # (the gradient-free schedules share an env without gradient statistics)
        runs = [m for m in methods for _ in range(3)]
        instances = [1_000_000 + i for i in range(3)] * len(methods)
        batched = run_batched(runs, instances, kw, max_batch=max_batch)
        for m, tr in zip(runs, batched):
            ref = run_schedule(m, kw, tr.instance - 1_000_000)
            assert (tr.method, tr.diverged, tr.reached_target, len(tr.loss)) == (ref.method, ref.diverged,
                                                                              ref.reached_target, len(ref.loss))
            np.testing.assert_allclose(tr.loss, ref.loss, rtol=1e-5)
            np.testing.assert_allclose(tr.bound_W, ref.bound_W, rtol=1e-5)
            assert tr.extra_loss_evals == ref.extra_loss_evals
            lengths.add(len(tr.loss))
    assert len(lengths) > 1  # runs of different lengths: slots were refilled while others ran


def test_batched_torch_optimizers_match_one_at_a_time():
    if len(INSTALLED) == 1:
        pytest.skip("only adam: the optional optimizers need lrenv[baselines] (checked with adam alone below)")
    one, batched = both_paths(INSTALLED)
    assert_same_outcomes(one, batched)
    assert any(r["reached_target"] for r in batched.rows) and any(r["diverged"] for r in batched.rows)
    for name in INSTALLED:
        for a, b in zip(one.traces[name], batched.traces[name]):
            np.testing.assert_allclose(b.loss, a.loss, rtol=1e-9)
            np.testing.assert_allclose(b.lr_W, a.lr_W, rtol=1e-9)


@pytest.mark.parametrize("problem, params", [("tutorial", {}), ("sales", dict(products=300, stores=100))])
def test_batched_adam_on_masked_regularised_and_pinned_families(problem, params):
    """tutorial: masked, regularised, signed, bias components pinned; sales: masked and non-negative."""
    kw = {"problem": problem, "problem_params": params, "budget": 30}
    names = ["adam"] + [n for n in ("schedulefree-sgd", "prodigy") if n in INSTALLED]
    for name in names:
        together = run_solvers(name, kw, [0, 1, 2])
        for i, tr in enumerate(together):
            ref = run_solver(name, kw, i)
            assert (tr.reached_target, tr.diverged, len(tr.loss)) == (ref.reached_target, ref.diverged, len(ref.loss))
            np.testing.assert_allclose(tr.loss, ref.loss, rtol=1e-9)
            np.testing.assert_allclose(tr.heldout_mse, ref.heldout_mse, rtol=1e-9)


def test_run_solvers_chunks_and_checks_its_arguments():
    kw = dict(SMALL, budget=5)
    chunked = run_solvers("adam", kw, [0, 1, 2], max_batch=2)
    whole = run_solvers("adam", kw, [0, 1, 2])
    assert [t.instance for t in chunked] == [1_000_000, 1_000_001, 1_000_002]
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    with pytest.raises(ValueError, match="max_batch"):
        run_solvers("adam", kw, [0], max_batch=0)
    with pytest.raises(ValueError, match="unknown solver"):
        run_solvers("adamw", kw, [0])


RULES = [("adam", {"lr_rel": 0.3, "patience": 2})] + [(n, {}) for n in ("dog", "ldog", "schedulefree-sgd") if n in INSTALLED]


@pytest.mark.parametrize("name, options", RULES, ids=[n for n, _ in RULES])
@pytest.mark.parametrize("problem, params, budget", [("small", SMALL["problem_params"], 60), ("tutorial", {}, 40),
                                                     ("sales", dict(products=300, stores=100), 40)])
def test_batched_rules_are_the_package_optimizers_per_instance(monkeypatch, name, options, problem, params, budget):
    """The batched updates (all instances in one step) against one package optimizer per instance (torch.optim.Adam,
    dog's DoG/LDoG): the same trajectories and lr histories to rounding, with instances stopping at different epochs
    (frozen slots), Adam's ReduceLROnPlateau lowering each instance's lr on its own, DoG's per-instance distance
    and gradient sums; masked, regularised and pinned families too."""
    import lrenv.solvers as solvers
    kw = {"problem": problem, "problem_params": params, "budget": budget}
    fast = run_solvers(name, kw, [0, 1, 2, 3], options=options)
    monkeypatch.setattr(solvers, "BATCHED_RULES", False)
    ref = run_solvers(name, kw, [0, 1, 2, 3], options=options)
    for a, b in zip(fast, ref):
        assert (a.reached_target, a.diverged, len(a.loss)) == (b.reached_target, b.diverged, len(b.loss))
        np.testing.assert_allclose(a.loss, b.loss, rtol=1e-10)
        np.testing.assert_allclose(a.lr_W, b.lr_W, rtol=1e-10)
    if problem == "small" and name == "adam":
        assert len({len(t.loss) for t in fast}) > 1  # instances stopped at different epochs
        assert any(len(set(t.lr_W)) > 1 for t in fast)  # some lr was lowered on a plateau


def test_adam_options_outside_the_batched_rule_run_torch_adam(monkeypatch):
    import lrenv.solvers as solvers
    kw = {**SMALL, "budget": 15}
    made = []
    real = torch.optim.Adam

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(k)
            super().__init__(*a, **k)
    monkeypatch.setattr(torch.optim, "Adam", Counting)
    calls = []
    monkeypatch.setattr(solvers._BatchedAdam, "step", lambda self, *a: calls.append(1))
    run_solvers("adam", kw, [0, 1], options={"weight_decay": 0.1})
    assert not calls and made and all(k.get("weight_decay") == 0.1 for k in made)

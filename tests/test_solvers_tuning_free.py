"""Solvers users would pick instead of a schedule: tuning-free optimizers (optional packages), HALS and
masked ALS in the harness, the Polyak f* estimate and Levenberg-Marquardt's capped damping."""

import importlib.util
import warnings

import numpy as np
import pytest

from lrenv.env import NMFEnv
from lrenv.evaluate import evaluate, resolve_methods, run_schedule
from lrenv.problems import EVAL_SEEDS, make_family, reset_seed
from lrenv.reference import hals, masked_als
from lrenv.schedules import Polyak
from lrenv import solvers
from lrenv.solvers import TORCH_OPTIMIZERS, SolverUnavailable, applicability, run_solver

SMALL = {"problem": "small", "problem_params": dict(m=120, n=30, rank=4, target_factor=0.5), "budget": 25}
SALES = {"problem": "sales", "problem_params": dict(products=300, stores=100), "budget": 40}
OPTIONAL = [k for k, v in TORCH_OPTIMIZERS.items() if v.package is not None]


@pytest.mark.parametrize("name", OPTIONAL)
def test_tuning_free_optimizer_descends_and_stays_non_negative(name, monkeypatch):
    pytest.importorskip(TORCH_OPTIMIZERS[name].package)
    kept = {}
    real = solvers._torch_opt

    def spy(probs, recs, rngs, opt_name, **kw):
        out = real(probs, recs, rngs, opt_name, **kw)
        kept.update(W=out[0][0], H=out[0][1], prob=probs[0])
        return out

    monkeypatch.setattr(solvers, "_torch_opt", spy)
    tr = run_solver(name, SMALL, 0)
    assert len(tr.loss) == 26 and np.all(np.isfinite(tr.loss)) and np.all(np.isfinite(tr.lr_W))
    assert tr.loss.min() < 0.9 * tr.loss[0], f"{name} should make progress in 25 epochs"
    W, H, prob = kept["W"], kept["H"], kept["prob"]
    assert W.min() >= 0 and H.min() >= 0
    # the recorded loss is the loss of the returned factors (for schedule-free: the averaged iterate x)
    assert tr.loss[-1] == pytest.approx(prob.loss(W, H), rel=1e-12)


def test_schedulefree_projects_both_sequences():
    sf = pytest.importorskip("schedulefree")
    import torch
    W = torch.tensor([[1.0, -0.5]], dtype=torch.float64, requires_grad=True)
    opt = sf.SGDScheduleFree([W], lr=1.0)
    opt.train()
    W.grad = torch.tensor([[3.0, 3.0]], dtype=torch.float64)
    opt.step()
    # what _torch_opt's projection does: x and z onto >= 0, then y rebuilt from them
    opt.eval()
    W.data.clamp_(min=0)
    opt.state[W]["z"].clamp_(min=0)
    x = W.detach().clone()
    opt.train()
    z = opt.state[W]["z"]
    beta = opt.param_groups[0]["momentum"]
    assert (x >= 0).all() and (z >= 0).all()
    torch.testing.assert_close(W.detach(), (1 - beta) * z + beta * x)


def test_a_missing_package_is_a_one_line_skip(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyopt" else real(n, *a))
    env = NMFEnv(instances="eval", **SMALL)
    reason = applicability("prodigy", env)
    assert reason is not None and "prodigyopt" in reason and 'lrenv[baselines]' in reason and "\n" not in reason
    with pytest.raises(SolverUnavailable, match="prodigyopt"):
        run_solver("prodigy", SMALL, 0, env=env)
    r = evaluate(["prodigy", "fixed-c=1"], problem="small", problem_params=SMALL["problem_params"], seeds=1,
                 budget=3, save=False, progress=False, verbose=False)
    assert {row["method"] for row in r.rows} == {"fixed c=1"}
    assert any("prodigy" in n and "pip install" in n for n in r.notes)


def test_registry_names_every_new_method():
    names = [m for m in resolve_methods("all") if isinstance(m, str)]
    for name in ("hals", "als-masked", "prodigy", "dadapt-sgd", "dadapt-adam", "schedulefree-sgd", "dog", "ldog"):
        assert name in names
    assert [m.name for m in resolve_methods("polyak,polyak-f0")] == ["polyak", "polyak f*=0"]


def test_applicability_of_hals_and_als():
    sales = NMFEnv(instances="eval", **SALES)
    assert applicability("hals", sales) is None and applicability("als-masked", sales) is None
    illcond = NMFEnv(instances="eval", problem="illcond")
    assert "sign constraint" in applicability("hals", illcond)
    assert applicability("als-masked", illcond) is None  # plain ALS for a signed problem
    tutorial = NMFEnv(instances="eval", problem="tutorial")
    assert "pins bias" in applicability("als-masked", tutorial)


def test_als_in_the_harness_matches_the_reference_and_scores_heldout_against_the_truth():
    """Same instance, init and iteration count as a direct call; held-out MSE on the true values."""
    tr = run_solver("als-masked", SALES, 0)
    assert not tr.diverged and len(tr.loss) == 41 and np.all(np.diff(tr.loss) <= 1e-9 * tr.loss[:-1])
    env = NMFEnv(instances="eval", **SALES)
    env.reset(seed=reset_seed(EVAL_SEEDS[0]), options={"instance": int(EVAL_SEEDS[0])})
    W0, H0 = env.engine.factors(0)
    p = env.problem
    W, H = masked_als(p.V, W0, H0, mask=p.mask, reg=1e-6, iters=len(tr.loss) - 1)
    V_true = make_family("sales", **SALES["problem_params"]).instance(EVAL_SEEDS[0]).V  # held-out entries: truth
    ref = float(np.mean((W @ H - V_true)[p.heldout] ** 2))
    assert tr.heldout_mse == pytest.approx(ref, rel=1e-9)
    # scored on the true values, not on the zeros stored at held-out entries
    assert ref < 0.01 * float(np.mean((W @ H)[p.heldout] ** 2))


def test_hals_in_the_harness_follows_scikit_learn_cd():
    a = run_solver("hals", SMALL, 1)
    b = run_solver("sklearn-cd", SMALL, 1)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-6)
    m = run_solver("hals", {**SALES, "budget": 10}, 0)
    assert np.all(np.diff(m.loss) <= 1e-9 * m.loss[:-1]) and np.isfinite(m.heldout_mse)


def test_polyak_level_estimate_adapts_and_stays_below_the_best_loss():
    p = Polyak()
    f = [100.0, 40.0, 20.0, 19.9, 19.8, 19.7]
    est = [p.estimate(x) for x in f]
    deltas = [min(f[: i + 1]) - e for i, e in enumerate(est)]
    assert deltas[0] == 50.0 and deltas[1] == 75.0  # fell below best - delta/2: the margin grows
    assert deltas[3] < deltas[2] and deltas[5] < deltas[4]  # stalled: it shrinks
    assert all(e < min(f[: i + 1]) for i, e in enumerate(est))
    assert Polyak(0.0).estimate(5.0) == 0.0
    with pytest.raises(ValueError, match="f_star"):
        Polyak("zero")


def test_polyak_no_longer_diverges_on_digits():
    kw = {"problem": "digits", "problem_params": {"target_factor": 0.5}, "budget": 80}  # unreachable: run it all
    new = run_schedule(Polyak(), kw, 0)
    classic = run_schedule(Polyak(0.0, cap=None), kw, 0)
    # f* = 0 sits far below what rank 16 can reach: steps far above 2/L, which diverge or thrash
    assert classic.diverged or classic.loss[-1] > 5 * new.loss[-1]
    assert not new.diverged and new.loss[-1] < 0.2 * new.loss[0]
    assert np.all(new.lr_W <= 0.55 * np.maximum(new.bound_W, new.bound_H) * (1 + 1e-6))


def test_levenberg_marquardt_stops_cleanly_when_its_damping_saturates():
    """Run to a target it cannot reach: the old solver retried 20 times per epoch until the budget
    (7000+ extra evaluations, overflow warnings); now it stops at the stationary point."""
    kw = {"problem": "illcond", "problem_params": {"target_rel": 1e-40}, "budget": 500}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings
        tr = run_solver("lm", kw, 0)
    assert "damping saturated" in tr.notes["stopped"]
    epochs = len(tr.loss) - 1
    assert epochs < 500 and tr.loss[-1] < 1e-20 and not tr.diverged
    assert tr.extra_loss_evals <= 20 * epochs and tr.extra_loss_evals < 200
    assert np.all(tr.lr_W <= 1e10)
    with pytest.raises(ValueError, match="lam_max"):
        run_solver("lm", kw, 0, options={"lam0": 1e12})


def test_als_grow_in_the_harness_grows_the_rank_and_scores_heldout():
    """als-grow: masked ALS from rank 1 upwards, from the same start as the others; it fits the training
    entries and scores a finite held-out error against the true values."""
    grow = run_solver("als-grow", {**SALES, "budget": 120}, 0)
    plain = run_solver("als-masked", {**SALES, "budget": 120}, 0)
    assert grow.loss[0] == plain.loss[0] and not grow.diverged
    assert np.isfinite(grow.heldout_mse) and grow.loss[-1] < 0.01 * grow.loss[0]
    assert "als-grow" in resolve_methods("als-grow")

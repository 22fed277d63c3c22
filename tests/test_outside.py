"""Issue 13: lrenv factorize, lrenv.SGDNMF, lrenv.LearnedLR, the pretrained policy and the examples."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch

from lrenv.cli import main as lrenv_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _low_rank(m=60, n=20, r=3, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    V = rng.uniform(size=(m, r)) @ rng.uniform(size=(r, n))
    if missing:
        V[rng.uniform(size=V.shape) < missing] = np.nan
    return V


# ----------------------------------------------------------------------------- lrenv factorize
def test_factorize_auto_on_missing_data_writes_everything(tmp_path, capsys):
    V = _low_rank(missing=0.3)
    np.save(tmp_path / "v.npy", V)
    out = tmp_path / "res"
    rc = lrenv_main(["factorize", str(tmp_path / "v.npy"), "--rank", "3", "--holdout", "0.1", "--epochs", "150",
                     "--no-progress", "--out", str(out)])
    assert rc == 0
    doc = json.loads((tmp_path / "res.json").read_text())
    assert doc["config"]["method"] == "als-grow" and "missing" in doc["config"]["auto_reason"]
    assert doc["config"]["missing_entries"] == int(np.isnan(V).sum())
    z = np.load(tmp_path / "res.npz")
    assert z["W"].shape == (60, 3) and z["H"].shape == (3, 20)
    held = z["heldout_mask"]
    assert held.sum() > 0 and not np.isnan(V[held]).any()  # held out from the observed entries only
    # exactly low rank: the held-out entries are predicted far better than by the mean
    mse = float(np.mean((z["W"] @ z["H"] - V)[held] ** 2))
    assert mse == pytest.approx(doc["result"]["heldout_mse"]) and mse < 1e-3 * np.nanvar(V)
    assert np.all(np.diff(z["loss"]) <= 1e-9 * z["loss"][0])  # ALS never increases the loss
    assert (tmp_path / "res.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "als-grow" in capsys.readouterr().out


def test_factorize_sgd_schedule_records_steps_and_stops_at_tolerance(tmp_path):
    from lrenv.factorize import factorize
    V = _low_rank(m=100)
    res = factorize(V, 3, schedule="fixed-c=1", epochs=400, tol=1e-3)
    assert res.stopped == "tolerance" and res.epochs < 400
    assert res.loss[-1] < 0.1 * res.loss[0]
    assert len(res.lr_W) == res.epochs and np.all(res.lr_W > 0)
    assert res.method == "fixed c=1"


@pytest.mark.parametrize("method", ["hals", "sklearn-cd", "armijo"])
def test_factorize_other_methods_fit_low_rank_data(method):
    from lrenv.factorize import factorize
    V = _low_rank()
    res = factorize(V, 3, schedule=method, epochs=200, tol=0.0)
    assert res.loss[-1] < 1e-2 * res.loss[0]


@pytest.mark.parametrize("args, message", [
    (["--schedule", "sklearn-cd"], "cannot skip missing"),
    (["--schedule", "armjo"], "Did you mean 'armijo'"),
    (["--schedule", "fixed-scale"], "names 7 methods"),
    (["--epochs", "0"], "--epochs must be a positive integer"),
    (["--holdout", "1.5"], "holdout must be in [0, 1)"),
    (["--rank", "0"], "rank must be a positive integer"),
])
def test_factorize_bad_input_gets_a_clear_error(tmp_path, capsys, args, message):
    np.save(tmp_path / "v.npy", _low_rank(missing=0.2))
    argv = ["factorize", str(tmp_path / "v.npy"), "--rank", "3", "--no-progress", "--out", str(tmp_path / "r")]
    rc = lrenv_main(argv + args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_csv_written_by_numpy_keeps_its_first_row(tmp_path):
    from lrenv.problems import load_matrix
    V = _low_rank(m=5, n=4, missing=0.3)
    np.savetxt(tmp_path / "v.csv", V, delimiter=",")  # '%.18e': letters, but no header
    np.testing.assert_array_equal(load_matrix(tmp_path / "v.csv"), V)
    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,nan\n")
    np.testing.assert_array_equal(load_matrix(tmp_path / "h.csv"), [[1, 2], [3, np.nan]])


def test_factorize_refuses_negative_data_and_missing_files(tmp_path, capsys):
    V = _low_rank()
    V[3, 4] = -1.0
    np.savetxt(tmp_path / "neg.csv", V, delimiter=",")
    assert lrenv_main(["factorize", str(tmp_path / "neg.csv"), "--rank", "2", "--out", str(tmp_path / "r")]) == 2
    assert "negative entries (first at row 3, column 4" in capsys.readouterr().err
    assert lrenv_main(["factorize", str(tmp_path / "nope.npy"), "--rank", "2", "--out", str(tmp_path / "r")]) == 2
    assert "not found" in capsys.readouterr().err
    assert lrenv_main(["factorize", str(tmp_path / "neg.csv"), "--rank", "2", "--out",
                       str(tmp_path / "no_dir" / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reference_solvers_match_their_contract():
    from lrenv.reference import hals, masked_als
    V = _low_rank(m=40, n=15, missing=0.2)
    mask = ~np.isnan(V)
    rng = np.random.default_rng(1)
    W0, H0 = rng.uniform(size=(40, 3)), rng.uniform(size=(3, 15))
    calls = []
    W, H = hals(np.nan_to_num(V), W0, H0, mask=mask, iters=50, callback=lambda it, W, H: calls.append(it) or it == 7)
    assert calls == list(range(1, 8))  # a true return value stops the run
    W, H = masked_als(np.nan_to_num(V), W0, H0, mask=mask, iters=100)
    assert W.min() >= 0 and H.min() >= 0
    assert np.sqrt(np.mean((W @ H - V)[mask] ** 2)) < 1e-2  # data ~0.75
    with pytest.raises(ValueError, match="need W0 of shape"):
        hals(V, W0[:, :2], H0, iters=1)


# ----------------------------------------------------------------------------- SGDNMF
def test_sgdnmf_passes_check_estimator():
    from sklearn.utils.estimator_checks import check_estimator
    from lrenv import SGDNMF
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(SGDNMF(n_components=2, max_iter=20), on_fail=None, on_skip=None)
    failed = [(r["check_name"], str(r["exception"])[:200]) for r in results if r["status"] == "failed"]
    assert failed == []
    assert sum(r["status"] == "passed" for r in results) > 40


def test_sgdnmf_in_a_pipeline_with_gridsearch_on_digits():
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import Pipeline
    from lrenv import SGDNMF
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    pipe = Pipeline([("nmf", SGDNMF(max_iter=15, tol=0.0, random_state=0)),
                     ("clf", LogisticRegression(max_iter=300))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search = GridSearchCV(pipe, {"nmf__n_components": [3, 12]}, cv=2).fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert search.best_params_ == {"nmf__n_components": 12}  # more components separate the digits better
    assert scores[1] > 0.7 > scores[0] - 0.1


def test_sgdnmf_attributes_missing_values_and_inverse_transform():
    from lrenv import SGDNMF
    V = _low_rank(missing=0.2)
    model = SGDNMF(n_components=3, schedule="als-masked", max_iter=200, tol=0.0, random_state=0)
    W = model.fit_transform(V)
    assert W.shape == (60, 3) and model.components_.shape == (3, 20) and model.n_iter_ >= 1
    obs = ~np.isnan(V)
    P = model.inverse_transform(W)
    assert model.reconstruction_err_ == pytest.approx(np.linalg.norm((P - np.nan_to_num(V)) * obs))
    assert np.sqrt(np.mean((P - V)[obs] ** 2)) < 1e-3
    np.testing.assert_allclose(model.transform(V), W, atol=1e-8)
    assert model.get_params()["schedule"] == "als-masked"
    assert model.set_params(n_components=2).n_components == 2
    with pytest.raises(ValueError, match="Negative values"):
        model.fit(-np.ones((5, 4)))


# ----------------------------------------------------------------------------- LearnedLR
RELATIVE_CONFIG = {"action_mode": "relative", "relative_range": 0.5, "lr_init": 0.1, "lr_min": 0.001,
                   "lr_max": 1.0, "obs_features": ["loss", "epoch", "grad_norm", "lr_rel", "loss_slope"]}


class ScriptedPolicy:
    """A deterministic stand-in for a trained policy: plays the given actions and records what it saw."""

    env_config = RELATIVE_CONFIG

    def __init__(self, actions):
        self.actions, self.seen = list(actions), []

    def predict(self, obs, state=None, episode_start=None, deterministic=True):
        self.seen.append(np.array(obs))
        return np.array([self.actions[len(self.seen) - 1]], dtype=np.float32), state


def _quadratic():
    w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    return w, lambda: 0.5 * (w ** 2).sum()


def test_learnedlr_sets_the_rates_the_actions_imply():
    from lrenv import LearnedLR
    w, f = _quadratic()
    opt = torch.optim.SGD([{"params": [w]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5}], lr=0.01)
    actions = [1.0, 1.0, 0.2, -1.0, 1.0, 1.0, 1.0]
    pol = ScriptedPolicy(actions)
    sched = LearnedLR(opt, pol, total_epochs=10)
    expected = np.array([0.01, 0.5])
    losses = []
    for a in actions:
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        sched.step(loss)
        expected = np.clip(expected * 10 ** (0.5 * a), np.array([0.01, 0.5]) * 0.01, np.array([0.01, 0.5]) * 10)
        np.testing.assert_allclose(sched.get_last_lr(), expected, rtol=1e-12)
    # observations as documented: loss, epoch, grad norm, lr_rel and loss slope
    first, third = pol.seen[0], pol.seen[2]
    np.testing.assert_allclose(first, [0, 0.1, 0, 0, 0], atol=1e-7)
    assert third[0] == pytest.approx(math.log10(losses[2] / losses[0]), abs=1e-6)
    assert third[1] == pytest.approx(0.3)
    assert third[3] == pytest.approx(1.0, abs=1e-6)  # two actions of +1 at k = 0.5: one decade
    assert third[4] == pytest.approx(math.log10(losses[2] / losses[1]), abs=1e-6)


def test_learnedlr_warns_when_the_optimizer_is_not_the_trained_kind():
    import warnings

    from lrenv import LearnedLR
    w, _ = _quadratic()
    with pytest.warns(UserWarning, match="trained to schedule 'sgd'.*drives a Adam"):
        LearnedLR(torch.optim.Adam([w], lr=0.01), ScriptedPolicy([0.0]), total_epochs=10)
    adam_policy = ScriptedPolicy([0.0])
    adam_policy.env_config = {**RELATIVE_CONFIG, "optimizer": "adam"}
    with pytest.warns(UserWarning, match="trained to schedule 'adam'.*drives a SGD.*env_kwargs.optimizer:sgd"):
        LearnedLR(torch.optim.SGD([w], lr=0.01), adam_policy, total_epochs=10)
    with warnings.catch_warnings():  # matching kinds: silent
        warnings.simplefilter("error")
        LearnedLR(torch.optim.AdamW([w], lr=0.01), adam_policy, total_epochs=10)
        LearnedLR(torch.optim.SGD([w], lr=0.01), ScriptedPolicy([0.0]), total_epochs=10)


def _epochs(opt, sched, f, n: int) -> None:
    """``n`` epochs of a plain torch loop: one optimizer step, then the scheduler sees the loss."""
    for _ in range(n):
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step()
        sched.step(loss)


def test_learnedlr_survives_a_forced_divergence_and_checkpoints():
    from lrenv import LearnedLR
    w, f = _quadratic()
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    sched = LearnedLR(opt, ScriptedPolicy([0.0] * 20), total_epochs=20)
    _epochs(opt, sched, f, 3)
    good = w.detach().clone()
    with torch.no_grad():
        w.mul_(1e30)  # blown up
    sched.step(float("inf"))
    assert sched.divergences == 1
    torch.testing.assert_close(w.detach(), good)  # the last good parameters are back
    assert sched.get_last_lr() == [pytest.approx(0.01)]
    # the scheduler state round-trips through state_dict
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(good.clone())], lr=0.1)
    sched2 = LearnedLR(opt2, ScriptedPolicy([0.0] * 20), total_epochs=20)
    sched2.load_state_dict(state)
    assert sched2.divergences == 1 and sched2.epochs_seen == 3 and sched2.caps == {0: pytest.approx(0.01)}
    # training goes on: the loss keeps decreasing with the reduced rate
    before = float(f().detach())
    _epochs(opt, sched, f, 5)
    assert float(f().detach()) < before and sched.divergences == 1


def test_learnedlr_with_a_saved_and_loaded_ppo_policy(tmp_path):
    from stable_baselines3 import PPO
    from lrenv import LearnedLR, NMFEnv
    from lrenv.problems import paper_family
    env = NMFEnv(paper_family("small", m=60, n=20, rank=3, num_blocks=3), budget=20, **RELATIVE_CONFIG)
    model = PPO("MlpPolicy", env, n_steps=32, batch_size=32, n_epochs=1, seed=0, device="cpu")
    model.learn(32)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.zip")
    (run / "config.json").write_text(json.dumps({"env": RELATIVE_CONFIG}))
    reference = PPO.load(run / "model.zip", device="cpu")

    w, f = _quadratic()
    opt = torch.optim.SGD([w], lr=0.05)
    sched = LearnedLR(opt, str(run), total_epochs=20)
    seen = []
    act = sched.policy.act
    sched.policy.act = lambda obs: seen.append(obs) or act(obs)
    lr = 0.05
    for _ in range(6):
        opt.zero_grad()
        loss = f()
        loss.backward()
        opt.step()
        sched.step(loss)
        a = float(np.clip(reference.predict(seen[-1], deterministic=True)[0][0], -1, 1))
        lr = float(np.clip(lr * 10 ** (0.5 * a), 0.05 * 0.01, 0.05 * 10))
        assert sched.get_last_lr()[0] == pytest.approx(lr, rel=1e-9)


def test_learnedlr_refuses_policies_it_cannot_drive():
    from lrenv import LearnedLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    bound = ScriptedPolicy([])
    bound.env_config = {**RELATIVE_CONFIG, "action_mode": "log_bound"}
    with pytest.raises(ValueError, match="action_mode='relative'"):
        LearnedLR(opt, bound)
    gap = ScriptedPolicy([])
    gap.env_config = {**RELATIVE_CONFIG, "obs_features": ["loss", "target_gap"]}
    with pytest.raises(ValueError, match="target_gap"):
        LearnedLR(opt, gap)
    with pytest.raises(ValueError, match="no pretrained policy named 'generalst'.*Did you mean 'generalist'"):
        LearnedLR(opt, "pretrained:generalst")


# ----------------------------------------------------------------------------- the shipped policy
@pytest.mark.parametrize("name, problem", [("small-relative", "small"), ("generalist", "small"),
                                           ("generalist", "tutorial")])
def test_pretrained_policy_loads_and_runs_an_episode(name, problem):
    import lrenv
    from lrenv.evaluate import run_schedule
    from lrenv.schedules import pretrained_names
    assert {"small-relative", "generalist", "digits-adam"} <= set(pretrained_names())
    policy = lrenv.pretrained(name)
    assert policy.action_mode == "relative"
    trace = run_schedule(policy, {"problem": problem, "budget": 30}, 0)
    assert not trace.diverged and trace.loss[-1] < 0.5 * trace.loss[0]
    assert os.path.isfile(os.path.join(ROOT, "lrenv", "pretrained", name, "CARD.md"))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, "lrenv", "pretrained"))
               for f in fs)
    assert size < 1_000_000


def test_pretrained_digits_adam_scores_as_its_card_says():
    """The shipped per-factor Adam policy (the validation-best of variants-digits-adam's 5 seeds) on the 10 test
    instances: 22.6 epochs to the target on average against 23.5 for the tuned Adam baseline (CARD.md)."""
    import lrenv
    from lrenv.evaluate import evaluate
    policy = lrenv.pretrained("digits-adam")
    assert policy.action_mode == "per_factor" and policy.env_config["optimizer"] == "adam"
    summary = evaluate([policy, "tuned:adam"], problem="digits", seeds=10, save=False, progress=False,
                       verbose=False).summary
    learned, adam = summary["policy:digits-adam"], summary["adam"]
    assert learned["success_rate"] == 1.0 and learned["diverged_rate"] == 0.0
    assert learned["epochs_to_target_mean"] == pytest.approx(22.6, abs=1.0)
    assert adam["epochs_to_target_mean"] == pytest.approx(23.5, abs=1.0)
    assert learned["epochs_to_target_mean"] < adam["epochs_to_target_mean"]
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=1e-2)
    with pytest.raises(ValueError, match="action_mode='relative'; this one used 'per_factor'.*RMS of the initial"):
        lrenv.LearnedLR(opt, policy)  # its actions are fractions of the NMF problem's own Adam scale


# ----------------------------------------------------------------------------- examples
def test_example_course_matrix_through_sgdnmf():
    report = _example("course_sgdnmf").main(schedules=("armijo",), max_iter=1500)["armijo"]
    assert report["observed_rmse"] < 1e-2 and report["epochs_to_target"] is not None
    np.testing.assert_allclose(report["unknown_predictions"], report["unknown_truth"], atol=0.05)


def test_example_sales_through_factorize(tmp_path):
    report = _example("sales_factorize").main(["--epochs", "60", "--out-dir", str(tmp_path)])
    assert report["exit_code"] == 0 and report["method"] == "als-grow"
    assert np.isfinite(report["heldout_mse"]) and report["heldout_mse"] < 1.0


def test_example_torch_loops_with_learnedlr():
    mod = _example("torch_learnedlr")
    fixed = mod.run_mlp("fixed", epochs=40)
    learned = mod.run_mlp("learned", epochs=40)
    assert math.isfinite(learned["final_loss"]) and learned["divergences"] == 0
    assert learned["best_loss"] < 0.2
    lin = mod.run_linear_net("learned", epochs=20)
    assert math.isfinite(lin["final_loss"])
    assert fixed["best_loss"] < 0.2

"""Issue 12 items 1-3: the progress reward, the per-factor (2-D) action and the scale-free observation features.

The reward tests check the documented episode sum (the per-step terms telescope), in the single and the batched
environment; the action tests check that actions map to the documented step sizes; the feature tests check each
feature's value on a constructed case (hand-made statistics, or a numpy reference for the engine's noise).
"""

import math

import numpy as np
import pytest
import torch

from lrenv.engine import NUM_STATS, STAT_GRAD_NOISE, STAT_L_H, STAT_L_W, STAT_LOSS, EngineConfig, SGDEngine
from lrenv.env import NMFEnv
from lrenv.schedules import FixedScale, FixedScalePair
from lrenv.task import PROGRESS_REWARD, EpisodeTracker, RewardConfig, TaskConfig
from lrenv.tune import SEARCH_SPACES, make_tuned
from lrenv.vec_env import BatchedNMFVecEnv

W_PROGRESS = {"kind": "progress", "improvement": 2.0, "remaining": 0.3, "time_cost": 0.07, "divergence_penalty": 50.0}
TERMS = ("reward_improvement", "reward_time", "reward_target", "reward_divergence")


def documented_sum(w: dict, f0: float, f_best: float, T: int, budget: int, reached: bool, diverged: bool) -> float:
    """RewardConfig's docstring: the progress reward of a whole episode."""
    return (w["improvement"] * math.log(f0 / f_best) - w["time_cost"] * T
            + w["remaining"] * (budget - T) * reached - w["divergence_penalty"] * diverged)


# (scale of 2/L, target override as a fraction of the initial loss, what should end the episode)
EPISODES = [(0.45, 0.15, "reached"), (0.05, 1e-6, "truncated"), (30.0, None, "diverged")]


def _target(env_f0: float, frac: float | None) -> float | None:
    return None if frac is None else frac * env_f0


@pytest.mark.parametrize("scale,frac,end", EPISODES)
def test_progress_reward_sums_as_documented_single_env(scale, frac, end):
    budget = 40
    probe = NMFEnv("small", budget=budget)
    f0 = probe.reset(seed=3, options={"instance": 7})[1]["loss"]
    env = NMFEnv("small", budget=budget, reward=W_PROGRESS, log_range=2.0, target_loss=_target(f0, frac))
    _, info0 = env.reset(seed=3, options={"instance": 7})
    assert info0["loss"] == f0
    total, sums = 0.0, dict.fromkeys(TERMS, 0.0)
    done = False
    while not done:
        _, r, te, tr, info = env.step(env.task.action_for_scale(scale))
        assert r == pytest.approx(sum(info[k] for k in TERMS), rel=1e-12, abs=1e-12)
        total += r
        for k in TERMS:
            sums[k] += info[k]
        done = te or tr
    reached, diverged = info["reached_target"], info["diverged"]
    assert {"reached": reached, "diverged": diverged, "truncated": tr and not (reached or diverged)}[end]
    T = info["epoch"]
    assert total == pytest.approx(documented_sum(W_PROGRESS, f0, info["best_loss"], T, budget, reached, diverged),
                                  rel=1e-9, abs=1e-9)
    # each term on its own: gains telescope to ln(f0 / f_best), one time cost per epoch, bonus and penalty once
    assert sums["reward_improvement"] == pytest.approx(2.0 * math.log(f0 / info["best_loss"]), rel=1e-9, abs=1e-12)
    assert sums["reward_time"] == pytest.approx(-0.07 * T)
    assert sums["reward_target"] == pytest.approx(0.3 * (budget - T) * reached)
    assert sums["reward_divergence"] == -50.0 * diverged
    if end == "reached":
        assert 0 < T < budget and sums["reward_target"] > 0
    if end == "diverged":
        assert sums["reward_improvement"] >= 0  # a diverging epoch adds no gain


def test_progress_reward_sums_as_documented_batched_env():
    budget = 40
    f0s = []
    for inst in (7, 8, 9):
        f0s.append(NMFEnv("small", budget=budget).reset(seed=inst, options={"instance": inst})[1]["loss"])
    venv = BatchedNMFVecEnv("small", num_envs=3, budget=budget, reward=W_PROGRESS, log_range=2.0,
                            target_loss=0.15 * f0s[0])
    venv.autoreset = False
    _, infos0 = venv.reset_instances([7, 8, 9], [7, 8, 9])
    assert [i["loss"] for i in infos0] == pytest.approx(f0s, rel=1e-6)
    scales = np.array([0.45, 0.05, 30.0])  # reaches the (instance 7) target / runs to the budget / diverges
    actions = venv.task.action_for_scale(scales)[:, None]
    totals, last, active = np.zeros(3), [None] * 3, np.ones(3, dtype=bool)
    while active.any():
        _, r, dones, infos = venv.step(actions)
        for j in np.flatnonzero(active):
            assert r[j] == pytest.approx(sum(infos[j][k] for k in TERMS), rel=1e-5, abs=1e-5)
            totals[j] += r[j]
            if dones[j]:
                active[j], last[j] = False, infos[j]
    ends = [(i["reached_target"], i["diverged"]) for i in last]
    assert ends == [(True, False), (False, False), (False, True)]
    for j, info in enumerate(last):
        want = documented_sum(W_PROGRESS, infos0[j]["loss"], info["best_loss"], info["epoch"], budget,
                              info["reached_target"], info["diverged"])
        assert totals[j] == pytest.approx(want, rel=1e-5, abs=1e-4)  # float32 rewards from the vec env


def test_paper_reward_is_the_default_and_unchanged():
    """The paper's percentage gain, the default kind: one improving epoch checked against its definition."""
    assert RewardConfig().kind == "paper" and TaskConfig().reward.kind == "paper"
    env = NMFEnv("small", budget=20)
    _, info0 = env.reset(seed=0, options={"instance": 1})
    _, r, *_, info = env.step(env.task.action_for_scale(0.3))
    assert info["loss"] < info0["loss"]
    assert info["reward_improvement"] == pytest.approx(100 * (info0["loss"] - info["loss"]) / info0["loss"])
    assert r == pytest.approx(info["reward_improvement"])


def test_progress_reward_constant_and_errors():
    assert TaskConfig(reward=PROGRESS_REWARD).reward.kind == "progress"
    with pytest.raises(ValueError, match="unknown reward kind 'log'.*paper.*progress"):
        RewardConfig(kind="log")
    with pytest.raises(ValueError, match="reward weights must be >= 0"):
        RewardConfig(time_cost=-1.0)


# ------------------------------------------------------------------------------------------ per-factor action
def test_per_factor_actions_map_to_documented_step_sizes_single_env():
    env = NMFEnv("small", budget=10, action_mode="per_factor", log_range=1.5, action_center=0.3)
    assert env.action_space.shape == (2,) and env.action_space.low.tolist() == [-1, -1]
    env.reset(seed=0, options={"instance": 2})
    for a in ([0.0, 0.0], [0.4, -0.6], [-1.0, 1.0], [2.0, -3.0]):  # the last one is clipped to the corner
        bound = 2.0 / env.tracker.lipschitz()[0]
        _, _, _, _, info = env.step(np.array(a, dtype=np.float32))
        clipped = np.clip(np.float32(a), -1, 1).astype(np.float64)
        want = 0.3 * bound * 10.0 ** (1.5 * clipped)
        assert [info["lr_W"], info["lr_H"]] == pytest.approx(want.tolist(), rel=1e-6)
        assert [info["bound_W"], info["bound_H"]] == pytest.approx(bound.tolist())
        np.testing.assert_allclose(env.tracker.prev_action[0], clipped, rtol=1e-6)


def test_per_factor_action_for_scale_accepts_a_pair():
    task = TaskConfig(action_mode="per_factor", log_range=3.0)
    a = task.action_for_scale([0.9, 0.4])
    assert a.shape == (2,) and a.dtype == np.float32
    L = np.array([[4.0, 0.5]])
    lr, _, _ = task.actions_to_lr(a[None], L)
    np.testing.assert_allclose(lr[0], [0.9 * 2 / 4.0, 0.4 * 2 / 0.5], rtol=1e-6)
    assert task.action_for_scale(0.5).shape == (2,)  # a scalar serves both factors
    assert task.action_for_scale(np.full((5, 2), 0.5)).shape == (5, 2)
    with pytest.raises(ValueError, match="pair"):
        task.action_for_scale([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="2 components"):
        task.actions_to_lr(np.zeros(3), np.ones((3, 2)))
    # log_bound keeps its meaning: a vector of scales is a batch of 1-D actions
    assert TaskConfig().action_for_scale(np.array([0.25, 0.5])).shape == (2,)
    with pytest.raises(ValueError, match="log_bound.*per_factor"):
        TaskConfig(action_mode="relative").action_for_scale(0.5)


def _zero_action_beside(schedule, kw: dict, ref_kw: dict):
    """Step an env with ``kw`` at a = 0 beside ``schedule`` in an env with ``kw`` updated by ``ref_kw`` (same instance
    and seed), for the whole budget; yields (epoch, info, schedule's info)."""
    env = NMFEnv("small", **kw)
    env.reset(seed=1, options={"instance": 2})
    ref_env = NMFEnv("small", **{**kw, **ref_kw})
    obs, _ = ref_env.reset(seed=1, options={"instance": 2})
    schedule.reset(ref_env.oracle)
    zero = np.zeros(env.action_space.shape, dtype=np.float32)
    for t in range(kw["budget"]):
        a_ref, _ = schedule.predict(obs)
        obs, *_, info_ref = ref_env.step(a_ref)
        *_, info = env.step(zero)
        yield t, info, info_ref


def test_decaying_centre_zero_action_is_the_cosine_schedule():
    """action_center_final: a = 0 steps exactly like CosineDecay(peak=centre, final=final_centre); a != 0 is a
    bounded correction of it; the batched env applies the same centre per instance epoch."""
    from lrenv.schedules import CosineDecay
    kw = dict(budget=12, log_range=0.3, action_center=0.6, action_center_final=0.05, dtype="float64")
    ref_kw = {"log_range": 3.0, "action_center_final": None, "action_center": 0.25}
    for t, info, info_cos in _zero_action_beside(CosineDecay(peak=0.6, final=0.05), kw, ref_kw):
        want = 0.05 + 0.55 * 0.5 * (1 + math.cos(math.pi * t / 11))
        assert info["lr_W"] / info["bound_W"] == pytest.approx(want, rel=1e-6)
        assert info["lr_H"] == pytest.approx(info_cos["lr_H"], rel=1e-5)
        assert info["loss"] == pytest.approx(info_cos["loss"], rel=1e-5)
    # a correction multiplies the cosine's step by 10^(log_range * a), and action_for_scale inverts it per epoch
    task = TaskConfig(**{k: v for k, v in kw.items() if k != "dtype"})
    L = np.array([[2.0, 4.0], [2.0, 4.0]])
    lr, _, _ = task.actions_to_lr(np.array([0.5, -1.0]), L, epoch=np.array([0, 11]))
    np.testing.assert_allclose(lr[:, 0], [0.6 * 10 ** 0.15, 0.05 * 10 ** -0.3], rtol=1e-9)
    np.testing.assert_allclose(task.action_for_scale(np.array([0.6, 0.05]), epoch=np.array([0, 11])), [0, 0],
                               atol=1e-6)
    venv = BatchedNMFVecEnv("small", num_envs=2, **kw)
    venv.reset_instances([2, 3], [1, 5])
    for t in range(3):
        _, _, _, infos = venv.step(np.array([[0.0], [-1.0]], dtype=np.float32))
    c2 = 0.05 + 0.55 * 0.5 * (1 + math.cos(math.pi * 2 / 11))
    assert infos[0]["lr_W"] / infos[0]["bound_W"] == pytest.approx(c2, rel=1e-6)
    assert infos[1]["lr_H"] / infos[1]["bound_H"] == pytest.approx(c2 * 10 ** -0.3, rel=1e-6)
    with pytest.raises(ValueError, match="needs the epoch"):
        task.actions_to_lr(np.zeros(2), L)
    with pytest.raises(ValueError, match="action_center_final must be in"):
        TaskConfig(action_center=0.3, action_center_final=0.5)
    with pytest.raises(ValueError, match="log_bound' or 'per_factor"):
        TaskConfig(action_mode="relative", action_center_final=0.1)


def test_per_factor_nan_component_ends_the_episode_as_divergence():
    env = NMFEnv("small", budget=10, action_mode="per_factor")
    env.reset(seed=0)
    _, r, te, _, info = env.step(np.array([0.1, np.nan], dtype=np.float32))
    assert te and info["diverged"] and info["invalid_action"] and r == -100.0


def test_per_factor_batched_matches_single_env():
    actions = np.array([[0.2, -0.3], [-0.5, 0.1]], dtype=np.float32)
    venv = BatchedNMFVecEnv("small", num_envs=2, budget=10, action_mode="per_factor", dtype="float64")
    assert venv.action_space.shape == (2,)
    venv.reset_instances([3, 4], [30, 40])
    for _ in range(3):
        obs_b, r_b, _, infos_b = venv.step(actions)
    for j, (inst, seed) in enumerate([(3, 30), (4, 40)]):
        env = NMFEnv("small", budget=10, action_mode="per_factor", dtype="float64")
        env.reset(seed=seed, options={"instance": inst})
        for _ in range(3):
            obs, r, _, _, info = env.step(actions[j])
        np.testing.assert_allclose(obs_b[j], obs, rtol=1e-5, atol=1e-6)
        assert infos_b[j]["lr_W"] == pytest.approx(info["lr_W"], rel=1e-9)
        assert infos_b[j]["lr_H"] == pytest.approx(info["lr_H"], rel=1e-9)
        ratio = np.array([info["lr_W"] / info["bound_W"], info["lr_H"] / info["bound_H"]])
        np.testing.assert_allclose(ratio, 0.25 * 10.0 ** actions[j].astype(np.float64), rtol=1e-6)


def test_fixed_scale_pair_steps_at_its_constants_and_is_tunable():
    from lrenv.batch_eval import run_batched

    pair = FixedScalePair(1.6, 0.6)
    traces = run_batched([pair, pair], [5, 6], {"problem": "small", "budget": 15})
    for tr in traces:
        np.testing.assert_allclose(tr.lr_W / tr.bound_W, 0.8, rtol=1e-5)
        np.testing.assert_allclose(tr.lr_H / tr.bound_H, 0.3, rtol=1e-5)
    # equal constants are FixedScale(c) exactly
    same = run_batched([FixedScalePair(1.1, 1.1)], [5], {"problem": "small", "budget": 15})[0]
    ref = run_batched([FixedScale(1.1)], [5], {"problem": "small", "budget": 15})[0]
    np.testing.assert_allclose(same.loss, ref.loss, rtol=1e-6)
    factory, grid, default = SEARCH_SPACES["fixed-cwch"]
    assert factory is FixedScalePair and len(grid) == 30 and default == {"c_W": 1.1, "c_H": 1.1}
    assert make_tuned("fixed-cwch", {"c_W": 1.5, "c_H": 0.8}).name == "fixed cW=1.5,cH=0.8 (tuned)"
    with pytest.raises(ValueError, match="positive"):
        FixedScalePair(0.0, 1.0)


# ------------------------------------------------------------------------------------------ observation features
def _stats(loss, L_W=4.0, L_H=1.0, noise=0.0) -> np.ndarray:
    s = np.zeros((1, NUM_STATS))
    s[0, STAT_LOSS], s[0, STAT_L_W], s[0, STAT_L_H], s[0, STAT_GRAD_NOISE] = loss, L_W, L_H, noise
    s[0, 1] = 1.0  # gradient norm
    return s


def _tracker(features, **task) -> EpisodeTracker:
    cfg = TaskConfig(obs_features=tuple(features), budget=10, **task)
    tr = EpisodeTracker(cfg, 1, has_heldout=False)
    tr.reset([0], _stats(1000.0), np.array([1.0]))
    return tr


def _step(tr, loss, lr=(0.1, 0.2), **kw):
    a = np.zeros((1, tr.cfg.action_dim))
    return tr.step(_stats(loss, **kw), a, np.array([lr]), np.zeros(1, dtype=bool))[0][0]


def test_loss_slope_ema_on_a_constructed_loss_curve():
    tr = _tracker(["loss_slope", "loss_slope_ema"], slope_smoothing=0.5)
    assert tr.observe()[0].tolist() == [0.0, 0.0]
    obs = _step(tr, 100.0)  # slope -1: ema 0.5 * 0 + 0.5 * (-1)
    np.testing.assert_allclose(obs, [-1.0, -0.5], rtol=1e-6)
    obs = _step(tr, 1.0)  # slope -2: ema 0.5 * (-0.5) + 0.5 * (-2)
    np.testing.assert_allclose(obs, [-2.0, -1.25], rtol=1e-6)
    obs = _step(tr, 1.0)  # flat: ema halves
    np.testing.assert_allclose(obs, [0.0, -0.625], rtol=1e-6)
    tr.reset([0], _stats(5.0), np.array([1.0]))  # a new episode forgets the average
    assert tr.observe()[0].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="slope_smoothing"):
        TaskConfig(slope_smoothing=1.0)


def test_lr_bound_epochs_left_target_gap_grad_noise_on_constructed_stats():
    tr = _tracker(["lr_bound", "epochs_left", "target_gap", "grad_noise"])
    np.testing.assert_allclose(tr.observe()[0], [0.0, 0.0, 1.0, 3.0, 0.0], atol=1e-6)  # no step yet
    obs = _step(tr, 100.0, lr=(0.05, 0.5), L_W=4.0, L_H=1.0, noise=9.0)
    # lr / (2/L): 0.05 * 4 / 2 = 0.1 and 0.5 * 1 / 2 = 0.25; 9 of 10 epochs left; loss 100x the target 1;
    # log10(1 + 9) = 1
    np.testing.assert_allclose(obs, [-1.0, math.log10(0.25), 0.9, 2.0, 1.0], rtol=1e-6)
    obs = _step(tr, 10.0, lr=(0.05, 0.5), L_W=40.0, L_H=1.0, noise=0.0)  # the bound moved: W now at 1x
    np.testing.assert_allclose(obs, [0.0, math.log10(0.25), 0.8, 1.0, 0.0], atol=1e-6)


def test_lr_bound_in_relative_mode_is_the_step_in_force():
    tr = _tracker(["lr_bound", "lr_rel"], action_mode="relative", lr_init=0.1)
    # the step in force before any action: lr_init of each factor's bound at reset
    np.testing.assert_allclose(tr.observe()[0], [-1.0, -1.0, 0.0], atol=1e-6)


def test_prev_action_has_one_entry_per_action_component():
    assert TaskConfig(obs_features=("prev_action", "bound", "lr_bound"), action_mode="per_factor").obs_dim == 6
    assert TaskConfig(obs_features=("prev_action", "bound", "lr_bound")).obs_dim == 5


def _noise_reference(V, W, H, lr_W, lr_H, blocks, order):
    """numpy: the H-gradient estimates K * W_I^T R_I at each minibatch's own point, and their relative variance."""
    W, H = W.copy(), H.copy()
    K = len(blocks)
    est = []
    for k in order:
        rows = blocks[k]
        R = W[rows] @ H - V[rows]
        gW, g = R @ H.T, K * W[rows].T @ R
        est.append(g)
        W[rows] = np.maximum(W[rows] - lr_W * gW, 0)
        H = np.maximum(H - lr_H * g, 0)
    est = np.array(est)
    mean = est.mean(axis=0)
    return np.mean([np.sum((g - mean) ** 2) for g in est]) / np.sum(mean ** 2)


@pytest.mark.parametrize("K", [1, 4])
def test_engine_gradient_noise_matches_numpy_reference(K):
    rng = np.random.default_rng(0)
    m, n, r = 40, 12, 3
    V = rng.uniform(size=(m, r)) @ rng.uniform(size=(r, n))
    W0, H0 = rng.uniform(size=(m, r)), rng.uniform(size=(r, n))
    cfg = EngineConfig(m=m, n=n, rank=r, num_blocks=K, dtype=torch.float64, track_noise=True)
    eng = SGDEngine(cfg)
    perm = rng.permutation(m)
    eng.load(0, V, W0, H0, row_perm=perm)
    assert eng.evaluate()[0, STAT_GRAD_NOISE].item() == 0.0  # nothing measured yet
    order = rng.permutation(K)[None]
    lr = (0.01, 0.002)
    eng.epoch(torch.tensor([lr], dtype=torch.float64), order)
    b = m // K
    want = _noise_reference(V, W0, H0, *lr, [perm[k * b:(k + 1) * b] for k in range(K)], order[0])
    got = eng.evaluate()[0, STAT_GRAD_NOISE].item()
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert (got == pytest.approx(0.0, abs=1e-12)) == (K == 1) and (K == 1 or got > 0.01)
    eng.load(0, V, W0, H0, row_perm=perm)  # a new episode starts at 0 again
    assert eng.evaluate()[0, STAT_GRAD_NOISE].item() == 0.0


def test_grad_noise_is_measured_only_when_observed():
    env = NMFEnv("small", budget=5, obs_features=["loss", "grad_noise"])
    assert env.engine_cfg.track_noise and not NMFEnv("small").engine_cfg.track_noise
    obs, _ = env.reset(seed=0)
    assert obs[1] == 0.0
    obs, *_ = env.step(env.task.action_for_scale(0.3))
    assert 0.0 < obs[1] < 5.0
    venv = BatchedNMFVecEnv("small", num_envs=2, budget=5, obs_features=["loss", "grad_noise"])
    assert venv.engine.cfg.track_noise


def test_training_schema_accepts_the_new_settings_and_names_bad_ones():
    from lrenv.agents.train import load_hyperparams

    hp = load_hyperparams("small", ["env_kwargs.reward:{kind: progress, remaining: 0.05, time_cost: 0.05}",
                                    "env_kwargs.action_mode:per_factor", "env_kwargs.slope_smoothing:0.5",
                                    "env_kwargs.obs_features:[loss, grad_noise, lr_bound, epochs_left, "
                                    "loss_slope_ema]"])
    assert hp["env_kwargs"]["reward"]["kind"] == "progress" and hp["env_kwargs"]["action_mode"] == "per_factor"
    with pytest.raises(ValueError, match=r"reward.kind: unknown value 'prog'.*Did you mean 'progress'"):
        load_hyperparams("small", ["env_kwargs.reward:{kind: prog}"])
    with pytest.raises(ValueError, match="slope_smoothing"):
        load_hyperparams("small", ["env_kwargs.slope_smoothing:1.0"])


def test_training_schema_covers_every_task_setting():
    """Every TaskConfig keyword can be set from a hyperparameter file (the relative mode's were once refused)."""
    import dataclasses

    from lrenv.agents.train import load_hyperparams
    from lrenv.agents.validate import _env_schema
    from lrenv.task import TaskConfig

    assert {f.name for f in dataclasses.fields(TaskConfig)} <= set(_env_schema())
    hp = load_hyperparams("small", ["env_kwargs.action_mode:relative", "env_kwargs.relative_range:0.25",
                                    "env_kwargs.lr_init:0.1", "env_kwargs.lr_min:0.0001", "env_kwargs.lr_max:1.0",
                                    "env_kwargs.lr_reference:absolute"])
    assert hp["env_kwargs"]["relative_range"] == 0.25 and hp["env_kwargs"]["lr_reference"] == "absolute"
    with pytest.raises(ValueError, match=r"lr_reference: unknown value 'bund'.*Did you mean 'bound'"):
        load_hyperparams("small", ["env_kwargs.lr_reference:bund"])


def test_factor_tilt_zero_action_is_the_per_factor_cosine():
    """factor_tilt: with a decaying centre, a = 0 steps exactly like CosineDecayPair(peak_X = t_X * centre,
    final_frac = final / centre); a correction multiplies each factor's step by 10^(log_range * a_X), in the
    single and the batched env; the tilt needs the per_factor mode and a positive pair."""
    from lrenv.schedules import CosineDecayPair
    kw = dict(budget=12, action_mode="per_factor", log_range=0.3, action_center=1.0, action_center_final=0.05,
              factor_tilt=[0.9, 0.3], dtype="float64")
    ref_kw = {**CosineDecayPair.env_overrides, "action_center": 0.25}
    for t, info, info_pf in _zero_action_beside(CosineDecayPair(peak_W=0.9, peak_H=0.3, final_frac=0.05), kw, ref_kw):
        shape = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t / 11))
        assert info["lr_W"] / info["bound_W"] == pytest.approx(0.9 * shape, rel=1e-6)
        assert info["lr_H"] / info["bound_H"] == pytest.approx(0.3 * shape, rel=1e-6)
        assert info["lr_H"] == pytest.approx(info_pf["lr_H"], rel=1e-5)
        assert info["loss"] == pytest.approx(info_pf["loss"], rel=1e-5)
    task = TaskConfig(**{k: v for k, v in kw.items() if k != "dtype"})
    assert task.factor_tilt == (0.9, 0.3) and task.to_dict()["factor_tilt"] == [0.9, 0.3]
    assert TaskConfig(action_mode="per_factor", factor_tilt=np.array([0.9, 0.3])).tilt == (0.9, 0.3)
    L = np.array([[2.0, 4.0], [2.0, 4.0]])
    lr, _, _ = task.actions_to_lr(np.array([[0.5, -1.0], [0.0, 1.0]]), L, epoch=np.array([0, 11]))
    np.testing.assert_allclose(lr, [[0.9 * 10 ** 0.15, 2 * 0.3 / 4 * 10 ** -0.3],
                                    [0.9 * 0.05, 2 * 0.3 * 0.05 / 4 * 10 ** 0.3]], rtol=1e-9)
    np.testing.assert_allclose(task.action_for_scale(np.array([[0.9, 0.3], [0.045, 0.015]]), epoch=np.array([0, 11])),
                               0.0, atol=1e-6)
    venv = BatchedNMFVecEnv("small", num_envs=2, **kw)
    venv.reset_instances([2, 3], [1, 5])
    for t in range(3):
        _, _, _, infos = venv.step(np.array([[0.0, 0.0], [1.0, -1.0]], dtype=np.float32))
    c2 = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 2 / 11))
    assert infos[0]["lr_H"] / infos[0]["bound_H"] == pytest.approx(0.3 * c2, rel=1e-6)
    assert infos[1]["lr_W"] / infos[1]["bound_W"] == pytest.approx(0.9 * c2 * 10 ** 0.3, rel=1e-6)
    assert infos[1]["lr_H"] / infos[1]["bound_H"] == pytest.approx(0.3 * c2 * 10 ** -0.3, rel=1e-6)
    for bad in ([1.0], [1.0, -2.0], [1.0, float("inf")], "ab"):
        with pytest.raises(ValueError, match="factor_tilt must be a pair of positive numbers"):
            TaskConfig(action_mode="per_factor", factor_tilt=bad)
    with pytest.raises(ValueError, match="factor_tilt must be a pair.*'log_bound'"):
        TaskConfig(factor_tilt=(1.0, 1.0))
    with pytest.raises(ValueError, match="CosineDecayPair: need"):
        CosineDecayPair(peak_W=0.5, peak_H=0.5, final_frac=0.0)


def test_tuned_factor_tilt_with_adam_is_each_familys_tuned_adam_lr():
    """factor_tilt='tuned' with optimizer='adam': a = 0 runs Adam at the family's shipped tuned lr_rel times Adam's
    reference scale of the instance (the unit of the Adam baseline's lr_rel), one number per family."""
    from lrenv import SuiteEnv
    from lrenv.engine import adam_reference_scale
    from lrenv.tuned_files import load_tuned, tuned_step_scales

    kw = dict(budget=8, optimizer="adam", action_mode="per_factor", log_range=0.5, action_center=1.0,
              factor_tilt="tuned", dtype="float64")
    for family in ("small", "digits"):
        lr_rel = load_tuned(family)["methods"]["adam"]["params"]["lr_rel"]
        assert tuned_step_scales(family, "adam") == (lr_rel, lr_rel)
        env = NMFEnv(family, **kw)
        env.reset(seed=3)
        scale = adam_reference_scale(*env.engine.factors(0))  # the initial factors, before the first step
        _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
        assert info["lr_W"] == pytest.approx(lr_rel * scale, rel=1e-9)
        assert info["lr_H"] == pytest.approx(lr_rel * scale, rel=1e-9)
    assert tuned_step_scales("digits", "adam") != tuned_step_scales("tutorial", "adam")
    assert tuned_step_scales("small", "adam") != tuned_step_scales("small")  # not the SGD step's numbers
    suite = SuiteEnv(**{k: v for k, v in kw.items() if k != "budget"})
    for name in suite.entry_names:
        fam = suite.entry_env(name).family.name
        assert suite.entry_env(name).task.tilt == tuned_step_scales(fam, "adam")


def test_tuned_factor_tilt_zero_action_is_each_familys_tuned_per_factor_step(tmp_path, monkeypatch):
    """factor_tilt='tuned': every env reads its family's shipped fixed-cwch (t_X = c_X / 2; fixed-c for both where
    the file has no per-factor step), so a = 0 steps exactly like FixedScalePair(c_W, c_H) of that file, in the single,
    the batched and the suite env; the setting survives to_dict unresolved (a policy carries 'tuned', not one
    family's numbers) and needs an env to resolve it."""
    from lrenv import SuiteEnv
    from lrenv.schedules import FixedScalePair
    from lrenv.tuned_files import load_tuned, tuned_step_scales

    kw = dict(budget=8, action_mode="per_factor", log_range=0.3, action_center=1.0, factor_tilt="tuned",
              dtype="float64")
    params = load_tuned("small")["methods"]["fixed-cwch"]["params"]
    for t, info, info_ref in _zero_action_beside(FixedScalePair(params["c_W"], params["c_H"]), kw,
                                                 FixedScalePair.env_overrides):
        assert info["lr_W"] / info["bound_W"] == pytest.approx(params["c_W"] / 2, rel=1e-6)
        assert info["lr_H"] / info["bound_H"] == pytest.approx(params["c_H"] / 2, rel=1e-6)
        assert info["loss"] == pytest.approx(info_ref["loss"], rel=1e-6)
    venv = BatchedNMFVecEnv("small", num_envs=2, **kw)
    venv.reset_instances([2, 3], [1, 5])
    _, _, _, infos = venv.step(np.zeros((2, 2), dtype=np.float32))
    assert infos[1]["lr_H"] / infos[1]["bound_H"] == pytest.approx(params["c_H"] / 2, rel=1e-6)
    suite = SuiteEnv(**{k: v for k, v in kw.items() if k != "budget"})
    for name in suite.entry_names:
        assert suite.entry_env(name).task.tilt == tuned_step_scales(suite.entry_env(name).family.name)
    assert tuned_step_scales("sales") != tuned_step_scales("tutorial")  # one number per family, not one for all
    p = load_tuned("medium")["methods"]["fixed-cwch"]["params"]
    assert tuned_step_scales("medium") == (p["c_W"] / 2, p["c_H"] / 2)
    only_c = tmp_path / "tuned"  # a file without a per-factor step: the shared fixed c for both factors
    only_c.mkdir()
    (only_c / "medium.yml").write_text("methods:\n  fixed-c:\n    params: {c: 1.1}\n")
    monkeypatch.setattr("lrenv.tuned_files.TUNED_DIR", only_c)
    assert tuned_step_scales("medium") == (0.55, 0.55)
    monkeypatch.undo()
    task = TaskConfig(**{k: v for k, v in kw.items() if k != "dtype"})
    assert task.to_dict()["factor_tilt"] == "tuned" and NMFEnv("small", **kw).task.to_dict()["factor_tilt"] == "tuned"
    with pytest.raises(ValueError, match="factor_tilt='tuned' is resolved per family: build the environment"):
        task.actions_to_lr(np.zeros((1, 2)), np.ones((1, 2)))
    matrix = tmp_path / "mine.npy"
    np.save(matrix, np.abs(np.random.default_rng(0).normal(size=(30, 20))))
    with pytest.raises(ValueError, match=r"there is none for 'matrix': tune it .*give factor_tilt as the pair "
                                         r"\[c_W / 2, c_H / 2\]"):
        NMFEnv(str(matrix), **kw)
    with pytest.raises(ValueError, match="or 'tuned' in the 'per_factor' action mode, got 'tuned' with action_mode "
                                         "'relative'"):
        TaskConfig(action_mode="relative", factor_tilt="tuned")


def test_center_plateau_follows_torchs_reduce_lr_on_plateau():
    """center_plateau=(patience, factor): the centre's multiplier drops exactly when torch's ReduceLROnPlateau
    (mode 'min', default threshold) would drop an lr fed the same losses, and the step sizes follow it."""
    import torch

    losses = [900.0, 800.0, 800.0, 799.99, 805.0, 700.0, 700.0, 700.0, 700.0, 650.0]  # 799.99: not 1e-4 below
    tr = _tracker(["loss", "center_scale"], action_mode="per_factor", center_plateau=(2, 0.5))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", patience=2, factor=0.5)
    L = tr.lipschitz().copy()
    for f in losses:
        lr, _, _ = tr.actions_to_lr(np.zeros((1, 2)))
        assert lr[0] == pytest.approx(2.0 * 0.25 * opt.param_groups[0]["lr"] / L[0])  # a = 0: centre x multiplier
        obs = _step(tr, f)
        plateau.step(f)
        assert tr.center_scale[0] == pytest.approx(opt.param_groups[0]["lr"])
        assert obs[1] == pytest.approx(np.log10(opt.param_groups[0]["lr"]))
    assert tr.center_scale[0] == 0.25  # two cuts on this curve: the test exercises the rule
    tr.reset([0], _stats(1000.0), np.array([1.0]))
    assert tr.center_scale[0] == 1.0 and tr.plateau_bad[0] == 0  # a new episode starts at the full centre


def test_center_plateau_tuned_reads_the_familys_tuned_adam_rule_and_bad_settings_are_named():
    """center_plateau='tuned' resolves per family to the shipped tuned Adam (patience, factor); with
    factor_tilt='tuned' and action_center=1, a = 0 starts at the tuned Adam lr. Wrong settings get errors."""
    from lrenv.tuned_files import load_tuned, tuned_adam_plateau

    for family in ("small", "digits"):
        params = load_tuned(family)["methods"]["adam"]["params"]
        assert tuned_adam_plateau(family) == (int(params["patience"]), float(params["factor"]))
        env = NMFEnv(family, budget=8, optimizer="adam", action_mode="per_factor", action_center=1.0, log_range=0.5,
                     factor_tilt="tuned", center_plateau="tuned", obs_features=("loss", "center_scale"))
        assert env.task.plateau == tuned_adam_plateau(family)
        obs, _ = env.reset(seed=1)
        assert obs[1] == 0.0  # log10 of the multiplier: 1 at the start
        assert env.task.to_dict()["center_plateau"] == "tuned"  # a policy carries the rule's name, not numbers
    assert tuned_adam_plateau("small") != tuned_adam_plateau("digits")
    with pytest.raises(ValueError, match=r"center_plateau must be a pair \(patience, factor\)"):
        TaskConfig(action_mode="per_factor", center_plateau=(2, 1.5))
    with pytest.raises(ValueError, match="center_plateau and action_center_final both decay the centre"):
        TaskConfig(action_center_final=0.1, center_plateau=(2, 0.5))
    with pytest.raises(ValueError, match="center_plateau needs action_mode 'log_bound' or 'per_factor'"):
        TaskConfig(action_mode="relative", center_plateau=(2, 0.5))
    with pytest.raises(ValueError, match="resolved per family"):
        _ = TaskConfig(action_mode="per_factor", center_plateau="tuned").plateau
    with pytest.raises(ValueError, match="pass center_scale"):
        TaskConfig(center_plateau=(2, 0.5)).action_for_scale(0.5)

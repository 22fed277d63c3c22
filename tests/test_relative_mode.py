"""The relative action mode (issue 12 item 2): step sizes multiply by 10^(k a), bounded, no L needed to act."""

import numpy as np
import pytest

from lrenv import NMFEnv, TaskConfig
from lrenv.problems import paper_family
from lrenv.task import RELATIVE_OBS
from lrenv.vec_env import BatchedNMFVecEnv

FAM = dict(problem=paper_family("small", m=120, n=30, rank=4, num_blocks=4))
REL = dict(action_mode="relative", relative_range=0.5, lr_init=0.1, lr_min=0.01, lr_max=0.5,
           obs_features=RELATIVE_OBS, budget=12)


def test_step_sizes_follow_the_documented_product_and_stay_in_bounds():
    env = NMFEnv(**FAM, **REL, target_loss=0.0, divergence_factor=1e12)  # no early end: only the step sizes matter
    _, info = env.reset(seed=3)
    ref = np.array([info["bound_W"], info["bound_H"]])  # 2/L per factor at reset: the units of lr_init
    actions = [1.0, 0.4, 1.0, -1.0, -1.0, -1.0, -1.0, 0.2, 5.0]  # the last is clipped to a = 1
    expected = 0.1
    for a in actions:
        _, _, term, trunc, info = env.step(np.array([a], dtype=np.float32))
        expected = min(max(expected * 10 ** (0.5 * min(a, 1.0)), 0.01), 0.5)
        np.testing.assert_allclose([info["lr_W"], info["lr_H"]], expected * ref, rtol=1e-6)  # float32 actions
        assert not (term or trunc)
    # the lr_rel observation is log10(lr in force / lr_init)
    obs = env.tracker.observe()[0]
    assert obs[RELATIVE_OBS.index("lr_rel")] == pytest.approx(np.log10(expected / 0.1), abs=1e-5)


def test_absolute_reference_shares_one_step_size_and_ignores_L():
    env = NMFEnv(**FAM, **{**REL, "lr_reference": "absolute", "lr_init": 1e-3, "lr_min": 1e-4, "lr_max": 2e-3})
    env.reset(seed=0)
    lrs = []
    for a in (1.0, 1.0, -1.0, -1.0, -1.0, -1.0):
        *_, info = env.step(np.array([a], dtype=np.float32))
        assert info["lr_W"] == info["lr_H"]
        lrs.append(info["lr_W"])
    np.testing.assert_allclose(lrs, [2e-3, 2e-3, 2e-3 / 10 ** 0.5, 2e-4, 1e-4, 1e-4], rtol=1e-12)


def test_loss_slope_is_the_last_epochs_log_change():
    env = NMFEnv(**FAM, **REL)
    _, info0 = env.reset(seed=1)
    obs, *_, info1 = env.step(np.array([0.0], dtype=np.float32))
    assert obs[RELATIVE_OBS.index("loss_slope")] == pytest.approx(np.log10(info1["loss"] / info0["loss"]), abs=1e-5)


def test_single_and_batched_env_are_identical():
    rng = np.random.default_rng(0)
    acts = rng.uniform(-1, 1, size=(10, 3)).astype(np.float32)
    venv = BatchedNMFVecEnv(**FAM, num_envs=3, **REL)
    venv.seed(7)
    obs_b = [venv.reset()]
    lr_b = []
    for t in range(10):
        o, _, _, infos = venv.step(acts[t])
        obs_b.append(o)
        lr_b.append([[i["lr_W"], i["lr_H"]] for i in infos])
    for i in range(3):
        env = NMFEnv(**FAM, **REL)
        o, _ = env.reset(seed=7 + i)
        np.testing.assert_allclose(o, obs_b[0][i], rtol=1e-5)
        for t in range(10):
            o, *_, info = env.step(acts[t, i:i + 1])
            np.testing.assert_allclose([info["lr_W"], info["lr_H"]], lr_b[t][i], rtol=1e-6)
            np.testing.assert_allclose(o, obs_b[t + 1][i], rtol=1e-4, atol=1e-5)


def test_nan_action_keeps_the_step_size_and_ends_as_divergence():
    env = NMFEnv(**FAM, **REL)
    env.reset(seed=0)
    env.step(np.array([1.0], dtype=np.float32))
    before = env.tracker.lr.copy()
    *_, term, _, info = env.step(np.array([np.nan], dtype=np.float32))
    assert term and info["invalid_action"] and info["diverged"]
    np.testing.assert_array_equal(env.tracker.lr, before)


def test_bad_relative_settings_are_refused():
    with pytest.raises(ValueError, match="lr_min <= lr_init <= lr_max"):
        TaskConfig(action_mode="relative", lr_init=2.0, lr_max=1.0)
    with pytest.raises(ValueError, match="lr_reference"):
        TaskConfig(action_mode="relative", lr_reference="bogus")

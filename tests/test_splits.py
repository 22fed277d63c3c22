"""Train / validation / test splits: disjoint, and each used only for what it is documented for."""

import json

import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback

from lrenv import NMFEnv
from lrenv.evaluate import evaluate
from lrenv.problems import SPLITS, TEST_SEEDS, TRAIN_SEEDS, VALIDATION_SEEDS, reset_seed, split_seeds


def test_splits_are_disjoint_ranges():
    names = list(SPLITS)
    assert names == ["train", "validation", "test"]
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            ra, rb = SPLITS[a], SPLITS[b]
            assert ra.stop <= rb.start or rb.stop <= ra.start, (a, b)
    assert split_seeds("eval") is TEST_SEEDS
    with pytest.raises(ValueError, match="unknown split 'tset'"):
        split_seeds("tset")


def test_evaluate_scores_the_split_it_is_given_and_fixed_data_splits_differ():
    """On a fixed matrix (tutorial) the splits separate initialisations: validation and test runs of the
    same method start from different points, while two methods on one split start from the same point."""
    kw = dict(problem="tutorial", seeds=3, save=False, progress=False, verbose=False, budget=5)
    test = evaluate("fixed-c=0.2,fixed-c=0.4", **kw)
    val = evaluate("fixed-c=0.2", split="validation", **kw)
    assert {r["instance"] for r in test.rows} == {TEST_SEEDS[i] for i in range(3)}
    assert {r["instance"] for r in val.rows} == {VALIDATION_SEEDS[i] for i in range(3)}
    assert test.config["split"] == "test" and val.config["split"] == "validation"
    t0 = [r["initial_loss"] for r in test.rows if r["method"] == "fixed c=0.2"]
    t1 = [r["initial_loss"] for r in test.rows if r["method"] == "fixed c=0.4"]
    v0 = [r["initial_loss"] for r in val.rows]
    assert t0 == t1  # same start for every method on one instance
    assert not set(t0) & set(v0)  # another split, other starts
    assert test.config["reset_seeds"] == [reset_seed(TEST_SEEDS[i]) for i in range(3)]


class _RecordInstances(BaseCallback):
    def __init__(self):
        super().__init__()
        self.seen: set[int] = set()

    def _on_step(self) -> bool:
        self.seen.update(int(s) for s in self.training_env.get_attr("instance_seed"))
        return True


def test_training_samples_train_and_selects_on_validation(tmp_path):
    from lrenv.agents.train import TrainConfig, load_hyperparams, train
    hp = load_hyperparams("small", ["n_timesteps:1024", "n_envs:2", "n_steps:256", "batch_size:128", "n_epochs:1",
                                    "env_kwargs.budget:20"])
    cfg = TrainConfig(problem="small", problem_params=dict(m=60, n=20, rank=3), hyperparams=hp, runs_dir=str(tmp_path),
                      eval_freq=512, eval_episodes=2, checkpoint_freq=512, progress=False)
    rec = _RecordInstances()
    run_dir = train(cfg, extra_callbacks=[rec])
    assert rec.seen and all(s in TRAIN_SEEDS for s in rec.seen)
    chosen_on = json.loads((run_dir / "config.json").read_text())["validation_instances"]
    assert chosen_on and all(s in VALIDATION_SEEDS for s in chosen_on)
    assert (run_dir / "best_model.zip").exists()


def test_env_split_names():
    env = NMFEnv("small", problem_params=dict(m=40, n=10, rank=2), instances="validation")
    seen = {env.reset(seed=s)[1]["instance"] for s in range(5)}
    assert all(s in VALIDATION_SEEDS for s in seen)
    assert np.all([s not in TEST_SEEDS for s in seen])

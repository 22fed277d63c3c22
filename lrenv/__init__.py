"""lrenv: reinforcement-learning agents that learn SGD learning-rate schedules for matrix factorisation."""

from gymnasium.envs.registration import register, registry

from .env import LROracle, NMFEnv
from .problems import DEFAULT_PROBLEM, EVAL_SEEDS, FAMILIES, TRAIN_SEEDS, ProblemFamily, make_family
from .task import RewardConfig, TaskConfig

__version__ = "0.1.0"

_LAZY = {"SGDNMF": "lrenv.estimator", "LearnedLR": "lrenv.scheduler", "pretrained": "lrenv.schedules"}


def __getattr__(name: str):
    """``SGDNMF``, ``LearnedLR`` and ``pretrained`` load on first use (scikit-learn's import is slow)."""
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lrenv' has no attribute {name!r}")

ENV_ID = "lrenv/NMF-v0"
if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="lrenv.env:NMFEnv")

__all__ = ["NMFEnv", "LROracle", "TaskConfig", "RewardConfig", "ProblemFamily", "make_family", "FAMILIES",
           "DEFAULT_PROBLEM", "TRAIN_SEEDS", "EVAL_SEEDS", "ENV_ID", "SGDNMF", "LearnedLR", "pretrained"]

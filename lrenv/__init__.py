"""lrenv: reinforcement-learning agents that learn SGD learning-rate schedules for matrix factorisation."""

from gymnasium.envs.registration import register, registry

from .env import LROracle, NMFEnv
from .problems import DEFAULT_PROBLEM, EVAL_SEEDS, FAMILIES, TRAIN_SEEDS, ProblemFamily, make_family
from .suite import SUITE_ENV_ID, SUITES, SuiteEnv, load_suite
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
"""The generic id: any family through ``problem=`` (default ``small``); its max_episode_steps is the largest family
budget, an upper bound (the env truncates itself at its own budget)."""
FAMILY_BUDGETS = {"small": 200, "medium": 1000, "paper": 1000, "sales": 500, "tutorial": 500, "illcond": 500,
                  "digits": 200}
"""Default epoch budget of each family with its own id (tests check these against lrenv.problems)."""
ENV_IDS = {name: f"lrenv/NMF-{name}-v0" for name in FAMILY_BUDGETS}
"""Family name -> its gymnasium id (``max_episode_steps`` = the family's budget)."""


def env_id(problem: str) -> str:
    """The gymnasium id of a family name (the generic ``lrenv/NMF-v0`` for other problems, e.g. matrix files)."""
    return ENV_IDS.get(problem, ENV_ID)


def _register() -> None:
    """Register the ids (``gym.make("lrenv:lrenv/NMF-small-v0")`` and rl-zoo's ``--gym-packages lrenv`` import
    this module). Idempotent: re-imports (spawned workers, reloads) register nothing twice. The suite's id
    (:class:`lrenv.SuiteEnv`, default suite ``generalist``) is bounded like the generic one: each entry
    truncates itself at its own budget."""
    largest = max(FAMILY_BUDGETS.values())
    specs = {ENV_ID: ("lrenv.env:NMFEnv", {}, largest), SUITE_ENV_ID: ("lrenv.suite:SuiteEnv", {}, largest)}
    specs.update({ENV_IDS[name]: ("lrenv.env:NMFEnv", {"problem": name}, budget)
                  for name, budget in FAMILY_BUDGETS.items()})
    for id_, (entry_point, kwargs, budget) in specs.items():
        if id_ not in registry:
            register(id=id_, entry_point=entry_point, kwargs=kwargs, max_episode_steps=budget)


_register()

__all__ = ["NMFEnv", "SuiteEnv", "SUITES", "SUITE_ENV_ID", "load_suite", "LROracle", "TaskConfig", "RewardConfig", "ProblemFamily", "make_family", "FAMILIES",
           "DEFAULT_PROBLEM", "TRAIN_SEEDS", "EVAL_SEEDS", "ENV_ID", "ENV_IDS", "FAMILY_BUDGETS", "env_id",
           "SGDNMF", "LearnedLR", "pretrained"]

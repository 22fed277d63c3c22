"""One schema for every training setting, checked before anything is written.

Bad settings used to fail late (a traceback from PPO or torch after the run directory existed), or not
at all (``gamma: 2`` trains until the loss reaches 1e33; ``env_kwargs.budget: 0`` silently became 200).
Here every PPO key, every environment key and every run option has a type and a range, and the first
violation is a ``ValueError`` that names the key, the value and what is allowed. :func:`validate_config`
is called by ``lrenv.agents.train`` before environments, models or files exist.

``checkpoint_freq = 0`` means no periodic checkpoints; ``eval_freq = 0`` no held-out evaluation.
"""

from __future__ import annotations

import ast
import math
import numbers
import re
from typing import Any, Callable

import numpy as np

Check = Callable[[str, Any], None]
VEC_KINDS = ("dummy", "subproc", "batched")
"""Vector env implementations of lrenv.agents.train."""


def parse_policy_kwargs(value: Any) -> dict:
    """policy_kwargs as a dict; rl-zoo files write it as the string ``"dict(net_arch=[64, 64])"``."""
    if isinstance(value, str):
        try:
            node = ast.parse(value, mode="eval").body
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict" and not node.args):
                raise ValueError
            return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except (SyntaxError, ValueError):
            raise ValueError(f"policy_kwargs: must be a mapping or 'dict(key=literal, ...)', got {value!r}") from None
    if value is not None and not isinstance(value, dict):
        _fail("policy_kwargs", value, "must be a mapping")
    return dict(value or {})


# ----------------------------------------------------------------------------- checks
def _fail(key: str, value: Any, rule: str) -> None:
    raise ValueError(f"{key}: {rule}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (numbers.Real, np.floating, np.integer)) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None, *, integral_float: bool = False) -> Check:
    """An int in [lo, hi] (``integral_float``: 2e5 is accepted as 200000, 2.5 is not)."""
    def check(key: str, v: Any) -> None:
        ok = _is_int(v) or (integral_float and _is_real(v) and float(v).is_integer())
        rng = f" >= {lo}" if hi is None else f" in [{lo}, {hi}]"
        if not ok or (lo is not None and v < lo) or (hi is not None and v > hi):
            _fail(key, v, f"must be an integer{rng if lo is not None else ''}")
    return check


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = True, hi_open: bool = False) -> Check:
    """A finite number in the interval (open or closed ends as given)."""
    def check(key: str, v: Any) -> None:
        bad = not _is_real(v)
        if not bad and lo is not None:
            bad = v <= lo if lo_open else v < lo
        if not bad and hi is not None:
            bad = v >= hi if hi_open else v > hi
        if bad:
            if hi is None:
                rule = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
            else:
                rule = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            _fail(key, v, f"must be a finite number {rule}".rstrip())
    return check


def boolean(key: str, v: Any) -> None:
    if not isinstance(v, (bool, np.bool_)):
        _fail(key, v, "must be true or false")


def one_of(*choices: Any) -> Check:
    def check(key: str, v: Any) -> None:
        if v not in choices:
            from lrenv.problems import suggest
            raise ValueError(f"{key}: unknown value {v!r}; choose one of {list(choices)}.{suggest(v, choices)}")
    return check


def optional(inner: Check) -> Check:
    def check(key: str, v: Any) -> None:
        if v is not None:
            inner(key, v)
    return check


def net_arch(key: str, v: Any) -> None:
    """A list of positive layer widths, or {pi: [...], vf: [...]} (SB3 >= 1.8)."""
    if isinstance(v, dict):
        unknown = set(v) - {"pi", "vf", "qf"}
        if unknown:
            _fail(key, v, f"a dict net_arch takes keys pi and vf only (unknown {sorted(unknown)})")
        for k, sub in v.items():
            net_arch(f"{key}.{k}", sub)
        return
    if not isinstance(v, (list, tuple)) or not all(_is_int(x) and x >= 1 for x in v):
        _fail(key, v, "must be a list of positive integer layer widths, e.g. [64, 64]")


def policy_kwargs(key: str, v: Any) -> None:
    if not isinstance(v, dict):
        _fail(key, v, "must be a mapping")
    for k, sub in v.items():
        if k == "net_arch":
            net_arch(f"{key}.net_arch", sub)
        elif k == "log_std_init":
            real(None)(f"{key}.log_std_init", sub)
        elif k == "ortho_init":
            boolean(f"{key}.ortho_init", sub)
        elif k == "activation_fn":
            if not (callable(sub) or isinstance(sub, str)):
                _fail(f"{key}.activation_fn", sub, "must be a torch.nn activation class")
        # other policy kwargs are passed through to SB3, which checks them at model construction


def normalize(key: str, v: Any) -> None:
    if isinstance(v, (bool, np.bool_)):
        return
    if not isinstance(v, dict):
        _fail(key, v, "must be true, false or a mapping of VecNormalize keywords")
    schema = {"norm_obs": boolean, "norm_reward": boolean, "clip_obs": real(0.0), "clip_reward": real(0.0),
              "gamma": real(0.0, 1.0), "epsilon": real(0.0), "norm_obs_keys": lambda k, x: None,
              "training": boolean}
    _check_mapping(key, v, schema)


# ----------------------------------------------------------------------------- the schema
POLICIES = ("MlpPolicy",)
"""Policies that fit the env's flat Box observation (CnnPolicy needs images, MultiInputPolicy dicts)."""

PPO_SCHEMA: dict[str, Check] = {
    "n_envs": integer(1),
    "n_timesteps": integer(1, integral_float=True),
    "policy": one_of(*POLICIES),
    "normalize": normalize,
    "n_steps": integer(1),
    "batch_size": integer(1),
    "n_epochs": integer(1),
    "gamma": real(0.0, 1.0),
    "gae_lambda": real(0.0, 1.0, lo_open=False),
    "learning_rate": real(0.0),
    "ent_coef": real(0.0, lo_open=False),
    "vf_coef": real(0.0, lo_open=False),
    "clip_range": real(0.0),
    "clip_range_vf": optional(real(0.0)),
    "max_grad_norm": real(0.0),
    "target_kl": optional(real(0.0)),
    "use_sde": boolean,
    "sde_sample_freq": integer(-1),
    "normalize_advantage": boolean,
    "policy_kwargs": lambda k, v: None,  # checked after parsing the zoo's "dict(...)" string (train._policy_kwargs)
    "env_kwargs": lambda k, v: None,     # checked by ENV_SCHEMA
}


def _reward(key: str, v: Any) -> None:
    from lrenv.task import REWARD_KINDS, RewardConfig
    if not isinstance(v, dict):
        _fail(key, v, "must be a mapping of reward weights")
    known = {f: one_of(*REWARD_KINDS) if f == "kind" else real(None) for f in RewardConfig.__dataclass_fields__}
    _check_mapping(key, v, known)


def _obs_features(key: str, v: Any) -> None:
    from lrenv.task import OBS_FEATURES
    if not isinstance(v, (list, tuple)) or not v:
        _fail(key, v, f"must be a non-empty list of observation features from {list(OBS_FEATURES)}")
    for i, f in enumerate(v):
        one_of(*OBS_FEATURES)(f"{key}[{i}]", f)


def _names(key: str, v: Any) -> None:
    """A name or a list of names (a suite's ``exclude``)."""
    if isinstance(v, str):
        return
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) and x for x in v):
        _fail(key, v, "must be a name or a list of names, e.g. [digits]")


def _env_schema() -> dict[str, Check]:
    from lrenv.engine import OPTIMIZERS
    from lrenv.task import ACTION_MODES, LR_REFERENCES
    return {
        "budget": optional(integer(1)),
        "num_blocks": optional(integer(1)),
        "grad_noise": real(0.0, lo_open=False),
        "dtype": one_of("float32", "float64"),
        "action_mode": one_of(*ACTION_MODES),
        "lr_max": real(0.0),
        "lr_min": real(0.0),
        "lr_init": real(0.0),
        "lr_reference": one_of(*LR_REFERENCES),
        "relative_range": real(0.0),
        "log_range": real(0.0),
        "action_center": real(0.0),
        "action_center_final": optional(real(0.0)),
        "factor_tilt": optional(_tilt),
        "center_plateau": optional(_plateau),
        "obs_features": _obs_features,
        "reward": _reward,
        "divergence_factor": real(1.0),
        "target_loss": optional(real(0.0)),
        "obs_clip": real(0.0),
        "slope_smoothing": real(0.0, 1.0, lo_open=False, hi_open=True),
        "optimizer": one_of(*OPTIMIZERS),
        "exclude": _names,  # suites only (checked in validate_config)
    }


RESERVED_ENV_KEYS = ("problem", "problem_params", "instances", "device", "threads", "suite")
"""NMFEnv (and SuiteEnv) keywords that a run sets from its own options (--problem, --problem suite:NAME,
--env-device...), not from env_kwargs."""


def _tilt(key: str, v: Any) -> None:
    from lrenv.task import TUNED_TILT
    if v != TUNED_TILT and not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_real(t) and t > 0 for t in v)):
        _fail(key, v, "must be a pair of positive numbers [t_W, t_H] or 'tuned' (the family's tuned per-factor step)")


def _plateau(key: str, v: Any) -> None:
    from lrenv.task import TUNED_TILT
    if v != TUNED_TILT and not (isinstance(v, (list, tuple)) and len(v) == 2 and isinstance(v[0], int)
                                and not isinstance(v[0], bool) and v[0] >= 0 and _is_real(v[1]) and 0 < v[1] < 1):
        _fail(key, v, "must be a pair [patience, factor] (an integer >= 0, 0 < factor < 1) or 'tuned' (the family's "
                      "tuned Adam ReduceLROnPlateau)")


def _check_mapping(key: str, mapping: dict, schema: dict[str, Check]) -> None:
    from lrenv.problems import suggest
    for k, v in mapping.items():
        if k not in schema:
            raise ValueError(f"{key}.{k}: unknown key.{suggest(k, schema)} Known: {', '.join(schema)}")
        schema[k](f"{key}.{k}", v)


def validate_hyperparams(hp: dict) -> dict:
    """Check every PPO and env key of a resolved hyperparameter dict; return it (ints normalised)."""
    from lrenv.problems import suggest
    for k, v in hp.items():
        if k not in PPO_SCHEMA:
            raise ValueError(f"unknown hyperparameter {k!r}.{suggest(k, PPO_SCHEMA)}")
        PPO_SCHEMA[k](k, v)
    for k in ("n_envs", "n_timesteps", "n_steps", "batch_size", "n_epochs"):
        if k in hp:
            hp[k] = int(hp[k])
    env = hp.get("env_kwargs") or {}
    if not isinstance(env, dict):
        _fail("env_kwargs", env, "must be a mapping of NMFEnv keywords")
    for k in RESERVED_ENV_KEYS:
        if k in env:
            raise ValueError(f"env_kwargs.{k}: set by the run's own options (--problem, --problem-param, "
                             "--env-device, --env-threads), not in env_kwargs")
    _check_mapping("env_kwargs", env, _env_schema())
    if "policy_kwargs" in hp:
        policy_kwargs("policy_kwargs", parse_policy_kwargs(hp["policy_kwargs"]))
    if "n_steps" in hp and "batch_size" in hp and "n_envs" in hp and hp["batch_size"] > hp["n_steps"] * hp["n_envs"]:
        raise ValueError(f"batch_size: must be <= n_steps * n_envs = {hp['n_steps'] * hp['n_envs']} (one rollout), "
                         f"got {hp['batch_size']}")
    return hp


# ----------------------------------------------------------------------------- run options
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$")


def check_run_name(name: Any) -> str:
    """``--exp`` becomes part of a directory name: letters, digits and ``. _ + -`` only, so that it can never
    name a path outside the runs directory (``../../escape``) or a hidden file."""
    if not isinstance(name, str) or not RUN_NAME.match(name) or ".." in name:
        raise ValueError(f"--exp: run names may hold letters, digits and '._+-' (no path separators, no '..', "
                         f"not starting with '.' or '-', at most 100 characters), got {name!r}")
    return name


def check_device(option: str, device: Any) -> str:
    """A torch device string that exists on this machine (``auto`` is allowed for the policy)."""
    import torch
    if option == "--device" and device == "auto":
        return device
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{option}: {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return device
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option}: {device!r} but CUDA is not available on this machine "
                             f"(torch {torch.__version__}); use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option}: {device!r} but this machine has {count} CUDA device(s) "
                             f"(cuda:0..cuda:{count - 1})")
        return device
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"{option}: 'mps' is not available on this machine; use cpu")
        return device
    raise ValueError(f"{option}: device type {dev.type!r} is not supported; use cpu, cuda, cuda:N or mps")


def validate_config(cfg: Any) -> None:
    """Check a ``TrainConfig`` (duck-typed: no import of the training module): hyperparameters, env keys,
    seeds, frequencies, devices and the run name. Raises ``ValueError`` naming the option."""
    validate_hyperparams(cfg.hyperparams)
    for k in ("n_envs", "n_timesteps", "policy"):
        if k not in cfg.hyperparams:
            raise ValueError(f"hyperparameters: {k!r} is required")
    check_run_name(cfg.exp)
    integer(0, 2**32 - 1)("--seed", cfg.seed)
    integer(0)("--checkpoint-freq (0: no checkpoints)", cfg.checkpoint_freq)
    integer(0)("--eval-freq (0: no evaluation)", cfg.eval_freq)
    integer(1)("--eval-episodes", cfg.eval_episodes)
    integer(1)("--threads", cfg.torch_threads)
    integer(0)("--env-threads (0: every core)", cfg.env_threads)
    integer(0)("--env-workers (0: automatic)", cfg.env_workers)
    n_envs = cfg.hyperparams.get("n_envs")
    if cfg.env_workers > 1 and isinstance(n_envs, int) and cfg.env_workers > n_envs:
        _fail("--env-workers", cfg.env_workers, f"exceeds n_envs = {n_envs}: each process steps at least one env")
    if cfg.env_workers > 1 and (cfg.env_threads != 1 or not str(cfg.env_device).startswith("cpu")):
        _fail("--env-workers", cfg.env_workers, "needs --env-threads 1 and a CPU --env-device (each process steps "
              "its envs on one thread; a GPU steps them all in one process)")
    one_of(*VEC_KINDS)("--vec", cfg.vec)
    check_device("--device", cfg.device)
    check_device("--env-device", cfg.env_device)
    if not isinstance(cfg.problem_params, dict):
        _fail("--problem-param", cfg.problem_params, "must be key=value pairs")
    from lrenv.suite import is_suite
    if is_suite(cfg.problem):
        if cfg.problem_params:
            _fail("--problem-param", cfg.problem_params, "applies to one family; a suite's entries carry their own "
                  "problem_params (write a suite .yml)")
    elif cfg.hyperparams.get("env_kwargs", {}).get("exclude"):
        _fail("env_kwargs.exclude", cfg.hyperparams["env_kwargs"]["exclude"],
              f"applies to a suite (--problem suite, suite:NAME or a suite .yml), not to {cfg.problem!r}")

"""Train a PPO agent (stable-baselines3) that chooses the SGD learning rate, epoch by epoch.

Read top to bottom: config -> environments -> model -> callbacks -> learn -> save. A run writes to
``runs/{problem}__{exp}__{seed}__{time}/``::

    config.json          the full resolved config (hyperparameters, env kwargs, versions)
    model.zip            the final policy (atomic write)
    vecnormalize.pkl     observation/reward normalisation statistics (when used)
    best_model.zip       best policy on the validation instances (lrenv evaluate reports on test ones)
    interrupted.zip      the policy when training was stopped with Ctrl-C
    checkpoints/         periodic checkpoints (model + VecNormalize), used by --resume
    tb_1/                TensorBoard event files (view with `tensorboard --logdir runs`)

Every model .zip carries its whole decision problem (TaskConfig, env kwargs, VecNormalize statistics;
lrenv.policy_io), so each evaluates as trained. Settings are checked by one schema
(lrenv.agents.validate) before anything is written; checkpoints, resume and TensorBoard continuity are
crash-safe (lrenv.agents.checkpoints).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from lrenv.agents.checkpoints import (CHECKPOINT_DIR, NoUsableCheckpoint, SafeCheckpointCallback, SaveBestCallback,
                                      list_checkpoints, load_latest, remove_stale_temporaries, tensorboard_logger)
from lrenv.agents.validate import (PPO_SCHEMA, VEC_KINDS, parse_policy_kwargs, validate_config,
                                   validate_hyperparams)
from lrenv.policy_io import save_policy
from lrenv.suite import SUITE_ENV_ID, is_suite, load_suite, make_env, problem_label, suite_name

HYPERPARAMS = Path(__file__).parent / "hyperparams" / "ppo.yml"
TB_DIR = "tb_1"


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to config.json beside its results."""

    problem: str = "small"
    """Problem family name (see lrenv.problems), a path to a matrix file, or a suite (``suite``, ``suite:NAME``, a
    suite ``.yml``; lrenv.suite): one policy for every entry of the suite, the entry drawn per episode."""
    problem_params: dict = field(default_factory=dict)
    """Family parameters (e.g. {'m': 200} for a smaller synthetic problem)."""
    exp: str = "ppo"
    """Experiment name, part of the run directory name."""
    seed: int = 0
    """Seed of PPO, the environments' generators and the training instance draws."""
    hyperparams: dict = field(default_factory=dict)
    """Resolved PPO hyperparameters (rl-baselines3-zoo keys: n_envs, n_timesteps, policy, normalize, ...)."""
    vec: str = "batched"
    """Vector env: 'batched' (all envs stepped together by one engine: same trajectories as 'dummy', ~3x
    faster on small problems), 'dummy' (one NMFEnv per env, in-process) or 'subproc' (one process per env).
    A suite's entries differ in shape and one engine holds one shape, so for a suite 'batched' becomes 'dummy'
    (its cheap families step in milliseconds; 'subproc' spreads the envs over cores)."""
    device: str = "cpu"
    """Torch device of the policy."""
    env_device: str = "cpu"
    """Torch device of the environments' SGD (the batched env can step all problems on a GPU)."""
    torch_threads: int = 1
    """Torch threads of PPO's policy in this process; one is fastest for its small networks on CPU."""
    env_threads: int = 1
    """Torch threads while the environments' SGD computes on a CPU (0: every core). One by default: on a busy
    machine more threads wait for each other (2-30x slower, README "Threads"), while idle they gain little."""
    env_workers: int = 0
    """Processes of the batched env on a CPU (``lrenv.sharded_vec_env``): its envs split into this many shards, each
    stepped by one process on one thread. 0: automatic, one per available core where the problems are large enough
    to pay for the pipes (small: 2 on 2 cores; tutorial, illcond: 1); 1: everything in this process."""
    eval_freq: int = 10_000
    """Evaluate on validation instances every this many timesteps (0 = never); selects best_model.zip."""
    eval_episodes: int = 5
    """Validation instances per evaluation."""
    checkpoint_freq: int = 20_000
    """Save a checkpoint every this many timesteps (at the first rollout boundary past each multiple; 0 = none)."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self):
        if self.vec == "batched" and is_suite(self.problem):
            self.vec = "dummy"

    @property
    def env_kwargs(self) -> dict:
        """NMFEnv keyword arguments of this run (also what an evaluation must recreate)."""
        return dict(problem=self.problem, problem_params=self.problem_params,
                    **self.hyperparams.get("env_kwargs", {}))


# ----------------------------------------------------------------------------- hyperparameters
def _yaml_error(e: Exception) -> str:
    return " ".join(str(e).split())


def parse_override(text: str) -> tuple[str, object]:
    """``key:value`` (zoo style) -> (key, value), the value parsed as YAML (numbers, lists, dicts)."""
    if ":" not in text:
        raise ValueError(f"hyperparameter overrides are key:value, got {text!r}")
    key, value = text.split(":", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({_yaml_error(e)})") from None


def hyperparams_key(problem: str, table: dict, path: str | Path = HYPERPARAMS) -> str:
    """The entry of an rl-zoo hyperparameter file for ``problem``: its gymnasium id (``small`` ->
    ``lrenv/NMF-small-v0``; a matrix file -> the generic ``lrenv/NMF-v0``; a suite -> ``lrenv/NMF-suite-v0``),
    else the bare family name (files keyed by family before the ids existed; ``matrix`` for matrix files)."""
    from lrenv import ENV_ID, ENV_IDS
    if is_suite(problem):
        if SUITE_ENV_ID in table:
            return SUITE_ENV_ID
        raise ValueError(f"no hyperparameters for the suite {problem!r} in {path} (looked for {SUITE_ENV_ID!r})")
    is_file = bool(os.path.splitext(problem)[1])
    for key in (ENV_IDS.get(problem, ENV_ID if is_file else None), problem, "matrix" if is_file else None):
        if key is not None and key in table:
            return key
    from lrenv.problems import suggest
    wanted = ENV_IDS.get(problem, ENV_ID if is_file else problem)
    names = [name for name, id_ in ENV_IDS.items() if id_ in table] + [k for k in table if "/" not in k]
    raise ValueError(f"no hyperparameters for problem {problem!r} in {path} (looked for {wanted!r}).{suggest(problem, names)}")


def run_name(problem: str, exp: str, seed: int, when: float | None = None) -> str:
    """``{problem}__{exp}__{seed}__{YYYYmmdd-HHMMSS}``: the one run-naming scheme (``lrenv evaluate`` names its
    directories ``{problem}__eval__{seed}__{stamp}``), sortable by time and readable at a glance."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return f"{problem_label(problem)}__{exp}__{seed}__{stamp}"


def load_hyperparams(problem: str, overrides: list[str] | None = None, path: str | Path = HYPERPARAMS) -> dict:
    """The family's hyperparameters from ``path`` with ``key:value`` overrides applied, checked against the schema
    (lrenv.agents.validate): every error names the file, the override or the key."""
    try:
        table = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--hyperparams {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--hyperparams {path}: not valid YAML ({_yaml_error(e)})") from None
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"--hyperparams {path}: expected a mapping of env id (or problem name) -> hyperparameters")
    name = hyperparams_key(problem, table, path)
    hp = dict(table[name])
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("env_kwargs."):
            hp["env_kwargs"] = {**hp.get("env_kwargs", {}), key.split(".", 1)[1]: value}
            continue
        if key not in PPO_SCHEMA:
            from lrenv.problems import suggest
            raise ValueError(f"unknown hyperparameter {key!r}.{suggest(key, PPO_SCHEMA)}")
        hp[key] = value
    try:
        return validate_hyperparams(hp)
    except ValueError as e:
        raise ValueError(f"{e} (from {path} and the command-line overrides)") from None


def _policy_kwargs(value) -> dict:
    return parse_policy_kwargs(value)


# ----------------------------------------------------------------------------- environments
def make_env_fn(env_kwargs: dict, instances="train"):
    def make():
        return make_env(instances=instances, **env_kwargs)
    return make


def env_threads(cfg: TrainConfig) -> int:
    """The torch thread count of the environments' engines (see TrainConfig.env_threads)."""
    if cfg.env_threads < 0:
        raise ValueError(f"env_threads must be >= 0 (0: every core), got {cfg.env_threads}")
    if cfg.env_threads:
        return cfg.env_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def make_vec_env(cfg: TrainConfig, n_envs: int, instances="train", seed: int = 0):
    """A VecMonitor-wrapped vector env of ``n_envs`` learning-rate environments."""
    from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor
    if cfg.vec not in VEC_KINDS:
        raise ValueError(f"unknown vec kind {cfg.vec!r}; choose one of {VEC_KINDS}")
    kwargs = dict(cfg.env_kwargs, device=cfg.env_device, threads=env_threads(cfg))
    if cfg.vec == "batched":
        from lrenv.sharded_vec_env import batched_vec_env
        venv = batched_vec_env(n_envs, workers=cfg.env_workers or None, instances=instances, **kwargs)
    elif cfg.vec == "subproc" and n_envs > 1:
        venv = SubprocVecEnv([make_env_fn(kwargs, instances) for _ in range(n_envs)])
    else:
        venv = DummyVecEnv([make_env_fn(kwargs, instances) for _ in range(n_envs)])
    venv.seed(seed)
    return VecMonitor(venv)


def wrap_normalize(venv, hp: dict, path: str | None = None, training: bool = True):
    from stable_baselines3.common.vec_env import VecNormalize
    norm = hp.get("normalize", False)
    if not norm:
        return venv
    if path is not None:
        venv = VecNormalize.load(path, venv)
    else:
        venv = VecNormalize(venv, **(norm if isinstance(norm, dict) else {}))
    venv.training = training
    if not training:
        venv.norm_reward = False
    return venv


# ----------------------------------------------------------------------------- model
PPO_KEYS = ("n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "learning_rate", "ent_coef", "clip_range",
            "vf_coef", "max_grad_norm", "target_kl", "use_sde", "sde_sample_freq", "clip_range_vf",
            "normalize_advantage")


def make_model(cfg: TrainConfig, venv, run_dir: Path):
    from stable_baselines3 import PPO
    hp = cfg.hyperparams
    return PPO(hp.get("policy", "MlpPolicy"), venv, seed=cfg.seed, device=cfg.device, verbose=0,
               tensorboard_log=str(run_dir), policy_kwargs=_policy_kwargs(hp.get("policy_kwargs")),
               **{k: hp[k] for k in PPO_KEYS if k in hp})


# ----------------------------------------------------------------------------- files
def atomic_write_text(path: Path, text: str) -> None:
    from lrenv.policy_io import unique_tmp
    tmp = unique_tmp(path)
    try:
        Path(tmp).write_text(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def task_of(venv) -> dict:
    """The resolved TaskConfig (every field, the family's budget filled in) of a vector env's first env."""
    return venv.get_attr("task", [0])[0].to_dict()


def save_model(model, run_dir: Path, name: str = "model", *, task: dict | None = None, env: dict | None = None) -> None:
    """Model with its task and VecNormalize statistics embedded (lrenv.policy_io), written atomically; the final
    model also gets the SB3-style ``vecnormalize.pkl`` beside it (written first)."""
    from lrenv.agents.checkpoints import atomic_write_bytes
    from lrenv.policy_io import vecnormalize_bytes
    venv = model.get_vec_normalize_env()
    if venv is not None and name == "model":
        atomic_write_bytes(run_dir / "vecnormalize.pkl", vecnormalize_bytes(venv))
    save_policy(model, run_dir / f"{name}.zip", task=task if task is not None else task_of(model.get_env()),
                env=env, vecnorm=venv)


def write_config(cfg: TrainConfig, run_dir: Path, extra: dict | None = None) -> None:
    import gymnasium
    import stable_baselines3
    from lrenv import __version__
    doc = {"train": dataclasses.asdict(cfg), "env": cfg.env_kwargs,
           **({"suite": load_suite(suite_name(cfg.problem), cfg.env_kwargs.get("exclude")).to_dict()}
              if is_suite(cfg.problem) else {}),
           "versions": {"lrenv": __version__, "torch": torch.__version__, "stable_baselines3": stable_baselines3.__version__,
                        "gymnasium": gymnasium.__version__, "python": sys.version.split()[0]}}
    tuned = tuned_settings(cfg)
    if tuned:
        doc["tuned_settings"] = tuned
    doc.update(extra or {})
    atomic_write_text(run_dir / "config.json", json.dumps(doc, indent=2, default=str))


def tuned_settings(cfg: TrainConfig) -> dict[str, dict[str, list]]:
    """Per family trained on, the numbers its ``'tuned'`` env settings (``factor_tilt``, ``center_plateau``) stood
    for when the run was written: the shipped tuned files change when a baseline is retuned, so ``'tuned'`` alone
    would not say what a = 0 was. Empty when no setting is ``'tuned'``."""
    from lrenv.problems import make_family
    from lrenv.task import TUNED_TILT, resolve_tuned
    kw = cfg.env_kwargs
    if not any(isinstance(kw.get(k), str) and kw[k] == TUNED_TILT for k in ("factor_tilt", "center_plateau")):
        return {}
    if is_suite(cfg.problem):
        entries = [(e.problem, e.problem_params) for e in load_suite(suite_name(cfg.problem), kw.get("exclude")).entries]
    else:
        entries = [(cfg.problem, cfg.problem_params or {})]
    out: dict[str, dict[str, list]] = {}
    for problem, params in entries:
        family = make_family(problem, **params).name
        found = resolve_tuned(family, optimizer=kw.get("optimizer", "sgd"), factor_tilt=kw.get("factor_tilt"),
                              center_plateau=kw.get("center_plateau"))
        out[family] = {k: list(v) for k, v in found.items()}
    return out


def read_config(run_dir: str | Path) -> dict:
    """A run's config.json; a missing or damaged file is a ValueError/FileNotFoundError naming it."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --resume needs a run directory written by lrenv train")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); the run's configuration is damaged, so it cannot be resumed "
                         "(start a new run)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("train"), dict):
        raise ValueError(f"{path}: no 'train' section; not a config.json written by lrenv train")
    return doc


def latest_checkpoint(run_dir: Path) -> tuple[Path, Path | None, int]:
    """The newest checkpoint of a run: (model zip, VecNormalize pickle or None, timesteps); no loading (see
    :func:`lrenv.agents.checkpoints.load_latest` for the newest *usable* one)."""
    found = list_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {run_dir / CHECKPOINT_DIR}: the run was interrupted before its "
                                "first checkpoint; start it again without --resume")
    steps, path = found[0]
    pkl = run_dir / CHECKPOINT_DIR / f"rl_model_vecnormalize_{steps}_steps.pkl"
    return path, (pkl if pkl.exists() else None), steps


def new_run_dir(cfg: TrainConfig) -> Path:
    """The (not yet created) directory of a new run; inside ``runs_dir`` by construction (checked)."""
    root = Path(cfg.runs_dir)
    run_dir = root / run_name(cfg.problem, cfg.exp, cfg.seed)
    if root.resolve() not in run_dir.resolve().parents:
        raise ValueError(f"--exp {cfg.exp!r}: the run directory {run_dir} would lie outside {root}")
    return run_dir


def completed_timesteps(run_dir: Path, doc: dict) -> int | None:
    """Timesteps of a finished run (config.json has its result and model.zip exists), else None."""
    result = doc.get("result") or {}
    if "timesteps" in result and (run_dir / "model.zip").is_file():
        return int(result["timesteps"])
    return None


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: str | Path | None = None, extra_callbacks=(), *,
          allow_missing_normalization: bool = False) -> Path:
    """Train (or resume) a run; returns its directory.

    Every setting is validated before anything is built; the run directory is created only once the model
    exists. ``resume``: continue from the newest checkpoint that loads (a finished run only when
    ``n_timesteps`` was raised, from its final model)."""
    from stable_baselines3.common.callbacks import CallbackList

    from lrenv.agents.callbacks import EpisodeStatsCallback, HeldoutEvalCallback, HParamCallback, ProgressCallback

    validate_config(cfg)
    torch.set_num_threads(cfg.torch_threads)
    hp = cfg.hyperparams
    n_envs = hp["n_envs"]
    venv = make_vec_env(cfg, n_envs, "train", seed=cfg.seed)  # first: a bad config fails before any file is written
    task, env = task_of(venv), cfg.env_kwargs
    from lrenv.problems import VALIDATION_SEEDS  # model selection never sees the test split
    eval_seeds = [VALIDATION_SEEDS[i] for i in range(cfg.eval_episodes)]
    created, fresh = False, resume is None
    try:
        if resume is None:
            run_dir = new_run_dir(cfg)
            venv = wrap_normalize(venv, hp)
            model = make_model(cfg, venv, run_dir)
            run_dir.mkdir(parents=True, exist_ok=False)
            created = True
            write_config(cfg, run_dir)
            print(f"run directory: {run_dir}", flush=True)
            done = 0
        else:
            run_dir = Path(resume)
            doc = read_config(run_dir)
            finished = completed_timesteps(run_dir, doc)
            if finished is not None and finished >= hp["n_timesteps"]:
                print(f"{run_dir} is complete ({finished} timesteps); nothing to do. To train it further, raise "
                      f"n_timesteps: lrenv train --resume {run_dir} n_timesteps:{2 * finished}")
                venv.close()
                return run_dir
            for stale in remove_stale_temporaries(run_dir):
                print(f"removed {stale} (left by an interrupted write)", file=sys.stderr)
            candidates = [p for _, p in list_checkpoints(run_dir)]
            if finished is not None:
                candidates.insert(0, run_dir / "model.zip")
            model = None
            try:
                model, venv, source = load_latest(candidates, venv, normalize=hp.get("normalize", False),
                                                  device=cfg.device,
                                                  allow_missing_normalization=allow_missing_normalization)
                done = int(model.num_timesteps)
                print(f"resuming {run_dir} from {source.name} at {done} timesteps")
            except NoUsableCheckpoint as e:
                if candidates and not e.unreadable:
                    raise
            if model is None:  # no checkpoint, or only damaged ones: train it again from the start
                venv = wrap_normalize(venv, hp)
                model, done, fresh = make_model(cfg, venv, run_dir), 0, True
                print(f"resuming {run_dir} at 0 timesteps: it has no loadable checkpoint, so it is trained again "
                      "from the start")
            write_config(cfg, run_dir, {k: doc[k] for k in ("result",) if k in doc})
        # Resumed: TensorBoard drops the stopped run's events above the step resumed from (all of them at 0).
        model.set_logger(tensorboard_logger(run_dir / TB_DIR, purge_step=None if resume is None else done + 1 if done
                                            else 0))
    except BaseException:
        venv.close()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing trained yet: leave no empty run behind
        raise

    every = lambda steps: max(steps // n_envs, 1)  # noqa: E731  (callbacks count vector steps)
    budget = make_env(**cfg.env_kwargs).task.budget  # (no engine is built: cheap; a suite's: its largest)
    callbacks = [
        SafeCheckpointCallback(cfg.checkpoint_freq, run_dir / CHECKPOINT_DIR, task=task, env=env, start=done),
        EpisodeStatsCallback(budget),
        HParamCallback(cfg),
    ]
    if cfg.eval_freq > 0:  # one validation evaluation (learned vs fixed baselines, failures counted), one step axis
        callbacks.append(HeldoutEvalCallback(
            dict(cfg.env_kwargs, device=cfg.env_device, threads=env_threads(cfg)), eval_seeds, every(cfg.eval_freq),
            run_dir, seed=cfg.seed + 10_000,
            save_best=lambda path: save_policy(model, path, task=task, env=env, vecnorm=model.get_vec_normalize_env())))
    callbacks.append(ProgressCallback([cfg.eval_freq, cfg.checkpoint_freq], bar=cfg.progress))
    callbacks += list(extra_callbacks)
    write_config(cfg, run_dir, {"validation_instances": eval_seeds})
    remaining = hp["n_timesteps"] - done
    start = time.time()
    try:
        if remaining > 0:
            model.learn(remaining, callback=CallbackList(callbacks), reset_num_timesteps=fresh, progress_bar=False)
    except KeyboardInterrupt:
        save_model(model, run_dir, "interrupted", task=task, env=env)
        print(f"interrupted at {model.num_timesteps} timesteps (policy and statistics in {run_dir / 'interrupted.zip'}); "
              f"continue from the last checkpoint with: lrenv train --resume {run_dir}")
        raise
    finally:
        venv.close()
        model.logger.close()
    save_model(model, run_dir, task=task, env=env)
    write_config(cfg, run_dir, {"validation_instances": eval_seeds,
                                "result": {"timesteps": int(model.num_timesteps), "wall_time_s": round(time.time() - start, 1)}})
    return run_dir


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY:VALUE",
                   help="hyperparameter overrides in rl-zoo style, e.g. n_timesteps:50000 learning_rate:1e-3 "
                        "env_kwargs.action_mode:paper (may come before or after the options)")
    p.add_argument("--problem", default="small", help="problem family name, path to a matrix file, or a suite for "
                   "one policy across families and sizes: suite (= suite:generalist), suite:NAME (built-in: "
                   "generalist, sizes-small) or a suite .yml; leave entries out with env_kwargs.exclude:[digits]")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE", help="family parameter (repeatable)")
    p.add_argument("--exp", default="ppo", help="experiment name (part of the run directory name: letters, digits, "
                   "'._+-')")
    p.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    p.add_argument("--hyperparams", default=str(HYPERPARAMS), help="YAML file of hyperparameters per family")
    p.add_argument("--vec", choices=VEC_KINDS, default="batched",
                   help="vector env implementation (a suite runs 'batched' as 'dummy': its entries differ in shape)")
    p.add_argument("--device", default="cpu", help="torch device of the policy (cpu, cuda, cuda:N, mps, auto)")
    p.add_argument("--env-device", default="cpu", help="torch device of the environments (batched env: cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the policy (PPO) in this process")
    p.add_argument("--env-threads", type=int, default=1,
                   help="torch threads of the environments' SGD on CPU (0: every core; more than one is slower on a "
                        "busy machine)")
    p.add_argument("--env-workers", type=int, default=0,
                   help="processes of the batched env on CPU, each stepping a share of the envs on one thread (0: one "
                        "per core where the problems are large enough; 1: all in this process)")
    p.add_argument("--eval-freq", type=int, default=10_000, help="evaluation on validation instances every N timesteps, selects best_model.zip (0: off)")
    p.add_argument("--eval-episodes", type=int, default=5, help="validation instances per evaluation")
    p.add_argument("--checkpoint-freq", type=int, default=20_000,
                   help="checkpoint every N timesteps, at the next rollout boundary (0: no checkpoints)")
    p.add_argument("--runs-dir", default="runs", help="where run directories are created")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run from its newest usable checkpoint; only n_timesteps:N (to extend "
                        "a run), --device, --env-device, --threads, --env-threads, --env-workers and --no-progress may "
                        "be given with it")
    p.add_argument("--allow-missing-normalization", action="store_true",
                   help="with --resume: accept a checkpoint whose VecNormalize statistics are missing (fresh ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from lrenv.problems import parse_problem_params
    cfg = TrainConfig(problem=args.problem, problem_params=parse_problem_params(args.problem_param), exp=args.exp,
                      seed=args.seed, hyperparams=load_hyperparams(args.problem, args.overrides, args.hyperparams),
                      vec=args.vec, device=args.device, env_device=args.env_device, torch_threads=args.threads,
                      env_threads=args.env_threads, env_workers=args.env_workers, eval_freq=args.eval_freq,
                      eval_episodes=args.eval_episodes, checkpoint_freq=args.checkpoint_freq, runs_dir=args.runs_dir,
                      progress=not args.no_progress)
    validate_config(cfg)
    return cfg


def config_from_run(run_dir: str | Path) -> TrainConfig:
    doc = read_config(run_dir)
    try:
        return TrainConfig(**doc["train"])
    except TypeError as e:
        raise ValueError(f"{Path(run_dir) / 'config.json'}: its 'train' section does not match this lrenv version "
                         f"({e})") from None


RESUME_MAY_CHANGE = {"device": "device", "env_device": "env_device", "threads": "torch_threads",
                     "env_threads": "env_threads", "env_workers": "env_workers"}
"""Options that only say where and how fast to compute: a resumed run takes the new value."""
RESUME_FIXED = {"problem": "problem", "exp": "exp", "seed": "seed", "vec": "vec", "eval_freq": "eval_freq",
                "eval_episodes": "eval_episodes", "checkpoint_freq": "checkpoint_freq"}
"""Options that define the run: given with --resume they must equal the run's value."""


def apply_resume_args(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """Apply what may change on resume; refuse by name every other option or override that differs."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = vars(parser.parse_args([]))
    option = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    for dest, fld in RESUME_MAY_CHANGE.items():
        if getattr(args, dest) != default[dest]:
            setattr(cfg, fld, getattr(args, dest))
    for dest, fld in RESUME_FIXED.items():
        value = getattr(args, dest)
        if value != default[dest] and value != getattr(cfg, fld):
            raise ValueError(f"{option(dest)} cannot change on --resume (the run has {getattr(cfg, fld)!r}, "
                             f"given {value!r}); start a new run to change it")
    if args.problem_param:
        from lrenv.problems import parse_problem_params
        given = parse_problem_params(args.problem_param)
        if given != cfg.problem_params:
            raise ValueError(f"--problem-param cannot change on --resume (the run has {cfg.problem_params}, "
                             f"given {given}); start a new run to change it")
    if args.hyperparams != default["hyperparams"]:
        raise ValueError("--hyperparams cannot be given with --resume: the run's resolved hyperparameters are in its "
                         "config.json")
    for text in args.overrides or []:
        key, value = parse_override(text)
        if key == "n_timesteps":
            hp = validate_hyperparams({**cfg.hyperparams, "n_timesteps": value})
            cfg.hyperparams["n_timesteps"] = hp["n_timesteps"]
            continue
        current = (cfg.hyperparams.get("env_kwargs", {}).get(key.split(".", 1)[1]) if key.startswith("env_kwargs.")
                   else cfg.hyperparams.get(key))
        if value != current:
            raise ValueError(f"{key} cannot change on --resume (the run has {current!r}, given {value!r}); only "
                             "n_timesteps:N may be given, to extend a run")
    cfg.progress = not args.no_progress
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = apply_resume_args(config_from_run(args.resume), args)
    else:
        if args.allow_missing_normalization:
            raise ValueError("--allow-missing-normalization applies to --resume only")
        cfg = config_from_args(args)
    try:
        run_dir = train(cfg, resume=args.resume, allow_missing_normalization=args.allow_missing_normalization)
    except NoUsableCheckpoint as e:
        raise ValueError(f"cannot resume {args.resume}: {e}") from None
    except KeyboardInterrupt:
        return 130
    print(f"saved {run_dir / 'model.zip'}; view the curves with: tensorboard --logdir {cfg.runs_dir}")
    if is_suite(cfg.problem):
        suite = load_suite(suite_name(cfg.problem), cfg.env_kwargs.get("exclude"))
        print(f"evaluate it on each family against the baselines with: lrenv evaluate --problem F --model {run_dir} "
              f"(F: {', '.join(suite.problems)}{', or a family the suite left out' if suite.excluded else ''})")
    else:
        print(f"evaluate it against the baselines with: lrenv evaluate --problem {cfg.problem} --model {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lrenv.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""Train a PPO agent (stable-baselines3) that chooses the SGD learning rate, epoch by epoch.

Read top to bottom: config -> environments -> model -> callbacks -> learn -> save. A run writes to
``runs/{problem}__{exp}__{seed}__{time}/``::

    config.json          the full resolved config (hyperparameters, env kwargs, versions)
    model.zip            the final policy (atomic write)
    vecnormalize.pkl     observation/reward normalisation statistics (when used)
    best_model.zip       best policy on the held-out evaluation episodes
    checkpoints/         periodic checkpoints (model + VecNormalize), used by --resume
    tb_1/                TensorBoard event files (view with `tensorboard --logdir runs`)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import glob
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

HYPERPARAMS = Path(__file__).parent / "hyperparams" / "ppo.yml"
VEC_KINDS = ("dummy", "subproc", "batched")


@dataclass
class TrainConfig:
    """Everything a training run depends on; written to config.json beside its results."""

    problem: str = "small"
    """Problem family name (see lrenv.problems) or a path to a matrix file."""
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
    faster on small problems), 'dummy' (one NMFEnv per env, in-process) or 'subproc' (one process per env)."""
    device: str = "cpu"
    """Torch device of the policy."""
    env_device: str = "cpu"
    """Torch device of the environments' SGD (the batched env can step all problems on a GPU)."""
    torch_threads: int = 1
    """Torch threads of PPO's policy in this process; one is fastest for its small networks on CPU."""
    env_threads: int = 1
    """Torch threads while the environments' SGD computes on a CPU (0: every core). One by default: on a busy
    machine more threads wait for each other (2-30x slower, README "Threads"), while idle they gain little."""
    eval_freq: int = 10_000
    """Evaluate on held-out instances every this many timesteps (0 = never)."""
    eval_episodes: int = 5
    """Held-out instances per evaluation."""
    checkpoint_freq: int = 20_000
    """Save a checkpoint every this many timesteps."""
    runs_dir: str = "runs"
    """Parent directory of run directories."""
    progress: bool = True
    """Show a progress bar."""

    @property
    def env_kwargs(self) -> dict:
        """NMFEnv keyword arguments of this run (also what an evaluation must recreate)."""
        return dict(problem=self.problem, problem_params=self.problem_params,
                    **self.hyperparams.get("env_kwargs", {}))


# ----------------------------------------------------------------------------- hyperparameters
def parse_override(text: str) -> tuple[str, object]:
    """``key:value`` (zoo style) -> (key, value), the value parsed as YAML (numbers, lists, dicts)."""
    if ":" not in text:
        raise ValueError(f"hyperparameter overrides are key:value, got {text!r}")
    key, value = text.split(":", 1)
    return key.strip(), yaml.safe_load(value)


def hyperparams_key(problem: str, table: dict, path: str | Path = HYPERPARAMS) -> str:
    """The entry of an rl-zoo hyperparameter file for ``problem``: its gymnasium id (``small`` ->
    ``lrenv/NMF-small-v0``; a matrix file -> the generic ``lrenv/NMF-v0``), else the bare family name
    (files keyed by family before the ids existed; ``matrix`` for matrix files)."""
    from lrenv import ENV_ID, ENV_IDS
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
    return f"{Path(problem).stem or 'problem'}__{exp}__{seed}__{stamp}"


def load_hyperparams(problem: str, overrides: list[str] | None = None, path: str | Path = HYPERPARAMS) -> dict:
    table = yaml.safe_load(Path(path).read_text())
    name = hyperparams_key(problem, table, path)
    hp = dict(table[name])
    known = set(hp) | {"env_kwargs", "normalize", "policy_kwargs", "ent_coef", "vf_coef", "max_grad_norm",
                       "target_kl", "use_sde", "sde_sample_freq", "clip_range_vf", "normalize_advantage"}
    for text in overrides or []:
        key, value = parse_override(text)
        if key.startswith("env_kwargs."):
            hp["env_kwargs"] = {**hp.get("env_kwargs", {}), key.split(".", 1)[1]: value}
            continue
        if key not in known:
            from lrenv.problems import suggest
            raise ValueError(f"unknown hyperparameter {key!r}.{suggest(key, known)}")
        hp[key] = value
    for key in ("n_envs", "n_timesteps", "n_steps", "batch_size"):
        if key in hp:
            hp[key] = int(hp[key])
    if hp["n_envs"] < 1 or hp["n_timesteps"] < 1:
        raise ValueError(f"n_envs and n_timesteps must be >= 1, got {hp['n_envs']}, {hp['n_timesteps']}")
    return hp


def _policy_kwargs(value) -> dict:
    if isinstance(value, str):  # zoo files write "dict(net_arch=[64, 64])"
        node = ast.parse(value, mode="eval").body
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "dict"):
            raise ValueError(f"policy_kwargs must be a mapping or 'dict(...)', got {value!r}")
        value = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
    return dict(value or {})


# ----------------------------------------------------------------------------- environments
def make_env_fn(env_kwargs: dict, instances="train"):
    def make():
        from lrenv import NMFEnv
        return NMFEnv(instances=instances, **env_kwargs)
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
        from lrenv.vec_env import BatchedNMFVecEnv
        venv = BatchedNMFVecEnv(num_envs=n_envs, instances=instances, **kwargs)
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_model(model, run_dir: Path, name: str = "model") -> None:
    """Model (and VecNormalize statistics) written atomically: never a half-written file."""
    tmp = run_dir / f".{name}.tmp.zip"
    model.save(tmp)
    os.replace(tmp, run_dir / f"{name}.zip")
    venv = model.get_vec_normalize_env()
    if venv is not None and name == "model":
        tmp = run_dir / ".vecnormalize.tmp.pkl"
        venv.save(tmp)
        os.replace(tmp, run_dir / "vecnormalize.pkl")


def write_config(cfg: TrainConfig, run_dir: Path, extra: dict | None = None) -> None:
    import gymnasium
    import stable_baselines3
    from lrenv import __version__
    doc = {"train": dataclasses.asdict(cfg), "env": cfg.env_kwargs,
           "versions": {"lrenv": __version__, "torch": torch.__version__, "stable_baselines3": stable_baselines3.__version__,
                        "gymnasium": gymnasium.__version__, "python": sys.version.split()[0]}}
    doc.update(extra or {})
    atomic_write_text(run_dir / "config.json", json.dumps(doc, indent=2, default=str))


def latest_checkpoint(run_dir: Path) -> tuple[Path, Path | None, int]:
    """The newest checkpoint of a run: (model zip, VecNormalize pickle or None, timesteps)."""
    found = []
    for path in glob.glob(str(run_dir / "checkpoints" / "rl_model_*_steps.zip")):
        steps = int(re.search(r"rl_model_(\d+)_steps\.zip$", path).group(1))
        found.append((steps, Path(path)))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'checkpoints'}: the run was interrupted before its "
                                "first checkpoint; start it again without --resume")
    steps, path = max(found)
    pkl = run_dir / "checkpoints" / f"rl_model_vecnormalize_{steps}_steps.pkl"
    return path, (pkl if pkl.exists() else None), steps


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, resume: str | Path | None = None, extra_callbacks=()) -> Path:
    """Train (or resume) a run; returns its directory."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList, CheckpointCallback

    from lrenv.agents.callbacks import EpisodeStatsCallback, HeldoutEvalCallback, HParamCallback, ProgressCallback

    torch.set_num_threads(cfg.torch_threads)
    hp = cfg.hyperparams
    n_envs = hp["n_envs"]
    venv = make_vec_env(cfg, n_envs, "train", seed=cfg.seed)  # first: a bad config fails before any file is written
    if resume is None:
        run_dir = Path(cfg.runs_dir) / run_name(cfg.problem, cfg.exp, cfg.seed)
        run_dir.mkdir(parents=True, exist_ok=False)
        write_config(cfg, run_dir)
        print(f"run directory: {run_dir}", flush=True)
    else:
        run_dir = Path(resume)

    if resume is None:
        venv = wrap_normalize(venv, hp)
        model = make_model(cfg, venv, run_dir)
        done = 0
    else:
        ckpt, pkl, done = latest_checkpoint(run_dir)
        venv = wrap_normalize(venv, hp, path=str(pkl) if pkl else None)
        model = PPO.load(ckpt, env=venv, device=cfg.device)
        print(f"resuming {run_dir} from {ckpt.name} at {done} timesteps")

    from lrenv.problems import EVAL_SEEDS
    eval_seeds = [EVAL_SEEDS[i] for i in range(cfg.eval_episodes)]
    every = lambda steps: max(steps // n_envs, 1)  # noqa: E731  (callbacks count vector steps)
    from lrenv import NMFEnv
    budget = NMFEnv(**cfg.env_kwargs).task.budget  # (no engine is built: cheap)
    callbacks = [
        CheckpointCallback(every(cfg.checkpoint_freq), str(run_dir / "checkpoints"), name_prefix="rl_model",
                           save_vecnormalize=True),
        EpisodeStatsCallback(budget),
        HParamCallback(cfg),
    ]
    if cfg.eval_freq > 0:  # one held-out evaluation (learned vs fixed baselines, failures counted), one step axis
        callbacks.append(HeldoutEvalCallback(dict(cfg.env_kwargs, device=cfg.env_device, threads=env_threads(cfg)),
                                             eval_seeds, every(cfg.eval_freq), run_dir, seed=cfg.seed + 10_000))
    callbacks.append(ProgressCallback([cfg.eval_freq, cfg.checkpoint_freq], bar=cfg.progress))
    callbacks += list(extra_callbacks)
    remaining = hp["n_timesteps"] - done
    start = time.time()
    try:
        if remaining > 0:
            model.learn(remaining, callback=CallbackList(callbacks), tb_log_name="tb",
                        reset_num_timesteps=resume is None, progress_bar=False)
    except KeyboardInterrupt:
        save_model(model, run_dir, "interrupted")
        print(f"interrupted at {model.num_timesteps} timesteps; continue with: lrenv train --resume {run_dir}")
        raise
    finally:
        venv.close()
    save_model(model, run_dir)
    write_config(cfg, run_dir, {"result": {"timesteps": int(model.num_timesteps),
                                           "wall_time_s": round(time.time() - start, 1)}})
    return run_dir


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY:VALUE",
                   help="hyperparameter overrides in rl-zoo style, e.g. n_timesteps:50000 learning_rate:1e-3 "
                        "env_kwargs.action_mode:paper")
    p.add_argument("--problem", default="small", help="problem family name or path to a matrix file")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE", help="family parameter (repeatable)")
    p.add_argument("--exp", default="ppo", help="experiment name (part of the run directory name)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--hyperparams", default=str(HYPERPARAMS), help="YAML file of hyperparameters per family")
    p.add_argument("--vec", choices=VEC_KINDS, default="batched", help="vector env implementation")
    p.add_argument("--device", default="cpu", help="torch device of the policy")
    p.add_argument("--env-device", default="cpu", help="torch device of the environments (batched env: cuda)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the policy (PPO) in this process")
    p.add_argument("--env-threads", type=int, default=1,
                   help="torch threads of the environments' SGD on CPU (0: every core; more than one is slower on a "
                        "busy machine)")
    p.add_argument("--eval-freq", type=int, default=10_000, help="held-out evaluation every N timesteps (0: off)")
    p.add_argument("--eval-episodes", type=int, default=5, help="held-out instances per evaluation")
    p.add_argument("--checkpoint-freq", type=int, default=20_000, help="checkpoint every N timesteps")
    p.add_argument("--runs-dir", default="runs", help="where run directories are created")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from lrenv.problems import parse_problem_params
    return TrainConfig(problem=args.problem, problem_params=parse_problem_params(args.problem_param), exp=args.exp,
                       seed=args.seed, hyperparams=load_hyperparams(args.problem, args.overrides, args.hyperparams),
                       vec=args.vec, device=args.device, env_device=args.env_device, torch_threads=args.threads,
                       env_threads=args.env_threads, eval_freq=args.eval_freq, eval_episodes=args.eval_episodes,
                       checkpoint_freq=args.checkpoint_freq, runs_dir=args.runs_dir, progress=not args.no_progress)


def config_from_run(run_dir: str | Path) -> TrainConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --resume needs a run directory written by lrenv train")
    return TrainConfig(**json.loads(path.read_text())["train"])


def run(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = config_from_run(args.resume)
        cfg.progress = not args.no_progress
    else:
        cfg = config_from_args(args)
    try:
        run_dir = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return 130
    print(f"saved {run_dir / 'model.zip'}; view the curves with: tensorboard --logdir {cfg.runs_dir}")
    print(f"evaluate it against the baselines with: lrenv evaluate --problem {cfg.problem} --model {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lrenv.cli import main as cli_main
    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

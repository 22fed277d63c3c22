"""``lrenv benchmark SUITE --out DIR``: many training seeds x families x methods, run as independent trials.

A *suite* is a YAML file (shipped ones: ``lrenv/suites/{core,core-lite,smoke}.yml``; any path works) naming the families
(problem, params, budget), the agent configurations (``key:value`` hyperparameter overrides as ``lrenv train``
takes them, env kwargs), the training seeds, the baselines (evaluation method names) and the number of test
instances. :func:`expand` turns it into :class:`Trial` s of three kinds:

``train/<family>/<agent>/s<seed>``     train one PPO agent (``run/``: the layout ``lrenv train`` writes); an agent
                                       with ``train_on: <suite>`` trains on that problem suite (``train/suite-<name>/...``,
                                       shared by the families), or with ``leave_out`` on it minus the tested family
``agent/<family>/<agent>/s<seed>``     evaluate that agent on the test instances (``eval/``: ``lrenv evaluate``'s)
``baseline/<family>/<method>``         evaluate one baseline method on the same instances

Each trial owns ``DIR/<trial id>/`` and writes ``trial.json`` atomically *last*: a directory with that marker
is finished and never rerun; one without it (a killed or failed trial) is cleared and run again, so rerunning
the command resumes. Trials run as Ray core tasks (one CPU and one torch thread each) on a local Ray instance
using every core, or on an existing cluster (``--address``; ``DIR`` must then be on a filesystem every worker
sees), or in-process one after another (``--local``, for debugging: the same trial code). A trial that raises
or whose worker dies is reported with its error and the others go on; trials that depend on it are skipped.
When the trials are done, :mod:`lrenv.benchmark_report` aggregates them with rliable into ``report.md``,
``report.json``, figures and a TensorBoard HParams view.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import re
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

SUITES_DIR = Path(__file__).parent / "suites"
MARKER = "trial.json"
"""The completion marker of a trial directory, written atomically after everything else."""
FAILURE = "failed.json"
"""Written by the driver into the directory of a trial that failed (a rerun clears it)."""
FAULT_ENV = "LRENV_BENCHMARK_FAULT"
"""Fault injection for tests and drills: ``TRIAL_ID=exit`` (the worker process dies with ``os._exit`` after the
trial's work, before its marker) or ``TRIAL_ID=raise``; several separated by commas."""
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
KINDS = ("train", "agent", "baseline")


# ----------------------------------------------------------------------------- the suite
@dataclass
class Family:
    """One problem family of a suite: its report label, lrenv problem name, parameters and epoch budget."""

    label: str
    problem: str
    params: dict = field(default_factory=dict)
    budget: int | None = None


@dataclass
class Agent:
    """One agent configuration: hyperparameter overrides (``key:value``) and NMFEnv kwargs of its training."""

    name: str
    overrides: list[str] = field(default_factory=list)
    env_kwargs: dict = field(default_factory=dict)
    families: list[str] = field(default_factory=list)
    """Labels of the suite's families this agent is trained for and scored on (empty: every family)."""
    train_on: str | None = None
    """A problem suite (``suite:NAME`` or a suite ``.yml``, see :mod:`lrenv.suite`) to train one policy on
    instead of each tested family: the agent is then scored on families it may never have seen."""
    leave_out: bool = False
    """With ``train_on``: leave the tested family out of the training suite (leave-one-family-out), one
    training per tested family; families the suite does not hold share one training on the whole suite."""
    model: str = "final"
    """Which policy of each training is scored: ``final`` (``model.zip``, default) or ``best``
    (``best_model.zip``: the checkpoint that did best on the *validation* instances during training)."""


@dataclass
class Suite:
    """A benchmark: everything its trials depend on (see the shipped ``lrenv/suites/*.yml``)."""

    name: str
    families: list[Family]
    agents: list[Agent]
    seeds: list[int]
    baselines: list[str]
    test_instances: int = 10
    split: str = "test"
    penalty: float = 2.0
    train: dict = field(default_factory=dict)
    description: str = ""
    bootstrap_reps: int = 2000
    """Stratified-bootstrap replications of the report's CIs (the report only: not part of any trial)."""
    gpus_per_trial: float = 1.0
    """Ray GPUs a training trial asks for when its ``train`` settings put the envs or the policy on CUDA
    (``env_device: cuda``: the batched env steps all ``n_envs`` problems there); a fraction packs several
    trials per GPU. Trials on CPU ask for none."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


AGENT_KEYS = {"overrides", "env_kwargs", "families", "train_on", "leave_out", "model"}
AGENT_MODELS = {"final": "model.zip", "best": "best_model.zip"}
"""An agent's ``model`` setting: the file of its training run that is scored."""
SUITE_KEYS = {"description", "test_instances", "split", "seeds", "penalty", "families", "agents", "train",
              "baselines", "bootstrap_reps", "gpus_per_trial"}
TRAIN_KEYS = {"eval_freq", "eval_episodes", "checkpoint_freq", "vec", "env_device", "device"}
"""TrainConfig fields a suite may set for all its agent trials (threads are fixed: one per trial)."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def suite_path(name_or_path: str | os.PathLike) -> Path:
    """A shipped suite's name (``core``, ``smoke``) or a path to a YAML file -> the file."""
    p = Path(name_or_path)
    if p.suffix in (".yml", ".yaml") or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"suite file {p} not found")
        return p
    shipped = SUITES_DIR / f"{p}.yml"
    if not shipped.is_file():
        names = sorted(q.stem for q in SUITES_DIR.glob("*.yml"))
        raise ValueError(f"unknown suite {str(name_or_path)!r}: shipped suites are {', '.join(names)}; or give the "
                         "path of a YAML file")
    return shipped


def load_suite(name_or_path: str | os.PathLike) -> Suite:
    """Read and validate a suite; errors name the suite file and the key at fault."""
    path = suite_path(name_or_path)
    doc = yaml.safe_load(path.read_text()) or {}
    return parse_suite(doc, name=path.stem, source=str(path))


def parse_suite(doc: dict, name: str = "suite", source: str = "suite") -> Suite:
    """Validate a suite mapping (the YAML document) and return it as a :class:`Suite`."""
    def fail(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    if not isinstance(doc, dict):
        raise fail("a suite is a mapping of keys " + ", ".join(sorted(SUITE_KEYS)))
    unknown = set(doc) - SUITE_KEYS
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)}; a suite has {sorted(SUITE_KEYS)}")
    for key in ("families", "baselines"):
        if not doc.get(key):
            raise fail(f"'{key}' is missing or empty")
    families = []
    for label, spec in dict(doc["families"]).items():
        spec = dict(spec or {})
        bad = set(spec) - {"problem", "params", "budget"}
        if bad or not _NAME.match(str(label)):
            raise fail(f"family {label!r}: labels are plain names and entries have problem, params, budget "
                       f"(got {sorted(bad)})")
        budget = spec.get("budget")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise fail(f"family {label!r}: budget must be a positive integer, got {budget!r}")
        families.append(Family(str(label), str(spec.get("problem", label)), dict(spec.get("params") or {}), budget))
    agents = []
    for aname, spec in dict(doc.get("agents") or {}).items():
        spec = dict(spec or {})
        bad = set(spec) - AGENT_KEYS
        if bad or not _NAME.match(str(aname)):
            raise fail(f"agent {aname!r}: names are plain names and entries have {', '.join(sorted(AGENT_KEYS))} "
                       f"(got {sorted(bad)})")
        overrides = [str(o) for o in (spec.get("overrides") or [])]
        for o in overrides:
            if ":" not in o:
                raise fail(f"agent {aname!r}: override {o!r} is not key:value")
        model = spec.get("model", "final")
        if model not in AGENT_MODELS:
            raise fail(f"agent {aname!r}: 'model' is {' or '.join(AGENT_MODELS)} (best: the checkpoint chosen on the "
                       f"validation instances during training), got {model!r}")
        agents.append(Agent(str(aname), overrides, dict(spec.get("env_kwargs") or {}),
                            *_agent_scope(aname, spec, [f.label for f in families], fail), model=model))
    seeds = doc.get("seeds", [0])
    if agents and (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds)
                   or len(set(seeds)) != len(seeds)):
        raise fail(f"'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
    n = doc.get("test_instances", 10)
    if not isinstance(n, int) or n < 1:
        raise fail(f"'test_instances' must be a positive integer, got {n!r}")
    penalty = float(doc.get("penalty", 2.0))
    if penalty < 1:
        raise fail(f"'penalty' must be >= 1 (a miss counts penalty x budget epochs), got {penalty}")
    train = dict(doc.get("train") or {})
    if set(train) - TRAIN_KEYS:
        raise fail(f"'train' may set {sorted(TRAIN_KEYS)}, got {sorted(set(train) - TRAIN_KEYS)}")
    baselines = [str(b) for b in doc["baselines"]]
    gpus = doc.get("gpus_per_trial", 1.0)
    if not isinstance(gpus, (int, float)) or not 0 < gpus <= 8:
        raise fail(f"'gpus_per_trial' must be a number in (0, 8], got {gpus!r}")
    reps = doc.get("bootstrap_reps", 2000)
    if not isinstance(reps, int) or reps < 100:
        raise fail(f"'bootstrap_reps' must be an integer >= 100, got {reps!r}")
    return Suite(name=name, families=families, agents=agents, seeds=list(seeds), baselines=baselines,
                 test_instances=n, split=str(doc.get("split", "test")), penalty=penalty, train=train,
                 description=str(doc.get("description", "")), bootstrap_reps=reps,
                 gpus_per_trial=float(gpus))


def _agent_scope(name: str, spec: dict, labels: list[str], fail: Callable[[str], ValueError]
                 ) -> tuple[list[str], str | None, bool]:
    """An agent's ``families``, ``train_on`` and ``leave_out``, checked: the families exist in the suite, the
    training suite loads, ``leave_out`` only with ``train_on``."""
    fams = spec.get("families") or []
    if not isinstance(fams, list) or not all(isinstance(f, str) for f in fams):
        raise fail(f"agent {name!r}: 'families' is a list of the suite's family labels, got {fams!r}")
    unknown = [f for f in fams if f not in labels]
    if unknown:
        raise fail(f"agent {name!r}: families {unknown} are not in the suite (its families: {', '.join(labels)})")
    train_on, leave_out = spec.get("train_on"), spec.get("leave_out", False)
    if not isinstance(leave_out, bool):
        raise fail(f"agent {name!r}: 'leave_out' is true or false, got {leave_out!r}")
    if train_on is None:
        if leave_out:
            raise fail(f"agent {name!r}: 'leave_out' needs 'train_on' (the suite to leave the tested family out of)")
        return list(fams), None, False
    from lrenv.suite import is_suite, load_suite, suite_name
    train_on = str(train_on)
    if not is_suite(train_on):
        raise fail(f"agent {name!r}: 'train_on' is a problem suite (suite, suite:NAME or a suite .yml), "
                   f"got {train_on!r}")
    try:
        load_suite(suite_name(train_on))
    except (ValueError, OSError) as e:
        raise fail(f"agent {name!r}: train_on {train_on!r}: {e}") from None
    return list(fams), train_on, leave_out


def _training_problem(agent: Agent, fam: Family) -> tuple[str, dict]:
    """Where ``agent`` trains for tested family ``fam``: ``(label, problem spec)``; agents that share a label
    share one training trial."""
    if agent.train_on is None:
        return fam.label, {"problem": fam.problem, "problem_params": fam.params, "budget": fam.budget,
                           "env_kwargs": agent.env_kwargs}
    from lrenv.suite import load_suite, problem_label, suite_name
    held = {e.problem for e in load_suite(suite_name(agent.train_on)).entries}
    spec = {"problem": agent.train_on, "problem_params": {}, "budget": None, "env_kwargs": agent.env_kwargs}
    if agent.leave_out and fam.problem in held:
        if held == {fam.problem}:
            raise ValueError(f"agent {agent.name!r}: leaving {fam.problem!r} out of {agent.train_on!r} leaves "
                             "nothing to train on")
        given = agent.env_kwargs.get("exclude") or []
        excluded = sorted({*([given] if isinstance(given, str) else given), fam.problem})
        return fam.label, {**spec, "env_kwargs": {**agent.env_kwargs, "exclude": excluded}}
    return problem_label(agent.train_on), spec


# ----------------------------------------------------------------------------- trials
@dataclass(frozen=True)
class Trial:
    """One unit of work. ``spec`` holds everything its result depends on: a finished trial whose stored spec
    differs from the suite's is an error, never silently reused."""

    id: str
    kind: str
    family: str
    method: str
    seed: int | None
    spec: dict
    depends: tuple[str, ...] = ()
    gpus: float = 0.0
    """Ray GPU resources the trial asks for (training on CUDA only)."""

    @property
    def path(self) -> str:
        """The trial's directory relative to the benchmark's output directory."""
        return "/".join(re.sub(r"[^A-Za-z0-9._+-]", "_", part) for part in self.id.split("/"))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "depends": list(self.depends), "path": self.path}


def expand(suite: Suite) -> list[Trial]:
    """The suite's trials, training trials first (they take longest and others wait for them)."""
    trials: list[Trial] = []
    evals: list[Trial] = []
    on_gpu = any(str(suite.train.get(k, "cpu")).startswith("cuda") for k in ("env_device", "device"))
    gpus = suite.gpus_per_trial if on_gpu else 0.0
    seen: set[str] = set()
    for fam in suite.families:
        problem = {"problem": fam.problem, "problem_params": fam.params, "budget": fam.budget}
        evaluation = {**problem, "test_instances": suite.test_instances, "split": suite.split}
        for agent in suite.agents:
            if agent.families and fam.label not in agent.families:
                continue
            where, train_problem = _training_problem(agent, fam)
            for seed in suite.seeds:
                tid = f"train/{where}/{agent.name}/s{seed}"
                if tid not in seen:  # an agent trained on a whole suite: one training for every tested family
                    seen.add(tid)
                    trials.append(Trial(tid, "train", where, agent.name, seed,
                                        {**train_problem, "overrides": agent.overrides, "seed": seed,
                                         "train": suite.train}, gpus=gpus))
                evals.append(Trial(f"agent/{fam.label}/{agent.name}/s{seed}", "agent", fam.label, agent.name, seed,
                                   {**evaluation, "train_trial": tid, **({"model": agent.model}
                                                                          if agent.model != "final" else {})},
                                   depends=(tid,)))
        for method in suite.baselines:
            evals.append(Trial(f"baseline/{fam.label}/{method}", "baseline", fam.label, method, None,
                               {**evaluation, "method": method}))
    ids = [t.id for t in trials + evals]
    paths = [t.path for t in trials + evals]
    if len(set(paths)) != len(paths):
        dup = sorted({p for p in paths if paths.count(p) > 1})
        raise ValueError(f"suite {suite.name}: trials {dup} map to the same directory; rename the baselines or agents")
    assert len(set(ids)) == len(ids)
    return trials + evals


# ----------------------------------------------------------------------------- files
def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_marker(out_dir: str | os.PathLike, trial: Trial) -> dict | None:
    """The trial's completion marker, or None when it has not finished."""
    path = Path(out_dir) / trial.path / MARKER
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def check_marker(trial: Trial, marker: dict, out_dir: str | os.PathLike) -> None:
    """A finished trial must have been run with this suite's spec for it; otherwise say what to do."""
    if marker.get("spec") != _normalise(trial.spec):
        raise ValueError(f"trial {trial.id} in {out_dir} finished with a different configuration than the suite "
                         f"now asks for (stored {marker.get('spec')}, suite {_normalise(trial.spec)}); use another "
                         f"--out, or delete {Path(out_dir) / trial.path} to run it again")


# ----------------------------------------------------------------------------- running one trial
def _save_curves(path: Path, traces: dict) -> None:
    """Per-epoch losses of every run (method, instance), for the report's loss-curve figures."""
    import numpy as np
    arrays = {f"{name}::{t.seed_index}": np.asarray(t.loss, dtype=np.float64)
              for name, ts in traces.items() for t in ts}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _run_evaluation(trial: Trial, tdir: Path, out_dir: Path) -> dict:
    from lrenv.evaluate import evaluate
    from lrenv.schedules import load_policy
    spec = trial.spec
    if trial.kind == "agent":
        train_dir = out_dir / Trial(spec["train_trial"], "train", "", "", None, {}).path / "run"
        model = AGENT_MODELS[spec.get("model", "final")]
        methods: Any = [load_policy(train_dir / model, name=trial.method)]
    else:
        methods = spec["method"]
    result = evaluate(methods, problem=spec["problem"], problem_params=spec["problem_params"],
                      seeds=spec["test_instances"], budget=spec["budget"], out_dir=str(tdir / "eval"),
                      progress=False, verbose=False, tensorboard=False, threads=1, split=spec["split"],
                      workers=1)  # one trial per core: Ray already runs a trial on every core
    _save_curves(tdir / "curves.npz", result.traces)
    return {"split": spec["split"], "methods": sorted(result.traces), "notes": result.notes}


def _run_training(trial: Trial, tdir: Path) -> dict:
    from lrenv.agents.train import TrainConfig, load_hyperparams, train
    spec = trial.spec
    hp = load_hyperparams(spec["problem"], spec["overrides"])
    env_kwargs = {**hp.get("env_kwargs", {}), **spec["env_kwargs"]}
    if spec["budget"] is not None:
        env_kwargs["budget"] = spec["budget"]
    hp["env_kwargs"] = env_kwargs
    cfg = TrainConfig(problem=spec["problem"], problem_params=spec["problem_params"], exp=trial.method,
                      seed=spec["seed"], hyperparams=hp, torch_threads=1, env_threads=1, env_workers=1,
                      runs_dir=str(tdir),
                      progress=False, **spec["train"])
    run_dir = train(cfg)
    os.replace(run_dir, tdir / "run")  # a fixed name: the agent trial and the report find it without a glob
    return {"timesteps": int(hp["n_timesteps"]), "run": "run"}


def _fault(trial_id: str, faults: dict[str, str] | None) -> None:
    """Fault injection (tests): kill this process or raise, as :data:`FAULT_ENV` describes."""
    mode = (faults or {}).get(trial_id)
    if mode == "exit":
        os._exit(17)  # no cleanup, no exception: what a killed worker looks like
    if mode == "raise":
        raise RuntimeError(f"fault injected into trial {trial_id}")


def run_trial(trial: Trial | dict, out_dir: str | os.PathLike, faults: dict[str, str] | None = None) -> dict:
    """Run one trial in this process and return its marker. Shared by Ray workers and ``--local``.

    A leftover directory without a marker (a trial killed earlier) is cleared first; the marker is written
    last, atomically, so a trial is either finished with all its files or not finished at all."""
    import torch

    trial = trial if isinstance(trial, Trial) else Trial(**{k: v for k, v in trial.items() if k != "path"})
    out_dir = Path(out_dir)
    tdir = out_dir / trial.path
    if (tdir / MARKER).is_file():
        return json.loads((tdir / MARKER).read_text())
    if tdir.exists():
        shutil.rmtree(tdir)
    tdir.mkdir(parents=True)
    torch.set_num_threads(1)  # one trial per core: more threads per trial only wait for each other
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if trial.kind == "train":
        info = _run_training(trial, tdir)
    elif trial.kind in ("agent", "baseline"):
        info = _run_evaluation(trial, tdir, out_dir)
    else:
        raise ValueError(f"unknown trial kind {trial.kind!r}; expected one of {KINDS}")
    _fault(trial.id, faults)
    import lrenv
    marker = {"status": "done", "id": trial.id, "kind": trial.kind, "family": trial.family, "method": trial.method,
              "seed": trial.seed, "spec": _normalise(trial.spec), "wall_s": round(time.perf_counter() - wall0, 3),
              "cpu_s": round(time.process_time() - cpu0, 3), "torch_threads": torch.get_num_threads(),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "host": socket.gethostname(), "pid": os.getpid(),
              "lrenv": os.path.dirname(lrenv.__file__), "python": platform.python_version(),
              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **info}
    atomic_write_json(tdir / MARKER, marker)
    return marker


# ----------------------------------------------------------------------------- executors
class _LocalExecutor:
    """In-process, one trial after another (``--local``): the same :func:`run_trial`, no Ray."""

    slots = 1

    def __init__(self, out_dir: Path, faults: dict[str, str] | None):
        self.out_dir, self.faults, self.done = out_dir, faults, []

    def submit(self, trial: Trial) -> None:
        try:
            self.done.append((trial, "done", run_trial(trial, self.out_dir, self.faults)))
        except Exception as e:  # noqa: BLE001 - a failed trial is reported; the others go on
            self.done.append((trial, "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))

    def wait(self) -> tuple[Trial, str, Any]:
        return self.done.pop(0)

    def pending(self) -> int:
        return len(self.done)

    def close(self) -> None:
        pass


class _RayExecutor:
    """Ray core tasks, one CPU each, no retries (a killed trial is reported, and the rerun resumes it)."""

    def __init__(self, out_dir: Path, faults: dict[str, str] | None, *, address: str | None,
                 num_cpus: int | None, max_concurrent: int | None):
        import ray
        self.ray = ray
        self.started = init_ray(address=address, num_cpus=num_cpus)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.slots = max(1, min(cpus, max_concurrent or cpus))
        self.remote = ray.remote(num_cpus=1, max_retries=0)(run_trial)
        self.out_dir, self.faults = out_dir, faults
        self.inflight: dict[Any, Trial] = {}

    def submit(self, trial: Trial) -> None:
        ref = self.remote.options(name=trial.id, num_gpus=trial.gpus).remote(trial.to_dict(), str(self.out_dir),
                                                                            self.faults)
        self.inflight[ref] = trial

    def wait(self) -> tuple[Trial, str, Any]:
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
        trial = self.inflight.pop(ready[0])
        try:
            return trial, "done", self.ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - RayTaskError (raised inside) or WorkerCrashedError (killed)
            cause = getattr(e, "cause", None)
            text = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(e).__name__}: {e}"
            return trial, "failed", text

    def pending(self) -> int:
        return len(self.inflight)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless this process already is: an existing cluster at ``address``, else a local instance
    on ``num_cpus`` (default: every core). Every task gets one thread per math library (``THREAD_ENV``). Local
    workers import what this process imports (its PYTHONPATH); a cluster gets this lrenv package shipped with the
    job (its dependencies must be installed there). Returns whether this call started the connection (the caller
    then shuts it down)."""
    import ray
    if ray.is_initialized():
        return False
    env_vars = dict(THREAD_ENV)
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if address:
        import lrenv
        runtime_env["py_modules"] = [os.path.dirname(lrenv.__file__)]
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    else:
        if os.environ.get("PYTHONPATH"):
            env_vars["PYTHONPATH"] = os.environ["PYTHONPATH"]
        ray.init(num_cpus=num_cpus or available_cores(), include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env)
    return True


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_faults(text: str | None) -> dict[str, str]:
    """``'trial/id=exit,other/id=raise'`` -> mapping (see :data:`FAULT_ENV`)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if part.strip():
            tid, _, mode = part.strip().rpartition("=")
            if mode not in ("exit", "raise") or not tid:
                raise ValueError(f"{FAULT_ENV}: expected TRIAL_ID=exit or TRIAL_ID=raise, got {part!r}")
            out[tid] = mode
    return out


# ----------------------------------------------------------------------------- the driver
@dataclass
class BenchmarkResult:
    """What a benchmark run left: every trial's status (done / failed / blocked) and the report, if any."""

    out_dir: Path
    trials: list[dict]
    report: dict | None
    wall_s: float

    @property
    def failed(self) -> list[dict]:
        return [t for t in self.trials if t["status"] != "done"]


def _line(trial: Trial, status: str, info: Any, reused: bool = False) -> str:
    if status == "done":
        how = "already finished" if reused else f"{info['wall_s']:.1f} s wall, {info['cpu_s']:.1f} s CPU"
        return f"done     {trial.id}  ({how})"
    first = str(info).strip().splitlines()[0] if str(info).strip() else "?"
    return f"{status.upper():8s} {trial.id}: {first}"


def run_benchmark(suite: Suite | str | os.PathLike, out_dir: str | os.PathLike, *, local: bool = False,
                  address: str | None = None, num_cpus: int | None = None, max_concurrent: int | None = None,
                  progress: bool = True, faults: dict[str, str] | None = None, report: bool = True,
                  log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Run (or resume) every unfinished trial of ``suite`` under ``out_dir``, then write the report.

    Finished trials (``trial.json`` present, same spec) are reused as they are; failed or killed ones are
    reported and their dependents skipped, and the report covers what finished (marked incomplete)."""
    from tqdm.auto import tqdm

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    faults = {**parse_faults(os.environ.get(FAULT_ENV)), **(faults or {})}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = expand(suite)
    atomic_write_json(out / "suite.json", {"suite": suite.to_dict(), "trials": [t.to_dict() for t in trials]})
    status: dict[str, dict] = {}
    for t in trials:
        marker = read_marker(out, t)
        if marker is not None:
            check_marker(t, marker, out)
            status[t.id] = {**t.to_dict(), **marker, "status": "done", "reused": True}

    t0 = time.perf_counter()
    bar = tqdm(total=len(trials), initial=len(status), desc=f"benchmark {suite.name}", unit="trial",
               disable=not progress, file=sys.stderr)
    def say(line: str) -> None:  # one line per finished trial, flushed (a log file sees it at once)
        if log is not None:
            log(line)
        else:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()

    todo = [t for t in trials if t.id not in status]
    if todo:
        executor: Any = (_LocalExecutor(out, faults) if local else
                         _RayExecutor(out, faults, address=address, num_cpus=num_cpus, max_concurrent=max_concurrent))
        try:
            queue = list(todo)
            while queue or executor.pending():
                # blocked: a dependency failed; ready: every dependency finished
                for t in [t for t in queue if any(status.get(d, {}).get("status") in ("failed", "blocked")
                                                   for d in t.depends)]:
                    queue.remove(t)
                    dep = next(d for d in t.depends if status[d]["status"] != "done")
                    status[t.id] = {**t.to_dict(), "status": "blocked", "error": f"dependency {dep} did not finish"}
                    say(_line(t, "blocked", status[t.id]["error"]))
                    bar.update(1)
                ready = [t for t in queue if all(status.get(d, {}).get("status") == "done" for d in t.depends)]
                for t in ready[: max(0, executor.slots - executor.pending())]:
                    queue.remove(t)
                    executor.submit(t)
                if not executor.pending():
                    continue
                trial, state, info = executor.wait()
                if state == "done":
                    status[trial.id] = {**trial.to_dict(), **info, "status": "done", "reused": False}
                else:
                    status[trial.id] = {**trial.to_dict(), "status": "failed", "error": info}
                    tdir = out / trial.path
                    if tdir.is_dir():
                        atomic_write_json(tdir / FAILURE, {"id": trial.id, "error": info})
                say(_line(trial, state, info))
                bar.update(1)
        finally:
            executor.close()
    bar.close()
    wall = time.perf_counter() - t0
    records = [status[t.id] for t in trials]
    rep = None
    if report and any(r["status"] == "done" and r["kind"] != "train" for r in records):
        from lrenv.benchmark_report import build_report
        rep = build_report(out, suite.to_dict(), records)
    return BenchmarkResult(out_dir=out, trials=records, report=rep, wall_s=wall)


def plan(suite: Suite) -> str:
    """The trials a suite expands to, by kind, as text (``--plan``)."""
    trials = expand(suite)
    lines = [f"suite {suite.name}: {len(trials)} trials "
             + ", ".join(f"{sum(t.kind == k for t in trials)} {k}" for k in KINDS)]
    lines += [f"  {t.id}" + (f"  (after {', '.join(t.depends)})" if t.depends else "") for t in trials]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    shipped = ", ".join(sorted(q.stem for q in SUITES_DIR.glob("*.yml")))
    p.description = ("Run a benchmark suite: train every agent configuration with every training seed on every "
                     "family, evaluate the agents and the baselines on the test instances, each as its own trial "
                     "(on Ray by default), then aggregate them with rliable into report.md/report.json, figures and "
                     "a TensorBoard HParams view. Rerunning the same command resumes: finished trials are kept.")
    p.add_argument("suite", help=f"a shipped suite ({shipped}) or the path of a suite YAML file")
    p.add_argument("--out", required=False, help="output directory (one subdirectory per trial; reused to resume)")
    p.add_argument("--address", default=None, help="address of an existing Ray cluster (default: start a local "
                   "Ray instance on this machine's cores); --out must then be on a filesystem every worker sees")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: every core)")
    p.add_argument("--max-concurrent", type=int, default=None, help="most trials running at once (default: the "
                   "cluster's CPUs)")
    p.add_argument("--local", action="store_true", help="no Ray: run the trials in this process one after another "
                   "(debugging)")
    p.add_argument("--plan", action="store_true", help="list the suite's trials and exit")
    p.add_argument("--report-only", action="store_true", help="run nothing: aggregate the finished trials in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    suite = load_suite(args.suite)
    if args.plan:
        print(plan(suite))
        return 0
    if not args.out:
        raise ValueError("--out DIR is required (where the trials and the report are written)")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
    if args.report_only:
        from lrenv.benchmark_report import build_report
        records = []
        for t in expand(suite):
            marker = read_marker(args.out, t)
            records.append({**t.to_dict(), **(marker or {}), "status": "done" if marker else "missing"})
        rep = build_report(Path(args.out), suite.to_dict(), records)
        print(Path(args.out) / "report.md")
        return 0 if rep["complete"] else 1
    result = run_benchmark(suite, args.out, local=args.local, address=args.address, num_cpus=args.num_cpus,
                           max_concurrent=args.max_concurrent, progress=not args.no_progress)
    if result.report is not None:
        print(result.report["headline_markdown"])
        print(f"report: {result.out_dir / 'report.md'}")
    print(f"{len(result.trials) - len(result.failed)}/{len(result.trials)} trials finished in {result.wall_s:.1f} s")
    if result.failed:
        print(f"{len(result.failed)} did not finish: " + ", ".join(t["id"] for t in result.failed)
              + f"; rerun `lrenv benchmark {args.suite} --out {args.out}` to resume", file=sys.stderr)
        return 1
    return 0

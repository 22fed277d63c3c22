"""Generalist training: one environment that draws the problem family, its size and the instance per episode.

A *suite* is a weighted list of entries; an entry is a problem family with its parameters::

    name: my-suite                      # optional (default: the file's name)
    description: what it is for         # optional
    entries:
      - problem: small                  # a family name (lrenv.problems) or a matrix file
        problem_params: {m: 300, n: 30, rank: 3}
        weight: 1                       # relative probability of the entry per episode (default 1)
        name: small-300x30              # optional (default: the problem, with its parameters)
      - digits                          # shorthand for {problem: digits}

(a bare list of entries is accepted too). Built-in suites (:data:`SUITES`): ``generalist`` (the cheap families
small, tutorial, illcond, digits, sales; the default) and ``sizes-small`` (synthetic NMF at 300x30, 500x50 and
1000x100, to train on before testing on ``medium`` and ``paper``). ``exclude`` drops entries by entry name or
family name (leave-one-family-out: the generalist suite minus ``digits``).

:class:`SuiteEnv` runs each episode on a cached :class:`lrenv.NMFEnv` of the drawn entry; :func:`make_env` builds
a SuiteEnv or an NMFEnv from the same keywords (``problem="suite:generalist"`` or ``problem="digits"``), which is
what training uses. A suite names the problem of ``lrenv train --problem suite | suite:NAME | FILE.yml``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import gymnasium as gym
import numpy as np

from .env import NMFEnv, resolve_instances
from .problems import make_family, suggest
from .task import TaskConfig

SUITE_ENV_ID = "lrenv/NMF-suite-v0"
"""The gymnasium id of :class:`SuiteEnv` (default suite ``generalist``; ``suite=`` picks another)."""
SUITE_PROBLEM = "suite"
"""The problem name of the default suite; ``suite:NAME`` names another, a ``.yml``/``.yaml`` path a file."""
DEFAULT_SUITE = "generalist"
SUITE_FILE_EXTENSIONS = (".yml", ".yaml")

SUITES: dict[str, dict[str, Any]] = {
    "generalist": {
        "description": "the cheap families, one entry each: synthetic NMF (small), biased MF (tutorial), the "
                       "ill-conditioned linear net (illcond), digits and partially observed sales. medium and paper "
                       "are left out: their episodes cost 10x-1000x more (1000 epochs at 3000x300 and 10000x1000, "
                       "about 40 ms an epoch for paper), so a few of them would take most of a training run; they "
                       "are the size-transfer test instead",
        "entries": [{"problem": p} for p in ("small", "tutorial", "illcond", "digits", "sales")],
    },
    "sizes-small": {
        "description": "synthetic NMF (the small family's generator, density, noise and 200-epoch budget) at sizes "
                       "up to small's, rank m/100: train here, test on medium (3000x300) and paper (10000x1000)",
        "entries": [{"name": f"small-{m}x{m // 10}", "problem": "small", "problem_params": {"m": m, "n": m // 10,
                                                                                             "rank": m // 100}}
                    for m in (300, 500)] + [{"name": "small", "problem": "small"}],
    },
}
"""Built-in suites by name (``lrenv train --problem suite:NAME``)."""

ENTRY_KEYS = ("problem", "problem_params", "weight", "name")
_SUITE_WIDE = ({f.name for f in fields(TaskConfig)}
               | {"budget", "num_blocks", "grad_noise", "device", "dtype", "threads", "instances", "render_mode"})
"""Settings of the whole suite: an entry that sets one is refused (every entry shares the spaces and the MDP)."""


def is_suite(problem: Any) -> bool:
    """True for a suite's problem name: ``suite``, ``suite:NAME`` or a ``.yml``/``.yaml`` suite file."""
    if not isinstance(problem, (str, os.PathLike)):
        return False
    text = os.fspath(problem)
    return (text == SUITE_PROBLEM or text.startswith(SUITE_PROBLEM + ":")
            or os.path.splitext(text)[1].lower() in SUITE_FILE_EXTENSIONS)


def suite_name(problem: str) -> str:
    """The suite a problem name refers to: ``suite`` -> the default, ``suite:NAME`` -> NAME, a file -> itself."""
    text = os.fspath(problem)
    if text == SUITE_PROBLEM:
        return DEFAULT_SUITE
    return text.split(":", 1)[1] if text.startswith(SUITE_PROBLEM + ":") else text


def problem_label(problem: str) -> str:
    """A short name for run directories: ``suite-generalist``, ``suite-my`` (file ``my.yml``), or the family."""
    from pathlib import Path
    if is_suite(problem):
        return f"suite-{Path(suite_name(problem)).stem}"
    return Path(problem).stem or "problem"


# ----------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class SuiteEntry:
    """One entry: a problem family with its parameters, drawn with probability proportional to ``weight``."""

    name: str
    problem: str
    problem_params: dict = field(default_factory=dict)
    weight: float = 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "problem": self.problem, "problem_params": dict(self.problem_params),
                "weight": self.weight}


@dataclass(frozen=True)
class Suite:
    """A named, weighted list of entries (after ``exclude``)."""

    name: str
    entries: tuple[SuiteEntry, ...]
    description: str = ""
    excluded: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The resolved suite, as a run's config.json records it."""
        return {"name": self.name, "description": self.description, "excluded": list(self.excluded),
                "entries": [e.to_dict() for e in self.entries]}

    @property
    def problems(self) -> list[str]:
        """The entries' families, each once, in order (what a suite-trained policy can be evaluated on)."""
        return list(dict.fromkeys(e.problem for e in self.entries))


def _entry_name(problem: str, params: dict) -> str:
    if not params:
        return str(problem)
    return f"{problem}[{','.join(f'{k}={v}' for k, v in params.items())}]"


def _parse_entry(label: str, i: int, raw: Any) -> SuiteEntry:
    where = f"suite {label!r}, entry {i + 1}"
    if isinstance(raw, str):
        raw = {"problem": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an entry is a mapping (problem, problem_params, weight, name) or a family name, "
                         f"got {raw!r}")
    if "name" in raw:
        where = f"suite {label!r}, entry {raw['name']!r}"
    elif "problem" in raw:
        where = f"suite {label!r}, entry {i + 1} ({raw['problem']})"
    for key in raw:
        if key == "budget":
            raise ValueError(f"{where}: the budget is the family's; give it as problem_params: {{budget: N}} (or "
                             "budget for every entry at once)")
        if key in _SUITE_WIDE:
            raise ValueError(f"{where}: {key!r} is a setting of the whole suite, not of one entry: every entry must "
                             "give the same observation and action spaces and the same decision rules (set it for "
                             f"the suite: SuiteEnv({key}=...), or env_kwargs.{key} in training)")
        if key not in ENTRY_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}.{suggest(key, ENTRY_KEYS)} Entries have "
                             f"{', '.join(ENTRY_KEYS)}")
    if "problem" not in raw:
        raise ValueError(f"{where}: no problem (a family name such as small, or a matrix file)")
    problem, params = raw["problem"], raw.get("problem_params") or {}
    if not isinstance(problem, (str, os.PathLike)) or is_suite(problem):
        raise ValueError(f"{where}: problem must be a family name or a matrix file, got {problem!r}")
    if not isinstance(params, dict):
        raise ValueError(f"{where}: problem_params must be a mapping, got {params!r}")
    weight = raw.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
        raise ValueError(f"{where}: weight must be a positive number, got {weight!r}")
    name = raw.get("name", _entry_name(os.fspath(problem), params))
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: name must be a non-empty string, got {name!r}")
    return SuiteEntry(name=name, problem=os.fspath(problem), problem_params=dict(params), weight=float(weight))


def _read_file(path: str) -> Any:
    import yaml
    if not os.path.isfile(path):
        raise FileNotFoundError(f"suite file not found: {path}")
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ValueError(f"suite file {path}: not valid YAML ({' '.join(str(e).split())})") from None


def load_suite(spec: str | os.PathLike | dict | list | Suite = DEFAULT_SUITE,
               exclude: str | list[str] | tuple[str, ...] | None = ()) -> Suite:
    """A suite from a built-in name (:data:`SUITES`), a YAML file, a mapping or a list of entries, minus the
    entries ``exclude`` names (by entry name or family name). Every error names the suite and the entry."""
    if isinstance(spec, Suite):
        name, doc = spec.name, {"description": spec.description, "entries": [e.to_dict() for e in spec.entries]}
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text in SUITES:
            name, doc = text, SUITES[text]
        elif os.path.splitext(text)[1].lower() in SUITE_FILE_EXTENSIONS:
            name, doc = os.path.splitext(os.path.basename(text))[0], _read_file(text)
        else:
            raise ValueError(f"unknown suite {text!r}.{suggest(text, SUITES)} Built-in suites: {', '.join(SUITES)}; "
                             "or a .yml/.yaml file of entries")
    else:
        name, doc = "custom", spec
    if isinstance(doc, list):
        doc = {"entries": doc}
    if not isinstance(doc, dict):
        raise ValueError(f"suite {name!r}: expected a mapping with entries: [...] or a list of entries, got "
                         f"{type(doc).__name__}")
    unknown = set(doc) - {"name", "description", "entries"}
    if unknown:
        raise ValueError(f"suite {name!r}: unknown keys {sorted(unknown)}; a suite has name, description, entries")
    name = str(doc.get("name", name))
    raw = doc.get("entries")
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"suite {name!r}: entries must be a non-empty list")
    entries = [_parse_entry(name, i, e) for i, e in enumerate(raw)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise ValueError(f"suite {name!r}: two entries are named {e.name!r}; give them distinct name: keys")
        seen.add(e.name)
    excluded = (exclude,) if isinstance(exclude, str) else tuple(exclude or ())
    for x in excluded:
        if not isinstance(x, str) or not any(x in (e.name, e.problem) for e in entries):
            known = sorted({e.name for e in entries} | {e.problem for e in entries})
            raise ValueError(f"exclude: suite {name!r} has no entry or family {x!r}.{suggest(str(x), known)} "
                             f"Entries and families: {', '.join(known)}")
    kept = tuple(e for e in entries if e.name not in excluded and e.problem not in excluded)
    if not kept:
        raise ValueError(f"exclude {list(excluded)} leaves suite {name!r} without entries")
    return Suite(name=name, entries=kept, description=str(doc.get("description", "")), excluded=excluded)


def check_scale_free(task: TaskConfig, suite: str = "suite") -> None:
    """Refuse the settings whose meaning depends on a problem's scale: one policy acts on every entry, whose
    step-size bounds 2/L differ by orders of magnitude, so its actions and observations must be relative."""
    why = None
    if task.action_mode == "paper":
        why = ("action_mode 'paper' is an absolute learning rate in [0, lr_max]: the same action is a different "
               "step on every entry (their bounds 2/L differ by orders of magnitude)")
    elif task.action_mode == "relative" and task.lr_reference == "absolute":
        why = ("lr_reference 'absolute' gives lr_init, lr_min and lr_max in absolute units, a different fraction "
               "of the bound 2/L on every entry; use lr_reference 'bound' (the default)")
    elif "bound" in task.obs_features:
        why = "the 'bound' observation is log10(2/L) itself, absolute: use 'lr_bound' (the step relative to 2/L)"
    elif task.target_loss is not None:
        why = "target_loss is an absolute loss; each entry's instances carry their own target"
    if why:
        raise ValueError(f"{suite}: {why}. A suite needs scale-free settings: action_mode 'relative', "
                         "'log_bound' or 'per_factor'")


# ----------------------------------------------------------------------------- the environment
class SuiteEnv(gym.Env[np.ndarray, np.ndarray]):
    """:class:`lrenv.NMFEnv` over a suite: each reset draws an entry (family + parameters, e.g. a size) and an
    instance, then the episode runs on that entry's NMFEnv (one per entry, built at its first draw).

    ## Action Space
    The suite's: ``Box(-1, 1, (1,))`` (``(2,)`` for ``per_factor``), read as :class:`lrenv.NMFEnv` reads it in
    the suite's ``action_mode``, relative to each entry's own bound 2/L (``log_bound``, ``per_factor``) or step
    in force (``relative``). Only scale-free modes: ``paper`` (an absolute learning rate) is refused, as are
    ``lr_reference='absolute'``, the ``bound`` observation and an absolute ``target_loss``
    (:func:`check_scale_free`).

    ## Observation Space
    ``Box(-obs_clip, obs_clip, float32)`` with the suite's ``obs_features`` (NMFEnv's table), the same on every
    entry. They are ratios, so every entry gives numbers on one scale; ``epoch`` and ``epochs_left`` are
    fractions of the entry's own budget.

    ## Rewards
    NMFEnv's, with the suite's ``reward``. Budgets may differ per entry (each family's, from its
    ``problem_params``, or ``budget=`` for every entry): the target bonus, ``remaining`` per epoch left, is then
    worth more on a longer budget, and an episode's time cost grows with its length; the progress reward's
    gains (``lrenv.task.PROGRESS_REWARD``) are log ratios, on one scale for every entry.

    ## Episode End
    The entry's: terminated at its target or on divergence, truncated after its budget (``info["budget"]``);
    ``self.task.budget`` is the largest entry budget, an upper bound.

    ## Info
    NMFEnv's plus ``entry`` (the entry's name), ``family`` (its family), ``instance`` and ``budget``.

    ## Arguments
    ``suite``: a built-in name (:data:`SUITES`), a YAML file, a mapping or a list of entries (module docstring);
    ``exclude``: entry or family names to leave out; ``instances``: the split every entry draws from
    (``'train'``, ``'validation'``, ``'test'``) or seeds; ``budget`` (None: each family's), ``num_blocks`` (None:
    each family's), ``grad_noise``, ``device``, ``dtype``, ``threads``, ``render_mode`` and every
    :class:`lrenv.task.TaskConfig` field apply to every entry.

    ## Draws and determinism
    Each reset draws, from the env's ``np_random`` and in this order, the entry (probability proportional to
    its weight), the instance and a reset seed for the entry's env, always all three; ``reset(seed=s)`` seeds
    the sequence, so the same seed gives the same entries, instances and trajectories. ``options={"entry":
    name or index, "instance": seed}`` pins either (evaluation); a seeded reset passes its seed to the entry's
    env, so ``SuiteEnv.reset(seed=s, options={"entry": e, "instance": i})`` is the episode of ``NMFEnv(e's
    family).reset(seed=s, options={"instance": i})``.

    Pickles (arguments, generator, the entries' envs mid-episode) and works in SB3's DummyVecEnv and
    SubprocVecEnv. Entries differ in shape, so the batched vector env (one engine, one shape) does not apply.
    """

    metadata = NMFEnv.metadata

    def __init__(self, suite: str | os.PathLike | dict | list | Suite = DEFAULT_SUITE, *,
                 exclude: str | list[str] | tuple[str, ...] | None = (), instances: str | range | list[int] = "train",
                 budget: int | None = None, num_blocks: int | None = None, grad_noise: float = 0.0,
                 device: str = "cpu", dtype: str = "float32", threads: int | None = 1,
                 render_mode: str | None = None, **task_kwargs: Any):
        super().__init__()
        self._init_kwargs = dict(suite=suite, exclude=exclude, instances=instances, budget=budget,
                                 num_blocks=num_blocks, grad_noise=grad_noise, device=device, dtype=dtype,
                                 threads=threads, render_mode=render_mode, **task_kwargs)
        self.suite = load_suite(suite, exclude)
        label = f"suite {self.suite.name!r}"
        check_scale_free(TaskConfig.from_kwargs(**task_kwargs), label)
        self.instances = resolve_instances(instances)
        self.render_mode = render_mode
        self._env_kwargs = dict(instances=instances, budget=budget, num_blocks=num_blocks, grad_noise=grad_noise,
                                device=device, dtype=dtype, threads=threads, render_mode=render_mode, **task_kwargs)
        families = []
        for e in self.suite.entries:  # every entry's parameters checked now, not at its first draw
            try:
                families.append(make_family(e.problem, **e.problem_params))
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(f"{label}, entry {e.name!r}: {err}") from None
        self.budgets = [int(budget) if budget is not None else f.budget for f in families]
        """Each entry's epoch budget, in entry order."""
        self.shapes = [(f.m, f.n, f.rank) for f in families]
        """Each entry's (m, n, rank), in entry order."""
        self.family_names = [f.name for f in families]
        self.task = TaskConfig.from_kwargs(budget=max(self.budgets), **task_kwargs)
        """The suite's decision problem; its budget is the largest entry budget (each entry runs to its own)."""
        self.observation_space = self.task.observation_space()
        self.action_space = self.task.action_space()
        weights = np.array([e.weight for e in self.suite.entries], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        """Each entry's probability per episode."""
        self._envs: list[NMFEnv | None] = [None] * len(self.suite.entries)
        self.current: int | None = None
        """Index of the entry of the episode in progress (None before the first reset)."""

    # -------------------------------------------------------------- entries
    @property
    def entry_names(self) -> list[str]:
        return [e.name for e in self.suite.entries]

    @property
    def entry(self) -> str | None:
        """The name of the current episode's entry (None before the first reset)."""
        return None if self.current is None else self.suite.entries[self.current].name

    @property
    def current_env(self) -> NMFEnv | None:
        """The NMFEnv running the current episode (None before the first reset)."""
        return None if self.current is None else self._envs[self.current]

    def entry_env(self, entry: int | str) -> NMFEnv:
        """The NMFEnv of ``entry`` (a name or an index), built at first use."""
        i = self.entry_index(entry)
        if self._envs[i] is None:
            e = self.suite.entries[i]
            env = NMFEnv(e.problem, problem_params=e.problem_params,
                         **dict(self._env_kwargs, budget=self.budgets[i]))
            if env.observation_space != self.observation_space or env.action_space != self.action_space:
                raise ValueError(f"suite {self.suite.name!r}, entry {e.name!r}: its spaces (observation "
                                 f"{env.observation_space}, action {env.action_space}) differ from the suite's "
                                 f"({self.observation_space}, {self.action_space})")
            self._envs[i] = env
        return self._envs[i]

    def entry_index(self, entry: int | str) -> int:
        if isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
            if 0 <= entry < len(self.suite.entries):
                return int(entry)
        elif entry in self.entry_names:
            return self.entry_names.index(entry)
        raise ValueError(f"suite {self.suite.name!r} has no entry {entry!r}.{suggest(str(entry), self.entry_names)} "
                         f"Entries: {', '.join(self.entry_names)} (or their indices 0..{len(self.entry_names) - 1})")

    # -------------------------------------------------------------- gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"entry", "instance"}
        if unknown:
            raise ValueError(f"SuiteEnv.reset: unknown options {sorted(unknown)}; known: entry, instance")
        i = int(self.np_random.choice(len(self.probabilities), p=self.probabilities))
        instance = int(self.instances[int(self.np_random.integers(len(self.instances)))])
        sub_seed = int(self.np_random.integers(2**63 - 1))
        if "entry" in options:
            i = self.entry_index(options["entry"])
        if "instance" in options:
            instance = int(options["instance"])
        env = self.entry_env(i)
        self.current = i
        obs, info = env.reset(seed=sub_seed if seed is None else seed, options={"instance": instance})
        return obs, self._tag(info)

    def step(self, action):
        if self.current is None:
            raise RuntimeError("SuiteEnv.step() called before reset(); call reset()")
        obs, reward, terminated, truncated, info = self._envs[self.current].step(action)
        return obs, reward, terminated, truncated, self._tag(info)

    def _tag(self, info: dict) -> dict:
        env = self._envs[self.current]
        info.update(entry=self.suite.entries[self.current].name, family=env.family.name,
                    instance=env.instance_seed, budget=env.task.budget)
        return info

    @property
    def oracle(self):
        """The current entry's :class:`lrenv.env.LROracle` (for schedules that query the problem)."""
        if self.current_env is None:
            raise RuntimeError("SuiteEnv.oracle: call reset() first")
        return self.current_env.oracle

    def render(self) -> np.ndarray | None:
        """The current entry's :meth:`lrenv.NMFEnv.render` (``render_mode="rgb_array"``); None otherwise."""
        if self.render_mode is None or self.current_env is None:
            gym.logger.warn("SuiteEnv.render() needs render_mode='rgb_array' and a reset")
            return None
        return self.current_env.render()

    def close(self) -> None:
        for env in self._envs:
            if env is not None:
                env.close()

    # -------------------------------------------------------------- pickling
    def __getstate__(self) -> dict:
        """Constructor arguments, the generator and the entries' envs built so far (each pickles its episode)."""
        return {"init": self._init_kwargs, "np_random": self._np_random, "np_random_seed": self._np_random_seed,
                "envs": self._envs, "current": self.current}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state["init"])
        self._np_random, self._np_random_seed = state["np_random"], state["np_random_seed"]
        self._envs, self.current = state["envs"], state["current"]


def make_env(problem: str = "small", *, problem_params: dict | None = None,
             exclude: str | list[str] | tuple[str, ...] | None = None, **kwargs: Any) -> NMFEnv | SuiteEnv:
    """A :class:`SuiteEnv` when ``problem`` names a suite (``suite``, ``suite:NAME``, a ``.yml`` file), else an
    :class:`lrenv.NMFEnv`; the other keywords go to either (training's env kwargs build both)."""
    if is_suite(problem):
        if problem_params:
            raise ValueError(f"problem_params {problem_params} apply to one family; a suite's entries carry their "
                             "own (problem_params: in the suite's entries)")
        return SuiteEnv(suite_name(problem), exclude=exclude, **kwargs)
    if exclude:
        raise ValueError(f"exclude {exclude!r} applies to a suite (--problem suite, suite:NAME or a suite .yml), "
                         f"not to the family {problem!r}")
    return NMFEnv(problem, problem_params=problem_params, **kwargs)


__all__ = ["SuiteEnv", "Suite", "SuiteEntry", "SUITES", "SUITE_ENV_ID", "DEFAULT_SUITE", "load_suite", "make_env",
           "is_suite", "suite_name", "check_scale_free", "problem_label"]

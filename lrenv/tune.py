"""``lrenv tune``: tune every baseline's settings on the *validation* split, never on the reported one.

Each tunable baseline has a small grid (:data:`SEARCH_SPACES`); every setting runs on the same validation
instances through the evaluation harness (the schedules' runs step together in batched engines, a torch
optimizer's instances run together), and the setting with the best score wins. Score of one run: epochs to target, or twice the budget
when the target is not reached (diverged runs too), the same convention as ``lrenv benchmark``; a setting's
score is the mean over instances, ties broken by the mean of log10(best loss / target) (which also ranks
settings on families where nothing reaches the target).

The chosen settings go to a YAML file (``--out``); ``lrenv evaluate --methods tuned`` (or
``tuned:cosine`` for one) reads the file shipped for the family (``lrenv/tuned/<family>.yml``) or the one
given with ``--tuned FILE``. The file also records each baseline's score at its default setting, so
"how much tuning moved each baseline" is in the file and in the printed table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import yaml

from .problems import DEFAULT_PROBLEM, parse_problem_params
from .schedules import (Armijo, CosineDecay, CosineDecayPair, FixedScale, FixedScalePair, RandomWalkBound, Schedule,
                        TwoPhase)

MISS_FACTOR = 2.0
"""A run that misses the target scores this many budgets (as in lrenv benchmark)."""


def _grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes, as keyword dicts."""
    out: list[dict[str, Any]] = [{}]
    for key, values in axes.items():
        out = [{**d, key: v} for d in out for v in values]
    return out


SEARCH_SPACES: dict[str, tuple[Callable[..., Schedule] | str, list[dict[str, Any]], dict[str, Any]]] = {
    # name: (schedule class or solver name, grid of settings, default setting)
    "fixed-c": (FixedScale, _grid(c=[0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 1.9]), {"c": 1.1}),
    "fixed-cwch": (FixedScalePair, _grid(c_W=[0.2, 0.5, 1.0, 1.5, 1.9], c_H=[0.1, 0.2, 0.5, 0.8, 1.1, 1.4]),
                   {"c_W": 1.1, "c_H": 1.1}),
    "cosine": (CosineDecay, _grid(peak=[0.15, 0.25, 0.4, 0.5, 0.55, 0.65, 0.8], final=[0.02, 0.1]),
               {"peak": 0.55, "final": 0.05}),
    "cosine-pf": (CosineDecayPair, _grid(peak_W=[0.1, 0.25, 0.45, 0.65, 0.9, 1.3, 1.8],
                                         peak_H=[0.05, 0.1, 0.2, 0.33, 0.55], final_frac=[0.003, 0.01, 0.03, 0.1, 0.3]),
                  {"peak_W": 0.55, "peak_H": 0.55, "final_frac": 0.1}),
    "two-phase": (TwoPhase, _grid(c_high=[0.5, 0.8, 1.1, 1.3, 1.6], c_low=[0.2, 0.4, 0.8, 1.0], switch=[0.3, 0.6]),
                  {"c_high": 1.1, "c_low": 0.8, "switch": 0.5}),
    "random-walk": (RandomWalkBound, [g for g in _grid(center=[0.3, 0.4, 0.5, 0.6, 0.7], width=[0.25, 0.5])
                                      if g["center"] * (1 + g["width"]) <= 1.0], {"center": 0.5, "width": 0.5}),
    "armijo": (Armijo, _grid(c=[0.1, 0.3, 0.5, 0.7, 0.9], shrink=[0.5, 0.7]), {"c": 0.5, "shrink": 0.5}),
    # Adam with its ReduceLROnPlateau knobs too (the baseline's defaults, patience 5 and factor 0.5, are the default):
    # the decay on plateaus is what a learned Adam schedule competes with
    "adam": ("adam", _grid(lr_rel=[0.005, 0.02, 0.05, 0.1, 0.3, 1.0, 3.0], patience=[1, 2, 5, 10, 20],
                           factor=[0.3, 0.5, 0.7, 0.85]),
             {"lr_rel": 0.02, "patience": 5, "factor": 0.5}),
}
"""Tunable baselines: the grids searched by ``lrenv tune`` (scales in units of the bound 2/L, c = 2 x scale)."""


def override_grid(grid: list[dict[str, Any]], axes: dict[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """``grid`` with the values of each axis in ``axes`` replaced: every combination of the other axes' values
    in ``grid`` with each new value (a setting that appears twice is kept once)."""
    out = list(grid)
    for key, values in axes.items():
        if not values:
            raise ValueError(f"--grid {key}= needs at least one value")
        seen, new = set(), []
        for g in out:
            for v in values:
                d = {**g, key: v}
                k = tuple(sorted(d.items()))
                if k not in seen:
                    seen.add(k)
                    new.append(d)
        out = new
    return out


def _unknown_setting(method: str, key: str) -> str | None:
    """What is wrong with searching ``key`` of the baseline ``method`` (None: nothing)."""
    known = list(SEARCH_SPACES[method][2])
    return None if key in known else f"{method} has no setting {key!r}; its settings: {', '.join(known)}"


def parse_grid_overrides(specs: Sequence[str] | None) -> dict[str, dict[str, list[Any]]]:
    """``["adam.lr_rel=1,3,10", ...]`` -> ``{"adam": {"lr_rel": [1.0, 3.0, 10.0]}}``; numbers are read as int
    when they have no decimal point or exponent. Unknown baselines or settings raise ValueError naming the
    known ones."""
    out: dict[str, dict[str, list[Any]]] = {}
    for spec in specs or []:
        head, sep, tail = spec.partition("=")
        method, dot, key = head.strip().partition(".")
        if not (sep and dot and method and key and tail.strip()):
            raise ValueError(f"--grid {spec!r}: expected METHOD.SETTING=V1,V2,... (e.g. adam.lr_rel=1,3,10)")
        if method not in SEARCH_SPACES:
            raise ValueError(f"--grid {spec!r}: unknown baseline {method!r}; tunable: {', '.join(SEARCH_SPACES)}")
        wrong = _unknown_setting(method, key)
        if wrong:
            raise ValueError(f"--grid {spec!r}: {wrong}")
        values: list[Any] = []
        for text in tail.split(","):
            text = text.strip()
            try:
                values.append(int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text))
            except ValueError:
                raise ValueError(f"--grid {spec!r}: {text!r} is not a number") from None
        out.setdefault(method, {})[key] = values
    return out


def _label(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def make_tuned(method: str, params: dict[str, Any]) -> Schedule:
    """The schedule of a tuned baseline with its settings, named ``<method> (tuned)`` (fixed-c keeps its c)."""
    factory = SEARCH_SPACES[method][0]
    if isinstance(factory, str):
        raise ValueError(f"{method} is an outside solver: its tuned settings are solver options")
    schedule = factory(**params)
    if method == "fixed-c":
        schedule.name = f"fixed c={params['c']:g} (tuned)"
    elif method == "fixed-cwch":
        schedule.name = f"fixed cW={params['c_W']:g},cH={params['c_H']:g} (tuned)"
    else:
        schedule.name = f"{method} (tuned)"
    return schedule


def run_scores(rows: list[dict], budget: int) -> tuple[float, float]:
    """(mean score, mean log10 best/target) of one setting's runs (see the module docstring)."""
    score = [r["epochs_to_target"] if r["reached_target"] else MISS_FACTOR * budget for r in rows]
    with np.errstate(all="ignore"):
        gap = [math.log10(r["best_loss"] / r["target_loss"]) if r["best_loss"] and r["best_loss"] > 0
               and not r["diverged"] else 10.0 for r in rows]
    gap = [g if math.isfinite(g) else 10.0 for g in gap]
    return float(np.mean(score)), float(np.mean(gap))


def tune(problem: str = DEFAULT_PROBLEM, problem_params: dict | None = None, *, methods: Sequence[str] | None = None,
         seeds: int = 5, budget: int | None = None, seed: int = 0, out: str | os.PathLike | None = None,
         progress: bool = True, verbose: bool = True,
         grids: dict[str, dict[str, Sequence[Any]]] | None = None) -> dict[str, Any]:
    """Tune the baselines ``methods`` (default: all of :data:`SEARCH_SPACES` that apply) on ``seeds``
    validation instances of the family; returns the document written to ``out`` (YAML, atomically).
    ``grids``: per baseline, settings whose searched values replace the grid's (``{"adam": {"lr_rel": [1, 3,
    10]}}``; the CLI's ``--grid adam.lr_rel=1,3,10``), e.g. to go past a grid edge; recorded in the file."""
    from .evaluate import _atomic_write, evaluate

    names = list(methods or SEARCH_SPACES)
    unknown = [m for m in names if m not in SEARCH_SPACES]
    if unknown:
        raise ValueError(f"cannot tune {unknown}: tunable baselines are {', '.join(SEARCH_SPACES)}")
    grids = {k: dict(v) for k, v in (grids or {}).items()}
    stray = [k for k in grids if k not in names]
    if stray:
        raise ValueError(f"grid overrides for {stray}, which are not being tuned (methods: {', '.join(names)})")
    for name, axes in grids.items():
        for key in axes:
            wrong = _unknown_setting(name, key)
            if wrong:
                raise ValueError(wrong)
    spaces = {name: override_grid(SEARCH_SPACES[name][1], grids.get(name, {})) for name in names}
    common = dict(problem=problem, problem_params=problem_params, seeds=seeds, budget=budget, seed=seed,
                  split="validation", save=False, progress=progress, verbose=False)
    doc: dict[str, Any] = {"problem": problem, "problem_params": dict(problem_params or {}), "split": "validation",
                           "seeds": seeds, "seed": seed, "miss_score": f"{MISS_FACTOR:g} x budget",
                           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           **({"grid_overrides": {k: {a: list(v) for a, v in ax.items()} for k, ax in grids.items()}}
                              if grids else {}),
                           "methods": {}, "skipped": {}}
    schedules: list[Schedule] = []
    owner: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in names:
        factory, _, default = SEARCH_SPACES[name]
        grid = spaces[name]
        if isinstance(factory, str):
            continue
        settings = grid if default in grid else [default, *grid]
        for params in settings:
            s = factory(**params)
            s.name = f"{name}[{_label(params)}]"
            owner[s.name] = (name, params)
            schedules.append(s)
    results: dict[str, list[tuple[dict[str, Any], tuple[float, float]]]] = {n: [] for n in names}
    if schedules:
        res = evaluate(schedules, **common)
        doc["family"], doc["budget"] = res.config["family"], res.config["budget"]
        by: dict[str, list[dict]] = {}
        for r in res.rows:
            by.setdefault(r["method"], []).append(r)
        for key, rows in by.items():
            name, params = owner[key]
            results[name].append((params, run_scores(rows, res.config["budget"])))
    for name in names:  # outside solvers: one evaluation per setting (their settings are solver options)
        factory, _, default = SEARCH_SPACES[name]
        grid = spaces[name]
        if not isinstance(factory, str):
            continue
        settings = grid if default in grid else [default, *grid]
        for params in settings:
            try:
                res = evaluate([factory], solver_options={factory: params}, **common)
            except ValueError as e:  # the solver does not apply to this family
                doc["skipped"][name] = str(e)
                break
            doc["family"], doc["budget"] = res.config["family"], res.config["budget"]
            results[name].append((params, run_scores(res.rows, res.config["budget"])))
    for name, found in results.items():
        if not found:
            continue
        default = SEARCH_SPACES[name][2]
        best_params, best = min(found, key=lambda t: t[1])
        at_default = next(s for p, s in found if p == default)
        grid = spaces[name]
        edge = [k for k, v in best_params.items() if isinstance(v, (int, float)) and len({g[k] for g in grid}) > 2
                and v in (min(g[k] for g in grid), max(g[k] for g in grid))]
        doc["methods"][name] = {"params": dict(best_params), "score": round(best[0], 3),
                                "log10_gap": round(best[1], 4), "default_params": dict(default),
                                "default_score": round(at_default[0], 3), "settings_tried": len(found),
                                **({"at_grid_edge": edge} if edge else {})}
    if not doc["skipped"]:
        del doc["skipped"]
    text = yaml.safe_dump(doc, sort_keys=False)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(str(out), text)
    if verbose:
        print(tuning_markdown(doc))
        if out is not None:
            print(f"tuned settings in {out}")
    return doc


def merge_tuned(doc: dict[str, Any], into: str | os.PathLike) -> dict[str, Any]:
    """Merge a fresh tuning ``doc`` (what :func:`tune` returns) into the tuned-settings file ``into`` (e.g. the one
    shipped for the family): each tuned baseline's entry is replaced, stamped ``retuned`` (and its ``grid_overrides``
    kept), the other entries stay, and a note records what changed and the score it replaces. The file must hold the
    same family and split. Written atomically; returns the merged document."""
    from .evaluate import _atomic_write
    from .tuned_files import load_tuned

    old = load_tuned(doc["problem"], into)
    for key in ("family", "split"):
        if old.get(key) is not None and doc.get(key) is not None and old[key] != doc[key]:
            raise ValueError(f"{into}: its {key} is {old[key]!r}, the tuning ran on {doc[key]!r}; merge into a file "
                             f"of the same {key}")
    notes = list(old.get("notes") or [])
    overrides = doc.get("grid_overrides", {})
    for name, m in doc["methods"].items():
        prev = old["methods"].get(name)
        entry = dict(m)
        if name in overrides:
            entry["grid_overrides"] = overrides[name]
        entry["retuned"] = doc["created"]
        old["methods"][name] = entry
        grid = "".join(f"; --grid {name}.{k}={','.join(f'{v:g}' for v in vals)}"
                       for k, vals in overrides.get(name, {}).items())
        was = (f"replaces {_label(prev['params'])}, score {prev.get('score')}" if prev else "new entry")
        notes.append(f"{name} retuned on {doc['created']} ({doc['seeds']} validation instances, {m['settings_tried']} "
                     f"settings{grid}) to {_label(m['params'])}, score {m['score']}; {was}")
    old["notes"] = notes
    _atomic_write(str(into), yaml.safe_dump(old, sort_keys=False))
    return old


def tuning_markdown(doc: dict[str, Any]) -> str:
    """How much tuning moved each baseline, as a Markdown table."""
    lines = [f"### tuned on {doc['seeds']} validation instances of {doc.get('family', doc['problem'])} "
             f"(score: epochs to target, {doc['miss_score']} when missed; lower is better)", "",
             "| baseline | tuned setting | score | default setting | default score | settings tried |",
             "|---|---|---|---|---|---|"]
    for name, m in doc["methods"].items():
        edge = f" (grid edge: {', '.join(m['at_grid_edge'])})" if m.get("at_grid_edge") else ""
        lines.append(f"| {name} | {_label(m['params'])}{edge} | {m['score']:.1f} | {_label(m['default_params'])} | "
                     f"{m['default_score']:.1f} | {m['settings_tried']} |")
    edges = [f"{name}.{k}" for name, m in doc["methods"].items() for k in m.get("at_grid_edge", [])]
    if edges:
        lines += ["", f"At a grid edge ({', '.join(edges)}): a better setting may lie past it; search further with "
                      f"--grid {edges[0]}=V1,V2,..."]
    return "\n".join(lines) + "\n"


def tuned_methods(doc: dict[str, Any], only: str | None = None) -> tuple[list[Schedule | str], dict[str, dict]]:
    """The tuned baselines of ``doc`` (or just ``only``) as evaluation methods, and the solver options for
    tuned outside solvers."""
    methods: list[Schedule | str] = []
    options: dict[str, dict] = {}
    names = [only] if only else list(doc["methods"])
    for name in names:
        if name not in doc["methods"]:
            raise ValueError(f"no tuned setting for {name!r} in this file; it has {', '.join(doc['methods'])}")
        if name not in SEARCH_SPACES:
            raise ValueError(f"unknown tuned baseline {name!r}; known: {', '.join(SEARCH_SPACES)}")
        factory = SEARCH_SPACES[name][0]
        params = dict(doc["methods"][name]["params"])
        if isinstance(factory, str):
            methods.append(factory)
            options[factory] = params
        else:
            methods.append(make_tuned(name, params))
    return methods, options


# ----------------------------------------------------------------------------- CLI
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Tune every baseline's settings on validation instances (never on the test split that lrenv "
                     "evaluate reports) and write the chosen settings to a YAML file that lrenv evaluate --methods "
                     "tuned reads.")
    p.add_argument("--problem", default=DEFAULT_PROBLEM, help="problem family or a path to a matrix file")
    p.add_argument("--problem-param", action="append", metavar="KEY=VALUE", help="family parameter (repeatable)")
    p.add_argument("--methods", default=",".join(SEARCH_SPACES),
                   help=f"comma-separated baselines to tune (default: all of {', '.join(SEARCH_SPACES)})")
    p.add_argument("--seeds", type=int, default=5, help="validation instances per setting")
    p.add_argument("--budget", type=int, default=None, help="epoch budget (None: the family's)")
    p.add_argument("--seed", type=int, default=0, help="base reset seed")
    p.add_argument("--out", default=None, help="YAML file to write (default: runs/tuned/<problem>.yml)")
    p.add_argument("--grid", action="append", metavar="METHOD.SETTING=V1,V2,...",
                   help="search these values of one setting instead of the grid's (repeatable), e.g. to go past a "
                        "grid edge the table reports: --grid adam.lr_rel=1,3,10,30")
    p.add_argument("--merge", metavar="FILE", default=None,
                   help="also merge the tuned entries into this tuned-settings file (e.g. lrenv/tuned/<family>.yml): "
                        "each tuned baseline's entry replaced and stamped, the others kept, a note added")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    out = args.out or os.path.join("runs", "tuned", f"{Path(str(args.problem)).stem}.yml")
    grids = parse_grid_overrides(args.grid)
    if args.merge is not None:
        from .tuned_files import load_tuned
        load_tuned(args.problem, args.merge)  # refuse a missing or broken file before tuning, not after
    doc = tune(args.problem, parse_problem_params(args.problem_param),
               methods=[m.strip() for m in args.methods.split(",") if m.strip()], seeds=args.seeds, budget=args.budget,
               seed=args.seed, out=out, progress=not args.no_progress, grids=grids)
    if args.merge is not None:
        merge_tuned(doc, args.merge)
        print(f"merged {', '.join(doc['methods'])} into {args.merge}")
    return 0

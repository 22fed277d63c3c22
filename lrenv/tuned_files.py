"""The tuned-settings files ``lrenv tune`` writes (``lrenv/tuned/<family>.yml`` ships one per built-in family).

Reading them lives here, apart from :mod:`lrenv.tune` (which runs the search and imports the schedules), so that
the environment can read a family's tuned step without importing the evaluation stack: ``factor_tilt='tuned'``
(:class:`lrenv.task.TaskConfig`) makes ``a = 0`` the family's validation-tuned per-factor fixed step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .engine import ADAM_PLATEAU_DEFAULTS

TUNED_DIR = Path(__file__).parent / "tuned"
"""The tuned settings shipped for the built-in families (``<family>.yml``)."""


def load_tuned(problem: str, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The tuned-settings document for ``problem``: ``path`` if given, else the one shipped for the family."""
    if path is None:
        name = Path(str(problem)).stem if os.path.splitext(str(problem))[1] else str(problem)
        path = TUNED_DIR / f"{name}.yml"
        if not path.exists():
            raise FileNotFoundError(f"no tuned settings shipped for {problem!r}; run `lrenv tune --problem {problem} "
                                    f"--out tuned.yml` and pass --tuned tuned.yml")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tuned settings file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("methods"), dict):
        raise ValueError(f"{path}: not a tuned-settings file (no 'methods' mapping); write one with lrenv tune")
    return doc


def _tuned_adam(problem: str) -> dict[str, Any]:
    """The shipped tuned Adam baseline's parameters of ``problem``."""
    methods = load_tuned(problem)["methods"]
    if "adam" not in methods:
        raise ValueError(f"the tuned settings of {problem!r} have no adam entry; run `lrenv tune --problem "
                         f"{problem} --methods adam`")
    return methods["adam"]["params"]


def tuned_adam_plateau(problem: str) -> tuple[int, float]:
    """The shipped tuned Adam baseline's ReduceLROnPlateau rule of ``problem`` as ``(patience, factor)`` (the
    baseline's defaults, :data:`lrenv.engine.ADAM_PLATEAU_DEFAULTS`, where the file leaves them out)."""
    params = {**ADAM_PLATEAU_DEFAULTS, **_tuned_adam(problem)}
    return int(params["patience"]), float(params["factor"])


def tuned_step_scales(problem: str, optimizer: str = "sgd") -> tuple[float, float]:
    """The shipped validation-tuned step of ``problem`` as per-factor multipliers ``(s_W, s_H)`` of the unit the
    environment's actions use. ``optimizer='sgd'``: fractions of each factor's 2/L (``lr_X = c_X / L_X = (c_X / 2) *
    2/L_X``) from ``fixed-cwch`` where the file has it, else the shared ``fixed-c`` for both factors. ``'adam'``: the
    tuned Adam baseline's ``lr_rel`` for both factors (its unit is Adam's reference scale, the RMS of the initial
    factors, as the env's Adam actions; the baseline's ReduceLROnPlateau is not part of it)."""
    if optimizer == "adam":
        lr = float(_tuned_adam(problem)["lr_rel"])
        return lr, lr
    methods = load_tuned(problem)["methods"]
    if "fixed-cwch" in methods:
        params = methods["fixed-cwch"]["params"]
        return float(params["c_W"]) / 2.0, float(params["c_H"]) / 2.0
    if "fixed-c" in methods:
        c = float(methods["fixed-c"]["params"]["c"])
        return c / 2.0, c / 2.0
    raise ValueError(f"the tuned settings of {problem!r} have neither fixed-cwch nor fixed-c; run `lrenv tune "
                     f"--problem {problem} --methods fixed-cwch`")

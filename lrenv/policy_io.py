"""Saved policies that carry their whole decision problem.

A policy is only meaningful together with the MDP it was trained on: the action mapping
(``action_center``, ``log_range``...), the observation features, the budget that scales the epoch
feature, and the VecNormalize statistics that whiten its observations. Kept as separate files
beside the model they get lost or mismatched (a checkpoint without its ``.pkl``, ``interrupted.zip``
without statistics, a ``best_model.zip`` copied elsewhere). So every model ``.zip`` that lrenv saves
embeds two extra archive members next to stable-baselines3's own:

``lrenv_task.json``
    ``{"task": TaskConfig.to_dict(), "env": the env kwargs of the run, "num_timesteps": ...}``
``lrenv_vecnormalize.pkl``
    the pickled ``VecNormalize`` (without its wrapped env), when the run normalises.

stable-baselines3 ignores archive members it does not know (it loads ``data`` and ``*.pth`` only),
so these files stay plain SB3 models. Writes are atomic: a temporary unique name in the same
directory, then ``os.replace``; a reader never sees a half-written model under the final name.

This module is library code: it does not import stable-baselines3 (the model object is passed in).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
from typing import Any

TASK_MEMBER = "lrenv_task.json"
VECNORM_MEMBER = "lrenv_vecnormalize.pkl"


def unique_tmp(path: str | os.PathLike, suffix: str = "") -> str:
    """A fresh, unused temporary file name beside ``path`` (same filesystem, so ``os.replace`` is atomic).

    Unique per call (``mkstemp``), so two writers of the same target never share a temporary file."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}",
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    return tmp


def vecnormalize_bytes(vecnorm: Any) -> bytes:
    """A VecNormalize pickled without its env (exactly what ``VecNormalize.save`` writes)."""
    return pickle.dumps(vecnorm)


def save_policy(model: Any, path: str | os.PathLike, *, task: dict, env: dict | None = None,
                vecnorm: Any = None) -> str:
    """Write ``model`` to ``path`` (a ``.zip``) with its task and VecNormalize statistics embedded, atomically.

    ``task``: ``TaskConfig.to_dict()`` of the environment the model acts in; ``env``: the env kwargs of
    the run (problem, problem_params, ...); ``vecnorm``: the training VecNormalize or None.
    Returns the final path."""
    path = os.fspath(path)
    if not path.endswith(".zip"):
        path += ".zip"
    tmp = unique_tmp(path, ".zip")
    try:
        model.save(tmp)
        meta = {"task": task, "env": env or {}, "num_timesteps": int(getattr(model, "num_timesteps", 0)),
                "normalized": vecnorm is not None}
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(TASK_MEMBER, json.dumps(meta, indent=2, default=str))
            if vecnorm is not None:
                z.writestr(VECNORM_MEMBER, vecnormalize_bytes(vecnorm))
        with open(tmp, "rb") as f:  # on disk before the rename: a crash leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_extras(path: str | os.PathLike) -> tuple[dict | None, Any]:
    """``(meta, vecnorm)`` embedded in a model ``.zip`` by :func:`save_policy`; ``(None, None)`` for a
    model saved otherwise. Raises ``ValueError`` naming the file when it is not a readable zip."""
    path = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            meta = json.loads(z.read(TASK_MEMBER)) if TASK_MEMBER in names else None
            vecnorm = pickle.load(io.BytesIO(z.read(VECNORM_MEMBER))) if VECNORM_MEMBER in names else None
    except (zipfile.BadZipFile, OSError, EOFError, pickle.UnpicklingError, json.JSONDecodeError, KeyError) as e:
        raise ValueError(f"{path}: not a complete model archive ({type(e).__name__}: {e})") from e
    return meta, vecnorm


def task_differences(policy_task: dict, env_task: dict) -> list[str]:
    """``["field: policy X, environment Y", ...]`` for every field the two task dicts both define and that
    differ (floats compared to 1e-9 relative; lists and tuples alike)."""
    out = []
    for key in sorted(set(policy_task) & set(env_task)):
        a, b = _norm(policy_task[key]), _norm(env_task[key])
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{d}" for d in task_differences(a, b)]
        elif not _same(a, b):
            out.append(f"{key}: policy {a!r}, environment {b!r}")
    return out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))
    return a == b

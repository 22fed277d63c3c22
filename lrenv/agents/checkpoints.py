"""Crash-safe checkpoints, resume and TensorBoard continuity for ``lrenv train``.

Why not SB3's ``CheckpointCallback``: it writes the final file names directly, so a kill during a write
leaves a partial ``rl_model_N_steps.zip`` that every later ``--resume`` trusted (highest step count) and
failed on, and a checkpoint whose VecNormalize ``.pkl`` was missing resumed silently with fresh
statistics. Here:

- a checkpoint is ONE self-contained archive (:func:`lrenv.policy_io.save_policy`: the model, its task and
  its VecNormalize statistics) written under a unique temporary name and renamed; the SB3-style
  ``rl_model_vecnormalize_N_steps.pkl`` beside it is written (and renamed) *before* the zip, so whenever the
  zip exists its pickle does too;
- checkpoints are taken at the start of a rollout, when ``num_timesteps`` is a rollout boundary and the
  model holds every update so far, so a resumed run ends at exactly the planned timesteps;
- :func:`load_latest` walks checkpoints from newest to oldest, reports and skips any that fail to load,
  and refuses one without its statistics unless told otherwise;
- :func:`tensorboard_logger` resumes the event files with ``purge_step``: TensorBoard drops the killed
  run's events above the checkpoint's step, so no step is logged twice.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from stable_baselines3.common.callbacks import BaseCallback

from lrenv.policy_io import read_extras, save_policy, unique_tmp, vecnormalize_bytes

CHECKPOINT_DIR = "checkpoints"
_ZIP = re.compile(r"rl_model_(\d+)_steps\.zip$")


def checkpoint_files(ckpt_dir: Path, steps: int) -> tuple[Path, Path]:
    """(model zip, VecNormalize pickle) of the checkpoint at ``steps`` (SB3's naming)."""
    return ckpt_dir / f"rl_model_{steps}_steps.zip", ckpt_dir / f"rl_model_vecnormalize_{steps}_steps.pkl"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = unique_tmp(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_checkpoint(model: Any, ckpt_dir: Path, *, task: dict, env: dict) -> Path:
    """Save ``model`` as the checkpoint at its ``num_timesteps``: pickle first, then the self-contained zip."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    zip_path, pkl_path = checkpoint_files(ckpt_dir, int(model.num_timesteps))
    vecnorm = model.get_vec_normalize_env()
    if vecnorm is not None:
        atomic_write_bytes(pkl_path, vecnormalize_bytes(vecnorm))
    save_policy(model, zip_path, task=task, env=env, vecnorm=vecnorm)
    return zip_path


class SafeCheckpointCallback(BaseCallback):
    """A checkpoint whenever a rollout starts at or past the next multiple of ``freq`` timesteps (absolute
    timesteps, so the schedule is the same after a resume). ``freq = 0``: no checkpoints."""

    def __init__(self, freq: int, ckpt_dir: Path, *, task: dict, env: dict, start: int = 0):
        super().__init__()
        self.freq, self.ckpt_dir, self.task, self.env = int(freq), Path(ckpt_dir), task, env
        self.next = (start // self.freq + 1) * self.freq if self.freq else None

    def _on_rollout_start(self) -> None:
        if self.next is not None and self.num_timesteps >= self.next:
            write_checkpoint(self.model, self.ckpt_dir, task=self.task, env=self.env)
            self.next = (self.num_timesteps // self.freq + 1) * self.freq

    def _on_step(self) -> bool:
        return True


class SaveBestCallback(BaseCallback):
    """``callback_on_new_best`` of EvalCallback: best_model.zip with its task and statistics embedded."""

    def __init__(self, path: Path, *, task: dict, env: dict):
        super().__init__()
        self.path, self.task, self.env = Path(path), task, env

    def _on_step(self) -> bool:
        save_policy(self.model, self.path, task=self.task, env=self.env, vecnorm=self.model.get_vec_normalize_env())
        return True


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(steps, zip)`` of every checkpoint of a run, newest first (temporary files never match)."""
    found = []
    for path in glob.glob(str(Path(run_dir) / CHECKPOINT_DIR / "rl_model_*_steps.zip")):
        m = _ZIP.search(os.path.basename(path))
        if m:
            found.append((int(m.group(1)), Path(path)))
    return sorted(found, reverse=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the temporary files a killed write left behind (``.name.XXXX.tmp*``); returns them."""
    stale = [Path(p) for pattern in (".*.tmp*", f"{CHECKPOINT_DIR}/.*.tmp*")
             for p in glob.glob(str(Path(run_dir) / pattern))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class NoUsableCheckpoint(ValueError):
    """No checkpoint of a run could be resumed from (the message lists why for each). ``unreadable``: every
    candidate failed to load as a model (damaged files), none was refused for missing statistics."""

    unreadable: bool = False


def _sidecar_statistics(zip_path: Path) -> Any:
    import pickle
    m = _ZIP.search(zip_path.name)
    pkl = zip_path.with_name(f"rl_model_vecnormalize_{m.group(1)}_steps.pkl") if m else \
        zip_path.with_name("vecnormalize.pkl")
    if not pkl.is_file():
        return None
    with open(pkl, "rb") as f:
        return pickle.load(f)


def load_latest(candidates: list[Path], venv: Any, *, normalize: Any, device: str,
                allow_missing_normalization: bool = False,
                report: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)) -> tuple[Any, Any, Path]:
    """Load the first candidate (newest first) that is complete: ``(model, wrapped venv, path)``.

    A candidate that is not a readable model archive, or (when the run normalises) has no VecNormalize
    statistics, is reported through ``report`` and skipped; ``allow_missing_normalization`` accepts one
    without statistics, with fresh ones. Raises :class:`NoUsableCheckpoint` when none is usable."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize
    reasons, refused = [], False
    for path in candidates:
        try:
            _, vecnorm = read_extras(path)
            if normalize:
                if vecnorm is None:
                    vecnorm = _sidecar_statistics(path)
                if vecnorm is None:
                    if not allow_missing_normalization:
                        refused = True
                        raise ValueError("its VecNormalize statistics are missing (pass "
                                         "--allow-missing-normalization to resume from it with fresh statistics)")
                    report(f"warning: {path.name} has no VecNormalize statistics; resuming with fresh ones")
                    vecnorm = VecNormalize(venv, **(normalize if isinstance(normalize, dict) else {}))
                else:
                    vecnorm.set_venv(venv)
                vecnorm.training = True
                wrapped = vecnorm
            else:
                wrapped = venv
            model = PPO.load(path, env=wrapped, device=device)
        except Exception as e:  # noqa: BLE001 - any failure to load means: try the next older checkpoint
            msg = f"skipping {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            report(msg)
            reasons.append(msg)
            continue
        return model, wrapped, path
    if not candidates:
        raise NoUsableCheckpoint("no checkpoint found: the run was interrupted before its first checkpoint; "
                                 "start it again without --resume")
    error = NoUsableCheckpoint("no usable checkpoint: " + "; ".join(reasons))
    error.unreadable = not refused
    raise error


def tensorboard_logger(folder: Path, purge_step: int | None = None) -> Any:
    """An SB3 logger writing TensorBoard events to ``folder``; with ``purge_step`` TensorBoard discards the
    events at and above that step from earlier files in the folder (the part of a killed run that the
    resumed one writes again)."""
    from stable_baselines3.common.logger import Logger, TensorBoardOutputFormat
    from torch.utils.tensorboard import SummaryWriter

    class PurgingTensorBoard(TensorBoardOutputFormat):
        def __init__(self, path: str, purge: int | None):  # noqa: D401 - same as the parent, plus purge_step
            self.writer = SummaryWriter(log_dir=path, purge_step=purge)
            self._is_closed = False

    folder.mkdir(parents=True, exist_ok=True)
    return Logger(folder=str(folder), output_formats=[PurgingTensorBoard(str(folder), purge_step)])

"""Issue 16: faults and bad configuration.

- training killed at many moments around a checkpoint write resumes every time to exactly the planned
  timesteps, with no TensorBoard step logged twice;
- every bad setting and bad matrix the fault campaign listed gives a one-line error naming the key, file or
  entry (exit code 2) and leaves no run directory behind;
- two evaluations into one --out: exactly one proceeds.
"""

import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lrenv.agents import checkpoints
from lrenv.agents.train import TrainConfig, load_hyperparams, train
from lrenv.cli import main, parse
from lrenv.evaluate import reserve_out_dir
from lrenv.policy_io import read_extras, unique_tmp
from test_train import Crash  # noqa: E402  (a crash after N timesteps, not a graceful interrupt)

TINY = dict(m=60, n=20, rank=3)
TINY_ARGS = ["--problem", "small", "--problem-param", "m=60", "--problem-param", "n=20", "--problem-param", "rank=3"]
PLANNED = 384  # 6 rollouts of 2 envs x 32 steps; checkpoints every 128 timesteps
EVERY = 128


def tiny_config(tmp_path, **kw) -> TrainConfig:
    hp = load_hyperparams("small", [f"n_timesteps:{PLANNED}", "n_envs:2", "n_steps:32", "batch_size:64", "n_epochs:1",
                                    "env_kwargs.budget:30"])
    options = dict(eval_freq=0, eval_episodes=1, checkpoint_freq=EVERY, progress=False)
    return TrainConfig(problem="small", problem_params=TINY, hyperparams=hp, runs_dir=str(tmp_path), **{**options, **kw})


# ----------------------------------------------------------------------------- kills around a checkpoint write
class Killed(BaseException):
    """A kill: not an Exception, so nothing in training catches it."""


def _torn(path: Path, data: bytes) -> None:
    path.write_bytes(data[: len(data) // 2])


MOMENTS = {
    # what the write had done when the process died
    "before any file": lambda model, d, real: None,
    "pickle written, no zip": lambda model, d, real: checkpoints.atomic_write_bytes(
        checkpoints.checkpoint_files(d, model.num_timesteps)[1],
        checkpoints.vecnormalize_bytes(model.get_vec_normalize_env())),
    "zip half-written under its temporary name": lambda model, d, real: _torn(
        Path(unique_tmp(checkpoints.checkpoint_files(d, model.num_timesteps)[0], ".zip")),
        Path(real(model, d)).read_bytes()) or checkpoints.checkpoint_files(d, model.num_timesteps)[0].unlink(),
    "zip torn under its final name (a non-atomic writer)": lambda model, d, real: _torn(
        Path(real(model, d)), Path(real(model, d)).read_bytes()),
    "checkpoint complete": lambda model, d, real: real(model, d),
}


def _kill_at(monkeypatch, nth: int, moment: str) -> None:
    """Make the ``nth`` checkpoint write die at ``moment``."""
    real = checkpoints.write_checkpoint
    calls = {"n": 0}

    def write(model, ckpt_dir, *, task, env):
        calls["n"] += 1
        if calls["n"] != nth:
            return real(model, ckpt_dir, task=task, env=env)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        MOMENTS[moment](model, ckpt_dir, lambda m, d: real(m, d, task=task, env=env))
        raise Killed(f"killed during checkpoint {nth} ({moment})")

    monkeypatch.setattr(checkpoints, "write_checkpoint", write)


def _assert_tensorboard_has_no_duplicate_steps(run_dir: Path) -> int:
    events = EventAccumulator(str(run_dir / "tb_1"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/value_loss" in tags and "episode/epochs_to_target" in tags, tags
    last = 0
    for tag in tags:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at some step: {steps}"
        last = max(last, max(steps))
    return last


@pytest.mark.parametrize("moment", list(MOMENTS))
@pytest.mark.parametrize("nth", [1, 2])
def test_kill_during_a_checkpoint_write_resumes_to_the_planned_timesteps(tmp_path, monkeypatch, capsys, nth, moment):
    with monkeypatch.context() as patch:
        _kill_at(patch, nth, moment)
        with pytest.raises(Killed):
            train(tiny_config(tmp_path))
    run_dir = next(tmp_path.iterdir())
    assert not (run_dir / "model.zip").exists()
    capsys.readouterr()
    train(tiny_config(tmp_path), resume=run_dir)
    out = capsys.readouterr()
    torn = "torn" in moment
    assert ("skipping" in out.err) == torn, out.err  # a broken newest checkpoint is reported and skipped
    resumed_at = int(out.out.split(" at ")[1].split()[0])
    expected = EVERY * (nth if moment == "checkpoint complete" else nth - 1)
    assert resumed_at == expected
    meta, vecnorm = read_extras(run_dir / "model.zip")
    assert meta["num_timesteps"] == PLANNED and vecnorm is not None
    assert json.loads((run_dir / "config.json").read_text())["result"]["timesteps"] == PLANNED
    assert not list(run_dir.rglob(".*.tmp*")), "temporary files left behind"
    assert _assert_tensorboard_has_no_duplicate_steps(run_dir) == PLANNED


def test_killed_twice_and_a_finished_run_is_not_retrained(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _kill_at(patch, 1, "pickle written, no zip")
        with pytest.raises(Killed):
            train(tiny_config(tmp_path))
    run_dir = next(tmp_path.iterdir())
    with monkeypatch.context() as patch:
        _kill_at(patch, 2, "zip torn under its final name (a non-atomic writer)")  # at 256, resumed from 0
        with pytest.raises(Killed):
            train(tiny_config(tmp_path), resume=run_dir)
    train(tiny_config(tmp_path), resume=run_dir)
    assert read_extras(run_dir / "model.zip")[0]["num_timesteps"] == PLANNED
    assert _assert_tensorboard_has_no_duplicate_steps(run_dir) == PLANNED
    # resuming a finished run: nothing is retrained or overwritten
    stamp = (run_dir / "model.zip").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert f"is complete ({PLANNED} timesteps)" in capsys.readouterr().out
    assert (run_dir / "model.zip").stat().st_mtime_ns == stamp
    # raising n_timesteps explicitly extends it from the final model
    assert main(["train", "--resume", str(run_dir), "--no-progress", f"n_timesteps:{PLANNED + 128}"]) == 0
    assert read_extras(run_dir / "model.zip")[0]["num_timesteps"] == PLANNED + 128
    assert _assert_tensorboard_has_no_duplicate_steps(run_dir) == PLANNED + 128


def test_checkpoint_without_statistics_is_refused_unless_allowed(tmp_path, capsys):
    with pytest.raises(RuntimeError):
        train(tiny_config(tmp_path), extra_callbacks=[Crash(300)])
    run_dir = next(tmp_path.iterdir())
    for zip_path in (run_dir / "checkpoints").glob("*.zip"):  # an old-style checkpoint: no embedded statistics
        with zipfile.ZipFile(zip_path) as z:
            members = {n: z.read(n) for n in z.namelist() if n != "lrenv_vecnormalize.pkl"}
        with zipfile.ZipFile(zip_path, "w") as z:
            for n, data in members.items():
                z.writestr(n, data)
    for pkl in (run_dir / "checkpoints").glob("*.pkl"):
        pkl.unlink()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "VecNormalize statistics are missing" in err and "--allow-missing-normalization" in err
    assert main(["train", "--resume", str(run_dir), "--no-progress", "--allow-missing-normalization"]) == 0
    assert read_extras(run_dir / "model.zip")[0]["num_timesteps"] == PLANNED


def test_checkpoint_freq_zero_means_no_checkpoints(tmp_path):
    run_dir = train(tiny_config(tmp_path, checkpoint_freq=0))
    assert not (run_dir / "checkpoints").exists() and (run_dir / "model.zip").exists()


# ----------------------------------------------------------------------------- bad settings and matrices
def _npy_header_only(path: Path, shape) -> Path:
    """A .npy whose header announces ``shape`` (float64) with no data: what a loader sees first."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": shape})
    return path


def _matrices(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    good = rng.uniform(size=(30, 8))
    files = {"huge 3.2 GB .npy": _npy_header_only(d / "huge.npy", (40000, 10000)),
             "huge 12.8 GB .npy": _npy_header_only(d / "huger.npy", (80000, 20000))}
    np.savez(d / "trunc.npz", V=good)
    data = (d / "trunc.npz").read_bytes()
    (d / "trunc.npz").write_bytes(data[: len(data) // 2])
    files["truncated .npz"] = d / "trunc.npz"
    np.save(d / "complex.npy", good + 1j * good)
    files["complex"] = d / "complex.npy"
    (d / "text.csv").write_text("1.2e-01,2,3\n4,five,6\n7,8,9\n")
    files["text cell in a CSV"] = d / "text.csv"
    np.save(d / "zeros.npy", np.zeros((30, 8)))
    files["all zero"] = d / "zeros.npy"
    for name, value in (("1e30", 1e30), ("1e300", 1e300), ("1e-40", 1e-40)):
        V = good.copy() if value > 1 else good * 1e-45
        V[3, 4] = value
        np.save(d / f"big{name}.npy", V)
        files[f"entry {name}"] = d / f"big{name}.npy"
    np.save(d / "row.npy", good[:1])
    files["1 x N"] = d / "row.npy"
    np.save(d / "ok.npy", good)
    files["ok"] = d / "ok.npy"
    return files


BAD_SETTINGS = [
    # (name, extra argv after `lrenv train` + tiny problem, what the one-line message must contain)
    ("learning_rate:-1", ["learning_rate:-1"], "learning_rate: must be a finite number > 0, got -1"),
    ("n_steps:0", ["n_steps:0"], "n_steps: must be an integer >= 1, got 0"),
    ("batch_size:0", ["batch_size:0"], "batch_size: must be an integer >= 1, got 0"),
    ("policy:Bogus", ["policy:Bogus"], "policy: unknown value 'Bogus'"),
    ("net_arch:[-4]", ["policy_kwargs:{net_arch: [-4]}"], "policy_kwargs.net_arch: must be a list of positive"),
    ("--device gpu9", ["--device", "gpu9"], "--device: 'gpu9' is not a torch device"),
    ("--seed -1", ["--seed", "-1"], "--seed: must be an integer in [0, 4294967295], got -1"),
    ("malformed YAML override", ["learning_rate:[1,"], "override 'learning_rate:[1,': the value is not valid YAML"),
    ("malformed --hyperparams", ["--hyperparams", "{bad_yaml}"], "bad.yml: not valid YAML"),
    ("reward:{bogus: 1}", ["env_kwargs.reward:{bogus: 1}"], "env_kwargs.reward.bogus: unknown key"),
    ("reward weight of the wrong type", ["env_kwargs.reward:{improvement: abc}"],
     "env_kwargs.reward.improvement: must be a finite number, got 'abc'"),
    ("gamma:2", ["gamma:2"], "gamma: must be a finite number in (0, 1], got 2"),
    ("n_envs:2.5", ["n_envs:2.5"], "n_envs: must be an integer >= 1, got 2.5"),
    ("clip_range:-0.2", ["clip_range:-0.2"], "clip_range: must be a finite number > 0, got -0.2"),
    ("env_kwargs.budget:0", ["env_kwargs.budget:0"], "env_kwargs.budget: must be an integer >= 1, got 0"),
    ("env_kwargs.factor_tilt:[1, 0]", ["env_kwargs.factor_tilt:[1, 0]"],
     "env_kwargs.factor_tilt: must be a pair of positive numbers [t_W, t_H] or 'tuned' (the family's tuned per-factor "
     "step), got [1, 0]"),
    ("--checkpoint-freq -5", ["--checkpoint-freq", "-5"], "--checkpoint-freq (0: no checkpoints): must be an integer"),
    ("--exp ../../escape", ["--exp", "../../escape"], "--exp: run names may hold letters"),
    ("--problem-param m=abc", ["--problem-param", "m=abc"], "parameter m must be a positive integer, got 'abc'"),
    ("--problem-param m=-5", ["--problem-param", "m=-5"], "parameter m must be a positive integer (>= 1), got -5"),
    ("--problem-param m=1e7 n=1e5", ["--problem-param", "m=1e7", "--problem-param", "n=1e5"],
     "(m=10000000, n=100000): 10000000 x 100000 = 1e+12 entries"),
]
if not torch.cuda.is_available():
    BAD_SETTINGS.append(("--env-device cuda without CUDA", ["--env-device", "cuda"],
                         "--env-device: 'cuda' but CUDA is not available"))

BAD_MATRICES = [
    ("huge 3.2 GB .npy", [], "40000 x 10000 = 4e+08 entries (3.2 GB as float64) is above the limit"),
    ("huge 12.8 GB .npy", [], "80000 x 20000 = 1.6e+09 entries (12.8 GB as float64)"),
    ("truncated .npz", [], "trunc.npz: BadZipFile"),
    ("complex", [], "complex.npy: the matrix is complex"),
    ("text cell in a CSV", [], "text.csv: row 2, column 2: 'five' is not a number"),
    ("all zero", [], "zeros.npy: every observed entry is 0"),
    ("entry 1e30", [], "big1e30.npy: entries up to 1e+30 make the loss"),
    ("entry 1e300", [], "big1e300.npy: entries up to 1e+300 make the loss"),
    ("entry 1e-40", [], "big1e-40.npy: entries at most 1e-40 make the loss"),
    ("1 x N", [], "row.npy: a 1 x 8 matrix cannot be factorised: NMF needs min(m, n) >= 2"),
    ("ok", ["--problem-param", "bogus=1"], "unknown parameter 'bogus'"),
]


def _run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("name,extra,message", BAD_SETTINGS, ids=[c[0] for c in BAD_SETTINGS])
def test_bad_setting_is_a_one_line_error_and_leaves_no_run(tmp_path, capsys, name, extra, message):
    bad_yaml = tmp_path / "bad.yml"
    bad_yaml.write_text("small:\n  n_envs: [1,\n")
    extra = [str(bad_yaml) if a == "{bad_yaml}" else a for a in extra]
    runs = tmp_path / "runs"
    problem = ["--problem", "small"] if any(e.startswith("m=") for e in extra) else TINY_ARGS
    code, err = _run_cli(["train", *problem, "--runs-dir", str(runs), "--no-progress", *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("lrenv train: error: ") and message in err, err
    assert not runs.exists() or not any(runs.iterdir())


@pytest.mark.parametrize("name,extra,message", BAD_MATRICES, ids=[c[0] for c in BAD_MATRICES])
def test_bad_matrix_is_a_one_line_error_and_leaves_no_run(tmp_path, capsys, name, extra, message):
    path = _matrices(tmp_path)[name]
    runs = tmp_path / "runs"
    code, err = _run_cli(["train", "--problem", str(path), "--runs-dir", str(runs), "--no-progress", *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not runs.exists() or not any(runs.iterdir())


def test_csv_header_is_detected_by_parsing_and_delimiter_sniffed(tmp_path):
    from lrenv.problems import load_matrix
    (tmp_path / "a.csv").write_text("1.2e-01,2,3\n4,,6\n")  # first row is data; an empty cell is missing
    V = load_matrix(tmp_path / "a.csv")
    assert V.shape == (2, 3) and V[0, 0] == 0.12 and np.isnan(V[1, 1])
    (tmp_path / "b.csv").write_text("x;y;z\n1;2;3\n4;5;6\n")
    np.testing.assert_array_equal(load_matrix(tmp_path / "b.csv"), [[1, 2, 3], [4, 5, 6]])
    (tmp_path / "c.csv").write_text("1\t2\n3\t4\n")
    np.testing.assert_array_equal(load_matrix(tmp_path / "c.csv"), [[1, 2], [3, 4]])


def test_resume_refuses_changed_arguments_and_a_damaged_config_by_name(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    cfg = tiny_config(tmp_path)
    import dataclasses
    (run / "config.json").write_text(json.dumps({"train": dataclasses.asdict(cfg)}))
    for extra, name in ((["--seed", "5"], "--seed cannot change on --resume"),
                        (["--exp", "other"], "--exp cannot change on --resume"),
                        (["--problem-param", "m=80"], "--problem-param cannot change on --resume"),
                        (["learning_rate:0.1"], "learning_rate cannot change on --resume")):
        code, err = _run_cli(["train", "--resume", str(run), *extra], capsys)
        assert code == 2 and name in err, err
    (run / "config.json").write_text("{not json")
    code, err = _run_cli(["train", "--resume", str(run)], capsys)
    assert code == 2 and "config.json: not valid JSON" in err and len(err.splitlines()) == 1


def test_overrides_may_follow_options_and_episode_every_zero_is_refused(capsys):
    args = parse(["train", "--problem", "small", "learning_rate:0.01", "--seed", "3", "n_envs:2"])
    assert args.overrides == ["learning_rate:0.01", "n_envs:2"] and args.seed == 3
    code, err = _run_cli(["episode", *TINY_ARGS, "--every", "0"], capsys)
    assert code == 2 and "--every must be a positive number" in err


# ----------------------------------------------------------------------------- exclusive outputs
def test_concurrent_claims_of_one_out_dir_let_exactly_one_through(tmp_path):
    out = str(tmp_path / "shared" / "out")
    barrier, results = threading.Barrier(8), []

    def claim():
        barrier.wait()
        try:
            results.append(reserve_out_dir(out, "small", 0))
        except ValueError as e:
            results.append(e)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(isinstance(r, str) for r in results) == 1
    assert all("already" in str(r) for r in results if not isinstance(r, str))


def test_two_concurrent_evaluations_into_one_out(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lrenv.cli", "evaluate", *TINY_ARGS, "--seeds", "1", "--budget", "5",
           "--methods", "fixed-c=1", "--out", str(out), "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip()
    assert "lrenv evaluate: error: output directory" in refusal and "choose another --out" in refusal, refusal
    assert (out / "results.csv").exists() and not list(out.glob("*.tmp*"))


def test_out_under_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = _run_cli(["evaluate", *TINY_ARGS, "--seeds", "1", "--budget", "3", "--methods", "fixed-c=1",
                          "--out", str(tmp_path / "file" / "out"), "--no-progress"], capsys)
    assert code == 2 and "choose another --out" in err and len(err.splitlines()) == 1, err


def test_batched_env_refuses_a_zero_budget_instead_of_using_the_familys():
    from lrenv.vec_env import BatchedNMFVecEnv
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        BatchedNMFVecEnv(problem="small", problem_params=TINY, num_envs=2, budget=0)
    assert BatchedNMFVecEnv(problem="small", problem_params=TINY, num_envs=2).task.budget == 200

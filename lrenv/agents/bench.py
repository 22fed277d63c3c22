"""``lrenv bench``: environment and training throughput, each next to what the hardware allows.

For each preset (``small``, ``medium``, ``paper``) and device it measures, in one run:

* the GEMM rate of the device (``torch.matmul`` on square matrices, GFLOP/s), and from it the roofline
  of one SGD epoch (``6 m n r`` FLOPs: residual, W gradient and H gradient of every minibatch);
* the raw epoch (``engine.epoch`` + ``engine.loss()``, the least a plain training loop does);
* env-epochs/s of one :class:`lrenv.env.NMFEnv`, of a ``DummyVecEnv`` of ``B`` of them and of
  :class:`lrenv.vec_env.BatchedNMFVecEnv` with ``B`` slots;
* end to end PPO training steps/s on ``small`` (8 envs, set up as ``lrenv train`` does) with the batched
  env, with a DummyVecEnv, and with an env that costs nothing (PPO's own ceiling).

Every measured number is the best of a few timed windows (the machine may be shared). Prints a table
and writes JSON with ``--out``. Targets (reported as met / not met): CPU small batched B=8 at least 3x
the env-epochs/s of a DummyVecEnv of 8; PPO end-to-end on small at least 1500 steps/s with 8 envs.

``--masked`` instead compares the masked family ``sales`` with ``small`` (same 1000 x 100 shape): env steps
alternated in one process (target: sales at most 1.5x small), and an evaluation of a few schedules on
``sales`` on the exact-bound path (``LRENV_BOUND_TOL=0``) against the default cached bounds.

``--evaluate-paths`` instead times ``lrenv evaluate --problem small --seeds 10`` one instance at a time and batched
in one run (wall and CPU seconds, per method class), checks that both give the same results, and writes
``runs/bench/evaluate_paths.json``. The comparison with an older revision of the code is
``scripts/evaluate_speed.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, Callable

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv

PRESETS = ("small", "medium", "paper")
TARGET_BATCHED_SPEEDUP = 3.0
TARGET_PPO_STEPS = 1500.0
TARGET_MASKED_OVER_PLAIN = 1.5


# ----------------------------------------------------------------------------- timing helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], *, seconds: float, min_calls: int = 1, max_calls: int = 10_000,
              device: torch.device = torch.device("cpu"), windows: int = 3) -> float:
    """Best per-call wall time of ``fn`` over ``windows`` windows sharing ``seconds`` in all."""
    fn()  # warm up
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    calls = int(min(max_calls, max(min_calls, seconds / windows / one)))
    best = float("inf")
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def gemm_rate(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 0.5) -> float:
    """Measured matmul rate in FLOP/s (square matrices, large enough to be compute bound)."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.rand(n, n, device=device, dtype=dtype)
    b = torch.rand(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = best_time(lambda: torch.matmul(a, b, out=out), seconds=seconds, device=device)
    return 2.0 * n ** 3 / t


def epoch_flops(m: int, n: int, r: int) -> float:
    """FLOPs of one SGD epoch: per minibatch the residual, the W gradient and the H gradient (2 m n r each)."""
    return 6.0 * m * n * r


# ----------------------------------------------------------------------------- measurements
def _action(env_like, B: int | None = None) -> np.ndarray:
    """A safe constant action (half the stability bound in 'log_bound' mode)."""
    task = env_like.task
    a = float(task.action_for_scale(0.5)[0]) if task.action_mode == "log_bound" else 1e-4
    return np.full((1,) if B is None else (B, 1), a, dtype=np.float32)


def measure_raw_epoch(preset: str, device: torch.device, seconds: float, max_calls: int) -> float:
    from lrenv.env import NMFEnv
    env = NMFEnv(preset, device=str(device))
    env.reset(seed=0)
    eng = env.engine
    lr = torch.as_tensor(env.task.actions_to_lr(_action(env), env.tracker.lipschitz())[0],
                         dtype=eng.cfg.dtype, device=device)
    order = env._order[:1]

    def run():
        eng.epoch(lr, order)
        eng.loss()
    return best_time(run, seconds=seconds, max_calls=max_calls, device=device)


def measure_single_env(preset: str, device: torch.device, seconds: float, max_calls: int) -> float:
    """Seconds per NMFEnv.step (resets excluded when an episode ends inside the window are included)."""
    from lrenv.env import NMFEnv
    env = NMFEnv(preset, device=str(device))
    env.reset(seed=0)
    a = _action(env)

    def run():
        _, _, term, trunc, _ = env.step(a)
        if term or trunc:
            env.reset()
    return best_time(run, seconds=seconds, max_calls=max_calls, device=device)


def measure_dummy(preset: str, B: int, device: torch.device, seconds: float, max_calls: int) -> float:
    from stable_baselines3.common.vec_env import DummyVecEnv
    from lrenv.env import NMFEnv
    venv = DummyVecEnv([lambda: NMFEnv(preset, device=str(device)) for _ in range(B)])
    venv.seed(0)
    venv.reset()
    a = _action(venv.envs[0], B)
    return best_time(lambda: venv.step(a), seconds=seconds, max_calls=max_calls, device=device)


def measure_batched(preset: str, B: int, device: torch.device, seconds: float, max_calls: int) -> float:
    from lrenv.vec_env import BatchedNMFVecEnv
    venv = BatchedNMFVecEnv(preset, num_envs=B, device=str(device))
    venv.seed(0)
    venv.reset()
    a = _action(venv, B)
    return best_time(lambda: venv.step(a), seconds=seconds, max_calls=max_calls, device=device)


class NullVecEnv(VecEnv):
    """A VecEnv with the task's spaces whose step costs nothing (episodes of ``episode_len`` steps):
    PPO's own ceiling, measured in the same run as the real environments."""

    def __init__(self, num_envs: int, episode_len: int):
        from lrenv.task import TaskConfig
        task = TaskConfig()
        super().__init__(num_envs, task.observation_space(), task.action_space())
        self.episode_len = episode_len
        self.t = np.zeros(num_envs, dtype=np.int64)
        self._obs = np.zeros((num_envs,) + self.observation_space.shape, dtype=np.float32)

    def reset(self):
        self.t[:] = 0
        return self._obs.copy()

    def step_async(self, actions):
        pass

    def step_wait(self):
        self.t += 1
        done = self.t >= self.episode_len
        self.t[done] = 0
        infos = [{"terminal_observation": self._obs[i]} if done[i] else {} for i in range(self.num_envs)]
        return self._obs.copy(), np.zeros(self.num_envs, dtype=np.float32), done, infos

    def close(self):
        pass

    def get_attr(self, attr_name, indices=None):
        return [None for _ in self._get_indices(indices)]

    def set_attr(self, attr_name, value, indices=None):
        pass

    def env_method(self, method_name, *args, indices=None, **kwargs):
        return [None for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False for _ in self._get_indices(indices)]


PPO_KINDS = ("batched", "batched-1proc", "dummy", "null")
"""``batched``: the default (``--env-workers 0``: one process per core where the problems are large enough);
``batched-1proc``: the batched env in PPO's process (``--env-workers 1``)."""


def measure_ppo(kind: str, n_envs: int, steps: int, device: torch.device, preset: str = "small",
                env_threads_: int = 1) -> dict:
    """End-to-end PPO training steps/s set up exactly as ``lrenv train --problem PRESET --vec KIND`` does
    (the zoo hyperparameters, VecMonitor, VecNormalize), from a fresh policy; ``kind="null"`` swaps in
    :class:`NullVecEnv` to measure PPO alone, ``batched-1proc`` is ``--vec batched --env-workers 1``. Also
    reports how many episodes ended per 1000 steps (an untrained policy's episodes are short, so resets weigh
    more early in training) and the env's worker processes."""
    import tempfile
    from lrenv.agents.train import TrainConfig, env_threads, load_hyperparams, make_model, make_vec_env, wrap_normalize
    from stable_baselines3.common.vec_env import VecMonitor
    from lrenv.problems import make_family
    hp = load_hyperparams(preset, [f"n_envs:{n_envs}"])
    cfg = TrainConfig(problem=preset, vec={"null": "dummy", "batched-1proc": "batched"}.get(kind, kind),
                      env_device=str(device), hyperparams=hp, progress=False, env_threads=env_threads_,
                      env_workers=1 if kind == "batched-1proc" else 0)
    if kind == "null":
        monitor = VecMonitor(NullVecEnv(n_envs, make_family(preset).budget))
    else:
        monitor = make_vec_env(cfg, n_envs)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.torch_threads)  # as train() does
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = make_model(cfg, wrap_normalize(monitor, hp), tmp)
            rollout = model.n_steps * n_envs
            model.learn(total_timesteps=rollout)  # warm up: first rollout and first update
            before, episodes = model.num_timesteps, monitor.episode_count
            t0 = time.perf_counter()
            model.learn(total_timesteps=max(steps, rollout), reset_num_timesteps=False)
            elapsed = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        workers = getattr(monitor.venv, "workers", 1)
        monitor.close()  # ends a sharded env's worker processes
    done = model.num_timesteps - before
    return dict(steps_per_s=done / elapsed, steps=done, torch_threads=cfg.torch_threads, env_threads=env_threads(cfg),
                env_workers=workers,
                episodes_per_1000_steps=1000.0 * (monitor.episode_count - episodes) / done,
                n_steps=hp.get("n_steps"), batch_size=hp.get("batch_size"), n_epochs=hp.get("n_epochs"))


def preset_shape(preset: str) -> tuple[int, int, int]:
    from lrenv.problems import make_family
    fam = make_family(preset)
    return fam.m, fam.n, fam.rank


def preset_memory(preset: str, device: torch.device) -> int:
    from lrenv.engine import bytes_per_instance
    from lrenv.env import engine_config
    from lrenv.problems import make_family
    return bytes_per_instance(engine_config(make_family(preset), None, 0.0, device, "float32"))


# ----------------------------------------------------------------------------- contention
_BUSY = "import sys, time\nend = time.time() + float(sys.argv[1])\nwhile time.time() < end:\n    pass\n"
_CHILD = """
import json, os, sys, time
import torch
from lrenv.agents.bench import measure_ppo, measure_evaluation
kind, threads, steps, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c0 = time.process_time()
if kind == "ppo":
    r = measure_ppo("batched-1proc" if workers == 1 else "batched", 8, steps, torch.device("cpu"), env_threads_=threads)
    r["seconds"] = r["steps"] / r["steps_per_s"]
else:
    r = measure_evaluation(threads)
r["cpu_s"] = time.process_time() - c0
print("RESULT " + json.dumps(r))
"""


def measure_evaluation(threads: int, seeds: int = 4) -> dict:
    """Seconds for a small evaluation (tuned-baseline-like schedules and Armijo on ``small``) on ``threads``."""
    from lrenv.evaluate import evaluate
    from lrenv.parallel import can_fork, default_workers
    t0 = time.perf_counter()
    evaluate("fixed-scale,cosine,two-phase,armijo", problem="small", seeds=seeds, save=False, progress=False,
             verbose=False, threads=threads or None)
    return {"seconds": time.perf_counter() - t0,
            "env_workers": default_workers() if can_fork("cpu", threads or None) else 1}


def contention_table(ppo_steps: int = 8192, thread_options: tuple[int, ...] = (1, 0),
                     wait_policies: tuple[str | None, ...] = (None, "PASSIVE"), busy_seconds: float = 900.0) -> list[dict]:
    """PPO training on ``small`` (8 envs) and an evaluation, each in a fresh process, for every env thread count
    (0 = every core) and OpenMP wait policy, on the machine as it is ("idle") and with one competing CPU-bound
    process that this function starts and stops itself ("busy", a bounded busy loop). PPO also runs with the
    batched env in its own process (``--env-workers 1``) next to the default (one process per core, where the
    default thread count allows it). Process CPU time counts this process only, not a sharded env's workers."""
    import subprocess
    import sys
    rows = []
    for condition in ("idle", "busy"):
        busy = None
        if condition == "busy":
            busy = subprocess.Popen([sys.executable, "-c", _BUSY, str(busy_seconds)])
        try:
            for kind in ("ppo", "evaluate"):
                settings = [(t, p, 0) for t in thread_options for p in wait_policies]
                if kind == "ppo":
                    settings.insert(1, (1, None, 1))
                for threads, policy, workers in settings:
                    env = dict(os.environ)
                    env.pop("OMP_WAIT_POLICY", None)
                    if policy:
                        env["OMP_WAIT_POLICY"] = policy
                    out = subprocess.run([sys.executable, "-c", _CHILD, kind, str(threads), str(ppo_steps),
                                          str(workers)], env=env, capture_output=True, text=True,
                                         timeout=busy_seconds)
                    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if line is None:
                        raise RuntimeError(f"contention child failed: {out.stderr[-2000:]}")
                    r = json.loads(line[len("RESULT "):])
                    row = dict(condition=condition, kind=kind, env_threads=threads or os.cpu_count(),
                               wait_policy=policy or "default", env_workers=r.get("env_workers", 1),
                               seconds=r["seconds"], cpu_s=r["cpu_s"], load1=os.getloadavg()[0])
                    rows.append(row)
                    print(f"  {condition:4} {kind:8} threads {row['env_threads']} {row['wait_policy']:8} "
                          f"processes {row['env_workers']} {row['seconds']:.1f} s (cpu {row['cpu_s']:.1f} s)",
                          flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    for r in rows:  # ratio to the best setting of the same kind and condition
        best = min(x["seconds"] for x in rows if x["kind"] == r["kind"] and x["condition"] == r["condition"])
        r["over_best"] = r["seconds"] / best
    return rows


EVALUATE_PATHS_JSON = "runs/bench/evaluate_paths.json"
METHOD_CLASSES = ("schedules", "line searches", "policies", "torch optimizers", "other solvers")
"""How :func:`measure_evaluate_paths` groups the methods: schedules that need only the observation, the line
searches (they query the iterate), trained policies, the torch-optimizer solvers, the other outside solvers."""


def method_class(method: Any) -> str:
    """The :data:`METHOD_CLASSES` entry of an evaluation method (a schedule object or a solver name)."""
    from lrenv.schedules import Armijo, BarzilaiBorwein, PolicySchedule, Polyak
    from lrenv.solvers import TORCH_OPTIMIZERS
    if isinstance(method, str):
        return "torch optimizers" if method in TORCH_OPTIMIZERS else "other solvers"
    if isinstance(method, PolicySchedule):
        return "policies"
    return "line searches" if isinstance(method, (Armijo, Polyak, BarzilaiBorwein)) else "schedules"


EVALUATE_PATHS = {"one_at_a_time": dict(batched=False, workers=1), "batched": dict(batched=True, workers=1),
                  "batched_workers": dict(batched=True, workers=None)}
"""The paths :func:`measure_evaluate_paths` times: every instance in its own environment, one job after another;
batched, one job after another; batched with the default workers (one forked process per core)."""


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the evaluation's worker processes)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure_evaluate_paths(seeds: int = 10, problem: str = "small", methods: str = "all") -> dict:
    """``lrenv evaluate --problem PROBLEM --seeds N`` on each of :data:`EVALUATE_PATHS`, in one run: wall and CPU
    seconds (worker processes included) of each, the ratios to one at a time, the seconds per method class and
    per method (the runs' recorded wall times; batched ones share their batch's time), and whether the results
    are identical to one at a time (same outcomes; final losses within 1e-6)."""
    from lrenv.evaluate import evaluate, method_name, resolve_methods
    from lrenv.parallel import default_workers
    kw = dict(problem=problem, seeds=seeds, save=False, progress=False, verbose=False)
    classes = {method_name(m): method_class(m) for m in resolve_methods(methods)}
    out: dict[str, Any] = {"problem": problem, "seeds": seeds, "methods": methods, "workers": default_workers()}
    results = {}
    for path, settings in EVALUATE_PATHS.items():
        t0, c0 = time.perf_counter(), _cpu_seconds()
        res = evaluate(methods, **settings, **kw)
        wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        per_method = {m: float(sum(t.wall[-1] for t in trs)) for m, trs in res.traces.items()}
        per_class = {c: 0.0 for c in METHOD_CLASSES}
        for m, sec in per_method.items():
            per_class[classes[m]] += sec
        out[path] = {"wall_s": wall, "cpu_s": cpu, "per_class_s": per_class, "per_method_s": per_method}
        results[path] = res.rows
    keys = ("method", "instance", "reached_target", "diverged", "epochs_to_target", "epochs")
    one = results["one_at_a_time"]
    out["runs"] = len(one)
    for path in ("batched", "batched_workers"):
        new = results[path]
        out[path]["same_outcomes"] = ([tuple(r[k] for k in keys) for r in one]
                                      == [tuple(r[k] for k in keys) for r in new])
        out[path]["final_losses_close"] = all(
            np.isclose(a["final_loss"], b["final_loss"], rtol=1e-6, equal_nan=True)
            or not (np.isfinite(a["final_loss"]) or np.isfinite(b["final_loss"])) for a, b in zip(one, new))
        out[path]["speedup_wall"] = out["one_at_a_time"]["wall_s"] / out[path]["wall_s"]
        out[path]["speedup_cpu"] = out["one_at_a_time"]["cpu_s"] / out[path]["cpu_s"]
    out["speedup_per_class"] = {c: out["one_at_a_time"]["per_class_s"][c] / out["batched"]["per_class_s"][c]
                                for c in METHOD_CLASSES if out["batched"]["per_class_s"][c] > 0}
    return out


def print_evaluate_paths(r: dict) -> None:
    one, new, par = r["one_at_a_time"], r["batched"], r["batched_workers"]
    print(f"lrenv evaluate --problem {r['problem']} --seeds {r['seeds']} --methods {r['methods']} ({r['runs']} runs): "
          f"one at a time, batched, batched with {r['workers']} workers; in one run")
    print(f"{'':22} {'one at a time':>14} {'batched':>9} {'ratio':>6} {'workers':>9} {'ratio':>6}")
    print(f"{'wall s':22} {one['wall_s']:>14.1f} {new['wall_s']:>9.1f} {new['speedup_wall']:>6.2f} "
          f"{par['wall_s']:>9.1f} {par['speedup_wall']:>6.2f}")
    print(f"{'CPU s (with workers)':22} {one['cpu_s']:>14.1f} {new['cpu_s']:>9.1f} {new['speedup_cpu']:>6.2f} "
          f"{par['cpu_s']:>9.1f} {par['speedup_cpu']:>6.2f}")
    for c in METHOD_CLASSES:
        a, b = one["per_class_s"][c], new["per_class_s"][c]
        if a or b:
            print(f"{'  ' + c + ' s':22} {a:>14.1f} {b:>9.1f} {a / b if b else float('nan'):>6.2f}")
    for path in ("batched", "batched_workers"):
        print(f"{path}: same outcomes as one at a time: {r[path]['same_outcomes']}; final losses within 1e-6: "
              f"{r[path]['final_losses_close']}")


# ----------------------------------------------------------------------------- masked bounds
def measure_masked_step(rounds: int = 6, steps: int = 250, threads: int = 1) -> dict:
    """Seconds per env step of ``sales`` (masked; default cached bounds), of ``sales`` with exact masked bounds
    every epoch (``bound_tol = 0``, the reference path) and of ``small`` (same shape, unmasked), measured in
    one process: ``rounds`` rounds of ``steps`` steps of each env, alternated (the order rotates each round),
    episodes running on across rounds and reset when they end (resets included, as in training). Reports
    process CPU time and wall time per step (totals over all rounds, and the best round), the ratios to
    ``small``, and how often the cached path recomputed the exact constants."""
    from lrenv.env import NMFEnv
    envs = {"small": NMFEnv("small", threads=threads), "sales": NMFEnv("sales", threads=threads),
            "sales_exact": NMFEnv("sales", threads=threads)}
    for env in envs.values():
        env.reset(seed=0)
    envs["sales_exact"].engine.cfg.bound_tol = 0.0  # per-engine config: the reference path
    actions = {name: _action(env) for name, env in envs.items()}
    evaluations = {name: 1 for name in envs}
    cpu = {name: [] for name in envs}
    wall = {name: [] for name in envs}
    counts_before = envs["sales"].engine.exact_bound_count.copy()
    names = list(envs)
    for k in range(rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            env, a = envs[name], actions[name]
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                _, _, term, trunc, _ = env.step(a)
                if term or trunc:
                    env.reset()
                    evaluations[name] += 1
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
            evaluations[name] += steps
    out: dict[str, Any] = {"rounds": rounds, "steps_per_round": steps, "threads": threads}
    for name in envs:
        out[name] = dict(cpu_ms=1e3 * float(np.mean(cpu[name])), wall_ms=1e3 * float(np.mean(wall[name])),
                         best_cpu_ms=1e3 * min(cpu[name]), best_wall_ms=1e3 * min(wall[name]))
    for name in ("sales", "sales_exact"):
        for key in ("cpu_ms", "wall_ms", "best_cpu_ms", "best_wall_ms"):
            out[f"{name}_over_small_{key[:-3]}"] = out[name][key] / out["small"][key]
    exact = envs["sales"].engine.exact_bound_count - counts_before
    out["sales_exact_fraction"] = dict(L_W=float(exact[0, 0]) / evaluations["sales"],
                                       L_H=float(exact[0, 1]) / evaluations["sales"])
    ratio = out["sales_over_small_cpu"]
    out["target"] = dict(value=ratio, target=TARGET_MASKED_OVER_PLAIN, met=ratio <= TARGET_MASKED_OVER_PLAIN)
    return out


def compare_masked_evaluation(methods: str = "fixed-scale,cosine,armijo", seeds: int = 5, budget: int = 200,
                              split: str = "validation", problem: str = "sales") -> dict:
    """``lrenv evaluate`` of ``methods`` on ``problem`` on the exact-bound path (``LRENV_BOUND_TOL=0``) and on
    the default cached bounds, in one process; per method the AUC of log10 loss (mean and 95 % CI), the
    median final loss and held-out MSE of both, and whether each path's AUC mean lies in the other's CI.

    Fixed step sizes at or past SGD's stability edge on ``sales`` (``fixed c >= 1.3``) are chaotic: float32
    rounding alone (the former einsum and the packed product, both exact) changes which instances diverge
    there, so only the stable schedules are expected to agree closely."""
    import os
    from lrenv.engine import BOUND_TOL_ENV
    from lrenv.evaluate import evaluate
    kw = dict(problem=problem, seeds=seeds, budget=budget, split=split, save=False, progress=False, verbose=False)
    before = os.environ.get(BOUND_TOL_ENV)
    runs = {}
    try:
        for path, tol in (("exact", "0"), ("cached", None)):
            os.environ.pop(BOUND_TOL_ENV, None)
            if tol is not None:
                os.environ[BOUND_TOL_ENV] = tol
            t0 = time.perf_counter()
            res = evaluate(methods, **kw)
            runs[path] = (res.summary, time.perf_counter() - t0)
    finally:
        os.environ.pop(BOUND_TOL_ENV, None)
        if before is not None:
            os.environ[BOUND_TOL_ENV] = before
    (old, old_s), (new, new_s) = runs["exact"], runs["cached"]
    rows = []
    for name in old:
        a, b = old[name], new[name]
        inside = lambda x, ci: bool(ci[0] <= x <= ci[1])  # noqa: E731
        rows.append(dict(method=name, auc_exact=a["auc_log_loss_mean"], auc_exact_ci95=a["auc_log_loss_ci95"],
                         auc_cached=b["auc_log_loss_mean"], auc_cached_ci95=b["auc_log_loss_ci95"],
                         final_loss_exact=a["final_loss_median"], final_loss_cached=b["final_loss_median"],
                         heldout_exact=a["heldout_mse_median"], heldout_cached=b["heldout_mse_median"],
                         diverged_exact=a["diverged_rate"], diverged_cached=b["diverged_rate"],
                         within_ci=inside(b["auc_log_loss_mean"], a["auc_log_loss_ci95"])
                         and inside(a["auc_log_loss_mean"], b["auc_log_loss_ci95"])))
    return dict(command=f"lrenv evaluate --problem {problem} --seeds {seeds} --methods {methods} --split {split} "
                        f"--budget {budget}", exact_s=old_s, cached_s=new_s, methods=rows,
                all_within_ci=all(r["within_ci"] for r in rows))


def print_masked(result: dict) -> None:
    step = result["step"]
    print(f"env step, ms ({step['rounds']} alternated rounds of {step['steps_per_round']} steps, {step['threads']} "
          f"torch thread; mean over rounds / best round)")
    print(f"{'env':12} {'cpu':>7} {'wall':>7} {'best cpu':>9} {'best wall':>9}")
    for name in ("small", "sales", "sales_exact"):
        r = step[name]
        print(f"{name:12} {r['cpu_ms']:>7.2f} {r['wall_ms']:>7.2f} {r['best_cpu_ms']:>9.2f} {r['best_wall_ms']:>9.2f}")
    f = step["sales_exact_fraction"]
    print(f"sales / small: cpu {step['sales_over_small_cpu']:.2f}x, wall {step['sales_over_small_wall']:.2f}x "
          f"(exact bounds every epoch: cpu {step['sales_exact_over_small_cpu']:.2f}x); exact constants recomputed at "
          f"{100 * f['L_W']:.1f} % (L_W) / {100 * f['L_H']:.1f} % (L_H) of the evaluations")
    t = step["target"]
    print(f"target sales_over_small_cpu: {t['value']:.2f} vs <= {t['target']} -> {'MET' if t['met'] else 'NOT MET'}")
    ev = result.get("evaluation")
    if ev:
        print(f"\n{ev['command']}: exact bounds {ev['exact_s']:.1f} s, cached {ev['cached_s']:.1f} s")
        print(f"{'method':12} {'AUC exact [95% CI]':>28} {'AUC cached [95% CI]':>28} {'final exact':>11} "
              f"{'final cached':>12} {'in CI':>5}")
        for r in ev["methods"]:
            lo, hi = r["auc_exact_ci95"]
            lo2, hi2 = r["auc_cached_ci95"]
            print(f"{r['method']:12} {r['auc_exact']:>8.4f} [{lo:.4f}, {hi:.4f}] {r['auc_cached']:>8.4f} [{lo2:.4f}, "
                  f"{hi2:.4f}] {r['final_loss_exact']:>11.4g} {r['final_loss_cached']:>12.4g} {str(r['within_ci']):>5}")


# ----------------------------------------------------------------------------- driver
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="problem sizes")
    p.add_argument("--batch", "-B", type=int, default=8, help="B for DummyVecEnv and the batched env")
    p.add_argument("--paper-batch", type=int, default=2, help="B for the paper size on CPU")
    p.add_argument("--devices", nargs="+", default=None,
                   help="devices to measure (default: cpu, plus cuda when available)")
    p.add_argument("--seconds", type=float, default=1.0, help="time per measurement (small/medium)")
    p.add_argument("--paper-epochs", type=int, default=2, help="epochs per measurement at the paper size on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave torch's default, all cores)")
    p.add_argument("--ppo-steps", type=int, default=8192, help="PPO training steps per timed run (0: skip)")
    p.add_argument("--ppo-envs", type=int, default=8, help="envs for the PPO end-to-end run")
    p.add_argument("--contention", action="store_true",
                   help="instead: PPO and an evaluation for env threads 1 / all and OpenMP wait policies, idle and "
                        "with a competing busy process (started and stopped by the bench)")
    p.add_argument("--evaluate-paths", action="store_true",
                   help="instead: lrenv evaluate --problem small --seeds 10, one instance at a time vs batched, per "
                        f"method class; writes {EVALUATE_PATHS_JSON} unless --out")
    p.add_argument("--evaluate-methods", default="all", help="--evaluate-paths: the methods evaluated")
    p.add_argument("--evaluate-seeds", type=int, default=10, help="--evaluate-paths: instances")
    p.add_argument("--masked", action="store_true",
                   help="instead: sales (masked) vs small env step, alternated in one run, and sales schedules' "
                        "results on exact vs cached masked bounds")
    p.add_argument("--masked-rounds", type=int, default=6, help="--masked: alternated timing rounds")
    p.add_argument("--masked-steps", type=int, default=250, help="--masked: env steps per round and env")
    p.add_argument("--masked-seeds", type=int, default=5,
                   help="--masked: evaluation instances (0: skip the evaluation)")
    p.add_argument("--masked-budget", type=int, default=200, help="--masked: evaluation epoch budget")
    p.add_argument("--out", default=None, help="write the results as JSON here")


def _fmt(x: float | None, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _write(result: dict, path: str | None) -> None:
    """Write ``result`` as JSON atomically (a temporary file beside ``path``, then a rename)."""
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, path)
        print(f"wrote {path}")


def run(args: argparse.Namespace) -> int:
    from lrenv.vec_env import available_memory
    if args.contention:
        rows = contention_table(ppo_steps=args.ppo_steps or 8192)
        print(f"\n{'condition':9} {'kind':8} {'env threads':>11} {'wait':8} {'processes':>9} {'seconds':>8} {'cpu s':>6} "
              f"{'x best':>6}")
        for r in rows:
            print(f"{r['condition']:9} {r['kind']:8} {r['env_threads']:>11} {r['wait_policy']:8} {r['env_workers']:>9} "
                  f"{r['seconds']:>8.1f} "
                  f"{r['cpu_s']:>6.1f} {r['over_best']:>6.2f}")
        _write({"contention": rows, "torch": torch.__version__}, args.out)
        return 0
    if args.masked:
        result = {"step": measure_masked_step(rounds=args.masked_rounds, steps=args.masked_steps),
                  "torch": torch.__version__}
        if args.masked_seeds > 0:
            result["evaluation"] = compare_masked_evaluation(seeds=args.masked_seeds, budget=args.masked_budget)
        print_masked(result)
        _write(result, args.out)
        return 0
    if args.evaluate_paths:
        r = measure_evaluate_paths(seeds=args.evaluate_seeds, methods=args.evaluate_methods)
        print_evaluate_paths(r)
        _write({"evaluate_paths": r, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "load1": os.getloadavg()[0]}, args.out or EVALUATE_PATHS_JSON)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    result: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                              "machine": platform.processor() or platform.machine(), "rows": [], "ppo": {}}
    rows = result["rows"]
    for dev_name in devices:
        device = torch.device(dev_name)
        if device.type == "cuda" and not torch.cuda.is_available():
            print(f"skipping {dev_name}: CUDA is not available")
            continue
        rate = gemm_rate(device)
        result[f"gemm_gflops_{device.type}"] = rate / 1e9
        for preset in args.presets:
            m, n, r = preset_shape(preset)
            slow = preset == "paper" and device.type == "cpu"
            B = args.paper_batch if slow else args.batch
            kw = dict(seconds=args.seconds, max_calls=args.paper_epochs if slow else 100_000)
            if slow:
                kw["seconds"] = 0.0
            raw = measure_raw_epoch(preset, device, **kw)
            single = measure_single_env(preset, device, **kw)
            dummy = measure_dummy(preset, B, device, **kw)
            batched = measure_batched(preset, B, device, **kw)
            roof = rate / epoch_flops(m, n, r)
            per = preset_memory(preset, device)
            row = dict(device=dev_name, preset=preset, shape=[m, n, r], B=B, gemm_gflops=rate / 1e9,
                       epoch_gflop=epoch_flops(m, n, r) / 1e9, roofline_epochs_per_s=roof,
                       raw_epoch_ms=raw * 1e3, raw_epochs_per_s=1 / raw,
                       single_env_epochs_per_s=1 / single, step_over_raw=single / raw,
                       dummy_env_epochs_per_s=B / dummy, batched_env_epochs_per_s=B / batched,
                       batched_over_dummy=dummy / batched, bytes_per_instance=per,
                       available_bytes=available_memory(device), largest_B=int(0.9 * available_memory(device) // per))
            rows.append(row)
            print(f"  measured {dev_name} {preset}", flush=True)
    if args.ppo_steps > 0 and "small" in args.presets:
        for kind in PPO_KINDS:
            result["ppo"][kind] = measure_ppo(kind, args.ppo_envs, args.ppo_steps, torch.device("cpu"))
            print(f"  measured PPO with the {kind} env", flush=True)
    # ---- targets
    cpu_small = next((r for r in rows if r["device"] == "cpu" and r["preset"] == "small"), None)
    targets = {}
    if cpu_small is not None:
        targets["cpu_small_batched_over_dummy"] = dict(value=cpu_small["batched_over_dummy"],
                                                       target=TARGET_BATCHED_SPEEDUP, B=cpu_small["B"],
                                                       met=cpu_small["batched_over_dummy"] >= TARGET_BATCHED_SPEEDUP)
    if result["ppo"]:
        value = result["ppo"]["batched"]["steps_per_s"]
        targets["ppo_small_batched_steps_per_s"] = dict(value=value, target=TARGET_PPO_STEPS,
                                                        met=value >= TARGET_PPO_STEPS)
    result["targets"] = targets
    print_report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


def print_report(result: dict) -> None:
    print(f"\ntorch {result['torch']}, {result['threads']} threads")
    for k, v in result.items():
        if k.startswith("gemm_gflops_"):
            print(f"GEMM {k[len('gemm_gflops_'):]}: {v:.0f} GFLOP/s (measured in this run)")
    hdr = (f"{'device':6} {'preset':7} {'B':>3} {'MiB/inst':>8} {'roofline':>9} {'raw ep':>8} {'single':>8} "
           f"{'step/raw':>8} {'dummyB':>8} {'batchedB':>9} {'bat/dum':>7}")
    print("\nenv-epochs/s (roofline = GEMM rate / (6 m n r); raw = engine.epoch + loss; step/raw = env.step time / raw epoch time)")
    print(hdr)
    for r in result["rows"]:
        print(f"{r['device']:6} {r['preset']:7} {r['B']:>3} {r['bytes_per_instance'] / 2**20:>8.1f} "
              f"{r['roofline_epochs_per_s']:>9.0f} {r['raw_epochs_per_s']:>8.1f} {r['single_env_epochs_per_s']:>8.1f} "
              f"{r['step_over_raw']:>8.2f} {r['dummy_env_epochs_per_s']:>8.1f} {r['batched_env_epochs_per_s']:>9.1f} "
              f"{r['batched_over_dummy']:>7.2f}")
    if result["ppo"]:
        ceiling = result["ppo"].get("null", {}).get("steps_per_s")
        any_run = next(iter(result["ppo"].values()))
        print(f"\nPPO end to end on small, fresh policy, as `lrenv train` sets it up (n_steps {any_run['n_steps']}, "
              f"batch {any_run['batch_size']}, n_epochs {any_run['n_epochs']}; PPO on {any_run['torch_threads']} torch "
              f"thread, the envs' SGD on {any_run['env_threads']}); null = an env that costs nothing")
        print(f"{'env':13} {'steps/s':>8} {'of null':>8} {'episodes/1k steps':>18} {'env processes':>14}")
        for kind, r in result["ppo"].items():
            share = "-" if not ceiling else f"{r['steps_per_s'] / ceiling:.2f}"
            print(f"{kind:13} {r['steps_per_s']:>8.0f} {share:>8} {r['episodes_per_1000_steps']:>18.1f} "
                  f"{r.get('env_workers', 1):>14}")
    for name, t in result.get("targets", {}).items():
        print(f"target {name}: {t['value']:.2f} vs {t['target']} -> {'MET' if t['met'] else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))

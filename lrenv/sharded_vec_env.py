"""Batched environments spread over worker processes: :class:`ShardedVecEnv`.

One :class:`lrenv.vec_env.BatchedNMFVecEnv` steps its problems on one core (one torch thread by default: more
threads wait for each other on a busy machine, issue 14). ``ShardedVecEnv`` cuts the ``num_envs`` slots into
contiguous shards, each a ``BatchedNMFVecEnv`` on one thread -- the first in the calling process, the others in
forked worker processes -- and steps them at once, so that more cores are used without threads that wait for each
other, and a busy core slows only its own shard. Slot ``i`` is seeded ``seed + i`` and draws its instances from its
own generator, exactly as in one ``BatchedNMFVecEnv``, so the trajectories are the same, bit for bit (the tests check
it).

Processes rather than threads for the reason :mod:`lrenv.parallel` gives (the engine's Python between its
products holds the GIL); forked, so a worker starts in milliseconds instead of importing torch again; pipes
carry only actions, observations, rewards and infos (a few hundred bytes per slot and step).
"""

from __future__ import annotations

import bisect
import multiprocessing
import multiprocessing.connection
import signal
from typing import Any, Iterable, Sequence

import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from .parallel import available_cores, can_fork, one_thread
from .problems import make_family

MIN_SHARD_WORK = 2_000_000
"""Auto sharding (``workers=None``) only when each shard still holds at least this many multiply-adds per epoch
(slots x m x n x rank): below that a step costs less than the pipes' round trip (``tutorial``'s 4 x 5 problems,
``illcond``'s 10 x 6 stay in one)."""


def auto_workers(num_envs: int, work_per_env: int, device: str = "cpu", threads: int | None = 1) -> int:
    """How many processes a training env of ``num_envs`` slots uses by default: one per available core, at most
    one per slot and only as many as keep :data:`MIN_SHARD_WORK` per shard; 1 where work may not be forked
    (:func:`lrenv.parallel.can_fork`: a GPU, several torch threads, no fork, a daemonic process)."""
    if not can_fork(device, threads):
        return 1
    by_work = max(1, (num_envs * work_per_env) // MIN_SHARD_WORK)
    return int(max(1, min(available_cores(), num_envs, by_work)))


def _auto_workers_for(num_envs: int, problem: str, problem_params: dict | None, device: str,
                      threads: int | None) -> int:
    """:func:`auto_workers` for ``num_envs`` problems of the family ``problem``."""
    fam = make_family(problem, **(problem_params or {}))
    return auto_workers(int(num_envs), fam.m * fam.n * fam.rank, str(device), threads)


def batched_vec_env(num_envs: int, *, workers: int | None = None, problem: str = "small",
                    problem_params: dict | None = None, device: str = "cpu", threads: int | None = 1,
                    **kwargs: Any) -> VecEnv:
    """The batched env of ``num_envs`` slots: a :class:`ShardedVecEnv` of ``workers`` processes (None:
    :func:`auto_workers`), or one :class:`lrenv.vec_env.BatchedNMFVecEnv` in this process when that is 1."""
    from .vec_env import BatchedNMFVecEnv
    if workers is None:
        workers = _auto_workers_for(num_envs, problem, problem_params, device, threads)
    if workers == 1:
        return BatchedNMFVecEnv(problem, num_envs=num_envs, problem_params=problem_params, device=device,
                                threads=threads, **kwargs)
    return ShardedVecEnv(problem, num_envs, workers=workers, problem_params=problem_params, device=device,
                         threads=threads, **kwargs)


def shard_bounds(num_envs: int, workers: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` slot ranges, as equal as possible, the larger ones first."""
    base, extra = divmod(num_envs, workers)
    bounds, start = [], 0
    for k in range(workers):
        stop = start + base + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def _handle(venv, cmd: str, args: Any) -> Any:
    """Run one command on a shard's BatchedNMFVecEnv (in a worker, or in this process for the first shard)."""
    if cmd == "step":
        venv.step_async(args)
        return venv.step_wait()
    if cmd == "reset":
        seeds, options = args
        venv._seeds, venv._options = list(seeds), list(options)
        return venv.reset()
    if cmd == "get_attr":
        return venv.get_attr(*args)
    if cmd == "set_attr":
        return venv.set_attr(*args)
    if cmd == "env_method":
        name, m_args, m_kwargs, indices = args
        return venv.env_method(name, *m_args, indices=indices, **m_kwargs)
    if cmd == "close":
        return venv.close()
    raise ValueError(f"unknown command {cmd!r}")  # pragma: no cover - a programming error in this module


def _worker(conn: multiprocessing.connection.Connection, kwargs: dict, num_envs: int,
            inherited: Sequence[multiprocessing.connection.Connection]) -> None:
    """A shard's loop: build its BatchedNMFVecEnv, answer commands until 'close' (or the parent goes away).
    ``inherited``: the parent's ends of the pipes, closed here so that each worker sees EOF when the parent dies."""
    for c in inherited:
        c.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it saves, then closes us)
    one_thread()
    from .vec_env import BatchedNMFVecEnv
    try:
        venv = BatchedNMFVecEnv(num_envs=num_envs, **kwargs)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", e))
        conn.close()
        return
    conn.send(("ok", None))
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        try:
            result = _handle(venv, cmd, args)
        except BaseException as e:  # noqa: BLE001 - the parent raises it with the shard named
            conn.send(("error", e))
            continue
        conn.send(("ok", result))
        if cmd == "close":
            break
    conn.close()


def _in_worker(error: BaseException, where: str) -> BaseException:
    """``error`` again, its message naming the worker (a RuntimeError where its type cannot be rebuilt so)."""
    try:
        return type(error)(f"{error} ({where})")
    except Exception:  # noqa: BLE001 - exception types with other constructors
        return RuntimeError(f"{type(error).__name__}: {error} ({where})")


class ShardedVecEnv(VecEnv):
    """``num_envs`` batched NMF environments in ``workers`` processes (contiguous shards of slots): the first shard
    is stepped in this process, each other one in a forked worker, all at once.

    Arguments are :class:`lrenv.vec_env.BatchedNMFVecEnv`'s; ``workers`` processes in all, this one included
    (default :func:`auto_workers`), each on one torch thread, so ``threads`` must be 1 and ``device`` a CPU. The
    first shard stays here because this process would otherwise only wait: the workers' shards compute while it
    computes its own, and a worker's wake-up through its pipe (slow on a virtual machine) hides behind that work.
    The SB3 ``VecEnv`` contract holds as for one ``BatchedNMFVecEnv``: the same observations, rewards, dones and
    infos (``terminal_observation`` on auto-reset) for the same seeds and actions; ``get_attr``/``set_attr``/
    ``env_method`` reach the slots' shards. Call :meth:`close` (or use it as a context manager) to end the
    workers; they also end with this process.
    """

    def __init__(self, problem: str = "small", num_envs: int = 8, *, workers: int | None = None,
                 device: str = "cpu", threads: int | None = 1, **kwargs: Any):
        from .vec_env import BatchedNMFVecEnv
        if not (isinstance(num_envs, (int, np.integer)) and num_envs >= 1):
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        if workers is None:
            workers = _auto_workers_for(num_envs, problem, kwargs.get("problem_params"), device, threads)
        if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
            raise ValueError(f"workers must be a positive integer (processes), got {workers!r}")
        if workers > num_envs:
            raise ValueError(f"workers={workers} exceeds num_envs={num_envs}: each process needs at least one env")
        if workers > 1 and not can_fork(str(device), threads):
            raise ValueError(f"ShardedVecEnv needs forked CPU workers on one torch thread each (device={device!r}, "
                             f"threads={threads!r}, in {multiprocessing.current_process().name}); use "
                             "BatchedNMFVecEnv (one process) instead")
        self.bounds = shard_bounds(int(num_envs), int(workers))
        self._starts = [a for a, _ in self.bounds]
        shard_kwargs = dict(kwargs, problem=problem, device=device, threads=threads)
        # the first shard validates every argument before a worker starts
        self._local = BatchedNMFVecEnv(num_envs=self.bounds[0][1], **shard_kwargs)
        self.render_mode = None
        self.metadata = {"render_modes": []}
        super().__init__(int(num_envs), self._local.observation_space, self._local.action_space)
        self.family, self.task = self._local.family, self._local.task
        ctx = multiprocessing.get_context("fork")
        self._conns: list[multiprocessing.connection.Connection | None] = [None]
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self.closed = False
        self._actions: np.ndarray | None = None
        try:
            for start, stop in self.bounds[1:]:
                parent, child = ctx.Pipe()
                inherited = [c for c in self._conns if c is not None] + [parent]
                proc = ctx.Process(target=_worker, args=(child, shard_kwargs, stop - start, inherited), daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            self._gather(range(1, self.workers))
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- plumbing
    @property
    def workers(self) -> int:
        """Processes stepping the envs, this one included."""
        return len(self.bounds)

    def _gather(self, shards: Iterable[int]) -> list[Any]:
        """The answers of the listed workers; every answer is read before a worker's error is raised, so the pipes
        stay in step for the next command."""
        answers = []
        for k in shards:
            conn = self._conns[k]
            assert conn is not None
            answers.append((k, *conn.recv()))
        for k, status, value in answers:
            if status == "error":
                start, stop = self.bounds[k]
                raise _in_worker(value, f"in the worker of envs {start}..{stop - 1}") from value
        return [value for _, _, value in answers]

    def _call(self, shards: Sequence[int], cmd: str, args: Sequence[Any]) -> list[Any]:
        """``cmd`` on each listed shard: sent to the workers first, then run here for shard 0, then collected."""
        if self.closed:
            raise RuntimeError("ShardedVecEnv is closed")
        shards, args = list(shards), list(args)
        for k, a in zip(shards, args):
            if k:
                conn = self._conns[k]
                assert conn is not None
                conn.send((cmd, a))
        remote = [k for k in shards if k]
        try:
            done = {0: _handle(self._local, cmd, args[shards.index(0)])} if 0 in shards else {}
        except BaseException:
            self._gather_quietly(remote)
            raise
        done.update(zip(remote, self._gather(remote)))
        return [done[k] for k in shards]

    def _gather_quietly(self, shards: Sequence[int]) -> None:
        try:
            self._gather(shards)
        except Exception:  # noqa: BLE001 - the first shard's error is the one raised
            pass

    def _shard_of(self, i: int) -> int:
        if not 0 <= i < self.num_envs:
            raise IndexError(f"env index {i} out of range for {self.num_envs} envs")
        return bisect.bisect_right(self._starts, i) - 1

    def _by_shard(self, indices: VecEnvIndices) -> dict[int, list[int]]:
        """Global env indices -> {shard: [local indices]} (in the order given)."""
        out: dict[int, list[int]] = {}
        for i in self._get_indices(indices):
            k = self._shard_of(i)
            out.setdefault(k, []).append(i - self._starts[k])
        return out

    def _per_index(self, indices: VecEnvIndices, cmd: str, make_args) -> list[Any]:
        """Run ``cmd`` on each listed env's shard; the answers in the order of ``indices``."""
        groups = self._by_shard(indices)
        answers = self._call(list(groups), cmd, [make_args(local) for local in groups.values()])
        position = {k: iter(v) for k, v in zip(groups, answers)}
        return [next(position[self._shard_of(i)]) for i in self._get_indices(indices)]

    # -------------------------------------------------------------- VecEnv API
    def reset(self) -> VecEnvObs:
        args = [(self._seeds[a:b], self._options[a:b]) for a, b in self.bounds]
        obs = np.concatenate(self._call(range(self.workers), "reset", args))
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        assert self._actions is not None
        results = self._call(range(self.workers), "step", [self._actions[a:b] for a, b in self.bounds])
        self._actions = None
        obs, rewards, dones, infos = zip(*results)
        return (np.concatenate(obs), np.concatenate(rewards), np.concatenate(dones),
                [info for part in infos for info in part])

    def close(self) -> None:
        if getattr(self, "closed", True):
            return
        self.closed = True
        for conn, proc in zip(self._conns[1:], self._procs):
            try:
                conn.send(("close", None))
                conn.recv()
            except (BrokenPipeError, EOFError, OSError):
                pass
            conn.close()
            proc.join(timeout=5)
            if proc.is_alive():  # pragma: no cover - a wedged worker
                proc.terminate()
        self._local.close()

    def __enter__(self) -> "ShardedVecEnv":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None] * self.num_envs

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":  # asked by VecEnv.__init__, before the workers exist; nothing renders
            return [None for _ in self._get_indices(indices)]
        return self._per_index(indices, "get_attr", lambda local: (attr_name, local))

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        groups = self._by_shard(indices)
        self._call(list(groups), "set_attr", [(attr_name, value, local) for local in groups.values()])

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        return self._per_index(indices, "env_method",
                               lambda local: (method_name, method_args, method_kwargs, local))

    def env_is_wrapped(self, wrapper_class, indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

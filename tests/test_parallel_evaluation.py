"""The evaluation's jobs and figures in forked worker processes: the same numbers as one after another, every
output written, errors raised where the caller is; scikit-learn's update called directly is its public call."""

import os

import numpy as np
import pytest

from lrenv import evaluate as ev
from lrenv import parallel
from lrenv.solvers import sklearn_update

SMALL = dict(problem="small", problem_params=dict(m=205, n=40, rank=5, target_factor=1.5), budget=40)
METHODS = "fixed-scale,random-bound,random-walk,cosine,two-phase,armijo,bb,adam,sklearn-cd,hals"

needs_fork = pytest.mark.skipif(not parallel.can_fork("cpu", 1), reason="no fork on this platform")


def _numbers(result):
    """Every row but its wall times, exactly (repr: floats to the last bit, NaN equal to NaN)."""
    return [repr({k: v for k, v in row.items() if k not in ("wall_time", "wall_to_target")}) for row in result.rows]


@needs_fork
def test_workers_give_the_numbers_of_one_after_another(monkeypatch, tmp_path):
    # jobs of 4 runs: every stateful schedule (random, cosine, line searches) spans several jobs
    monkeypatch.setattr(ev, "GROUP_CHUNK", 4)
    common = dict(seeds=3, progress=False, verbose=False, **SMALL)
    one = ev.evaluate(METHODS, workers=1, out_dir=str(tmp_path / "one"), **common)
    two = ev.evaluate(METHODS, workers=2, out_dir=str(tmp_path / "two"), **common)
    assert len(ev._jobs(ev.resolve_methods(METHODS.split(","), None), [0, 1, 2], dict(SMALL), seed=0, split="test",
                        batched=True, solver_options={})) > 8
    assert _numbers(one) == _numbers(two)
    assert [r["method"] for r in two.rows][:3] == ["fixed c=0.2"] * 3  # the methods' order, instances in order
    assert [r["instance"] for r in two.rows][:3] == sorted(r["instance"] for r in two.rows[:3])
    assert {r["reached_target"] for r in two.rows} == {True, False}
    for name in ("results.csv", "summary.md", "loss_curves.png", "lr_history.png", "loss_curves_all.png"):
        assert os.path.getsize(tmp_path / "two" / name) > 0
    assert set(os.listdir(tmp_path / "two" / "tb")) >= {"adam", "sklearn-cd", "cosine"}
    assert not [f for f in os.listdir(tmp_path / "two") if ".tmp" in f]


def test_workers_must_be_a_positive_integer():
    assert parallel.check_workers(np.int64(3)) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a positive integer"):
            ev.evaluate("fixed-scale", seeds=1, save=False, progress=False, verbose=False, workers=bad, **SMALL)


def _can_fork_here(queue):
    queue.put(parallel.can_fork("cpu", 1))


def test_fork_is_refused_where_it_is_unsafe():
    assert not parallel.can_fork("cpu", 2) and not parallel.can_fork("cpu", None)
    assert not parallel.can_fork("cuda", 1)
    assert 1 <= parallel.default_workers() <= parallel.MAX_WORKERS
    import multiprocessing
    ctx = multiprocessing.get_context("fork" if parallel.can_fork() else "spawn")
    queue = ctx.Queue()
    daemon = ctx.Process(target=_can_fork_here, args=(queue,), daemon=True)  # may not have children
    daemon.start()
    assert queue.get(timeout=60) is False
    daemon.join()


@needs_fork
def test_fork_map_keeps_the_order_and_raises_an_items_error():
    data = [3.0, 1.0, 2.0, 5.0]
    done = []
    assert parallel.fork_map(lambda k: data[k] ** 2, 4, 2, order=[3, 0, 1, 2], on_done=done.append) == [9, 1, 4, 25]
    assert sorted(done) == [0, 1, 2, 3]

    def fail(k):
        if k == 2:
            raise ValueError(f"item {k} is bad")
        return k
    with pytest.raises(ValueError, match="item 2 is bad"):
        parallel.fork_map(fail, 4, 2)
    assert parallel._WORK is None  # the next call may run
    assert parallel.fork_map(lambda k: k, 2, 2) == [0, 1]
    assert parallel.fork_map(lambda k: k, 0, 2) == []


@pytest.mark.parametrize("solver", ["cd", "mu"])
def test_sklearn_update_is_the_public_call(solver):
    rng = np.random.default_rng(3)
    V = rng.random((60, 30))
    W0, H0 = rng.random((60, 4)), rng.random((4, 30))
    fast, public = sklearn_update(solver), sklearn_update(solver, public=True)
    assert fast.__name__ == "update"  # scikit-learn's private update was found (not the public fallback)
    a, b = (W0.copy(), H0.copy()), (W0.copy(), H0.copy())
    for _ in range(5):
        a, b = fast(V, *a), public(V, *b)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    assert 0.5 * np.sum((V - a[0] @ a[1]) ** 2) < 0.5 * np.sum((V - W0 @ H0) ** 2)


@needs_fork
def test_bench_times_every_evaluation_path_and_checks_their_results(capsys):
    from lrenv.agents.bench import EVALUATE_PATHS, measure_evaluate_paths, print_evaluate_paths
    r = measure_evaluate_paths(seeds=2, problem="tutorial", methods="fixed-scale,armijo,adam")
    assert set(EVALUATE_PATHS) <= set(r) and r["runs"] == 2 * 9
    for path in ("batched", "batched_workers"):
        assert r[path]["same_outcomes"] and r[path]["final_losses_close"]
        assert r[path]["speedup_wall"] > 0 and r[path]["cpu_s"] > 0
    print_evaluate_paths(r)
    assert "batched with" in capsys.readouterr().out

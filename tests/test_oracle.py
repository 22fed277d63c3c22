"""lrenv.oracle: the look-ahead and hindsight oracles run the evaluation's instances exactly."""

import math

import numpy as np
import pytest

from lrenv.evaluate import evaluate
from lrenv.oracle import candidates, greedy_oracle, hindsight_schedule

TINY = {"m": 40, "n": 12, "rank": 2, "target_factor": 1.1}


def test_one_value_grid_is_the_fixed_c_schedule_of_the_evaluation(tmp_path):
    # c below the edge of stability: the trajectories are not chaotic, so batched rounding stays at rounding level
    result = evaluate(["fixed-c=0.5"], problem="small", problem_params=TINY, seeds=3, budget=60, out_dir=str(tmp_path),
                      progress=False, verbose=False, tensorboard=False, threads=1)
    traces = result.traces["fixed c=0.5"]
    runs = greedy_oracle("small", problem_params=TINY, seeds=3, budget=60, grid=(0.5,))
    assert [r.instance for r in runs] == [t.instance for t in traces]
    for run, trace in zip(runs, traces):
        assert trace.reached_target and run.epochs_to_target == len(trace.loss) - 1
        assert np.allclose(run.loss, trace.loss, rtol=1e-5)
        assert set(run.chosen) == {(0.5, 0.5)}


def test_greedy_picks_the_lowest_next_loss_and_hindsight_never_loses_to_its_start():
    greedy = greedy_oracle("small", problem_params=TINY, seeds=2, budget=60, grid=(0.5, 1.0, 1.5))
    fixed = {c: greedy_oracle("small", problem_params=TINY, seeds=2, budget=60, grid=(c,)) for c in (0.5, 1.0, 1.5)}
    # the first epoch starts from the same point for all: greedy's first loss is the lowest of the three
    for i, run in enumerate(greedy):
        assert run.loss[1] == pytest.approx(min(fixed[c][i].loss[1] for c in fixed), rel=1e-6)
    found = hindsight_schedule("small", problem_params=TINY, seeds=2, budget=60, population=6, iterations=2,
                               segments=3, start_c=1.0)
    for f, run in zip(found, fixed[1.0]):
        fixed_epochs = 120 if math.isnan(run.epochs_to_target) else run.epochs_to_target
        assert f["fixed_epochs"] == fixed_epochs and f["epochs"] <= fixed_epochs
        assert len(f["schedule"]) == 3 and all(0.2 <= c[0] <= 1.95 for c in f["schedule"])


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="grid of c must be non-empty and positive"):
        candidates((0.0, 1.0), per_factor=False)
    assert candidates((0.5, 1.0), per_factor=True).tolist() == [[0.5, 0.5], [0.5, 1.0], [1.0, 0.5], [1.0, 1.0]]
    with pytest.raises(ValueError, match="targets its 'fit'"):
        greedy_oracle("tutorial", seeds=1)

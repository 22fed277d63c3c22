"""The course exercise: a 4 x 5 ratings matrix with two unknown entries, completed with ``lrenv.SGDNMF``.

The student's SGD (with a sign bug in the regulariser and a cost that counted the unknown entries) never reached
its target. As NMF with the two unknowns as NaN (no biases: plain non-negative factors), rank 2, the observed
entries are fitted and the unknowns predicted; both are 1 in the source. Armijo (the estimator's default) next to
the student's fixed rate 0.1 (and 0.03, which converges); epochs to an observed RMSE of 1e-2. Run: ``python examples/course_sgdnmf.py``.
"""

from __future__ import annotations

import json

import numpy as np

from lrenv import SGDNMF
from lrenv.problems import TUTORIAL_MATRIX, TUTORIAL_UNKNOWN

TARGET_RMSE = 1e-2
"""The source's target: the error on the observed entries."""


def fit(schedule: str, max_iter: int = 2000) -> dict:
    X = TUTORIAL_MATRIX.copy()
    for i, j in TUTORIAL_UNKNOWN:
        X[i, j] = np.nan
    model = SGDNMF(n_components=2, schedule=schedule, max_iter=max_iter, tol=1e-9, num_blocks=2, random_state=0)
    W = model.fit_transform(X)
    P = W @ model.components_
    observed = ~np.isnan(X)
    rmse_curve = np.sqrt(2 * model.loss_curve_ / observed.sum())  # the loss is 1/2 the sum of squared errors
    hit = np.flatnonzero(rmse_curve <= TARGET_RMSE)
    return {"schedule": schedule, "epochs": model.n_iter_, "stopped": model.stopped_,
            "epochs_to_target": int(hit[0]) if len(hit) else None,
            "observed_rmse": float(np.sqrt(np.mean((P - TUTORIAL_MATRIX)[observed] ** 2))),
            "unknown_predictions": [float(P[i, j]) for i, j in TUTORIAL_UNKNOWN],
            "unknown_truth": [float(TUTORIAL_MATRIX[i, j]) for i, j in TUTORIAL_UNKNOWN]}


def main(schedules=("armijo", "fixed-lr=0.1", "fixed-lr=0.03"), max_iter: int = 2000) -> dict:
    report = {s: fit(s, max_iter) for s in schedules}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

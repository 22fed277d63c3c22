"""The course exercise: a 4 x 5 ratings matrix with two unknown entries, completed with ``lrenv.SGDNMF``.

The student's SGD (with a sign bug in the regulariser and a cost that counted the unknown entries) never reached
its target. As NMF with the two unknowns as NaN (no biases: plain non-negative factors), rank 2, the observed
entries are fitted and the unknowns predicted; both are 1 in the source. Run: ``python examples/course_sgdnmf.py``.
"""

from __future__ import annotations

import json

import numpy as np

from lrenv import SGDNMF
from lrenv.problems import TUTORIAL_MATRIX, TUTORIAL_UNKNOWN


def main(schedule: str = "armijo", max_iter: int = 2000) -> dict:
    X = TUTORIAL_MATRIX.copy()
    for i, j in TUTORIAL_UNKNOWN:
        X[i, j] = np.nan
    model = SGDNMF(n_components=2, schedule=schedule, max_iter=max_iter, tol=1e-9, num_blocks=2, random_state=0)
    W = model.fit_transform(X)
    P = W @ model.components_
    observed = ~np.isnan(X)
    report = {"schedule": schedule, "epochs": model.n_iter_, "stopped": model.stopped_,
              "observed_rmse": float(np.sqrt(np.mean((P - TUTORIAL_MATRIX)[observed] ** 2))),
              "unknown_predictions": [float(P[i, j]) for i, j in TUTORIAL_UNKNOWN],
              "unknown_truth": [float(TUTORIAL_MATRIX[i, j]) for i, j in TUTORIAL_UNKNOWN]}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

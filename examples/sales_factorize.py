"""The sales matrix with the unobserved half as NaN, factorised through ``lrenv factorize --holdout``.

The forum's user had a 1000 x 100 products-by-stores matrix with half the entries unobserved; Adam stalled
10^4 x above the achievable held-out error. Here the same data (lrenv's ``sales`` generator, held-out
instance) is written to a .npy file with NaN where nothing was observed, and factorised exactly as a user
would: ``lrenv factorize sales.npy --rank 8 --schedule auto --holdout 0.1 --out result``.
The held-out set is 10 % of the *observed* entries (the user cannot score on what was never observed); the
generating factors' error on that same set is the reference. Run: ``python examples/sales_factorize.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

from lrenv.cli import main as lrenv
from lrenv.problems import EVAL_SEEDS, sales_family


def sales_with_nan(instance: int = EVAL_SEEDS[0]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(matrix with NaN for the unobserved half, the full matrix, the instance's reference values)."""
    fam = sales_family()
    p = fam.instance(instance)
    full = p.V  # the true values everywhere; the mask marks the observed half
    return np.where(p.mask, full, np.nan), full, p.info


def truth_factors(instance: int = EVAL_SEEDS[0], rank: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The generating factors' top ``rank`` components (as sales_family draws them)."""
    rng = np.random.default_rng([instance, 0x5A1E5])
    w = 10.0 ** np.linspace(0, -2, 12)
    Ap = np.exp(rng.standard_normal((1000, 12))) * w
    As = np.exp(rng.standard_normal((100, 12))) * w
    return Ap[:, :rank], As[:, :rank].T


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--schedule", default="auto")
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="lrenv-sales-")
    V, full, info = sales_with_nan()
    data = os.path.join(out_dir, "sales.npy")
    np.save(data, V)
    out = os.path.join(out_dir, "sales_result")
    rc = lrenv(["factorize", data, "--rank", "8", "--schedule", args.schedule, "--holdout", "0.1",
                "--epochs", str(args.epochs), "--no-progress", "--out", out])
    with open(out + ".json") as f:
        doc = json.load(f)
    z = np.load(out + ".npz")
    W, H, held = z["W"], z["H"], z["heldout_mask"]
    Wt, Ht = truth_factors()
    unobserved = np.isnan(V)
    report = {
        "exit_code": rc, "method": doc["config"]["method"], "why": doc["config"]["auto_reason"],
        "epochs": doc["result"]["epochs"], "stopped": doc["result"]["stopped"],
        "heldout_mse": doc["result"]["heldout_mse"],
        "truth_heldout_mse_same_entries": float(np.mean((Wt @ Ht - full)[held] ** 2)),
        "unobserved_half_mse": float(np.mean((W @ H - full)[unobserved] ** 2)),
        "truth_unobserved_half_mse": float(info["truth_heldout_mse"]),
    }
    report["ratio_to_truth"] = report["heldout_mse"] / report["truth_heldout_mse_same_entries"]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

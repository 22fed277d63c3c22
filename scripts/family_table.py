"""The README's per-family results table from runs/final/<family>/results.csv (lrenv evaluate --out runs/final/<family>).

Usage: python scripts/family_table.py small medium sales tutorial illcond digits
"""
import json
import sys

import numpy as np

from lrenv.evaluate import read_results_csv
REFS = {"sklearn-cd", "hals", "als-masked", "als-grow", "lm", "sklearn-mu"}
def score(rows, budget):
    return float(np.mean([r["epochs_to_target"] if r["reached_target"] else 2 * budget for r in rows]))
out = []
for fam in sys.argv[1:]:
    try:
        rows = read_results_csv(f"runs/final/{fam}/results.csv")
    except FileNotFoundError:
        continue
    cfg = json.load(open(f"runs/final/{fam}/config.json"))
    budget = cfg["budget"]
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    def desc(m):
        rs = by[m]; succ = np.mean([r["reached_target"] for r in rs])
        ett = [r["epochs_to_target"] for r in rs if r["reached_target"]]
        held = np.median([r["heldout_ratio"] for r in rs]) if fam == "sales" else None
        base = f"{m}: {succ:.1f}" + (f", {np.mean(ett):.1f} ep" if ett else f", final {np.median([r['final_loss'] for r in rs]):.3g} (target {np.median([r['target_loss'] for r in rs]):.3g})")
        return base + (f", held-out ÷ truth {held:.3g}" if held is not None else "")
    refs = [m for m in by if m.split("#")[0] in REFS]
    sgd = [m for m in by if m not in refs and not m.startswith("policy:") and m != "adam"]
    best_ref = min(refs, key=lambda m: score(by[m], budget)) if refs else None
    tuned = [m for m in sgd if "(tuned)" in m]
    best_sgd = min(tuned, key=lambda m: (score(by[m], budget), np.median([r["final_loss"] for r in by[m]]))) if tuned else None
    scores = sorted(score(by[m], budget) for m in sgd)
    med = scores[len(scores) // 2]
    adam = desc("adam") if "adam" in by else "–"
    pol = "; ".join(desc(m) for m in by if m.startswith("policy:")) or "–"
    out.append(f"| `{fam}` | {desc(best_ref) if best_ref else '–'} | {desc(best_sgd) if best_sgd else '–'} | {adam} | {med:.0f} ({len(sgd)} schedules) | {pol} |")
print("| family | best reference (success, epochs) | best tuned SGD schedule | Adam (tuned lr) | median SGD schedule score (epochs, miss = 2 × budget) | learned |")
print("|---|---|---|---|---|---|")
print("\n".join(out))

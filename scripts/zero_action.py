"""What a policy starts from: the env stepped with a = 0 (the untrained policy's mean action) on a split's instances.

With ``factor_tilt: tuned`` (and ``center_plateau: tuned`` or ``action_center_final``) a = 0 is a tuned baseline or a
schedule derived from it; this prints its epochs to the target (a miss counts 2 x budget, the benchmark's rule), so a
variant's starting point can be compared with the baselines before any training.

Usage: python scripts/zero_action.py small --split test --seeds 10 optimizer=adam action_mode=per_factor \
           action_center=1 factor_tilt=tuned center_plateau=tuned
"""
import argparse

import numpy as np
import yaml

from lrenv import NMFEnv
from lrenv.agents.callbacks import rollout
from lrenv.problems import split_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("problem")
    ap.add_argument("env_kwargs", nargs="*", help="KEY=VALUE env options (values read as YAML)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--seeds", type=int, default=10, help="instances of the split (the first N)")
    args = ap.parse_intermixed_args()
    kw = {}
    for item in args.env_kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"env option {item!r}: write KEY=VALUE, e.g. optimizer=adam")
        kw[key] = yaml.safe_load(value)
    instances = [int(s) for s in split_seeds(args.split)[:args.seeds]]
    env = NMFEnv(args.problem, instances=instances, **kw)
    zero = np.zeros(env.action_space.shape, dtype=np.float32)
    runs = [rollout(env, i, {"instance": instance}, lambda obs: zero) for i, instance in enumerate(instances)]
    scores = [r["epochs"] if r["reached"] else 2 * env.task.budget for r in runs]
    reached = sum(s <= env.task.budget for s in scores)
    print(f"{args.problem} {args.split}: a = 0 needs {np.mean(scores):.1f} epochs on average (a miss counts "
          f"2 x {env.task.budget}), {reached}/{len(scores)} reached; per instance {scores}")


if __name__ == "__main__":
    main()

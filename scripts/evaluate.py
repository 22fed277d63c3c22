#!/usr/bin/env python
"""Evaluate learning-rate schedules and trained agents: ``python scripts/evaluate.py --help``.

A thin wrapper around ``lrenv evaluate`` (see :mod:`lrenv.evaluate`).
"""

import sys

from lrenv.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))

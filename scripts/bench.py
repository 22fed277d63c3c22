#!/usr/bin/env python
"""Throughput benchmark (same as ``lrenv bench``): see :mod:`lrenv.agents.bench`."""

import sys

from lrenv.agents.bench import main

if __name__ == "__main__":
    sys.exit(main())

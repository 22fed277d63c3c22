"""`python scripts/train.py ...` is `lrenv train ...` (see lrenv/agents/train.py)."""
import sys

from lrenv.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

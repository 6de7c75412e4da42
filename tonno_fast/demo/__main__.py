"""``python -m tonno_fast.demo [--quick] [--out DIR]``: run the weakly-supervised demo."""
import sys

from .run import main

if __name__ == "__main__":  # the demo's worker processes import this module again (spawn): run only once
    sys.exit(main())

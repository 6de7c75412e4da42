"""``python -m tonno_fast.demo [--quick] [--out DIR]``: run the weakly-supervised demo."""
import sys

from .run import main

sys.exit(main())

"""``python -m tonno_fast ...``: the ``tonno-fast`` command line (see :mod:`tonno_fast.cli`)."""
import sys

from .cli import main

sys.exit(main())

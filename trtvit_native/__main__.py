"""``python -m trtvit_native``: the ``trtvit`` command (e.g. ``torchrun -m trtvit_native train ...``)."""

import sys

from .cli import main

sys.exit(main())

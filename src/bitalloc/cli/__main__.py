"""``python -m bitalloc.cli ...``: the same as the ``bitalloc`` command."""
from __future__ import annotations

import sys

from . import main

sys.exit(main())

"""``python -m kpo_rs.cli``: the same as ``kpo``."""

import sys

from . import main

sys.exit(main())

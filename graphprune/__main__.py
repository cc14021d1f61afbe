"""``python -m graphprune``: the same as the ``graphprune`` console script."""

import sys

from graphprune.cli import main

sys.exit(main())

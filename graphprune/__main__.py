"""``python -m graphprune``: the same as the ``graphprune`` console script."""

import sys

from graphprune.app.cli import main

sys.exit(main())

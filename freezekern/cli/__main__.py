"""``python -m freezekern.cli``: the command line."""

import sys

from freezekern.cli import main

sys.exit(main())

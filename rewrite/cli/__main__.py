"""``python -m rewrite.cli``."""

import sys

from rewrite.cli import main

sys.exit(main())

"""``python -m bayespose.cli``."""

import sys

from bayespose.cli import main

sys.exit(main())

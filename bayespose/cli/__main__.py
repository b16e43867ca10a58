"""``python -m bayespose.cli``."""

from bayespose.cli import run

run()

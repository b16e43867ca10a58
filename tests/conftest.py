"""pytest configuration for bayespose.

* Registers the markers ``slow`` (long scientific checks, not run in CI; run with ``-m slow``), ``relion``
  (calls RELION 3.1 binaries; CI installs the Debian ``relion`` package), ``scipion`` (headless pyworkflow
  projects) and ``gui`` (Scipion's project window on an Xvfb display; skipped when Xvfb is not installed).
* Makes Scipion headless *before* pyworkflow is imported anywhere: ``SCIPION_DOMAIN=pwem``, ``SCIPION_PYTHON``,
  and ``SCIPION_HOME`` / ``SCIPION_USER_DATA`` in a throw-away folder with a basic ``hosts.conf``, so the tests
  never touch a user's Scipion installation.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

_SCIPION_SCRATCH = Path(tempfile.mkdtemp(prefix="bayespose-scipion-"))
os.environ.setdefault("SCIPION_DOMAIN", "pwem")
os.environ.setdefault("SCIPION_PYTHON", sys.executable)
os.environ["SCIPION_HOME"] = str(_SCIPION_SCRATCH)
os.environ["SCIPION_USER_DATA"] = str(_SCIPION_SCRATCH / "data")
os.environ["SCIPION_TESTS"] = str(_SCIPION_SCRATCH / "tests")
os.environ.setdefault("SCIPION_NOTIFY", "False")
os.environ.setdefault("OMP_NUM_THREADS", "2")
(_SCIPION_SCRATCH / "config").mkdir(parents=True, exist_ok=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long scientific check, excluded from CI (run with -m slow)")
    config.addinivalue_line("markers", "relion: calls RELION 3.1 binaries (Debian package 'relion')")
    config.addinivalue_line("markers", "scipion: runs a headless Scipion (pyworkflow) project")
    config.addinivalue_line("markers", "gui: opens Scipion's project window on an Xvfb display (skips without Xvfb)")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCIPION_SCRATCH, ignore_errors=True)  # the throw-away Scipion home and its test projects


@pytest.fixture(scope="session")
def demo_map_path() -> Path:
    """The real 64^3 map shipped inside the package (4.4 Å/px, from PDB 3J9G)."""
    from bayespose.data import demo_map_path as _path

    return _path()

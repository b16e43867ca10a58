"""GUI smoke test: Scipion's real project window on an X virtual framebuffer (Xvfb), as a user drives it.

``tests/gui/gui_session.py`` (its own process, on a fresh Xvfb display) launches small runs of every bayespose
protocol, opens the project window, every bayespose form, and every viewer as "Analyze results" does, pressing every
eye button. Checked here: pyplot's backend is still the window's TkAgg after bayespose's viewers are imported (the
old ``matplotlib.use("Agg")`` turned every later plot into a silent PNG), every plot opens a figure window on screen,
the cryoSPARC import without poses shows its message as a dialog (the old parent-less MessageView raised
``TclError: image "pyimage.." doesn't exist``), the maps of a refinement open without xmipp or ChimeraX, and no
exception reaches Tk or the log. Skipped only when Xvfb is not installed (setup.sh --relion installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.gui, pytest.mark.scipion]


@pytest.fixture(scope="module")
def display():
    """A fresh Xvfb display for this module (``:<free number>``)."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (Debian: apt-get install xvfb; bash setup.sh --relion does it)")
    for number in range(90, 130):
        if not Path(f"/tmp/.X{number}-lock").exists() and not Path(f"/tmp/.X11-unix/X{number}").exists():
            break
    server = subprocess.Popen(["Xvfb", f":{number}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{number}").exists():
            break
        time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("Xvfb did not start")
    yield f":{number}"
    server.terminate()
    server.wait(timeout=10)


def run_session(display: str, workdir: Path, timeout: int = 540) -> tuple[dict, str]:
    env = dict(os.environ, DISPLAY=display, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-m", "tests.gui.gui_session", str(workdir)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    log = out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, log[-6000:]
    return json.loads(lines[-1][len("RESULT "):]), log


def test_project_window_forms_and_viewers(display, tmp_path):
    from bayespose import protocols

    result, log = run_session(display, tmp_path)
    print(f"\nruns {result['runs_s']} s ({result.get('run_s')}), GUI {result['gui_s']} s")

    assert result["backend_after_import"] == "TkAgg"
    assert sorted(result["forms"]) == sorted(n for n in dir(protocols) if n.startswith("Prot"))
    assert not result["tk_errors"], "\n".join(result["tk_errors"])
    for bad in ("Traceback", "TclError", "Exception in Tkinter callback"):
        assert bad not in log, log[log.find(bad) - 2000:log.find(bad) + 2000]

    views = result["views"]
    expected_figures = {"simulate", "train", "assign:displayPoses", "assign:displayUncertainty",
                        "assign:displayDifference", "assign:displayPosterior", "refine:displayFsc",
                        "refine:displayHistory", "refine:displayPrior", "refine:displaySlices",
                        "refine:displayVolumes", "predict:displayPoses", "predict:displayErrors",
                        "predict:displayDistribution", "predict with reference:displayPoses",
                        "predict with reference:displayErrors", "predict with reference:displayDistribution"}
    for name in expected_figures:
        assert views[name]["figures"] == 1 and all(views[name]["mapped"]), (name, views.get(name))
    # the cryoSPARC import without poses: a dialog, no figure
    assert views["cryosparc without poses"]["figures"] == 0
    assert views["cryosparc without poses"]["dialogs"] == ["No poses to show"]

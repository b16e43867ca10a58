"""One Scipion GUI session on an X display, driven the way a user clicks (run by tests/gui/test_gui_smoke.py in its own
process: ``python -m tests.gui.gui_session WORKDIR``; the display, SCIPION_HOME and SCIPION_USER_DATA come from the
environment).

1. Small finished runs, launched as Scipion launches them (pwem's volume import, bayespose's simulate, cryoSPARC
   import of a file without poses, assign, refine, train, predict without and with a reference; 30 particles of
   32 px).
2. The real project window (``pyworkflow.gui.project.ProjectWindow``: it sets pyplot's backend to TkAgg), then
   bayespose's viewers are imported, which must leave that backend alone.
3. Every bayespose protocol's form, opened with the project window's own ``_openProtocolForm``.
4. Every viewer opened as "Analyze results" opens it; every eye button of a viewer form pressed (the handler the
   button calls); messages (pyworkflow dialogs) are closed by a watcher.

It prints one ``RESULT {json}`` line: the backend after the imports, the forms opened, per view the number of
matplotlib figure windows (Toplevels holding a FigureCanvasTkAgg with its toolbar) and dialogs that appeared, and
every exception Tk reported from a callback. With ``--screenshots`` it keeps a form and a figure open for
``import -window root``: it prints ``SHOT <name>`` and waits for a line on stdin before going on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

BOX, PIXEL_SIZE, N = 32, 8.8, 30
RESULTS: dict = {"forms": [], "views": {}, "tk_errors": [], "dialogs": []}


def _fourier_crop(volume: np.ndarray, box: int) -> np.ndarray:
    d = volume.shape[0]
    f = np.fft.fftshift(np.fft.fftn(volume))
    lo = d // 2 - box // 2
    f = f[lo:lo + box, lo:lo + box, lo:lo + box]
    return (np.fft.ifftn(np.fft.ifftshift(f)).real * (box / d) ** 3).astype(np.float32)


def finished_runs(project, workdir: Path) -> dict:
    """Launch the small runs (wait for each); returns name -> protocol."""
    from pwem.protocols import ProtImportVolumes

    from bayespose.core.io.mrc import read_map, write_map
    from bayespose.data import fragment_map_path
    from bayespose.protocols import (
        ProtBayesposeAssignPoses,
        ProtBayesposeImportCryosparc,
        ProtBayesposePredictPoses,
        ProtBayesposeRefine,
        ProtBayesposeSimulate,
        ProtBayesposeTrainPoseNetwork,
    )
    from tests.helpers import CRYODRGN

    map_path = workdir / "fragment32.mrc"
    write_map(map_path, _fourier_crop(read_map(fragment_map_path())[0], BOX), PIXEL_SIZE)
    runs = {}

    def launch(name, cls, **kwargs):
        prot = project.newProtocol(cls, objLabel=name, **kwargs)
        start = time.time()
        project.launchProtocol(prot, wait=True)
        RESULTS.setdefault("run_s", {})[name] = round(time.time() - start, 1)
        if not prot.isFinished():
            raise RuntimeError(f"{name} did not finish: {prot.getErrorMessage()}")
        runs[name] = prot
        return prot

    volume = launch("volume", ProtImportVolumes, filesPath=str(map_path), samplingRate=PIXEL_SIZE).outputVolume
    sim = launch("simulate", ProtBayesposeSimulate, inputVolume=volume, nParticles=N, snr=1.0, seed=1)
    launch("cryosparc without poses", ProtBayesposeImportCryosparc, csFile=str(CRYODRGN / "empiar_10076_7.cs"))
    common = dict(inputParticles=sim.outputParticles, numberOfThreads=2, useGpu=False)
    launch("assign", ProtBayesposeAssignPoses, inputVolume=volume, healpixOrder=1, refineLevels=1, shiftRange=0.0,
           **common)
    launch("refine", ProtBayesposeRefine, inputVolume=volume, numberOfIterations=1, healpixOrder=0,
           maxHealpixOrder=1, shiftRange=0.0, priorMode=1, **common)
    train = launch("train", ProtBayesposeTrainPoseNetwork, epochs=1, netBox=16, batchSize=16, gridOrder=1, **common)
    launch("predict", ProtBayesposePredictPoses, inputModel=train.outputModel, topK=4, **common)
    launch("predict with reference", ProtBayesposePredictPoses, inputModel=train.outputModel, topK=4, doRefine=True,
           inputVolume=volume, shiftRange=0.0, **common)
    return runs


# --------------------------------------------------------------------------------------------------- Tk helpers
def all_widgets(root):
    stack = [root]
    while stack:
        widget = stack.pop()
        yield widget
        stack.extend(widget.winfo_children())


def figure_windows(root) -> list:
    """Toplevels that show a matplotlib figure (a NavigationToolbar2Tk next to its FigureCanvasTkAgg)."""
    import tkinter as tk

    from matplotlib.backends.backend_tkagg import NavigationToolbar2Tk

    found = []
    for widget in all_widgets(root):
        if isinstance(widget, tk.Toplevel) and any(isinstance(child, NavigationToolbar2Tk)
                                                   for child in widget.winfo_children()):
            found.append(widget)
    return found


def close_dialogs_periodically(root) -> None:
    """A watcher (every 200 ms): destroys pyworkflow dialogs once they are on screen (they wait in a nested event
    loop), noting their titles."""
    import pyworkflow.gui.dialog as dialog

    def check():
        for widget in list(all_widgets(root)):
            if isinstance(widget, dialog.Dialog) and widget.winfo_exists() and widget.winfo_ismapped():
                RESULTS["dialogs"].append(widget.title())
                widget.destroy()
        root.after(200, check)

    root.after(200, check)


def pump(root, seconds: float = 0.3) -> None:
    end = time.time() + seconds
    while time.time() < end:
        root.update()
        time.sleep(0.02)


def nested(root, action, then) -> None:
    """Run ``action`` that enters a nested Tk main loop (a pyworkflow Window.show()); ``then()`` runs inside it
    after 400 ms and must end it with ``root.quit()``."""
    def wrapped():
        try:
            then()
        except Exception:  # noqa: BLE001 - recorded and reported as a failure
            RESULTS["tk_errors"].append(traceback.format_exc())
        finally:
            root.quit()

    root.after(400, wrapped)
    action()


def shot(name: str, screenshots: bool, root) -> None:
    if screenshots:
        pump(root, 1.0)
        print(f"SHOT {name}", flush=True)
        sys.stdin.readline()


# --------------------------------------------------------------------------------------------------- the session
def open_forms(window, root, screenshots: bool) -> None:
    from bayespose import protocols

    view = window.getViewWidget()
    for name in sorted(n for n in dir(protocols) if n.startswith("Prot")):
        cls = getattr(protocols, name)
        prot = window.project.newProtocol(cls)

        def inspect_form(name=name):
            forms = [w for w in all_widgets(root) if hasattr(w, "title") and callable(w.title)
                     and name in str(w.title())]
            if not forms:
                raise AssertionError(f"no form window for {name}")
            RESULTS["forms"].append(name)
            if name in ("ProtBayesposeSimulate", "ProtBayesposeTrainPoseNetwork"):
                shot(f"form_{name}", screenshots, root)
            for form in forms:
                form.destroy()

        nested(root, lambda prot=prot: view._openProtocolForm(prot), inspect_form)


def view_results(window, root, runs: dict, screenshots: bool) -> None:
    from pwem import Domain
    from pyworkflow.viewer import DESKTOP_TKINTER, ProtocolViewer

    for name, prot in runs.items():
        if name == "volume":
            continue
        viewer_cls = Domain.findViewers(prot, DESKTOP_TKINTER)[0]
        viewer = viewer_cls(project=window.project, protocol=prot, parent=window)
        before_dialogs = len(RESULTS["dialogs"])
        if isinstance(viewer, ProtocolViewer):
            def press_eyes(viewer=viewer, name=name):
                for param in viewer._getVisualizeDict():
                    known = set(figure_windows(root))
                    viewer._visualizeParam(param)  # what the eye button next to the parameter calls
                    pump(root)
                    new = [w for w in figure_windows(root) if w not in known]
                    RESULTS["views"][f"{name}:{param}"] = {"figures": len(new), "mapped": [w.winfo_ismapped()
                                                                                            for w in new]}
                    if name == "refine" and param == "displayPrior":
                        shot("plot", screenshots, root)
                    if name == "predict with reference" and param == "displayErrors":
                        shot("predict_refined_errors", screenshots, root)
                    for w in new:
                        w.destroy()
                viewer.formWindow.root.destroy()

            nested(root, lambda viewer=viewer, prot=prot: viewer.visualize(prot, windows=window), press_eyes)
        else:
            known = set(figure_windows(root))
            viewer.visualize(prot)
            pump(root)
            new = [w for w in figure_windows(root) if w not in known]
            RESULTS["views"][name] = {"figures": len(new), "mapped": [w.winfo_ismapped() for w in new],
                                      "dialogs": RESULTS["dialogs"][before_dialogs:]}
            for w in new:
                w.destroy()


def main() -> int:
    workdir = Path(sys.argv[1])
    screenshots = "--screenshots" in sys.argv
    import matplotlib
    import pyworkflow.protocol as pwprot
    from pyworkflow.project import Manager

    hosts = workdir / "hosts.conf"
    pwprot.HostConfig.writeBasic(str(hosts))
    project = Manager().createProject("BayesposeGuiSmoke", hostsConf=str(hosts))
    os.chdir(project.path)  # pyworkflow's project paths are relative to the project folder
    start = time.time()
    runs = finished_runs(project, workdir)
    RESULTS["runs_s"] = round(time.time() - start, 1)

    from pyworkflow.gui.project import ProjectWindow

    window = ProjectWindow(project.getName())
    root = window.root
    import tkinter as tk

    def report(exc, value, tb):
        RESULTS["tk_errors"].append("".join(traceback.format_exception(exc, value, tb)))

    tk._default_root.report_callback_exception = report
    root.report_callback_exception = report
    root.deiconify()
    pump(root, 1.0)
    import bayespose.viewers  # noqa: F401 - Scipion loads the plugins' viewers after the window
    RESULTS["backend_after_import"] = matplotlib.get_backend()
    close_dialogs_periodically(root)
    open_forms(window, root, screenshots)
    view_results(window, root, runs, screenshots)
    RESULTS["gui_s"] = round(time.time() - start - RESULTS["runs_s"], 1)
    print("RESULT " + json.dumps(RESULTS), flush=True)
    os._exit(0)  # the project window's TCP server thread would keep the process alive


if __name__ == "__main__":
    main()

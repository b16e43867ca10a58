"""bayespose never chooses matplotlib's backend: importing any of its modules (core, plotting, CLI, demo, Scipion
protocols and viewers) leaves the backend a GUI has set (Scipion's project window sets TkAgg; a plugin that switches
it to Agg turns every later plot of the session into a silent PNG). And the core never imports matplotlib itself.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import bayespose

PACKAGE = Path(bayespose.__file__).parent
REPO = PACKAGE.parent


def _all_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_importing_bayespose_keeps_the_backend():
    """In a fresh interpreter: set a backend first (as Scipion does), import every bayespose module, the backend
    is still the one set. Fails with any ``matplotlib.use(...)`` / ``pyplot.switch_backend`` at import."""
    code = ("import matplotlib, sys\n"
            "matplotlib.use('svg')\n"
            "import importlib\n"
            f"for name in {_all_modules()!r}:\n"
            "    importlib.import_module(name)\n"
            "print(matplotlib.get_backend())\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "svg", out.stdout


def test_no_backend_selection_anywhere_in_bayespose():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("use", "switch_backend") and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("matplotlib", "plt", "mpl"):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders


def test_core_never_imports_matplotlib():
    """The science (``bayespose.core``) draws nothing: figures belong to :mod:`bayespose.plotting` and the front ends
    (a third-party import such as healpy's own optional matplotlib import is outside this check)."""
    offenders = []
    for path in (PACKAGE / "core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            offenders += [f"{path.name}: {m}" for m in modules
                          if m.split(".")[0] == "matplotlib" or m.startswith("bayespose.plotting")]
    assert not offenders, offenders

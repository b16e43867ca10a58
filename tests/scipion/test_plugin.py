"""The Scipion plugin is discoverable and consistent: entry point, protocols, viewers, menu, citations; and the
core never imports pyworkflow/pwem."""

import ast
import configparser
import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import bayespose

PACKAGE = Path(bayespose.__file__).parent


def test_entry_point_registers_the_plugin():
    names = {ep.name: ep.value for ep in entry_points(group="pyworkflow.plugin")}
    assert names.get("bayespose") == "bayespose"
    assert "bayespose" in {ep.name for ep in entry_points(group="console_scripts")}


@pytest.mark.scipion
def test_domain_finds_protocols_viewers_and_citations():
    from pwem import Domain

    from bayespose import protocols
    from bayespose.viewers.viewer_poses import BayesposePoseViewer

    assert "bayespose" in Domain.getPlugins()
    ours = {name for name, cls in Domain.getProtocols().items() if cls.__module__.startswith("bayespose.")}
    exported = {name for name in dir(protocols) if name.startswith("Prot")}
    assert ours == exported and ours
    viewers = Domain.findViewers(protocols.ProtBayesposeSimulate.__name__, "tkinter")
    assert BayesposePoseViewer in viewers
    bib = bayespose._bibtex if hasattr(bayespose, "_bibtex") else None
    keys = set(bib.keys()) if bib else set()
    for cls in (getattr(protocols, name) for name in exported):
        for key in getattr(cls, "_references", []):
            assert key in keys, f"{cls.__name__} cites unknown {key}"


def test_protocols_conf_lists_exactly_our_protocols():
    from bayespose import protocols

    parser = configparser.ConfigParser()
    parser.optionxform = str
    parser.read(PACKAGE / "protocols.conf")
    listed = set()

    def walk(node):
        if node.get("tag") == "protocol":
            listed.add(node["value"])
        for child in node.get("children", []):
            walk(child)

    for menu in parser.options("PROTOCOLS"):
        for node in json.loads(parser.get("PROTOCOLS", menu)):
            walk(node)
    assert listed == {name for name in dir(protocols) if name.startswith("Prot")}


def test_core_never_imports_scipion():
    offenders = []
    for path in (PACKAGE / "core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            offenders += [f"{path.name}: {m}" for m in modules if m.split(".")[0] in ("pyworkflow", "pwem")]
    assert not offenders, offenders

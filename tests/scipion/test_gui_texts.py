"""What the Scipion GUI shows, checked without a display: GPU defaults that ask nothing on a CPU machine, messages
that belong to the viewer's window, citations users can look up (authors, title, DOI or URL; no internal paper
numbers), choices in words, the simulator's preferred-orientation parameters in the form, and methods text that
says what was done."""

from __future__ import annotations

import inspect
import re
import types
from unittest import mock

import pytest

import bayespose
from bayespose import protocols

pytestmark = pytest.mark.scipion

PROTOCOLS = [getattr(protocols, name) for name in dir(protocols) if name.startswith("Prot")]
GPU_PROTOCOLS = [cls for cls in PROTOCOLS if "useGpu" in inspect.getsource(cls) or
                 "add_gpu_params" in inspect.getsource(cls)]
INTERNAL_REFERENCES = re.compile(r"paper 00|DESIGN\.md| 000 |App\. F|\b00[0-3] (eq|App|sec|Fig|Prop)")


def _help_texts(prot) -> list[str]:
    texts = [type(prot).getHelpText() or ""]
    for _, param in prot.getDefinition().iterAllParams():
        texts.append(param.help.get() or "")
        texts.append(str(param.label.get() or ""))
    return texts


def test_gpu_defaults_to_what_torch_sees_and_asks_nothing_without_one():
    import torch

    assert len(GPU_PROTOCOLS) == 4, GPU_PROTOCOLS
    for cls in GPU_PROTOCOLS:
        prot = cls()
        assert bool(prot.useGpu.get()) == torch.cuda.is_available(), cls.__name__
        if not torch.cuda.is_available():
            assert not [w for w in prot.warnings() if "GPU" in w], cls.__name__  # no question before the run
            prot.useGpu.set(True)  # asked for explicitly on a machine without one: still said
            assert any("GPU" in w for w in prot.warnings()), cls.__name__


def test_viewer_messages_belong_to_the_viewer_window():
    """A MessageView without a Tk parent makes pyworkflow open a second tk.Tk(), whose icons fail with
    'TclError: image "pyimage.." doesn't exist': every message of a bayespose viewer has the viewer's window."""
    from pyworkflow.viewer import MessageView

    from bayespose.viewers.viewer_poses import BayesposePoseViewer
    from bayespose.viewers.viewer_refine import BayesposeRefineViewer

    window = types.SimpleNamespace(root="the viewer's Tk window")
    viewer = BayesposePoseViewer(project=object(), parent=window)
    views = viewer._visualize(protocols.ProtBayesposeImportCryosparc())  # a run without aligned output particles
    assert len(views) == 1 and isinstance(views[0], MessageView)
    assert views[0]._tkParent == "the viewer's Tk window"
    assert "no 3D alignment" in views[0].getMessage()

    refine_viewer = BayesposeRefineViewer.__new__(BayesposeRefineViewer)  # a ProtocolViewer once its form is open
    refine_viewer._tkRoot = "the viewer form's window"
    (view,) = refine_viewer._message("text", title="t")
    assert view._tkParent == "the viewer form's window"


def _bibtex() -> dict:
    import pyworkflow.utils as pwutils

    from bayespose import bibtex

    return pwutils.parseBibTex(bibtex.__doc__)


def test_citations_are_complete_and_cited_keys_are_links():
    from pyworkflow.protocol import Protocol

    entries = _bibtex()
    for key, entry in entries.items():
        for field in ("author", "title", "year"):
            assert entry.get(field, "").strip(), f"{key} has no {field}"
        assert (entry.get("journal") or entry.get("booktitle") or "").strip(), f"{key}: no journal or booktitle"
        text = Protocol._getCiteText(None, entry)
        assert ", ," not in text and not text.endswith(", "), f"{key} renders with an empty field: {text!r}"
    assert {"Xu", "Balanov", "Singer", "Bendory"} <= {a.split(",")[0].strip() for a in
                                                     entries["Xu2026"]["author"].split(" and ")}
    assert "2412.03723" in entries["Xu2026"].get("eprint", "") + entries["Xu2026"].get("note", "")
    # every key a methods text cites in brackets becomes a link (doi or url), not a bare key
    cited = set()
    for cls in PROTOCOLS:
        cited |= set(re.findall(r"\[([A-Za-z]+\d{4}[a-z]?)\]", inspect.getsource(inspect.getmodule(cls))))
    assert cited and cited <= set(entries), cited - set(entries)
    for key in cited:
        assert Protocol._getCiteText(None, entries[key], useKeyLabel=True).startswith("[["), key
    for cls in PROTOCOLS:
        assert set(cls._references) <= set(entries), cls.__name__


def test_help_texts_cite_papers_users_can_look_up():
    from bayespose.viewers.viewer_refine import BayesposeRefineViewer  # noqa: F401 - forms of viewers too

    for cls in PROTOCOLS:
        for text in _help_texts(cls()):
            assert not INTERNAL_REFERENCES.search(text), f"{cls.__name__}: {text[:120]!r}"
    readme = (bayespose.__path__[0] + "/../README.md")
    assert not INTERNAL_REFERENCES.search(open(readme).read())


def test_train_choices_are_words_mapped_to_codes():
    from bayespose.protocols.protocol_train_network import (
        CTF_CHOICES,
        CTF_PHASE_FLIP,
        MODEL_CHOICES,
        MODEL_QUATERNION,
        MODEL_SO3GRID,
    )

    for choice in MODEL_CHOICES + CTF_CHOICES:
        assert "_" not in choice and choice not in ("so3grid", "quaternion"), choice
    prot = protocols.ProtBayesposeTrainPoseNetwork()
    prot.modelType.set(MODEL_QUATERNION)
    prot.ctfCorrection.set(CTF_PHASE_FLIP)
    config = prot.trainConfig(has_ctf=True)
    assert (config.model, config.ctf_correction) == ("quaternion", "phase_flip")
    prot.modelType.set(MODEL_SO3GRID)
    assert prot.trainConfig(has_ctf=False).model == "so3grid" and prot.trainConfig(has_ctf=False).ctf_correction \
        == "none"


def test_simulate_form_exposes_the_preferred_orientation():
    from bayespose.protocols.protocol_simulate import POSE_PREFERRED

    prot = protocols.ProtBayesposeSimulate()
    names = [name for name, _ in prot.getDefinition().iterAllParams()]
    for name in ("preferredRot", "preferredTilt", "preferredKappa", "preferredFraction"):
        assert name in names
    prot.poseDistribution.set(POSE_PREFERRED)
    prot.preferredRot.set(30.0)
    prot.preferredTilt.set(60.0)
    prot.preferredKappa.set(15.0)
    prot.preferredFraction.set(0.4)
    spec = prot._spec()
    assert spec.pose_distribution == "preferred"
    assert (spec.preferred_rot_deg, spec.preferred_tilt_deg, spec.preferred_kappa, spec.preferred_fraction) == \
        (30.0, 60.0, 15.0, 0.4)
    assert "kappa 15" in prot._poseText() and "40 %" in prot._poseText()
    prot.preferredFraction.set(1.5)
    assert any("fraction" in e for e in prot._validate())


def test_assign_methods_say_whether_the_ctf_was_used():
    cls = protocols.ProtBayesposeAssignPoses
    for ignore, expected in ((False, "with per-particle CTF"), (True, "without CTF")):
        prot = cls()
        prot.ignoreCtf.set(ignore)
        output = types.SimpleNamespace(getSize=lambda: 12)
        with mock.patch.object(cls, "outputParticles", output, create=True), \
                mock.patch.object(cls, "getObjectTag", lambda self, name: name):
            text = prot._methods()[0]
        assert expected in text, text
        assert ("per-particle CTF" in text) != ignore, text


def test_numbers_in_summaries_have_no_float32_noise():
    import numpy as np

    from bayespose.protocols._common import number

    assert number(np.float32(2.7)) == "2.7"
    assert number(np.float32(300.0)) == "300"
    assert number(0.1) == "0.1" and number(None) == "?"

"""The shared vocabulary of deep pose prediction (bayespose.core.deep.vocabulary) and the lazily loaded package:
the CLI takes its choices from the engine's codes without loading torch."""

import os
import subprocess
import sys
from pathlib import Path

import bayespose
import bayespose.core.deep as deep
from bayespose.core.deep import vocabulary


def test_every_exported_name_resolves():
    assert sorted(deep.__all__) == sorted(deep._MODULE_OF)
    for name in deep.__all__:
        assert getattr(deep, name) is not None, name


def test_the_cli_uses_the_engine_codes_without_loading_torch():
    code = ("import sys; import bayespose.cli as c; p = c.build_parser(); "
            "print('torch' in sys.modules, 'e3nn' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(Path(bayespose.__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["False", "False"], out
    from bayespose.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    train = {a.dest: a for a in sub.choices["train"]._actions}
    assert tuple(train["model"].choices) == vocabulary.MODEL_TYPES == ("so3grid", "quaternion")
    assert tuple(train["ctf_correction"].choices) == vocabulary.CTF_CORRECTIONS == ("phase_flip", "none")

"""Atomic outputs (:mod:`bayespose.core.io.atomic`): a failed or interrupted write never loses the old output nor
the other files of an output folder, leaves no temporary behind, and a full disk reads as ``ENOSPC``."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from bayespose.core.io import atomic
from bayespose.core.io.atomic import atomic_file, atomic_folder, refuse_overwriting_inputs


def _listing(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def old_folder(tmp_path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    (target / "particles.star").write_text("old star")
    (target / "notes.txt").write_text("the user's notes")
    (target / "iterations").mkdir()
    (target / "iterations" / "it001.mrc").write_text("a working file")
    return target


def test_a_failed_swap_puts_everything_back(old_folder, monkeypatch):
    before = _listing(old_folder)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src) == old_folder:  # moving the old folder aside: e.g. EBUSY, a full inode table
            raise OSError(errno.EBUSY, "busy", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="busy"):
        with atomic_folder(old_folder, keep_other_entries=True) as tmp:
            (tmp / "particles.star").write_text("new star")
    assert _listing(old_folder) == before  # the other entries moved into the new folder came back
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]


@pytest.fixture
def ctrl_c_raises():
    """Python's own SIGINT handler during the test, also where the test process inherited an ignored SIGINT (a job
    started with '&' or nohup)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_swap_takes_effect_after_it(old_folder, monkeypatch, ctrl_c_raises):
    real_replace = os.replace
    calls = []

    def interrupted_replace(src, dst):
        if not calls:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the renames
        calls.append(src)
        return real_replace(src, dst)

    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(old_folder, keep_other_entries=True) as tmp:
            (tmp / "particles.star").write_text("new star")
            monkeypatch.setattr(atomic.os, "replace", interrupted_replace)
    assert len(calls) >= 3  # the swap ran to its end
    assert _listing(old_folder) == {"particles.star": "new star", "notes.txt": "the user's notes",
                                    "iterations/it001.mrc": "a working file"}
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stale_temporaries_are_not_carried_over(old_folder):
    (old_folder / ".particles.star.abc123.part").write_text("half of a killed write")
    (old_folder.parent / ".out.xyz789.part").mkdir()  # the temporary folder of a killed run
    with atomic_folder(old_folder, keep_other_entries=True) as tmp:
        (tmp / "particles.star").write_text("new star")
    assert sorted(p.name for p in old_folder.iterdir()) == ["iterations", "notes.txt", "particles.star"]
    assert sorted(p.name for p in old_folder.parent.iterdir()) == ["out"]


def test_a_writer_failing_on_a_full_disk_raises_enospc(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError ("unexpected pos ..."): read it as ENOSPC with the path."""
    monkeypatch.setattr(atomic, "_disk_full", lambda folder: True)
    target = tmp_path / "model.pt"
    with pytest.raises(OSError) as info:
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic, "_disk_full", lambda folder: False)  # other errors stay what they are
    with pytest.raises(RuntimeError):
        with atomic_file(target):
            raise RuntimeError("a bug")


def test_refuse_overwriting_inputs_sees_through_links(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    star = data / "particles.star"
    star.write_text("input")
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ValueError, match="would overwrite the input --particles"):
        refuse_overwriting_inputs({"--out": tmp_path / "link"}, {"--particles": star})  # folder holding the input
    with pytest.raises(ValueError, match="would overwrite"):
        refuse_overwriting_inputs({"--out": tmp_path / "link" / "particles.star"}, {"--particles": star})
    refuse_overwriting_inputs({"--out": tmp_path / "link" / "new.star"}, {"--particles": star})

"""Outputs that appear complete or not at all: one file (:func:`atomic_file`) or a folder of files
(:func:`atomic_folder`).

Data are written to a hidden temporary sibling (same folder, hence same file system) and renamed onto the target
at the end; on any error (including ``KeyboardInterrupt``) the temporary is removed and an existing target is left
untouched. Files and folders get the usual permissions (``0o666`` / ``0o777`` minus the umask), not the ``0o600`` /
``0o700`` of :mod:`tempfile`. Hidden temporaries left behind by a killed process (``.NAME.*.part``) are removed by
the next write of the same target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_folder", "same_file", "refuse_overwriting_inputs"]

PART_SUFFIX = ".part"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_stale_parts(folder: Path, name: str) -> None:
    """Remove temporaries of earlier, killed writes of ``name`` in ``folder`` (``.NAME.*.part``, files or
    folders)."""
    for stale in folder.glob(f".{name}.*{PART_SUFFIX}"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                stale.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error it is removed.

    The caller writes the whole file to the yielded path (any writer that takes a path: ``np.savez``,
    ``torch.save``, ``mrcfile``, ``Path.write_text``). Raises ``ValueError`` if the folder does not exist.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"output folder does not exist: {folder}")
    _remove_stale_parts(folder, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, keep_other_entries: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder next to ``target``; on success it replaces ``target`` as a unit.

    Used for multi-file outputs (a simulation's stack + star + json, a refinement's maps + star + figures): a
    reader never sees new files beside old ones. With ``keep_other_entries``, entries of an existing ``target``
    that the new folder does not have (e.g. a protocol's inputs, an engine's working folder) are moved into it
    before the swap. Raises ``ValueError`` if ``target`` exists and is not a folder (nothing is written then).
    """
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise ValueError(f"the output path {target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=PART_SUFFIX, dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            if keep_other_entries:
                new_names = {p.name for p in tmp.iterdir()}
                for entry in target.iterdir():
                    if entry.name not in new_names:
                        os.replace(entry, tmp / entry.name)
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=PART_SUFFIX, dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (existing: same inode; else the same absolute path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def refuse_overwriting_inputs(outputs: dict[str, os.PathLike | str | None],
                              inputs: dict[str, os.PathLike | str | None]) -> None:
    """Raise ``ValueError`` when an output path is, or lies inside a folder that would replace, an input.

    ``outputs`` / ``inputs``: ``{label: path}`` (None entries are ignored); labels name the options in the
    message (e.g. ``"--out"``, ``"--particles"``). An output folder may not contain an input (replacing the
    folder would remove it); an output file may not be an input file.
    """
    for out_label, out in outputs.items():
        if out is None:
            continue
        out_abs = Path(os.path.abspath(out))
        for in_label, inp in inputs.items():
            if inp is None:
                continue
            in_abs = Path(os.path.abspath(inp))
            inside = out_abs == in_abs or out_abs in in_abs.parents or same_file(out_abs, in_abs)
            if inside:
                raise ValueError(f"{out_label} {out} would overwrite the input {in_label} {inp}; choose another "
                                 "output path")

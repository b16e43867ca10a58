"""Outputs that appear complete or not at all: one file (:func:`atomic_file`) or a folder of files
(:func:`atomic_folder`).

Data are written to a hidden temporary sibling (same folder, hence same file system) and renamed onto the target
at the end; on any error (including ``KeyboardInterrupt``) the temporary is removed and an existing target is left
untouched. Files and folders get the usual permissions (``0o666`` / ``0o777`` minus the umask), not the ``0o600`` /
``0o700`` of :mod:`tempfile`. Hidden temporaries left behind by a killed process (``.NAME.*.part``) are removed by
the next write of the same target. A write that fails because the file system is full raises ``OSError`` with
``errno.ENOSPC`` and the target's path, whatever the writer raised (``torch.save`` raises ``RuntimeError``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_folder", "same_file", "refuse_overwriting_inputs"]

PART_SUFFIX = ".part"
_NEARLY_FULL_BYTES = 1 << 20  # a write failed and less than 1 MiB is free: the disk was full


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stale_parts(folder: Path, name: str) -> list[Path]:
    """Temporaries of earlier, killed writes of ``name`` in ``folder`` (``.NAME.*.part``, files or folders)."""
    return list(folder.glob(f".{name}.*{PART_SUFFIX}"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _remove_stale_parts(folder: Path, name: str) -> None:
    for stale in _stale_parts(folder, name):
        _remove(stale)


def _disk_full(folder: Path) -> bool:
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs (Windows) or the folder is gone
        return False
    return stats.f_bavail * stats.f_frsize < _NEARLY_FULL_BYTES


def _failed_for_space(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write failed because the file system of ``folder`` is full (ENOSPC, or an I/O error of a
    writer that does not keep errno, such as ``torch.save``'s ``RuntimeError``, on a full file system)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and _disk_full(folder)


def _no_space(path: Path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold back SIGINT / SIGTERM (Ctrl-C, kill) for the few renames of a swap: they take effect right after it.

    Python-level handlers that only record the signal (a blocked signal mask would not do: another thread, e.g.
    one of torch's, could still take the signal and interrupt the main thread); only in the main thread, where
    handlers can be set.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for signum in dict.fromkeys(received):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)  # Python's default SIGINT handler raises KeyboardInterrupt
            elif handler in (signal.SIG_DFL, None):
                os.kill(os.getpid(), signum)  # the default action (terminate), now that the swap is done


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``, on error it is removed.

    The caller writes the whole file to the yielded path (any writer that takes a path: ``np.savez``,
    ``torch.save``, ``mrcfile``, ``Path.write_text``). Raises ``ValueError`` if the folder does not exist and
    ``OSError`` (``errno.ENOSPC``, naming ``path``) when the file system fills up during the write.
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
    except BaseException as exc:
        full = _failed_for_space(exc, folder)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if full:
            raise _no_space(path) from exc
        raise


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, keep_other_entries: bool = False) -> Iterator[Path]:
    """Yield a new empty temporary folder next to ``target``; on success it replaces ``target`` as a unit.

    Used for multi-file outputs (a simulation's stack + star + json, a refinement's maps + star + figures): a
    reader never sees new files beside old ones. With ``keep_other_entries``, entries of an existing ``target``
    that the new folder does not have (e.g. a protocol's inputs, an engine's working folder) are moved into it
    before the swap (hidden temporaries ``.NAME.*.part`` of the new entries are not: they are stale). If the swap
    fails, the moved entries and the old ``target`` are put back. Ctrl-C during the swap takes effect right after
    it. Raises ``ValueError`` if ``target`` exists and is not a folder (nothing is written then), and ``OSError``
    (``errno.ENOSPC``) when the file system fills up while the folder is written.
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
    except BaseException as exc:
        full = _failed_for_space(exc, target.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _no_space(target) from exc
        raise
    with _signals_deferred():
        try:
            _swap(tmp, target, keep_other_entries)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap(new: Path, target: Path, keep_other_entries: bool) -> None:
    """Put folder ``new`` at ``target`` (moving the other entries of an old ``target`` into it first); on failure,
    ``target`` is as it was."""
    if not target.exists():
        os.replace(new, target)
        return
    moved: list[str] = []
    trash = None
    try:
        if keep_other_entries:
            new_names = {p.name for p in new.iterdir()}
            stale = {p.name for name in new_names for p in _stale_parts(target, name)}
            for entry in target.iterdir():
                if entry.name not in new_names and entry.name not in stale:
                    os.replace(entry, new / entry.name)
                    moved.append(entry.name)
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", suffix=PART_SUFFIX, dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(new, target)
    except BaseException:
        if trash is not None and (trash / target.name).exists() and not target.exists():
            os.replace(trash / target.name, target)
        for name in moved:
            os.replace(new / name, target / name)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (existing: same inode; else the same absolute or resolved path)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.abspath(a)) == Path(os.path.abspath(b)) or Path(os.path.realpath(a)) == Path(
        os.path.realpath(b))


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (absolute or with symbolic links resolved)."""
    pairs = ((Path(os.path.abspath(folder)), Path(os.path.abspath(path))),
             (Path(os.path.realpath(folder)), Path(os.path.realpath(path))))
    return any(f == p or f in p.parents for f, p in pairs)


def refuse_overwriting_inputs(outputs: dict[str, os.PathLike | str | None],
                              inputs: dict[str, os.PathLike | str | None]) -> None:
    """Raise ``ValueError`` when an output path is, or lies inside a folder that would replace, an input.

    ``outputs`` / ``inputs``: ``{label: path}`` (None entries are ignored); labels name the options in the
    message (e.g. ``"--out"``, ``"--particles"``). An output folder may not contain an input (replacing the
    folder would remove it); an output file may not be an input file (same path, a symbolic link to it or a hard
    link of it).
    """
    for out_label, out in outputs.items():
        if out is None:
            continue
        for in_label, inp in inputs.items():
            if inp is None:
                continue
            if _contains(Path(out), Path(inp)) or same_file(out, inp):
                raise ValueError(f"{out_label} {out} would overwrite the input {in_label} {inp}; choose another "
                                 "output path")

"""What every ``bayespose`` sub-command shares: one-line errors and exit codes, argument types, progress output,
the check that no output overwrites an input, and the checks of a map against its particles."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path

EXIT_INPUT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
MAP_PIXEL_RTOL = 0.01  # the map's and the particles' pixel sizes must agree within 1 %


class CliError(Exception):
    """An error to show the user as one line (no traceback); exit code 1 (unreadable input, failed work)."""


class UsageError(CliError):
    """An argument value rejected after parsing (alone, or against the inputs it came with); exit code 2."""


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turn the ``ValueError`` of a configuration check (``spec.validate()``, ``symmetry_group(...)``) into a
    :class:`UsageError`: the user gave a bad argument value."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line instead of usage + message
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


_progress_line = {"open": False}  # a progress bar is on stderr without its end of line


def is_worker_process() -> bool:
    """Whether this is a data-parallel process other than the main one (torchrun's ``RANK`` > 0): it computes its
    share of the particles, prints nothing and writes no output (read from the environment: importing torch is not
    needed to know)."""
    return int(os.environ.get("RANK", "0") or 0) > 0


LOG_INTERVAL_S = 60.0  # a progress line in a log at least this often (besides one per tenth of the work)


def progress_printer(label: str):
    """A progress callback ``(done, total)`` printing a one-line bar on stderr, redrawn in place on a terminal; when
    stderr is a file or pipe (a cluster job's log) one plain line per tenth of the work, and one at least every
    :data:`LOG_INTERVAL_S` seconds (a tenth of 100,000 particles at box 256 is minutes), instead of a redraw per
    call (a training epoch wrote 250 of them). Silent on worker processes of a data-parallel run, whose counts are
    their own share."""
    if is_worker_process():
        return lambda done, total: None
    start = time.time()
    terminal = sys.stderr.isatty()
    last = {"tenth": -1, "time": start}

    def report(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        now = time.time()
        rate = done / max(now - start, 1e-9)
        bar = f"{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({rate:.0f}/s)"
        if not terminal:
            tenth = 10 * done // max(total, 1)
            if tenth > last["tenth"] or now - last["time"] >= LOG_INTERVAL_S:  # the end (tenth 10) included
                last.update(tenth=tenth, time=now)
                sys.stderr.write(bar + "\n")
                sys.stderr.flush()
            return
        sys.stderr.write("\r" + bar)
        _progress_line["open"] = done < total
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def end_progress_line() -> None:
    """End an unfinished progress bar, so that an error message gets a line of its own."""
    if _progress_line["open"]:
        sys.stderr.write("\n")
        _progress_line["open"] = False


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def positive_int(text: str) -> int:
    """A positive integer, also in scientific notation when it is a whole number (``1e4`` = 10000; ``1.5`` and
    ``1e-3`` are refused)."""
    try:
        number = Decimal(text.strip())
        if not number.is_finite() or number != number.to_integral_value():
            raise InvalidOperation
        value = int(number)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def check_map_matches(volume, map_pixel_size: float, particles, map_path: Path) -> None:
    """One-line errors for a map whose box or pixel size (header, Å/px) differs from the particles'."""
    if volume.shape[0] != particles.box:
        raise CliError(f"the map {map_path} has a box of {volume.shape[0]} px but the particles have "
                       f"{particles.box} px")
    if map_pixel_size > 0 and abs(map_pixel_size - particles.pixel_size) > MAP_PIXEL_RTOL * particles.pixel_size:
        raise CliError(f"the map {map_path} has {map_pixel_size:.4f} Å/px but the particles have "
                       f"{particles.pixel_size:.4f} Å/px (more than 1 % apart)")


def read_particles_and_map(particles_path: Path, map_path: Path):
    """``(particles, map)`` read from a RELION star file and an MRC map, with :func:`check_map_matches`'s checks
    (same box; pixel sizes within 1 %) and a note on stderr when the map header has no pixel size (Å/px); the
    particles' pixel size is then assumed."""
    from bayespose.core.io.mrc import read_map
    from bayespose.core.io.relion_star import read_star

    particles = read_star(particles_path)
    volume, map_px = read_map(map_path)
    check_map_matches(volume, map_px, particles, map_path)
    if map_px <= 0:
        sys.stderr.write(f"note: {map_path} has no pixel size in its header; assuming the particles' "
                         f"{particles.pixel_size:.4f} Å/px\n")
    return particles, volume


def read_mask(mask_path: Path, shape: tuple[int, ...]):
    """The mask (MRC) at ``mask_path``; a one-line error when its shape (voxels) differs from the map's ``shape``."""
    from bayespose.core.io.mrc import read_map

    mask, _ = read_map(mask_path)
    if mask.shape != shape:
        raise CliError(f"the mask {mask_path} has shape {mask.shape}, the map {shape}")
    return mask


def check_outputs(files: Mapping[str, Path | None] | None = None, folders: Mapping[str, Path | None] | None = None,
                  inputs: Mapping[str, Path | None] | None = None, particles=None) -> None:
    """Refuse, before any work, outputs that would destroy an input or cannot be written (:class:`UsageError`).

    ``files`` / ``folders``: ``{label: path}`` of the output files (with the figures written next to them) and
    output folders (replaced as a unit); ``inputs``: ``{label: path}`` of the input files; ``particles``: a
    ParticleSet whose image stacks are inputs too. An output may not be an input, a link to one or a folder that
    contains one; an output file may not be a folder; an output folder may not be a file, nor hold the working
    folder (replacing it would pull it from under the shell). Missing folders above the output files are created.
    """
    from bayespose.core.io.atomic import refuse_overwriting_inputs

    files, folders = dict(files or {}), dict(folders or {})
    every_input = {label: path for label, path in (inputs or {}).items() if path is not None}
    if particles is not None:
        import numpy as np

        for k, stack in enumerate(np.unique(particles.image_files.astype(str))):
            every_input[f"image stack #{k + 1} of the particles"] = stack
    with usage_errors():
        refuse_overwriting_inputs({**files, **folders}, every_input)
    cwd = Path.cwd().resolve()
    for label, folder in folders.items():
        if folder is None:
            continue
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{label} {folder} exists and is not a folder")
        if folder.resolve() == cwd or folder.resolve() in cwd.parents:
            raise UsageError(f"{label} {folder} is (or holds) the working folder, which the output would replace; "
                             "give a new sub-folder")
        existing = folder.resolve()
        while not existing.exists():
            existing = existing.parent
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {label} {folder}: no write permission in {existing}")
    for label, file in files.items():
        if file is None:
            continue
        if file.is_dir():
            raise UsageError(f"{label} {file} is a folder; give a file name")
        parent = file.parent if str(file.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the folder of {label} {file}: {exc.strerror or exc}") from None
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write {label} {file}: no write permission in {parent}")


FIGURE_DPI = 110  # what bayespose.plotting saves at


def figure_path(path: Path, label: str = "--out") -> Path:
    """The file a figure given as ``path`` is written to: ``path`` with ``.png`` added when it has no suffix (as
    matplotlib does); a :class:`UsageError` for a suffix matplotlib cannot write."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not path.suffix:
        return path.with_name(path.name + ".png")
    formats = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise UsageError(f"{label} {path}: matplotlib cannot write {path.suffix} files; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def save_figure(fig, path: Path) -> None:
    """Save a matplotlib figure atomically (complete or absent) in the format its suffix names, and close it."""
    import matplotlib.pyplot as plt

    from bayespose.core.io.atomic import atomic_file

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:].lower(), dpi=FIGURE_DPI)
    finally:
        plt.close(fig)

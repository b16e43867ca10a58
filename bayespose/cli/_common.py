"""What every ``bayespose`` sub-command shares: one-line errors and exit codes, argument types, progress output,
and the checks of a map against its particles."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_INPUT_ERROR = 1
EXIT_USAGE = 2
MAP_PIXEL_RTOL = 0.01  # the map's and the particles' pixel sizes must agree within 1 %


class CliError(Exception):
    """An error to show the user as one line (no traceback)."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line instead of usage + message
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def progress_printer(label: str):
    """A progress callback ``(done, total)`` printing a one-line bar on stderr."""
    start = time.time()

    def report(done: int, total: int) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        rate = done / max(time.time() - start, 1e-9)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} ({rate:.0f}/s)")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return report


def existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {text}")
    return path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
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



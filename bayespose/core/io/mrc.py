"""MRC maps and image stacks (via ``mrcfile``), atomic writes, and loading the images a ParticleSet refers to.

Conventions:

* Maps are returned as float32 arrays indexed ``[z, y, x]`` (the MRC file's axis order given by ``mapc/mapr/maps``
  is undone, so the array is always z-y-x), with the voxel size in Å/px (``0.0`` when the header does not set it).
* Stacks are float32 ``(N, H, W)`` arrays indexed ``[image, y, x]``; a single 2D image reads as ``N = 1``.
* Writes are atomic: the data go to a hidden temporary file in the destination folder which is renamed over the
  destination only when it is complete, so an output is either complete or absent (an existing file is left
  untouched when a write fails).
* Old RELION stacks without the ``MAP`` id string in their header are accepted (``mrcfile`` permissive mode);
  a file whose data are truncated raises ``ValueError``.
* Data are checked when read: a map, stack or particle image with NaN or infinite values raises ``ValueError``
  naming the file and the (1-based) image, and so does a particle that refers to an image beyond the end of its
  stack.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np

from bayespose.core.imaging.particles import ParticleSet
from bayespose.core.io.atomic import atomic_file

__all__ = [
    "read_map",
    "write_map",
    "read_stack",
    "write_stack",
    "stack_shape",
    "stack_length",
    "stack_index_error",
    "read_images",
    "resolve_relative_paths",
]


# --------------------------------------------------------------------------------------------------------------
# opening files
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_mrc(path: str | os.PathLike, mmap: bool = False):
    """Open an MRC file read-only; tolerate old headers (no ``MAP`` id) but not truncated data."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MRC file not found: {path}")
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "Map ID string not found", odd machine stamps
            mrc = opener(str(path), mode="r", permissive=True)
    except ValueError as exc:
        raise ValueError(f"cannot read MRC file {path}: {exc}") from exc
    try:
        if mrc.data is None:
            raise ValueError(f"MRC file {path} has no readable data (corrupt or truncated)")
        yield mrc
    finally:
        mrc.close()


def _zyx(data: np.ndarray, header) -> np.ndarray:
    """Undo the MRC axis permutation (mapc/mapr/maps) so that a 3D array is indexed [z, y, x]."""
    order = (int(header.maps), int(header.mapr), int(header.mapc))  # axis labels of data dims 0,1,2 (1=x,2=y,3=z)
    if order == (3, 2, 1) or sorted(order) != [1, 2, 3]:
        return data
    perm = [order.index(label) for label in (3, 2, 1)]
    return np.transpose(data, perm)


# --------------------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------------------


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic 3D map: ``(volume float32 (D, D, D) indexed [z, y, x], voxel size in Å)``.

    The voxel size is ``0.0`` when the header does not set it. Raises ``ValueError`` for a non-cubic or non-3D
    map, or for anisotropic voxels.
    """
    with _open_mrc(path) as mrc:
        data = np.asarray(mrc.data)
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 3D map, got data of shape {data.shape}")
        volume = np.ascontiguousarray(_zyx(data, mrc.header), dtype=np.float32)
        _check_finite_map(volume, path)
        voxel = mrc.voxel_size
        sizes = np.array([float(voxel.x), float(voxel.y), float(voxel.z)])
    if len(set(volume.shape)) != 1:
        raise ValueError(f"{path}: the map must be cubic, got shape (z, y, x) = {volume.shape}")
    if sizes.max() > 0 and not np.allclose(sizes, sizes[0], rtol=1e-3):
        raise ValueError(f"{path}: anisotropic voxel size (x, y, z) = {tuple(sizes)} Å is not supported")
    return volume, float(sizes[0])


def _check_finite_map(volume: np.ndarray, path) -> None:
    bad = ~np.isfinite(volume)
    if bad.any():
        z, y, x = np.argwhere(bad)[0]
        raise ValueError(f"{path}: the map has {int(bad.sum())} NaN or infinite voxel(s), the first at (z, y, x) = "
                         f"({z}, {y}, {x})")


def _check_finite_images(images: np.ndarray, path, numbers: np.ndarray) -> None:
    """ValueError naming ``path`` and the 1-based image numbers (``numbers[i]`` for ``images[i]``) of images with
    NaN or infinite pixels."""
    bad = ~np.isfinite(images).all(axis=(1, 2))
    if bad.any():
        shown = sorted(set(numbers[bad].tolist()))
        listed = ", ".join(map(str, shown[:10])) + (", ..." if len(shown) > 10 else "")
        raise ValueError(f"{path}: image(s) {listed} (1-based, as in RELION's N@file) have NaN or infinite "
                         f"pixels ({len(shown)} image(s)); remove those particles or re-extract them")


def _check_pixel_size(pixel_size: float) -> float:
    pixel_size = float(pixel_size)
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel size must be a positive number of Å, got {pixel_size}")
    return pixel_size


def write_map(path: str | os.PathLike, volume: np.ndarray, pixel_size: float) -> None:
    """Write a 3D map (array indexed [z, y, x]) as float32 MRC with voxel size ``pixel_size`` Å, atomically."""
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"write_map needs a 3D array, got shape {volume.shape}")
    _write_mrc(path, volume, pixel_size, stack=False)


def _write_mrc(path: str | os.PathLike, data: np.ndarray, pixel_size: float, stack: bool) -> None:
    """Write float32 ``data`` atomically, marked as an image stack or a volume, with voxel size in Å."""
    if not np.all(np.isfinite(data)):
        raise ValueError(f"refusing to write {path}: the data contain NaN or infinite values")
    pixel_size = _check_pixel_size(pixel_size)
    with atomic_file(path) as tmp:
        with mrcfile.new(str(tmp), overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if stack:
                mrc.set_image_stack()
            else:
                mrc.set_volume()
            mrc.voxel_size = pixel_size
            mrc.update_header_stats()


# --------------------------------------------------------------------------------------------------------------
# stacks
# --------------------------------------------------------------------------------------------------------------


def read_stack(path: str | os.PathLike) -> np.ndarray:
    """Read an image stack as float32 ``(N, H, W)``; a single 2D image gives ``N = 1``."""
    with _open_mrc(path) as mrc:
        data = np.asarray(mrc.data, dtype=np.float32)
        if data.ndim == 2:
            data = data[None]
        if data.ndim != 3:
            raise ValueError(f"{path}: expected a 2D image or a stack, got data of shape {data.shape}")
        images = np.array(data, dtype=np.float32, copy=True)
    _check_finite_images(images, path, np.arange(1, len(images) + 1))
    return images


def stack_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(N, H, W)`` of a stack (or ``(1, H, W)`` of a single image) from its header, without reading the data."""
    with _open_mrc(path, mmap=True) as mrc:
        shape = mrc.data.shape
    return (1,) + tuple(shape) if len(shape) == 2 else tuple(shape)


def stack_length(path: str | os.PathLike) -> int:
    """Number of images of a stack (1 for a single image), from the first header fields only (fast: used to
    check the image numbers of a star file against its stacks)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            with mrcfile.open(str(path), mode="r", permissive=True, header_only=True) as mrc:
                return int(mrc.header.nz)
        except (ValueError, OSError, AttributeError):
            return stack_shape(path)[0]  # raises the readable error of a broken file


def write_stack(path: str | os.PathLike, images: np.ndarray, pixel_size: float) -> None:
    """Write ``(N, H, W)`` images (or one ``(H, W)`` image) as a float32 MRC image stack, atomically.

    The header marks the file as an image stack (``ispg = 0``, ``mz = 1``) with pixel size ``pixel_size`` Å, which
    is how RELION writes ``.mrcs`` files; RELION reads slice ``k`` (0-based) as ``k+1@path``.
    """
    images = np.asarray(images)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3 or images.shape[0] == 0:
        raise ValueError(f"write_stack needs (N, H, W) images with N >= 1, got shape {images.shape}")
    _write_mrc(path, images, pixel_size, stack=True)


# --------------------------------------------------------------------------------------------------------------
# images of a ParticleSet
# --------------------------------------------------------------------------------------------------------------


def _as_positions(n: int, index) -> np.ndarray:
    """Normalise ``index`` (None, int, slice, bool mask or int array) into an int array of positions in [0, n)."""
    if index is None:
        return np.arange(n)
    if isinstance(index, slice):
        return np.arange(n)[index]
    index = np.asarray(index)
    if index.dtype == bool:
        if index.shape != (n,):
            raise ValueError(f"boolean index has shape {index.shape}, expected ({n},)")
        return np.flatnonzero(index)
    positions = np.atleast_1d(index).astype(np.int64)
    if positions.size and (positions.min() < -n or positions.max() >= n):
        raise IndexError(f"particle index out of range for {n} particles")
    return np.where(positions < 0, positions + n, positions)


def read_images(particles: ParticleSet, index=None) -> np.ndarray:
    """Load the images of ``particles`` (all, or those selected by ``index``) as float32 ``(n, box, box)``.

    Images are read from their stacks through a memory map, one file at a time (each stack is opened once), so
    only the referenced slices are read. The output order follows ``index``. Raises ``FileNotFoundError`` listing
    the missing stacks, and ``ValueError`` naming the file and image for a slice index beyond the end of its
    stack, an image that is not ``box x box`` or an image with NaN or infinite pixels.
    """
    positions = _as_positions(len(particles), index)
    box = int(particles.box)
    out = np.empty((len(positions), box, box), dtype=np.float32)
    if len(positions) == 0:
        return out
    files = particles.image_files[positions].astype(str)
    slices = particles.image_indices[positions]
    unique_files, inverse = np.unique(files, return_inverse=True)
    missing = [f for f in unique_files if not os.path.isfile(f)]
    if missing:
        shown = "\n  ".join(missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
        raise FileNotFoundError(f"{len(missing)} image stack(s) referenced by the particles are missing:\n  {shown}")
    for k, name in enumerate(unique_files):
        rows = np.flatnonzero(inverse == k)
        wanted = slices[rows]
        with _open_mrc(name, mmap=True) as mrc:
            data = mrc.data
            if data.ndim == 2:
                data = data[None]
            n_in_file = data.shape[0]
            if data.shape[1:] != (box, box):
                raise ValueError(f"{name}: images are {data.shape[1]}x{data.shape[2]} px, the particle set "
                                 f"says box = {box}")
            bad = (wanted < 0) | (wanted >= n_in_file)
            if bad.any():
                raise ValueError(stack_index_error(name, sorted(set((wanted[bad] + 1).tolist())), n_in_file))
            order = np.argsort(wanted, kind="stable")  # read in file order
            chunk = np.asarray(data[wanted[order]], dtype=np.float32)
            _check_finite_images(chunk, name, wanted[order] + 1)
            out[rows[order]] = chunk
    return out


def stack_index_error(path, numbers: Sequence[int], n_images: int) -> str:
    """The message for particles that refer to 1-based images ``numbers`` of a stack that has ``n_images``."""
    listed = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
    return (f"{path} has {n_images} image(s) but the particles refer to image(s) {listed} (1-based, as in "
            "RELION's N@file): the star file does not belong to this stack, or the stack is incomplete")


# --------------------------------------------------------------------------------------------------------------
# resolving relative image paths
# --------------------------------------------------------------------------------------------------------------


def resolve_relative_paths(names: Sequence[str], bases: Sequence[str | os.PathLike]) -> tuple[np.ndarray, list[str]]:
    """Absolute paths for image file ``names`` (absolute, or relative to one of ``bases``).

    Each relative name is tried against the bases in order (a base that worked before is tried first); the first
    existing file wins. A name found under no base is joined to ``bases[0]`` and reported in the returned list of
    missing names, so that metadata can be read without the images (``read_images`` then fails clearly).

    Returns ``(absolute paths as an object array aligned with names, sorted list of unresolved names)``.
    """
    bases = [Path(b).resolve() for b in bases]
    if not bases:
        raise ValueError("resolve_relative_paths needs at least one base folder")
    names = [str(n) for n in names]
    uniq = list(dict.fromkeys(names))
    resolved: dict[str, str] = {}
    missing: list[str] = []
    good_bases: list[Path] = []
    for name in uniq:
        p = Path(os.path.expanduser(name))
        if p.is_absolute():
            resolved[name] = os.path.normpath(str(p))
            if not p.is_file():
                missing.append(name)
            continue
        for base in good_bases + [b for b in bases if b not in good_bases]:
            candidate = base / p
            if candidate.is_file():
                resolved[name] = os.path.normpath(str(candidate))
                if base in good_bases:
                    good_bases.remove(base)
                good_bases.insert(0, base)
                break
        else:
            resolved[name] = os.path.normpath(str(bases[0] / p))
            missing.append(name)
    return np.array([resolved[n] for n in names], dtype=object), sorted(missing)

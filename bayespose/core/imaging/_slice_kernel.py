"""Central-slice sampling on the CPU as one compiled loop (numba): the arithmetic of
:func:`~bayespose.core.imaging.forward.slice_coefficients` fused per sample.

Why: the refinement levels of the MMSE search (and the refine E-step, the deep prior's fit check) project every
particle's own refined cells, which few particles share, so central slices are most of their cost. In torch each
step of the trilinear interpolation is a pass over (N, M) temporaries (about 40 of them: coordinates, floors,
weights, eight gathers, complex products), 70-90 ns per sample on 2 cores at box 64; one loop that keeps a sample in
registers does the same in a few ns (benchmarks/projection_speed.py). The torch path stays for GPUs and autograd.

Same values as the torch path to float32 rounding: coordinates ``A^T (kx, ky, 0) · P / D`` (``P``: padded side),
mirrored to ``x >= 0`` with the conjugate, array coordinates ``(z + P/2, y + P/2, x)``, trilinear weights with a
coordinate on the last plane taken as "plane - 1" with weight 1, zero outside the array, then the phase that puts
the projection's centre at pixel ``D // 2``.
"""

from __future__ import annotations

import os

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; without it the torch path runs
    numba = None

__all__ = ["available", "sample_slices"]


def available() -> bool:
    """Whether the compiled sampler can run: numba importable and not turned off by ``BAYESPOSE_NUMBA=0`` (the
    torch path then runs everywhere; for comparisons, or where numba misbehaves)."""
    return numba is not None and os.environ.get("BAYESPOSE_NUMBA", "1") != "0"


def _kernel(data, rot, kx, ky, scale, half, phase, out):  # pragma: no cover - compiled by numba
    """``out[n, 2m:2m+2]`` = (re, im) of the central-slice coefficient of rotation ``rot[n]`` at (``kx[m]``,
    ``ky[m]``), times ``phase[m]``. ``data`` (Z, Y, X, 2) float32: the prepared volume's real view."""
    sz, sy, sx = data.shape[0], data.shape[1], data.shape[2]
    for n in numba.prange(rot.shape[0]):
        r00, r01, r02 = rot[n, 0, 0], rot[n, 0, 1], rot[n, 0, 2]
        r10, r11, r12 = rot[n, 1, 0], rot[n, 1, 1], rot[n, 1, 2]
        for m in range(kx.shape[0]):
            x = (kx[m] * r00 + ky[m] * r10) * scale
            y = (kx[m] * r01 + ky[m] * r11) * scale
            z = (kx[m] * r02 + ky[m] * r12) * scale
            sign = np.float32(1.0)
            if x < 0:  # the rfft stores x >= 0: F(-k) = conj(F(k))
                x, y, z, sign = -x, -y, -z, np.float32(-1.0)
            z += half
            y += half
            re = np.float32(0.0)
            im = np.float32(0.0)
            if 0.0 <= z <= sz - 1 and 0.0 <= y <= sy - 1 and 0.0 <= x <= sx - 1:
                iz, iy, ix = min(int(z), sz - 2), min(int(y), sy - 2), min(int(x), sx - 2)
                wz, wy, wx = z - iz, y - iy, x - ix
                for dz in range(2):
                    az = wz if dz else np.float32(1.0) - wz
                    for dy in range(2):
                        azy = az * (wy if dy else np.float32(1.0) - wy)
                        w0, w1 = azy * (np.float32(1.0) - wx), azy * wx
                        re += w0 * data[iz + dz, iy + dy, ix, 0] + w1 * data[iz + dz, iy + dy, ix + 1, 0]
                        im += w0 * data[iz + dz, iy + dy, ix, 1] + w1 * data[iz + dz, iy + dy, ix + 1, 1]
            im *= sign
            out[n, 2 * m] = re * phase[m, 0] - im * phase[m, 1]
            out[n, 2 * m + 1] = re * phase[m, 1] + im * phase[m, 0]


_compiled = None


def sample_slices(data: np.ndarray, rotations: np.ndarray, kx: np.ndarray, ky: np.ndarray, scale: float,
                  half: int, phase: np.ndarray, threads: int) -> np.ndarray:
    """(N, 2M) float32, real and imaginary parts interleaved: the central-slice coefficients of ``rotations``
    (N, 3, 3) float32 at frequencies ``kx``, ``ky`` (M,) float32 (Fourier px of the D-box), from ``data``
    (P + 1, P + 1, P // 2 + 1, 2) float32 (the prepared volume), ``scale`` = P / D, ``half`` = P // 2, times
    ``phase`` (M, 2) float32 (cos, sin). ``threads``: numba threads (at most numba's configured number). The
    first call compiles the loop (a few seconds; cached on disk by numba afterwards)."""
    global _compiled
    if _compiled is None:
        _compiled = numba.njit(parallel=True, cache=True, nogil=True, fastmath=False)(_kernel)
    out = np.empty((len(rotations), 2 * len(kx)), dtype=np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        _compiled(data, rotations, kx, ky, np.float32(scale), np.float32(half), phase, out)
    finally:
        numba.set_num_threads(previous)
    return out

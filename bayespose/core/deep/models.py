"""Pose networks: an Image2Sphere-style head with e3nn (``so3grid``) and a unit-quaternion regressor
(``quaternion``), both on a small CNN image encoder.

``so3grid`` (Image2Sphere: Klee et al. 2023, doi:10.48550/arXiv.2302.13926; as in CESPED's App. B), re-written with
explicit einsums on e3nn's primitives (``o3.spherical_harmonics``, e3nn's Wigner-D convention via
:func:`wigner_D_fast`, and e3nn's SO(3) grid for the activation with the quadrature weights of
:func:`beta_quadrature_weights`):

1. CNN encoder: image (1, net_box, net_box) -> feature map (C, h, w) (h = w = net_box / 4).
2. Orthographic projection onto a hemisphere: HEALPix points ``n`` (e3nn xyz coordinates) with ``n_y >= 0``; point
   ``n`` reads the feature map at column ``n_x`` and row ``n_z`` (Gaussian weights), then ReLU and spherical
   harmonic coefficients ``c_l`` (l <= lmax).
3. S² convolution with a learned filter ``psi`` on a full-sphere HEALPix grid: SO(3) Fourier coefficients
   ``G_l = c_l psi_l^T``; an SO(3) signal is ``s(g) = sum_l sqrt(2l+1) <D_l(g), G_l>`` (e3nn's ``flat_wigner``
   layout, the layout e3nn's ``nn.SO3Activation`` works on; :class:`SO3Activation` here is the same operation).
4. SO(3) activation (ReLU on an SO(3) grid) and an SO(3) convolution ``G_l -> G_l K_l`` with ``K_l`` from a
   filter on rotations near the identity.
5. Logits on the output grid: ``s(g_k)`` at the rotations of ``healpix_grid(grid_order)`` (:class:`GridReadout`:
   a Fourier series in psi per direction, 4x fewer operations than the dense matrix).

Frames: the image plane is e3nn's (x, z) plane and the viewing axis e3nn's y. A RELION pose ``A`` is evaluated as
the e3nn rotation ``g = Q A Q^T`` with ``Q (x, y, z) = (x, -z, y)``: turning the image content by ``a`` (pose
``Rz(a) A``, :mod:`.data`) turns the hemisphere signal by ``Q Rz(a) Q^T`` about e3nn's y axis, and steps 2-5 are
left-equivariant (``c_l -> D_l(L) c_l`` gives ``G_l -> D_l(L) G_l`` and ``s(g) -> s(L^{-1} g)``), so the
predicted distribution turns with the image. The CNN encoder (square pixel grid) and the discrete hemisphere
points are only approximately equivariant; training with in-plane augmentation teaches the rest
(tests/core/deep/test_deep_models.py measures it).

``quaternion`` (Lian et al. 2022, doi:10.1107/S2059798321011761): the same encoder, flattened, an MLP to 4 numbers,
normalised to a unit quaternion ``(w, x, y, z)`` of the RELION ``A`` matrix
(:func:`bayespose.core.geometry.rotations.quaternion_to_matrix`).
"""

from __future__ import annotations

import functools
import math

import healpy
import numpy as np
import torch
from e3nn import o3
from torch import nn

from bayespose.core.deep.vocabulary import MODEL_TYPES, ModelType
from bayespose.core.geometry.grids import healpix_grid

__all__ = ["CNNEncoder", "SO3GridNet", "QuaternionNet", "build_model", "relion_to_e3nn",
           "flat_wigner_of", "beta_quadrature_weights", "compact_alpha_samples"]

_Q = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])  # (x, y, z) image/volume -> e3nn (x, -z, y)


def relion_to_e3nn(rotations: np.ndarray) -> np.ndarray:
    """RELION ``A`` (..., 3, 3) -> the e3nn rotation ``Q A Q^T`` the head evaluates (module doc)."""
    return _Q @ np.asarray(rotations, dtype=np.float64) @ _Q.T


@functools.lru_cache(maxsize=32)
def _generator_eigen(l: int, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition ``i X = V diag(lam) V^H`` of e3nn's real so(3) generator ``X = so3_generators(l)[axis]``
    (float64 / complex128): then ``matrix_exp(t X) = V diag(exp(-i lam t)) V^H``."""
    x = o3.so3_generators(l)[axis].to(torch.float64)
    lam, vec = torch.linalg.eigh(1j * x.to(torch.complex128))
    return lam, vec


def _exp_generator(l: int, axis: int, angle: torch.Tensor) -> torch.Tensor:
    """``matrix_exp(angle X_axis)`` (..., 2l+1, 2l+1) float64 for many angles, by the eigen-decomposition."""
    lam, vec = _generator_eigen(l, axis)
    phase = torch.exp(-1j * lam * angle.to(torch.float64)[..., None])  # (..., 2l+1)
    return ((vec * phase[..., None, :]) @ vec.conj().T).real


def wigner_D_fast(l: int, alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """e3nn's ``o3.wigner_D`` (same angles, same result to ~1e-12) without one ``matrix_exp`` per rotation:
    ``exp(alpha X_y) exp(beta X_x) exp(gamma X_y)`` from the generators' eigen-decompositions (float64)."""
    alpha, beta, gamma = torch.broadcast_tensors(alpha, beta, gamma)
    return _exp_generator(l, 1, alpha) @ _exp_generator(l, 0, beta) @ _exp_generator(l, 1, gamma)


def flat_wigner_of(rotations_e3nn: np.ndarray, lmax: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``cat_l sqrt(2l+1) D_l(g).flatten()`` (..., sum (2l+1)²) for e3nn rotations ``g`` (..., 3, 3)."""
    g = torch.as_tensor(np.asarray(rotations_e3nn, dtype=np.float64))
    alpha, beta, gamma = o3.matrix_to_angles(g)
    return _flat_wigner_angles(lmax, alpha, beta, gamma, dtype)


def _flat_wigner_angles(lmax: int, alpha, beta, gamma, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    parts = [(2 * l + 1) ** 0.5 * wigner_D_fast(l, alpha, beta, gamma).flatten(-2) for l in range(lmax + 1)]
    return torch.cat(parts, dim=-1).to(dtype)


def beta_quadrature_weights(res_beta: int) -> np.ndarray:
    """Quadrature weights (res_beta,) of the Euler angle beta on the samples ``beta_j = pi (j + 1/2) / res_beta``
    (e3nn's ``o3.s2_grid``; ``res_beta = 2 b`` even) for the Haar probability measure of SO(3): with
    ``res_alpha`` equispaced samples of alpha and of gamma (``2 pi i / res_alpha``; e3nn's angles, rotations
    ``Y(alpha) X(beta) Y(gamma)``),

        mean over SO(3) of f  =  sum_{i, j, k} w_j / res_alpha² f(alpha_i, beta_j, gamma_k)

    exactly for every ``f`` whose Wigner expansion has degrees ``l < res_beta`` and orders ``|m|, |n| <
    res_alpha`` (the quadrature of Kostelec & Rockmore, 2008, "FFTs on the rotation group", J. Fourier Anal.
    Appl. 14:145-179, doi:10.1007/s00041-008-9013-5, after Driscoll & Healy 1994, doi:10.1006/aama.1994.1008):

        w_j = (1 / b) sin(beta_j) sum_{k=0}^{b-1} sin((2k + 1) beta_j) / (2k + 1),   sum_j w_j = 1.

    They integrate ``cos(beta)^m`` for ``m < res_beta`` against ``sin(beta) / 2`` exactly. float64."""
    if res_beta < 2 or res_beta % 2:
        raise ValueError(f"res_beta must be even and >= 2, got {res_beta}")
    b = res_beta // 2
    beta = math.pi * (np.arange(res_beta) + 0.5) / res_beta
    odd = 2 * np.arange(b) + 1
    return np.sin(beta) * (np.sin(np.outer(beta, odd)) / odd).sum(1) / b


def compact_alpha_samples(lmax: int) -> int:
    """Samples of the Euler angles alpha and gamma of the compact activation grid: the fewest (> 2 lmax) with
    which the quadrature integrates the product of two signals of degree lmax exactly, rounded up to a multiple
    of 4 so that the grid holds the quarter turns about the viewing axis (12 at lmax 4; e3nn's default grid has
    4 (lmax + 1) = 20, i.e. 2.8x the points of this one)."""
    return 4 * math.ceil((2 * lmax + 1) / 4)


class SO3Activation(nn.Module):
    """Pointwise nonlinearity of an SO(3) signal (e3nn's ``nn.SO3Activation``: the same grid, quadrature and
    normalisation, with the fast Wigner matrices): coefficients -> values on an SO(3) grid of ``resolution``
    -> ``act`` -> coefficients (``s(g) = flat_wigner(g) · x / sqrt(dim)`` on the grid; the quadrature weights of
    :func:`beta_quadrature_weights`, exact for the products of two signals up to ``lmax < resolution``).
    ``alpha_samples``: samples of alpha and gamma (0: e3nn's ``2 aspect_ratio resolution``); the grid has
    ``alpha_samples² x 2 resolution`` points."""

    def __init__(self, lmax: int, act, resolution: int, aspect_ratio: int = 2, alpha_samples: int = 0):
        super().__init__()
        from e3nn.math import normalize2mom

        nb, na = 2 * resolution, alpha_samples or round(2 * aspect_ratio * resolution)
        b, a = o3.s2_grid(nb, na)
        d = _flat_wigner_angles(lmax, a[:, None, None].double(), b[None, :, None].double(),
                                a[None, None, :].double())
        self.register_buffer("D", d.reshape(-1, d.shape[-1]))  # (points, dim), points = (alpha, beta, gamma)
        qw = torch.as_tensor(beta_quadrature_weights(nb) / na ** 2, dtype=torch.float32)
        self.register_buffer("qw", qw[None, :, None].expand(na, nb, na).reshape(-1).contiguous())
        self.act = normalize2mom(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.D.shape[-1] ** 0.5
        values = self.act(x @ self.D.T / scale)
        return (values * self.qw) @ self.D * scale


def _so3_dim(lmax: int) -> int:
    return sum((2 * l + 1) ** 2 for l in range(lmax + 1))


def _healpix_xyz_e3nn(order: int) -> np.ndarray:
    """Unit vectors (P, 3) in e3nn xyz of the HEALPix pixel centres of ``order`` (NEST), with HEALPix's pole on
    e3nn's y axis (``(x, y, z)_e3nn = (y, z, x)_healpy``, a proper rotation), so that the point set is symmetric
    under quarter turns about e3nn's y axis, the viewing axis of the hemisphere projection."""
    nside = 2 ** order
    hx, hy, hz = healpy.pix2vec(nside, np.arange(12 * nside * nside), nest=True)
    return np.stack([hy, hz, hx], axis=1)


class CNNEncoder(nn.Module):
    """Small CNN: (B, 1, D, D) -> (B, channels, D/4, D/4). Conv-BatchNorm-ReLU blocks, two stride-2 steps, then
    ``final_blocks`` blocks at D/4 (1 in networks trained before that option; layer ``k`` keeps its
    ``state_dict`` name ``net.k`` either way)."""

    def __init__(self, channels: int = 64, final_blocks: int = 1):
        super().__init__()
        if final_blocks < 1:
            raise ValueError(f"final_blocks must be >= 1, got {final_blocks}")
        c = channels

        def block(i, o, stride):
            return [nn.Conv2d(i, o, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        layers = [*block(1, c // 4, 1), *block(c // 4, c // 2, 2), *block(c // 2, c // 2, 1), *block(c // 2, c, 2)]
        for _ in range(final_blocks):
            layers += block(c, c, 1)
        # channels-last weights and inputs: oneDNN's convolutions ran forward + backward of a 64-image batch in
        # 29 instead of 41 ms on 2 CPU cores (the state_dict is the same; loading copies into this layout)
        self.net = nn.Sequential(*layers).to(memory_format=torch.channels_last)
        self.channels = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, None].contiguous(memory_format=torch.channels_last))


class HemisphereProjector(nn.Module):
    """Feature map (B, C, h, w) -> spherical harmonic coefficients (B, C_s2, (lmax+1)²) of its orthographic
    projection on the hemisphere ``n_y >= 0`` (HEALPix points of ``order``; Gaussian read-out weights of width
    ``sigma`` in normalised image units; ``coverage`` of the image half-width spanned by the hemisphere)."""

    def __init__(self, channels_in: int, channels_out: int, fmap_size: int, lmax: int, order: int = 2,
                 sigma: float = 0.2, coverage: float = 0.9):
        super().__init__()
        self.conv1x1 = nn.Conv2d(channels_in, channels_out, 1)
        xyz = _healpix_xyz_e3nn(order)
        xyz = xyz[xyz[:, 1] >= 0]
        u, v = coverage * xyz[:, 0], coverage * xyz[:, 2]  # column <- n_x, row <- n_z
        grid = np.linspace(-1.0, 1.0, fmap_size)
        gv, gu = np.meshgrid(grid, grid, indexing="ij")  # row, column of each feature-map pixel
        d2 = (u[:, None] - gu.ravel()[None]) ** 2 + (v[:, None] - gv.ravel()[None]) ** 2
        w = np.exp(-d2 / (2 * sigma ** 2))
        w /= w.sum(1, keepdims=True)
        self.register_buffer("weight", torch.as_tensor(w, dtype=torch.float32))  # (P, h w)
        y = o3.spherical_harmonics(list(range(lmax + 1)), torch.as_tensor(xyz, dtype=torch.float32),
                                   normalize=True, normalization="component")
        self.register_buffer("Y", y / math.sqrt(len(xyz)))  # (P, (lmax+1)²)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        x = self.conv1x1(fmap).flatten(2)  # (B, C, h w)
        on_sphere = torch.relu(x @ self.weight.T)  # (B, C, P)
        return on_sphere @ self.Y


class S2Conv(nn.Module):
    """S² -> SO(3) convolution: ``G_l[o] = sum_i c_l[i] psi_l[i, o]^T / sqrt(C_in)``; the filter ``psi`` is
    parameterised by its values on a full-sphere HEALPix grid of ``order``. Output (B, C_out, sum (2l+1)²)."""

    def __init__(self, f_in: int, f_out: int, lmax: int, order: int = 1):
        super().__init__()
        xyz = torch.as_tensor(_healpix_xyz_e3nn(order), dtype=torch.float32)
        self.register_buffer("Y", o3.spherical_harmonics(list(range(lmax + 1)), xyz, normalize=True,
                                                         normalization="component"))  # (P, (lmax+1)²)
        self.w = nn.Parameter(torch.randn(f_in, f_out, len(xyz)))
        self.lmax, self.f_in = lmax, f_in

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        psi = torch.einsum("pk,iop->iok", self.Y, self.w) / math.sqrt(self.Y.shape[0])  # (Ci, Co, (lmax+1)²)
        out = []
        for l in range(self.lmax + 1):
            sl = slice(l * l, (l + 1) ** 2)
            g = torch.einsum("bim,ion->bomn", c[:, :, sl], psi[:, :, sl]) / math.sqrt(self.f_in)
            out.append(g.flatten(-2))
        return torch.cat(out, dim=-1)


class SO3Conv(nn.Module):
    """SO(3) -> SO(3) convolution ``G_l -> sum_i G_l[i] K_l[i, o] / sqrt(C_in)`` with ``K_l = sum_p w_p D_l(h_p)``
    for rotations ``h_p`` near the identity (angles up to ``max_angle_deg``): left-equivariant, local filter."""

    def __init__(self, f_in: int, f_out: int, lmax: int, max_angle_deg: float = 22.5, n_points: int = 48,
                 seed: int = 0):
        super().__init__()
        from scipy.spatial.transform import Rotation

        rng = np.random.default_rng(seed)
        v = rng.standard_normal((n_points - 1, 3))
        v *= (np.radians(max_angle_deg) * rng.uniform(0, 1, (n_points - 1, 1)) ** (1 / 3)
              / np.linalg.norm(v, axis=1, keepdims=True))
        h = np.concatenate([np.eye(3)[None], Rotation.from_rotvec(v).as_matrix()])
        alpha, beta, gamma = o3.matrix_to_angles(torch.as_tensor(h))
        for l in range(lmax + 1):
            self.register_buffer(f"D{l}", wigner_D_fast(l, alpha, beta, gamma).to(torch.float32))  # (P, 2l+1, 2l+1)
        self.w = nn.Parameter(torch.randn(f_in, f_out, n_points))
        self.lmax, self.f_in, self.n_points = lmax, f_in, n_points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, start = [], 0
        for l in range(self.lmax + 1):
            n = 2 * l + 1
            gl = x[:, :, start:start + n * n].reshape(x.shape[0], x.shape[1], n, n)
            kern = torch.einsum("iop,pmn->iomn", self.w, getattr(self, f"D{l}")) / math.sqrt(self.n_points)
            out.append(torch.einsum("bikm,iomn->bokn", gl, kern).flatten(-2) / math.sqrt(self.f_in))
            start += n * n
        return torch.cat(out, dim=-1)


class GridReadout(nn.Module):
    """SO(3) Fourier coefficients (B, sum (2l+1)²) -> the signal's values (B, K) on ``healpix_grid(order)``
    (``s(g_k) = flat_wigner(g_k) · G``), using the grid's product structure: directions x ``n_psi`` equispaced
    in-plane angles, index ``k = direction * n_psi + psi``.

    A RELION pose ``Rz(psi) B`` maps to the e3nn rotation ``Y(psi)' B'``, and the entries of ``D_l(Y(psi))`` are
    trigonometric polynomials of degree <= l in psi, so for each direction the values at the ``n_psi`` angles are a
    Fourier series of degree <= lmax: ``s(d, psi_j) = sum_k F[d, k] E[k, j]`` with ``E`` the rows 1, cos psi,
    sin psi, ..., cos(lmax psi), sin(lmax psi) at ``psi_j = 2 pi j / n_psi``. ``F = G · R`` with ``R`` (dim,
    directions x (2 lmax + 1)) the discrete Fourier coefficients of the dense Wigner matrix over psi, exact when
    ``n_psi > 2 lmax`` (the sampling theorem on the circle; checked when built: 1e-6 at order 3, the precision of
    e3nn's Euler angles near the poles). Cost per image:
    ``dim x directions x (2 lmax + 1) + directions x n_psi x (2 lmax + 1)`` multiply-adds instead of ``dim x K``
    (lmax 4, order 3: 1.5 M instead of 6.1 M). Grids with ``n_psi <= 2 lmax`` (order 0 at lmax >= 3) use the dense
    matrix. The buffers derive from (order, lmax) and are not saved with the network."""

    def __init__(self, grid_order: int, lmax: int):
        super().__init__()
        grid = healpix_grid(grid_order)
        dense = flat_wigner_of(relion_to_e3nn(grid.rotations), lmax, torch.float64)  # (K, dim)
        n_dir, n_psi, n_fourier = grid.n_directions, grid.n_psi, 2 * lmax + 1
        self.shape = (n_dir, n_psi)
        if n_psi <= 2 * lmax:
            self.register_buffer("dense", dense.T.float().contiguous(), persistent=False)
            return
        psi = 2 * np.pi * np.arange(n_psi) / n_psi
        rows = [np.ones(n_psi)]
        for m in range(1, lmax + 1):
            rows += [np.cos(m * psi), np.sin(m * psi)]
        fourier = torch.as_tensor(np.stack(rows))  # (2 lmax + 1, n_psi), orthogonal rows
        # coefficients by projection on the orthogonal rows: (dim, directions, 2 lmax + 1)
        per_direction = dense.reshape(n_dir, n_psi, -1)
        coeffs = torch.einsum("djc,kj->cdk", per_direction, fourier) / (fourier ** 2).sum(1)
        error = (torch.einsum("cdk,kj->djc", coeffs, fourier) - per_direction).abs().max()
        if error > 1e-5:  # would mean the grid is not directions x equispaced psi (1e-6: acos in the angles)
            raise RuntimeError(f"grid read-out: the Fourier factorisation misses by {float(error):.2e}")
        self.register_buffer("readout", coeffs.reshape(len(coeffs), n_dir * n_fourier).float().contiguous(),
                             persistent=False)
        self.register_buffer("fourier", fourier.float(), persistent=False)

    def forward(self, harmonics: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dense"):
            return harmonics @ self.dense
        per_direction = (harmonics @ self.readout).view(len(harmonics), self.shape[0], -1)
        return (per_direction @ self.fourier).view(len(harmonics), -1)


class SO3GridNet(nn.Module):
    """Image2Sphere-style network: images (B, D, D) -> logits (B, K) on ``healpix_grid(grid_order)``.

    ``logits_at(images, rotations)`` evaluates the same band-limited function at any RELION rotations.
    """

    def __init__(self, net_box: int, grid_order: int = 2, lmax: int = 6, channels: int = 64,
                 s2_channels: int = 32, so3_channels: int = 8, activation_resolution: int = 0,
                 final_blocks: int = 1, activation_alpha: int = 0):
        super().__init__()
        if net_box % 4:
            raise ValueError(f"net_box must be a multiple of 4 for the so3grid model, got {net_box}")
        self.encoder = CNNEncoder(channels, final_blocks)
        self.projector = HemisphereProjector(channels, s2_channels, net_box // 4, lmax)
        self.s2conv = S2Conv(s2_channels, so3_channels, lmax)
        res = activation_resolution or (lmax + 1)
        self.activation = SO3Activation(lmax, torch.relu, res, alpha_samples=activation_alpha)
        self.so3conv = SO3Conv(so3_channels, 1, lmax)
        self.lmax = lmax
        self.readout = GridReadout(grid_order, lmax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # networks saved before GridReadout held the dense read-out matrix as a buffer; it derives from (grid
        # order, lmax) and is rebuilt, so the saved copy is ignored
        state_dict.pop(prefix + "output_wigner", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def harmonics(self, images: torch.Tensor) -> torch.Tensor:
        """SO(3) Fourier coefficients (B, sum (2l+1)²) of the log-density (up to a constant)."""
        x = self.projector(self.encoder(images))
        x = self.activation(self.s2conv(x))
        return self.so3conv(x)[:, 0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.harmonics(images))

    def logits_at(self, images: torch.Tensor, rotations: np.ndarray) -> torch.Tensor:
        """Logits (B, K) at RELION rotations (K, 3, 3) (shared) or (B, K, 3, 3) (per image), same scale as
        :meth:`forward`."""
        w = flat_wigner_of(relion_to_e3nn(rotations), self.lmax).to(images.device)
        h = self.harmonics(images)
        return h @ w.T if w.ndim == 2 else torch.einsum("bi,bki->bk", h, w)


class QuaternionNet(nn.Module):
    """CNN encoder -> MLP -> unit quaternion (B, 4) ``(w, x, y, z)`` of the RELION ``A`` matrix (Lian et al. 2022)."""

    def __init__(self, net_box: int, channels: int = 64, hidden: int = 256):
        super().__init__()
        if net_box % 4:
            raise ValueError(f"net_box must be a multiple of 4 for the quaternion model, got {net_box}")
        self.encoder = CNNEncoder(channels)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * (net_box // 4) ** 2, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 4))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        q = self.head(self.encoder(images))
        return q / q.norm(dim=1, keepdim=True).clamp_min(1e-8)


def build_model(model: ModelType, net_box: int, grid_order: int = 2, **options) -> nn.Module:
    """The network of type ``model`` (``so3grid`` or ``quaternion``) for ``net_box`` px inputs."""
    if model == "so3grid":
        return SO3GridNet(net_box, grid_order, **options)
    if model == "quaternion":
        return QuaternionNet(net_box, **{k: v for k, v in options.items() if k in ("channels", "hidden")})
    raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODEL_TYPES)}")

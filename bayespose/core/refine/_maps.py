"""Maps of an EM iteration: the half maps from the M-step accumulators (FSC, resolution, τ², Wiener filter), the
combined map, and the references of the next E-step (solvent-flattened, halves joined at low resolution).

Maps are (D, D, D) float32 arrays indexed [z, y, x]; resolutions in Å, FSC frequencies in 1/Å, τ² per Fourier
shell (the units of :class:`bayespose.core.imaging.reconstruct.FourierAccumulator`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bayespose.core.imaging.reconstruct import fsc, lowpass, resolution_at, tau2_from_fsc
from bayespose.core.imaging.volumes import envelope_mask, flatten_solvent

# the envelope of a half map is taken at this resolution or the map's own, whichever is coarser (Å): the particle's
# outline, not its detail (RELION's tutorial masks are made from a 15 Å low-pass)
ENVELOPE_LOWPASS_A = 15.0


@dataclass
class Maps:
    """Half maps (two (D, D, D)), combined map, FSC between the unregularised half maps (frequencies in 1/Å and
    values), its 0.143 resolution (Å) and the τ² per shell of the Wiener filter."""

    half_maps: list
    combined: np.ndarray
    fsc_frequencies: np.ndarray
    fsc: np.ndarray
    resolution: float
    tau2: np.ndarray


def maps_from(accumulators: list, pixel_size: float, mask: np.ndarray | None) -> Maps:
    """FSC of the unregularised half maps (a small ridge only: τ² of a previous cut-off would be zero beyond it,
    and the FSC of two zeroed shells would measure crop leakage) -> resolution (FSC 0.143, at least Nyquist) and
    τ² (RELION's rule); the Wiener half maps with that τ² (the next references: the MAP maps) and the combined
    map with RELION's whole-map τ² (``sqrt(2 FSC / (1 + FSC))``: Rosenthal & Henderson's FSC weighting of a map of
    both halves), Wiener-weighted per voxel but filtered per shell after cropping (``wiener="shell"`` of
    :func:`~bayespose.core.imaging.reconstruct.reconstruct`). Every map is flattened beyond the box's inscribed
    sphere, as RELION's reconstructions. Measured on 500 relion_project particles at SNR 0.03 (our refinement's
    final weights), FSC of the combined map against the truth at 24.6 / 15 / 12 Å: 0.743 / 0.092 / 0.034 before
    (no sphere, per-voxel Wiener without the sqrt), 0.793 / 0.262 / 0.160 now; ``relion_reconstruct --ctf`` from
    the same final poses 0.760 / 0.222 / 0.150.
    ``accumulators``: the two half sets' FourierAccumulators (the first one ends holding their sum); ``mask``:
    (D, D, D) in [0, 1] for the FSC, or None."""
    provisional = [acc.reconstruct(tau2=None, mask_outside=True).cpu().numpy() for acc in accumulators]
    freq_t, fsc_t = fsc(provisional[0], provisional[1], pixel_size, mask=mask)
    freq, fsc_values = freq_t.cpu().numpy(), fsc_t.cpu().numpy()
    resolution = max(resolution_at(freq, fsc_values), 2 * pixel_size)
    mean_weight = 0.5 * (accumulators[0].mean_weight_per_shell() + accumulators[1].mean_weight_per_shell())
    tau2 = tau2_from_fsc(fsc_values, mean_weight[:len(fsc_values)])
    half_maps = [acc.reconstruct(tau2=tau2, mask_outside=True).cpu().numpy() for acc in accumulators]
    both = accumulators[0].add_(accumulators[1])  # in place: no third grid (0.8 GB at box 256)
    combined = both.reconstruct(tau2=tau2_from_fsc(fsc_values, both.mean_weight_per_shell()[:len(fsc_values)],
                                                   whole_map=True, relion_sqrt=True), mask_outside=True,
                                wiener="shell").cpu().numpy()
    return Maps(half_maps, combined, freq, fsc_values, float(resolution), tau2.cpu().numpy())


def join_halves(maps: list, resolution_A: float | None, pixel_size: float) -> list:
    """Replace the Fourier components below ``resolution_A`` of both half maps by their average (RELION's
    ``--low_resol_join_halves``; None: keep them apart)."""
    if resolution_A is None:
        return maps
    low = [lowpass(m, resolution_A, pixel_size, edge_width=0.0).numpy() for m in maps]
    mean_low = 0.5 * (low[0] + low[1])
    return [(m - lo + mean_low).astype(np.float32) for m, lo in zip(maps, low)]


def references_from(half_maps: list, mask: np.ndarray | None, join_below_A: float | None, pixel_size: float,
                    join: bool = True, envelope_at_A: float | None = None) -> list:
    """The E-step references of the two half sets: each half map solvent-flattened with ``mask`` (None: as it
    is), or, with ``envelope_at_A`` (the maps' resolution, Å), with its own :func:`envelope_mask` (low-passed to
    that resolution or :data:`ENVELOPE_LOWPASS_A`, whichever is coarser) inside ``mask``: each half's mask comes
    from that half alone, so the halves stay independent; then, with ``join``, averaged below ``join_below_A``
    (:func:`join_halves`)."""
    if envelope_at_A is not None:
        lowpass_A = max(envelope_at_A, ENVELOPE_LOWPASS_A)
        refs = [flatten_solvent(m, envelope_mask(m, pixel_size, lowpass_A, inside=mask)) for m in half_maps]
    else:
        refs = [flatten_solvent(m, mask) if mask is not None else m for m in half_maps]
    return join_halves(refs, join_below_A, pixel_size) if join else refs

"""Composite maps: mask-weighted merging of focused reconstructions, and re-imposed symmetry.

The paper's composite of ``K`` patch reconstructions (each the unmasked, unfiltered half map of one
focused refinement) is ``sum_i Mask_i Map_i / sum_i Mask_i``. With symmetry expansion each patch map
is sharp in its own mask only, in the frame of one asymmetric unit; symmetry is re-imposed by the
same weighted average over the operators: ``sum_i sum_g R_g(Mask_i Map_i) / sum_i sum_g R_g(Mask_i)``
(``R_g`` = :func:`gmmrefine.geometry.symmetry.rotate_map`), which for one patch is the paper's
"reimpose the symmetry ... by weighted average, using the focus masks as weights".

Where the masks leave less than full weight (``W = sum Mask < 1``: their soft edges and everywhere
outside them, where the paper's formula is 0/0), a fallback map (the global refinement's half map)
takes the weight that is missing::

    composite = (sum_i Mask_i Map_i + max(0, 1 - W) Fallback) / (W + max(0, 1 - W))

So the formula is the paper's wherever ``W >= 1`` (every Gaussian centre of a patch lies inside its
sphere, so all of the molecule), the fallback map where no mask reaches, and a continuous blend in
between (no seams at mask edges). With symmetry the fallback is averaged over the same rotations
(:func:`gmmrefine.geometry.symmetry.symmetrize_map`), so every term of the composite is a group
average of the same kind (a symmetrised reconstruction, whose grids were summed over the group in
Fourier space, is symmetric only to ~5e-3 of its peak in :func:`symmetry_error`'s measure).

Symmetry error (:func:`symmetry_error`): rotations between grid points interpolate, so no sampled map
is exactly invariant under a 120-degree turn. Measured with 5th-order B-splines: a Gaussian blob of
sigma 1.7 px comes back within 1.9e-4 of its peak, one of 2.5 px within 1e-5, while detail at the
Nyquist frequency does not survive a turn (the noise-free map of a C3 assembly, 2.4 A/px, is off by 6.6 %
unblurred and by 8e-5 after a Gaussian blur of sigma 1.5 px). The error is therefore reported both
raw and after that blur; quarter turns (C4, D2, ...) permute voxels and are exact. The averaged
terms are mask x map products, sharp at the mask edges, so :func:`composite_map` ends with one plain
group average of its (smooth) result (C3 test composite: 2.6e-3 -> 2.6e-4 of the peak, blur 1.5 px).
What remains comes from the noise near the box faces, which no rotation keeps in the box and which
the interpolation's prefilter and the measure's blur carry inside: the filtered map written by
``refine.patches.composite_outputs`` is limited to the inscribed sphere and averaged once more there
(5.9e-5). Resampling more finely does not help (a group average with 2x Fourier-oversampled rotations
of the whole box: 1.3e-4 at 8x the cost), nor do exact band-limited turns about z (the in-plane
spectrum cut they need lowers the FSC to the noise-free map, 0.879 -> 0.820 on the C3 test's maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gmmrefine.geometry.symmetry import rotate_map, symmetry_operators


def composite_map(maps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], fallback: torch.Tensor, *,
                  symmetry: str = "C1", spline_order: int = 5) -> torch.Tensor:
    """Mask-weighted composite of focused reconstructions.

    Args:
        maps: ``K`` maps ``(D, D, D)`` (unmasked, unfiltered half maps of the focused refinements).
        masks: ``K`` masks ``(D, D, D)`` in [0, 1], the one each map was refined with.
        fallback: ``(D, D, D)`` map used where the masks leave less than full weight (see the module
            docstring); symmetric already when ``symmetry`` is not C1.
        symmetry: point group to re-impose (each ``Mask_i Map_i`` and ``Mask_i`` averaged over the
            group's rotations); ``C1`` for none.
        spline_order: interpolation order of the rotations.

    Returns:
        ``(D, D, D)`` float32 composite.
    """
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"composite_map needs as many masks as maps (>= 1), got {len(maps)} and {len(masks)}")
    ops = symmetry_operators(symmetry)
    # Rotations are linear: sum over the patches first, then over the operators (2 (K_g - 1)
    # resamplings in all, whatever the number of patches).
    numerator0 = torch.zeros_like(fallback, dtype=torch.float64)
    weight0 = torch.zeros_like(fallback, dtype=torch.float64)
    for volume, mask in zip(maps, masks):
        numerator0 += mask.to(torch.float64) * volume.to(torch.float64)
        weight0 += mask.to(torch.float64)
    numerator = numerator0.clone()
    weight = weight0.clone()
    if ops.shape[0] > 1:
        from gmmrefine.geometry.symmetry import symmetrize_map

        fallback = symmetrize_map(fallback.to(torch.float64), symmetry, spline_order=spline_order)
    for op in ops[1:]:  # a whole-map resampling per operator, never per voxel
        numerator += rotate_map(numerator0, op, spline_order=spline_order)
        weight += rotate_map(weight0, op, spline_order=spline_order)
    fill = (1.0 - weight).clamp(min=0.0)
    out = (numerator + fill * fallback.to(torch.float64)) / (weight + fill)
    if ops.shape[0] > 1:
        # The averaged terms are mask x map products, sharp at the mask edges, so their rotations carry
        # interpolation error; one plain group average of the (smooth) result removes most of it
        # (measured on the C3 test's composite: 2.5e-3 -> 2.4e-4 of the peak in symmetry_error, blur 1.5 px).
        from gmmrefine.geometry.symmetry import symmetrize_map

        out = symmetrize_map(out, symmetry, spline_order=spline_order)
    return out.to(torch.float32)


def symmetry_error(volume: torch.Tensor, symmetry: str, region: torch.Tensor | None = None, *,
                   blur_px: float = 0.0, spline_order: int = 5) -> float:
    """How far a map is from point-group symmetric: ``max_g max_region |R_g V - V| / max_region |V|``.

    Measured with the same rotations (:func:`rotate_map`) that impose symmetry, so it includes their
    interpolation error (see the module docstring; compare with a map symmetric by construction).

    Args:
        volume: ``(D, D, D)``.
        symmetry: point group.
        region: ``(D, D, D)`` bool voxels compared (default: all).
        blur_px: first blur the map by a Gaussian of this standard deviation (pixels; 0: none).

    Returns:
        The largest deviation over the non-identity operators, as a fraction of the map's peak.
    """
    v = volume.to(torch.float64)
    if blur_px > 0:
        import math

        from gmmrefine.fourier.filters import apply_bfactor

        # B = 8 pi^2 sigma^2 is a Gaussian blur of standard deviation sigma.
        v = apply_bfactor(v, 8 * math.pi**2 * blur_px**2, 1.0)
    sel = torch.ones_like(v, dtype=torch.bool) if region is None else region.to(torch.bool)
    peak = float(v[sel].abs().max())
    worst = 0.0
    for op in symmetry_operators(symmetry)[1:]:
        worst = max(worst, float((rotate_map(v, op, spline_order=spline_order) - v)[sel].abs().max()) / peak)
    return worst

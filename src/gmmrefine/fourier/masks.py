"""Real-space masks: soft spheres, masks from a map (threshold, dilation, cosine edge)."""

from __future__ import annotations

import math

import torch


def radius_grid(box: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """``(D, D, D)`` distance of each voxel from the centre voxel ``D // 2`` (pixels)."""
    ax = torch.arange(box, device=device, dtype=torch.float64) - box // 2
    r = torch.sqrt(ax[:, None, None] ** 2 + ax[None, :, None] ** 2 + ax[None, None, :] ** 2)
    return r.to(dtype)


def soft_mask_outside_map(volume: torch.Tensor, radius_px: float | None = None,
                          edge_px: float = 3.0) -> torch.Tensor:
    """Replace what lies outside a sphere by the mean value there, with a raised-cosine blend.

    RELION's ``softMaskOutsideMap``: inside ``radius_px`` (default ``D / 2``) the map is kept; beyond
    ``radius_px + edge_px`` it is the (edge-weighted) mean of the outside region; in between the two
    are blended. Removes the aliased corners of a reconstruction.

    Args:
        volume: ``(D, D, D)`` map.

    Returns:
        ``(D, D, D)`` new map.
    """
    box = volume.shape[-1]
    radius = box / 2 if radius_px is None else float(radius_px)
    r = radius_grid(box, device=volume.device, dtype=volume.dtype)
    outer = radius + edge_px
    blend = torch.where(r < radius, torch.zeros_like(r),
                        torch.where(r > outer, torch.ones_like(r),
                                    0.5 + 0.5 * torch.cos(math.pi * (outer - r) / edge_px)))
    total = blend.sum()
    background = (blend * volume).sum() / total if total > 0 else volume.new_zeros(())
    return volume * (1 - blend) + background * blend


def soft_sphere(box: int, radius_px: float, edge_px: float = 5.0, *, center_px=None, device=None) -> torch.Tensor:
    """Spherical mask with a raised-cosine edge.

    Args:
        box: map size ``D``.
        radius_px: radius of the part at 1 (pixels).
        edge_px: width of the cosine fall-off from 1 to 0 beyond ``radius_px``.
        center_px: ``(x, y, z)`` centre in pixels (default the box centre ``D // 2``).

    Returns:
        ``(D, D, D)`` float32 in [0, 1].
    """
    ax = torch.arange(box, device=device, dtype=torch.float64)
    cx, cy, cz = (box // 2,) * 3 if center_px is None else (float(c) for c in center_px)
    r = torch.sqrt((ax[:, None, None] - cz) ** 2 + (ax[None, :, None] - cy) ** 2 + (ax[None, None, :] - cx) ** 2)
    return cosine_edge(r - radius_px, edge_px).to(torch.float32)


def cosine_edge(distance_px: torch.Tensor, edge_px: float) -> torch.Tensor:
    """1 where ``distance <= 0``, ``0.5 + 0.5 cos(pi d / edge)`` for ``0 < d < edge``, 0 beyond."""
    if edge_px <= 0:
        return (distance_px <= 0).to(distance_px.dtype)
    d = distance_px.clamp(0, edge_px)
    return 0.5 + 0.5 * torch.cos(math.pi * d / edge_px)


def mask_from_map(volume: torch.Tensor, threshold: float, *, dilate_px: float = 3.0,
                  edge_px: float = 6.0) -> torch.Tensor:
    """Soft mask of a map: threshold, dilate, raised-cosine edge (RELION's ``relion_mask_create``).

    Args:
        volume: ``(D, D, D)`` map (low-pass it first for a smooth mask).
        threshold: density above which voxels are inside.
        dilate_px: the binary mask grows by this distance (pixels).
        edge_px: width of the cosine fall-off beyond the dilated mask.

    Returns:
        ``(D, D, D)`` float32 mask in [0, 1], on the device of ``volume``.

    Raises:
        ValueError: no voxel above the threshold.
    """
    from scipy.ndimage import distance_transform_edt

    seed = (volume > threshold).cpu().numpy()
    if not seed.any():
        raise ValueError(f"no voxel is above the mask threshold {threshold:g}")
    # Euclidean distance of every voxel to the nearest seed voxel (0 inside).
    distance = torch.from_numpy(distance_transform_edt(~seed)).to(volume.device)
    return cosine_edge(distance - dilate_px, edge_px).to(torch.float32)

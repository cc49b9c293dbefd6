"""Real-space rendering of a GMM as a voxel map or as projection images.

Normalisation as in :mod:`gmmrefine.gmm.model`: the map holds the density sampled at voxel centres
and an image the sum of that map along z (``(1/apix) * integral M dz`` per pixel). Both are
separable, so rendering is a matrix multiply over Gaussians: a 2D image is ``Gy^T diag(w) Gx`` with
``Gx[j, x] = exp(-(x - x_j)^2 / (2 s_j^2))``; a map does the same per slab of z slices.
"""

from __future__ import annotations

import math

import torch

from gmmrefine.gmm.project import image_positions_A


def _axis_profiles(coord_A: torch.Tensor, widths_A: torch.Tensor, box: int, apix: float) -> torch.Tensor:
    """``(..., N, D)`` Gaussian profiles of each centre along one axis (voxel ``D // 2`` is 0 A)."""
    grid = (torch.arange(box, device=coord_A.device, dtype=coord_A.dtype) - box // 2) * apix
    d = grid - coord_A[..., None]
    return torch.exp(-0.5 * (d / widths_A[..., None]) ** 2)


def render_map(gmm, box: int, apix: float, *, slab: int | None = None) -> torch.Tensor:
    """Voxel map of a GMM.

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture`.
        box: ``D`` voxels per side; apix: A/voxel.
        slab: z slices per matrix multiply (memory ``N * slab * D`` floats; default keeps it ~8M).

    Returns:
        ``(D, D, D)`` map ``[z, y, x]`` on the GMM's device, float32 (or the GMM's dtype).
    """
    c, a, s = gmm.centers_A, gmm.amplitudes, gmm.widths_A
    gx = _axis_profiles(c[:, 0], s, box, apix)                 # (N, D)
    gy = _axis_profiles(c[:, 1], s, box, apix) * a[:, None]    # amplitude folded into y
    gz = _axis_profiles(c[:, 2], s, box, apix)
    out = torch.empty(box, box, box, dtype=gx.dtype, device=gx.device)
    if slab is None:
        slab = max(1, min(box, 8_000_000 // max(1, gx.shape[0] * box)))
    for z0 in range(0, box, slab):
        zs = gz[:, z0:z0 + slab]                                # (N, dz)
        zy = (zs[:, :, None] * gy[:, None, :]).flatten(1)      # (N, dz * D)
        out[z0:z0 + zs.shape[1]] = (zy.T @ gx).view(zs.shape[1], box, box)
    return out


def render_image(gmm, box: int, apix: float, rotations: torch.Tensor | None = None,
                 translation_px: torch.Tensor | None = None) -> torch.Tensor:
    """Real-space projections of a GMM.

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture`.
        box, apix: image size (px) and pixel size (A/px).
        rotations: ``(B, 3, 3)`` RELION matrices (identity if None).
        translation_px: ``(B, 2)`` image translations (content moves by +t), or None.

    Returns:
        ``(B, D, D)`` images ``[y, x]``.
    """
    c, a, s = gmm.centers_A, gmm.amplitudes, gmm.widths_A
    if rotations is None:
        rotations = torch.eye(3, dtype=c.dtype, device=c.device)[None]
    pos = image_positions_A(c, rotations.to(c.dtype), translation_px, apix)  # (B, N, 2)
    weight = a * math.sqrt(2 * math.pi) * s / apix  # line integral / apix
    gx = _axis_profiles(pos[..., 0], s, box, apix)             # (B, N, D)
    gy = _axis_profiles(pos[..., 1], s, box, apix) * weight[..., None]
    return torch.bmm(gy.transpose(1, 2), gx)

"""Width masks (focused refinement) and k-means patches of a GMM (patch-by-patch refinement)."""

from __future__ import annotations

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.gmm.model import GaussianMixture


def sample_volume(volume: torch.Tensor, points_A: torch.Tensor, apix: float) -> torch.Tensor:
    """Trilinear interpolation of a ``(D, D, D)`` map ``[z, y, x]`` at points (x, y, z in A from the
    box centre, voxel ``D // 2``); 0 outside the box.

    Returns:
        ``(N,)`` values.
    """
    box = volume.shape[-1]
    vol = volume.to(device=points_A.device, dtype=torch.float32)[None, None]
    index = points_A.to(torch.float32) / apix + box // 2          # voxel coordinates, x y z
    grid = (2 * index / (box - 1) - 1).view(1, 1, 1, -1, 3)      # grid_sample: last dim is (x, y, z)
    out = torch.nn.functional.grid_sample(vol, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.view(-1)


def width_mask(gmm: GaussianMixture, mask_volume: torch.Tensor, apix: float) -> GaussianMixture:
    """Widen the Gaussians outside a mask: ``s' = s / (0.25 + 0.75 M(c))``, each keeping its mass.

    Wider means lower local resolution, not lower density: a widened Gaussian keeps its integrated
    density (``A' = A (s / s')^3``, so its transform at ``k = 0`` is unchanged and only its high
    frequencies fall off faster). That is what the paper's formula does to EMAN2's GMMs, whose amplitude
    is the integrated (``k = 0``) value (``e2gmm``'s projector: ``amp * exp(-|k| lp sigma)``). Keeping the
    peak instead would make a Gaussian at ``M = 0`` 64 times heavier and let the widened region dominate
    the low-frequency rings of the FRC; measured on simulated adk particles (residues 1-110 hinged by
    up to 20 degrees, box 40 at 2.4 A/px, SNR 0.3, GMM of the true map at 7 A): the mass-keeping mask
    scores the domain's true pose above the rest's for 87 % of the particles, the peak-keeping one for
    62 % (unmasked GMM: 49 %).

    Args:
        gmm: the GMM.
        mask_volume: ``(D, D, D)`` mask with values in [0, 1], on the GMM's box and pixel size.
        apix: A/voxel of the mask.

    Returns:
        A new GMM (same centres; widths up to 4x larger and peak amplitudes up to 64x smaller where
        ``M = 0``).
    """
    mask = torch.as_tensor(mask_volume)
    if mask.ndim != 3 or not (mask.shape[0] == mask.shape[1] == mask.shape[2]):
        raise InputError(f"mask: expected a cubic 3D map, got shape {tuple(mask.shape)}.")
    m = sample_volume(mask, gmm.centers_A.detach(), apix).clamp(0.0, 1.0).to(gmm.widths_A.dtype)
    factor = 1.0 / (0.25 + 0.75 * m)
    return GaussianMixture(gmm.centers_A, gmm.amplitudes / factor**3, gmm.widths_A * factor)


def kmeans_patches(gmm: GaussianMixture, k: int, seed: int = 0) -> torch.Tensor:
    """Split the Gaussians into ``k`` spatial patches by k-means of their centres.

    Returns:
        ``(N,)`` long labels in ``0..k-1`` (on the GMM's device), every label used.
    """
    from sklearn.cluster import KMeans

    if k < 1 or k > gmm.n:
        raise InputError(f"patches: need 1 <= k <= number of Gaussians ({gmm.n}), got k = {k}.")
    centers = gmm.centers_A.detach().cpu().to(torch.float64).numpy()
    if k == 1:
        return torch.zeros(gmm.n, dtype=torch.long, device=gmm.device)
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(centers)
    return torch.as_tensor(np.asarray(labels, dtype=np.int64), device=gmm.device)

"""Local resolution: FSC between the half maps inside a soft spherical window moved over the map."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gmmrefine.fourier.fsc import fourier_shell_correlation

# Windows whose FSC is computed per vectorised step.
_WINDOWS_PER_STEP = 64


def crossing_resolution(curves: torch.Tensor, box: int, apix: float, threshold: float = 0.143) -> torch.Tensor:
    """Resolution (A) where each curve first falls below ``threshold``, interpolated between shells.

    Vectorised :func:`gmmrefine.fourier.fsc.resolution_at`: shell 0 is ignored, a curve that never falls
    below gives Nyquist (``2 apix``), one already below at shell 1 gives ``D apix``.

    Args:
        curves: ``(P, D // 2 + 1)`` correlation curves.

    Returns:
        ``(P,)`` float64 resolutions in angstrom.
    """
    c = curves.to(torch.float64)
    n = c.shape[-1]
    below = c[:, 1:] < threshold
    has = below.any(dim=1)
    first = torch.where(has, below.int().argmax(dim=1) + 1, torch.full_like(has, n, dtype=torch.long))
    s1 = first.clamp(max=n - 1)
    s0 = (s1 - 1).clamp(min=0)
    c0 = c.gather(1, s0[:, None])[:, 0]
    c1 = c.gather(1, s1[:, None])[:, 0]
    t = ((c0 - threshold) / (c0 - c1).clamp_min(1e-12)).clamp(0, 1)
    shell = s0.to(torch.float64) + t
    res = (box * apix) / shell.clamp_min(1e-12)
    res = torch.where(first == 1, torch.full_like(res, box * apix), res)
    return torch.where(has, res, torch.full_like(res, 2.0 * apix))


def local_resolution(
    half1: torch.Tensor,
    half2: torch.Tensor,
    apix: float,
    *,
    window_px: int = 24,
    step_px: int = 4,
    mask: torch.Tensor | None = None,
    threshold: float = 0.143,
) -> torch.Tensor:
    """Local resolution map from windowed FSC between two half maps.

    Around every ``step_px``-th voxel a ``window_px`` sub-box of each half is cut out, multiplied by a
    Gaussian window (standard deviation ``window_px / 6``; its transform has no side lobes, so strong
    low-resolution signal does not leak into high shells as it does through a sharp-edged window) and
    their FSC read at ``threshold``. The grid of values is interpolated (trilinear) to every voxel.

    Args:
        half1, half2: ``(D, D, D)`` half maps.
        apix: pixel size (A/px).
        window_px: even window box; its FSC has ``window_px / 2`` shells, so resolutions are coarse.
        step_px: spacing of the window centres.
        mask: optional ``(D, D, D)``; windows centred where it is < 0.5 are skipped and the result is 0
            outside it.
        threshold: FSC threshold.

    Returns:
        ``(D, D, D)`` float32 resolution in angstrom (0 outside the mask).
    """
    box = half1.shape[-1]
    if window_px % 2 or window_px < 8 or window_px > box:
        raise ValueError(f"window_px must be even, >= 8 and <= the box ({box}), got {window_px}")
    half = window_px // 2
    ax = torch.arange(window_px, device=half1.device, dtype=torch.float32) - half
    g1 = torch.exp(-0.5 * (ax / (window_px / 6)) ** 2)
    window = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    pad = (half,) * 6
    p1 = F.pad(half1[None, None].to(torch.float32), pad)[0, 0]
    p2 = F.pad(half2[None, None].to(torch.float32), pad)[0, 0]
    centres = torch.arange(0, box, step_px, device=half1.device)
    n = centres.shape[0]
    gz, gy, gx = torch.meshgrid(centres, centres, centres, indexing="ij")
    pts = torch.stack([gz, gy, gx], dim=-1).reshape(-1, 3)
    if mask is not None:
        keep = mask[pts[:, 0], pts[:, 1], pts[:, 2]] >= 0.5
    else:
        keep = torch.ones(pts.shape[0], dtype=torch.bool, device=half1.device)
    # unfold gives every window as a view: (D, D, D, w, w, w) windows starting at each voxel of the
    # padded map, i.e. centred at each voxel of the original.
    u1 = p1.unfold(0, window_px, 1).unfold(1, window_px, 1).unfold(2, window_px, 1)
    u2 = p2.unfold(0, window_px, 1).unfold(1, window_px, 1).unfold(2, window_px, 1)
    sel = pts[keep]
    res = torch.full((pts.shape[0],), float("nan"), dtype=torch.float64, device=half1.device)
    values = []
    for start in range(0, sel.shape[0], _WINDOWS_PER_STEP):
        q = sel[start:start + _WINDOWS_PER_STEP]
        w1 = u1[q[:, 0], q[:, 1], q[:, 2]] * window
        w2 = u2[q[:, 0], q[:, 1], q[:, 2]] * window
        values.append(crossing_resolution(fourier_shell_correlation(w1, w2), window_px, apix, threshold))
    if values:
        res[keep] = torch.cat(values)
    grid = res.reshape(n, n, n)
    # Fill skipped windows with the mean so interpolation near the mask edge stays finite.
    fill = grid[~torch.isnan(grid)].mean() if (~torch.isnan(grid)).any() else torch.tensor(0.0, dtype=grid.dtype)
    grid = torch.where(torch.isnan(grid), fill, grid)
    # align_corners puts grid point i exactly on voxel i * step; the last few voxels copy the edge.
    size = (n - 1) * step_px + 1
    full = F.interpolate(grid[None, None].to(torch.float32), size=(size,) * 3, mode="trilinear",
                         align_corners=True)
    full = F.pad(full, (0, box - size) * 3, mode="replicate")[0, 0]
    if mask is not None:
        full = torch.where(mask >= 0.5, full, torch.zeros_like(full))
    return full.contiguous()

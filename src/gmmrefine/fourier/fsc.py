"""Fourier shell and ring correlation, and resolution read off a curve."""

from __future__ import annotations

import torch

from gmmrefine.fourier.fft import radial_shell_index, rfft2_centered, rfft3_centered


def fourier_shell_correlation(map1: torch.Tensor, map2: torch.Tensor) -> torch.Tensor:
    """FSC between two cubic maps, one value per integer shell.

    Args:
        map1, map2: ``(D, D, D)`` real maps, same box.

    Returns:
        ``(D // 2 + 1,)`` float64 correlations for shells 0 .. Nyquist (shell ``s`` is frequency
        ``s / (D * apix)`` in 1/A).
    """
    box = map1.shape[-1]
    f1 = rfft3_centered(map1.to(torch.float64))
    f2 = rfft3_centered(map2.to(torch.float64))
    return _shell_correlation(f1, f2, radial_shell_index(box, 3, device=map1.device), box)


def fourier_ring_correlation(img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor:
    """FRC between two images (or batches of images), one value per integer ring.

    Args:
        img1, img2: ``(..., D, D)`` real images.

    Returns:
        ``(..., D // 2 + 1)`` float64.
    """
    box = img1.shape[-1]
    f1 = rfft2_centered(img1.to(torch.float64))
    f2 = rfft2_centered(img2.to(torch.float64))
    return _shell_correlation(f1, f2, radial_shell_index(box, 2, device=img1.device), box)


def _shell_correlation(f1: torch.Tensor, f2: torch.Tensor, shell: torch.Tensor, box: int) -> torch.Tensor:
    # Half-complex layout: the x = 0 and x = Nyquist planes hold their own conjugates, so every other
    # coefficient stands for two; weighting makes sums equal to those over the full transform.
    weight = torch.full(shell.shape, 2.0, dtype=torch.float64, device=shell.device)
    weight[..., 0] = 1.0
    if box % 2 == 0:
        weight[..., -1] = 1.0
    nshell = box // 2 + 1
    keep = shell < nshell
    idx = shell[keep]
    lead = f1.shape[: f1.ndim - shell.ndim]

    def shell_sum(x: torch.Tensor) -> torch.Tensor:
        x = (x * weight)[..., keep]
        out = torch.zeros(*lead, nshell, dtype=torch.float64, device=x.device)
        return out.index_add_(-1, idx, x)

    cross = shell_sum((f1 * f2.conj()).real)
    p1 = shell_sum(f1.abs() ** 2)
    p2 = shell_sum(f2.abs() ** 2)
    return cross / torch.sqrt(p1 * p2).clamp_min(1e-30)


def shell_frequencies(box: int, apix: float) -> torch.Tensor:
    """Spatial frequency of each integer shell in 1/A: ``(D // 2 + 1,)``."""
    return torch.arange(box // 2 + 1, dtype=torch.float64) / (box * apix)


def resolution_at(curve: torch.Tensor, box: int, apix: float, threshold: float = 0.143) -> float:
    """Resolution (A) where a correlation curve first falls below ``threshold``.

    The crossing is interpolated linearly between shells. Shell 0 is ignored. If the curve never
    falls below the threshold the Nyquist resolution ``2 * apix`` is returned.
    """
    c = curve.detach().to(torch.float64).cpu()
    freqs = shell_frequencies(box, apix)
    for s in range(1, c.shape[0]):
        if c[s] < threshold:
            if s == 1:
                return float(1.0 / freqs[1])
            c0, c1 = float(c[s - 1]), float(c[s])
            t = (c0 - threshold) / (c0 - c1)
            f = float(freqs[s - 1]) + t * float(freqs[s] - freqs[s - 1])
            return 1.0 / f
    return 2.0 * apix

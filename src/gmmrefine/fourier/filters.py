"""Fourier filters of maps: low-pass with a cosine edge, B-factor, FSC weighting, phase randomisation.

Frequencies are those of :func:`gmmrefine.fourier.fft.freq_grid_3d` (cycles per voxel); divided by
``apix`` they are in 1/A. Shell ``s`` is frequency ``s / (D * apix)``.
"""

from __future__ import annotations

import math

import torch

from gmmrefine.fourier.fft import freq_grid_3d, irfft3_centered, radial_shell_index, rfft3_centered


def _radius_cycles(box: int, device) -> torch.Tensor:
    return freq_grid_3d(box, device=device, dtype=torch.float64).norm(dim=-1)


def low_pass(volume: torch.Tensor, resolution_A: float, apix: float, *, edge_shells: float = 2.0) -> torch.Tensor:
    """Low-pass a map to ``resolution_A`` with a raised-cosine edge ``edge_shells`` shells wide.

    The filter is 1 up to ``1/resolution - edge/2`` and 0 from ``1/resolution + edge/2`` (RELION's
    ``lowPassFilterMap``), with ``edge`` in shells of ``1 / (D apix)``.

    Args:
        volume: ``(D, D, D)`` map.

    Returns:
        ``(D, D, D)`` filtered map (same dtype).
    """
    box = volume.shape[-1]
    k = _radius_cycles(box, volume.device) / apix  # 1/A
    width = edge_shells / (box * apix)
    f0 = 1.0 / resolution_A
    t = ((k - (f0 - width / 2)) / width).clamp(0, 1)
    filt = 0.5 + 0.5 * torch.cos(math.pi * t)
    return _apply(volume, filt)


def apply_bfactor(volume: torch.Tensor, bfactor_A2: float, apix: float) -> torch.Tensor:
    """Multiply the transform by ``exp(-B |k|^2 / 4)`` (``k`` in 1/A): B > 0 blurs, B < 0 sharpens."""
    box = volume.shape[-1]
    k2 = (_radius_cycles(box, volume.device) / apix) ** 2
    return _apply(volume, torch.exp(-bfactor_A2 * k2 / 4.0))


def apply_shell_weights(volume: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply every Fourier shell ``s`` by ``weights[s]`` (shells beyond the last get 0).

    Args:
        volume: ``(D, D, D)`` map.
        weights: ``(n,)`` real weight per integer shell.
    """
    box = volume.shape[-1]
    shell = radial_shell_index(box, 3, device=volume.device)
    w = torch.zeros(max(int(shell.max()) + 1, weights.shape[0]), dtype=torch.float64, device=volume.device)
    w[: weights.shape[0]] = weights.to(device=volume.device, dtype=torch.float64)
    return _apply(volume, w[shell])


def fsc_weights(fsc: torch.Tensor) -> torch.Tensor:
    """Rosenthal & Henderson (2003) weights ``sqrt(2 FSC / (1 + FSC))`` (0 where FSC <= 0)."""
    f = fsc.to(torch.float64).clamp(min=0.0, max=1.0)
    return torch.sqrt(2 * f / (1 + f))


def randomise_phases(volume: torch.Tensor, from_shell: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace the phases of every Fourier component at shell >= ``from_shell`` by random ones.

    Amplitudes are kept. The random phases are those of the transform of white noise, so they obey
    the Hermitian symmetry of a real map and the amplitudes survive the inverse transform exactly.
    """
    box = volume.shape[-1]
    spec = rfft3_centered(volume.to(torch.float64))
    shell = radial_shell_index(box, 3, device=volume.device)
    white = torch.randn(volume.shape, generator=generator, dtype=torch.float64).to(volume.device)
    phase = torch.angle(rfft3_centered(white))
    rand = torch.polar(spec.abs(), phase)
    spec = torch.where(shell >= from_shell, rand, spec)
    return irfft3_centered(spec, box).to(volume.dtype)


def radial_amplitude(volume: torch.Tensor) -> torch.Tensor:
    """Mean Fourier amplitude per integer shell: ``(D // 2 + 1,)`` float64."""
    box = volume.shape[-1]
    spec = rfft3_centered(volume.to(torch.float64)).abs()
    shell = radial_shell_index(box, 3, device=volume.device)
    n = box // 2 + 1
    keep = shell < n
    total = torch.zeros(n, dtype=torch.float64, device=volume.device).index_add_(0, shell[keep], spec[keep])
    count = torch.zeros(n, dtype=torch.float64, device=volume.device).index_add_(
        0, shell[keep], torch.ones_like(spec[keep]))
    return total / count.clamp_min(1)


def _apply(volume: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    box = volume.shape[-1]
    spec = rfft3_centered(volume.to(torch.float64)) * filt
    return irfft3_centered(spec, box).to(volume.dtype)

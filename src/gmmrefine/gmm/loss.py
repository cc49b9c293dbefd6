"""Fourier ring correlations over a band: the refinement objectives (higher is better)."""

from __future__ import annotations

import torch


def ring_sums(values: torch.Tensor, ring_index: torch.Tensor, n_rings: int) -> torch.Tensor:
    """Sums of per-pixel values over the rings of a band.

    Args:
        values: ``(..., P)`` real values at the band pixels.
        ring_index: ``(P,)`` ring of each pixel (``band.ring_index``).
        n_rings: number of rings.

    Returns:
        ``(..., n_rings)``.
    """
    out = torch.zeros(*values.shape[:-1], n_rings, dtype=values.dtype, device=values.device)
    # scatter_add (the same sums as index_add) is 1.5x faster forward and backward on CPU (measured,
    # batch 16, 8,000 pixels)
    return out.scatter_add(-1, ring_index.expand_as(values), values)


def ring_correlations(projections: torch.Tensor, particles: torch.Tensor, ring_index: torch.Tensor, n_rings: int,
                      eps: float = 1e-20) -> torch.Tensor:
    """Correlation of projections and particle images in each ring of a band.

    Each ring is normalised on its own, so CTF amplitudes do not matter once particles are
    phase-flipped. Pixels are the non-redundant half-plane pixels of a
    :class:`~gmmrefine.gmm.project.FourierBand`, so each counts once and the ring sums equal those
    of the full transform (up to a factor 2 common to all three sums).

    Args:
        projections: ``(B, P)`` complex band coefficients (e.g. :func:`~gmmrefine.gmm.project.project_gmm`).
        particles: ``(B, P)`` complex, same pixels (``band.gather(rfft2_centered(images))``).
        ring_index: ``(P,)`` ring of each pixel in ``0..n_rings-1`` (``band.ring_index``).
        n_rings: number of rings (``band.n_rings``); rings with no power count as 0.

    Returns:
        ``(B, n_rings)``, differentiable in both inputs.
    """
    cross = (projections.real * particles.real + projections.imag * particles.imag)
    p_proj = projections.real**2 + projections.imag**2
    p_part = particles.real**2 + particles.imag**2
    sums = ring_sums(torch.stack([cross, p_proj, p_part], 1), ring_index, n_rings)  # (B, 3, R)
    return sums[:, 0] / torch.sqrt(sums[:, 1] * sums[:, 2] + eps)


def frc_loss(projections: torch.Tensor, particles: torch.Tensor, ring_index: torch.Tensor, n_rings: int,
             eps: float = 1e-20, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-particle FRC score over a band: the mean of the ring correlations (the paper's), or their sum
    weighted by ``weights`` (``(B, n_rings)`` or ``(n_rings,)``; :func:`gmmrefine.refine.snr.ring_weights`).

    Returns:
        ``(B,)``, differentiable in both inputs.
    """
    frc = ring_correlations(projections, particles, ring_index, n_rings, eps)
    return frc.mean(-1) if weights is None else (frc * weights).sum(-1)

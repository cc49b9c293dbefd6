"""Fourier ring correlation over a band: the refinement objective (higher is better)."""

from __future__ import annotations

import torch


def frc_loss(projections: torch.Tensor, particles: torch.Tensor, ring_index: torch.Tensor, n_rings: int,
             eps: float = 1e-20) -> torch.Tensor:
    """Per-particle mean of the ring correlations between projections and particle images.

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
        ``(B,)`` mean FRC over the rings, differentiable in both inputs.
    """
    cross = (projections.real * particles.real + projections.imag * particles.imag)
    p_proj = projections.real**2 + projections.imag**2
    p_part = particles.real**2 + particles.imag**2
    stacked = torch.stack([cross, p_proj, p_part], 1)  # (B, 3, P)
    sums = torch.zeros(*stacked.shape[:2], n_rings, dtype=stacked.dtype, device=stacked.device)
    # scatter_add (the same sums as index_add) is 1.5x faster forward and backward on CPU (measured,
    # batch 16, 8,000 pixels)
    sums = sums.scatter_add(2, ring_index.expand_as(stacked), stacked)
    frc = sums[:, 0] / torch.sqrt(sums[:, 1] * sums[:, 2] + eps)
    return frc.mean(-1)

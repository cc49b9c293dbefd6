"""How much each Fourier ring of a particle tells about its pose: per-ring SNR, expected correlations
and the likelihood weights of the refinement objective.

Model. In ring ``r`` a particle's band coefficients are ``x = a y + n``: the reference projection ``y``
(times the CTF) scaled, plus white noise. Its correlation with the reference at the true pose is then
``rho = sqrt(snr / (1 + snr))`` with ``snr`` the ring's signal-to-noise ratio, and the log-likelihood of a
pose, as a function of the ring correlation ``c`` it gives (the ring's ``n`` complex pixels are ``2 n``
real samples; the norms of ``x`` and of the projection do not depend on the pose), is

    log L = const + sum_r w_r c_r,    w_r = 2 n_r rho_r / (1 - rho_r^2),

so the SNR-weighted objective is the log-likelihood of the pose: rings with signal count by their
pixels and SNR, noise-only rings not at all, and its curvature is the Fisher information of the pose
(``gmmrefine.refine.poses``). With the paper's unweighted mean FRC every ring counts the same, however
noisy.

The CTF sets each particle's SNR per ring: with signal-to-noise ``s_r`` of the CTF-free signal, a
particle whose ring has CTF moments ``m1 = <|CTF|>`` and ``m2 = <CTF^2>`` has

    rho^2 = s m2 / (1 + s m2)     (projections multiplied by the CTF: ``--ctf full``; the matched filter)
    rho^2 = s m1^2 / (1 + s m2)   (phase-flipped particles: ``--ctf flip``; pixels near CTF zeros add noise)

``s_r`` is measured, not assumed: the mean ring correlation of a sample of the half's own particles at
their current poses against the half's own GMM (:func:`fit_ring_snr`), so it folds in the reference's
own errors and the poses' current errors (high-frequency rings count more as poses improve), and
half 1's weights never depend on half 2.
"""

from __future__ import annotations

import torch

from gmmrefine.gmm.loss import ring_sums

#: Comparisons of a GMM projection with a particle image (``--ctf``).
CTF_MODES = ("flip", "full")
#: Largest expected correlation used in a weight (``1 - rho^2`` in the denominator).
RHO_MAX = 0.995
_LOG10_SNR_RANGE = (-8.0, 4.0)


def ring_pixel_counts(ring_index: torch.Tensor, n_rings: int) -> torch.Tensor:
    """``(n_rings,)`` band pixels per ring (float32)."""
    ones = torch.ones(ring_index.shape, dtype=torch.float32, device=ring_index.device)
    return ring_sums(ones, ring_index, n_rings)


def ring_ctf_moments(ctf_band: torch.Tensor | None, ring_index: torch.Tensor, n_rings: int,
                     batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Ring means of ``|CTF|`` and ``CTF^2`` per particle.

    Args:
        ctf_band: ``(B, P)`` real CTF at the band pixels (``band.gather(ctf)``), or None (no CTF: ones).
        ring_index, n_rings: the band's rings.
        batch: ``B`` when ``ctf_band`` is None.

    Returns:
        ``(m1, m2)``, each ``(B, n_rings)`` float32.
    """
    counts = ring_pixel_counts(ring_index, n_rings).clamp(min=1)
    if ctf_band is None:
        ones = torch.ones(batch, n_rings, device=ring_index.device)
        return ones, ones.clone()
    c = ctf_band.to(torch.float32)
    sums = ring_sums(torch.stack([c.abs(), c * c], 1), ring_index, n_rings)
    return sums[:, 0] / counts, sums[:, 1] / counts


def _signal_factors(m1: torch.Tensor, m2: torch.Tensor, ctf_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(num, den)`` with ``rho^2 = s num / (1 + s den)`` for the CTF mode (see the module docstring)."""
    if ctf_mode not in CTF_MODES:
        raise ValueError(f"ctf_mode must be one of {CTF_MODES}, got {ctf_mode!r}")
    return (m2 if ctf_mode == "full" else m1 * m1), m2


def expected_correlation(ring_snr: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, ctf_mode: str) -> torch.Tensor:
    """Expected ring correlation ``rho`` of each particle with its reference at the true pose.

    Args:
        ring_snr: ``(n_rings,)`` SNR ``s_r`` of the CTF-free signal (:func:`fit_ring_snr`).
        m1, m2: ``(B, n_rings)`` the particles' CTF moments (:func:`ring_ctf_moments`).
        ctf_mode: ``"flip"`` or ``"full"``.

    Returns:
        ``(B, n_rings)`` in ``[0, RHO_MAX]``.
    """
    num, den = _signal_factors(m1, m2, ctf_mode)
    s = ring_snr.to(num)[None].clamp(min=0)
    return torch.sqrt(s * num / (1 + s * den)).clamp(max=RHO_MAX)


def ring_weights(rho: torch.Tensor, ring_index: torch.Tensor, n_rings: int) -> torch.Tensor:
    """Log-likelihood weights ``w_r = 2 n_r rho_r / (1 - rho_r^2)`` of the ring correlations.

    Args:
        rho: ``(B, n_rings)`` expected correlations (:func:`expected_correlation`).

    Returns:
        ``(B, n_rings)`` float32.
    """
    counts = ring_pixel_counts(ring_index, n_rings).to(rho)
    rho = rho.clamp(0, RHO_MAX)
    return 2 * counts * rho / (1 - rho * rho)


def fit_ring_snr(correlations: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, ctf_mode: str,
                 iterations: int = 60) -> torch.Tensor:
    """Per-ring SNR ``s_r`` whose expected correlations match the measured mean ring correlations.

    Solves ``mean_i rho(s_r; m_ir) = mean_i c_ir`` for every ring by bisection on ``log s`` (the left
    side grows with ``s``); rings whose mean correlation is not positive get ``s = 0`` (no weight).

    Args:
        correlations: ``(M, n_rings)`` ring correlations of ``M`` particles with their reference at their
            current poses (:func:`gmmrefine.gmm.loss.ring_correlations`).
        m1, m2: ``(M, n_rings)`` their CTF moments.
        ctf_mode: ``"flip"`` or ``"full"``.

    Returns:
        ``(n_rings,)`` float64.
    """
    target = correlations.to(torch.float64).mean(0)
    num, den = (t.to(torch.float64) for t in _signal_factors(m1, m2, ctf_mode))
    lo = torch.full_like(target, _LOG10_SNR_RANGE[0])
    hi = torch.full_like(target, _LOG10_SNR_RANGE[1])
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        s = (10.0 ** mid)[None]
        mean_rho = torch.sqrt(s * num / (1 + s * den)).mean(0)
        above = mean_rho > target
        hi = torch.where(above, mid, hi)
        lo = torch.where(above, lo, mid)
    snr = 10.0 ** (0.5 * (lo + hi))
    return torch.where(target > 0, snr, torch.zeros_like(snr))

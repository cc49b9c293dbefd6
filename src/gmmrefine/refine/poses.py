"""Per-particle pose refinement against a GMM: Fisher scoring on the pose's log-likelihood (``newton``,
the default), or the paper's Adam on the FRC (``paper``).

Each particle ``i`` starts at its current rotation ``A0_i`` (RELION matrix) and image translation
``t0_i`` (px). Updates are a rotation vector applied in the view frame and a translation,

    A_i = axis_angle_to_matrix(w_i) @ A0_i,   t_i = t0_i + dt_i,

so the x, y components of ``w`` tilt the particle out of the image plane, z turns it in plane, and no
Euler angle is ever optimised (no gimbal lock near tilt 0).

**The objective.** ``objective="snr"`` (default) is the sum over the band's rings of the ring
correlations weighted by their log-likelihood weights ``w_r = 2 n_r rho_r / (1 - rho_r^2)``, with
``rho_r`` the correlation a ring of this particle is expected to have with its reference at the true
pose, measured on the half's own particles and the particle's own CTF (:mod:`gmmrefine.refine.snr`).
So the objective is the pose's log-likelihood: noise-only rings do not count, and its curvature is
the Fisher information of the pose. ``objective="frc"`` is the paper's unweighted mean FRC. With
``--ctf full`` (default) the projections are multiplied by each particle's CTF, the matched filter;
``--ctf flip`` compares with phase-flipped particles (the paper's). Measured on an independent tuning
set (adk, 1,000 particles, box 128, SNR 0.03, poses 3 degrees / 1 A off): flip 1.61 degrees, full 1.48,
paper 1.75 after three iterations.

**The Newton optimiser.** Per step, the projections and their derivatives with respect to the five
pose parameters come from four GMM projections
(:func:`~gmmrefine.gmm.project.project_gmm_with_pose_jacobian`, no autograd); the gradient ``g`` and the
Fisher information ``H`` follow in closed form, and the step solves ``(H + L + mu diag) d = g - L m``,
with ``L`` the precision of a Gaussian prior on the call's move ``m`` (``prior_deg`` per rotation axis,
``prior_A`` per shift axis, centred on the call's start). A step is taken only if it raises the
objective plus the log prior; otherwise ``mu`` grows and the next step is shorter. A particle stops
when its step is shorter than ``tolerance`` posterior standard deviations (measured: 4.2 steps on
average at SNR 0.03, box 128). So a particle at its optimum stays there, one whose images barely
constrain it moves about as far as its evidence outweighs the prior, and ``H^-1`` at the end is the
covariance of its pose (:func:`pose_precision`). Cost: four forward projections per step (one for a step
shorter than the tolerance, which ends the particle if it is taken) and no
backward pass; on the benchmark data it refines 246 particles/s where the paper's 10 Adam steps do 210
(2 threads, 1,319 Gaussians, K = 37).

**The paper's optimiser.** Adam moves every parameter by about ``lr`` per step whatever the gradient's
scale, so ``steps * lr`` bounds each component's move per call. As EMAN2 (TensorFlow, 10 steps at lr
1e-3) the rotation parameter is in units of ``rotation_unit_rad = 2`` radians (EMAN2 spin vectors) and
the shift in fractions of the box: up to ~2 degrees per call (1.75 +/- 0.2 degrees measured on 160 adk
particles at SNR 10; 1.70 +/- 0.22 on three unrelated data sets), whether the images call for it or not.
From the true poses it random-walks away (``tests/test_refine_newton.py``: 1.44 -> 1.92 degrees in
three calls at SNR 3, where Newton settles at 0.99, its precision being 1.06).

Particles never interact: a particle's result does not depend on which other particles share its
batch (``batch`` only trades memory for speed), and halves can be refined in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix
from gmmrefine.gmm.loss import frc_loss, ring_correlations, ring_sums
from gmmrefine.gmm.project import FourierBand, project_gmm, project_gmm_with_pose_jacobian
from gmmrefine.refine.snr import ring_weights

#: Paper defaults (Chen, Schmid & Chiu 2024, Methods): Adam, 10 steps, learning rate 1e-3, 16 per batch.
DEFAULT_STEPS = 10
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 16
#: Radians of rotation per unit of the rotation parameter (EMAN2 spin vector: sin(angle/2) ~ angle/2).
DEFAULT_ROTATION_UNIT_RAD = 2.0


#: Pose optimisers (``--optimiser``): the paper's Adam, or Fisher scoring with a prior and a line search.
OPTIMISERS = ("newton", "paper")
#: Refinement objectives (``--objective``): the SNR-weighted ring correlation (log-likelihood), or the
#: paper's unweighted mean FRC.
OBJECTIVES = ("snr", "frc")
#: Newton steps per particle and iteration at most (most particles stop earlier, see PoseSettings).
DEFAULT_NEWTON_STEPS = 8
#: Prior on one iteration's move, per rotation axis (degrees) and shift axis (angstrom).
DEFAULT_PRIOR_DEG = 2.0
DEFAULT_PRIOR_A = 1.5


@dataclass(frozen=True)
class PoseSettings:
    """Optimiser settings.

    Attributes:
        steps: Adam steps per particle (``paper``), or the most Newton steps (``newton``); None: 10 for
            ``paper`` (the paper's), :data:`DEFAULT_NEWTON_STEPS` for ``newton``.
        lr: Adam learning rate (in parameter units, see the module docstring).
        batch: particles projected together (memory / speed only; results do not depend on it). None
            (``--batch auto``): the caller chooses (``global_refine.resolve_batch``: from the free
            memory of a CUDA device, else :data:`DEFAULT_BATCH`); :func:`refine_poses` takes None as
            :data:`DEFAULT_BATCH`.
        rotation_unit_rad: radians of rotation per unit of the rotation parameter (Adam).
        translation_unit_px: pixels of translation per unit of the shift parameter (Adam); None means
            the box size (shifts in fractions of the box, as EMAN2).
        betas: Adam's moment decay rates.
        eps: Adam's denominator guard.
        optimiser: ``"newton"`` (Fisher scoring, see :func:`refine_poses`) or ``"paper"`` (Adam).
        objective: ``"snr"`` (ring correlations weighted by their log-likelihood weights,
            :mod:`gmmrefine.refine.snr`) or ``"frc"`` (the paper's mean FRC).
        prior_deg, prior_A: standard deviation of the Gaussian prior on one call's move (``newton``),
            per rotation axis in degrees and per shift axis in angstrom: a particle whose images
            constrain it less than this moves less than this.
        tolerance: a particle stops when its Newton step is shorter than this many posterior standard
            deviations.
    """

    steps: int | None = None
    lr: float = DEFAULT_LR
    batch: int | None = DEFAULT_BATCH
    rotation_unit_rad: float = DEFAULT_ROTATION_UNIT_RAD
    translation_unit_px: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimiser: str = "newton"
    objective: str = "snr"
    prior_deg: float = DEFAULT_PRIOR_DEG
    prior_A: float = DEFAULT_PRIOR_A
    tolerance: float = 0.2

    @property
    def n_steps(self) -> int:
        if self.steps is not None:
            return int(self.steps)
        return DEFAULT_NEWTON_STEPS if self.optimiser == "newton" else DEFAULT_STEPS

    @property
    def needs_snr(self) -> bool:
        """Whether the per-ring SNR must be measured first (weights or Fisher information)."""
        return self.objective == "snr" or self.optimiser == "newton"


@dataclass
class PoseResult:
    """Refined poses of ``N`` particles.

    Attributes:
        rotations: ``(N, 3, 3)`` refined RELION matrices.
        translation_px: ``(N, 2)`` refined image translations (content moves by ``+t``), pixels.
        frc_start: ``(N,)`` band FRC (unweighted mean) at the starting pose.
        frc_end: ``(N,)`` band FRC at the refined pose.
        covariance: ``(N, 5, 5)`` covariance of the refined pose (``newton``: the inverse of the Fisher
            information of its images) in radians (view-frame rotation) and pixels, or None.
        steps: ``(N,)`` Newton steps taken (accepted or not), or None.
    """

    rotations: torch.Tensor
    translation_px: torch.Tensor
    frc_start: torch.Tensor
    frc_end: torch.Tensor
    covariance: torch.Tensor | None = None
    steps: torch.Tensor | None = None


def particle_band(images: torch.Tensor, band: FourierBand, ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Phase-flipped band coefficients of particle images, as the optimiser compares them.

    Args:
        images: ``(B, D, D)`` particle images, not shifted (the optimiser's translations stand for
            the whole origin: pass ``image_translation_px(shift_A, apix)`` as the start), or their
            complex ``(B, D, D//2+1)`` :func:`~gmmrefine.fourier.fft.rfft2_centered` spectra.
        band: the Fourier pixels compared.
        ctf: ``(B, D, D//2+1)`` real CTF of each image (RELION convention), or None (no flip).

    Returns:
        ``(B, P)`` complex64.
    """
    from gmmrefine.fourier.ctf import phase_flip
    from gmmrefine.fourier.fft import rfft2_centered

    spectra = images if images.is_complex() else rfft2_centered(images.to(torch.float32))
    if ctf is not None:
        spectra = phase_flip(spectra, ctf.to(device=spectra.device, dtype=torch.float32))
    return band.gather(spectra).to(torch.complex64)


def ring_correlations_at(gmm, particles: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor,
                         band: FourierBand, *, ctf: torch.Tensor | None = None, batch: int = 64) -> torch.Tensor:
    """Ring correlations of particles with the GMM at the given poses (no gradients): what
    :func:`gmmrefine.refine.snr.fit_ring_snr` measures the per-ring SNR from.

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture`.
        particles: ``(N, P)`` complex band coefficients (:func:`particle_band`).
        rotations: ``(N, 3, 3)``; translation_px: ``(N, 2)``.
        ctf: optional ``(N, P)`` CTF multiplying the projections (``--ctf full``).

    Returns:
        ``(N, n_rings)`` float32.
    """
    gmm = gmm.detach().to(device=particles.device, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for s in range(0, particles.shape[0], batch):
            sl = slice(s, s + batch)
            proj = project_gmm(gmm, rotations[sl].to(torch.float32), translation_px[sl].to(torch.float32), band)
            if ctf is not None:
                proj = proj * ctf[sl]
            out.append(ring_correlations(proj, particles[sl], band.ring_index, band.n_rings))
    return torch.cat(out) if out else torch.zeros(0, band.n_rings, device=particles.device)


def refine_poses(gmm, particles: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor,
                 band: FourierBand, settings: PoseSettings = PoseSettings(),
                 ctf: torch.Tensor | None = None, rho: torch.Tensor | None = None) -> PoseResult:
    """Refine the poses of ``N`` particles against ``gmm``.

    ``settings.optimiser`` chooses how:

    * ``"paper"``: Adam, ``steps`` steps of ``lr`` (module docstring), on the objective.
    * ``"newton"``: Fisher scoring on the SNR-weighted objective (the log-likelihood of the pose,
      :mod:`gmmrefine.refine.snr`) plus a Gaussian prior on the move (``prior_deg``, ``prior_A``, centred
      on the starting pose). Each step solves ``(H + L + mu diag) d = g - L m`` with ``g`` the
      gradient, ``H = sum_r w_r rho_r G_r`` the Fisher information (``G_r``: Gram matrix of the
      ring-normalised projection's derivatives, :func:`~gmmrefine.gmm.project.project_gmm_with_pose_jacobian`),
      ``L`` the prior's precision and ``m`` the move so far; a step is taken only if it raises the
      objective plus the log prior (else ``mu`` grows and the step shrinks). So a particle at its
      optimum stays there, one that its images barely constrain moves about as far as the evidence
      outweighs the prior, and the inverse of ``H`` at the end is the covariance of its pose. A
      particle stops when its step is below ``tolerance`` posterior standard deviations; the batch ends
      when all have stopped or after ``steps`` steps.

    Particles never interact: a particle's result does not depend on the others in its batch.

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture` of the particles' own half (not modified;
            its tensors are detached).
        particles: ``(N, P)`` complex band coefficients of the phase-flipped images (:func:`particle_band`).
        rotations: ``(N, 3, 3)`` starting RELION matrices.
        translation_px: ``(N, 2)`` starting image translations (``image_translation_px(shift_A, apix)``).
        band: the Fourier band compared (``band.box`` is the image box).
        settings: optimiser settings.
        ctf: optional ``(N, P)`` real CTF at the band pixels (``band.gather(ctf)``); when given, the
            projections are multiplied by it (``--ctf full``: compare with particles that were not
            phase-flipped) instead of comparing with phase-flipped particles.
        rho: ``(N, n_rings)`` expected ring correlations at the true pose
            (:func:`gmmrefine.refine.snr.expected_correlation`), used by the ``snr`` objective and the
            ``newton`` optimiser; None measures them from these particles at their starting poses
            (:func:`gmmrefine.refine.snr.fit_ring_snr`; the CTF moments from ``ctf`` if given, else ones),
            so pass one half set's particles.

    Returns:
        :class:`PoseResult` (float32, on the particles' device).
    """
    if settings.optimiser not in OPTIMISERS:
        raise ValueError(f"optimiser must be one of {OPTIMISERS}, got {settings.optimiser!r}")
    if settings.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {settings.objective!r}")
    device = particles.device
    if settings.needs_snr and rho is None:
        rho = _own_rho(gmm, particles, rotations, translation_px, band, ctf)
    gmm = gmm.detach().to(device=device, dtype=torch.float32)
    rot0_all = rotations.to(device=device, dtype=torch.float32)
    t0_all = translation_px.to(device=device, dtype=torch.float32)
    n = particles.shape[0]
    out = PoseResult(torch.empty_like(rot0_all), torch.empty_like(t0_all),
                     torch.empty(n, device=device, dtype=torch.float32),
                     torch.empty(n, device=device, dtype=torch.float32))
    if settings.optimiser == "newton":
        out.covariance = torch.empty(n, 5, 5, device=device, dtype=torch.float32)
        out.steps = torch.empty(n, device=device, dtype=torch.int64)
    batch = max(int(settings.batch or DEFAULT_BATCH), 1)
    for s in range(0, n, batch):
        sl = slice(s, min(s + batch, n))
        weight = None if ctf is None else ctf[sl].to(device=device, dtype=torch.float32)
        rho_b = None if rho is None else rho[sl].to(device=device, dtype=torch.float32)
        step = _newton_batch if settings.optimiser == "newton" else _adam_batch
        step(gmm, particles[sl], rot0_all[sl], t0_all[sl], band, settings, weight, rho_b, out, sl)
    return out


def _own_rho(gmm, particles, rotations, translation_px, band, ctf) -> torch.Tensor:
    """Expected ring correlations measured on the particles themselves (see :func:`refine_poses`)."""
    from gmmrefine.refine.snr import expected_correlation, fit_ring_snr, ring_ctf_moments

    corr = ring_correlations_at(gmm, particles, rotations, translation_px, band, ctf=ctf)
    m1, m2 = ring_ctf_moments(ctf, band.ring_index, band.n_rings, batch=particles.shape[0])
    mode = "flip" if ctf is None else "full"
    return expected_correlation(fit_ring_snr(corr, m1, m2, mode).to(torch.float32), m1, m2, mode)


def _adam_batch(gmm, target, rot0, t0, band, settings, weight, rho, out: PoseResult, sl: slice) -> None:
    """The paper's optimiser on one batch (see the module docstring), results into ``out[sl]``."""
    unit_px = float(band.box if settings.translation_unit_px is None else settings.translation_unit_px)
    ring_w = None if settings.objective == "frc" else ring_weights(rho, band.ring_index, band.n_rings)
    params = torch.zeros(target.shape[0], 5, device=target.device, dtype=torch.float32)
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)

    def project(rot, t):
        proj = project_gmm(gmm, rot, t, band)
        return proj if weight is None else proj * weight

    for step in range(1, settings.n_steps + 1):
        params.requires_grad_(True)
        rot = axis_angle_to_matrix(params[:, :3] * settings.rotation_unit_rad) @ rot0
        rings = ring_correlations(project(rot, t0 + params[:, 3:] * unit_px), target, band.ring_index, band.n_rings)
        score = rings.mean(-1) if ring_w is None else (rings * ring_w).sum(-1)
        (grad,) = torch.autograd.grad(-score.sum(), params)
        if step == 1:
            out.frc_start[sl] = rings.detach().mean(-1)
        params = adam_step_(params, grad, m, v, step, settings.lr, settings.betas, settings.eps)
    with torch.no_grad():
        out.rotations[sl] = axis_angle_to_matrix(params[:, :3] * settings.rotation_unit_rad) @ rot0
        out.translation_px[sl] = t0 + params[:, 3:] * unit_px
        out.frc_end[sl] = frc_loss(project(out.rotations[sl], out.translation_px[sl]), target, band.ring_index,
                                   band.n_rings)
    if settings.n_steps == 0:
        out.frc_start[sl] = out.frc_end[sl]


def adam_step_(params: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
               betas: tuple[float, float], eps: float) -> torch.Tensor:
    """One elementwise Adam step (``step`` counts from 1) on detached ``params``, moments ``m``, ``v``
    updated in place: each element moves by about ``lr`` whatever the gradient's scale.

    Returns:
        The updated parameters (detached; ``params`` itself, modified in place).
    """
    b1, b2 = betas
    with torch.no_grad():
        params = params.detach()
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2**step)).sqrt_().add_(eps)
        return params.addcdiv_(m, denom, value=-lr / (1 - b1**step))


@dataclass
class _Fit:
    """Objective, gradient and Fisher information of a batch at its current poses (Newton)."""

    score: torch.Tensor     # (B,) sum_r w_r c_r
    frc: torch.Tensor       # (B,) mean_r c_r
    grad: torch.Tensor      # (B, 5)
    fisher: torch.Tensor    # (B, 5, 5) float64


def _ring_correlations(x: torch.Tensor, y: torch.Tensor, target_power: torch.Tensor, band: FourierBand
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c, s_xy, s_yy, norm)`` per ring of targets ``x`` and projections ``y`` (``(B, 2P)`` real views):
    the one computation of the score's ring sums, for :func:`_fit_at` and :func:`_score_at` alike."""
    ri2 = band.ring_index.repeat_interleave(2)
    s_xy = ring_sums(x * y, ri2, band.n_rings)                 # (B, R)
    s_yy = ring_sums(y * y, ri2, band.n_rings).clamp(min=1e-30)
    norm = torch.sqrt(target_power * s_yy).clamp(min=1e-30)
    return s_xy / norm, s_xy, s_yy, norm


def _score_at(gmm, target, target_power, rot, t, band, weight, ring_w) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, frc)`` of :class:`_Fit` alone: one projection instead of the four of :func:`_fit_at`."""
    proj = project_gmm(gmm, rot, t, band)
    if weight is not None:
        proj = proj * weight
    c, *_ = _ring_correlations(torch.view_as_real(target).flatten(-2), torch.view_as_real(proj).flatten(-2),
                               target_power, band)
    return (ring_w * c).sum(-1), c.mean(-1)


def _fit_at(gmm, target, target_power, rot, t, band, weight, ring_w, rho) -> _Fit:
    """:class:`_Fit` of particles ``target`` at poses ``(rot, t)`` (no autograd: the Jacobian is analytic).

    With ring sums ``S_xy, S_yy`` and ``S_yd`` (of ``Re x conj(y)``, ``|y|^2``, ``Re y conj(dy)``), the
    gradient of ``sum_r w_r S_xy / sqrt(S_xx S_yy)`` is one sum over pixels of ``dy`` against
    ``a_r x - b_r y``, and the Fisher information ``sum_r w_r rho_r (S_dd - S_yd S_yd^T / S_yy) / S_yy``
    one weighted Gram matrix of ``dy`` over pixels minus a sum over rings: two small batched matrix
    products instead of ring sums of every product.
    """
    proj, jac = project_gmm_with_pose_jacobian(gmm, rot, t, band)
    if weight is not None:
        proj = proj * weight
        jac = jac * weight[:, None]
    y = torch.view_as_real(proj).flatten(-2)                  # (B, 2P): real, imag interleaved
    dy = torch.view_as_real(jac).flatten(-2)                  # (B, 5, 2P)
    x = torch.view_as_real(target).flatten(-2)
    ri2 = band.ring_index.repeat_interleave(2)
    c, s_xy, s_yy, norm = _ring_correlations(x, y, target_power, band)   # (B, R) each
    s_yd = ring_sums(y[:, None] * dy, ri2, band.n_rings)      # (B, 5, R)
    a = ring_w / norm                                         # d/dy of w S_xy / norm: a x - b y
    b = a * s_xy / s_yy
    grad = torch.bmm(dy, (a[:, ri2] * x - b[:, ri2] * y)[..., None]).squeeze(-1)
    f = (ring_w * rho / s_yy).to(torch.float64)               # (B, R)
    dy64 = dy.to(torch.float64)
    fisher = torch.bmm(dy64 * f[:, None, ri2], dy64.transpose(1, 2))
    s_yd64 = s_yd.to(torch.float64)
    fisher -= torch.bmm(s_yd64 * (f / s_yy)[:, None], s_yd64.transpose(1, 2))
    return _Fit(score=(ring_w * c).sum(-1), frc=c.mean(-1), grad=grad, fisher=fisher)


def _newton_batch(gmm, target, rot0, t0, band, settings, weight, rho, out: PoseResult, sl: slice) -> None:
    """Fisher scoring with a prior and accept-only-improvements steps on one batch (see
    :func:`refine_poses`), results into ``out[sl]``."""
    b = target.shape[0]
    device = target.device
    ring_w = ring_weights(rho, band.ring_index, band.n_rings)
    target_power = ring_sums(target.real**2 + target.imag**2, band.ring_index, band.n_rings)
    prior_sd = torch.tensor([math.radians(settings.prior_deg)] * 3 + [settings.prior_A / band.apix] * 2,
                            dtype=torch.float64, device=device)
    prior = torch.diag(prior_sd**-2)                                     # (5, 5)
    rot, t = rot0.clone(), t0.clone()
    moved = torch.zeros(b, 5, dtype=torch.float64, device=device)       # the move so far (tangent)
    fit = _fit_at(gmm, target, target_power, rot, t, band, weight, ring_w, rho)
    out.frc_start[sl] = fit.frc
    mu = torch.zeros(b, dtype=torch.float64, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    steps = torch.zeros(b, dtype=torch.int64, device=device)
    for _ in range(settings.n_steps):
        idx = torch.nonzero(active).squeeze(1)
        if idx.numel() == 0:
            break
        h = fit.fisher[idx] + prior
        rhs = fit.grad[idx].to(torch.float64) - moved[idx] @ prior
        damped = h + mu[idx, None, None] * torch.diag_embed(torch.diagonal(h, dim1=-2, dim2=-1))
        d = torch.linalg.solve(damped, rhs)                              # (n, 5)
        rot_t = axis_angle_to_matrix(d[:, :3]).to(torch.float32) @ rot[idx]
        t_t = t[idx] + d[:, 3:].to(torch.float32)
        # converged: an accepted step shorter than `tolerance` posterior standard deviations
        length2 = (d * (h @ d[..., None]).squeeze(-1)).sum(-1)
        short = length2 < settings.tolerance**2
        # A short step, if accepted, ends the particle: its trial needs the score alone (one projection,
        # not four), and its precision keeps the Fisher information of the pose a fraction of a standard
        # deviation before. The poses are those of a full evaluation of every trial to float32 rounding
        # (measured at box 256, 1,000 particles, 6,646 Gaussians: one particle's step count of 2,178
        # differed, pose error equal to 1e-8 deg; full evaluations per particle 3.18 -> 2.17, the
        # optimiser's time 19.7 -> 15.2 s).
        score_t = torch.empty(idx.numel(), dtype=fit.score.dtype, device=device)
        frc_t = torch.empty_like(score_t)
        long_ = torch.nonzero(~short).squeeze(1)
        short_ = torch.nonzero(short).squeeze(1)
        trial = None
        if long_.numel():
            il = idx[long_]
            trial = _fit_at(gmm, target[il], target_power[il], rot_t[long_], t_t[long_], band,
                            None if weight is None else weight[il], ring_w[il], rho[il])
            score_t[long_], frc_t[long_] = trial.score, trial.frc
        if short_.numel():
            i_s = idx[short_]
            score_t[short_], frc_t[short_] = _score_at(gmm, target[i_s], target_power[i_s], rot_t[short_],
                                                       t_t[short_], band, None if weight is None else weight[i_s],
                                                       ring_w[i_s])
        now = fit.score[idx].to(torch.float64) - 0.5 * ((moved[idx] @ prior) * moved[idx]).sum(-1)
        moved_t = moved[idx] + d
        then = score_t.to(torch.float64) - 0.5 * ((moved_t @ prior) * moved_t).sum(-1)
        accept = then > now
        steps[idx] += 1
        done = accept & short
        a = idx[accept]
        rot[a], t[a], moved[a] = rot_t[accept], t_t[accept], moved_t[accept]
        fit.score[a], fit.frc[a] = score_t[accept], frc_t[accept]
        if trial is not None:
            took = accept[long_]
            for name in ("grad", "fisher"):
                getattr(fit, name)[idx[long_[took]]] = getattr(trial, name)[took]
        mu[idx] = torch.where(accept, mu[idx] / 4, torch.where(mu[idx] > 0, mu[idx] * 4, torch.full_like(mu[idx], 0.5)))
        mu[idx] = torch.where(mu[idx] < 1e-3, torch.zeros_like(mu[idx]), mu[idx])
        active[idx[done]] = False
    out.rotations[sl] = rot
    out.translation_px[sl] = t
    out.frc_end[sl] = fit.frc
    # The prior is centred on this call's start, which came from the same images: counting it as
    # information would be double counting, so the precision is the likelihood's alone (a vanishing
    # fraction of the prior keeps a flat direction finite).
    assert out.covariance is not None and out.steps is not None  # allocated for the newton optimiser
    out.covariance[sl] = torch.linalg.inv(fit.fisher + 1e-6 * prior).to(torch.float32)
    out.steps[sl] = steps


def pose_precision(covariance: torch.Tensor, apix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected error of each refined pose from its posterior covariance.

    Args:
        covariance: ``(N, 5, 5)`` (:attr:`PoseResult.covariance`, radians and pixels).
        apix: pixel size, A/px.

    Returns:
        ``(angle_deg, shift_A)``, each ``(N,)``: the root of the expected squared rotation angle (sum of
        the three rotation variances) and of the expected squared shift (both shift variances).
    """
    diag = torch.diagonal(covariance, dim1=-2, dim2=-1).clamp(min=0)
    return torch.rad2deg(diag[:, :3].sum(-1).sqrt()), diag[:, 3:].sum(-1).sqrt() * apix


# Bytes one particle of a pose batch needs on a CUDA device, per Gaussian and table column (K + 1):
# the separable projector keeps 16 N (K + 1) bytes of tables per particle for its backward; on the CPU
# it works through the Gaussians in chunks, and the peak RSS growth of a step measured here was
# 18.5 N (K + 1) bytes per particle (N = 4,000, K = 38 and N = 8,000, K = 72; batch 4 to 64). On CUDA
# all Gaussians go at once, so the tables, their gradients and the backward's products are alive
# together: four times the tables is assumed (not measured: no GPU here).
_CUDA_BYTES_PER_TABLE_ENTRY = 64


def batch_bytes_per_particle(n_gaussians: int, band: FourierBand, box: int) -> int:
    """Device memory one particle of a pose batch takes on CUDA (estimate; see above): projector
    tables, band coefficients and CTF (``P`` complex values each, with gradients), and the block's
    image, CTF and spectrum (``~4 D^2`` floats)."""
    return (_CUDA_BYTES_PER_TABLE_ENTRY * n_gaussians * (band.k_max + 1) + 64 * band.n_pixels
            + 16 * box * box)


def batch_for_memory(free_bytes: int, n_gaussians: int, band: FourierBand, box: int, *,
                     fraction: float = 0.5, most: int = 1024) -> int:
    """Pose batch that fills ``fraction`` of ``free_bytes`` of device memory (``--batch auto`` on
    CUDA); between 1 and ``most``. Results do not depend on the batch, only speed and memory do."""
    per = batch_bytes_per_particle(n_gaussians, band, box)
    return int(max(1, min(most, int(fraction * free_bytes) // per)))


def free_memory_bytes(device) -> int | None:
    """Free memory of a CUDA device in bytes (``torch.cuda.mem_get_info``); None for other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])

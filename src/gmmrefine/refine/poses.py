"""Per-particle pose refinement against a GMM: Adam on a rotation update and a shift update.

Each particle ``i`` starts at its current rotation ``A0_i`` (RELION matrix) and image translation
``t0_i`` (px). Its parameters are a rotation vector ``u_i`` (3 numbers) and a translation update
``w_i`` (2 numbers), both zero at the start; the pose they stand for is

    A_i = axis_angle_to_matrix(rotation_unit_rad * u_i) @ A0_i,   t_i = t0_i + translation_unit_px * w_i,

so the rotation update acts in the view frame (its x, y components tilt the particle out of the
image plane, z turns it in plane) and is never an Euler angle (no gimbal lock near tilt 0). Adam
maximises the band-limited FRC (:func:`gmmrefine.gmm.loss.frc_loss`) between the GMM projection at
``(A_i, t_i)`` and the particle's phase-flipped band coefficients.

Units, and why: Adam moves every parameter by about ``lr`` per step whatever the gradient's scale (the
first step is exactly ``lr`` times the gradient's sign), so ``lr`` means a distance in the parameters'
units, and ``steps * lr`` bounds how far one iteration can move each component. The paper (EMAN2 /
TensorFlow, 10 steps at lr 1e-3) keeps rotations as EMAN2 spin vectors (``sin(angle / 2)`` times the
axis, so one unit is ~2 radians) and translations in fractions of the box. Using the same units
(``rotation_unit_rad = 2``, ``translation_unit_px = box``) the defaults can move each rotation component
by up to 10 * 1e-3 * 2 rad = 1.15 degrees per iteration (up to ~2 degrees in all) and each shift
component by up to 0.01 box (~1 px at box 96), the scale of the paper's measured changes
(2.3 +/- 1.4 degrees and 0.7 +/- 0.5 px per refinement). Measured here (``tests/test_refine_poses.py``:
160 adk particles rendered from a 414-Gaussian GMM, box 64 at 1.8 A/px, band 40-6 A, poses 4 degrees and
1 A off): the first call moves rotations by 1.75 +/- 0.2 degrees (the bound is 1.98) and 3 calls bring
the angular error from 4.00 to 1.13 degrees at SNR 10; with a simulated adk data set (400 particles,
box 64, SNR 0.1) a full iteration of ``gmmrefine refine`` moved poses by 1.70 +/- 0.24 degrees and
0.58 +/- 0.16 px. Adam's steps stay near ``lr`` until the gradient changes sign, so most particles move
close to the bound in the first iteration and 4-degree errors need two or three iterations.

Particles never interact: the loss of particle ``i`` depends on its own parameters only and Adam is
elementwise, so the result of a particle does not depend on which other particles share its batch
(``batch`` only trades memory for speed), and halves can be refined in any order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix
from gmmrefine.gmm.loss import frc_loss
from gmmrefine.gmm.project import FourierBand, project_gmm

#: Paper defaults (Chen, Schmid & Chiu 2024, Methods): Adam, 10 steps, learning rate 1e-3, 16 per batch.
DEFAULT_STEPS = 10
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 16
#: Radians of rotation per unit of the rotation parameter (EMAN2 spin vector: sin(angle/2) ~ angle/2).
DEFAULT_ROTATION_UNIT_RAD = 2.0


@dataclass(frozen=True)
class PoseSettings:
    """Optimiser settings.

    Attributes:
        steps: Adam steps per particle.
        lr: Adam learning rate (in parameter units, see the module docstring).
        batch: particles projected together (memory / speed only; results do not depend on it). None
            (``--batch auto``): the caller chooses (``global_refine.resolve_batch``: from the free
            memory of a CUDA device, else :data:`DEFAULT_BATCH`); :func:`refine_poses` takes None as
            :data:`DEFAULT_BATCH`.
        rotation_unit_rad: radians of rotation per unit of the rotation parameter.
        translation_unit_px: pixels of translation per unit of the shift parameter; None means the box
            size (shifts in fractions of the box, as EMAN2).
        betas: Adam's moment decay rates.
        eps: Adam's denominator guard.
    """

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int | None = DEFAULT_BATCH
    rotation_unit_rad: float = DEFAULT_ROTATION_UNIT_RAD
    translation_unit_px: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class PoseResult:
    """Refined poses of ``N`` particles.

    Attributes:
        rotations: ``(N, 3, 3)`` refined RELION matrices.
        translation_px: ``(N, 2)`` refined image translations (content moves by ``+t``), pixels.
        frc_start: ``(N,)`` band FRC at the starting pose.
        frc_end: ``(N,)`` band FRC at the refined pose.
    """

    rotations: torch.Tensor
    translation_px: torch.Tensor
    frc_start: torch.Tensor
    frc_end: torch.Tensor


def particle_band(images: torch.Tensor, band: FourierBand, ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Phase-flipped band coefficients of particle images, as the optimiser compares them.

    Args:
        images: ``(B, D, D)`` particle images, not shifted (the optimiser's translations stand for
            the whole origin: pass ``image_translation_px(shift_A, apix)`` as the start).
        band: the Fourier pixels compared.
        ctf: ``(B, D, D//2+1)`` real CTF of each image (RELION convention), or None (no flip).

    Returns:
        ``(B, P)`` complex64.
    """
    from gmmrefine.fourier.ctf import phase_flip
    from gmmrefine.fourier.fft import rfft2_centered

    spectra = rfft2_centered(images.to(torch.float32))
    if ctf is not None:
        spectra = phase_flip(spectra, ctf.to(device=spectra.device, dtype=torch.float32))
    return band.gather(spectra).to(torch.complex64)


def score_poses(gmm, particles: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor,
                band: FourierBand, *, batch: int = 256, ctf: torch.Tensor | None = None) -> torch.Tensor:
    """Band FRC of each particle against the GMM at the given poses (no gradients).

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture`.
        particles: ``(N, P)`` complex band coefficients (:func:`particle_band`).
        rotations: ``(N, 3, 3)``; translation_px: ``(N, 2)``.
        ctf: optional ``(N, P)`` CTF multiplying the projections (see :func:`refine_poses`).

    Returns:
        ``(N,)`` FRC, float32.
    """
    out = []
    with torch.no_grad():
        for s in range(0, particles.shape[0], batch):
            sl = slice(s, s + batch)
            proj = project_gmm(gmm, rotations[sl], translation_px[sl], band)
            if ctf is not None:
                proj = proj * ctf[sl]
            out.append(frc_loss(proj, particles[sl], band.ring_index, band.n_rings))
    return torch.cat(out) if out else torch.zeros(0, device=particles.device)


def refine_poses(gmm, particles: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor,
                 band: FourierBand, settings: PoseSettings = PoseSettings(),
                 ctf: torch.Tensor | None = None) -> PoseResult:
    """Refine the poses of ``N`` particles by Adam on the band FRC against ``gmm``.

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

    Returns:
        :class:`PoseResult` (float32, on the particles' device).
    """
    device = particles.device
    gmm = gmm.detach().to(device=device, dtype=torch.float32)
    unit_px = float(band.box if settings.translation_unit_px is None else settings.translation_unit_px)
    rot0_all = rotations.to(device=device, dtype=torch.float32)
    t0_all = translation_px.to(device=device, dtype=torch.float32)
    n = particles.shape[0]
    out_rot = torch.empty_like(rot0_all)
    out_t = torch.empty_like(t0_all)
    frc_start = torch.empty(n, device=device, dtype=torch.float32)
    frc_end = torch.empty(n, device=device, dtype=torch.float32)
    b1, b2 = settings.betas
    batch = max(int(settings.batch or DEFAULT_BATCH), 1)
    for s in range(0, n, batch):
        sl = slice(s, min(s + batch, n))
        target, rot0, t0 = particles[sl], rot0_all[sl], t0_all[sl]
        weight = None if ctf is None else ctf[sl].to(device=device, dtype=torch.float32)
        params = torch.zeros(target.shape[0], 5, device=device, dtype=torch.float32)
        m = torch.zeros_like(params)
        v = torch.zeros_like(params)
        for step in range(1, settings.steps + 1):
            params.requires_grad_(True)
            rot = axis_angle_to_matrix(params[:, :3] * settings.rotation_unit_rad) @ rot0
            proj = project_gmm(gmm, rot, t0 + params[:, 3:] * unit_px, band)
            if weight is not None:
                proj = proj * weight
            frc = frc_loss(proj, target, band.ring_index, band.n_rings)
            (grad,) = torch.autograd.grad(-frc.sum(), params)
            if step == 1:
                frc_start[sl] = frc.detach()
            with torch.no_grad():
                params = params.detach()
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                denom = (v / (1 - b2**step)).sqrt_().add_(settings.eps)
                params.addcdiv_(m, denom, value=-settings.lr / (1 - b1**step))
        with torch.no_grad():
            out_rot[sl] = axis_angle_to_matrix(params[:, :3] * settings.rotation_unit_rad) @ rot0
            out_t[sl] = t0 + params[:, 3:] * unit_px
            proj = project_gmm(gmm, out_rot[sl], out_t[sl], band)
            if weight is not None:
                proj = proj * weight
            frc_end[sl] = frc_loss(proj, target, band.ring_index, band.n_rings)
        if settings.steps == 0:
            frc_start[sl] = frc_end[sl]
    return PoseResult(out_rot, out_t, frc_start, frc_end)


def max_rotation_per_iteration_deg(settings: PoseSettings) -> float:
    """Largest rotation one call can apply (all three components moving ``steps * lr``), degrees."""
    return math.degrees(settings.steps * settings.lr * settings.rotation_unit_rad * math.sqrt(3))


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

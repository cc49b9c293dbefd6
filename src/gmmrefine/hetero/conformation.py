"""Conformation to pose: the per-particle pose of one domain from the particle's decoded conformation.

For a particle at consensus pose ``theta_init = (A0, t0)`` whose decoder gives the GMM ``conf``, the
domain (a 0/1 mask over the Gaussians) appears in the image as ``Project(conf * mask, theta_init)``.
The pose under which the *neutral* domain looks the same is the domain's own pose, the one a
reconstruction of that domain needs:

    theta_new = argmin || Project(neutral * mask, theta) - Project(conf * mask, theta_init) ||^2

found by Adam from ``theta_init`` (paper: 30 steps, lr 1e-3), in the parametrisation of
:mod:`gmmrefine.refine.poses` (``A = exp(rotation_unit_rad * u) A0``, ``t = t0 + translation_unit_px * w``).
The norm is over the band's Fourier pixels, i.e. the band-limited real-space RMSD (Parseval).

Why the roles differ from the issue's wording (``Project(neutral, theta_init) - Project(conf,
theta_new)``): if the domain of ``conf`` is the neutral domain turned by ``R`` about a point, the
issue's objective is minimised by ``A0 R^-1`` while the image shows the neutral domain at ``A0 R``;
reconstructing at ``A0 R^-1`` would double the motion instead of removing it. ``tests/test_hetero_pose.py``
checks the direction with a known turn.

Particles never interact (per-particle loss, elementwise Adam), so batches and halves can be split freely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import FourierBand, project_band
from gmmrefine.refine.poses import adam_step_

#: Paper defaults for conformation to pose: Adam, 30 steps, learning rate 1e-3.
CONF_POSE_STEPS = 30
CONF_POSE_LR = 1e-3


@dataclass(frozen=True)
class ConformationPoseSettings:
    """Optimiser settings (units as :class:`gmmrefine.refine.poses.PoseSettings`).

    Attributes:
        steps: Adam steps.
        lr: learning rate in parameter units.
        rotation_unit_rad: radians per unit of the rotation parameter (EMAN2 spin vector: 2).
        translation_unit_px: pixels per unit of the shift parameter (None: the box).
        betas, eps: Adam's constants.
    """

    steps: int = CONF_POSE_STEPS
    lr: float = CONF_POSE_LR
    rotation_unit_rad: float = 2.0
    translation_unit_px: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ConformationPoseResult:
    """``rotations (B, 3, 3)``, ``translation_px (B, 2)`` of the domain; ``rmsd_start``, ``rmsd_end``
    ``(B,)`` band RMSD (projection units) at ``theta_init`` and at the result."""

    rotations: torch.Tensor
    translation_px: torch.Tensor
    rmsd_start: torch.Tensor
    rmsd_end: torch.Tensor


def _rmsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a - b
    return (d.real * d.real + d.imag * d.imag).mean(-1).sqrt()


def conformation_to_pose(neutral: GaussianMixture, conf_centers_A: torch.Tensor, conf_amplitudes: torch.Tensor,
                         domain: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor,
                         band: FourierBand, settings: ConformationPoseSettings = ConformationPoseSettings()
                         ) -> ConformationPoseResult:
    """Per-particle pose of a domain from decoded conformations.

    Args:
        neutral: the half's neutral GMM (``N`` Gaussians).
        conf_centers_A: ``(B, N, 3)`` decoded centres; conf_amplitudes: ``(B, N)`` decoded amplitudes.
        domain: ``(N,)`` 0/1 weights of the domain's Gaussians.
        rotations: ``(B, 3, 3)`` consensus RELION matrices; translation_px: ``(B, 2)`` consensus image
            translations (``image_translation_px(shift_A, apix)``).
        band: Fourier pixels compared.
        settings: optimiser settings.

    Returns:
        :class:`ConformationPoseResult` (float32).
    """
    dev = conf_centers_A.device
    w = domain.to(device=dev, dtype=torch.float32)
    rot0 = rotations.to(device=dev, dtype=torch.float32)
    t0 = translation_px.to(device=dev, dtype=torch.float32)
    neutral = neutral.detach().to(device=dev, dtype=torch.float32)
    amp_neutral = neutral.amplitudes * w
    with torch.no_grad():
        target = project_band(conf_centers_A.detach().float(), conf_amplitudes.detach().float() * w,
                              neutral.widths_A, rot0, t0, band)
    unit_px = float(band.box if settings.translation_unit_px is None else settings.translation_unit_px)
    params = torch.zeros(rot0.shape[0], 5, device=dev, dtype=torch.float32)
    m = torch.zeros_like(params)
    v = torch.zeros_like(params)

    def pose(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return axis_angle_to_matrix(p[:, :3] * settings.rotation_unit_rad) @ rot0, t0 + p[:, 3:] * unit_px

    rmsd_start = None
    for step in range(1, settings.steps + 1):
        params.requires_grad_(True)
        rot, t = pose(params)
        rmsd = _rmsd(project_band(neutral.centers_A, amp_neutral, neutral.widths_A, rot, t, band), target)
        (grad,) = torch.autograd.grad((rmsd * rmsd).sum(), params)
        if step == 1:
            rmsd_start = rmsd.detach()
        params = adam_step_(params, grad, m, v, step, settings.lr, settings.betas, settings.eps)
    with torch.no_grad():
        rot, t = pose(params)
        rmsd_end = _rmsd(project_band(neutral.centers_A, amp_neutral, neutral.widths_A, rot, t, band), target)
    if rmsd_start is None:
        rmsd_start = rmsd_end
    return ConformationPoseResult(rot, t, rmsd_start, rmsd_end)


def domain_weights(gmm: GaussianMixture, mask_volume: torch.Tensor, apix: float,
                   threshold: float = 0.5) -> torch.Tensor:
    """``(N,)`` 0/1 float weights: Gaussians whose centre lies where the mask exceeds ``threshold``."""
    from gmmrefine.gmm.masks import sample_volume

    values = sample_volume(torch.as_tensor(mask_volume), gmm.centers_A.detach(), apix)
    return (values > threshold).to(torch.float32)


def domain_poses(stream, latents: torch.Tensor, decoder, domain: torch.Tensor, settings: ConformationPoseSettings =
                 ConformationPoseSettings(), batch: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Domain poses of every particle of one half from its trained networks.

    Args:
        stream: :class:`gmmrefine.hetero.train.HalfStream` of the half (its neutral GMM = the decoder's).
        latents: ``(n, L)`` the half's latents, in the half's order; decoder: its trained decoder (moved
            to the stream's device here).
        domain: ``(N,)`` 0/1 weights of the domain's Gaussians (:func:`domain_weights`).
        settings: optimiser settings.
        batch: particles optimised together (memory only; particles do not interact).

    Returns:
        ``(angles_deg (n, 3) float64, shift_A (n, 2) float64, rmsd_ratio (n,))`` in the half's order:
        RELION Euler angles and origins of the domain, and RMSD after / before.
    """
    from gmmrefine.geometry.rotations import matrix_to_euler

    dev = stream.device
    latents = latents.to(device=dev, dtype=torch.float32)
    decoder = decoder.to(dev).eval()
    neutral = GaussianMixture(decoder.centers_A, decoder.amplitudes, decoder.widths_A)
    n = len(stream)
    angles = torch.zeros(n, 3, dtype=torch.float64)
    shifts = torch.zeros(n, 2, dtype=torch.float64)
    ratio = torch.zeros(n, dtype=torch.float64)
    for c in stream.chunks():
        for s in range(0, c.rows.shape[0], batch):
            sl = slice(s, s + batch)
            rows = c.rows[sl].cpu()
            with torch.no_grad():
                centers, amps = decoder(latents[c.rows[sl]])
            res = conformation_to_pose(neutral, centers, amps, domain.to(dev), c.rotations[sl], c.translation_px[sl],
                                       stream.band, settings)
            angles[rows] = matrix_to_euler(res.rotations.to(torch.float64)).cpu()
            # image translation t = -origin / apix (gmmrefine.geometry.shifts.image_translation_px)
            shifts[rows] = (-res.translation_px.to(torch.float64) * stream.ps.apix).cpu()
            ratio[rows] = (res.rmsd_end / res.rmsd_start.clamp_min(1e-30)).to(torch.float64).cpu()
    return angles, shifts, ratio

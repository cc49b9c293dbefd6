"""Training of the heterogeneity networks, one half set at a time.

For each half, independently (its own particles, its own neutral GMM, its own decoder and its own
seed ``half_seed(seed, half)``), every particle gets a latent vector, the decoder turns it into a GMM,
and both are fitted so that the decoded GMM's projection at the particle's consensus pose matches the
particle over the band. Particles are streamed in chunks of ``settings.chunk`` (the band coefficients
are kept in memory when they fit in ``cache_bytes``, so later epochs do not read the stack again);
minibatches never mix halves.

Inference and objective (defaults ``"optimise"`` and ``"snr"``), chosen by measurement
(``benchmarks/hetero_peer.py`` on its tuning set, seed 7: adk with the LID hinged by up to +/-8 deg per
particle, 2,000 particles, box 128, 1 A/px, SNR 0.03; |Spearman(PC1, true hinge angle)|):

* The ceiling, from no code of ours: the Bayes posterior mean of the hinge angle from the exact atomic
  model at the true poses reaches 0.958 (300 particles of half 1); band-limited to 8 / 6 / 4 / 3 A,
  0.768 / 0.820 / 0.908 / 0.949. The hinge moves the LID by about 2.5 A: its evidence is at high
  resolution, so the band must reach the half's own resolution, with the noisy rings weighed down.
* The encoder (the paper's inference: a network from the FRC gradient to the latent), mean band FRC,
  GMMs at 8 A: 0.161 / 0.388 (halves 1 / 2) at the true poses. With GMMs and band at 4 A: 0.011 /
  0.039; with the SNR-weighted objective too: 0.124 / 0.048. Its decoder stayed at the neutral GMM
  (0.01 A of motion at 2 sd): from ``4 N`` = 36,000 noisy features of 1,000 particles it learnt nothing.
* ``"optimise"`` (an auto-decoder, as cryoSPARC's 3D Flex infers its latents): each particle's
  latent is a free parameter, a MAP estimate under a standard normal prior, moved by its own Adam
  steps on ``nats * score - |z|^2 / 2`` while the decoder is held; the decoder then takes a step at
  the latents plus noise. With the SNR-weighted objective, GMMs and band at 4 A, true poses, half 1:
  0.834 (latent size 1), 0.822 (size 4, latent noise 0.5; with no noise PC1 swapped places with
  noise-fitting directions late in training, 0.73-0.82). The full stage (per-Gaussian residuals)
  lowered it from 0.60 to 0.04 at 6 A by fitting noise, so by default every epoch is coarse.
* The objective ``"snr"``: the refinement's log-likelihood weights ``w_r = 2 n_r rho_r / (1 - rho_r^2)``
  (:mod:`gmmrefine.refine.snr`), from the ring SNR measured on the half's own particles against its
  own neutral GMM, divided by the half's mean total weight (so the score is a weighted band
  correlation of order one); ``nats`` = that mean total weight turns it back into a log-likelihood
  for the prior.
* The CTF (``settings.ctf``, default ``"full"``): each projection is multiplied by the particle's CTF
  before the ring correlations, so every pixel counts by the signal it carries (a matched filter); the
  paper's ``"flip"`` compares phase-flipped particles with plain projections, giving the pixels near
  the CTF's zeros, which hold almost only noise, the same weight as the others. Measured
  ``gmmrefine hetero --job`` (defaults otherwise, seed 0) on a consensus refinement of each set,
  |Spearman| of PC1 per half, flip -> full: tuning set (seed 7) 0.778 / 0.749 -> 0.796 / 0.780,
  validation set (seed 11, LID hinged as above) 0.663 / 0.661 -> 0.686 / 0.698. Ceiling of the GMM
  and score themselves (the true hinge applied to the LID's Gaussians of each half's neutral GMM,
  posterior mean over a 33-angle grid, tuning set): flip 0.819 / 0.782, full 0.840 / 0.816.
  Same time per epoch; the CTF of the band is kept beside the coefficients (peak RSS 1.19 -> 1.24 GB).
  Measured with the ``"optimise"`` inference only.
* Pose refinement inside training (a per-particle rotation and shift with a 3 deg / 1.5 px prior,
  moved with the latent) did not reduce the pose error from consensus poses 3 deg off (3.00 ->
  3.13 deg) against GMMs of half maps made at those poses, so it is not built in: the poses come from
  ``gmmrefine refine``, whose iterations improve the maps as well. At 3 deg off with the poses held,
  the Bayes ceiling itself is 0.506.

The paper's inference stays available (``inference="encoder"``), with the settings below.

Encoder inference. Latent regularisation, and why: with the latents left free (no noise, weight 1e-3 on their squared
length) the training FRC kept rising after the first epochs while PC1 of the latents lost the motion
(adk morph below, 20 epochs: |Spearman(PC1, morph fraction)| 0.32 and 0.59 in the two halves, the morph
spread over other components): 4 free dimensions per particle fit noise and pose-dependent
mismatch. Adding Gaussian noise (sd 0.3) to the latents during training and weighing their squared
length by 0.01 (a fixed-variance variational encoder) gives 0.89 and 0.91 on the same data.

Encoder input (``settings.encoder_input``), chosen by measurement (``benchmarks/hetero.py``, adk open
<-> closed morph, PC1 of the latents against the true morph fraction, each half on its own):

* ``"gradient"`` (default, EMAN2's): ``d FRC / d (centre, log amplitude)`` of every neutral Gaussian,
  ``4 N`` numbers in the model frame. The pose is already "divided out", so the encoder only has to
  learn which motion the particle asks for.
* ``"image"``: the particle's phase-flipped band coefficients (real and imaginary parts, each particle
  scaled to unit RMS). The encoder has to learn the projection geometry too.

Measured |Spearman| (half 1 / half 2), 20 epochs, each half's GMM built from its own reconstruction:

=======================================  ==========================  ==========================
data                                     gradient                    image
=======================================  ==========================  ==========================
box 48, 2 A/px, SNR 0.1, 500 per half    0.89 / 0.91                 0.90 / 0.91
box 64, 1.6 A/px, SNR 0.05, 1000/half    0.92 / 0.90, 0.91 / 0.90    0.90 / 0.90, 0.90 / 0.89
  (two seeds; final FRC half 1)          0.4314, 0.4302              0.4275, 0.4281
box 64, 1.6 A/px, SNR 0.02, 1000/half    0.77 / 0.75                 0.79 / 0.73
=======================================  ==========================  ==========================

The gradient is as good or slightly better (and fits the data better) where the signal allows, ties
at very low SNR, costs the same per epoch (one extra projection and gradient per particle, once),
and its size (4 N) follows the GMM rather than the box (the image input has ``2 P`` band pixels,
growing with the square of the box over the resolution): it is the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.gmm.loss import frc_loss
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import FourierBand, fourier_band, project_band
from gmmrefine.hetero.networks import Decoder, Encoder, build_decoder, half_seed, motion_pca, pretrain_decoder
from gmmrefine.refine.poses import adam_step_

ENCODER_INPUTS = ("gradient", "image")
OBJECTIVES = ("snr", "frc")
INFERENCES = ("optimise", "encoder")
HALVES = (1, 2)


@dataclass(frozen=True)
class HeteroSettings:
    """Settings of the heterogeneity training.

    Attributes:
        latent_dim: length of the latent vectors.
        epochs: passes over the half's particles in all.
        coarse_epochs: the first epochs, in which only the 32-Gaussian coarse GMM moves (None: half
            of ``epochs``); the rest refine the full GMM (residual displacements and amplitudes).
        batch: particles per optimiser step.
        lr: Adam learning rate (encoder and decoder).
        latent_l2: weight of the mean squared latent in the loss (keeps the latent space bounded).
        latent_noise: standard deviation of the Gaussian noise added to the latents while training
            (with ``latent_l2``, a fixed-variance variational encoder: directions that only fit noise
            cost more than they gain, so the latent space keeps the motions many particles share).
        weight_decay: Adam weight decay of the encoder.
        n_coarse: Gaussians of the coarse GMM.
        encoder_hidden, decoder_hidden: widths of the hidden layers.
        encoder_input: ``"gradient"`` or ``"image"`` (see the module docstring).
        minres_A, maxres_A: FRC band (angstrom).
        half_maxres_A: ``(half 1, half 2)`` high-resolution end of each half's band, replacing
            ``maxres_A`` per half (each from that half's own resolution: no half's band depends on the
            other half's data); None: ``maxres_A`` for both.
        half_resolution_A: ``(half 1, half 2)`` each half's own resolution estimate, the resolution its
            refitted neutral GMM is fitted to (:func:`refit_neutral`); None: the band's end.
        refits: times each half's neutral GMM is refitted to its central particles and the half trained
            again from the start (:func:`refit_neutral`); 0: one training on the given neutral GMM.
        ctf: ``"full"`` (projections times CTF: each pixel weighed by its signal, see the module
            docstring) or ``"flip"`` (phase-flipped particles against plain projections, the paper's).
        inference: how a particle's latent is found: ``"optimise"`` (each particle's latent is a free
            parameter, moved by ``inner_steps`` Adam steps of its own, step ``latent_lr``, on its score
            minus ``|z|^2 / 2`` (a standard normal prior) whenever its minibatch comes up, the decoder
            held; see the module docstring) or ``"encoder"`` (the encoder network predicts it, the
            paper's).
        inner_steps, latent_lr: per-particle latent steps per minibatch visit, and their Adam step size.
        objective: ``"snr"`` (ring correlations weighted by each particle's expected ring SNR, the
            refinement's likelihood weights, measured on the half's own particles against its neutral
            GMM; see the module docstring) or ``"frc"`` (the paper's unweighted mean over the band).
        coarse_scale_A, fine_scale_A: displacement units of the decoder heads.
        pretrain_steps: decoder pre-training steps.
        chunk: particles read at a time.
        cache_bytes: keep band coefficients and features in memory up to this size (else re-read).
        seed: base seed; each half uses ``half_seed(seed, half)``.
        device: torch device.
        progress: progress bars on a terminal.
    """

    latent_dim: int = 4
    epochs: int = 20
    coarse_epochs: int | None = None
    batch: int = 32
    lr: float = 1e-3
    latent_l2: float = 1e-2
    latent_noise: float | None = None
    weight_decay: float = 0.0
    n_coarse: int = 32
    encoder_hidden: tuple[int, ...] = (256, 64)
    decoder_hidden: tuple[int, ...] = (64, 128)
    encoder_input: str = "gradient"
    minres_A: float = 100.0
    maxres_A: float = 8.0
    half_maxres_A: tuple[float, float] | None = None
    half_resolution_A: tuple[float, float] | None = None
    refits: int = 1
    ctf: str = "full"
    objective: str = "snr"
    inference: str = "optimise"
    inner_steps: int = 4
    latent_lr: float = 0.1
    coarse_scale_A: float = 5.0
    fine_scale_A: float = 1.0
    pretrain_steps: int = 100
    chunk: int = 20000
    cache_bytes: float = 2e9
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def for_half(self, half: int) -> HeteroSettings:
        """The settings half ``half`` trains with (its own band end where ``half_maxres_A`` is set)."""
        if self.half_maxres_A is None:
            return self
        return replace(self, maxres_A=float(self.half_maxres_A[half - 1]), half_maxres_A=None)

    def __post_init__(self) -> None:
        if self.encoder_input not in ENCODER_INPUTS:
            raise InputError(f"hetero: encoder input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}.")
        if self.ctf not in ("flip", "full"):
            raise InputError(f"hetero: ctf must be 'flip' or 'full', got {self.ctf!r}.")
        if self.inference not in INFERENCES:
            raise InputError(f"hetero: inference must be one of {INFERENCES}, got {self.inference!r}.")
        if self.inner_steps < 1 or not self.latent_lr > 0:
            raise InputError("hetero: inner steps must be >= 1 and the latent step size positive.")
        if self.objective not in OBJECTIVES:
            raise InputError(f"hetero: objective must be one of {OBJECTIVES}, got {self.objective!r}.")
        if self.refits < 0:
            raise InputError(f"hetero: refits must be >= 0, got {self.refits}.")
        if self.latent_dim < 1 or self.epochs < 1 or self.batch < 1 or self.chunk < 1:
            raise InputError("hetero: latent dimension, epochs, batch and chunk must be >= 1.")
        if self.coarse_epochs is not None and not (0 <= self.coarse_epochs <= self.epochs):
            raise InputError(f"hetero: coarse epochs must be between 0 and epochs ({self.epochs}), "
                             f"got {self.coarse_epochs}.")

    @property
    def n_coarse_epochs(self) -> int:
        """Epochs of the coarse stage: by default every epoch with ``"optimise"`` (measured: the full
        stage's per-Gaussian residuals fit noise there), half of them with ``"encoder"``."""
        if self.coarse_epochs is not None:
            return int(self.coarse_epochs)
        return self.epochs if self.inference == "optimise" else self.epochs // 2

    @property
    def noise(self) -> float:
        """Latent noise of the decoder's training steps: ``latent_noise``, else 0.5 (``"optimise"``) or
        0.3 (``"encoder"``), each the measured choice for its inference."""
        if self.latent_noise is not None:
            return float(self.latent_noise)
        return 0.5 if self.inference == "optimise" else 0.3


@dataclass
class HalfResult:
    """What training one half produced.

    Attributes:
        half: 1 or 2.
        seed: the half's seed.
        indices: ``(n,)`` particle indices of the half (input order).
        latents: ``(n, L)`` float32 latent vectors, row ``i`` for particle ``indices[i]``.
        frc_neutral: ``(n,)`` band FRC of each particle against the neutral GMM.
        frc_final: ``(n,)`` band FRC against its decoded GMM after training.
        encoder, decoder: the trained networks (CPU); no encoder with the ``"optimise"`` inference.
        history: per epoch ``epoch``, ``stage``, ``loss``, ``frc`` (mean training FRC), ``seconds``.
        seconds: wall time.
        components: :func:`~gmmrefine.hetero.networks.motion_pca` of the trained latents and decoder
            ``(scores, directions, mean, variance)``, made once here and used by every output.
        pc1_A, pc1_sd_A: ``(n,)`` each particle's position along the half's first motion component
            (angstrom of PC1 score) and its uncertainty, the posterior mean and standard deviation from
            its own image (:func:`pc1_posterior`); None where the objective is no log-likelihood
            (``"frc"``), and the PC1 scores of its latent stand for the position.
        refits: one entry per refit of the neutral GMM before this training (:func:`refit_neutral`'s
            info and the earlier training's ``seconds_training``).
    """

    half: int
    seed: int
    indices: np.ndarray
    latents: np.ndarray
    frc_neutral: np.ndarray
    frc_final: np.ndarray
    encoder: Encoder | None
    decoder: Decoder
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    components: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    pc1_A: np.ndarray | None = None
    pc1_sd_A: np.ndarray | None = None
    refits: list[dict] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Particles of one half, streamed
# ------------------------------------------------------------------------------------------------

@dataclass
class _Chunk:
    rows: torch.Tensor          # (b,) positions within the half
    target: torch.Tensor        # (b, P) complex64 band coefficients
    rotations: torch.Tensor     # (b, 3, 3)
    translation_px: torch.Tensor  # (b, 2)
    ctf: torch.Tensor | None    # (b, P) CTF for settings.ctf == "full"
    weights: torch.Tensor | None = None   # (b, n_rings) ring weights of the "snr" objective
    ctf_moments: tuple[torch.Tensor, torch.Tensor] | None = None  # (b, n_rings) ring means of |CTF|, CTF^2
    features: torch.Tensor | None = None  # (b, F) encoder input
    frc_neutral: torch.Tensor | None = None  # (b,) FRC against the neutral GMM


class HalfStream:
    """The band coefficients, consensus poses and encoder inputs of one half's particles, chunk by chunk.

    Everything is kept in memory after the first pass when it fits in ``settings.cache_bytes``;
    otherwise every pass reads the images again and recomputes the encoder inputs (about one more
    projection and gradient per particle and epoch), so memory stays at one chunk whatever the size
    of the data set.

    Args:
        ps: :class:`~gmmrefine.io.particles.ParticleSet`.
        indices: ``(n,)`` the half's particle indices (input order).
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` consensus poses of all particles.
        band: Fourier pixels compared.
        settings: chunk size, CTF handling, encoder input, cache size and device.
        neutral: the half's neutral GMM (needed for the ``"gradient"`` encoder input).
    """

    def __init__(self, ps, indices: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray, band: FourierBand,
                 settings: HeteroSettings, neutral: GaussianMixture | None = None):
        self.ps = ps
        self.indices = np.asarray(indices, dtype=np.int64)
        self.angles_deg = np.asarray(angles_deg, dtype=np.float64)
        self.shift_A = np.asarray(shift_A, dtype=np.float64)
        self.band = band
        self.settings = settings
        self.device = torch.device(settings.device)
        self.neutral = None if neutral is None else neutral.detach().to(device=self.device, dtype=torch.float32)
        if (settings.encoder_input == "gradient" or settings.inference == "optimise") and self.neutral is None:
            raise ValueError("HalfStream: the optimised latents and the gradient encoder input need the neutral GMM")
        if settings.inference == "optimise":
            n_feat = 0
        elif self.neutral is None:
            n_feat = 2 * band.n_pixels
        else:
            n_feat = n_features(self.neutral, band, settings.encoder_input)
        per_particle = band.n_pixels * 8 * (2 if settings.ctf == "full" else 1) + 4 * n_feat + 64
        self._cache: list[_Chunk] | None = None
        self._cacheable = len(self.indices) * per_particle <= settings.cache_bytes
        self.ring_snr: torch.Tensor | None = None
        self.weight_norm = 1.0
        if (settings.objective == "snr" or settings.inference == "optimise") and self.neutral is not None:
            self._measure_ring_snr()

    def _measure_ring_snr(self) -> None:
        """The half's per-ring SNR, measured as the refinement measures it (on
        :data:`~gmmrefine.refine.global_refine.SNR_SAMPLE` of its own particles spread over the half, at
        their consensus poses, against its own neutral GMM; :func:`gmmrefine.refine.snr.fit_ring_snr`), and
        the mean total weight by which every particle's weights are divided (so the objective stays a band
        correlation of order one and the other settings keep their scale)."""
        from gmmrefine.refine.global_refine import sample_rows
        from gmmrefine.refine.poses import ring_correlations_at
        from gmmrefine.refine.snr import fit_ring_snr

        assert self.neutral is not None  # the caller checked
        corr, m1s, m2s = [], [], []
        for c in self._read(self.indices[sample_rows(len(self.indices))], measure=False):
            corr.append(ring_correlations_at(self.neutral, c.target, c.rotations, c.translation_px, self.band,
                                             ctf=c.ctf))
            assert c.ctf_moments is not None  # _read sets them
            m1s.append(c.ctf_moments[0])
            m2s.append(c.ctf_moments[1])
        self.ring_snr = fit_ring_snr(torch.cat(corr), torch.cat(m1s), torch.cat(m2s),
                                     self.settings.ctf).to(torch.float32)
        total = torch.cat([self._weights(m1, m2).sum(1) for m1, m2 in zip(m1s, m2s)])
        self.weight_norm = float(total.mean().clamp_min(1e-30))

    def _weights(self, m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
        """``(b, n_rings)`` likelihood weights of particles with CTF moments ``m1``, ``m2`` (unnormalised)."""
        from gmmrefine.refine.snr import expected_correlation, ring_weights

        assert self.ring_snr is not None
        rho = expected_correlation(self.ring_snr, m1, m2, self.settings.ctf)
        return ring_weights(rho, self.band.ring_index, self.band.n_rings)

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, indices: np.ndarray | None = None, *, measure: bool = True):
        from gmmrefine.fourier.ctf import ctf_for_box
        from gmmrefine.geometry.rotations import euler_to_matrix
        from gmmrefine.geometry.shifts import image_translation_px
        from gmmrefine.io.particles import iter_image_chunks
        from gmmrefine.refine.poses import particle_band
        from gmmrefine.refine.snr import ring_ctf_moments

        ps, dev, band = self.ps, self.device, self.band
        position = np.empty(len(ps), dtype=np.int64)
        position[self.indices] = np.arange(len(self.indices))
        for idx, images in iter_image_chunks(ps, self.indices if indices is None else indices, self.settings.chunk):
            img = torch.from_numpy(images).to(dev)
            ctf = ctf_for_box(ps.box, ps.apix, **ps.ctf.as_tensors(idx, device=dev)).to(dev, torch.float32)
            if self.settings.ctf == "full":
                target, ctf_band = particle_band(img, band), band.gather(ctf)
            else:
                target, ctf_band = particle_band(img, band, ctf), None
            rot = euler_to_matrix(torch.as_tensor(self.angles_deg[idx], device=dev)).to(torch.float32)
            t = image_translation_px(torch.as_tensor(self.shift_A[idx], device=dev), ps.apix).to(torch.float32)
            chunk = _Chunk(torch.as_tensor(position[idx], device=dev), target, rot, t, ctf_band)
            # the CTF moments set each particle's expected ring SNR, in "flip" mode too (|CTF| there)
            chunk.ctf_moments = ring_ctf_moments(band.gather(ctf), band.ring_index, band.n_rings)
            if not measure:
                yield chunk
                continue
            if self.ring_snr is not None and self.settings.objective == "snr":
                chunk.weights = self._weights(*chunk.ctf_moments) / self.weight_norm
            chunk.features, chunk.frc_neutral = chunk_features(chunk, self.neutral, band, self.settings)
            yield chunk

    def chunks(self):
        """Yield :class:`_Chunk` s covering the half in input order (from memory after the first pass)."""
        if self._cache is not None:
            yield from self._cache
            return
        kept = [] if self._cacheable else None
        for c in self._read():
            if kept is not None:
                kept.append(c)
            yield c
        if kept is not None:
            self._cache = kept


# ------------------------------------------------------------------------------------------------
# Encoder input
# ------------------------------------------------------------------------------------------------

def decoded_frc(centers_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor, chunk: _Chunk,
                sl: slice | torch.Tensor, band: FourierBand) -> torch.Tensor:
    """``(b,)`` band score of particles ``sl`` of ``chunk`` against GMMs with per-particle (or shared)
    centres ``(b, N, 3)`` / ``(N, 3)`` and amplitudes at their consensus poses: the ring correlations
    weighted by ``chunk.weights`` (the ``"snr"`` objective), or their mean (``"frc"``)."""
    proj = project_band(centers_A, amplitudes, widths_A, chunk.rotations[sl], chunk.translation_px[sl], band)
    if chunk.ctf is not None:
        proj = proj * chunk.ctf[sl]
    weights = None if chunk.weights is None else chunk.weights[sl]
    return frc_loss(proj, chunk.target[sl], band.ring_index, band.n_rings, weights=weights)


def frc_gradient_features(neutral: GaussianMixture, chunk: _Chunk, sl: slice, band: FourierBand) -> tuple[
        torch.Tensor, torch.Tensor]:
    """EMAN2's encoder input: the gradient of each particle's FRC with respect to the neutral GMM.

    Returns:
        ``(features (b, 4 N), frc (b,))``: per Gaussian ``d FRC / d centre`` (x, y, z; 1/A) then
        ``d FRC / d log amplitude``, and the FRC itself.
    """
    b = chunk.rotations[sl].shape[0]
    centers = neutral.centers_A.detach()[None].expand(b, -1, -1).clone().requires_grad_(True)
    log_amp = torch.zeros(b, neutral.n, dtype=centers.dtype, device=centers.device, requires_grad=True)
    with torch.enable_grad():
        frc = decoded_frc(centers, neutral.amplitudes.detach() * torch.exp(log_amp), neutral.widths_A.detach(),
                          chunk, sl, band)
        g_c, g_a = torch.autograd.grad(frc.sum(), [centers, log_amp])
    return torch.cat([g_c.flatten(1), g_a], 1).detach(), frc.detach()


def image_features(chunk: _Chunk, sl: slice) -> torch.Tensor:
    """The alternative encoder input: ``(b, 2 P)`` band coefficients (re, im), unit RMS per particle."""
    x = chunk.target[sl]
    x = torch.cat([x.real, x.imag], 1)
    return x / x.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)


def n_features(neutral: GaussianMixture, band: FourierBand, encoder_input: str) -> int:
    return 4 * neutral.n if encoder_input == "gradient" else 2 * band.n_pixels


def chunk_features(chunk: _Chunk, neutral: GaussianMixture | None, band: FourierBand,
                   settings: HeteroSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder inputs of a chunk, in batches of ``4 * settings.batch``.

    Returns:
        ``(features (b, F) float32, frc_neutral (b,) or None without a neutral GMM)``.
    """
    step = max(4 * settings.batch, 1)
    feats, frcs = [], []
    for s in range(0, chunk.rows.shape[0], step):
        sl = slice(s, s + step)
        if settings.inference == "optimise":
            assert neutral is not None  # HalfStream requires it
            # no encoder: its input is not needed, only the neutral score
            with torch.no_grad():
                frc = decoded_frc(neutral.centers_A, neutral.amplitudes, neutral.widths_A, chunk, sl, band)
            f = torch.zeros(frc.shape[0], 0, device=frc.device)
        elif settings.encoder_input == "gradient":
            assert neutral is not None  # the gradient input needs the neutral GMM
            f, frc = frc_gradient_features(neutral, chunk, sl, band)
        else:
            f = image_features(chunk, sl)
            frc = None
            if neutral is not None:
                with torch.no_grad():
                    frc = decoded_frc(neutral.centers_A, neutral.amplitudes, neutral.widths_A, chunk, sl, band)
        feats.append(f)
        frcs.append(frc)
    # frcs is all None (no neutral GMM) or all tensors
    return torch.cat(feats), (None if frcs[0] is None else torch.cat(cast(list[torch.Tensor], frcs)))


def compute_features(stream: HalfStream) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder inputs of every particle of the half, in half order (tests and small data only: this
    holds them all in memory).

    Returns:
        ``(features (n, F), frc_neutral (n,))``.
    """
    feats, frcs = [], []
    for c in stream.chunks():
        feats.append(c.features)
        frcs.append(c.frc_neutral)
    return torch.cat(feats), torch.cat(frcs)


def feature_statistics(stream: HalfStream) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the half: per-feature mean and standard deviation (float64 sums) and the FRC of
    every particle against the neutral GMM.

    Returns:
        ``(mean (F,), std (F,), frc_neutral (n,))`` on the CPU, float32.
    """
    total: torch.Tensor | None = None
    sq: torch.Tensor | None = None
    count = 0
    frc0 = torch.zeros(len(stream))
    for c in stream.chunks():
        f = c.features.to(torch.float64)
        total = f.sum(0) if total is None else total + f.sum(0)
        sq = (f * f).sum(0) if sq is None else sq + (f * f).sum(0)
        count += f.shape[0]
        frc0[c.rows.cpu()] = c.frc_neutral.cpu()
    assert total is not None and sq is not None  # the half has particles
    mean = total / count
    var = (sq - count * mean * mean).clamp_min(0.0) / max(count - 1, 1)
    std = var.sqrt() if count > 1 else torch.ones_like(mean)
    return mean.cpu().float(), std.cpu().float(), frc0


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------

def _latents(encoder: Encoder | None, decoder: Decoder, stream: HalfStream, batch: int,
             fixed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(latents (n, L), frc (n,))`` of every particle: the encoder's, or the ``fixed`` ``(n, L)`` ones
    (in the half's order), with the current decoder."""
    n = len(stream)
    z_all = torch.zeros(n, decoder.latent_dim, device=stream.device) if fixed is None else fixed
    frc_all = torch.zeros(n, device=stream.device)
    with torch.no_grad():
        for c in stream.chunks():
            for s in range(0, c.rows.shape[0], batch):
                sl = slice(s, s + batch)
                rows = c.rows[sl]
                if fixed is None:
                    assert encoder is not None  # one of the two is given
                    z_all[rows] = encoder(c.features[sl])
                centers, amps = decoder(z_all[rows])
                frc_all[rows] = decoded_frc(centers, amps, decoder.widths_A, c, sl, stream.band)
    return z_all, frc_all


@dataclass
class _FreeLatents:
    """The ``"optimise"`` inference's per-particle latents of one half, ``(n, L)`` in the half's order, with
    each latent's own Adam moments, and ``nats`` (``stream.weight_norm``, the half's mean total likelihood
    weight) that puts the score back in log-likelihood units so the standard normal prior weighs against
    the evidence as it should."""

    z: torch.Tensor
    m: torch.Tensor
    v: torch.Tensor
    nats: float

    def steps_(self, decoder: Decoder, chunk: _Chunk, sel: torch.Tensor, band: FourierBand, steps: int,
               first_step: int, lr: float) -> None:
        """``steps`` Adam steps on the latents of particles ``sel`` of ``chunk``, each ascending its own
        ``nats * score - |z|^2 / 2`` with the decoder held (no gradient reaches its parameters)."""
        rows = chunk.rows[sel]
        for k in range(steps):
            z = self.z[rows].clone().requires_grad_(True)
            with torch.enable_grad():
                centers, amps = decoder(z)
                objective = (self.nats * decoded_frc(centers, amps, decoder.widths_A, chunk, sel, band)
                             - 0.5 * (z * z).sum(1))
                (grad,) = torch.autograd.grad(objective.sum(), [z])
            m, v = self.m[rows], self.v[rows]
            self.z[rows] = adam_step_(z.detach(), -grad, m, v, first_step + k, lr, (0.9, 0.999), 1e-8)
            self.m[rows], self.v[rows] = m, v


def train_half(stream: HalfStream, settings: HeteroSettings, *, half: int, seed: int) -> HalfResult:
    """Train one half set's decoder, and its latents (``"optimise"``) or encoder (``"encoder"``).

    Every minibatch: with ``"optimise"``, ``inner_steps`` steps on its particles' latents with the decoder
    held (:meth:`_FreeLatents.steps_`), then one decoder step at those latents plus noise
    (``settings.noise``); after the last epoch every latent takes ``inner_steps`` more steps against the
    final decoder. With ``"encoder"``, one step of encoder and decoder together at the encoded latents
    plus noise, with ``latent_l2`` on the latents' length.

    Args:
        stream: the half's particles and its neutral GMM (``stream.neutral``).
        settings: training settings.
        half: 1 or 2 (labels only).
        seed: the half's seed (:func:`~gmmrefine.hetero.networks.half_seed`).

    Returns:
        :class:`HalfResult`.
    """
    from tqdm import tqdm

    t_start = time.perf_counter()
    dev = stream.device
    band = stream.band
    neutral = stream.neutral
    if neutral is None:
        raise ValueError("train_half: the stream has no neutral GMM")
    gen = torch.Generator().manual_seed(int(seed))
    mean, std, frc_neutral = feature_statistics(stream)
    optimise = settings.inference == "optimise"
    encoder = None
    if not optimise:
        encoder = Encoder(mean.shape[0], settings.latent_dim, settings.encoder_hidden, gen)
        encoder.set_normalisation(mean, std)
    decoder = build_decoder(neutral, settings.latent_dim, n_coarse=settings.n_coarse, hidden=settings.decoder_hidden,
                            seed=int(seed) % (2**31), generator=gen, coarse_scale_A=settings.coarse_scale_A,
                            fine_scale_A=settings.fine_scale_A)
    pretrain_decoder(decoder, gen, steps=settings.pretrain_steps)
    decoder.to(dev)
    n = len(stream)
    param_groups: list[dict[str, Any]] = [{"params": decoder.stage_parameters("full")}]
    free = None
    if encoder is not None:
        encoder.to(dev)
        param_groups.insert(0, {"params": list(encoder.parameters()), "weight_decay": settings.weight_decay})
    else:
        z0 = (0.1 * torch.randn(n, settings.latent_dim, generator=gen)).to(dev)
        free = _FreeLatents(z0, torch.zeros_like(z0), torch.zeros_like(z0), stream.weight_norm)
    opt = torch.optim.Adam(param_groups, lr=settings.lr)
    steps = settings.inner_steps
    history: list[dict] = []
    bar = tqdm(total=(settings.epochs + optimise) * n, desc=f"hetero half {half}", unit="particle",
               disable=None if settings.progress else True)
    try:
        for epoch in range(settings.epochs):
            t0 = time.perf_counter()
            decoder.set_stage("coarse" if epoch < settings.n_coarse_epochs else "full")
            sum_loss = sum_frc = 0.0
            for c in stream.chunks():
                order = torch.randperm(c.rows.shape[0], generator=gen).to(dev)
                for s in range(0, order.shape[0], settings.batch):
                    sel = order[s:s + settings.batch]
                    if free is not None:
                        free.steps_(decoder, c, sel, band, steps, epoch * steps + 1, settings.latent_lr)
                        z = free.z[c.rows[sel]]
                    else:
                        assert encoder is not None
                        z = encoder(c.features[sel])
                    if settings.noise > 0:
                        z_used = z + settings.noise * torch.randn(z.shape, generator=gen).to(dev)
                    else:
                        z_used = z
                    centers, amps = decoder(z_used)
                    frc = decoded_frc(centers, amps, decoder.widths_A, c, sel, band)
                    loss = -frc.mean()
                    if encoder is not None:
                        loss = loss + settings.latent_l2 * (z * z).sum(1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sum_loss += float(loss.detach()) * sel.shape[0]
                    sum_frc += float(frc.detach().sum())
                    bar.update(sel.shape[0])
            history.append({"epoch": epoch + 1, "stage": decoder.stage, "loss": sum_loss / n, "frc": sum_frc / n,
                            "seconds": time.perf_counter() - t0})
        decoder.eval()
        if free is not None:
            for prm in decoder.parameters():
                prm.grad = None
            for c in stream.chunks():  # the latents' last steps, against the final decoder
                for s in range(0, c.rows.shape[0], settings.batch):
                    sel = torch.arange(s, min(s + settings.batch, c.rows.shape[0]), device=dev)
                    free.steps_(decoder, c, sel, band, steps, settings.epochs * steps + 1, settings.latent_lr)
                    bar.update(sel.shape[0])
    finally:
        bar.close()
    if encoder is not None:
        encoder.eval()
    latents, frc_final = _latents(encoder, decoder, stream, 4 * settings.batch,
                                  None if free is None else free.z)
    components = motion_pca(latents.cpu().numpy(), decoder)
    position = sd = None
    if settings.objective == "snr":
        position, sd = pc1_posterior(stream, decoder, components, 4 * settings.batch)
    return HalfResult(half=half, seed=int(seed), indices=stream.indices, latents=latents.cpu().numpy(),
                      frc_neutral=frc_neutral.cpu().numpy(), frc_final=frc_final.cpu().numpy(),
                      encoder=None if encoder is None else encoder.cpu(), decoder=decoder.cpu(), history=history,
                      seconds=time.perf_counter() - t_start, components=components, pc1_A=position,
                      pc1_sd_A=sd)


#: Points of the grid along PC1 on which each particle's posterior is evaluated, spread over
#: +/- ``PC1_GRID_SD`` standard deviations of the half's PC1 scores (11 points gave the same posterior
#: means to 3 digits of |Spearman| on the tuning sets).
PC1_GRID_POINTS = 21
PC1_GRID_SD = 3.0


def pc1_posterior(stream: HalfStream, decoder: Decoder, components: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                  batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Each particle's position along its half's first motion component, from its own image.

    The decoder is walked along PC1 (``mean + t * direction``, ``t`` on :data:`PC1_GRID_POINTS` points
    over +/- :data:`PC1_GRID_SD` sd of the scores); each particle's log-likelihood there is its
    ``"snr"`` score in nats (``stream.weight_norm * score``, the training objective), its prior
    ``N(0, sd^2)`` of the half's scores; the posterior's mean and sd replace the PC1 score of the
    particle's latent, which the latent's own Adam steps (a MAP estimate in all ``L`` dimensions at
    once) place less well. Measured (``benchmarks/hetero_peer.py`` data, consensus poses, |Spearman|
    with the true hinge angle per half, score of the latent -> posterior mean): tuning set (seed 7),
    LID hinged +/-8 deg 0.796 / 0.780 -> 0.822 / 0.806, +/-15 deg 0.874 / 0.859 -> 0.893 / 0.878.

    Args:
        stream: the half's particles (its ring weights must be set: the ``"snr"`` objective).
        decoder: the half's trained decoder.
        components: :func:`~gmmrefine.hetero.networks.motion_pca` of the half's latents.
        batch: particles scored at a time.

    Returns:
        ``(mean (n,), sd (n,))`` in angstrom of PC1 score, in the half's order; the scores themselves
        and zeros where PC1 does not move the map (zero variance).
    """
    scores, directions, mean, variance = components
    spread = float(np.sqrt(max(float(variance[0]), 0.0)))
    if spread == 0.0:
        return scores[:, 0].copy(), np.zeros(len(scores))
    grid = np.linspace(-PC1_GRID_SD, PC1_GRID_SD, PC1_GRID_POINTS) * spread
    dev = stream.device
    z = torch.as_tensor(mean[None] + grid[:, None] * directions[0][None], dtype=torch.float32, device=dev)
    log_post = torch.zeros(len(stream), len(grid), dtype=torch.float64, device=dev)
    with torch.no_grad():
        centers, amps = decoder(z)
        for c in stream.chunks():
            for s in range(0, c.rows.shape[0], batch):
                sl = slice(s, s + batch)
                for k in range(len(grid)):  # a few points along one path; each a batched projection
                    log_post[c.rows[sl], k] = stream.weight_norm * decoded_frc(
                        centers[k], amps[k], decoder.widths_A, c, sl, stream.band).to(torch.float64)
    t = torch.as_tensor(grid, dtype=torch.float64, device=dev)
    p = torch.softmax(log_post - 0.5 * (t / spread) ** 2, dim=1)
    post_mean = p @ t
    post_sd = (p @ t**2 - post_mean**2).clamp_min(0).sqrt()
    return post_mean.cpu().numpy(), post_sd.cpu().numpy()


#: Particles of a half within this many standard deviations of its mean PC1 position make its refitted
#: neutral GMM (:func:`refit_neutral`); about two thirds of them where PC1 is roughly normal.
CENTRAL_SD = 1.0


def refit_neutral(ps, indices: np.ndarray, position: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray,
                  neutral: GaussianMixture, settings: HeteroSettings, *, half: int, seed: int
                  ) -> tuple[GaussianMixture, dict]:
    """A half's neutral GMM refitted to the map of its central particles along PC1.

    The consensus map averages every conformation, so a moving domain is blurred over its whole range
    and the neutral GMM's Gaussians there are too: moved by the decoder they still describe an average,
    which caps how well any particle's conformation can be read. The particles within
    :data:`CENTRAL_SD` sd of the half's mean PC1 position (from a first training) are reconstructed at
    their consensus poses, CTF-weighted as ``refine`` does, on the band's working grid, and the neutral
    GMM is refitted to that map (warm start, same Gaussians). Only the half's own particles and
    training are used. Measured (``benchmarks/hetero_peer.py`` tuning sets, seed 7): the posterior mean
    along the *true* hinge applied to the GMM's domain Gaussians (the best a GMM allows) ranked particles
    with |Spearman| 0.913 / 0.907 (half 1 / 2) from GMMs of all particles' maps and 0.938 / 0.929 from
    the central particles' (LID +/-15 deg); 0.869 / 0.861 and 0.868 / 0.863 at +/-8 deg, where a third
    of the particles (0.45 sd) gave 0.850 / 0.813: fewer particles, more noise.

    Args:
        ps: the particle set; indices: ``(n,)`` the half's particles; position: ``(n,)`` their PC1
            positions (any unit); angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` consensus poses of all
            particles.
        neutral: the half's neutral GMM (the warm start); settings: the half's settings
            (:meth:`HeteroSettings.for_half`); half: 1 or 2; seed: the fit's seed.

    Returns:
        ``(gmm, info)``: the refitted GMM (CPU, float32) and ``n_particles``, ``resolution_A``,
        ``gmm_fsc09_A``, ``seconds``.
    """
    from gmmrefine.gmm.build import build_gmm
    from gmmrefine.reconstruct.insert import FourierAccumulator
    from gmmrefine.reconstruct.invert import accumulate_halves, reconstruct_map
    from gmmrefine.refine.global_refine import WARM_STEP_FRACTION, RefineSettings, working_box

    t0 = time.perf_counter()
    position = np.asarray(position, dtype=np.float64)
    central = np.abs(position - position.mean()) <= CENTRAL_SD * position.std()
    resolution = (settings.half_resolution_A[half - 1] if settings.half_resolution_A is not None
                  else settings.maxres_A)
    work = working_box(ps.box, ps.apix, min(float(resolution), settings.maxres_A))
    accs = accumulate_halves(ps, angles_deg, shift_A, ctf_mode="wiener", halves=(half,), device=settings.device,
                             progress=settings.progress, particles=np.asarray(indices)[central],
                             accs={half: FourierAccumulator(work, device=settings.device)})
    volume = reconstruct_map(accs.pop(half), consume=True).cpu()
    # The same Gaussians, moved, with the steps of refine's warm-started fits: the decoder is built on
    # them (build_half_gmm would seed afresh where its estimate of their number differs).
    gmm, info = build_gmm(volume, ps.apix * ps.box / work, float(resolution), init=neutral, seed=seed,
                          steps=max(1, round(RefineSettings.gmm_steps * WARM_STEP_FRACTION)), device=settings.device)
    gmm = gmm.detach().to(device="cpu", dtype=torch.float32)
    return gmm, {"n_particles": int(central.sum()), "resolution_A": float(resolution),
                 "gmm_fsc09_A": info.get("resolution_fsc09_A"), "seconds": time.perf_counter() - t0}


def hetero_band(ps, settings: HeteroSettings) -> FourierBand:
    """The FRC band of the settings for the particle set's box and pixel size."""
    return fourier_band(ps.box, ps.apix, settings.minres_A, settings.maxres_A, device=torch.device(settings.device))


def train_halves(ps, neutral: dict[int, GaussianMixture], settings: HeteroSettings, *,
                 angles_deg: np.ndarray | None = None, shift_A: np.ndarray | None = None,
                 halves: tuple[int, ...] = HALVES) -> dict[int, HalfResult]:
    """Train each half independently (its own GMM ``neutral[h]``, particles, networks and seed).

    Args:
        ps: the particle set (``ps.subset`` gives the halves).
        neutral: ``{half: GaussianMixture}`` consensus GMM of each half.
        settings: training settings (``settings.seed`` is the base seed).
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` consensus poses (default: those of ``ps``).
        halves: which halves to train.

    Returns:
        ``{half: HalfResult}``.
    """
    angles = ps.angles_deg if angles_deg is None else angles_deg
    shifts = ps.shift_A if shift_A is None else shift_A
    out = {}
    for h in halves:
        half_settings = settings.for_half(h)
        band = hetero_band(ps, half_settings)
        indices = ps.half(h)
        if len(indices) == 0:
            raise InputError(f"{ps.path}: half set {h} has no particles; heterogeneity analysis trains each "
                             "half on its own particles (rlnRandomSubset 1 and 2).", path=str(ps.path),
                             field="rlnRandomSubset")
        gmm = neutral[h]
        refits = []
        for refit in range(half_settings.refits + 1):
            stream = HalfStream(ps, indices, angles, shifts, band, half_settings, gmm)
            result = train_half(stream, half_settings, half=h, seed=half_seed(settings.seed, h))
            if refit == half_settings.refits:
                break
            assert result.components is not None  # made by every training
            position = result.pc1_A if result.pc1_A is not None else result.components[0][:, 0]
            gmm, info = refit_neutral(ps, indices, position, angles, shifts, gmm, half_settings, half=h,
                                      seed=half_seed(settings.seed, h) + refit)
            refits.append({**info, "seconds_training": result.seconds})
        result.refits = refits
        result.seconds += sum(r["seconds"] + r["seconds_training"] for r in refits)
        out[h] = result
    return out


def latent_table(ps, results: dict[int, HalfResult]) -> np.ndarray:
    """``(N, L)`` float32 latents in the particle-table order (NaN for particles of untrained halves)."""
    dim = next(iter(results.values())).latents.shape[1]
    out = np.full((len(ps), dim), np.nan, dtype=np.float32)
    for r in results.values():
        out[r.indices] = r.latents
    return out

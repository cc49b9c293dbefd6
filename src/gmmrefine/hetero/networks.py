"""Encoder and decoder of the heterogeneity analysis (one pair per half set, never shared).

* :class:`Encoder`: a dense network from a per-particle feature vector to a latent vector ``z``.
  Its input is chosen by measurement (see :mod:`gmmrefine.hetero.train`): by default the gradient of
  the band FRC between the particle and the neutral GMM's projection at the consensus pose, with
  respect to every Gaussian's centre (x, y, z) and log-amplitude (EMAN2's choice, ``4 N`` numbers).
  The gradient lives in the model frame, so particles seen from different directions that want the
  same motion give features that point the same way; raw images would make the network learn the
  projection geometry as well.
* :class:`Decoder`: ``z`` -> per-particle GMM: a displacement of each Gaussian (angstrom) and a change of
  its amplitude, added to the neutral (consensus) GMM. Hierarchical: a coarse GMM of ``n_coarse``
  (default 32) Gaussians, the k-means clusters of the full GMM's centres, carries most of the motion;
  every full Gaussian moves with a smooth (radial-basis) blend of the coarse displacements. In the
  ``"full"`` stage a per-Gaussian residual displacement and amplitude change are added on top.
  The decoder outputs ``g(z) - g(0)``, so ``z = 0`` decodes to the neutral GMM exactly, during and
  after training; :func:`pretrain_decoder` additionally makes every latent near zero decode to a GMM
  close to the neutral one before training starts (EMAN2 pre-trains for the same reason), so the
  first epochs start from the consensus structure rather than from a random deformation.

Networks are built from an explicit ``torch.Generator``: nothing touches the global random state,
and the same seed gives bit-identical weights.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from gmmrefine.gmm.model import GaussianMixture

STAGES = ("coarse", "full")


def half_seed(base_seed: int, half: int, what: str = "hetero") -> int:
    """A seed for one half set derived from ``base_seed`` (sha256; halves get unrelated streams)."""
    digest = hashlib.sha256(f"{int(base_seed)}:{what}:half{int(half)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _linear(n_in: int, n_out: int, generator: torch.Generator, gain: float = 1.0) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default (Kaiming-uniform) scale, drawn from ``generator``."""
    layer = nn.Linear(n_in, n_out)
    bound = gain / math.sqrt(n_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


def _mlp(sizes: list[int], generator: torch.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(_linear(a, b, generator, gain=math.sqrt(3.0)))
        if k < len(sizes) - 2:
            layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """Dense network ``(B, F)`` features -> ``(B, L)`` latent vectors.

    The features are standardised with per-feature ``mean`` and ``scale`` measured on the half's own
    particles (:meth:`set_normalisation`), so the network sees O(1) inputs whatever the noise level.

    Args:
        n_features: ``F``.
        latent_dim: ``L``.
        hidden: widths of the hidden layers.
        generator: source of the initial weights.
    """

    feature_mean: torch.Tensor  # buffers
    feature_scale: torch.Tensor

    def __init__(self, n_features: int, latent_dim: int, hidden: tuple[int, ...], generator: torch.Generator):
        super().__init__()
        self.net = _mlp([n_features, *hidden, latent_dim], generator)
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_scale", torch.ones(n_features))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise features with ``(x - mean) / std`` (std floored at 1e-6 of its largest value)."""
        floor = std.max().clamp_min(1e-30) * 1e-6
        with torch.no_grad():
            self.feature_mean.copy_(mean)
            self.feature_scale.copy_(1.0 / std.clamp_min(floor))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.feature_mean) * self.feature_scale)


def coarse_clusters(neutral: GaussianMixture, n_coarse: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of the full GMM's centres into the coarse GMM.

    Returns:
        ``(labels (N,) long, coarse_centers_A (K, 3))``: the coarse centres are the amplitude-weighted
        means of their clusters; ``K = min(n_coarse, N)``.
    """
    from gmmrefine.gmm.masks import kmeans_patches

    k = max(1, min(int(n_coarse), neutral.n))
    labels = kmeans_patches(neutral.detach().to(device="cpu"), k, seed=seed)
    weights = neutral.amplitudes.detach().cpu().to(torch.float64).clamp_min(1e-12)
    centers = neutral.centers_A.detach().cpu().to(torch.float64)
    sums = torch.zeros(k, 3, dtype=torch.float64).index_add_(0, labels, centers * weights[:, None])
    totals = torch.zeros(k, dtype=torch.float64).index_add_(0, labels, weights)
    return labels, (sums / totals[:, None]).to(torch.float32)


def blend_weights(centers_A: torch.Tensor, coarse_centers_A: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` weights (rows sum to 1) by which each full Gaussian follows the coarse ones.

    Gaussian radial basis of the distance with ``sigma`` = half the mean nearest-neighbour distance
    between coarse centres: a Gaussian at a coarse centre moves with it (neighbours weigh
    ``exp(-2)``), and one between two clusters moves with both, so the decoded motion is smooth.
    """
    c = coarse_centers_A.to(torch.float64)
    k = c.shape[0]
    if k == 1:
        return torch.ones(centers_A.shape[0], 1, dtype=torch.float32, device=centers_A.device)
    d = torch.cdist(c, c) + torch.eye(k, dtype=c.dtype) * 1e30
    sigma = 0.5 * float(d.min(1).values.mean())
    d2 = torch.cdist(centers_A.detach().cpu().to(torch.float64), c) ** 2
    w = torch.softmax(-d2 / (2 * sigma * sigma), dim=1)
    return w.to(dtype=torch.float32, device=centers_A.device)


class Decoder(nn.Module):
    """Latent ``(B, L)`` -> per-particle GMM centres ``(B, N, 3)`` and amplitudes ``(B, N)``.

    ``centres = c0 + W @ D_coarse(z) [+ D_fine(z)]``, ``amplitudes = a0 * exp(dlog_a(z))`` (``"full"``
    stage only), each head being ``h(z) - h(0)`` of a shared dense trunk, in units of
    ``coarse_scale_A`` / ``fine_scale_A`` angstrom (so the network works with O(1) numbers).

    Args:
        neutral: the consensus GMM of this half.
        latent_dim: ``L``.
        blend: ``(N, K)`` :func:`blend_weights`.
        hidden: widths of the trunk's layers.
        generator: source of the initial weights.
        coarse_scale_A, fine_scale_A: displacement units of the two heads.
        amplitude_scale: unit of the log-amplitude change.
    """

    centers_A: torch.Tensor  # buffers
    amplitudes: torch.Tensor
    widths_A: torch.Tensor
    blend: torch.Tensor

    def __init__(self, neutral: GaussianMixture, latent_dim: int, blend: torch.Tensor, hidden: tuple[int, ...],
                 generator: torch.Generator, coarse_scale_A: float = 5.0, fine_scale_A: float = 1.0,
                 amplitude_scale: float = 0.3):
        super().__init__()
        n, k = blend.shape
        self.latent_dim = int(latent_dim)
        self.register_buffer("centers_A", neutral.centers_A.detach().to(torch.float32).clone())
        self.register_buffer("amplitudes", neutral.amplitudes.detach().to(torch.float32).clone())
        self.register_buffer("widths_A", neutral.widths_A.detach().to(torch.float32).clone())
        self.register_buffer("blend", blend.to(torch.float32).clone())
        self.trunk = _mlp([latent_dim, *hidden], generator)
        self.trunk.append(nn.SiLU())
        width = hidden[-1]
        self.coarse_head = _linear(width, 3 * k, generator)
        self.fine_head = _linear(width, 3 * n, generator)
        self.amplitude_head = _linear(width, n, generator)
        self.coarse_scale_A = float(coarse_scale_A)
        self.fine_scale_A = float(fine_scale_A)
        self.amplitude_scale = float(amplitude_scale)
        self.stage = "coarse"

    @property
    def n_gaussians(self) -> int:
        return int(self.centers_A.shape[0])

    @property
    def n_coarse(self) -> int:
        return int(self.blend.shape[1])

    def set_stage(self, stage: str) -> None:
        """``"coarse"``: only the coarse displacements act; ``"full"``: residuals and amplitudes too."""
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.stage = stage

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        """The parameters trained in ``stage`` (default: the current one)."""
        stage = stage or self.stage
        params = list(self.trunk.parameters()) + list(self.coarse_head.parameters())
        if stage == "full":
            params += list(self.fine_head.parameters()) + list(self.amplitude_head.parameters())
        return params

    def deformation(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(displacement_A (B, N, 3), log_amplitude_change (B, N))`` of latents ``(B, L)``."""
        b = z.shape[0]
        both = torch.cat([z, torch.zeros(1, z.shape[1], dtype=z.dtype, device=z.device)])
        h = self.trunk(both)
        coarse = self.coarse_head(h)
        coarse = (coarse[:b] - coarse[b:]).view(b, self.n_coarse, 3) * self.coarse_scale_A
        disp = torch.einsum("nk,bkd->bnd", self.blend, coarse)
        if self.stage == "full":
            fine = self.fine_head(h)
            disp = disp + (fine[:b] - fine[b:]).view(b, self.n_gaussians, 3) * self.fine_scale_A
            amp = self.amplitude_head(h)
            dlog = (amp[:b] - amp[b:]) * self.amplitude_scale
        else:
            dlog = torch.zeros(b, self.n_gaussians, dtype=z.dtype, device=z.device)
        return disp, dlog

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(centers_A (B, N, 3), amplitudes (B, N))`` of the decoded GMMs."""
        disp, dlog = self.deformation(z)
        return self.centers_A + disp, self.amplitudes * torch.exp(dlog)

    def decode_gmm(self, z: torch.Tensor) -> list[GaussianMixture]:
        """The decoded GMMs of latents ``(B, L)`` as :class:`GaussianMixture` objects (no gradients)."""
        with torch.no_grad():
            centers, amps = self(z)
        return [GaussianMixture(centers[i].cpu(), amps[i].cpu(), self.widths_A.cpu().clone())
                for i in range(z.shape[0])]


def build_decoder(neutral: GaussianMixture, latent_dim: int, *, n_coarse: int = 32, hidden: tuple[int, ...] = (64, 128),
                  seed: int = 0, generator: torch.Generator | None = None, **scales) -> Decoder:
    """A :class:`Decoder` for ``neutral`` with its coarse GMM from k-means (seeded by ``seed``)."""
    labels, coarse = coarse_clusters(neutral, n_coarse, seed)
    blend = blend_weights(neutral.centers_A.detach().cpu().to(torch.float32), coarse)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    dec = Decoder(neutral.detach().to(device="cpu", dtype=torch.float32), latent_dim, blend, hidden, gen, **scales)
    dec.coarse_labels = labels
    dec.coarse_centers_A = coarse
    return dec


def pretrain_decoder(decoder: Decoder, generator: torch.Generator, *, steps: int = 100, latent_sigma: float = 1.0,
                     lr: float = 1e-3, target_rms_A: float = 0.05) -> float:
    """Pre-train the decoder so that latents around zero decode to (nearly) the neutral GMM.

    Minimises the mean squared displacement and log-amplitude change of latents drawn from
    ``N(0, latent_sigma^2)`` (both heads, whatever the stage), stopping early once the RMS
    displacement is below ``target_rms_A``. ``z = 0`` is exactly neutral by construction.

    Returns:
        The RMS displacement (angstrom) at the end, on the last batch.
    """
    stage = decoder.stage
    decoder.set_stage("full")
    params = decoder.stage_parameters("full")
    opt = torch.optim.Adam(params, lr=lr)
    device = decoder.centers_A.device
    rms = float("nan")
    try:
        for _ in range(steps):
            z = torch.randn(64, decoder.latent_dim, generator=generator).to(device) * latent_sigma
            disp, dlog = decoder.deformation(z)
            msd = (disp * disp).sum(-1).mean()
            rms = float(msd.detach().sqrt())
            if rms < target_rms_A:
                break
            loss = msd + (dlog * dlog).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        decoder.set_stage(stage)
        for p in params:
            p.grad = None
    return rms


def pca(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of ``(n, L)`` latents.

    Returns:
        ``(scores (n, L), components (L, L) rows = directions, mean (L,), explained_variance (L,))``;
        each component's sign is fixed so that its largest-magnitude entry is positive.
    """
    x = np.asarray(latents, dtype=np.float64)
    mean = x.mean(0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    flip = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(1)])
    flip[flip == 0] = 1.0
    vt = vt * flip[:, None]
    scores = (x - mean) @ vt.T
    return scores, vt, mean, s**2 / max(len(x) - 1, 1)


#: Particles of a half whose decoded motions set the motion components (spread evenly over the half).
MOTION_SAMPLE = 2000


def _weighted_motion(decoder: Decoder, z: torch.Tensor, sqrt_mass: torch.Tensor) -> torch.Tensor:
    """``(B, 3N)`` displacements of latents ``z`` scaled by the root of each Gaussian's share of the mass."""
    with torch.no_grad():
        disp, _ = decoder.deformation(z)
    return (disp * sqrt_mass[None, :, None]).flatten(1).to(torch.float64)


def motion_pca(latents: np.ndarray, decoder: Decoder, *, sample: int = MOTION_SAMPLE,
               batch: int = 512) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Principal components of the particles' decoded motions, not of their latents.

    The latent axes have no scale of their own: the prior holds every dimension near unit variance, so
    with more latent dimensions than motions the spare ones, which fit noise, spread as widely as the
    motion (measured on the hetero_peer validation set, true poses: 27 / 26 / 24 / 23 % of the latent
    variance, and the hinge on PC3 of half 2, |Spearman| 0.135 on PC1). What a latent does to the map
    is its decoded displacement; the decoder moves the Gaussians little along the noise dimensions. So
    the components are directions of the displacement field weighted by the Gaussians' mass
    (``amplitude * width^3``), found by an SVD of an even sample of up to ``sample`` particles; each
    particle's score is its centred weighted displacement along them (angstrom, RMS over the mass), and
    each component's latent direction the least-squares latent change per angstrom of its score (the
    trajectories walk along it). Measured on the saved networks of those runs, PC1 |Spearman| per half,
    latents -> motions: validation set, true poses 0.620 / 0.135 -> 0.630 / 0.583, consensus poses
    0.651 / 0.661 -> 0.663 / 0.661; tuning set, true poses 0.812 / 0.776 -> 0.818 / 0.777.

    Args:
        latents: ``(n, L)`` latents of one half.
        decoder: that half's :class:`Decoder`.

    Returns:
        ``(scores (n, C) A, centred, directions (C, L) latent change per A of score, mean latent (L,),
        explained_variance (C,) A^2)`` with ``C = min(L, n)``, components by decreasing variance; each
        sign is fixed so that the largest-magnitude entry of the displacement direction is positive.
    """
    from gmmrefine.refine.global_refine import sample_rows

    z_all = np.asarray(latents, dtype=np.float32)
    n, dim = z_all.shape
    device = decoder.centers_A.device
    mass = decoder.amplitudes * decoder.widths_A**3
    sqrt_mass = (mass / mass.sum()).sqrt()
    rows = sample_rows(n, sample)
    d = _weighted_motion(decoder, torch.as_tensor(z_all[rows], device=device), sqrt_mass)
    centre = d.mean(0)
    n_comp = min(dim, d.shape[0])
    # A few leading components of a (sample, 3N) matrix: the randomised SVD (seeded: the same result on
    # every run) instead of a full one (3N is 27,000 at 9,000 Gaussians).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        _, _, v = torch.svd_lowrank(d - centre, q=min(n_comp + 8, *d.shape), niter=4)
    vt = v[:, :n_comp].T
    flip = torch.sign(vt[torch.arange(n_comp), vt.abs().argmax(1)])
    vt = vt * torch.where(flip == 0, torch.ones_like(flip), flip)[:, None]
    scores = np.empty((n, n_comp))
    for s in range(0, n, batch):
        chunk = torch.as_tensor(z_all[s:s + batch], device=device)
        scores[s:s + batch] = ((_weighted_motion(decoder, chunk, sqrt_mass) - centre) @ vt.T).cpu().numpy()
    mean = z_all.astype(np.float64).mean(0)
    scores -= scores.mean(0)
    directions = np.linalg.lstsq(scores, z_all - mean, rcond=None)[0]          # (C, L)
    variance = scores.var(0, ddof=1) if n > 1 else np.zeros(n_comp)
    order = np.argsort(-variance, kind="stable")    # the sample's order can differ from the half's
    return scores[:, order], directions[order], mean, variance[order]

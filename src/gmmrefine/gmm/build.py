"""Build a GMM that represents a map up to a target resolution.

N is given, or the number of non-hydrogen atoms of a model, or estimated so that the mean
nearest-neighbour distance of the k-means seeds is half the target resolution (see
``NN_FRACTION_OF_RESOLUTION``). Centres are seeded by
density-weighted k-means of the voxels above a threshold near the molecule (:func:`molecule_region`,
grown by a margin), or from the model's atoms randomised at the target resolution (so the model does
not bias the result), or warm-started from a previous GMM. Then centres, amplitudes and widths are
fitted with Adam, in the centred box that holds the molecule and the Gaussians (:func:`fit_box`).
Measured on the box-256 benchmark (an adk O assembly, half maps of 1,000 particles, working grid 180 px
at 1.42 A/px): seeds taken from the whole map put 1,835 of 6,631 Gaussians in the solvent; near the
molecule, 35. A fresh fit at 4.3 A took 23 s instead of 54 s (fit box 74 px instead of 120) and the
next iteration's warm-started one 16 s instead of 50 s (110 px instead of 180), and the GMMs came closer
to the noise-free map: mean FSC over the band 0.949 / 0.958 instead of 0.934 / 0.925, over its last 5
shells 0.841 / 0.865 instead of 0.827 / 0.755.

Fit in 3D Fourier space, not on projections: the map's transform is known exactly on the grid, so the
GMM is fitted to the map directly, restricted to ``|k| <= 1/resolution`` and with each shell weighted by
its own power, which is what the map-GMM FSC measures. The 3D transform of a GMM is evaluated with the
same separable kernel as the projections (:func:`gmmrefine.gmm.project.project_positions`): the plane
``kz`` of the transform is a 2D projection whose amplitudes are ``A exp(-2 pi^2 s^2 kz^2) (cos, sin)
(2 pi kz z)``. Projection matching (the paper's route) was not implemented: every projection holds
one central slice of the same transform, so matching enough of them to cover the sphere costs more
than the direct 3D fit, which already reaches the FSC target in a few seconds.
Measured (1 thread, 2-core machine shared with other jobs, tests/test_gmm_build.py): adk at 4 A, box 48 at
1.5 A/px, N = 1,013 estimated, k-means seeds, 100 steps: 5.0 s, FSC >= 0.938 out to 4 A; at 3 A, box 64
at 1 A/px, N = 1,656 atoms randomised, 80 steps: 4.0 s, FSC >= 0.974 out to 3.3 A (0.94 at 3.0 A with
120 steps).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from gmmrefine.errors import InputError
from gmmrefine.fourier.fft import rfft3_centered
from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import FourierBand, fourier_band, project_positions

# Mean nearest-neighbour distance of k-means centroids of a uniform region is ~ 0.9 rho^(-1/3)
# (between a random set, 0.55, and a close-packed lattice, 1.12); used for the first guess of N, then
# corrected once from the measured distance.
_NN_FACTOR = 0.9
# Target mean nearest-neighbour distance of the Gaussians, as a fraction of the resolution. The paper
# matches it to the resolution itself; measured on adk at 4 A (box 48, 1.5 A/px) that gives FSC ~0.6
# at 4 A (N = 300, spacing 3.3 A), while spacing 2.8 A (N = 500) reaches 0.91 and 2.1 A (N = 800)
# 0.95: a Gaussian per half resolution element is what FSC >= 0.9 at the target needs.
NN_FRACTION_OF_RESOLUTION = 0.5
# The spacing of a GMM used as an alignment reference, as a fraction of the resolution. The paper's rule
# is the resolution itself (1.0): a reference needs far fewer Gaussians than a faithful copy of a noisy
# half map (0.5 above), and aligns as well or better, several times faster. Measured on the refinement
# benchmark's adk set (2,000 particles, box 96, 1.2 A/px, SNR 0.1), first with 400 half-1 particles
# refined 3 times from 4-degree errors against one fixed GMM: at 4.27 A, N = 125 / 349 / 743 / 1,515 /
# 4,467 gave 1.88 / 1.19 / 1.21 / 1.27 / 1.42 degrees; at 3.03 A, N = 500 / 1,000 / 2,000 / 3,400 /
# 5,821 / 11,854 gave 0.97 / 0.82 / 0.83 / 0.87 / 0.90 / 0.98 degrees (time per pass grows with N).
# Then whole 3-iteration refinements (angular error after iterations 1 / 2 / 3, N at iteration 3):
# fraction 1.0: 2.60 / 1.44 / 0.89 degrees (N ~ 800); 0.8: 2.60 / 1.47 / 0.84 (N ~ 1,550); the
# faithful 0.5 with the spacing correction: 2.65 / 1.44 / 0.80 (N ~ 4,600), all ending at 2.90-2.91 A.
# 0.8 sits in the flat optimum of both fixed-GMM scans and costs a third of the faithful GMM's time.
REFERENCE_SPACING_FRACTION = 0.8
# Low-pass (A) of the copy of the map whose thresholded volume counts as the molecule (estimate_n).
VOLUME_LOWPASS_A = 8.0
# The fit band reaches half a shell past the target so the FSC shell at the target resolution
# (radii round(|k| D) = s) is fitted whole. Going further, into shells where a low-pass filter has
# left almost no power, hurts: each shell is weighted by 1 / its power (measured: 1.5 shells past the
# target dropped the FSC at 4.8 A from 0.995 to 0.92).
_FIT_EXTRA_SHELLS = 0.5


#: Groups of kz planes the 3D transform is computed in (:func:`fourier_samples_3d`), each on the 2D band
#: its nearest plane to kz = 0 needs: the plane ``kz`` of the sphere ``|k| <= K`` is a disc of radius
#: ``sqrt(K^2 - kz^2)``, so equal ranges of ``|kz|`` in 8 groups compute 73 % of the pixels of the
#: full disc in every plane (the pixels dropped have zero weight in the fit: the same loss).
PLANE_GROUPS = 8


@dataclass(frozen=True)
class FourierSamples3D:
    """Frequencies of a cubic map's ``rfft3_centered`` transform inside a sphere, organised in kz
    planes of a 2D band so the GMM transform is a batch of 2D projections.

    Attributes:
        band: the 2D band ``0 < |(kx, ky)| <= 1/maxres``.
        kz: ``(2K+1,)`` signed integer kz index of each plane (order: 0..K then -1..-K).
        inside: ``(2K+1, P)`` bool, ``|k| <= 1/maxres`` in 3D.
        flat_index: ``(2K+1, P)`` flat index into the ``(D, D, D//2+1)`` spectrum.
        shell: ``(2K+1, P)`` integer shell ``round(|k| D)``.
        groups: ``(kz (n,) ascending |kz| >= 0, sub-band, columns (P_g,) of the sub-band's pixels in
            ``band``)`` per group of planes (:data:`PLANE_GROUPS`): the sub-band holds every pixel of
            those planes that is ``inside`` (None: none is).
    """

    band: FourierBand
    kz: torch.Tensor
    inside: torch.Tensor
    flat_index: torch.Tensor
    shell: torch.Tensor
    groups: tuple[tuple[torch.Tensor, FourierBand | None, torch.Tensor], ...]


def fourier_samples_3d(box: int, apix: float, maxres_A: float, *, device=None) -> FourierSamples3D:
    band = fourier_band(box, apix, math.inf, maxres_A, device=device)
    k = band.k_max
    kz = torch.cat([torch.arange(0, k + 1), -torch.arange(1, k + 1)]).to(device)
    ny, nx = band.ny, band.nx
    r2 = (nx * nx + ny * ny)[None] + (kz * kz)[:, None]
    rad = torch.sqrt(r2.double())
    radius_px = box * apix / maxres_A + 1e-9
    inside = rad <= radius_px
    d = box
    flat = ((kz[:, None] % d) * d + (ny[None] % d)) * (d // 2 + 1) + nx[None]
    groups = []
    edges = np.unique(np.linspace(0, k + 1, min(PLANE_GROUPS, k + 1) + 1).round().astype(int))
    for lo, hi in zip(edges[:-1], edges[1:]):
        disc_px = math.sqrt(max(radius_px**2 - lo**2, 0.0)) + 1e-6
        if disc_px < 1:
            sub = None  # only kx = ky = 0 inside, which the 2D band leaves out
        elif lo == 0 or disc_px >= band.k_max:
            sub = band
        else:
            sub = fourier_band(box, apix, math.inf, box * apix / disc_px, device=device)
        columns = torch.searchsorted(band.pixel_index, sub.pixel_index) if sub is not None else band.pixel_index[:0]
        groups.append((torch.arange(lo, hi, device=device), sub, columns))
    return FourierSamples3D(band, kz, inside, flat, torch.round(rad).long(), tuple(groups))


def gmm_spectrum_3d(centers_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor,
                    samples: FourierSamples3D) -> torch.Tensor:
    """The GMM's 3D transform (``rfft3_centered`` normalisation) at the sample frequencies.

    Each group of planes is computed on its own sub-band (:attr:`FourierSamples3D.groups`); the pixels
    of a plane beyond its group's sub-band (all outside the sphere) are 0.

    Returns:
        ``(2K+1, P)`` complex; differentiable in all parameters.
    """
    band = samples.band
    plus_parts, minus_parts = [], []
    for kz, sub, columns in samples.groups:
        n = kz.shape[0]
        if sub is None:
            zeros = torch.complex(*(centers_A.new_zeros(n, band.n_pixels),) * 2)   # complex of the model's dtype
            plus_parts.append(zeros)
            minus_parts.append(zeros[kz > 0])
            continue
        fz = kz.to(centers_A.dtype) / (band.box * band.apix)
        env = torch.exp(-2 * math.pi**2 * widths_A[None] ** 2 * fz[:, None] ** 2)        # (n, N)
        phase = 2 * math.pi * fz[:, None] * centers_A[None, :, 2]
        amp = amplitudes[None] * env
        batch_amp = torch.cat([amp * torch.cos(phase), amp * torch.sin(phase)])         # (2n, N)
        re, im = project_positions(centers_A[None, :, :2], batch_amp, widths_A, sub)
        pc_re, ps_re = re[:n], re[n:]
        pc_im, ps_im = im[:n], im[n:]
        # exp(-2 pi i kz z) = cos - i sin: F(+kz) = Pc - i Ps, F(-kz) = Pc + i Ps.
        plus = torch.complex(pc_re + ps_im, pc_im - ps_re)
        minus = torch.complex(pc_re - ps_im, pc_im + ps_re)[kz > 0]
        if sub is not band:
            plus = plus.new_zeros(plus.shape[0], band.n_pixels).index_copy(1, columns, plus)
            minus = minus.new_zeros(minus.shape[0], band.n_pixels).index_copy(1, columns, minus)
        plus_parts.append(plus)
        minus_parts.append(minus)
    return torch.cat(plus_parts + minus_parts)


def _validate_volume(volume: torch.Tensor, name: str = "map") -> None:
    if volume.ndim != 3 or not (volume.shape[0] == volume.shape[1] == volume.shape[2]):
        raise InputError(f"{name}: expected a cubic 3D map, got shape {tuple(volume.shape)}.")
    if not bool(torch.isfinite(volume).all()):
        raise InputError(f"{name}: the map contains NaN or infinite values.")


def seed_kmeans(volume: torch.Tensor, apix: float, n: int, *, threshold: float | None = None,
                mask: torch.Tensor | None = None, seed: int = 0, init: str = "k-means++") -> np.ndarray:
    """Density-weighted k-means of the voxels above ``threshold`` (inside ``mask`` > 0.5).

    Args:
        volume: ``(D, D, D)`` map.
        threshold: density threshold (default: mean + 1.5 std of the map, or of the masked voxels).
        init: scikit-learn's ``KMeans`` start: ``"k-means++"`` (greedy, one step per centre) or
            ``"random"`` (voxels drawn with probability proportional to their weight).

    Returns:
        ``(n, 3)`` float64 centres, x, y, z in angstrom from the box centre.
    """
    from sklearn.cluster import KMeans

    vol = volume.detach().cpu().to(torch.float64)
    region = torch.ones_like(vol, dtype=torch.bool) if mask is None else mask.detach().cpu() > 0.5
    values = vol[region]
    if threshold is None:
        threshold = float(values.mean() + 1.5 * values.std())
    pick = region & (vol > threshold)
    count = int(pick.sum())
    if count < n:
        raise InputError(f"map: {n} Gaussians requested but only {count} voxels lie above the threshold "
                         f"{threshold:.4g}; lower the threshold or ask for fewer Gaussians.")
    zyx = torch.nonzero(pick).to(torch.float64)
    box = vol.shape[0]
    xyz = (zyx.flip(-1) - box // 2) * apix
    weight = (vol[pick] - threshold).numpy()
    km = KMeans(n_clusters=n, init=init, n_init=1, max_iter=50, random_state=seed, tol=1e-3)
    km.fit(xyz.numpy(), sample_weight=weight)
    return km.cluster_centers_


def count_seed_voxels(volume: torch.Tensor, *, threshold: float | None = None,
                      mask: torch.Tensor | None = None) -> int:
    """Voxels :func:`seed_kmeans` would cluster (above ``threshold``, default mean + 1.5 std, inside ``mask``)."""
    vol = volume.detach().cpu().to(torch.float64)
    region = torch.ones_like(vol, dtype=torch.bool) if mask is None else mask.detach().cpu() > 0.5
    if threshold is None:
        values = vol[region]
        threshold = float(values.mean() + 1.5 * values.std())
    return int((region & (vol > threshold)).sum())


def mean_nearest_neighbour_A(centers_A: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(centers_A) < 2:
        return math.inf
    dist, _ = cKDTree(centers_A).query(centers_A, k=2)
    return float(dist[:, 1].mean())


def estimate_n(volume: torch.Tensor, apix: float, resolution_A: float, *, threshold: float | None = None,
               mask: torch.Tensor | None = None, spacing_fraction: float = NN_FRACTION_OF_RESOLUTION) -> int:
    """Number of Gaussians whose k-means spacing in the molecule is ``spacing_fraction * resolution_A``.

    The molecule is the region above ``threshold`` (default mean + 1.5 sd) of the map low-passed to
    ``VOLUME_LOWPASS_A`` (when the given map is finer), so that the noise speckles of a half map
    filtered to high resolution do not count as molecule. Measured on the half maps of a 2,000-particle
    adk set (box 96, 1.2 A/px): 64,590 / 38,040 A^3 above the threshold at 3 A (start / after two
    iterations) but 37,722 / 36,649 A^3 at 8 A, as the noise-free map (36,897 A^3).
    """
    pick = molecule_region(volume, apix, resolution_A, threshold=threshold, mask=mask)
    volume_A3 = float(pick.sum()) * apix**3
    spacing = spacing_fraction * resolution_A
    return max(1, int(round(volume_A3 * (_NN_FACTOR / spacing) ** 3)))


def molecule_region(volume: torch.Tensor, apix: float, resolution_A: float, *, threshold: float | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(D, D, D)`` bool: the voxels above ``threshold`` (default mean + 1.5 sd, inside ``mask``) of the
    map low-passed to ``VOLUME_LOWPASS_A`` when it is finer (see :func:`estimate_n`), without the
    connected pieces smaller than ``_MIN_PIECE_FRACTION`` of the largest (noise)."""
    from gmmrefine.fourier.filters import low_pass

    vol = volume.detach().cpu().to(torch.float32)
    if resolution_A < VOLUME_LOWPASS_A:
        vol = low_pass(vol, VOLUME_LOWPASS_A, apix)
    vol = vol.to(torch.float64)
    region = torch.ones_like(vol, dtype=torch.bool) if mask is None else mask.detach().cpu() > 0.5
    if threshold is None:
        values = vol[region]
        threshold = float(values.mean() + 1.5 * values.std())
    above = (region & (vol > threshold)).numpy()
    # Noise speckles of a noisy map can pass the threshold even at 8 A; they are small islands, the
    # molecule's pieces are not.
    labels, count = ndimage.label(above)
    if count > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        keep = sizes >= _MIN_PIECE_FRACTION * sizes.max()
        above = keep[labels]
    return torch.from_numpy(above)


# Connected pieces of the thresholded map smaller than this fraction of the largest are noise (molecule_region).
_MIN_PIECE_FRACTION = 0.05
# Margin (A) around the molecule and the Gaussians of the box a GMM is fitted in: the Gaussians' tails
# (widths ~0.3 x the resolution) and the map's blur at the fit resolution stay inside, with room.
_FIT_MARGIN_A = 5.0
_FIT_MARGIN_RESOLUTIONS = 2.0
# Fraction of the molecule's voxels (and of the Gaussians) the fit box must hold: a few noise speckles
# far out do not widen it.
_FIT_EXTENT_QUANTILE = 0.998


def fit_box(volume: torch.Tensor, apix: float, resolution_A: float, centers_A: torch.Tensor, *,
            threshold: float | None = None) -> int:
    """Even edge (voxels) of the centred cube that holds the molecule and the Gaussians with a margin.

    The fit's cost grows as ``N K^3`` with ``K = D apix / resolution`` the band's radius in Fourier
    voxels, so it follows the edge of the box, not the band: a map cropped in real space to the molecule
    is sampled more coarsely in Fourier space, and nothing inside it is lost. Measured on the box-256
    benchmark (an adk O assembly reaching 55 A from the centre along the axes): 74 px of the 120-px grid
    at 4.3 A and 110 px of 180 at 4.0 A.

    Args:
        volume: ``(D, D, D)`` map; centers_A: ``(N, 3)`` Gaussian centres, A from the box centre.

    Returns:
        ``D`` itself when the crop would save little (under 10 % of the edge).
    """
    box = volume.shape[-1]
    zyx = torch.nonzero(molecule_region(volume, apix, resolution_A, threshold=threshold))
    extents = [(zyx.to(torch.float64) - box // 2).abs().amax(-1) * apix] if zyx.numel() else []
    if centers_A.numel():
        extents.append(centers_A.detach().cpu().to(torch.float64).abs().amax(-1))
    if not extents:
        return box
    half_A = max(float(torch.quantile(e, _FIT_EXTENT_QUANTILE)) for e in extents)
    half_A += _FIT_MARGIN_A + _FIT_MARGIN_RESOLUTIONS * resolution_A
    size = 2 * math.ceil(half_A / apix)
    return box if size > 0.9 * box else size


def dilate(region: torch.Tensor, radius_px: int) -> torch.Tensor:
    """A ``(D, D, D)`` bool region grown by ``radius_px`` voxels along each axis (a cube, three 1D passes)."""
    if radius_px <= 0:
        return region
    grid = region[None, None].to(torch.float32)
    k = 2 * radius_px + 1
    for kernel in ((k, 1, 1), (1, k, 1), (1, 1, k)):
        pad = tuple(x // 2 for x in kernel)
        grid = torch.nn.functional.max_pool3d(grid, kernel, stride=1, padding=pad)
    return grid[0, 0] > 0.5


def crop_centred(volume: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``(size,)*3`` cube of a ``(D, D, D)`` map; voxel ``D // 2`` becomes ``size // 2``."""
    start = volume.shape[-1] // 2 - size // 2
    return volume[start:start + size, start:start + size, start:start + size]


def build_gmm(volume, apix: float, resolution_A: float, *, n: int | None = None, model_atoms=None,
              mask=None, init: GaussianMixture | None = None, seed: int = 0, threshold: float | None = None,
              steps: int = 100, device=None, kmeans_init: str = "k-means++") -> tuple[GaussianMixture, dict]:
    """Fit a GMM to a map up to ``resolution_A``.

    Args:
        volume: ``(D, D, D)`` map ``[z, y, x]`` (tensor or array); apix: A/voxel.
        resolution_A: target resolution; the fit uses ``|k| <= 1 / resolution_A``.
        n: number of Gaussians (default: non-H atoms of ``model_atoms``, else estimated).
        model_atoms: :class:`gmmrefine.io.models.Atoms` (or ``(M, 3)`` coordinates) in the map's frame
            (model coordinates, map origin at voxel 0); seeds one Gaussian per non-H atom, randomised
            by ``resolution / (2 sqrt 3)`` per axis.
        mask: optional ``(D, D, D)`` mask restricting the k-means seeding to ``mask > 0.5``.
        init: warm start (skips seeding; ``n`` and ``model_atoms`` ignored).
        seed: random seed (k-means and atom randomisation).
        threshold: seeding threshold (default mean + 1.5 std).
        steps: Adam steps.
        kmeans_init: start of the k-means seeding (:func:`seed_kmeans`'s ``init``).

    Returns:
        ``(gmm, info)``; info has ``n``, ``seeding``, ``fit_box`` (the edge of the centred cube the fit
        ran in, :func:`fit_box`), ``fit_seconds``, ``fsc`` (per shell, float list),
        ``resolution_fsc09_A`` (where the map-GMM FSC falls below 0.9), ``loss``.
    """
    t0 = time.perf_counter()
    vol = torch.as_tensor(np.asarray(volume) if not torch.is_tensor(volume) else volume)
    vol = vol.to(device=device, dtype=torch.float32)
    _validate_volume(vol)
    box = vol.shape[0]
    if not (resolution_A >= 2 * apix * 0.999):
        raise InputError(f"build-gmm: resolution {resolution_A} A is finer than Nyquist ({2 * apix:.3g} A).")
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(np.asarray(mask) if not torch.is_tensor(mask) else mask).to(vol.device)
        if mask_t.shape != vol.shape:
            raise InputError(f"mask: shape {tuple(mask_t.shape)} differs from the map's {tuple(vol.shape)}.")
    gen = torch.Generator().manual_seed(seed)
    s0 = 0.3 * resolution_A
    if init is not None:
        centers = init.centers_A.detach().to(vol.device, torch.float32)
        widths = init.widths_A.detach().to(vol.device, torch.float32)
        amps = init.amplitudes.detach().to(vol.device, torch.float32)
        seeding = "warm start"
    elif model_atoms is not None:
        coords = getattr(model_atoms, "coords_A", model_atoms)
        coords = np.asarray(coords, dtype=np.float64)
        hyd = getattr(model_atoms, "is_hydrogen", None)
        if hyd is not None:
            coords = coords[~np.asarray(hyd, dtype=bool)]
        if coords.ndim != 2 or coords.shape[0] == 0:
            raise InputError("model: no non-hydrogen atoms to seed the GMM from.")
        coords = torch.as_tensor(coords - (box // 2) * apix, dtype=torch.float32)
        if n is not None and n != coords.shape[0]:
            if n < 1:
                raise InputError(f"build-gmm: number of Gaussians must be >= 1, got {n}.")
            # Fewer Gaussians than atoms: a random subset; more: some atoms seed two (the noise below
            # separates them).
            pick = torch.randperm(coords.shape[0], generator=gen)[: min(n, coords.shape[0])]
            extra = torch.randint(coords.shape[0], (max(n - coords.shape[0], 0),), generator=gen)
            coords = coords[torch.cat([pick, extra])]
        noise = torch.randn(coords.shape, generator=gen) * (resolution_A / (2 * math.sqrt(3)))
        centers = (coords + noise).to(vol.device)
        widths = torch.full((centers.shape[0],), s0, device=vol.device)
        amps = None
        seeding = "model atoms"
    else:
        # Seeds only near the molecule: the noise of a half map filtered to high resolution puts voxels above
        # the threshold all over the solvent (measured at box 256, 4.3 A: 28 % of 6,631 Gaussians seeded
        # beyond the molecule's extent), Gaussians that fit noise and cost time in every projection.
        values = vol[mask_t > 0.5] if mask_t is not None else vol
        seed_threshold = float(values.mean() + 1.5 * values.std()) if threshold is None else threshold
        near = molecule_region(vol, apix, resolution_A, threshold=threshold, mask=mask_t)
        grown = dilate(near, math.ceil((_FIT_MARGIN_A + resolution_A) / apix))
        seed_mask: torch.Tensor | None = grown if mask_t is None else grown & (mask_t.detach().cpu() > 0.5)
        if count_seed_voxels(vol, threshold=seed_threshold, mask=seed_mask) < (n or 1):
            seed_mask = mask_t    # too few voxels near the molecule for the Gaussians asked for

        def seeds(count: int) -> np.ndarray:
            return seed_kmeans(vol, apix, count, threshold=seed_threshold, mask=seed_mask, seed=seed,
                               init=kmeans_init)

        if n is None:
            n_voxels = count_seed_voxels(vol, threshold=seed_threshold, mask=seed_mask)
            n = min(estimate_n(vol, apix, resolution_A, threshold=threshold, mask=mask_t), n_voxels)
            c = seeds(n)
            # One Gaussian has no neighbour (spacing infinite): ask for every voxel, capped below.
            nn = mean_nearest_neighbour_A(c) if n > 1 else math.inf
            ratio = (nn / (NN_FRACTION_OF_RESOLUTION * resolution_A)) ** 3
            n_new = n_voxels if not math.isfinite(ratio) else max(1, int(round(n * ratio)))
            # The correction can ask for more Gaussians than there are voxels to seed them from (measured:
            # 7,700 for 7,252 voxels, adk at 4.4 A, box 64 at 1.8 A/px); a Gaussian per voxel is the most.
            n_new = min(n_new, n_voxels)
            if abs(n_new - n) > 0.1 * n:
                n = n_new
                c = seeds(n)
        else:
            if n < 1:
                raise InputError(f"build-gmm: number of Gaussians must be >= 1, got {n}.")
            c = seeds(n)
        centers = torch.as_tensor(c, dtype=torch.float32, device=vol.device)
        widths = torch.full((centers.shape[0],), s0, device=vol.device)
        amps = None
        seeding = "k-means"

    # The fit box holds the whole molecule, not only a seeding mask: the Gaussians fit the map inside it.
    size = fit_box(vol, apix, resolution_A, centers, threshold=threshold)
    fit_maxres_A = max(1.0 / (1.0 / resolution_A + _FIT_EXTRA_SHELLS / (size * apix)), 2 * apix)
    samples = fourier_samples_3d(size, apix, fit_maxres_A, device=vol.device)
    target = rfft3_centered(crop_centred(vol, size).contiguous()).flatten()[samples.flat_index]   # (Z, P)
    weight = samples.inside.to(torch.float32)
    shells = samples.shell
    n_shells = int(shells.max()) + 1
    power = torch.zeros(n_shells, device=vol.device).index_add_(
        0, shells.flatten(), (target.abs() ** 2 * weight).flatten())
    used = power > 0
    pixel_weight = weight / power.clamp_min(1e-30)[shells] / max(int(used.sum()), 1)

    if amps is None:
        # Least-squares amplitude scale for the constant start.
        with torch.no_grad():
            unit = gmm_spectrum_3d(centers, torch.ones_like(widths), widths, samples)
            num = ((unit.conj() * target).real * pixel_weight).sum()
            den = ((unit.abs() ** 2) * pixel_weight).sum().clamp_min(1e-30)
            amps = torch.full_like(widths, float(num / den))
        amps = amps.clamp_min(1e-6 * float(amps.abs().max()) + 1e-12)

    c_param = centers.clone().requires_grad_(True)
    log_a = torch.log(amps.clamp_min(1e-30)).requires_grad_(True)
    log_s = torch.log(widths).requires_grad_(True)
    opt = torch.optim.Adam([
        {"params": [c_param], "lr": 0.05 * resolution_A},
        {"params": [log_a], "lr": 0.05},
        {"params": [log_s], "lr": 0.03},
    ])
    # Cosine decay: large early moves pull seeds into the density, small late moves refine it.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1), eta_min=0.0)
    loss_value = math.nan
    s_min = 0.25 * apix
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc="fit GMM", unit="step", disable=None, leave=False):
        opt.zero_grad(set_to_none=True)
        spec = gmm_spectrum_3d(c_param, torch.exp(log_a), torch.exp(log_s).clamp_min(s_min), samples)
        diff = spec - target
        loss = ((diff.real**2 + diff.imag**2) * pixel_weight).sum()
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    gmm = GaussianMixture(c_param.detach(), torch.exp(log_a).detach(),
                          torch.exp(log_s).detach().clamp_min(s_min))
    fit_seconds = time.perf_counter() - t0
    fsc = map_gmm_fsc(gmm, vol, apix)
    info = dict(n=gmm.n, seeding=seeding, fit_box=size, mean_nn_A=mean_nearest_neighbour_A(gmm.centers_A.cpu().double().numpy()),
                fit_seconds=fit_seconds, loss=loss_value, steps=steps,
                fsc=[float(x) for x in fsc], resolution_fsc09_A=resolution_at(fsc, box, apix, 0.9))
    return gmm, info


def map_gmm_fsc(gmm: GaussianMixture, volume: torch.Tensor, apix: float) -> torch.Tensor:
    """FSC between a map and the GMM rendered on its grid: ``(D//2+1,)`` float64."""
    vol = torch.as_tensor(volume)
    rendered = gmm.to(vol.device).render_map(vol.shape[0], apix)
    return fourier_shell_correlation(vol.to(torch.float32), rendered)

"""From accumulators to maps: regularised division, gridding correction, half maps of a particle set.

``reconstruct_map(acc)`` follows ``relion_reconstruct`` (RELION 3.1 ``BackProjector::reconstruct``),
measured to agree with it to FSC > 0.998 up to 0.8 Nyquist on the same particles: the inverse of the
weights is found by the iterative gridding of Pipe & Menon (1999) with RELION's blob (radius 1.9 px,
alpha 15, order 0, 10 iterations); the weighted numerator is inverse-transformed on the padded grid and cropped to
``D^3``; the corners beyond radius ``D/2`` are replaced by their mean with a 3-pixel cosine blend
(RELION's ``softMaskOutsideMap``), and the map is divided by ``sinc^2(r / Dp)``, the transform of the
trilinear kernel. ``preweight_iterations=0`` gives the plain division ``data / max(weight, min_weight)``.

``reconstruct_halves(ps)`` streams the particles of a :class:`~gmmrefine.io.particles.ParticleSet` in
chunks through one pass that fills both halves' accumulators, so memory is two padded grids plus one
chunk of images whatever the number of particles; the halves are then inverted one at a time (the
other waits on disk), and the FFTs run slab by slab in the grids' own storage.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import cast

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.ctf import phase_flip
from gmmrefine.fourier.fft import crop_projection_spectra, fourier_crop_2d, phase_shift_2d, rfft2_centered
from gmmrefine.fourier.masks import radius_grid, soft_mask_outside_map
from gmmrefine.geometry.rotations import euler_to_matrix
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.reconstruct.insert import FourierAccumulator, hermitian_symmetrised, symmetrised_grids

CTF_MODES = ("flip", "wiener", "none")

#: Pipe-Menon iterations of the inverse weights (RELION's ``--iter``).
PIPE_MENON_ITERATIONS = 10


def prepare_spectra(
    images: torch.Tensor,
    shift_A: torch.Tensor,
    apix: float,
    ctf: torch.Tensor | None,
    ctf_mode: str = "flip",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Centred, CTF-corrected spectra and their insertion weights.

    Args:
        images: ``(B, D, D)`` particle images (real space, float), or their complex ``(B, D, D//2+1)``
            :func:`~gmmrefine.fourier.fft.rfft2_centered` spectra.
        shift_A: ``(B, 2)`` RELION origins (x, y) in angstrom; images are translated by ``+origin``
            so the particle sits at the box centre.
        apix: pixel size in A/px.
        ctf: ``(B, D, D//2+1)`` real CTF of each image (RELION convention), or None for no CTF.
        ctf_mode: ``"flip"``: spectra ``sign(CTF) F`` (sign(0) = +1) with weight 1; ``"wiener"``:
            ``CTF F`` with weight ``CTF^2``; ``"none"``: the CTF is ignored (as ``ctf=None``).

    Returns:
        ``(spectra (B, D, D//2+1) complex64, weights (B, D, D//2+1) float32 or None for all ones)``.
    """
    if ctf_mode not in CTF_MODES:
        raise ValueError(f"ctf_mode must be one of {CTF_MODES}, got {ctf_mode!r}")
    spectra = images.to(torch.complex64) if images.is_complex() else rfft2_centered(images.to(torch.float32))
    spectra = phase_shift_2d(spectra, -image_translation_px(shift_A.to(torch.float32), apix))
    if ctf is None or ctf_mode == "none":
        return spectra, None
    ctf = ctf.to(device=spectra.device, dtype=torch.float32)
    if ctf_mode == "flip":
        return phase_flip(spectra, ctf), None
    return spectra * ctf, ctf * ctf


def reconstruct_map(
    acc: FourierAccumulator,
    *,
    preweight_iterations: int = PIPE_MENON_ITERATIONS,
    wiener_constant: float = 0.0,
    min_weight: float = 1e-6,
    mask_outside: bool = True,
    symmetry: torch.Tensor | None = None,
    consume: bool = False,
    inverse_start: torch.Tensor | None = None,
    inverse_out: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The map of an accumulator (see the module docstring for the steps).

    Args:
        acc: filled accumulator.
        preweight_iterations: Pipe & Menon iterations for the inverse weights (RELION's ``--iter``,
            10). 5 gives a slightly higher FSC to the truth at half the cost on dense data, but drifts
            from RELION's map (FSC 0.97 at 0.8 Nyquist) for half sets of ~150 particles. 0 divides
            voxel by voxel instead.
        wiener_constant: added to every weight before inversion (units of the weight: one particle at
            ``|CTF| = 1`` adds up to 1); 0 reproduces ``relion_reconstruct``.
        min_weight: floor of the (convolved) weight, against division by zero.
        mask_outside: blend the corners beyond radius ``D/2`` into their mean.
        symmetry: ``(K, 3, 3)`` point-group operators to impose by summing the grids over the group
            (:func:`~gmmrefine.reconstruct.insert.symmetrised_grids`, RELION's way); leave None when the
            particles were inserted with ``symmetry=`` already.
        consume: work in the accumulator's own grids (saves two padded grids of memory); the
            accumulator is invalid afterwards. Otherwise ``acc`` is not modified.
        inverse_start: inverse weights to continue the Pipe-Menon iteration from (see
            :func:`pipe_menon_inverse_weights`; its storage is used), or None to start as RELION does.
        inverse_out: a list the ``(Dp, Dp, Dp//2+1)`` float32 inverse weights applied are appended to
            (nothing with ``preweight_iterations=0`` and no ``inverse_start``).

    Returns:
        ``(D, D, D)`` float32 map on the device of ``acc``, centre at ``D // 2``, ``[z, y, x]``.
    """
    size, box = acc.padded_box, acc.box
    data = acc.data if consume else acc.data.clone()
    weight = acc.weight if consume else acc.weight.clone()
    if consume:
        # The grids now belong to this function; the accumulator is invalid afterwards (None, not a grid).
        acc.data = acc.weight = cast(torch.Tensor, None)
    _symmetrise_x0_plane_(data)
    _symmetrise_x0_plane_(weight)
    if symmetry is not None and symmetry.shape[0] > 1:
        data, weight = symmetrised_grids(data, weight, symmetry, size / 2)
    if wiener_constant:
        weight += wiener_constant
    ball = nyquist_ball(size, device=data.device)
    inverse: torch.Tensor | None = None
    if preweight_iterations > 0 or inverse_start is not None:
        inverse = pipe_menon_inverse_weights(weight, ball, box, preweight_iterations, min_weight=min_weight,
                                             start=inverse_start)
        torch.view_as_real(data).mul_(inverse[..., None])  # no complex copy of the real weights
        if inverse_out is not None:
            inverse_out.append(inverse)
    else:
        data /= torch.clamp(weight, min=min_weight)
        data *= ball
    del weight, ball, inverse
    return _grid_to_map(data, box, mask_outside=mask_outside)


def _grid_to_map(data: torch.Tensor, box: int, *, mask_outside: bool = True) -> torch.Tensor:
    """A weighted numerator grid to its ``(D, D, D)`` map: inverse transform (in the grid's own storage,
    which is overwritten), central crop, corners blended into their mean, gridding correction."""
    size = data.shape[0]
    vol = _irfftn_inplace(data)
    # fftshift restricted to the central box: output voxel i holds input voxel (i - size//2) mod size.
    lo = size // 2 - box // 2
    idx = (torch.arange(lo, lo + box, device=vol.device) - size // 2) % size
    vol = vol[idx][:, idx][:, :, idx]
    del data
    if mask_outside:
        vol = soft_mask_outside_map(vol)
    vol /= gridding_correction(box, size, device=vol.device)
    return vol.to(torch.float32)


# Planes transformed per step by the slab-wise 3D FFTs below (bounds their temporaries).
_FFT_SLAB = 8


def _real_view(spectrum: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` real view into the storage of an ``(N, N, N//2+1)`` complex grid (N even).

    The complex grid holds ``N * N * (N + 2)`` floats; each ``[z, y]`` row of ``N`` reals sits at the
    start of the row's ``N + 2``, as FFTW's in-place real transforms lay them out.
    """
    n = spectrum.shape[0]
    return torch.view_as_real(spectrum).reshape(n, n, n + 2)[:, :, :n]


def _irfftn_inplace(spectrum: torch.Tensor) -> torch.Tensor:
    """Unshifted ``irfftn`` of a ``(N, N, N//2+1)`` grid, computed in its own storage, slab by slab.

    Returns the ``(N, N, N)`` real view (:func:`_real_view`); the spectrum is overwritten. Needs no
    full-size temporary (``torch.fft.irfftn`` needs two).
    """
    n = spectrum.shape[0]
    for x0 in range(0, spectrum.shape[2], _FFT_SLAB):
        block = spectrum[:, :, x0:x0 + _FFT_SLAB]
        block.copy_(torch.fft.ifft2(block, dim=(0, 1)))
    real = _real_view(spectrum)
    for z0 in range(0, n, _FFT_SLAB):
        # the slab's transform is complete in a temporary before it overwrites the slab's storage
        real[z0:z0 + _FFT_SLAB] = torch.fft.irfft(spectrum[z0:z0 + _FFT_SLAB], n=n, dim=-1)
    return real


def _rfftn_inplace(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_irfftn_inplace`: the real view of ``spectrum`` to its ``rfftn``, in place."""
    n = spectrum.shape[0]
    real = _real_view(spectrum)
    for z0 in range(0, n, _FFT_SLAB):
        spectrum[z0:z0 + _FFT_SLAB] = torch.fft.rfft(real[z0:z0 + _FFT_SLAB], dim=-1)
    for x0 in range(0, spectrum.shape[2], _FFT_SLAB):
        block = spectrum[:, :, x0:x0 + _FFT_SLAB]
        block.copy_(torch.fft.fft2(block, dim=(0, 1)))
    return spectrum


def _symmetrise_x0_plane_(grid: torch.Tensor) -> None:
    """In place: the ``kx = 0`` plane gets the sum of each voxel and its Hermitian mate (see insert)."""
    grid[:, :, 0] = hermitian_symmetrised(grid[:, :, :1])[:, :, 0]


def gridding_correction(box: int, padded_box: int, *, device=None) -> torch.Tensor:
    """Real-space transform of the trilinear kernel on the padded grid, cropped to ``box``.

    Returns:
        ``(D, D, D)`` float32 ``sinc^2(r / Dp)`` with ``r`` the distance from voxel ``D // 2`` (the
        radial form RELION's ``griddingCorrect`` uses).
    """
    r = radius_grid(box, device=device, dtype=torch.float64)
    return (torch.sinc(r / padded_box) ** 2).to(torch.float32)


def nyquist_ball(size: int, *, device=None) -> torch.Tensor:
    """``(Dp, Dp, Dp//2+1)`` bool: True strictly within the original Nyquist sphere (radius ``Dp / 2``, as RELION)."""
    kz = torch.fft.fftfreq(size, device=device).mul(size).round().long()
    kx = torch.fft.rfftfreq(size, device=device).mul(size).round().long()
    r2_zy = kz[:, None] ** 2 + kz[None, :] ** 2
    ball = torch.empty((size, size, kx.shape[0]), dtype=torch.bool, device=device)
    for z0 in range(0, size, _FFT_SLAB):  # slabs: no full-size integer temporary
        ball[z0:z0 + _FFT_SLAB] = (r2_zy[z0:z0 + _FFT_SLAB, :, None] + kx ** 2) < (size // 2) ** 2
    return ball


def blob_fourier_transform(omega: torch.Tensor, radius: float, alpha: float) -> torch.Tensor:
    """Fourier transform of a 3D Kaiser-Bessel blob of order 0, normalised to 1 at ``omega = 0``.

    Args:
        omega: frequencies in cycles per voxel (any shape).
        radius: blob radius in voxels.
        alpha: blob taper parameter.

    Returns:
        ``I_{3/2}(z) / z^{3/2}`` with ``z = sqrt(alpha^2 - (2 pi radius omega)^2)`` (``J_{3/2}`` past the
        zero of ``z^2``), divided by its value at 0; same shape and dtype as ``omega``.
    """
    omega = omega.to(torch.float64)
    z2 = alpha ** 2 - (2 * math.pi * radius * omega) ** 2
    z = torch.sqrt(z2.abs()).clamp_min(1e-4)
    # I_{3/2}(z)/z^{3/2} and J_{3/2}(y)/y^{3/2}, both up to the common factor sqrt(2/pi).
    modified = (torch.cosh(z) - torch.sinh(z) / z) / z ** 2
    ordinary = (torch.sin(z) / z - torch.cos(z)) / z ** 2
    val = torch.where(z2 >= 0, modified, ordinary)
    z0 = torch.tensor(float(alpha), dtype=torch.float64)
    return val / ((torch.cosh(z0) - torch.sinh(z0) / z0) / z0 ** 2)


def pipe_menon_inverse_weights(
    weight: torch.Tensor,
    ball: torch.Tensor,
    box: int,
    iterations: int = PIPE_MENON_ITERATIONS,
    *,
    blob_radius_px: float = 1.9,
    blob_alpha: float = 15.0,
    min_weight: float = 1e-6,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse sampling-density weights by the iteration of Pipe & Menon (1999), as RELION does.

    Starting from ``w = 1`` inside the ball, repeat ``w /= |(w * weight) conv blob|``; the convolution
    is a product in real space on the padded grid. Each voxel's final ``w`` makes the blob-smoothed
    total weight 1, which handles voxels grazed by few samples better than ``1 / weight``.

    Args:
        weight: ``(Dp, Dp, Dp//2+1)`` real, Hermitian-symmetrised accumulated weight.
        ball: ``(Dp, Dp, Dp//2+1)`` bool, voxels to solve for (the rest get 0).
        box: original box ``D`` (the blob radius ``blob_radius_px`` is in original pixels).
        start: ``(Dp, Dp, Dp//2+1)`` float32 ``w`` to continue from instead of 1 (0 outside the ball;
            its storage becomes the result), e.g. :func:`combined_inverse_weights` of the weights the
            same number of iterations gave two disjoint sets whose sum ``weight`` is.

    Returns:
        ``(Dp, Dp, Dp//2+1)`` float32 inverse weights.
    """
    size = weight.shape[0]
    blob = _blob_slab_table(size, blob_radius_px * size / box, blob_alpha, weight.device)
    r2_yx = _r2_plane(size, weight.device)
    r2_z = torch.fft.fftfreq(size, device=weight.device).mul(size).round().long() ** 2
    inverse = ball.to(torch.float32) if start is None else start
    spectrum = torch.empty(weight.shape, dtype=torch.complex64, device=weight.device)
    parts = torch.view_as_real(spectrum)
    from gmmrefine import native

    # The C loops do the same float32 operations as the tensor code (bit-identical maps) in one pass
    # each; the tensor code is what CUDA runs.
    compiled = native.available() and weight.device.type == "cpu" and weight.dtype == torch.float32
    if compiled:
        weight = weight.contiguous()
    for _ in range(iterations):
        if compiled:
            native.pm_fill(spectrum, inverse, weight)
        else:
            parts[..., 0].copy_(inverse).mul_(weight)
            parts[..., 1].zero_()
        real = _irfftn_inplace(spectrum)
        if compiled:
            native.pm_multiply_radial(spectrum, blob)
        else:
            for z0 in range(0, size, _FFT_SLAB):
                slab_r2 = r2_z[z0:z0 + _FFT_SLAB, None, None] + r2_yx[None]
                real[z0:z0 + _FFT_SLAB] *= blob[slab_r2]
        # In place, slab by slab: MKL's out-of-place rfftn of the strided real view is 1.7x faster for
        # this transform but needs a second grid and a copy of its input (the inversion's peak memory
        # 275 -> 150 MB above the accumulator at Dp = 256, for ~5 % of its time; measured).
        smoothed = _rfftn_inplace(spectrum)
        # (inverse * weight) is real and point-symmetric in Fourier space, so its blob-smoothed copy is
        # real too: |Re| equals RELION's complex modulus up to rounding, at a quarter of the cost.
        # inverse is 0 outside the ball, so dividing everywhere leaves those voxels at 0.
        # Empty voxels grow without bound; cap them (as RELION's single-precision build) so that
        # inf * 0 never makes a NaN.
        if compiled:
            native.pm_divide(inverse, smoothed, min_weight, 1e20)
        else:
            for z0 in range(0, size, _FFT_SLAB):
                inverse[z0:z0 + _FFT_SLAB] /= smoothed[z0:z0 + _FFT_SLAB].real.abs().clamp_min_(min_weight)
            inverse.clamp_(max=1e20)
    return inverse


def combined_inverse_weights(inverse_a: torch.Tensor, inverse_b: torch.Tensor) -> torch.Tensor:
    """Inverse weights for the sum of two disjoint sets' samples, from each set's: ``1 / (1/a + 1/b)``.

    The inverse weights undo the smoothed sampling density, and densities add; voxels where either is 0
    (outside the ball) stay 0. Computed in the storage of ``inverse_a`` (``inverse_b`` is overwritten too).
    Pipe-Menon continued from this start for the remaining iterations gives the sum's map as the full
    iteration from 1 does (measured: FSC >= 0.9999 at every shell on 1,000-particle half sets, >= 0.998
    on sparse ones; see :func:`gmmrefine.refine.global_refine.quarter_maps`).
    """
    combined = inverse_a.reciprocal_()
    combined += inverse_b.reciprocal_()
    return combined.reciprocal_()


def _r2_plane(size: int, device) -> torch.Tensor:
    """``(Dp, Dp)`` integer ``ky^2 + kx^2`` of the unshifted real-space layout."""
    ax = torch.fft.fftfreq(size, device=device).mul(size).round().long()
    return ax[:, None] ** 2 + ax[None, :] ** 2


def _blob_slab_table(size: int, radius: float, alpha: float, device) -> torch.Tensor:
    """Blob transform for every integer squared radius ``0 .. 3 (Dp/2)^2`` on the padded grid."""
    r2 = torch.arange(3 * (size // 2) ** 2 + 1, device=device, dtype=torch.float64)
    return blob_fourier_transform(torch.sqrt(r2) / size, radius, alpha).to(torch.float32)


# Particles turned into spectra and inserted per step: bounds the spectra and CTF tensors (a few MB
# at box 128) independently of the chunk size read from disk. 64: the compiled insertion bins the
# samples of the views of one call by z plane, and groups of 64 views gave it most of that gain.
_IMAGES_PER_STEP = 64


def accumulate_images(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]],
    box: int,
    apix: float,
    *,
    ctf_mode: str = "flip",
    symmetry: torch.Tensor | None = None,
    halves: tuple[int, ...] = (1, 2),
    pad: int = 2,
    device: torch.device | str = "cpu",
    accs: dict[int, FourierAccumulator] | None = None,
) -> dict[int, FourierAccumulator]:
    """Fill one accumulator per half set from a stream of image chunks, in one pass.

    Args:
        chunks: iterable of ``(images (B, D, D) or their spectra (B, D, D//2+1), matrices (B, 3, 3),
            shift_A (B, 2), ctf (B, D, D//2+1) or None, subset (B,) ints)``; images of halves not in
            ``halves`` are skipped.
        box, apix: image size (px) and pixel size (A/px).
        ctf_mode: ``"flip"`` or ``"wiener"`` (see :func:`prepare_spectra`).
        symmetry: ``(K, 3, 3)`` operators (identity included) or None.
        halves: which half sets to fill.
        accs: accumulators to add to (``{half: FourierAccumulator}``, one per half), e.g. a resumed
            partial pass; new empty ones by default. Key 0 takes every image of the chunks (a whole
            set beside its parts); an accumulator of a smaller box than the images gets their spectra
            Fourier-cropped to it (:func:`~gmmrefine.fourier.fft.crop_projection_spectra`), so one
            pass can fill a full-size map and small grids for an FSC estimate.

    Returns:
        ``{half: FourierAccumulator}``.
    """
    if accs is None:
        accs = {h: FourierAccumulator(box, pad=pad, device=device) for h in halves}

    def fill(h: int, acc: FourierAccumulator, images, matrices, shift_A, ctf, subset) -> None:
        sel = torch.arange(subset.numel()) if h == 0 else torch.nonzero(subset == h).squeeze(1)
        for start in range(0, sel.numel(), _IMAGES_PER_STEP):
            rows = sel[start:start + _IMAGES_PER_STEP]
            img = images[rows.to(images.device)].to(device)
            c = None if ctf is None else ctf[rows.to(ctf.device)].to(device)
            acc_apix = apix
            if acc.box != box:
                # the same frequencies on a smaller grid of the same physical size
                img = crop_projection_spectra(img if img.is_complex() else rfft2_centered(img.float()), acc.box)
                c = None if c is None else fourier_crop_2d(c, acc.box)
                acc_apix = apix * box / acc.box
            spectra, weights = prepare_spectra(img, shift_A[rows.to(shift_A.device)].to(device), acc_apix, c,
                                               ctf_mode)
            acc.insert(spectra, matrices[rows.to(matrices.device)].to(device), weights, symmetry=symmetry)

    # On a CPU with several threads the halves fill their own grids at the same time: the scatter
    # into a grid runs on one thread, and the two halves never touch each other's grid, so each
    # grid gets the same sums in the same order as one after the other (bit-identical).
    threads = torch.get_num_threads()
    parallel = torch.device(device).type == "cpu" and len(accs) > 1 and threads > 1
    # Each half's thread runs its torch operations on itself alone (set_num_threads acts per thread
    # for OpenMP): otherwise each would start a team of `threads` OpenMP threads, 4 on 2 cores.
    pool = ThreadPoolExecutor(max_workers=len(accs), initializer=torch.set_num_threads, initargs=(1,)) \
        if parallel else None
    try:
        for images, matrices, shift_A, ctf, subset in chunks:
            subset = torch.as_tensor(subset)
            if pool is None:
                for h, acc in accs.items():
                    fill(h, acc, images, matrices, shift_A, ctf, subset)
            else:
                for job in [pool.submit(fill, h, acc, images, matrices, shift_A, ctf, subset) for h, acc in accs.items()]:
                    job.result()
    finally:
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)  # MKL's thread count is process-wide: give it back
    return accs


def _check_poses(ps, angles_deg: np.ndarray, shift_A: np.ndarray) -> None:
    n = len(ps)
    if angles_deg.shape != (n, 3):
        raise InputError(f"{ps.path}: poses must be ({n}, 3) angles in degrees, got shape {angles_deg.shape}.",
                         path=str(ps.path), field="angles_deg")
    if shift_A.shape != (n, 2):
        raise InputError(f"{ps.path}: shifts must be ({n}, 2) in angstrom, got shape {shift_A.shape}.",
                         path=str(ps.path), field="shift_A")
    for name, arr, field in (("angles", angles_deg, "rlnAngleRot/Tilt/Psi"), ("origins", shift_A, "rlnOriginX/YAngst")):
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise InputError(f"{ps.path}: particle row {row + 1} has non-finite {name} ({field}); every pose "
                             f"must be a finite number.", path=str(ps.path), field=field)


def accumulate_halves(
    ps,
    angles_deg: np.ndarray | torch.Tensor | None = None,
    shift_A: np.ndarray | torch.Tensor | None = None,
    *,
    ctf_mode: str = "flip",
    halves: tuple[int, ...] = (1, 2),
    chunk_size: int = 128,
    pad: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
    particles: np.ndarray | None = None,
    accs: dict[int, FourierAccumulator] | None = None,
) -> dict[int, FourierAccumulator]:
    """Accumulators of the half sets of a particle set, streamed from disk in chunks (no symmetry:
    impose it with ``reconstruct_map(acc, symmetry=symmetry_matrices(sym))``).

    Args:
        ps: :class:`~gmmrefine.io.particles.ParticleSet`; its ``subset`` (1 or 2) picks the half.
        angles_deg: ``(N, 3)`` RELION rot, tilt, psi overriding ``ps.angles_deg`` (refined poses).
        shift_A: ``(N, 2)`` RELION origins in angstrom overriding ``ps.shift_A``.
        ctf_mode: ``"flip"`` (phase-flipped images, weight 1) or ``"wiener"`` (``CTF F``, ``CTF^2``).
        halves: half sets to fill.
        chunk_size: images read from disk at a time (memory is ``chunk_size * D^2 * 4`` bytes plus the
            accumulators, whatever the number of particles).
        device: where the accumulators live and the insertion runs.
        progress: show a progress bar (hidden when not on a terminal).
        particles: indices of the particles to insert (e.g. one process's shard), in input order;
            default: every particle of ``halves``.
        accs: the accumulators to fill, one per half set (new full-size ones by default); one of a smaller
            box gets the images Fourier-cropped (:func:`accumulate_images`).

    Raises:
        InputError: empty particle set or half set, poses of the wrong shape or not finite, unknown
            CTF mode.
    """
    from tqdm import tqdm

    from gmmrefine.io.particles import read_images

    if ctf_mode not in CTF_MODES:
        raise InputError(f"CTF mode {ctf_mode!r} is not known; expected one of {', '.join(CTF_MODES)}.",
                         field="ctf_mode")
    angles = np.asarray(ps.angles_deg if angles_deg is None else _numpy(angles_deg), dtype=np.float64)
    shifts = np.asarray(ps.shift_A if shift_A is None else _numpy(shift_A), dtype=np.float64)
    if len(ps) == 0:
        raise InputError(f"{ps.path}: the particle set is empty; nothing to reconstruct.", path=str(ps.path))
    _check_poses(ps, angles, shifts)
    subset = np.asarray(ps.subset)
    for h in halves:
        if not (subset == h).any():
            raise InputError(f"{ps.path}: half set {h} (rlnRandomSubset = {h}) has no particles.",
                             path=str(ps.path), field="rlnRandomSubset")
    indices = np.flatnonzero(np.isin(subset, halves))
    if particles is not None:
        indices = np.asarray(particles, dtype=np.int64).reshape(-1)
        indices = indices[np.isin(subset[indices], halves)]

    def chunks() -> Iterator:
        bar = tqdm(total=len(indices), desc="reconstruct", unit="particle", disable=None if progress else True)
        try:
            for start in range(0, len(indices), max(int(chunk_size), 1)):
                # One reader per chunk: its memory maps close with it, so the pages of the stacks it
                # touched leave this process's resident memory instead of piling up with N.
                idx = indices[start:start + chunk_size]
                images = read_images(ps, idx)
                ctf = None if ctf_mode == "none" else _ctf_of(ps, idx, device)
                matrices = euler_to_matrix(torch.as_tensor(angles[idx])).to(torch.float32)
                yield (torch.from_numpy(images), matrices, torch.as_tensor(shifts[idx], dtype=torch.float32),
                       ctf, torch.as_tensor(subset[idx]))
                bar.update(len(idx))
        finally:
            bar.close()

    accs = accumulate_images(chunks(), ps.box, ps.apix, ctf_mode=ctf_mode, halves=halves, pad=pad, device=device,
                             accs=accs)
    release_free_memory()
    return accs


def reconstruct_halves(
    ps,
    angles_deg: np.ndarray | torch.Tensor | None = None,
    shift_A: np.ndarray | torch.Tensor | None = None,
    *,
    sym: str = "C1",
    ctf_mode: str = "flip",
    chunk_size: int = 128,
    pad: int = 2,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half maps of a particle set at its poses (or at the poses given), from one pass over the images.

    ``sym`` (``C1``, ``C<n>``, ``D<n>``, ``T``, ``O``, ``I``) is imposed by summing the Fourier grids over
    the group as ``relion_reconstruct --sym`` does. See :func:`accumulate_halves` for the other arguments.

    Returns:
        ``(half1, half2)``, each ``(D, D, D)`` float32 on ``device``.
    """
    symmetry = symmetry_matrices(sym, device=device)
    accs = accumulate_halves(ps, angles_deg, shift_A, ctf_mode=ctf_mode, chunk_size=chunk_size, pad=pad,
                             device=device, progress=progress)
    maps = reconstruct_maps_low_memory(accs, symmetry=symmetry)
    return maps[1], maps[2]


def reconstruct_maps_low_memory(accs: dict[int, FourierAccumulator], *, symmetry: torch.Tensor | None = None
                                ) -> dict[int, torch.Tensor]:
    """Maps of several accumulators, holding only one in memory at a time (the accumulators are consumed).

    The others wait in a temporary folder (:meth:`FourierAccumulator.save`) while one is inverted, so
    peak memory is one accumulator plus the inversion's work space (CPU accumulators only; GPU ones
    are inverted in turn without parking).

    Returns:
        ``{key: (D, D, D) map}`` on each accumulator's device.
    """
    import tempfile
    from pathlib import Path

    keys = list(accs)
    maps: dict[int, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="gmmrefine-acc-") as tmp:
        parked: dict[int, Path] = {}
        for key in keys[1:]:
            if accs[key].device.type == "cpu":
                parked[key] = Path(tmp) / f"acc{key}.pt"
                accs[key].save(parked[key])
                accs[key] = None  # type: ignore[assignment]
        release_free_memory()
        for key in keys:
            acc = accs.pop(key) if key not in parked else FourierAccumulator.load(parked[key])
            maps[key] = reconstruct_map(acc, symmetry=symmetry, consume=True)
            del acc
            release_free_memory()
    return maps


#: Bytes per voxel of a padded Fourier grid while a map is made from it: the accumulator (complex data,
#: real weight) and the inversion's work space (a complex grid, the inverse weights, the ball).
GRID_BYTES_PER_VOXEL = 12 + 13


def map_bytes(box: int, pad: int = 2) -> int:
    """Memory one map of ``box`` takes to reconstruct, at its peak (accumulator plus inversion): about
    1.7 GB at box 256, 5.7 GB at 384 and 13.5 GB at 512 (measured peak RSS of a box-512 refinement:
    14.4 GB)."""
    size = pad * box
    return GRID_BYTES_PER_VOXEL * size * size * (size // 2 + 1)


def grid_device(device, boxes: Iterable[int], *, fraction: float = 0.8) -> torch.device:
    """Where the accumulators of a pass live: on ``device``, unless it is a GPU whose free memory cannot
    hold the maps of ``boxes`` at once (then on the CPU, where the insertion runs in C; the spectra are
    copied there block by block)."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    free = int(torch.cuda.mem_get_info(device)[0])
    return device if sum(map_bytes(b) for b in boxes) <= fraction * free else torch.device("cpu")


def release_free_memory() -> None:
    """Return freed heap memory to the operating system (glibc ``malloc_trim``; no-op elsewhere).

    Freed temporaries of the insertion otherwise stay in the process's resident memory.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def symmetry_matrices(sym: str, *, device=None) -> torch.Tensor | None:
    """``(K, 3, 3)`` float32 operators of a point group in RELION's convention, or None for C1.

    Raises:
        InputError: unknown group name.
    """
    from gmmrefine.geometry.symmetry import symmetry_operators

    ops = symmetry_operators(sym)
    return None if ops.shape[0] == 1 else ops.to(device=device, dtype=torch.float32)


# CTFs computed per step (the CTF's float64 temporaries are several times its float32 result).
_CTFS_PER_STEP = 32


def _ctf_of(ps, indices: np.ndarray, device, *, box: int | None = None, apix: float | None = None) -> torch.Tensor:
    """``(n, d, d//2+1)`` float32 CTFs of particles ``indices`` on the grid of a ``box`` of pixel size
    ``apix`` (default: the particles'; a Fourier-cropped box of the same physical size samples the same
    CTF at the same frequencies)."""
    from gmmrefine.fourier.ctf import ctf_for_box

    box = ps.box if box is None else int(box)
    apix = ps.apix if apix is None else float(apix)
    out = torch.empty((len(indices), box, box // 2 + 1), dtype=torch.float32, device=device)
    for start in range(0, len(indices), _CTFS_PER_STEP):
        part = indices[start:start + _CTFS_PER_STEP]
        out[start:start + len(part)] = ctf_for_box(box, apix, **ps.ctf.as_tensors(part, device=device))
    return out


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)

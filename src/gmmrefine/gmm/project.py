"""Band-limited Fourier projection of a GMM: the inner loop of refinement.

The projection of Gaussian ``j`` at rotation ``A`` (RELION matrix) and image translation ``t`` (px,
content moves by ``+t``; callers pass ``image_translation_px(shift_A, apix)``) has, at frequency ``k``
(1/A) of the :func:`gmmrefine.fourier.fft.rfft2_centered` layout, the coefficient

    F_j(k) = A_j (2 pi)^{3/2} s_j^3 / apix^3 * exp(-2 pi^2 s_j^2 |k|^2) * exp(-2 pi i k . p_j),
    p_j = (A c_j)[:2] + t * apix   (angstrom),

which is the DFT of the voxel-map projection of the same density (see :mod:`gmmrefine.gmm.model`).
Only the pixels of a :class:`FourierBand` (``1/minres <= |k| <= 1/maxres``, without the redundant
``kx = 0, ky < 0`` half-column) are computed.

How it is computed, and why (benchmarks/projection.py, float32, batch 16, step = projection + FRC
loss + gradients to GMM, rotations and shifts): both the phase and the Gaussian envelope factorise over
x and y, ``exp(-2 pi^2 s^2 k^2 - 2 pi i k.p) = ex(kx) * ey(ky)``, so a projection is a sum over
Gaussians of outer products: a matrix multiply. Writing ``ex = g (cos - i sin)`` and using that |ky|
and -|ky| share cos and flip sin, the four real blocks ``[Cy, Sy]^T [Cx, Sx]`` over ``kx, |ky| in 0..K``
give the whole half-plane: one real ``bmm`` of ``(2K+2, N) x (N, 2K+2)`` per particle, i.e. ``8 N K^2``
flops against ``16 N K^2`` for the complex matmul over ``(2K+1) x (K+1)`` pixels and ``~4 pi N K^2``
for evaluating each Gaussian at each band pixel, plus tables of ``4 N (K+1)`` numbers per particle
instead of one complex exponential per Gaussian and pixel. The backward is written by hand: two more ``bmm``
of the same size, then one complex multiply per table (``conj(dL/dtable) * table`` holds the width and
amplitude terms in its real part and the position terms in its imaginary part) and one small matmul
for the sums over frequency; autograd would keep complex intermediates and launch ~3x more
full-size kernels.

On the CPU in float32 (what refinement runs there), :class:`_FusedProjection` does all of it in the C
kernels of :mod:`gmmrefine.native`, per particle and chunk of 256 Gaussians: the image positions from
the centres, rotation rows and shift (in double), the two tables (one sin/cos per Gaussian, then a
float recurrence along frequency restarted every 8 entries from double-precision anchors), and their
block product by the BLAS ``sgemm`` torch links, while the tables are still in cache. The backward
rebuilds the tables instead of saving them and returns the gradients to centres, amplitudes, widths,
rotation rows and shifts itself, so autograd keeps only the inputs (2.5 MB per batch of 16 at
N = 8,000, box 192, 4 A; 98.7 MB when the tables were saved) and no graph below the projection.
Measured against the torch path on the same CPU in one run (projections + gradients, 2 threads, batch
16): 3.3x at N = 2,000, K = 18 (box 96, 8 A), 3.5x at N = 8,000, K = 18, 2.7x at N = 8,000, K = 48
(box 192, 4 A), 2.6x at N = 16,000, K = 85 (box 256, 3 A); against the float64 formula its error is
2-3e-7 overall and <= 6.5e-7 per ring (N = 5,000 / 16,000, K = 65 / 85). The torch path (``_tables``,
``bmm``, ``_table_sums``, on chunks of Gaussians so that temporaries are reused heap memory) is what
CUDA and float64 (gradcheck) run, and what the CPU runs if torch's BLAS exports no ``sgemm_``.

Measured (benchmarks/projection.py, 2026-12-02, two full runs on 2 threads of the 2-core machine,
batch 16, every rate from interleaved rounds of its run; the 1024^3 float32 matmul ran at 98-194
GFLOP/s across the rows): projections + gradients 10-27x the autograd separable baseline over N =
2,000 / 8,000 / 16,000, boxes 96 / 192 / 256 and cuts 8 / 4 / 3 A, at 0.40-1.03 of the FLOP roofline
(the three products at the matmul rate of the same rounds; near or above 1 the 2-thread 1024^3
product ran slower than two single-threaded small ones) on all 27 points of the second run, and on
26 of the first (the 27th, N = 8,000, K = 18, at 0.26, its refine step in the same row faster than
its projector alone: a disturbed row). The smallest bands are the tightest: at N = 2,000, K = 18 a
batch takes ~4.6 ms, of which the kernels ~3.5 ms (MKL's sgemm on 38 x 38 blocks runs at ~2/3 of its
1024^3 rate) and the Python and autograd around them ~1 ms. The refine step (axis-angle rotations
and the FRC loss added, ~1.2 ms at small N) is within 3x of the roofline at K >= 36 in both runs;
at K = 18-32 it ran at 0.27-0.79, below 1/3 at N = 2,000, K = 18 in both runs and at 2 more points
in one. Memory: a
step's peak RSS growth was 6.0 / 7.4 / 13.1 / 28.9 MB at batch 1 / 4 / 16 / 64 (N = 8,000, box 192,
4 A): linear in the batch, 0.4 MB per particle. The torch path's phase tables ``e^{i n t}`` come from a doubling recurrence
(one sin/cos per Gaussian, then entries ``n..2n-1`` = entries ``0..n-1`` times ``e^{i n t}``): measured
1.36x / 1.16x / 1.21x faster steps than one sin and one cos per entry at K = 18 / 48 / 85 (N = 8,000),
same accuracy (tests: <= 4e-6 relative per ring against float64). ``torch.polar`` was slower than
cos + sin. Spreading onto an oversampled grid plus an FFT would need a wide interpolation kernel to
meet the 1e-4 accuracy bar and is not exact; it was not pursued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gmmrefine import native
from gmmrefine.errors import InputError
from gmmrefine.geometry.rotations import project_points


@dataclass(frozen=True)
class FourierBand:
    """The Fourier pixels of a ``(D, D//2+1)`` rfft2 spectrum that lie in a resolution band.

    Attributes:
        box: image box ``D`` (px).
        apix: pixel size (A/px).
        minres_A, maxres_A: band limits; pixels with ``1/minres <= |k| <= 1/maxres`` (k in 1/A).
        ny, nx: ``(P,)`` signed integer frequency indices (``ky = ny / (D apix)``); ``nx >= 0`` and
            ``ny > 0`` where ``nx == 0`` (the other half of that column is the complex conjugate).
        pixel_index: ``(P,)`` flat index into ``(D, D//2+1)``.
        ring_index: ``(P,)`` ring number ``0..n_rings-1`` (consecutive integer shells
            ``round(|k| D)`` present in the band).
        shell: ``(n_rings,)`` the integer shell of each ring.
        k_max: largest ``|nx|, |ny|`` in the band (``K``).
    """

    box: int
    apix: float
    minres_A: float
    maxres_A: float
    ny: torch.Tensor
    nx: torch.Tensor
    pixel_index: torch.Tensor
    ring_index: torch.Tensor
    shell: torch.Tensor
    k_max: int

    @property
    def n_pixels(self) -> int:
        return int(self.nx.shape[0])

    @property
    def n_rings(self) -> int:
        return int(self.shell.shape[0])

    @property
    def device(self) -> torch.device:
        return self.nx.device

    @property
    def freqs_A(self) -> torch.Tensor:
        """``(P, 2)`` (kx, ky) in 1/A, float32."""
        scale = 1.0 / (self.box * self.apix)
        return torch.stack([self.nx, self.ny], -1).to(torch.float32) * scale

    def gather(self, spectrum: torch.Tensor) -> torch.Tensor:
        """``(..., D, D//2+1)`` spectra -> ``(..., P)`` band pixels."""
        return spectrum.flatten(-2)[..., self.pixel_index]

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., P)`` band pixels -> ``(..., D, D//2+1)`` spectra, zero outside the band.

        The ``kx = 0, ky < 0`` pixels are filled with the conjugates of their ``ky > 0`` partners, so
        ``irfft2_centered`` of the result is the real image of the band-limited projection.
        """
        d = self.box
        lead = values.shape[:-1]
        out = torch.zeros(*lead, d * (d // 2 + 1), dtype=values.dtype, device=values.device)
        out[..., self.pixel_index] = values
        col0 = self.nx == 0
        mirror = ((-self.ny[col0]) % d) * (d // 2 + 1)
        out[..., mirror] = values[..., col0].conj() if values.is_complex() else values[..., col0]
        return out.reshape(*lead, d, d // 2 + 1)

    def to(self, device) -> FourierBand:
        return FourierBand(self.box, self.apix, self.minres_A, self.maxres_A, self.ny.to(device),
                           self.nx.to(device), self.pixel_index.to(device), self.ring_index.to(device),
                           self.shell.to(device), self.k_max)


def fourier_band(box: int, apix: float, minres_A: float, maxres_A: float, *, device=None) -> FourierBand:
    """Band of Fourier pixels ``1/minres_A <= |k| <= 1/maxres_A`` of a ``box`` image.

    ``minres_A = inf`` keeps everything down to (not including) frequency 0; ``maxres_A`` below
    Nyquist (``2 apix``) is clipped to Nyquist.
    """
    if box < 2 or apix <= 0:
        raise InputError(f"fourier_band: box must be >= 2 and apix > 0, got box={box}, apix={apix}.")
    if not (maxres_A > 0 and minres_A > maxres_A):
        raise InputError(f"fourier_band: need minres_A > maxres_A > 0 (A), got minres={minres_A}, "
                         f"maxres={maxres_A}.")
    d = box
    ny_all = torch.fft.fftfreq(d, d=1.0 / d).round().long()  # signed integers
    nx_all = torch.arange(d // 2 + 1)
    gy, gx = torch.meshgrid(ny_all, nx_all, indexing="ij")
    rad_px = torch.sqrt((gx * gx + gy * gy).double())  # |k| in cycles per box
    freq_A = rad_px / (d * apix)
    keep = (freq_A <= 1.0 / maxres_A + 1e-12) & (freq_A >= 1.0 / minres_A - 1e-12) & (rad_px > 0)
    keep &= (gx > 0) | (gy > 0)  # drop the conjugate half of column kx = 0
    keep &= 2 * gy.abs() < d  # the unpaired ky = -D/2 row of even boxes has no +D/2 partner
    flat = torch.nonzero(keep.flatten()).squeeze(1)
    ny = gy.flatten()[flat]
    nx = gx.flatten()[flat]
    if flat.numel() == 0:
        raise InputError(f"fourier_band: no Fourier pixel of box {box} at {apix} A/px lies between "
                         f"{minres_A} and {maxres_A} A.")
    shells = torch.round(rad_px.flatten()[flat]).long()
    shell, ring = torch.unique(shells, return_inverse=True)
    k_max = int(max(nx.max().item(), ny.abs().max().item()))
    return FourierBand(box, float(apix), float(minres_A), float(maxres_A), ny.to(device), nx.to(device),
                       flat.to(device), ring.to(device), shell.to(device), k_max)


def image_positions_A(centers_A: torch.Tensor, rotations: torch.Tensor, translation_px: torch.Tensor | None,
                      apix: float) -> torch.Tensor:
    """Image-plane positions ``(A c)[:2] + t * apix`` of the Gaussians: ``(B, N, 2)`` in angstrom."""
    # Only the first two rows of A: the depth is not needed, and the product comes out contiguous.
    pos = project_points(centers_A, rotations[:, :2, :])
    if translation_px is not None:
        pos = pos + translation_px[:, None, :] * apix
    return pos


def project_gmm(gmm, rotations: torch.Tensor, translation_px: torch.Tensor | None, band: FourierBand) -> torch.Tensor:
    """Band-limited Fourier projections of a :class:`GaussianMixture`.

    Args:
        gmm: the GMM (its tensors may require grad).
        rotations: ``(B, 3, 3)`` RELION matrices ``A``.
        translation_px: ``(B, 2)`` image translation (x, y) in pixels, or None.
        band: the pixels to compute.

    Returns:
        ``(B, P)`` complex64 coefficients in the ``rfft2_centered`` normalisation; differentiable
        with respect to rotations, translations and all GMM parameters.
    """
    return project_band(gmm.centers_A, gmm.amplitudes, gmm.widths_A, rotations, translation_px, band)


def project_band(centers_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor,
                 rotations: torch.Tensor, translation_px: torch.Tensor | None, band: FourierBand) -> torch.Tensor:
    """As :func:`project_gmm` on raw tensors.

    Args:
        centers_A: ``(N, 3)`` or per-particle ``(B, N, 3)``.
        amplitudes, widths_A: ``(N,)`` or per-particle ``(B, N)``.
        rotations, translation_px, band: as :func:`project_gmm`.

    Returns:
        ``(B, P)`` complex.
    """
    rows = rotations[:, :2, :]
    if _fused(centers_A, amplitudes, widths_A, rows, translation_px):
        return _fused_projection(centers_A, amplitudes, widths_A, rows, translation_px, band)
    pos = image_positions_A(centers_A, rotations, translation_px, band.apix)
    re, im = project_positions(pos, amplitudes, widths_A, band)
    return torch.complex(re, im)


#: Pose parameters of :func:`project_gmm_with_pose_jacobian`, in its order and units.
POSE_PARAMETERS = ("rot_x_rad", "rot_y_rad", "rot_z_rad", "shift_x_px", "shift_y_px")


def project_gmm_with_pose_jacobian(gmm, rotations: torch.Tensor, translation_px: torch.Tensor,
                                   band: FourierBand) -> tuple[torch.Tensor, torch.Tensor]:
    """Band projections of a GMM and their derivatives with respect to the five pose parameters.

    The parameters are a rotation ``w`` (radians, applied in the view frame: ``A' = R(w) A``, as the
    optimisers compose updates) and the image translation (px). Moving a Gaussian's position ``p``
    multiplies its coefficient by ``-2 pi i k . dp`` (the phase is ``exp(-2 pi i k . p)``), and a
    rotation ``w`` moves the rotated centre ``q = A c`` by ``w x q``; so every derivative is a
    projection of the same Gaussians with amplitudes weighted by a component of ``q``, times a
    frequency factor:

        dF/dw_x =  2 pi i ky F[q_z],   dF/dw_y = -2 pi i kx F[q_z],
        dF/dw_z = -2 pi i (ky F[q_x] - kx F[q_y]),   dF/dt = -2 pi i k apix F,

    four projections in all (one batch of ``4 B`` on shared tables), no autograd, and exact (the
    tests hold them to autograd's).

    Args:
        gmm: :class:`~gmmrefine.gmm.model.GaussianMixture` (used as constants).
        rotations: ``(B, 3, 3)`` RELION matrices ``A``.
        translation_px: ``(B, 2)`` image translations, px.
        band: the pixels.

    Returns:
        ``(projections (B, P), jacobian (B, 5, P))``, complex, in :data:`POSE_PARAMETERS` order.
    """
    with torch.no_grad():
        centers = gmm.centers_A.to(rotations.dtype)
        amp = gmm.amplitudes.to(rotations.dtype)
        batch = rotations.shape[0]
        depth = torch.einsum("nk,bik->bin", centers, rotations)          # (B, 3, N): rows of A c
        weights = torch.stack([amp.expand(batch, -1), amp * depth[:, 2], amp * depth[:, 0], amp * depth[:, 1]], 1)
        proj = project_band(centers, weights.reshape(4 * batch, -1), gmm.widths_A.to(rotations.dtype),
                            rotations.repeat_interleave(4, 0), translation_px.repeat_interleave(4, 0), band)
        proj = proj.view(batch, 4, -1)
        p0, pz, px, py = proj.unbind(1)
        two_pi_i = 2j * math.pi / (band.box * band.apix)
        kx = band.nx.to(p0.real.dtype) * two_pi_i  # 2 pi i kx (kx in 1/A)
        ky = band.ny.to(p0.real.dtype) * two_pi_i
        jac = torch.stack([ky * pz, -kx * pz, kx * py - ky * px, -kx * band.apix * p0, -ky * band.apix * p0], 1)
    return p0, jac


def project_positions(positions_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor,
                      band: FourierBand) -> tuple[torch.Tensor, torch.Tensor]:
    """Band coefficients of 2D Gaussians at given image positions (the separable kernel).

    Args:
        positions_A: ``(B, N, 2)`` x, y in angstrom (``B = 1`` broadcasts against per-particle
            amplitudes).
        amplitudes: ``(N,)`` or ``(B, N)`` peak densities of the 3D Gaussians.
        widths_A: ``(N,)`` or ``(B, N)``.
        band: the pixels.

    Returns:
        ``(real, imag)``, each ``(B, P)``.
    """
    if _fused(positions_A, amplitudes, widths_A):
        # the fused kernels take 3D centres and rotations: positions are centres at z = 0, seen along z
        rows = torch.eye(2, 3, dtype=positions_A.dtype)[None]
        z = _fused_projection(torch.nn.functional.pad(positions_A, (0, 1)), amplitudes, widths_A, rows, None, band)
        return z.real, z.imag
    freqs, gather, sign, weights, k1 = _band_tables(band, positions_A.device, positions_A.dtype)
    n_gauss = positions_A.shape[1]
    batch = max(positions_A.shape[0], amplitudes.shape[0] if amplitudes.ndim == 2 else 1,
                widths_A.shape[0] if widths_A.ndim == 2 else 1)
    if positions_A.device.type != "cpu":
        chunk = n_gauss
    else:
        # Gaussians in chunks, so that temporaries are reused heap memory instead of fresh
        # page-faulted pages (1.5x faster than one piece at N = 16,000, box 192, 4 A, 1 thread).
        chunk = max(_MIN_CHUNK, _CHUNK_FLOATS // (batch * 4 * k1))
    return _SeparableProjection.apply(positions_A, amplitudes, widths_A, freqs, gather, sign, weights, k1,
                                      band.apix, chunk)


def _fused_projection(centers_A, amplitudes, widths_A, rows, translation_px, band):
    _, gather, sign, _, k1 = _band_tables(band, centers_A.device, centers_A.dtype)
    return _FusedProjection.apply(centers_A, amplitudes, widths_A, rows, translation_px, gather, sign, k1,
                                  1.0 / (band.box * band.apix), band.apix)


# Size of one Gaussian chunk's tables (floats) of the torch path on a CPU, and the fewest Gaussians
# per chunk; see project_positions.
_CHUNK_FLOATS = 3_200_000
_MIN_CHUNK = 256
# Gaussians per table of the fused kernels. Measured (2 threads, batch 16, particles/s for chunks of
# 128 / 256 / 512 / 1024): N = 2,000, K1 = 19: 1681 / 2101 / 1905 / 1905; N = 8,000, K1 = 19: 580 /
# 643 / 645 / 649; K1 = 49: 222 / 226 / 218 / 211; K1 = 65: 145 / 163 / 149 / 136; N = 16,000, K1 = 86:
# 51 / 52 / 49 / 47. With 256, the backward's four (2 K1, 256) tables take 39-176 KB, in a core's L2.
_FUSED_CHUNK = 256


_TABLE_CACHE: dict = {}


def _band_tables(band: FourierBand, device, dtype):
    """Frequencies ``n / (D apix)`` for ``n = 0..K``, gather indices into the real block matrix and the
    weights of the backward reductions."""
    key = (band.box, band.apix, band.minres_A, band.maxres_A, str(device), dtype)
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    k1 = band.k_max + 1
    freqs = torch.arange(k1, device=device, dtype=dtype) / (band.box * band.apix)
    # Table columns are interleaved (cos, sin) per frequency: column 2n is cos, 2n + 1 is sin.
    row = 2 * band.ny.abs().to(device)
    col = 2 * band.nx.to(device)
    width = 2 * k1
    idx_cc = row * width + col              # Cy^T Cx
    idx_cs = row * width + col + 1          # Cy^T Sx
    idx_sc = (row + 1) * width + col        # Sy^T Cx
    idx_ss = (row + 1) * width + col + 1    # Sy^T Sx
    sign = torch.where(band.ny.to(device) < 0, -1.0, 1.0).to(dtype)
    gather = torch.stack([idx_cc, idx_cs, idx_sc, idx_ss])
    # Backward reductions over n of the interleaved (re, im) products: sum re, sum f^2 re, sum 2 pi f im.
    weights = torch.zeros(2 * k1, 3, device=device, dtype=dtype)
    weights[0::2, 0] = 1.0
    weights[0::2, 1] = freqs * freqs
    weights[1::2, 2] = 2 * math.pi * freqs
    out = (freqs, gather, sign, weights, k1)
    if len(_TABLE_CACHE) > 64:
        _TABLE_CACHE.clear()
    _TABLE_CACHE[key] = out
    return out


class _SeparableProjection(torch.autograd.Function):
    """Forward and hand-written backward of the separable band projection (see module docstring).

    Tables, per particle b and Gaussian j, for n = 0..K (f_n = n / (D apix)):
    ``X0 = g e^{i 2 pi f p_x}`` and ``Y0 = g e^{i 2 pi f p_y}`` (stored as interleaved cos, sin) with
    the envelope ``g = exp(-2 pi^2 s^2 f^2)``; the four real blocks are ``Y0^T diag(a) X0`` with
    ``a = A (2 pi)^{3/2} s^3 / apix^3``. Only the tables are saved for backward. With ``H`` the
    gradient of a table, ``conj(H) * X0`` (one complex multiply) holds in its real part the terms of
    ``d/ds`` and ``d/da`` and in its imaginary part minus those of ``d/dp`` (``d e^{i t}/dt = i e^{i t}``);
    ``conj(H)`` comes free from the block-matrix product by negating the sin columns of the small
    ``(2K+2)^2`` gradient matrix, and the sums over ``n`` are one matrix product with fixed weights.
    """

    @staticmethod
    def forward(ctx, pos, amp, width, freqs, gather, sign, weights, k1, apix, chunk):
        kappa = (2 * math.pi) ** 1.5 / apix**3
        amp_b = amp if amp.ndim == 2 else amp[None]      # (Ba, N)
        width_b = width if width.ndim == 2 else width[None]
        ascale = amp_b * kappa * width_b**3               # (Ba, N)
        ctx.k1, ctx.kappa = k1, kappa
        ctx.shapes = (pos.shape, amp.shape, width.shape)
        blocks = None
        chunks = []
        for start in range(0, pos.shape[1], chunk):
            x0, y0, y_scaled = _tables(pos[:, start:start + chunk], width_b[:, start:start + chunk],
                                       ascale[:, start:start + chunk], freqs, k1)
            part = torch.bmm(y_scaled.transpose(1, 2), x0.expand(y_scaled.shape[0], -1, -1))
            blocks = part if blocks is None else blocks.add_(part)
            del y_scaled
            chunks.append((x0, y0))
        ctx.save_for_backward(ascale, amp_b, width_b, gather, sign, weights, *[t for pair in chunks for t in pair])
        blocks = blocks.flatten(1)                                                      # (B, 4 K1^2)
        cc, cs, sc, ss = (blocks[:, g] for g in gather)
        re = cc - sign * ss
        im = -(sign * sc + cs)
        return re, im

    @staticmethod
    def backward(ctx, g_re, g_im):
        ascale, amp_b, width_b, gather, sign, weights, *rest = ctx.saved_tensors
        k1 = ctx.k1
        if g_re is None:
            g_re = torch.zeros_like(g_im)
        if g_im is None:
            g_im = torch.zeros_like(g_re)
        batch = g_re.shape[0]
        g_blocks = torch.zeros(batch, 4 * k1 * k1, dtype=g_re.dtype, device=g_re.device)
        g_blocks.index_add_(1, gather[0], g_re)
        g_blocks.index_add_(1, gather[3], -sign * g_re)
        g_blocks.index_add_(1, gather[2], -sign * g_im)
        g_blocks.index_add_(1, gather[1], -g_im)
        g_blocks = g_blocks.view(batch, 2 * k1, 2 * k1)
        # Negating the sin columns (rows) makes the products below the conjugate table gradients.
        flip = torch.ones(2 * k1, dtype=g_re.dtype, device=g_re.device)
        flip[1::2] = -1.0
        g_rows = g_blocks * flip
        g_cols = g_blocks.transpose(1, 2) * flip
        sums_x, sums_y = [], []
        for x0, y0 in zip(rest[0::2], rest[1::2]):
            h_conj = torch.bmm(y0.expand(batch, -1, -1), g_rows)    # conj(d/dX0) / a   (B, n, 2K1)
            g_conj = torch.bmm(x0.expand(batch, -1, -1), g_cols)    # conj(d/dY0) / a
            sums_x.append(_table_sums(h_conj, x0, weights))
            sums_y.append(_table_sums(g_conj, y0, weights))
        rx = torch.cat(sums_x, 1) if len(sums_x) > 1 else sums_x[0]
        ry = torch.cat(sums_y, 1) if len(sums_y) > 1 else sums_y[0]
        pos_shape, amp_shape, width_shape = ctx.shapes
        a = ascale.expand(batch, -1)
        d_pos = torch.stack([rx[..., 2], ry[..., 2]], -1) * (-a[..., None])
        if pos_shape[0] != batch:
            d_pos = d_pos.sum(0, keepdim=True)
        d_ascale = rx[..., 0]                                           # (B, N)
        s = width_b
        d_width = (-4 * math.pi**2) * s * a * (rx[..., 1] + ry[..., 1])
        d_width = d_width + d_ascale * amp_b * (3 * ctx.kappa) * s**2
        d_amp = d_ascale * ctx.kappa * s**3
        d_amp = d_amp.sum_to_size(amp_shape) if len(amp_shape) == 2 else d_amp.sum(0)
        d_width = d_width.sum_to_size(width_shape) if len(width_shape) == 2 else d_width.sum(0)
        return d_pos, d_amp, d_width, None, None, None, None, None, None, None


def _fused(centers_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor,
           rows: torch.Tensor | None = None, translation_px: torch.Tensor | None = None) -> bool:
    """Whether the fused C kernels apply: float32 CPU tensors whose batches broadcast, and a BLAS
    sgemm to call."""
    tensors = [t for t in (centers_A, amplitudes, widths_A, rows, translation_px) if t is not None]
    if any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    batches = [t.shape[0] for t in tensors if t.ndim == 3 or (t.ndim == 2 and t is not centers_A)]
    if any(b not in (1, max(batches, default=1)) for b in batches):
        return False
    return native.fused_projection_available()


class _FusedProjection(torch.autograd.Function):
    """The separable projection on the CPU in float32, by the fused kernels of
    :mod:`gmmrefine.native`: per particle and chunk of Gaussians, the image positions, the tables
    ``X0``, ``Y0`` (as in :class:`_SeparableProjection`) and their block product are computed in
    cache, and the backward rebuilds the tables instead of saving them; it returns the gradients to
    the centres, amplitudes, widths, rotation rows and shifts directly (no autograd graph below)."""

    @staticmethod
    def forward(ctx, centers, amp, width, rows, shift_px, gather, sign, k1, f1, apix):
        centers_b = (centers if centers.ndim == 3 else centers[None]).contiguous()
        amp_b = (amp if amp.ndim == 2 else amp[None]).contiguous()
        width_b = (width if width.ndim == 2 else width[None]).contiguous()
        rows = rows.contiguous()
        shift_px = None if shift_px is None else shift_px.contiguous()
        batch = max(centers_b.shape[0], amp_b.shape[0], width_b.shape[0], rows.shape[0],
                    1 if shift_px is None else shift_px.shape[0])
        kappa = (2 * math.pi) ** 1.5 / apix**3
        ctx.constants = (batch, k1, f1, apix, kappa)
        ctx.shapes = (centers.shape, amp.shape, width.shape, rows.shape, None if shift_px is None else shift_px.shape)
        ctx.save_for_backward(centers_b, amp_b, width_b, rows, shift_px, gather, sign)
        args = native.projection_args(centers_b, rows, shift_px, amp_b, width_b, gather, sign, batch, k1, f1, apix,
                                      kappa, _FUSED_CHUNK)
        return native.project_fused_forward(args)

    @staticmethod
    def backward(ctx, grad):
        centers_b, amp_b, width_b, rows, shift_px, gather, sign = ctx.saved_tensors
        batch, k1, f1, apix, kappa = ctx.constants
        args = native.projection_args(centers_b, rows, shift_px, amp_b, width_b, gather, sign, batch, k1, f1, apix,
                                      kappa, _FUSED_CHUNK)
        d_centers, d_amp, d_width, d_rows, d_shift = native.project_fused_backward(args, grad)
        grads = [_sum_to(g, shape) if shape is not None and need else None
                 for g, shape, need in zip((d_centers, d_amp, d_width, d_rows, d_shift), ctx.shapes,
                                           ctx.needs_input_grad)]
        return (*grads, None, None, None, None, None)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-particle gradient ``(B, ...)`` summed over the particles that share an input of ``shape``."""
    if len(shape) < grad.ndim:
        return grad.sum(0)
    return grad if grad.shape[0] == shape[0] else grad.sum(0, keepdim=True)


def _tables(pos: torch.Tensor, width_b: torch.Tensor, ascale: torch.Tensor, freqs: torch.Tensor, k1: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables of one chunk of Gaussians (the torch path: any device and dtype; the fused kernels build
    the same tables, transposed, in C).

    Returns ``(x0, y0, y0 * ascale)``, the first two ``(Bt, n, 2 K1)`` views of one table tensor.
    """
    gauss = torch.exp((-2 * math.pi**2) * width_b[..., None] ** 2 * (freqs * freqs))  # (Bw, n, K1)
    n_pos, n_gauss = pos.shape[0], pos.shape[1]
    bt = max(n_pos, gauss.shape[0])
    # tables[b, axis, j, n, cos/sin] = e^{i n t}, t = 2 pi f_1 p, by doubling: entries n..2n-1 are
    # entries 0..n-1 times e^{i n t} (n = 1, 2, 4, ...): one sin/cos per Gaussian and ~1 complex
    # multiply per entry instead of a sin and a cos per entry (2x faster table build at K = 18).
    # Phase error grows as ~n * 6e-8 rad, the same as sin(n t) suffers from rounding n t itself.
    tables = torch.empty(bt, 2, n_gauss, k1, 2, dtype=pos.dtype, device=pos.device)
    phase = torch.view_as_complex(tables)                                            # (bt, 2, n, K1)
    t1 = (pos.transpose(1, 2) * (2 * math.pi * freqs[1])).expand(bt, -1, -1)      # k1 >= 2: no DC-only band
    step = torch.complex(torch.cos(t1), torch.sin(t1))                               # e^{i t}
    phase[..., 0] = 1.0
    filled = 1
    while filled < k1:
        count = min(filled, k1 - filled)
        torch.mul(phase[..., :count], step[..., None], out=phase[..., filled:filled + count])
        filled += count
        if filled < k1:
            step = step * step
    tables.mul_(gauss[:, None, :, :, None])
    x0 = tables[:, 0].view(bt, n_gauss, 2 * k1)
    y0 = tables[:, 1].view(bt, n_gauss, 2 * k1)
    batch = max(bt, ascale.shape[0])
    return x0, y0, (y0 * ascale[..., None]).expand(batch, -1, -1)


def _table_sums(h_conj: torch.Tensor, table: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(B, n, 3)`` weighted sums over frequency of ``h * table`` (complex; the fused kernels'
    ``gmm_chunk_sums`` in C)."""
    batch, n_gauss, row = h_conj.shape
    z = torch.view_as_complex(h_conj.view(batch, n_gauss, row // 2, 2)) * torch.view_as_complex(
        table.reshape(table.shape[0], n_gauss, row // 2, 2)).expand(batch, -1, -1)
    return torch.view_as_real(z).reshape(batch, n_gauss, row) @ weights


def project_reference(centers_A: torch.Tensor, amplitudes: torch.Tensor, widths_A: torch.Tensor,
                      rotations: torch.Tensor, translation_px: torch.Tensor | None, band: FourierBand,
                      chunk: int = 512) -> torch.Tensor:
    """Slow float64 evaluation straight from the formula, one complex exponential per Gaussian and
    pixel (the accuracy reference for tests; not for production).

    Returns:
        ``(B, P)`` complex128.
    """
    c = centers_A.to(torch.float64)
    a = amplitudes.to(torch.float64)
    s = widths_A.to(torch.float64)
    rot = rotations.to(torch.float64)
    t = None if translation_px is None else translation_px.to(torch.float64)
    pos = image_positions_A(c, rot, t, band.apix)  # (B, N, 2)
    k = torch.stack([band.nx, band.ny], -1).to(torch.float64) / (band.box * band.apix)  # (P, 2)
    k2 = (k * k).sum(-1)
    out = torch.zeros(pos.shape[0], k.shape[0], dtype=torch.complex128, device=pos.device)
    a = a.expand(pos.shape[:2]) if a.ndim == 1 else a
    s = s.expand(pos.shape[:2]) if s.ndim == 1 else s
    for start in range(0, pos.shape[1], chunk):
        sl = slice(start, start + chunk)
        sj = s[:, sl, None]
        mag = a[:, sl, None] * (2 * math.pi) ** 1.5 * sj**3 / band.apix**3 * torch.exp(-2 * math.pi**2 * sj**2 * k2)
        phase = -2 * math.pi * (pos[:, sl] @ k.T)
        out += torch.polar(mag, phase).sum(1)
    return out

"""ctypes bindings of the compiled CPU kernels (``src/gmmrefine/_native.c``, built at install time).

Three hot loops have a C version on the CPU beside their torch code: the Fourier insertion, the
elementwise steps of the Pipe-Menon weights of the reconstruction, and the separable GMM projection
with its backward, whose tables are built in cache and multiplied by the BLAS ``sgemm`` torch links
(its address is looked up in torch's libraries and checked on a 2x3 product; without one, the torch
code runs). The torch code stays the one that runs on CUDA (and in float64); tests hold the two to
each other.

Why C and not numba: importing numba and loading one compiled function costs ~120 MB of resident
memory (LLVM), more than the headroom of a reconstruction under relion_reconstruct's peak; the C
library costs nothing measurable. The kernels take raw pointers and run with the GIL released.
Threads: the insertion runs on its caller's thread (the two halves fill their grids from two
threads); the other kernels use OpenMP, and since torch has loaded its own ``libgomp.so.1`` before
this library is opened, the library binds to that copy: one thread pool and one thread count
(``torch.set_num_threads``) for torch and for these loops. A second OpenMP runtime, or Python
threads, would compete with torch's spinning OpenMP workers (measured: the projection kernels ran
2-3x slower from a Python thread pool than from OpenMP).
"""

from __future__ import annotations

import ctypes
import glob
import os
import importlib.util
import math
import warnings
from functools import lru_cache

import torch

# Views binned together, and z planes per bin, of the compiled insertion (see _native.c). 64 views of
# box 128 take 10 MB of work space (6 floats and a bin per sample); more views per group (128: 20 MB)
# are ~20 % faster still. Larger boxes get fewer views per group, so the work space stays <= ~18 MB.
_VIEWS_PER_GROUP = 64
_WORK_FLOATS_PER_GROUP = 4_000_000
_PLANES_PER_TILE = 4

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_f64 = ctypes.c_double


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("gmmrefine._native")
    if spec is None or spec.origin is None:
        warnings.warn("gmmrefine's compiled kernels are not built (reinstall with `pip install .` and a C "
                      "compiler); the slower torch code runs on the CPU instead.", RuntimeWarning, stacklevel=3)
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.gmm_insert_slices.restype = ctypes.c_int
    lib.gmm_insert_slices.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64]
    lib.gmm_sgemm_check.restype = ctypes.c_int
    lib.gmm_sgemm_check.argtypes = [_ptr]
    lib.gmm_project_fused_forward.restype = ctypes.c_int
    lib.gmm_project_fused_forward.argtypes = [_ptr] * 4 + [_i64] * 6 + [_f64, _i64, _ptr, _ptr, _i64, _ptr, _ptr]
    lib.gmm_project_fused_backward.restype = ctypes.c_int
    lib.gmm_project_fused_backward.argtypes = [_ptr] * 7 + [_i64] * 6 + [_f64, _i64, _ptr, _ptr]
    lib.gmm_pm_fill.restype = None
    lib.gmm_pm_fill.argtypes = [_ptr, _ptr, _ptr, _i64]
    lib.gmm_pm_multiply_radial.restype = None
    lib.gmm_pm_multiply_radial.argtypes = [_ptr, _ptr, _i64]
    lib.gmm_pm_divide.restype = None
    lib.gmm_pm_divide.argtypes = [_ptr, _ptr, _i64, ctypes.c_float, ctypes.c_float]
    return lib


def available() -> bool:
    """True when the compiled kernels are built and loadable."""
    return _library() is not None


def _pointer(t: torch.Tensor, dtype: torch.dtype) -> int:
    if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous CPU {dtype} tensor, got {t.dtype} {tuple(t.shape)} on {t.device}")
    return t.data_ptr()


def insert_slices(data: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, wts: torch.Tensor,
                  mats: torch.Tensor, view_particle: torch.Tensor, freqs: torch.Tensor) -> None:
    """Add central slices into an accumulator's grids, in place (CPU, compiled).

    Args:
        data: ``(Dp, Dp, Dp//2+1)`` complex64 grid.
        weight: ``(Dp, Dp, Dp//2+1)`` float32 grid.
        values: ``(P, M)`` complex64 samples of each particle (times their multiplicity).
        wts: ``(P, M)`` float32 weight of each sample.
        mats: ``(V, 3, 3)`` float32 rotation of each view (particle times symmetry operator).
        view_particle: ``(V,)`` int64 particle of each view.
        freqs: ``(M, 2)`` float32 ``(kx, ky)`` of the samples in cycles per original pixel.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("gmmrefine's compiled kernels are not built")
    size = data.shape[0]
    nviews, nsamples = mats.shape[0], freqs.shape[0]
    if values.shape[1] != nsamples or wts.shape != values.shape or view_particle.shape != (nviews,):
        raise ValueError("values, wts, mats, view_particle and freqs disagree in shape")
    status = lib.gmm_insert_slices(
        _pointer(data, torch.complex64), _pointer(weight, torch.float32), _pointer(values, torch.complex64),
        _pointer(wts, torch.float32), _pointer(mats, torch.float32), _pointer(view_particle, torch.int64),
        nviews, _pointer(freqs, torch.float32), nsamples, size,
        max(1, min(_VIEWS_PER_GROUP, _WORK_FLOATS_PER_GROUP // (6 * max(nsamples, 1)))), _PLANES_PER_TILE)
    if status != 0:
        raise MemoryError("the compiled insertion could not allocate its work space")


@lru_cache(maxsize=None)
def _blas() -> int | None:
    """Address of the Fortran ``sgemm_`` of the BLAS torch links (MKL or OpenBLAS), or None when no
    working one is found."""
    lib = _library()
    if lib is None:
        return None
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libtorch_cpu*"))) + sorted(glob.glob(os.path.join(libdir, "*blas*"))):
        try:
            blas = ctypes.CDLL(path)
            sgemm = ctypes.cast(blas.sgemm_, ctypes.c_void_p).value
        except (OSError, AttributeError):
            continue
        if sgemm and lib.gmm_sgemm_check(sgemm) == 1:
            return sgemm
    return None


def fused_projection_available() -> bool:
    """True when the fused projection kernels can run: the library is built and torch's BLAS
    exports a working ``sgemm_``."""
    return _blas() is not None


def project_fused_forward(pos: torch.Tensor, q: torch.Tensor, ascale: torch.Tensor, batch: int, k1: int,
                          f1: float, chunk: int, gather: torch.Tensor, sign: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Band pixels of the separable projection, tables built and multiplied chunk by chunk in cache.

    Args:
        pos: ``(Bp, N, 2)`` float32 image positions (A); q: ``(Bq, N)`` float64 envelope ratios
            ``exp(-2 pi^2 s^2 f1^2)``; ascale: ``(Ba, N)`` float32; batches of 1 broadcast to ``batch``.
        k1, f1: frequencies ``n * f1`` (1/A), ``n = 0..k1-1``; chunk: Gaussians per table.
        gather: ``(4, P)`` int64 indices of each pixel's cc, cs, sc, ss products in the ``(2 k1)^2``
            blocks; sign: ``(P,)`` float32, -1 where ``ky < 0``.

    Returns:
        ``(re, im)``, each ``(batch, P)`` float32 (``_SeparableProjection`` in project.py).
    """
    n, pixels = pos.shape[1], sign.shape[0]
    re = torch.empty(batch, pixels)
    im = torch.empty(batch, pixels)
    status = _library().gmm_project_fused_forward(
        _blas(), _pointer(pos, torch.float32), _pointer(q, torch.float64), _pointer(ascale, torch.float32),
        pos.shape[0], q.shape[0], ascale.shape[0], batch, n, k1, f1, chunk, _pointer(gather, torch.int64),
        _pointer(sign, torch.float32), pixels, re.data_ptr(), im.data_ptr())
    if status != 0:
        raise MemoryError("the fused projection could not allocate its tables")
    return re, im


def project_fused_backward(pos: torch.Tensor, q: torch.Tensor, g_re: torch.Tensor, g_im: torch.Tensor,
                           gather: torch.Tensor, sign: torch.Tensor, k1: int, f1: float, chunk: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums over frequency of the backward of the separable projection, tables rebuilt in cache.

    Args:
        pos, q, k1, f1, chunk, gather, sign: as :func:`project_fused_forward`.
        g_re, g_im: ``(B, P)`` float32 gradients of the pixels' real and imaginary parts.

    Returns:
        ``(rx, ry)``, each ``(B, N, 3)``: per Gaussian, ``sum_n Re z_n``, ``f1^2 sum_n n^2 Re z_n`` and
        ``2 pi f1 sum_n n Im z_n`` of ``z = h * x0`` (``h`` the conjugate gradient of ``x0`` over the
        amplitude) and of ``z = u * y0`` likewise.
    """
    batch, pixels, n = g_re.shape[0], sign.shape[0], pos.shape[1]
    rx = torch.empty(batch, n, 3)
    ry = torch.empty(batch, n, 3)
    status = _library().gmm_project_fused_backward(
        _blas(), _pointer(pos, torch.float32), _pointer(q, torch.float64), _pointer(g_re, torch.float32),
        _pointer(g_im, torch.float32), _pointer(gather, torch.int64), _pointer(sign, torch.float32), pixels,
        pos.shape[0], q.shape[0], batch, n, k1, f1, chunk, rx.data_ptr(), ry.data_ptr())
    if status != 0:
        raise MemoryError("the fused projection could not allocate its tables")
    return rx, ry


def pm_fill(spectrum: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``spectrum = a * b + 0i`` for ``(Dp, Dp, Dp//2+1)`` complex64 ``spectrum`` and float32 ``a``, ``b``."""
    if a.shape != spectrum.shape or b.shape != spectrum.shape:
        raise ValueError("pm_fill: shapes differ")
    _library().gmm_pm_fill(_pointer(spectrum, torch.complex64), _pointer(a, torch.float32),
                           _pointer(b, torch.float32), spectrum.numel())


def pm_multiply_radial(spectrum: torch.Tensor, table: torch.Tensor) -> None:
    """Multiply the ``(Dp, Dp, Dp)`` real view of an in-place transform's storage (``spectrum``,
    ``(Dp, Dp, Dp//2+1)`` complex64) by ``table[kz^2 + ky^2 + kx^2]`` (signed frequency indices)."""
    n = spectrum.shape[0]
    if table.numel() < 3 * (n // 2) ** 2 + 1:
        raise ValueError("pm_multiply_radial: the table is shorter than the largest squared radius")
    _library().gmm_pm_multiply_radial(_pointer(spectrum, torch.complex64), _pointer(table, torch.float32), n)


def pm_divide(inverse: torch.Tensor, spectrum: torch.Tensor, floor: float, cap: float) -> None:
    """``inverse = min(inverse / max(|Re spectrum|, floor), cap)`` in place (float32 and complex64)."""
    if inverse.shape != spectrum.shape:
        raise ValueError("pm_divide: shapes differ")
    _library().gmm_pm_divide(_pointer(inverse, torch.float32), _pointer(spectrum, torch.complex64),
                             inverse.numel(), floor, cap)

"""ctypes bindings of the compiled CPU kernels (``src/gmmrefine/_native.c``, built at install time).

Three hot loops have a C twin of their torch code on the CPU: the Fourier insertion and the
elementwise steps of the Pipe-Menon weights of the reconstruction, and the table passes of the
separable GMM projection. The torch code stays the one that runs on CUDA (and in float64); tests
hold the two to each other.

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
    lib.gmm_projection_tables.restype = None
    lib.gmm_projection_tables.argtypes = [_ptr, _ptr, _ptr] + [_i64] * 7 + [_f64, _ptr, _ptr, _ptr]
    lib.gmm_projection_table_sums.restype = None
    lib.gmm_projection_table_sums.argtypes = [_ptr, _ptr] + [_i64] * 4 + [_f64, _ptr]
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


def projection_tables(pos: torch.Tensor, width: torch.Tensor, ascale: torch.Tensor, start: int, stop: int,
                      k1: int, f1: float, ys_buffer: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tables of the separable projection for Gaussians ``start:stop`` (CPU, float32, compiled).

    Args:
        pos: ``(Bp, N, 2)`` image positions (A); width: ``(Bw, N)`` (A); ascale: ``(Ba, N)``;
            a batch of 1 broadcasts.
        k1: frequencies ``n = 0..k1-1`` of ``f_n = n * f1`` (1/A).
        ys_buffer: float32 storage to write ``ys`` into (at least its size), reused across chunks:
            fresh pages cost a page fault each (at K = 85 half of the kernel's time).

    Returns:
        ``(x0, y0, ys)``: ``(Bt, n, 2 k1)`` interleaved ``g_n cos, g_n sin`` of ``2 pi f_n p_x`` and of
        ``p_y`` (``Bt = max(Bp, Bw)``, ``n = stop - start``), and ``y0 * ascale`` with batch
        ``max(Bt, Ba)``. See ``gmm_projection_tables`` in ``_native.c``.
    """
    lib = _library()
    bp, n = pos.shape[0], pos.shape[1]
    bw, ba = width.shape[0], ascale.shape[0]
    tb = max(bp, bw)
    nc = stop - start
    x0 = torch.empty(tb, nc, 2 * k1)
    y0 = torch.empty(tb, nc, 2 * k1)
    ys_shape = (max(tb, ba), nc, 2 * k1)
    if ys_buffer is None or ys_buffer.numel() < math.prod(ys_shape):
        ys = torch.empty(ys_shape)
    else:
        ys = ys_buffer.view(-1)[:math.prod(ys_shape)].view(ys_shape)
    args = (_pointer(pos, torch.float32), _pointer(width, torch.float32), _pointer(ascale, torch.float32))
    outs = (x0.data_ptr(), y0.data_ptr(), ys.data_ptr())
    lib.gmm_projection_tables(*args, bp, bw, ba, n, start, nc, k1, f1, *outs)
    return x0, y0, ys


def projection_table_sums(h: torch.Tensor, table: torch.Tensor, f1: float) -> torch.Tensor:
    """``(B, n, 3)`` sums over frequency of ``z = h * table`` (complex, interleaved):
    ``sum Re z``, ``sum f^2 Re z`` and ``sum 2 pi f Im z`` with ``f_n = n * f1``.

    Args:
        h: ``(B, n, 2 k1)`` float32; table: ``(1 or B, n, 2 k1)`` float32.
    """
    lib = _library()
    nb, nc, row = h.shape
    out = torch.empty(nb, nc, 3)
    hp, tp = _pointer(h, torch.float32), _pointer(table, torch.float32)
    lib.gmm_projection_table_sums(hp, tp, nb, table.shape[0], nc, row // 2, f1, out.data_ptr())
    return out


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

"""ctypes bindings of the compiled CPU kernels (``src/gmmrefine/_native.c``, built at install time).

Why C and not numba: importing numba and loading one compiled function costs ~120 MB of resident
memory (LLVM), more than the headroom of a reconstruction under relion_reconstruct's peak; the C
library costs nothing measurable. The kernels take raw pointers and run with the GIL released, so
two threads can fill the two halves' grids at once.
"""

from __future__ import annotations

import ctypes
import importlib.util
import warnings
from functools import lru_cache

import torch

# Views binned together, and z planes per bin, of the compiled insertion (see _native.c). 64 views of
# box 128 take 10 MB of work space; more views per group (128: 20 MB) are ~20 % faster still.
_VIEWS_PER_GROUP = 64
_PLANES_PER_TILE = 4

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64


@lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("gmmrefine._native")
    if spec is None or spec.origin is None:
        warnings.warn("gmmrefine's compiled kernels are not built (reinstall with `pip install .` and a C "
                      "compiler); using the slower torch insertion on the CPU.", RuntimeWarning, stacklevel=3)
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.gmm_insert_slices.restype = ctypes.c_int
    lib.gmm_insert_slices.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64]
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
        nviews, _pointer(freqs, torch.float32), nsamples, size, _VIEWS_PER_GROUP, _PLANES_PER_TILE)
    if status != 0:
        raise MemoryError("the compiled insertion could not allocate its work space")

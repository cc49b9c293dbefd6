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
import importlib.util
import os
import warnings
from functools import cache

import torch

from gmmrefine.errors import InputError

# Views binned together, and z planes per bin, of the compiled insertion (see _native.c). 64 views of
# box 128 take 10 MB of work space (6 floats and a bin per sample); more views per group (128: 20 MB)
# are ~20 % faster still. Larger boxes get fewer views per group, so the work space stays <= ~18 MB.
_VIEWS_PER_GROUP = 64
_WORK_FLOATS_PER_GROUP = 4_000_000
_PLANES_PER_TILE = 4

_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64
_f64 = ctypes.c_double


class ProjectionArgs(ctypes.Structure):
    """``projection_args`` of ``_native.c``: the inputs of one fused projection."""

    _fields_ = [(name, _ptr) for name in ("centers", "rows", "shift_px", "amp", "width", "gather", "sign")] + [
        (name, _i64) for name in ("bc", "br", "bs", "ba", "bw", "nb", "n", "k1", "np", "chunk")] + [
        (name, _f64) for name in ("f1", "apix", "kappa")]


KERNELS_ENV = "GMMREFINE_KERNELS"
_MODES = ("auto", "native", "torch")
_warned: set[str] = set()  # reasons already warned about

# What the torch code costs on the CPU instead, measured by benchmarks/kernels.py (box 64, 300 Gaussians,
# one thread): projection step 2.5x, pose refinement 2.1x, reconstruction 1.4x, a refine iteration 1.3x.
_SLOWDOWN = "pose refinement ~2x slower, reconstruction ~1.4x"


def kernel_mode() -> str:
    """``GMMREFINE_KERNELS``: ``auto`` (the compiled kernels where they load, else torch), ``native``
    (the compiled kernels, an error if they cannot run) or ``torch`` (the torch code, as on CUDA)."""
    mode = os.environ.get(KERNELS_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise InputError(f"environment variable {KERNELS_ENV}={mode!r}: expected one of {', '.join(_MODES)}.",
                         field=KERNELS_ENV)
    return mode


def _why_not(reason: str) -> None:
    """The compiled kernels cannot run: an error under ``GMMREFINE_KERNELS=native``, else one warning
    per reason."""
    if kernel_mode() == "native":
        raise InputError(f"{KERNELS_ENV}=native, but {reason}.", field=KERNELS_ENV)
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"gmmrefine: {reason}; the torch code runs on the CPU instead ({_SLOWDOWN}). "
                  "`gmmrefine info` shows the kernels in use.", RuntimeWarning, stacklevel=4)


@cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The compiled library and '', or None and why it cannot run."""
    spec = importlib.util.find_spec("gmmrefine._native")
    if spec is None or spec.origin is None:
        return None, "the compiled kernels are not built (reinstall with a C compiler: `pip install .`)"
    try:
        lib = ctypes.CDLL(spec.origin)
        lib.gmm_insert_slices.restype = ctypes.c_int
    except (OSError, AttributeError) as exc:
        return None, f"the compiled kernels in {spec.origin} do not load ({exc})"
    lib.gmm_insert_slices.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64]
    lib.gmm_sgemm_check.restype = ctypes.c_int
    lib.gmm_sgemm_check.argtypes = [_ptr]
    lib.gmm_project_fused_forward.restype = ctypes.c_int
    lib.gmm_project_fused_forward.argtypes = [_ptr, ctypes.POINTER(ProjectionArgs), _ptr]
    lib.gmm_project_fused_backward.restype = ctypes.c_int
    lib.gmm_project_fused_backward.argtypes = [_ptr, ctypes.POINTER(ProjectionArgs), _ptr, _ptr, _ptr, _ptr, _ptr, _ptr]
    lib.gmm_pm_fill.restype = None
    lib.gmm_pm_fill.argtypes = [_ptr, _ptr, _ptr, _i64]
    lib.gmm_pm_multiply_radial.restype = None
    lib.gmm_pm_multiply_radial.argtypes = [_ptr, _ptr, _i64]
    lib.gmm_pm_divide.restype = None
    lib.gmm_pm_divide.argtypes = [_ptr, _ptr, _i64, ctypes.c_float, ctypes.c_float]
    return lib, ""



def _library() -> ctypes.CDLL | None:
    """The compiled library, or None when switched off or unavailable (one warning, or an error under
    ``GMMREFINE_KERNELS=native``)."""
    if kernel_mode() == "torch":
        return None
    lib, why = _load()
    if lib is None:
        _why_not(why)
    return lib


def _lib() -> ctypes.CDLL:
    """The library, for the wrappers below (callers check :func:`available` first)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("gmmrefine's compiled kernels are not built or are switched off")
    return lib


def available() -> bool:
    """True when the compiled kernels are built, loadable and not switched off (``GMMREFINE_KERNELS=torch``)."""
    return _library() is not None


def openmp_threads() -> int:
    """Threads of the compiled kernels' OpenMP loops; 0 when built without OpenMP (or not in use)."""
    lib = _library()
    if lib is None or not hasattr(lib, "gmm_openmp_threads"):
        return 0
    return int(lib.gmm_openmp_threads())


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
    lib = _lib()
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


@cache
def _blas() -> int | None:
    """Address of the Fortran ``sgemm_`` of the BLAS torch links (MKL or OpenBLAS), or None when no
    working one is found (independent of the mode, so that it can be cached)."""
    lib = _load()[0]
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
    """True when the fused projection kernels can run: the library is built, not switched off, and
    torch's BLAS exports a working ``sgemm_`` (one warning when it does not)."""
    if _library() is None:
        return False
    if _blas() is None:
        _why_not("torch's libraries export no working BLAS sgemm_ for the fused GMM projection")
        return False
    return True


def kernels_info() -> dict[str, object]:
    """What runs on the CPU and why (``gmmrefine info``)."""
    mode = kernel_mode()
    lib, why_not = _load()
    spec = importlib.util.find_spec("gmmrefine._native")
    fused = lib is not None and _blas() is not None
    if mode == "torch":
        why = f"{KERNELS_ENV}=torch: the torch code runs on the CPU, as on CUDA"
    elif lib is None:
        why = f"{why_not}: the torch code runs"
    elif not fused:
        why = "compiled insertion and reconstruction; torch exports no BLAS sgemm_, so the GMM projection is torch's"
    else:
        why = "compiled kernels: insertion, reconstruction weights and the fused GMM projection"
    in_use = mode != "torch" and lib is not None
    return {"mode": mode, "library": spec.origin if spec is not None else None, "compiled_in_use": in_use,
            "fused_projection_in_use": in_use and fused,
            "openmp_threads": int(lib.gmm_openmp_threads()) if lib is not None and hasattr(lib, "gmm_openmp_threads")
            else 0, "why": why}


def projection_args(centers: torch.Tensor, rows: torch.Tensor, shift_px: torch.Tensor | None, amp: torch.Tensor,
                    width: torch.Tensor, gather: torch.Tensor, sign: torch.Tensor, batch: int, k1: int, f1: float,
                    apix: float, kappa: float, chunk: int) -> ProjectionArgs:
    """Pack the inputs of :func:`project_fused_forward` (the tensors must outlive the calls).

    Args:
        centers: ``(Bc, N, 3)`` float32 (A); rows: ``(Br, 2, 3)`` float32, the first two rows of each
            rotation ``A``; shift_px: ``(Bs, 2)`` float32 image translations (px) or None;
            amp, width: ``(Ba, N)``, ``(Bw, N)`` float32 (A); batches of 1 broadcast to ``batch``.
        gather: ``(4, P)`` int64 indices of each pixel's cc, cs, sc, ss products in the ``(2 k1)^2``
            blocks; sign: ``(P,)`` float32, -1 where ``ky < 0``.
        k1, f1: frequencies ``n * f1`` (1/A), ``n = 0..k1-1``; apix: A/px; kappa: ``(2 pi)^1.5 / apix^3``;
        chunk: Gaussians per table.
    """
    n = centers.shape[1]
    return ProjectionArgs(
        _pointer(centers, torch.float32), _pointer(rows, torch.float32),
        None if shift_px is None else _pointer(shift_px, torch.float32), _pointer(amp, torch.float32),
        _pointer(width, torch.float32), _pointer(gather, torch.int64), _pointer(sign, torch.float32),
        centers.shape[0], rows.shape[0], 0 if shift_px is None else shift_px.shape[0], amp.shape[0], width.shape[0],
        batch, n, k1, sign.shape[0], chunk, f1, apix, kappa)


def project_fused_forward(args: ProjectionArgs) -> torch.Tensor:
    """Band pixels of the separable projection, tables built and multiplied chunk by chunk in cache.

    Returns:
        ``(batch, P)`` complex64 (``_FusedProjection`` in project.py).
    """
    out = torch.empty(args.nb, args.np, 2)
    if _lib().gmm_project_fused_forward(_blas(), ctypes.byref(args), out.data_ptr()) != 0:
        raise MemoryError("the fused projection could not allocate its tables")
    return torch.view_as_complex(out)


def project_fused_backward(args: ProjectionArgs, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of the fused projection, tables rebuilt in cache.

    Args:
        args: as given to :func:`project_fused_forward`.
        grad: ``(batch, P)`` complex64 gradient of the pixels.

    Returns:
        Per particle (not yet summed over a shared batch): ``d_centers (batch, N, 3)``, ``d_amp
        (batch, N)``, ``d_width (batch, N)``, ``d_rows (batch, 2, 3)`` and ``d_shift (batch, 2)`` (px).
    """
    grad = torch.view_as_real(grad.resolve_conj().contiguous()).contiguous()
    nb, n = args.nb, args.n
    outs = (torch.empty(nb, n, 3), torch.empty(nb, n), torch.empty(nb, n), torch.empty(nb, 2, 3), torch.empty(nb, 2))
    status = _lib().gmm_project_fused_backward(_blas(), ctypes.byref(args), _pointer(grad, torch.float32),
                                                   *(t.data_ptr() for t in outs))
    if status != 0:
        raise MemoryError("the fused projection could not allocate its tables")
    return outs


def pm_fill(spectrum: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``spectrum = a * b + 0i`` for ``(Dp, Dp, Dp//2+1)`` complex64 ``spectrum`` and float32 ``a``, ``b``."""
    if a.shape != spectrum.shape or b.shape != spectrum.shape:
        raise ValueError("pm_fill: shapes differ")
    _lib().gmm_pm_fill(_pointer(spectrum, torch.complex64), _pointer(a, torch.float32),
                           _pointer(b, torch.float32), spectrum.numel())


def pm_multiply_radial(spectrum: torch.Tensor, table: torch.Tensor) -> None:
    """Multiply the ``(Dp, Dp, Dp)`` real view of an in-place transform's storage (``spectrum``,
    ``(Dp, Dp, Dp//2+1)`` complex64) by ``table[kz^2 + ky^2 + kx^2]`` (signed frequency indices)."""
    n = spectrum.shape[0]
    if table.numel() < 3 * (n // 2) ** 2 + 1:
        raise ValueError("pm_multiply_radial: the table is shorter than the largest squared radius")
    _lib().gmm_pm_multiply_radial(_pointer(spectrum, torch.complex64), _pointer(table, torch.float32), n)


def pm_divide(inverse: torch.Tensor, spectrum: torch.Tensor, floor: float, cap: float) -> None:
    """``inverse = min(inverse / max(|Re spectrum|, floor), cap)`` in place (float32 and complex64)."""
    if inverse.shape != spectrum.shape:
        raise ValueError("pm_divide: shapes differ")
    _lib().gmm_pm_divide(_pointer(inverse, torch.float32), _pointer(spectrum, torch.complex64),
                             inverse.numel(), floor, cap)

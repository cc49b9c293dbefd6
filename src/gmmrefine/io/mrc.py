"""MRC maps and particle stacks.

Maps are float32 ``(D, D, D)`` arrays indexed ``[z, y, x]``; stacks are ``(n, ny, nx)`` indexed
``[image, y, x]``, as mrcfile gives them. Stacks are read through a read-only memory map so that
hundreds of thousands of particles never have to sit in memory, and written either at once
(:func:`write_stack`) or chunk by chunk (:class:`StackWriter`). Every write is atomic.

A file that is not an MRC file, or whose data block is shorter than its header says (a truncated
copy), raises :class:`gmmrefine.errors.InputError` naming the file. Headers without the ``MAP `` id
string (older RELION and EMAN writers) are read as RELION reads them, with one warning per file, when
the rest of the header describes a data block the file holds.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from gmmrefine.errors import InputError
from gmmrefine.io.atomic import atomic_path

_HEADER_BYTES = 1024
_WARNED: set[str] = set()


def _open_header(path: str | os.PathLike):
    """Header (numpy record) of an MRC file, validated as far as reading needs.

    Returns:
        ``(header, data_offset_bytes, data_dtype, shape (nz, ny, nx))``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: MRC file not found.", path=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
                header = mrc.header.copy()
    except Exception as exc:  # mrcfile raises ValueError/OSError with its own wording
        header = _header_without_map_id(path) if "Map ID string" in str(exc) else None
        if header is None:
            raise InputError(f"{path}: not a readable MRC file ({exc}).", path=str(path)) from exc
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except ValueError as exc:
        raise InputError(f"{path}: unsupported MRC data mode {int(header.mode)} in the header.",
                         path=str(path), field="mode") from exc
    nx, ny, nz = int(header.nx), int(header.ny), int(header.nz)
    if min(nx, ny, nz) < 1:
        raise InputError(f"{path}: MRC header gives an empty data block (nx, ny, nz = {nx}, {ny}, {nz}).",
                         path=str(path), field="nx/ny/nz")
    if int(header.nsymbt) < 0:
        raise InputError(f"{path}: MRC header gives a negative extended header size (nsymbt = "
                         f"{int(header.nsymbt)}).", path=str(path), field="nsymbt")
    offset = _HEADER_BYTES + int(header.nsymbt)
    expected = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise InputError(f"{path}: truncated MRC file, the header needs {expected} bytes but the file has {size}.",
                         path=str(path), field="data")
    return header, offset, dtype, (nz, ny, nx)


def _header_without_map_id(path: Path):
    """The header of an MRC file that lacks the ``MAP `` id string, read as RELION 3.1 does (one warning
    per file), or None if mrcfile cannot read it even permissively."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = None if mrc.header is None else mrc.header.copy()
    except Exception:
        return None
    if header is None:
        return None
    try:  # without the id string, only a known data mode says this is an MRC file at all
        mrcfile.utils.data_dtype_from_header(header)
    except ValueError:
        return None
    if str(path) not in _WARNED:
        _WARNED.add(str(path))
        warnings.warn(f"{path}: the MRC header has no 'MAP ' id string (an older writer's); reading it as "
                      "RELION does.", stacklevel=4)
    return header


def _voxel_size(header) -> float:
    """Pixel size along x in angstrom from the header (0 when the cell is unset)."""
    mx = int(header.mx)
    return float(header.cella.x) / mx if mx > 0 else 0.0


def read_map(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read a map (or any MRC file) into memory.

    Returns:
        ``(data, apix)``: float32 array as stored (``(D, D, D)`` ``[z, y, x]`` for a map; 2D files
        come back 2D) and the pixel size in angstrom (0.0 if the header does not set it).
    """
    header, offset, dtype, shape = _open_header(path)
    raw = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    data = np.ascontiguousarray(raw, dtype=np.float32)
    if shape[0] == 1 and int(header.ispg) != 1:
        data = data[0]
    return data, _voxel_size(header)


def require_cubic(arr: np.ndarray, path: str | os.PathLike) -> np.ndarray:
    """Return ``arr`` if it is a cubic 3D map, else raise InputError naming ``path``."""
    if arr.ndim != 3 or not (arr.shape[0] == arr.shape[1] == arr.shape[2]):
        raise InputError(f"{path}: expected a cubic 3D map, got an array of shape {tuple(arr.shape)}.",
                         path=str(path), field="shape")
    return arr


def write_map(path: str | os.PathLike, data: np.ndarray, apix: float) -> None:
    """Write a 3D map as float32 MRC (mode 2), voxel size ``apix`` (A), origin 0, atomically."""
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"write_map expects a 3D array, got shape {data.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(data))
            mrc.set_volume()
            mrc.voxel_size = float(apix)
            mrc.header.origin = (0.0, 0.0, 0.0)
            mrc.header.nxstart = mrc.header.nystart = mrc.header.nzstart = 0


def stack_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(n, ny, nx)`` of an image stack (a single 2D image is a stack of 1), from the header only."""
    return _open_header(path)[3]


def stack_apix(path: str | os.PathLike) -> float:
    """Pixel size in angstrom from the header (0.0 if unset)."""
    return _voxel_size(_open_header(path)[0])


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """Read-only memory map of an image stack, shape ``(n, ny, nx)`` in the file's dtype.

    Index it (``stack[i0:i1]``, ``stack[idx]``) to read only those images; cast to float32 yourself.
    """
    _, offset, dtype, shape = _open_header(path)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def write_stack(path: str | os.PathLike, images: np.ndarray, apix: float) -> None:
    """Write ``(n, ny, nx)`` images as a float32 MRC image stack, atomically."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"write_stack expects (n, ny, nx) images, got shape {images.shape}")
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(np.ascontiguousarray(images))
            mrc.set_image_stack()
            mrc.voxel_size = float(apix)


class StackWriter:
    """Write a large float32 image stack chunk by chunk through a memory map, atomically.

    The stack is created at full size in a temporary file beside ``path``; ``writer[i0:i1] = images``
    fills it; on a clean exit the header statistics are set (accumulated while writing, so no pass
    over the whole stack is needed) and the file is renamed onto ``path``. If the block raises, the
    temporary file is removed and nothing appears at ``path``.

    Example::

        with StackWriter("particles.mrcs", n=200_000, box=128, apix=1.1) as out:
            for i0 in range(0, n, 1000):
                out[i0:i0 + 1000] = simulate(i0, 1000)
    """

    def __init__(self, path: str | os.PathLike, n: int, box: int, apix: float):
        self.path = Path(path)
        self.n, self.box, self.apix = int(n), int(box), float(apix)
        self._exit_stack: contextlib.ExitStack | None = None
        self._mrc: mrcfile.mrcmemmap.MrcMemmap | None = None
        self._min, self._max = np.inf, -np.inf
        self._sum = self._sumsq = 0.0
        self._count = 0

    def __enter__(self) -> StackWriter:
        self._exit_stack = contextlib.ExitStack()
        tmp = self._exit_stack.enter_context(atomic_path(self.path))
        self._mrc = mrcfile.new_mmap(tmp, shape=(self.n, self.box, self.box), mrc_mode=2, overwrite=True)
        self._mrc.set_image_stack()
        self._mrc.voxel_size = self.apix
        return self

    def __setitem__(self, key, images: np.ndarray) -> None:
        images = np.asarray(images, dtype=np.float32)
        assert self._mrc is not None, "StackWriter is written inside its with block"
        self._mrc.data[key] = images
        if images.size:
            self._min = min(self._min, float(images.min()))
            self._max = max(self._max, float(images.max()))
            as64 = images.astype(np.float64)
            self._sum += float(as64.sum())
            self._sumsq += float((as64 * as64).sum())
            self._count += images.size

    def __len__(self) -> int:
        return self.n

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            assert self._mrc is not None  # opened by __enter__
            if exc_type is None and self._count:
                mean = self._sum / self._count
                header = self._mrc.header
                header.dmin, header.dmax, header.dmean = self._min, self._max, mean
                header.rms = float(np.sqrt(max(self._sumsq / self._count - mean * mean, 0.0)))
            self._mrc.close()
        finally:
            self._mrc = None
            stack, self._exit_stack = self._exit_stack, None
            assert stack is not None  # opened by __enter__
            suppressed = stack.__exit__(exc_type, exc, tb)
        return bool(suppressed)

"""cryoSPARC particle files (``.cs``: a numpy structured array saved with ``np.save``).

Conventions, and the evidence for them (no cryoSPARC install here; read from the tools that
convert ``.cs`` files and cross-checked with each other):

* **Rotation.** ``alignments3D/pose`` is a rotation vector (axis times angle, radians). Its
  Rodrigues matrix ``R = exp([pose]x)`` (scipy ``Rotation.from_rotvec``) is the *transpose* of
  RELION's matrix ``A(rot, tilt, psi)``:  ``A = R.T``, i.e.
  ``pose = Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).as_rotvec()``.
  - cryoDRGN ``commands/parse_pose_csparc.py`` builds its pose matrix as ``expmap(pose).T`` with a
    standard Rodrigues ``lie_tools.expmap``, and from a STAR file as ``utils.R_from_relion(rot,
    tilt, psi)``, which we checked numerically equals RELION's ``A``: so ``A = expmap(pose).T``.
  - pyem ``metadata/cryosparc2.py`` (``csparc2star``) writes ``rot2euler(expmap(pose))``, where its
    ``rot2euler`` is RELION's ``Euler_matrix2angles`` (decomposes ``A``) and its ``geom.expmap``
    fills the Rodrigues matrix with the opposite sign of the skew part (``out[0, 1] = +sin * w_z``),
    i.e. the transpose of the standard one: again ``A = R_standard(pose).T``. The two tools agree.
* **Shift.** ``alignments3D/shift`` is ``(x, y)`` in *pixels* of the refinement, with the same sign as
  RELION's ``rlnOriginX/Y``: cryoDRGN uses it unchanged as the translation it takes from
  ``rlnOriginX/Y`` (pixels); pyem copies it into ``rlnOriginX/Y`` and multiplies by the pixel size
  for ``rlnOriginXAngst``. Whether it is pixels or angstrom was disputed (recovar PR #94 divided by
  ``blob/psize_A``, then PR #103 went back to pixels); pyem PR #125 (cryoSPARC developers) says the
  pixels are those of ``alignments3D/psize_A`` when the refinement downsampled. So
  ``shift_A = alignments3D/shift * alignments3D/psize_A`` (``blob/psize_A`` when absent).
* **CTF.** ``ctf/df1_A``, ``ctf/df2_A`` are RELION's DefocusU/V; ``ctf/df_angle_rad`` and
  ``ctf/phase_shift_rad`` are RELION's DefocusAngle and PhaseShift in radians (pyem converts with a
  bare ``rad2deg``); ``ctf/bfactor`` (A^2) and ``ctf/scale`` when present.
* **Split.** ``alignments3D/split`` is 0/1; RELION's ``rlnRandomSubset`` = split + 1.
* **Images.** ``blob/path`` (bytes, relative to the cryoSPARC project directory), ``blob/idx``
  (0-based), ``blob/shape`` ``(ny, nx)``, ``blob/psize_A``.

The reader returns a :class:`~gmmrefine.io.particles.ParticleSet` whose tables are a RELION 3.1 STAR
built from the ``.cs``, so refined poses are written as a RELION 3.1 STAR file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from gmmrefine.errors import InputError
from gmmrefine.io.conventions import matrix_to_euler
from gmmrefine.io.particles import (
    CTFParams,
    ParticleSet,
    _assign_subset,
    _check_stacks,
    _per_particle,
    _resolve_stacks,
    _single_value,
    new_particle_tables,
)

REQUIRED_FIELDS = ("blob/path", "blob/idx", "blob/shape", "blob/psize_A", "ctf/accel_kv", "ctf/cs_mm",
                   "ctf/amp_contrast", "ctf/df1_A", "ctf/df2_A", "ctf/df_angle_rad", "alignments3D/pose",
                   "alignments3D/shift")


def relion_angles_from_pose(pose: np.ndarray) -> np.ndarray:
    """``(N, 3)`` rotation vectors (cryoSPARC ``alignments3D/pose``) to ``(N, 3)`` RELION rot, tilt, psi (degrees)."""
    rotation = Rotation.from_rotvec(np.asarray(pose, dtype=np.float64).reshape(-1, 3)).as_matrix()
    relion_a = np.ascontiguousarray(np.swapaxes(rotation, -1, -2))
    return matrix_to_euler(torch.from_numpy(relion_a)).numpy()


def pose_from_relion_angles(angles_deg: np.ndarray) -> np.ndarray:
    """Inverse of :func:`relion_angles_from_pose`: ``(N, 3)`` degrees to ``(N, 3)`` rotation vectors."""
    return Rotation.from_euler("ZYZ", np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3), degrees=True).as_rotvec()


def _field(data: np.ndarray, name: str, path: Path) -> np.ndarray:
    assert data.dtype.names is not None  # read_cs checked it is a structured array
    if name not in data.dtype.names:
        raise InputError(f"{path}: cryoSPARC file has no field {name}; it is required (export particles from a "
                         f"refinement job so they carry poses, CTF and image locations).", path=str(path), field=name)
    return data[name]


def _finite(values: np.ndarray, name: str, path: Path) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{path}: field {name} is not finite at row {row + 1}.", path=str(path), field=name)
    return values


def read_cs(path: str | os.PathLike, *, project_dir: str | os.PathLike | None = None,
            check_images: bool = True) -> ParticleSet:
    """Read a cryoSPARC particle ``.cs`` file.

    Args:
        path: the ``.cs`` file (a refinement's particles, with ``alignments3D``).
        project_dir: directory that ``blob/path`` is relative to. Searched first; then the ``.cs``
            file's directory and its parent (a job directory's parent is the project directory).
        check_images: check every distinct stack's header (see ``read_particles``).

    Raises:
        InputError: not a ``.cs`` array, a missing field (named), non-finite values, missing stacks.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: cryoSPARC file not found.", path=str(path))
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError/OSError/EOFError for bad files
        raise InputError(f"{path}: not a readable cryoSPARC .cs file ({exc}).", path=str(path)) from exc
    if not isinstance(data, np.ndarray) or data.dtype.names is None or data.ndim != 1:
        raise InputError(f"{path}: not a cryoSPARC .cs file (expected a 1D numpy structured array).", path=str(path))
    n = len(data)
    if n == 0:
        raise InputError(f"{path}: cryoSPARC file has no particles.", path=str(path))
    for name in REQUIRED_FIELDS:
        _field(data, name, path)

    raw_paths = _field(data, "blob/path", path)
    names = np.array([p.decode() if isinstance(p, bytes) else str(p) for p in raw_paths.tolist()], dtype=object)
    names = np.array([s[1:] if s.startswith(">") else s for s in names], dtype=object)  # cryoSPARC's ">" prefix
    image_index = np.asarray(_field(data, "blob/idx", path), dtype=np.int64)
    if (image_index < 0).any():
        row = int(np.argmax(image_index < 0))
        raise InputError(f"{path}: field blob/idx is negative at row {row + 1}.", path=str(path), field="blob/idx")
    shape = np.asarray(_field(data, "blob/shape", path), dtype=np.int64).reshape(n, -1)
    if shape.shape[1] != 2 or (shape[:, 0] != shape[:, 1]).any():
        raise InputError(f"{path}: field blob/shape must give square 2D images.", path=str(path), field="blob/shape")
    box = int(_single_value(shape[:, 0], "box size", path, "blob/shape"))
    apix = _single_value(_finite(_field(data, "blob/psize_A", path), "blob/psize_A", path), "pixel size", path,
                         "blob/psize_A")

    pose = _finite(_field(data, "alignments3D/pose", path), "alignments3D/pose", path).reshape(n, 3)
    shift_px = _finite(_field(data, "alignments3D/shift", path), "alignments3D/shift", path).reshape(n, 2)
    shift_apix: np.ndarray | float
    if "alignments3D/psize_A" in data.dtype.names:
        shift_apix = _finite(data["alignments3D/psize_A"], "alignments3D/psize_A", path).reshape(n, 1)
    else:
        shift_apix = apix
    shift_A = shift_px * shift_apix
    angles = relion_angles_from_pose(pose)

    def optional(name: str, default: float) -> np.ndarray:
        if name in data.dtype.names:
            return _finite(data[name], name, path).reshape(n)
        return np.full(n, default)

    ctf = CTFParams(
        defocus_u_A=_finite(data["ctf/df1_A"], "ctf/df1_A", path).reshape(n),
        defocus_v_A=_finite(data["ctf/df2_A"], "ctf/df2_A", path).reshape(n),
        defocus_angle_deg=np.rad2deg(_finite(data["ctf/df_angle_rad"], "ctf/df_angle_rad", path).reshape(n)),
        voltage_kV=_finite(data["ctf/accel_kv"], "ctf/accel_kv", path).reshape(n),
        cs_mm=_finite(data["ctf/cs_mm"], "ctf/cs_mm", path).reshape(n),
        amplitude_contrast=_finite(data["ctf/amp_contrast"], "ctf/amp_contrast", path).reshape(n),
        phase_shift_deg=np.rad2deg(optional("ctf/phase_shift_rad", 0.0)),
        bfactor_A2=optional("ctf/bfactor", 0.0),
        scale=optional("ctf/scale", 1.0),
    )

    search = []
    if project_dir is not None:
        search.append(("relative to the project directory", Path(project_dir).resolve()))
    search.append(("relative to the .cs file's directory", path.parent.resolve()))
    search.append(("relative to the .cs file's parent directory", path.parent.resolve().parent))
    files, inverse = _resolve_stacks(names.astype(str), search, path, "blob/path")
    if check_images:
        box, apix = _check_stacks(path, files, inverse, image_index, box, apix, "blob/path")

    if "alignments3D/split" in data.dtype.names:
        split = np.asarray(data["alignments3D/split"], dtype=np.int64).reshape(n)
        if not np.isin(split, (0, 1)).all():
            row = int(np.argmax(~np.isin(split, (0, 1))))
            raise InputError(f"{path}: field alignments3D/split is {split[row]} at row {row + 1}; expected 0 or 1.",
                             path=str(path), field="alignments3D/split")
        subset, assigned = split + 1, False
    else:
        subset, assigned = _assign_subset(n, path), True

    image_files = _per_particle(files, inverse)
    image_names = np.char.add(np.char.add(np.char.zfill((image_index + 1).astype(str), 6), "@"), image_files.astype(str))
    tables = new_particle_tables(image_names, angles, shift_A, ctf, subset, apix, box)
    return ParticleSet(
        path=path, particles=tables["particles"], optics=tables["optics"], source_format="cryosparc",
        image_files=image_files, image_index=image_index, apix=float(apix), box=int(box),
        angles_deg=angles, shift_A=shift_A, ctf=ctf, subset=subset.astype(np.int64), subset_assigned=assigned,
        optics_group=tables["particles"]["rlnOpticsGroup"].to_numpy(dtype=np.int64), tables=tables,
        particles_block="particles",
    )


#: What cryoSPARC writes in ``blob/sign`` for particles it imports from RELION (the ``.cs`` files in
#: ``shared/data/real``: an import of RELION particles and an import of an EMPIAR STAR both have -1).
IMPORTED_BLOB_SIGN = -1.0


def cs_uids(image_names: np.ndarray) -> np.ndarray:
    """``(N,)`` uint64 cryoSPARC uids from image names: the same particle gets the same uid every time it
    is exported, so exports of one particle set can be joined in cryoSPARC."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(str(name).encode(), digest_size=8).digest(), "little")
                     for name in image_names], dtype=np.uint64)


def write_cs(ps: ParticleSet, path: str | os.PathLike, angles_deg: np.ndarray | None = None,
             shift_A: np.ndarray | None = None) -> None:
    """Write a particle set as a cryoSPARC ``.cs`` file with ``cryosparc-tools`` (atomically).

    The fields are those of a cryoSPARC refinement's particles (``blob``, ``ctf``, ``alignments3D``), with
    the conventions of :mod:`gmmrefine.io.cryosparc` (pose: rotation vector of RELION's matrix transposed;
    shift: pixels of ``alignments3D/psize_A``, RELION's origin sign; split: half set - 1). ``blob/path`` is
    each stack's absolute path; cryoSPARC's import matches it by file name in the folder it is given.

    Args:
        ps: the particle set (its images, CTF and half sets).
        path: output ``.cs`` file.
        angles_deg, shift_A: ``(N, 3)`` and ``(N, 2)`` poses (degrees, angstrom); default: the set's own.

    Raises:
        InputError: ``cryosparc-tools`` is not installed.
    """
    try:
        from cryosparc.dataset import Dataset
    except ImportError as exc:
        raise InputError(f"{path}: writing cryoSPARC .cs files needs cryosparc-tools (pip install cryosparc-tools).",
                         path=str(path)) from exc
    from gmmrefine.io.atomic import atomic_path

    n = len(ps)
    angles = np.asarray(ps.angles_deg if angles_deg is None else angles_deg, dtype=np.float64).reshape(n, 3)
    shifts = np.asarray(ps.shift_A if shift_A is None else shift_A, dtype=np.float64).reshape(n, 2)
    files, inverse = np.unique(np.asarray(ps.image_files).astype(str), return_inverse=True)
    stacks = np.array([str(Path(f).resolve()) for f in files], dtype=object)[inverse.reshape(-1)]  # once per stack
    names = np.char.add(np.char.add(np.asarray(ps.image_index + 1).astype(str), "@"), stacks.astype(str))
    ctf = ps.ctf
    f32 = np.float32

    def column(values, shape: tuple[int, ...] = ()) -> np.ndarray:
        return np.broadcast_to(np.asarray(values, dtype=f32), (n, *shape)).copy()

    zeros2, zeros4 = np.zeros((n, 2), f32), np.zeros((n, 4), f32)
    fields = {
        "uid": cs_uids(names),
        "blob/path": stacks,
        "blob/idx": np.asarray(ps.image_index, dtype=np.uint32),
        "blob/shape": np.tile(np.array([ps.box, ps.box], dtype=np.uint32), (n, 1)),
        "blob/psize_A": column(ps.apix),
        "blob/sign": column(IMPORTED_BLOB_SIGN),
        "ctf/type": np.full(n, "imported", dtype=object),
        "ctf/exp_group_id": np.asarray(ps.optics_group, dtype=np.uint32),
        "ctf/accel_kv": column(ctf.voltage_kV),
        "ctf/cs_mm": column(ctf.cs_mm),
        "ctf/amp_contrast": column(ctf.amplitude_contrast),
        "ctf/df1_A": column(ctf.defocus_u_A),
        "ctf/df2_A": column(ctf.defocus_v_A),
        "ctf/df_angle_rad": column(np.deg2rad(np.asarray(ctf.defocus_angle_deg, dtype=np.float64))),
        "ctf/phase_shift_rad": column(np.deg2rad(np.asarray(ctf.phase_shift_deg, dtype=np.float64))),
        "ctf/scale": column(ctf.scale),
        "ctf/scale_const": column(0.0),
        "ctf/shift_A": zeros2, "ctf/tilt_A": zeros2.copy(), "ctf/trefoil_A": zeros2.copy(),
        "ctf/tetra_A": zeros4, "ctf/anisomag": zeros4.copy(),
        "ctf/bfactor": column(ctf.bfactor_A2),
        "alignments3D/split": (np.asarray(ps.subset, dtype=np.int64) - 1).astype(np.uint32),
        "alignments3D/shift": (shifts / ps.apix).astype(f32),
        "alignments3D/pose": pose_from_relion_angles(angles).astype(f32),
        "alignments3D/psize_A": column(ps.apix),
    }
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        Dataset(fields).save(fh)

"""The particle set: images, poses, CTF and half-set split of an existing refinement.

This module fixes the data model every later layer uses. Readers for RELION STAR
(``gmmrefine.io.star``) and cryoSPARC ``.cs`` (``gmmrefine.io.cryosparc``) produce a
:class:`ParticleSet`; writers put refined poses back into the input's table, keeping every column.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from gmmrefine.errors import InputError
from gmmrefine.io import mrc as _mrc
from gmmrefine.io.star import read_star, write_star

log = logging.getLogger(__name__)


@dataclass
class CTFParams:
    """Per-particle CTF parameters in RELION's convention, each an ``(N,)`` float64 array.

    Defocus in angstrom (RELION's ``rlnDefocusU/V``, underfocus positive), astigmatism angle in degrees
    (``rlnDefocusAngle``), voltage in kV, spherical aberration in mm, amplitude contrast as a fraction,
    phase shift in degrees (``rlnPhaseShift``), B-factor in A^2 (``rlnCtfBfactor``) and the scale factor
    (``rlnCtfScalefactor``).
    """

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray
    scale: np.ndarray

    FIELDS = ("defocus_u_A", "defocus_v_A", "defocus_angle_deg", "voltage_kV", "cs_mm",
              "amplitude_contrast", "phase_shift_deg", "bfactor_A2", "scale")

    def take(self, indices: np.ndarray) -> CTFParams:
        """The parameters of a subset of particles."""
        return CTFParams(**{f: np.asarray(getattr(self, f))[indices] for f in self.FIELDS})

    def as_tensors(self, indices: np.ndarray | None = None, device=None, dtype=None) -> dict:
        """``{field: (n,) tensor}`` for the given particles (all if ``indices`` is None)."""
        import torch

        dtype = dtype or torch.float64
        sel = self if indices is None else self.take(indices)
        return {f: torch.as_tensor(np.asarray(getattr(sel, f)), dtype=dtype, device=device) for f in self.FIELDS}

    def __len__(self) -> int:
        return len(self.defocus_u_A)


@dataclass
class ParticleSet:
    """Particles of one refinement.

    Attributes:
        path: the STAR or ``.cs`` file they were read from.
        particles: the particle table exactly as read (every column, input row order). Writers start
            from it so unknown columns pass through untouched.
        optics: RELION 3.1+ optics table, or None (RELION 3.0, cryoSPARC).
        source_format: ``"relion-3.0"``, ``"relion-3.1"`` (3.1, 4 and 5 share it) or ``"cryosparc"``.
        image_files: ``(N,)`` absolute paths of the image stacks.
        image_index: ``(N,)`` 0-based index of each particle in its stack.
        apix: pixel size of the images (A/px); all optics groups must agree.
        box: image size in pixels (square).
        angles_deg: ``(N, 3)`` RELION rot, tilt, psi.
        shift_A: ``(N, 2)`` RELION origin (x, y) in angstrom (see ``gmmrefine.geometry.shifts``).
        ctf: per-particle CTF.
        subset: ``(N,)`` half set, 1 or 2 (``rlnRandomSubset``).
        subset_assigned: True when the input had no split and gmmrefine assigned one.
        optics_group: ``(N,)`` optics group number (1 for files without one).
        tables: every block of the STAR file as read (``tables[particles_block] is particles``); for
            cryoSPARC input, the RELION 3.1 tables built from the ``.cs``. Writers start from them.
        particles_block: name of the particle block in ``tables`` (``""`` for a RELION 3.0 file).
    """

    path: Path
    particles: pd.DataFrame
    optics: pd.DataFrame | None
    source_format: str
    image_files: np.ndarray
    image_index: np.ndarray
    apix: float
    box: int
    angles_deg: np.ndarray
    shift_A: np.ndarray
    ctf: CTFParams
    subset: np.ndarray
    subset_assigned: bool = False
    optics_group: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tables: dict[str, pd.DataFrame] | None = None
    particles_block: str = "particles"

    def __len__(self) -> int:
        return len(self.particles)

    def half(self, subset: int) -> np.ndarray:
        """Indices (into this set) of the particles of half ``subset`` (1 or 2), in input order."""
        return np.flatnonzero(self.subset == subset)

    @property
    def has_ctf(self) -> bool:
        """False for a file read with ``require_ctf=False`` that has no CTF columns."""
        return bool(np.isfinite(np.asarray(self.ctf.defocus_u_A)).all())


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


ANGLE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
ORIGIN_COLUMNS_A = ("rlnOriginXAngst", "rlnOriginYAngst")
ORIGIN_COLUMNS_PX = ("rlnOriginX", "rlnOriginY")
# Header pixel sizes that mean "not set" (MRC writers leave 0 or 1.0 when they do not know it).
_UNSET_HEADER_APIX = (0.0, 1.0)
_APIX_TOLERANCE = 0.01


def _block_label(block: str) -> str:
    return f"data_{block}"


def _numeric(df: pd.DataFrame, column: str, path: Path, block: str) -> np.ndarray:
    """``(N,)`` float64 values of ``column``; InputError naming file, column and row if one is not a finite number."""
    series = df[column]
    if series.dtype.kind in "iuf":
        values = series.to_numpy(dtype=np.float64)
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            f"{path}: column {column} of {_block_label(block)} has {series.iloc[row]!r} at row {row + 1}; "
            f"expected a finite number.", path=str(path), field=column)
    return values


def _require(df: pd.DataFrame, columns, path: Path, block: str, purpose: str) -> None:
    for column in columns:
        if column not in df.columns:
            raise InputError(f"{path}: {_block_label(block)} has no column {column}, which is required ({purpose}).",
                             path=str(path), field=column)


def _optional(df: pd.DataFrame, column: str, default: float | np.ndarray, path: Path, block: str) -> np.ndarray:
    if column in df.columns:
        return _numeric(df, column, path, block)
    return np.broadcast_to(np.asarray(default, dtype=np.float64), (len(df),)).copy()


def _split_image_names(names: np.ndarray, path: Path, block: str) -> tuple[np.ndarray, np.ndarray]:
    """``N@stack.mrcs`` -> (stack names, 0-based indices). A name without ``@`` is a single image (index 0)."""
    # Fixed-width numpy strings, not a Python object per row: pandas' string methods left ~70 MB of
    # fragmented memory behind for 200,000 rows (measured), which a long run then carries.
    text = np.asarray(names).astype(str)
    parts = np.char.partition(text, "@")
    has_at = parts[:, 1] == "@"
    index_text = np.where(has_at, parts[:, 0], "1")
    stack_names = np.where(has_at, parts[:, 2], text)
    del parts
    if len(index_text) and np.char.isdigit(index_text).all():
        index = index_text.astype(np.float64)
    else:
        index = pd.to_numeric(pd.Series(index_text.astype(object)), errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index)) | (stack_names == "")
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            f"{path}: column rlnImageName of {_block_label(block)} has {names[row]!r} at row {row + 1}; "
            f"expected 'N@stack.mrcs' with N >= 1.", path=str(path), field="rlnImageName")
    return stack_names.astype(str), index.astype(np.int64) - 1


def _resolve_stacks(names: np.ndarray, search_dirs: list[tuple[str, Path]], path: Path, field_name: str
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Absolute path of each distinct stack name, searched in ``search_dirs`` in order.

    Returns ``(unique absolute paths (K,), inverse (N,))``.
    """
    unique, first_row, inverse = np.unique(names, return_index=True, return_inverse=True)
    resolved = []
    for name, row in zip(unique.tolist(), first_row.tolist()):
        candidate = Path(name)
        if candidate.is_absolute():
            tried = [candidate]
        else:
            tried = [base / candidate for _, base in search_dirs]
        found = next((c for c in tried if c.is_file()), None)
        if found is None:
            where = "; ".join(f"{c} ({label})" for c, (label, _) in zip(tried, search_dirs)) \
                if not candidate.is_absolute() else str(candidate)
            raise InputError(f"{path}: stack file {name!r} of {field_name} (row {row + 1}) not found; tried {where}.",
                             path=str(path), field=field_name)
        resolved.append(str(found.resolve()))
    return np.asarray(resolved, dtype=object), inverse


def _check_stacks(path: Path, files: np.ndarray, inverse: np.ndarray, index: np.ndarray,
                  box: int | None, apix: float | None, field_name: str) -> tuple[int, float]:
    """Check every distinct stack once, from its header: square images, box, index range and pixel size.

    Returns:
        ``(box, apix)``, taking a missing STAR box or pixel size from the first stack.
    """
    max_index = np.full(len(files), -1, dtype=np.int64)
    np.maximum.at(max_index, inverse, index)
    for k, stack in enumerate(files):
        n, ny, nx = _mrc.stack_shape(stack)
        if ny != nx:
            raise InputError(f"{stack}: images are {ny}x{nx} pixels; expected square particle images "
                             f"(referenced by {path}).", path=str(stack), field="nx/ny")
        if box is None:
            box = nx
        elif nx != box:
            raise InputError(f"{path}: the STAR file gives a box of {box} px (rlnImageSize) but stack {stack} "
                             f"holds {ny}x{nx} images.", path=str(path), field="rlnImageSize")
        if max_index[k] >= n:
            rows = np.flatnonzero((inverse == k) & (index >= n))
            raise InputError(
                f"{path}: {field_name} at row {rows[0] + 1} refers to image {index[rows[0]] + 1} of {stack}, "
                f"which holds only {n} images.", path=str(path), field=field_name)
        header_apix = _mrc.stack_apix(stack)
        header_set = not any(abs(header_apix - u) < 1e-6 for u in _UNSET_HEADER_APIX)
        if apix is None:
            if header_set:
                apix = header_apix
        elif header_set and abs(header_apix - apix) > _APIX_TOLERANCE * apix:
            raise InputError(
                f"{path}: the pixel size is {apix:g} A in the STAR file but {header_apix:g} A in the header of "
                f"{stack} (more than 1% apart).", path=str(path), field="pixel size")
    if apix is None:
        raise InputError(f"{path}: no pixel size in the STAR file (rlnImagePixelSize, or rlnDetectorPixelSize "
                         f"and rlnMagnification) nor in the stack headers.", path=str(path), field="rlnImagePixelSize")
    assert box is not None  # set from the first stack when missing (there is at least one particle)
    return int(box), float(apix)


def _single_value(values: np.ndarray, what: str, path: Path, field_name: str, rel_tol: float = 1e-4) -> float:
    values = np.asarray(values, dtype=np.float64)
    lo, hi = float(values.min()), float(values.max())
    if hi - lo > rel_tol * max(abs(hi), 1e-12):
        raise InputError(f"{path}: {field_name} differs between particles/optics groups ({lo:g} to {hi:g}); "
                         f"gmmrefine needs one {what} for the whole set.", path=str(path), field=field_name)
    return float(values[0])


#: What RELION's CTF reader takes for CTF columns a STAR file lacks (``CTF::read``): kV, mm, fraction.
RELION_CTF_DEFAULTS = {"rlnVoltage": 200.0, "rlnSphericalAberration": 0.0, "rlnAmplitudeContrast": 0.0}


def _defaulted(columns: list[str], path: Path) -> None:
    """One warning per file naming the CTF columns it lacks and the RELION defaults taken for them."""
    if columns:
        message = (f"{path}: no {', '.join(columns)}; taking RELION's defaults ("
                   + ", ".join(f"{c} = {RELION_CTF_DEFAULTS[c]:g}" for c in columns) + "), as RELION does.")
        warnings.warn(message, stacklevel=4)
        log.warning(message)


def _assign_subset(n: int, path: Path) -> np.ndarray:
    message = (f"{path}: no half-set split (rlnRandomSubset / alignments3D/split); assigned one "
               f"deterministically by alternating rows (subset = row % 2 + 1).")
    warnings.warn(message, stacklevel=3)
    log.warning(message)
    return (np.arange(n) % 2 + 1).astype(np.int64)


def _subset_from(values: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    bad = ~np.isin(values, (1, 2))
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{path}: {field_name} is {values[row]:g} at row {row + 1}; expected 1 or 2.",
                         path=str(path), field=field_name)
    return values.astype(np.int64)


def _read_star_particles(path: Path, check_images: bool, require_ctf: bool = True) -> ParticleSet:
    tables = read_star(path)
    loops = [k for k, v in tables.items() if v.attrs.get("star_loop", True) is not False]
    if "optics" in tables and "particles" in tables:
        block, source_format = "particles", "relion-3.1"
    else:
        candidates = [k for k in loops if "rlnImageName" in tables[k].columns and k != "optics"]
        if not candidates:
            raise InputError(f"{path}: no particle table (a loop with column rlnImageName) in the STAR file.",
                             path=str(path), field="rlnImageName")
        block = candidates[0]
        source_format = "relion-3.1" if "optics" in tables else "relion-3.0"
    df = tables[block]
    if len(df) == 0:
        raise InputError(f"{path}: the particle table {_block_label(block)} has no rows; expected at least one "
                         f"particle.", path=str(path), field=_block_label(block))
    n = len(df)
    _require(df, ("rlnImageName",), path, block, "image of each particle")
    _require(df, ANGLE_COLUMNS, path, block, "particle orientation")
    has_ctf = "rlnDefocusU" in df.columns
    if require_ctf and not has_ctf:
        raise InputError(f"{path}: {_block_label(block)} has no column rlnDefocusU (no CTF); for data without a CTF "
                         "(e.g. projections made by relion_project) pass --ctf none.", path=str(path),
                         field="rlnDefocusU")
    no_ctf = np.full(n, np.nan)
    defaulted: list[str] = []  # CTF columns missing, taken at RELION's defaults

    optics = tables.get("optics") if source_format == "relion-3.1" else None
    apix = None
    box = None
    if optics is not None:
        if len(optics) == 0:
            raise InputError(f"{path}: data_optics has no rows.", path=str(path), field="data_optics")
        group_ids = (_numeric(optics, "rlnOpticsGroup", path, "optics").astype(np.int64)
                     if "rlnOpticsGroup" in optics.columns else np.arange(1, len(optics) + 1))
        if "rlnOpticsGroup" in df.columns:
            optics_group = _numeric(df, "rlnOpticsGroup", path, block).astype(np.int64)
        elif len(optics) == 1:
            optics_group = np.full(n, group_ids[0], dtype=np.int64)
        else:
            raise InputError(f"{path}: {_block_label(block)} has no column rlnOpticsGroup but data_optics has "
                             f"{len(optics)} groups.", path=str(path), field="rlnOpticsGroup")
        lookup = {int(g): i for i, g in enumerate(group_ids)}
        unknown = ~np.isin(optics_group, group_ids)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise InputError(f"{path}: rlnOpticsGroup {optics_group[row]} at row {row + 1} is not in data_optics.",
                             path=str(path), field="rlnOpticsGroup")
        optics_row = np.array([lookup[int(g)] for g in np.unique(optics_group)])
        per_particle_row = np.searchsorted(np.unique(optics_group), optics_group)
        used = optics.iloc[optics_row]

        def optics_value(column: str, purpose: str) -> np.ndarray:
            if column in df.columns:
                return _numeric(df, column, path, block)
            if column not in optics.columns and purpose == "CTF":
                if not has_ctf:
                    return no_ctf
                defaulted.append(column)
                return np.full(n, RELION_CTF_DEFAULTS[column])
            if column not in optics.columns:
                raise InputError(f"{path}: neither data_optics nor {_block_label(block)} has column {column}, "
                                 f"which is required ({purpose}).", path=str(path), field=column)
            return _numeric(used, column, path, "optics")[per_particle_row]

        voltage = optics_value("rlnVoltage", "CTF")
        cs = optics_value("rlnSphericalAberration", "CTF")
        q0 = optics_value("rlnAmplitudeContrast", "CTF")
        for column in ("rlnImagePixelSize", "rlnPixelSize"):
            if column in used.columns:
                apix = _single_value(_numeric(used, column, path, "optics"), "pixel size", path, column)
                break
        else:
            if "rlnDetectorPixelSize" in used.columns and "rlnMagnification" in used.columns:
                apix = _single_value(_numeric(used, "rlnDetectorPixelSize", path, "optics") * 1e4
                                     / _numeric(used, "rlnMagnification", path, "optics"), "pixel size", path,
                                     "rlnDetectorPixelSize/rlnMagnification")
        if "rlnImageSize" in used.columns:
            box = int(_single_value(_numeric(used, "rlnImageSize", path, "optics"), "box size", path, "rlnImageSize"))
    else:
        optics_group = np.ones(n, dtype=np.int64)
        columns = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
        if has_ctf:
            defaulted += [c for c in columns if c not in df.columns]
        voltage, cs, q0 = (_optional(df, c, RELION_CTF_DEFAULTS[c] if has_ctf else no_ctf, path, block)
                           for c in columns)
        for column in ("rlnImagePixelSize", "rlnPixelSize"):
            if column in df.columns:
                apix = _single_value(_numeric(df, column, path, block), "pixel size", path, column)
                break
        else:
            if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
                apix = _single_value(_numeric(df, "rlnDetectorPixelSize", path, block) * 1e4
                                     / _numeric(df, "rlnMagnification", path, block), "pixel size", path,
                                     "rlnDetectorPixelSize/rlnMagnification")
        if "rlnImageSize" in df.columns:
            box = int(_single_value(_numeric(df, "rlnImageSize", path, block), "box size", path, "rlnImageSize"))

    angles = np.stack([_numeric(df, c, path, block) for c in ANGLE_COLUMNS], axis=1)
    _defaulted(defaulted, path)
    defocus_u = _numeric(df, "rlnDefocusU", path, block) if has_ctf else no_ctf
    ctf = CTFParams(
        defocus_u_A=defocus_u,
        defocus_v_A=_optional(df, "rlnDefocusV", defocus_u, path, block),
        defocus_angle_deg=_optional(df, "rlnDefocusAngle", 0.0, path, block),
        voltage_kV=voltage, cs_mm=cs, amplitude_contrast=q0,
        phase_shift_deg=_optional(df, "rlnPhaseShift", 0.0, path, block),
        bfactor_A2=_optional(df, "rlnCtfBfactor", 0.0, path, block),
        scale=_optional(df, "rlnCtfScalefactor", 1.0, path, block),
    )

    stack_names, image_index = _split_image_names(df["rlnImageName"].to_numpy(dtype=object), path, block)
    search = [("relative to the STAR file's directory", path.parent.resolve()),
              ("relative to the working directory", Path.cwd())]
    files, inverse = _resolve_stacks(stack_names, search, path, "rlnImageName")
    if check_images:
        box, apix = _check_stacks(path, files, inverse, image_index, box, apix, "rlnImageName")
    else:
        if box is None:
            box = _mrc.stack_shape(files[0])[2]
        if apix is None:
            apix = _mrc.stack_apix(files[0])
            if apix <= 0:
                raise InputError(f"{path}: no pixel size in the STAR file nor in the header of {files[0]}.",
                                 path=str(path), field="rlnImagePixelSize")

    # Origins: Angstrom columns when present (3.1+), else pixel columns (3.0), else centred.
    if all(c in df.columns for c in ORIGIN_COLUMNS_A):
        shift_A = np.stack([_numeric(df, c, path, block) for c in ORIGIN_COLUMNS_A], axis=1)
    elif all(c in df.columns for c in ORIGIN_COLUMNS_PX):
        shift_A = np.stack([_numeric(df, c, path, block) for c in ORIGIN_COLUMNS_PX], axis=1) * apix
    else:
        shift_A = np.zeros((n, 2))

    if "rlnRandomSubset" in df.columns:
        subset = _subset_from(_numeric(df, "rlnRandomSubset", path, block), path, "rlnRandomSubset")
        assigned = False
    else:
        subset, assigned = _assign_subset(n, path), True

    return ParticleSet(
        path=path, particles=df, optics=optics, source_format=source_format,
        image_files=_per_particle(files, inverse), image_index=image_index, apix=float(apix), box=int(box),
        angles_deg=angles, shift_A=shift_A, ctf=ctf, subset=subset, subset_assigned=assigned,
        optics_group=optics_group, tables=tables, particles_block=block,
    )


def _per_particle(stacks: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``(N,)`` object array of stack paths sharing one string per stack: a fixed-width string per
    particle would cost 4 bytes per character per particle (30 MB for 200,000 particles)."""
    return np.asarray([str(s) for s in stacks], dtype=object)[np.asarray(inverse).reshape(-1)]


def read_particles(path: str | os.PathLike, *, check_images: bool = True,
                   project_dir: str | os.PathLike | None = None, require_ctf: bool = True) -> ParticleSet:
    """Read a particle set from a RELION STAR file (3.0, 3.1, 4, 5) or a cryoSPARC ``.cs`` file.

    Args:
        path: ``.star`` or ``.cs`` file.
        check_images: open each distinct stack's header once to check that it exists, is square, has
            the STAR box size and pixel size (within 1%; header 0 or 1.0 means unset) and holds every
            referenced index. Without it only the first stack's header is read (when the box or pixel
            size is not in the metadata).
        project_dir: cryoSPARC project directory for ``blob/path`` (``.cs`` only).
        require_ctf: refuse a STAR file without CTF columns (else its CTF parameters are NaN and
            :attr:`ParticleSet.has_ctf` is False; only a reconstruction without CTF can use it).

    Raises:
        InputError: anything wrong with the file, naming the file, the column and the row.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory; --particles expects a RELION .star or cryoSPARC .cs file "
                         "(e.g. Refine3D/job012/run_data.star).", path=str(path))
    if not path.is_file():
        raise InputError(f"{path}: particle file not found.", path=str(path))
    suffix = path.suffix.lower()
    if suffix == ".star":
        return _read_star_particles(path, check_images, require_ctf)
    if suffix == ".cs":
        from gmmrefine.io.cryosparc import read_cs

        return read_cs(path, project_dir=project_dir, check_images=check_images)
    raise InputError(f"{path}: unknown particle file type {path.suffix!r}; expected .star (RELION) or .cs (cryoSPARC).",
                     path=str(path))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

class _StackCache:
    """A few open read-only memory maps, least recently used dropped first."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._maps: dict[str, np.ndarray] = {}

    def get(self, stack: str) -> np.ndarray:
        mm = self._maps.pop(stack, None)
        if mm is None:
            mm = _mrc.open_stack(stack)
            if len(self._maps) >= self.capacity:
                self._maps.pop(next(iter(self._maps)))
        self._maps[stack] = mm
        return mm


def iter_image_chunks(ps: ParticleSet, indices: np.ndarray | None = None, chunk_size: int = 20000
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read particle images chunk by chunk from the memory-mapped stacks.

    Args:
        ps: the particle set.
        indices: ``(M,)`` particle indices (into ``ps``) in the order wanted; all particles if None.
        chunk_size: images per chunk.

    Yields:
        ``(chunk_indices (n,), images (n, D, D) float32)`` in the order of ``indices``; within a chunk,
        reads are grouped per stack file and sorted by position in the file.

    Raises:
        InputError: an image with NaN or Inf values (naming the stack, the image and the particle row),
            or a stack whose images are not ``D x D``.
    """
    order = np.arange(len(ps)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    cache = _StackCache()
    box = ps.box
    for start in range(0, len(order), max(int(chunk_size), 1)):
        chunk = order[start:start + chunk_size]
        images = np.empty((len(chunk), box, box), dtype=np.float32)
        files = ps.image_files[chunk]
        within = ps.image_index[chunk]
        unique, inverse = np.unique(files, return_inverse=True)
        by_file = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[by_file], np.arange(len(unique) + 1))
        for k, stack in enumerate(unique):
            positions = by_file[bounds[k]:bounds[k + 1]]
            rows = within[positions]
            sort = np.argsort(rows, kind="stable")
            positions, rows = positions[sort], rows[sort]
            mm = cache.get(stack)
            if mm.shape[1:] != (box, box):
                raise InputError(f"{stack}: images are {mm.shape[1]}x{mm.shape[2]} px; expected {box}x{box} "
                                 f"(referenced by {ps.path}).", path=str(stack), field="nx/ny")
            if rows.size and rows[-1] >= mm.shape[0]:
                raise InputError(f"{ps.path}: refers to image {rows[-1] + 1} of {stack}, which holds only "
                                 f"{mm.shape[0]} images.", path=str(ps.path), field="rlnImageName")
            data = np.asarray(mm[rows], dtype=np.float32)
            finite = np.isfinite(data).all(axis=(1, 2))
            if not finite.all():
                j = int(np.argmin(finite))
                raise InputError(
                    f"{stack}: image {rows[j] + 1} (particle row {chunk[positions[j]] + 1} of {ps.path}) "
                    f"contains NaN or Inf values.", path=str(stack), field="image data")
            images[positions] = data
        yield chunk, images


def read_images(ps: ParticleSet, indices: np.ndarray) -> np.ndarray:
    """``(M, D, D)`` float32 images of the particles ``indices``, in that order."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(indices) == 0:
        return np.empty((0, ps.box, ps.box), dtype=np.float32)
    return next(iter_image_chunks(ps, indices, chunk_size=len(indices)))[1]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

def _pose_arrays(n: int, angles_deg, shift_A) -> tuple[np.ndarray, np.ndarray]:
    angles = np.asarray(angles_deg, dtype=np.float64)
    shifts = np.asarray(shift_A, dtype=np.float64)
    if angles.shape != (n, 3):
        raise ValueError(f"angles_deg must have shape ({n}, 3), got {angles.shape}")
    if shifts.shape != (n, 2):
        raise ValueError(f"shift_A must have shape ({n}, 2), got {shifts.shape}")
    return angles, shifts


def _set_extra(df: pd.DataFrame, extra: dict | None) -> None:
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if values.shape != (len(df),):
            raise ValueError(f"extra column {name} must have shape ({len(df)},), got {values.shape}")
        df[name] = values


def _absolute_image_names(ps: ParticleSet) -> np.ndarray:
    """``(N,)`` ``"000001@/abs/path/stack.mrcs"`` names of the resolved stacks."""
    # One Python string per particle and nothing else: fixed-width numpy strings of every name would
    # cost several times that while being built.
    return np.asarray([f"{i + 1:06d}@{f}" for i, f in zip(np.asarray(ps.image_index).tolist(), ps.image_files)],
                      dtype=object)


def particles_with_poses(ps: ParticleSet, angles_deg, shift_A, extra: dict[str, np.ndarray] | None = None,
                         *, absolute_image_paths: bool = False) -> dict[str, pd.DataFrame]:
    """The input's STAR tables with new poses.

    Pose columns are replaced in the input's own units: ``rlnOriginX/Y`` in pixels for RELION 3.0,
    ``rlnOriginXAngst/YAngst`` for 3.1+ (and for cryoSPARC input, whose tables are RELION 3.1).
    Existing columns keep their position; missing ones are appended, as are ``extra`` columns
    (``{"rlnName": (N,) array}``, replacing a column of that name). Every other column, every other
    block and the row order are untouched; the input's tables are not modified.

    Args:
        ps: the particle set read by :func:`read_particles`.
        angles_deg: ``(N, 3)`` RELION rot, tilt, psi.
        shift_A: ``(N, 2)`` RELION origin x, y in angstrom.
        extra: more particle columns.
        absolute_image_paths: rewrite ``rlnImageName`` with the absolute paths the stacks were found
            at, so the file works from any directory (otherwise the names are left as they were).
    """
    if ps.tables is None:
        raise ValueError("particle set has no tables to write from")
    angles, shifts = _pose_arrays(len(ps), angles_deg, shift_A)
    tables = {name: df.copy() for name, df in ps.tables.items()}
    df = tables[ps.particles_block]
    for j, column in enumerate(ANGLE_COLUMNS):
        df[column] = angles[:, j]
    if ps.source_format == "relion-3.0":
        for j, column in enumerate(ORIGIN_COLUMNS_PX):
            df[column] = shifts[:, j] / ps.apix
    else:
        for j, column in enumerate(ORIGIN_COLUMNS_A):
            df[column] = shifts[:, j]
    if absolute_image_paths:
        df["rlnImageName"] = _absolute_image_names(ps)
    _set_extra(df, extra)
    return tables


def write_particles_star(ps: ParticleSet, path: str | os.PathLike, angles_deg, shift_A,
                         extra: dict[str, np.ndarray] | None = None, *, absolute_image_paths: bool = False) -> None:
    """Write :func:`particles_with_poses` to ``path`` atomically (RELION 3.1 for cryoSPARC input).

    By default image names are written as they were in the input. RELION resolves relative names
    against its working directory, so a file written elsewhere than the input works when RELION runs
    from the directory the names are relative to; ``absolute_image_paths=True`` makes it work anywhere.
    """
    tables = particles_with_poses(ps, angles_deg, shift_A, extra, absolute_image_paths=absolute_image_paths)
    write_star(path, tables, version_line=ps.source_format != "relion-3.0")


def new_particle_tables(image_names, angles_deg, shift_A, ctf: CTFParams, subset, apix: float, box: int,
                        extra: dict[str, np.ndarray] | None = None) -> dict[str, pd.DataFrame]:
    """A fresh RELION 3.1 STAR (``optics`` and ``particles`` tables) from arrays.

    One optics group per distinct (voltage, Cs, amplitude contrast); pixel size ``apix`` (A) and box
    ``box`` (px) for all.

    Args:
        image_names: ``(N,)`` ``"000001@stack.mrcs"`` strings.
        angles_deg: ``(N, 3)`` rot, tilt, psi; shift_A: ``(N, 2)`` origin in angstrom.
        ctf: per-particle CTF; subset: ``(N,)`` 1 or 2.
        extra: more particle columns, appended.
    """
    names = np.asarray(image_names, dtype=object).reshape(-1).astype(str)
    n = len(names)
    angles, shifts = _pose_arrays(n, angles_deg, shift_A)
    optics_key = np.stack([np.asarray(ctf.voltage_kV, np.float64), np.asarray(ctf.cs_mm, np.float64),
                           np.asarray(ctf.amplitude_contrast, np.float64)], axis=1)
    groups, group_index = np.unique(optics_key, axis=0, return_inverse=True)
    group_index = np.asarray(group_index).reshape(-1)
    k = len(groups)
    optics = pd.DataFrame({
        "rlnOpticsGroupName": np.asarray([f"opticsGroup{g + 1}" for g in range(k)], dtype=object),
        "rlnOpticsGroup": np.arange(1, k + 1, dtype=np.int64),
        "rlnMicrographOriginalPixelSize": np.full(k, float(apix)),
        "rlnVoltage": groups[:, 0],
        "rlnSphericalAberration": groups[:, 1],
        "rlnAmplitudeContrast": groups[:, 2],
        "rlnImagePixelSize": np.full(k, float(apix)),
        "rlnImageSize": np.full(k, int(box), dtype=np.int64),
        "rlnImageDimensionality": np.full(k, 2, dtype=np.int64),
    })
    particles = pd.DataFrame({
        "rlnImageName": names.astype(object),
        "rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
        "rlnOriginXAngst": shifts[:, 0], "rlnOriginYAngst": shifts[:, 1],
        "rlnDefocusU": np.asarray(ctf.defocus_u_A, np.float64),
        "rlnDefocusV": np.asarray(ctf.defocus_v_A, np.float64),
        "rlnDefocusAngle": np.asarray(ctf.defocus_angle_deg, np.float64),
        "rlnPhaseShift": np.asarray(ctf.phase_shift_deg, np.float64),
        "rlnCtfBfactor": np.asarray(ctf.bfactor_A2, np.float64),
        "rlnCtfScalefactor": np.asarray(ctf.scale, np.float64),
        "rlnOpticsGroup": (group_index + 1).astype(np.int64),
        "rlnRandomSubset": np.asarray(subset, dtype=np.int64).reshape(-1),
    })
    _set_extra(particles, extra)
    return {"optics": optics, "particles": particles}

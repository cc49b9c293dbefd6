"""The particle set: images, poses, CTF and half-set split of an existing refinement.

This module fixes the data model every later layer uses. Readers for RELION STAR
(``gmmrefine.io.star``) and cryoSPARC ``.cs`` (``gmmrefine.io.cryosparc``) produce a
:class:`ParticleSet`; writers put refined poses back into the input's table, keeping every column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd


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

    def take(self, indices: np.ndarray) -> "CTFParams":
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

    def __len__(self) -> int:
        return len(self.particles)

    def half(self, subset: int) -> np.ndarray:
        """Indices (into this set) of the particles of half ``subset`` (1 or 2), in input order."""
        return np.flatnonzero(self.subset == subset)

"""Focused refinement, symmetry expansion, and how both keep the gold standard.

Focused refinement (paper, Methods, "Focused refinement") is global refinement
(:func:`gmmrefine.refine.global_refine.run_global_refinement`) in which, at every iteration and after
each half's GMM has been fitted to its half map, the particles are aligned to
``width_mask(gmm, mask)``: Gaussians whose centres fall outside the mask are widened,
``s' = s / (0.25 + 0.75 M(c))`` (:func:`gmmrefine.gmm.masks.width_mask`), so the alignment follows the
high-resolution features inside the mask while the rest still constrains it at low resolution. The
fitted (unmasked) GMM is what is saved (``gmm_half{h}.npz`` / ``.pdb``) and warm-starts the next fit;
the widened one is used for the alignment only. Everything else (bands, per-half resolution
estimates, reconstructions, files, ``--continue``) is the global refinement's.

Gold standard. Every output of half ``h`` depends only on half ``h``'s particles and on the user's
inputs (options, seed, masks given on the command line); the halves meet only where a result is
reported (FSC, evaluation masks). A user's ``--focus-mask`` is such an input and applies to both
halves. Patch masks are not: the paper uses one mask per patch for both halves, but a mask computed
from the GMMs of both halves would make half 1's alignment depend on half 2's particles (a test
changes only half-2 images and requires every half-1 output to stay bit-identical). So each half's
patches come from k-means of its own GMM (:mod:`gmmrefine.refine.patches`), and patches are matched
across halves (Hungarian assignment on the cluster centres) only to name them (``pNN`` is the matched
pair) and to evaluate them: the per-patch masked FSC uses the mean of the two matched masks, which no
alignment ever sees. This deviates from the paper's "same mask for both subsets", for that reason.

Symmetry expansion (paper, SARS-CoV-2 and ABC transporter paragraphs): for focused and patch work
on symmetric data, each particle is used once per symmetry operator, at pose ``A R_k``
(:func:`gmmrefine.geometry.symmetry.expand_poses`, row ``n K + k``, as
``relion_particle_symmetry_expand`` writes them), the copies are refined independently in C1 against
a mask on one asymmetric unit, and symmetry is re-imposed on the result by mask-weighted averaging over
the operators (:func:`gmmrefine.refine.composite.composite_map`). The copies of a particle stay in the
particle's half and in one quarter of it (:func:`gmmrefine.refine.global_refine.quarter_labels`), so
a half's resolution estimate never correlates an image with itself.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.geometry.rotations import euler_to_matrix, matrix_to_euler
from gmmrefine.geometry.symmetry import expand_poses, symmetry_operators
from gmmrefine.gmm.masks import width_mask
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.io.atomic import atomic_path
from gmmrefine.io.particles import ParticleSet

HALVES = (1, 2)
# Masks may carry float rounding just outside [0, 1] (resampled or filtered masks).
MASK_VALUE_TOLERANCE = 1e-4
APIX_TOLERANCE = 0.01


def load_focus_mask(path: str | Path, box: int, apix: float, *, option: str = "--focus-mask") -> torch.Tensor:
    """Read and check a focus mask: a cubic map on the particles' box and pixel size, values in [0, 1].

    Args:
        path: MRC file.
        box: the particles' box (px); apix: their pixel size (A/px).
        option: the command-line option named in errors.

    Returns:
        ``(D, D, D)`` float32 mask, clamped to [0, 1].

    Raises:
        InputError: missing or unreadable file, other box or pixel size (a header pixel size of 0
            means "not set" and is accepted), values outside [0, 1], or nothing inside the mask.
    """
    from gmmrefine.io.mrc import read_map, require_cubic

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {option} file not found.", path=str(path), field=option)
    try:
        volume, mask_apix = read_map(path)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: {option} is not a readable MRC map ({err}).", path=str(path), field=option) from None
    require_cubic(volume, path)
    if volume.shape[0] != box:
        raise InputError(f"{path}: the {option} map is {volume.shape[0]} px wide; expected the particles' box "
                         f"({box} px).", path=str(path), field=option)
    if mask_apix > 0 and abs(mask_apix - apix) > APIX_TOLERANCE * apix:
        raise InputError(f"{path}: the {option} pixel size is {mask_apix:.4g} A; expected the particles' "
                         f"{apix:.4g} A.", path=str(path), field=option)
    if not np.isfinite(volume).all():
        raise InputError(f"{path}: the {option} map contains NaN or infinite values.", path=str(path), field=option)
    low, high = float(volume.min()), float(volume.max())
    if low < -MASK_VALUE_TOLERANCE or high > 1 + MASK_VALUE_TOLERANCE:
        raise InputError(f"{path}: {option} values must lie in [0, 1]; this map has values from {low:.4g} to "
                         f"{high:.4g}.", path=str(path), field=option)
    if high <= 0:
        raise InputError(f"{path}: the {option} map is 0 everywhere; expected a mask on the region to focus on.",
                         path=str(path), field=option)
    return torch.as_tensor(np.clip(volume, 0.0, 1.0), dtype=torch.float32)


def focus_transform(masks: dict[int, torch.Tensor], apix: float) -> Callable[[int, GaussianMixture], GaussianMixture]:
    """The GMM transform of a focused refinement: half ``h``'s GMM widened outside ``masks[h]``.

    For :func:`~gmmrefine.refine.global_refine.run_global_refinement` (``gmm_transform``).
    """
    def transform(half: int, gmm: GaussianMixture) -> GaussianMixture:
        return width_mask(gmm, masks[half], apix)

    return transform


@dataclasses.dataclass
class ExpandedParticleSet(ParticleSet):
    """A symmetry-expanded particle set: row ``n K + k`` is input particle ``n`` at pose ``A_n R_k``.

    Attributes:
        source_index: ``(N K,)`` input row each row copies (its half set, quarter and image).
        symmetry: the point group expanded.
    """

    source_index: np.ndarray | None = None
    symmetry: str = "C1"


def with_poses(ps: ParticleSet, angles_deg: np.ndarray, shift_A: np.ndarray) -> ParticleSet:
    """The same particles with other poses (``(N, 3)`` degrees, ``(N, 2)`` A): a stage's start."""
    return dataclasses.replace(ps, angles_deg=np.array(angles_deg, dtype=np.float64),
                               shift_A=np.array(shift_A, dtype=np.float64))


def expand_particles(ps: ParticleSet, symmetry: str, angles_deg: np.ndarray | None = None,
                     shift_A: np.ndarray | None = None) -> ExpandedParticleSet:
    """Symmetry expansion of a particle set (each particle once per operator, particle-major).

    Args:
        ps: input particles (``N``).
        symmetry: point-group name (``K`` operators).
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` poses to expand (default: the set's own).

    Returns:
        :class:`ExpandedParticleSet` of ``N K`` rows: poses ``A_n R_k`` (origins unchanged), every
        other column of particle ``n`` repeated, so it writes as ``relion_particle_symmetry_expand``'s
        STAR file does.
    """
    angles = np.asarray(ps.angles_deg if angles_deg is None else angles_deg, dtype=np.float64)
    shifts = np.asarray(ps.shift_A if shift_A is None else shift_A, dtype=np.float64)
    k = symmetry_operators(symmetry).shape[0]
    rows = np.repeat(np.arange(len(ps)), k)
    matrices = expand_poses(euler_to_matrix(torch.as_tensor(angles)), symmetry)
    particles = ps.particles.iloc[rows].reset_index(drop=True)
    tables = None
    if ps.tables is not None:
        tables = dict(ps.tables)
        tables[ps.particles_block] = particles
    optics_group = np.asarray(ps.optics_group)
    fields = {f.name: getattr(ps, f.name) for f in dataclasses.fields(ParticleSet)}
    fields.update(
        particles=particles, tables=tables, image_files=np.asarray(ps.image_files)[rows],
        image_index=np.asarray(ps.image_index)[rows], angles_deg=matrix_to_euler(matrices).numpy(),
        shift_A=shifts[rows], ctf=ps.ctf.take(rows), subset=np.asarray(ps.subset)[rows],
        optics_group=optics_group[rows] if optics_group.size == len(ps) else optics_group)
    return ExpandedParticleSet(**fields, source_index=rows, symmetry=symmetry.strip().upper())


def stage_particles(ps: ParticleSet, symmetry: str, angles_deg: np.ndarray, shift_A: np.ndarray) -> ParticleSet:
    """The particle set a focused stage refines: expanded for a point group other than C1."""
    if symmetry_operators(symmetry).shape[0] == 1:
        return with_poses(ps, angles_deg, shift_A)
    return expand_particles(ps, symmetry, angles_deg, shift_A)


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def seed_stage(stage, source_dir: Path, *, maps: bool = True) -> None:
    """Start a stage from an earlier iteration's files: its ``it000`` is that iteration.

    Copies ``half{h}.mrc`` and ``half{h}_resolution.json`` (with ``maps``; the stage's iteration 0 is
    then done) and ``gmm_half{h}.npz`` / ``.pdb`` (the first fit's warm start) of each half into the
    stage's ``it000``. Each half's files are its own; nothing is mixed.

    Args:
        stage: :class:`~gmmrefine.pipeline.job.Job` or :class:`~gmmrefine.refine.stage.SubJob`.
        source_dir: an ``itNNN`` folder of a finished iteration.
        maps: also take the half maps (else the stage reconstructs its iteration 0 itself).
    """
    d = stage.dir("it000")
    for h in HALVES:
        step = f"it000/half{h}" if maps else f"it000/half{h}/gmm_start"
        if stage.is_done(step):
            continue
        names = [f"gmm_half{h}.npz", f"gmm_half{h}.pdb"]
        if maps:
            names += [f"half{h}.mrc", f"half{h}_resolution.json"]
        for name in names:
            if (source_dir / name).is_file():
                copy_atomic(source_dir / name, d / name)
        info = {"copied_from": str(source_dir)}
        if maps:
            import json

            info["resolution_A"] = json.loads((d / f"half{h}_resolution.json").read_text())["resolution_A"]
        stage.mark_done(step, **info)


def masked_resolution(half1: torch.Tensor, half2: torch.Tensor, mask: torch.Tensor, apix: float, *,
                      seed: int = 0) -> dict:
    """Gold-standard FSC inside a mask, corrected by phase randomisation (``relion_postprocess``).

    Returns:
        ``{"resolution_A", "fsc" (corrected, per shell), "fsc_masked", "frequency_inv_A"}``.
    """
    from gmmrefine.fourier.fsc import resolution_at, shell_frequencies
    from gmmrefine.fourier.postprocess import corrected_fsc

    curves = corrected_fsc(half1, half2, mask, generator=torch.Generator().manual_seed(seed))
    box = half1.shape[-1]
    return {"resolution_A": resolution_at(curves["corrected"], box, apix, 0.143),
            "fsc": curves["corrected"].tolist(), "fsc_masked": curves["masked"].tolist(),
            "frequency_inv_A": shell_frequencies(box, apix).tolist()}

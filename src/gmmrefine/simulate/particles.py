"""Synthetic particle data sets: projections of a model or map with CTF, noise and motion.

A data set is drawn in two steps. :func:`draw_truth` draws every per-particle number up front (small
arrays: poses, origins, CTF, half set, motion parameters) from ``seed``; :func:`write_dataset` then
renders the images chunk by chunk into a stack, so memory stays flat whatever the number of particles.

Definitions:

* Poses are uniform random rotations, stored as RELION Euler angles; the images are made from the
  matrices of those stored angles, so the STAR file is the exact truth.
* Origins (``rlnOriginXAngst/YAngst``) are normal with ``origin_sigma_px`` pixels per axis; the particle
  is the centred projection translated by minus the origin (RELION's convention).
* CTF: mean defocus uniform in the requested range, astigmatism ``|U - V|`` uniform in
  ``[0, max_astigmatism_A]`` at a uniform angle, 300 kV, Cs 2.7 mm, amplitude contrast 0.1.
* **SNR** = signal variance / noise variance, where the signal variance is the variance over the whole
  box of the CTF-modulated noise-free particle image, averaged over particles (estimated on the first
  ``min(n, 256)`` particles before any image is written), and the noise is white Gaussian with one
  standard deviation for the whole data set. ``snr = inf`` writes noise-free images.
* Half sets: a seeded random half of the particles is subset 1, the rest subset 2.
* Reproducibility: the same arguments and seed give the same files whatever ``--chunk`` is (the truth is
  drawn up front and the noise is one sequential stream).
* Perturbed poses: each rotation is composed with a rotation by **exactly** ``perturb_deg`` about a
  uniformly random axis, and each origin moves by **exactly** ``perturb_A`` in a uniformly random
  in-plane direction.
* Motion: with a second model, particle ``i`` is the linear morph at fraction ``t_i`` uniform in [0, 1];
  with a hinge, the domain turns about a pivot by ``phi_i`` uniform in ``[-hinge_deg, +hinge_deg]`` about
  an axis fixed for the data set (given, or drawn from the seed).
* Assemblies: with point-group ``operators`` the model is one asymmetric unit and the particle is its
  copies ``center + R_k (r - center)``; each copy's domain turns by its own angle ``phi_ik`` (about the
  copy's own hinge), so the copies move independently and only the consensus is symmetric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gmmrefine.errors import InputError
from gmmrefine.fourier.fft import irfft2_centered, phase_shift_2d
from gmmrefine.geometry.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
)
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.io.atomic import write_json_atomic
from gmmrefine.io.particles import CTFParams
from gmmrefine.simulate.density import DEFAULT_BFACTOR_A2, atoms_to_map, atoms_to_projection_rfft
from gmmrefine.simulate.motion import hinge, hinge_rotations, morph, random_hinge_angles, random_unit_vectors

PILOT_PARTICLES = 256
STACK_NAME = "particles.mrcs"


@dataclass
class AtomicSource:
    """What the images are projections of, when they come from an atomic model.

    Attributes:
        coords_A: ``(N, 3)`` non-hydrogen atoms of the first (reference) conformation.
        elements: ``(N,)`` their element symbols.
        center_A: ``(3,)`` model point at the box centre (used for every conformation).
        bfactor_A2: overall B-factor.
        end_A: ``(N, 3)`` second conformation superposed on the first (morph), or None.
        domain_mask: ``(N,)`` bool atoms of the hinged domain, or None.
        pivot_A: ``(3,)`` hinge point.
        hinge_axis: ``(3,)`` unit hinge axis.
        hinge_deg: largest hinge angle.
        operators: ``(K, 3, 3)`` point-group rotations (identity first): the particle is the model's
            copies ``center_A + R_k (r - center_A)``, each with its own hinge angle; None for one copy.
    """

    coords_A: np.ndarray
    elements: list[str]
    center_A: np.ndarray
    bfactor_A2: float = DEFAULT_BFACTOR_A2
    end_A: np.ndarray | None = None
    domain_mask: np.ndarray | None = None
    pivot_A: np.ndarray | None = None
    hinge_axis: np.ndarray | None = None
    hinge_deg: float = 0.0
    operators: np.ndarray | None = None

    @property
    def n_copies(self) -> int:
        return 1 if self.operators is None else int(len(self.operators))

    def assembly_elements(self) -> list[str]:
        """Element symbols of every atom of the particle (all copies)."""
        return list(self.elements) * self.n_copies

    def conformations(self, morph_fraction: np.ndarray | None, hinge_angle_deg: np.ndarray | None) -> torch.Tensor:
        """``(B, N K, 3)`` coordinates of particles with these motion parameters (``(N K, 3)`` if rigid).

        ``hinge_angle_deg`` is ``(B,)`` for one copy, ``(B, K)`` (one angle per copy) for an assembly.
        """
        coords = torch.as_tensor(self.coords_A, dtype=torch.float64)
        if self.end_A is not None:
            coords = morph(coords, self.end_A, torch.as_tensor(morph_fraction))
        if self.operators is None:
            if self.domain_mask is not None:
                assert self.hinge_axis is not None and self.pivot_A is not None  # given with domain_mask
                rot = hinge_rotations(self.hinge_axis, torch.as_tensor(hinge_angle_deg))
                coords = hinge(coords, self.domain_mask, self.pivot_A, rot)
            return coords
        center = torch.as_tensor(np.asarray(self.center_A, dtype=np.float64))
        copies = []
        for k, op in enumerate(torch.as_tensor(np.asarray(self.operators, dtype=np.float64))):  # K copies
            conf = coords
            if self.domain_mask is not None:
                assert self.hinge_axis is not None and self.pivot_A is not None  # given with domain_mask
                angles = torch.as_tensor(np.asarray(hinge_angle_deg, dtype=np.float64)[:, k])
                conf = hinge(coords, self.domain_mask, self.pivot_A, hinge_rotations(self.hinge_axis, angles))
            copies.append((conf - center) @ op.T + center)
        if any(c.ndim == 3 for c in copies):
            batch = max(c.shape[0] for c in copies if c.ndim == 3)
            copies = [c if c.ndim == 3 else c.expand(batch, -1, -1) for c in copies]
        return torch.cat(copies, dim=-2)


@dataclass
class MapSource:
    """Images from a density map: ``volume`` ``(D, D, D)`` float32 at the data set's box and pixel size."""

    volume: np.ndarray
    _spectra: dict = field(default_factory=dict, init=False, repr=False)

    def padded_spectrum(self, device=None) -> torch.Tensor:
        """The map's padded 3D transform (computed once per device) for Fourier-slice projection."""
        from gmmrefine.fourier.project import padded_map_spectrum

        key = str(torch.device(device or "cpu"))
        if key not in self._spectra:
            self._spectra[key] = padded_map_spectrum(torch.as_tensor(self.volume, dtype=torch.float32, device=device))
        return self._spectra[key]


@dataclass
class Truth:
    """Per-particle truth of a simulated data set (all ``(n, ...)`` numpy arrays).

    ``domain_rotation`` holds the active rotation of the hinged domain in the model frame, so the domain's
    own pose is ``euler_to_matrix(angles_deg) @ domain_rotation``. For an assembly of ``K`` copies,
    ``hinge_angle_deg`` is ``(n, K)`` and ``domain_rotation`` ``(n, K, 3, 3)``: copy ``k``'s domain, seen
    through operator ``R_k`` (symmetry expansion's pose ``A R_k``), has the pose ``A R_k domain_rotation[:, k]``.
    """

    angles_deg: np.ndarray
    shift_A: np.ndarray
    ctf: CTFParams
    subset: np.ndarray
    morph_fraction: np.ndarray | None = None
    hinge_angle_deg: np.ndarray | None = None
    domain_rotation: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.angles_deg)

    def extra_columns(self) -> dict[str, np.ndarray]:
        """Truth columns for ``truth.star`` (STAR names without the leading underscore)."""
        cols: dict[str, np.ndarray] = {}
        if self.morph_fraction is not None:
            cols["gmmMorphFraction"] = self.morph_fraction
        if self.domain_rotation is not None:
            assert self.hinge_angle_deg is not None  # drawn together with domain_rotation
            if np.ndim(self.hinge_angle_deg) == 1:
                euler = matrix_to_euler(torch.as_tensor(self.domain_rotation)).numpy()
                cols["gmmDomainRot"] = euler[:, 0]
                cols["gmmDomainTilt"] = euler[:, 1]
                cols["gmmDomainPsi"] = euler[:, 2]
                cols["gmmDomainAngle"] = self.hinge_angle_deg
            else:
                for k in range(self.hinge_angle_deg.shape[1]):  # one set of columns per copy, 1-based
                    euler = matrix_to_euler(torch.as_tensor(self.domain_rotation[:, k])).numpy()
                    cols[f"gmmDomainRot{k + 1}"] = euler[:, 0]
                    cols[f"gmmDomainTilt{k + 1}"] = euler[:, 1]
                    cols[f"gmmDomainPsi{k + 1}"] = euler[:, 2]
                    cols[f"gmmDomainAngle{k + 1}"] = self.hinge_angle_deg[:, k]
        return cols


def parse_range(text: str, what: str, *, integer: bool = False) -> tuple[float, float]:
    """``"1.0-2.5"`` (or one number) to ``(low, high)``; InputError naming ``what`` otherwise."""
    parts = str(text).strip().split("-")
    try:
        if len(parts) == 1:
            low = high = float(parts[0])
        elif len(parts) == 2:
            low, high = float(parts[0]), float(parts[1])
        else:
            raise ValueError(text)
    except ValueError:
        raise InputError(f"{what}: expected a number or a range LOW-HIGH such as 1.0-2.5, got {text!r}.",
                         field=what) from None
    if integer and (low != int(low) or high != int(high)):
        raise InputError(f"{what}: expected whole numbers, got {text!r}.", field=what)
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise InputError(f"{what}: expected LOW <= HIGH, got {text!r}.", field=what)
    return low, high


def random_ctf(n: int, defocus_um: tuple[float, float], rng: np.random.Generator, *,
               max_astigmatism_A: float = 400.0, voltage_kV: float = 300.0, cs_mm: float = 2.7,
               amplitude_contrast: float = 0.1) -> CTFParams:
    """Per-particle CTF: defocus uniform in ``defocus_um`` (micrometres), small random astigmatism."""
    mean_A = rng.uniform(defocus_um[0], defocus_um[1], n) * 1.0e4
    astig_A = rng.uniform(0.0, max_astigmatism_A, n)
    full = np.ones(n)
    return CTFParams(
        defocus_u_A=mean_A + astig_A / 2, defocus_v_A=mean_A - astig_A / 2,
        defocus_angle_deg=rng.uniform(0.0, 180.0, n), voltage_kV=voltage_kV * full, cs_mm=cs_mm * full,
        amplitude_contrast=amplitude_contrast * full, phase_shift_deg=0.0 * full, bfactor_A2=0.0 * full,
        scale=full.copy(),
    )


def random_half_sets(n: int, rng: np.random.Generator) -> np.ndarray:
    """``(n,)`` int64 subsets 1 and 2, a random half each (subset 1 gets the odd one out)."""
    subset = np.full(n, 2, dtype=np.int64)
    subset[rng.permutation(n)[: (n + 1) // 2]] = 1
    return subset


def draw_truth(n: int, source: AtomicSource | MapSource, *, apix: float, seed: int,
               defocus_um: tuple[float, float] = (1.0, 2.5), origin_sigma_px: float = 2.0) -> Truth:
    """Every per-particle number of a data set, from ``seed`` (images not included)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1]))
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    angles = matrix_to_euler(random_rotations(n, gen)).numpy()
    shift_A = rng.normal(0.0, origin_sigma_px, (n, 2)) * apix
    ctf = random_ctf(n, defocus_um, rng)
    subset = random_half_sets(n, rng)
    truth = Truth(angles_deg=angles, shift_A=shift_A, ctf=ctf, subset=subset)
    if isinstance(source, AtomicSource):
        if source.end_A is not None:
            truth.morph_fraction = rng.uniform(0.0, 1.0, n)
        if source.domain_mask is not None and source.operators is None:
            assert source.hinge_axis is not None  # given with domain_mask
            truth.hinge_angle_deg = random_hinge_angles(n, source.hinge_deg, gen).numpy()
            truth.domain_rotation = hinge_rotations(source.hinge_axis, torch.as_tensor(truth.hinge_angle_deg)).numpy()
        elif source.domain_mask is not None:
            assert source.hinge_axis is not None  # given with domain_mask
            k = source.n_copies
            truth.hinge_angle_deg = random_hinge_angles(n * k, source.hinge_deg, gen).numpy().reshape(n, k)
            truth.domain_rotation = hinge_rotations(source.hinge_axis, torch.as_tensor(
                truth.hinge_angle_deg.reshape(-1))).numpy().reshape(n, k, 3, 3)
    return truth


def perturb_poses(angles_deg: np.ndarray, shift_A: np.ndarray, rotation_deg: float, shift_len_A: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Poses moved by exactly ``rotation_deg`` (random axis) and ``shift_len_A`` (random direction).

    Args:
        angles_deg: ``(n, 3)`` RELION Euler angles.
        shift_A: ``(n, 2)`` RELION origins, angstrom.
        rotation_deg: geodesic angle between each true and perturbed rotation.
        shift_len_A: length of each origin change.
        seed: random seed.

    Returns:
        ``(angles_deg (n, 3), shift_A (n, 2))`` perturbed.
    """
    n = len(angles_deg)
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2]).integers(2**62)))
    axes = random_unit_vectors(n, gen)
    delta = axis_angle_to_matrix(axes * math.radians(rotation_deg))
    perturbed = delta @ euler_to_matrix(torch.as_tensor(angles_deg, dtype=torch.float64))
    direction = torch.rand(n, generator=gen, dtype=torch.float64).numpy() * 2 * math.pi
    moved = np.asarray(shift_A, dtype=np.float64) + shift_len_A * np.stack([np.cos(direction), np.sin(direction)], 1)
    return matrix_to_euler(perturbed).numpy(), moved


def clean_images(source: AtomicSource | MapSource, truth: Truth, indices: np.ndarray, box: int, apix: float,
                 *, device=None) -> torch.Tensor:
    """Noise-free, CTF-modulated particle images.

    Args:
        source: model or map.
        truth: per-particle truth.
        indices: ``(b,)`` particles to render.
        box: image size.
        apix: pixel size, angstrom.

    Returns:
        ``(b, D, D)`` float32.
    """
    from gmmrefine.fourier.ctf import ctf_for_box

    matrices = euler_to_matrix(torch.as_tensor(truth.angles_deg[indices], dtype=torch.float64)).to(device)
    translation = image_translation_px(torch.as_tensor(truth.shift_A[indices], dtype=torch.float64), apix).to(device)
    if isinstance(source, AtomicSource):
        coords = source.conformations(
            None if truth.morph_fraction is None else truth.morph_fraction[indices],
            None if truth.hinge_angle_deg is None else truth.hinge_angle_deg[indices],
        )
        spectra = atoms_to_projection_rfft(coords, matrices, box, apix, translation,
                                           elements=source.assembly_elements(),
                                           bfactor_A2=source.bfactor_A2, center_A=source.center_A, device=device)
    else:
        from gmmrefine.fourier.project import slice_spectra

        spectra = slice_spectra(source.padded_spectrum(device), box, matrices.to(torch.float32))
        spectra = phase_shift_2d(spectra, translation.to(torch.float32))
    ctf = ctf_for_box(box, apix, device=device, **truth.ctf.as_tensors(indices, device=device))
    return irfft2_centered(spectra * ctf.to(spectra.real.dtype), box).to(torch.float32)


def truth_map(source: AtomicSource | MapSource, box: int, apix: float, *, device=None) -> np.ndarray:
    """Noise-free map of the reference conformation (morph fraction 0, hinge angle 0), same scale as the data."""
    if isinstance(source, MapSource):
        return np.asarray(source.volume, dtype=np.float32)
    coords = np.asarray(source.coords_A, dtype=np.float64)
    if source.operators is not None:
        center = np.asarray(source.center_A, dtype=np.float64)
        coords = np.concatenate([(coords - center) @ np.asarray(op, dtype=np.float64).T + center
                                 for op in source.operators])
    vol = atoms_to_map(coords, box, apix, elements=source.assembly_elements(), bfactor_A2=source.bfactor_A2,
                       center_A=source.center_A, device=device)
    return vol.cpu().numpy()


def region_mask(source: AtomicSource, atoms: np.ndarray, box: int, apix: float, *, copy: int = 0,
                lowpass_A: float = 8.0, dilate_A: float = 2.5, edge_A: float = 5.0) -> np.ndarray:
    """Soft mask on some atoms of the reference conformation (e.g. the hinged domain), in the data set's
    frame: their density low-passed to ``lowpass_A``, thresholded at a fifth of its peak, dilated by
    ``dilate_A`` and given a raised-cosine edge ``edge_A`` wide (:func:`gmmrefine.fourier.masks.mask_from_map`).
    Measured on adk (residues 1-110 against the rest, 2.4 A/px): all of the domain's density and ~25 %
    of the rest's (the part at the interface) lie inside.

    Args:
        source: the model.
        atoms: ``(N,)`` bool, atoms of one copy (the model) to mask.
        copy: which copy of an assembly (0: the model itself, operator ``R_0 = I``).

    Returns:
        ``(D, D, D)`` float32 in [0, 1].
    """
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.fourier.masks import mask_from_map

    coords = np.asarray(source.coords_A, dtype=np.float64)[np.asarray(atoms, dtype=bool)]
    if source.operators is not None:
        center = np.asarray(source.center_A, dtype=np.float64)
        coords = (coords - center) @ np.asarray(source.operators[copy], dtype=np.float64).T + center
    elements = [e for e, a in zip(source.elements, atoms) if a]
    vol = atoms_to_map(coords, box, apix, elements=elements, bfactor_A2=source.bfactor_A2, center_A=source.center_A)
    vol = low_pass(vol, lowpass_A, apix)
    return mask_from_map(vol, 0.2 * float(vol.max()), dilate_px=dilate_A / apix, edge_px=edge_A / apix).numpy()


def signal_variance(clean: torch.Tensor) -> float:
    """Mean per-image variance over the box of ``(b, D, D)`` clean images (the signal of the SNR)."""
    return float(clean.to(torch.float64).var(dim=(-2, -1)).mean())


def image_names(n: int, stack_name: str = STACK_NAME) -> list[str]:
    """RELION ``rlnImageName`` entries ``000001@particles.mrcs`` ... (1-based)."""
    return [f"{i + 1:06d}@{stack_name}" for i in range(n)]


@dataclass
class SimulationResult:
    """What :func:`write_dataset` wrote: ``paths`` by role, and the noise it added."""

    paths: dict[str, Path]
    signal_variance: float
    noise_sigma: float


def write_dataset(out_dir: Path, source: AtomicSource | MapSource, truth: Truth, *, box: int, apix: float,
                  snr: float, seed: int, chunk: int = 1000, perturb_deg: float = 0.0, perturb_A: float = 0.0,
                  device=None, progress: bool = True, settings: dict | None = None) -> SimulationResult:
    """Render and write a simulated data set into ``out_dir``.

    Writes ``particles.mrcs``, ``particles.star`` (the true poses), ``truth.star`` (the same plus truth
    columns), ``truth_map.mrc``, with a hinged domain ``domain_mask.mrc`` (:func:`region_mask` of the
    domain; for an assembly, of the first copy's) and, when a perturbation is asked for,
    ``particles_perturbed.star``.
    ``simulation.json`` records ``settings`` (the command line), the seed, the measured signal variance
    and the noise standard deviation. Every file is written atomically.
    """
    from gmmrefine.io.mrc import StackWriter, write_map
    from gmmrefine.io.particles import new_particle_tables
    from gmmrefine.io.star import write_star

    n = len(truth)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    noise_rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    paths = {"stack": out_dir / STACK_NAME, "particles": out_dir / "particles.star",
             "truth": out_dir / "truth.star", "truth_map": out_dir / "truth_map.mrc",
             "settings": out_dir / "simulation.json"}
    n_pilot = min(n, PILOT_PARTICLES)
    # The noise level must be known before the first image is written: it comes from the first
    # n_pilot particles, rendered once when the first chunk holds them.
    first: torch.Tensor | None
    first = clean_images(source, truth, np.arange(min(n, max(chunk, n_pilot))), box, apix, device=device)
    signal_var = signal_variance(first[:n_pilot])
    sigma = 0.0 if math.isinf(snr) else math.sqrt(signal_var / snr)
    with StackWriter(paths["stack"], n, box, apix) as stack:
        i0 = 0
        with tqdm(total=n, desc="simulate", unit="particle", disable=None if progress else True) as bar:
            while i0 < n:
                if first is not None:
                    images, first = first.cpu().numpy(), None
                else:
                    images = clean_images(source, truth, np.arange(i0, min(n, i0 + chunk)), box, apix,
                                          device=device).cpu().numpy()
                if sigma > 0:
                    images += sigma * noise_rng.standard_normal(images.shape, dtype=np.float32)
                stack[i0:i0 + len(images)] = images
                i0 += len(images)
                bar.update(len(images))
    names = image_names(n)
    common: dict[str, Any] = dict(ctf=truth.ctf, subset=truth.subset, apix=apix, box=box)
    write_star(paths["particles"], new_particle_tables(names, truth.angles_deg, truth.shift_A, extra=None, **common))
    write_star(paths["truth"], new_particle_tables(names, truth.angles_deg, truth.shift_A,
                                                   extra=truth.extra_columns() or None, **common))
    write_map(paths["truth_map"], truth_map(source, box, apix, device=device), apix)
    if isinstance(source, AtomicSource) and source.domain_mask is not None:
        paths["domain_mask"] = out_dir / "domain_mask.mrc"
        write_map(paths["domain_mask"], region_mask(source, source.domain_mask, box, apix), apix)
    if perturb_deg > 0 or perturb_A > 0:
        angles, shift = perturb_poses(truth.angles_deg, truth.shift_A, perturb_deg, perturb_A, seed)
        paths["perturbed"] = out_dir / "particles_perturbed.star"
        write_star(paths["perturbed"], new_particle_tables(names, angles, shift, extra=None, **common))
    write_json_atomic(paths["settings"], {
        **(settings or {}), "n": n, "box": box, "apix": apix, "snr": snr, "seed": seed,
        "signal_variance": signal_var, "noise_sigma": sigma, "perturb_deg": perturb_deg, "perturb_A": perturb_A,
        "snr_definition": "variance over the box of the CTF-modulated noise-free images (mean over the first "
                          f"{PILOT_PARTICLES} particles) / variance of the white Gaussian noise",
    })
    return SimulationResult(paths=paths, signal_variance=signal_var, noise_sigma=sigma)

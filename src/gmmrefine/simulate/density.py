"""Densities and projections of atomic models, computed analytically in Fourier space.

Model of the density: every non-hydrogen atom contributes its electron scattering factor
(International Tables vol. C, table 4.3.2.2, the five-Gaussian fit that gemmi ships as ``c4322``),
blurred by one overall B-factor::

    F(k) = sum_j f_e(j)(|k|) * exp(-B |k|^2 / 4) * exp(-2 pi i k . r_j),
    f_e(s) = sum_{i=1..5} a_i exp(-b_i s^2 / 4),        s = |k| in 1/A.

So each atom is a sum of five isotropic Gaussians (variances ``(b_i + B) / (8 pi^2)`` A^2). The
transform is evaluated exactly at the grid frequencies inside the Nyquist sphere (``|k| < 0.5``
cycles per pixel; everything outside is zero) and inverse-transformed once: the map is the band-limited
density sampled at the voxels, with no spreading kernel and no interpolation. Per-atom phase factors are
separable along x, y and z, so a whole map costs one complex matrix product per element.

Scale: a voxel holds the band-limited density ``rho(x)`` (scattering factor units, A, per A^3); a
projection pixel holds the sum of the voxels along z, ``(1/apix) * integral rho dz``. Both are what a
map and ``relion_project`` of that map agree on, and the two transforms share one normalisation: the
unnormalised DFT coefficient at a frequency is ``F(k) / apix^3`` in both. So
``project_map(atoms_to_map(x))`` and ``atoms_to_projection(x)`` are the same images up to the
interpolation error of the projector.

Geometry: coordinates are placed relative to ``center_A`` (default: the centre of mass of the non-H
atoms) at voxel ``D // 2`` on every axis, the rotation centre of ``gmmrefine.fourier.fft``. Maps are
``[z, y, x]``; images ``[y, x]``; a particle at RELION matrix ``A`` sees atom ``r`` at ``(A r)[:2]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.fft import freq_grid_2d, freq_grid_3d, irfft2_centered, irfft3_centered

DEFAULT_BFACTOR_A2 = 20.0
"""Overall B-factor (A^2) added to every atom: the blur of a good cryo-EM map, and a signal that
still reaches Nyquist at the pixel sizes simulations use."""

_HYDROGENS = frozenset({"H", "D"})


def _chunk_elements(device) -> int:
    """Complex entries per intermediate table: 32 MiB on CPU (cache-friendly), 512 MiB on a GPU."""
    return 1 << 26 if torch.device(device or "cpu").type == "cuda" else 1 << 22


@functools.cache
def _element_info(symbol: str) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """Electron form-factor coefficients ``(a, b)`` and atomic mass of an element symbol."""
    import gemmi

    el = gemmi.Element(symbol)
    if el.atomic_number == 0:
        raise InputError(f"unknown element symbol {symbol!r} in the atomic model; expected a chemical element "
                         "such as C, N, O or S.", field="element")
    coefs = el.c4322.get_coefs()
    return tuple(coefs[:5]), tuple(coefs[5:]), float(el.weight)


def _normalise_elements(elements: Sequence[str] | None, n_atoms: int) -> np.ndarray:
    if elements is None:
        return np.full(n_atoms, "C")
    out = np.char.capitalize(np.char.strip(np.asarray(elements, dtype=str)))
    if out.shape != (n_atoms,):
        raise ValueError(f"{out.size} element symbols for {n_atoms} atoms")
    return out


def heavy_atom_groups(elements: Sequence[str] | None, n_atoms: int) -> dict[str, np.ndarray]:
    """Indices of the non-hydrogen atoms, grouped by element.

    Args:
        elements: ``(N,)`` element symbols, or None (every atom is carbon).
        n_atoms: ``N``.

    Returns:
        ``{symbol: (n_e,) int64 indices}`` without H and D, symbols sorted; each is validated against gemmi.
    """
    symbols = _normalise_elements(elements, n_atoms)
    unique, inverse = np.unique(symbols, return_inverse=True)
    groups = {}
    for k, symbol in enumerate(unique.tolist()):  # one entry per element, not per atom
        if symbol in _HYDROGENS:
            continue
        _element_info(symbol)
        groups[symbol] = np.flatnonzero(inverse == k).astype(np.int64)
    return groups


def center_of_mass(coords_A: np.ndarray | torch.Tensor, elements: Sequence[str] | None = None) -> np.ndarray:
    """Mass-weighted centre of the non-hydrogen atoms.

    Args:
        coords_A: ``(N, 3)`` x, y, z in angstrom.
        elements: ``(N,)`` element symbols, or None (equal masses).

    Returns:
        ``(3,)`` float64, angstrom.
    """
    xyz = np.asarray(torch.as_tensor(coords_A).detach().cpu(), dtype=np.float64)
    groups = heavy_atom_groups(elements, xyz.shape[0])
    if not groups:
        raise InputError("the atomic model has no non-hydrogen atoms.", field="atoms")
    weighted = sum(_element_info(s)[2] * xyz[idx].sum(0) for s, idx in groups.items())
    total = sum(_element_info(s)[2] * len(idx) for s, idx in groups.items())
    return weighted / total


def max_radius_A(coords_A: np.ndarray, center_A: np.ndarray, elements: Sequence[str] | None = None) -> float:
    """Largest distance (A) of a non-hydrogen atom from ``center_A``: half the box the model needs."""
    xyz = np.asarray(coords_A, dtype=np.float64)
    groups = heavy_atom_groups(elements, xyz.shape[0])
    idx = np.concatenate(list(groups.values()))
    return float(np.linalg.norm(xyz[idx] - np.asarray(center_A, dtype=np.float64), axis=1).max())


def form_factor(symbol: str, s_inv_A: torch.Tensor, bfactor_A2: float) -> torch.Tensor:
    """Electron scattering factor of an element times the B-factor term.

    Args:
        symbol: element symbol.
        s_inv_A: ``(...)`` spatial frequency magnitudes in 1/A.
        bfactor_A2: overall B-factor in A^2.

    Returns:
        ``(...)`` ``f_e(s) * exp(-B s^2 / 4)`` in angstrom.
    """
    a, b, _ = _element_info(symbol)
    s2_4 = s_inv_A * s_inv_A / 4.0
    out = torch.zeros_like(s_inv_A)
    for ai, bi in zip(a, b):  # five Gaussians per element
        out = out + ai * torch.exp(-(bi + bfactor_A2) * s2_4)
    return out


def _phases(positions_px: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """``exp(-2 pi i k x)`` for ``(...)`` positions (pixels) and ``(K,)`` frequencies (cycles/px).

    Returns:
        ``(..., K)`` complex64. (``torch.complex(cos, sin)`` is about 3x faster than ``torch.polar`` on CPU.)
    """
    angle = (-2.0 * math.pi) * positions_px.to(torch.float32)[..., None] * freqs
    return torch.complex(torch.cos(angle), torch.sin(angle))


def _prepare(coords_A, elements, center_A, device) -> tuple[torch.Tensor, dict[str, np.ndarray], torch.Tensor]:
    coords = torch.as_tensor(coords_A)
    n_atoms = coords.shape[-2]
    groups = heavy_atom_groups(elements, n_atoms)
    if not groups:
        raise InputError("the atomic model has no non-hydrogen atoms.", field="atoms")
    if center_A is None:
        flat = coords.reshape(-1, n_atoms, 3).to(torch.float64).mean(0)
        center_A = center_of_mass(flat, elements)
    center = torch.as_tensor(np.asarray(center_A, dtype=np.float64), device=device)
    return coords.to(device=device, dtype=torch.float64), groups, center


def atoms_to_map(
    coords_A: np.ndarray | torch.Tensor,
    box: int,
    apix: float,
    *,
    elements: Sequence[str] | None = None,
    bfactor_A2: float = DEFAULT_BFACTOR_A2,
    center_A: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Density map of an atomic model (see the module docstring for the model and its scale).

    Args:
        coords_A: ``(N, 3)`` atom positions x, y, z in angstrom.
        box: map size ``D`` in voxels.
        apix: voxel size in angstrom.
        elements: ``(N,)`` element symbols (hydrogens are skipped), or None to treat every atom as carbon.
        bfactor_A2: overall B-factor added to every atom, A^2.
        center_A: ``(3,)`` model point placed at voxel ``D // 2``; None for the centre of mass.
        device: torch device of the computation and the result.

    Returns:
        ``(D, D, D)`` float32 map indexed ``[z, y, x]``.
    """
    coords, groups, center = _prepare(coords_A, elements, center_A, device)
    if coords.ndim != 2:
        raise ValueError(f"atoms_to_map expects (N, 3) coordinates, got {tuple(coords.shape)}")
    pos_px = ((coords - center) / apix).to(torch.float32)
    grid = freq_grid_3d(box, device=device)  # (D, D, D//2+1, 3) cycles/voxel
    k_norm = grid.norm(dim=-1)
    inside = k_norm < 0.5
    kx = torch.fft.rfftfreq(box, device=device)
    kyz = torch.fft.fftfreq(box, device=device)
    chunk = max(1, _chunk_elements(device) // (box * box))
    spectrum = torch.zeros(box, box, box // 2 + 1, dtype=torch.complex64, device=device)
    for symbol, idx in groups.items():  # a handful of elements, never a loop over atoms
        sub = pos_px[torch.as_tensor(idx, device=device)]
        structure = torch.zeros(box * box, box // 2 + 1, dtype=torch.complex64, device=device)
        for i0 in range(0, sub.shape[0], chunk):
            part = sub[i0:i0 + chunk]
            ex = _phases(part[:, 0], kx)  # (n, D//2+1)
            ey = _phases(part[:, 1], kyz)  # (n, D)
            ez = _phases(part[:, 2], kyz)  # (n, D)
            ezy = (ez[:, :, None] * ey[:, None, :]).reshape(part.shape[0], box * box)
            structure += ezy.T @ ex
        structure = structure.reshape(box, box, box // 2 + 1)
        weight = form_factor(symbol, k_norm / apix, bfactor_A2) / apix**3
        spectrum += structure * (weight * inside)
    return irfft3_centered(spectrum, box).to(torch.float32)


def atoms_to_projection_rfft(
    coords_A: np.ndarray | torch.Tensor,
    matrices: torch.Tensor,
    box: int,
    apix: float,
    translation_px: torch.Tensor | None = None,
    *,
    elements: Sequence[str] | None = None,
    bfactor_A2: float = DEFAULT_BFACTOR_A2,
    center_A: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fourier transforms of projections of atomic models, in the ``rfft2_centered`` layout.

    Args:
        coords_A: ``(N, 3)`` one model for every particle, or ``(B, N, 3)`` one conformation per particle.
        matrices: ``(B, 3, 3)`` RELION matrices ``A``.
        box: image size ``D``.
        apix: pixel size in angstrom.
        translation_px: ``(B, 2)`` image translation (x, y) in pixels, content moves by ``+translation``
            (``gmmrefine.geometry.shifts.image_translation_px`` of the RELION origin); None for none.
        elements, bfactor_A2, center_A, device: as in :func:`atoms_to_map` (for ``(B, N, 3)`` input the
            default centre is the centre of mass of the mean conformation).

    Returns:
        ``(B, D, D//2+1)`` complex64; zero outside ``|k| < 0.5`` cycles/px.
    """
    coords, groups, center = _prepare(coords_A, elements, center_A, device)
    matrices = torch.as_tensor(matrices, device=device, dtype=torch.float64)
    n_part = matrices.shape[0]
    if coords.ndim == 3 and coords.shape[0] != n_part:
        raise ValueError(f"{coords.shape[0]} conformations for {n_part} rotations")
    shift = torch.zeros(n_part, 2, dtype=torch.float64, device=device) if translation_px is None else \
        torch.as_tensor(translation_px, device=device, dtype=torch.float64)
    grid = freq_grid_2d(box, device=device)
    k_norm = grid.norm(dim=-1)
    inside = k_norm < 0.5
    kx = torch.fft.rfftfreq(box, device=device)
    ky = torch.fft.fftfreq(box, device=device)
    weights = {s: form_factor(s, k_norm / apix, bfactor_A2) * inside / apix**3 for s in groups}
    n_heavy = sum(len(g) for g in groups.values())
    batch = max(1, _chunk_elements(device) // (n_heavy * (box + box // 2 + 1)))
    out = torch.empty(n_part, box, box // 2 + 1, dtype=torch.complex64, device=device)
    for b0 in range(0, n_part, batch):  # batches of particles bound the memory of the phase tables
        rot = matrices[b0:b0 + batch]
        part = coords if coords.ndim == 2 else coords[b0:b0 + batch]
        # Image position (A r)[:2] in pixels, plus the translation.
        xy = ((part - center) @ rot[:, :2, :].transpose(-1, -2)) / apix + shift[b0:b0 + batch, None, :]
        xy = xy.to(torch.float32)
        acc = torch.zeros(rot.shape[0], box, box // 2 + 1, dtype=torch.complex64, device=device)
        for symbol, idx in groups.items():
            sel = xy[:, torch.as_tensor(idx, device=device)]  # (b, n_e, 2)
            ex = _phases(sel[..., 0], kx)  # (b, n_e, D//2+1)
            ey = _phases(sel[..., 1], ky)  # (b, n_e, D)
            acc += (ey.transpose(-1, -2) @ ex) * weights[symbol]
        out[b0:b0 + batch] = acc
    return out


def atoms_to_projection(
    coords_A: np.ndarray | torch.Tensor,
    matrices: torch.Tensor,
    box: int,
    apix: float,
    translation_px: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Real-space projections of atomic models: :func:`atoms_to_projection_rfft` transformed back.

    Returns:
        ``(B, D, D)`` float32 images indexed ``[y, x]``, centre at pixel ``D // 2``.
    """
    spec = atoms_to_projection_rfft(coords_A, matrices, box, apix, translation_px, **kwargs)
    return irfft2_centered(spec, box).to(torch.float32)

"""Conformational motions for simulated flexible data: every particle gets its own atom coordinates.

Two motions, both batched over particles:

* :func:`morph`: straight-line interpolation between two conformations with the same atoms (after
  :func:`superpose` puts the second on the first, so the morph has no overall rotation).
* :func:`hinge`: a subset of atoms (a domain) rotated rigidly about a pivot point; the angle varies per
  particle (:func:`random_hinge_angles`) about an axis fixed for the data set.

A domain rotation ``R`` (active, in the model frame) moves atom ``r`` to ``pivot + R (r - pivot)``. Seen by
a particle with RELION matrix ``A``, the domain therefore has the pose ``A @ R`` (and an extra image shift
from the pivot), which is what a per-domain refinement should recover.
"""

from __future__ import annotations

import numpy as np
import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix


def superpose(mobile_A: np.ndarray, target_A: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Kabsch: the rigid motion of ``mobile_A`` that minimises the (weighted) RMSD to ``target_A``.

    Args:
        mobile_A, target_A: ``(N, 3)`` the same atoms in two conformations, angstrom.
        weights: ``(N,)`` non-negative weights (e.g. 0 for hydrogens), or None for equal weights.

    Returns:
        ``(N, 3)`` float64: ``mobile_A`` rotated and translated onto ``target_A``.
    """
    mob = np.asarray(mobile_A, dtype=np.float64)
    tgt = np.asarray(target_A, dtype=np.float64)
    w = np.ones(len(mob)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mob_c = (w[:, None] * mob).sum(0)
    tgt_c = (w[:, None] * tgt).sum(0)
    cov = ((mob - mob_c) * w[:, None]).T @ (tgt - tgt_c)
    u, _, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))  # no reflections
    rot = u @ np.diag([1.0, 1.0, d]) @ vt  # row-vector convention: x_new = x @ rot
    return (mob - mob_c) @ rot + tgt_c


def morph(start_A: torch.Tensor | np.ndarray, end_A: torch.Tensor | np.ndarray,
          fraction: torch.Tensor | np.ndarray | float) -> torch.Tensor:
    """Linear morph between two conformations of the same atoms.

    Args:
        start_A, end_A: ``(N, 3)`` angstrom.
        fraction: scalar or ``(B,)``; 0 gives ``start_A``, 1 gives ``end_A``.

    Returns:
        ``(N, 3)`` for a scalar fraction, else ``(B, N, 3)``; float64.
    """
    start = torch.as_tensor(start_A, dtype=torch.float64)
    end = torch.as_tensor(end_A, dtype=torch.float64, device=start.device)
    if start.shape != end.shape:
        raise ValueError(f"morph needs the same atoms in both models, got {tuple(start.shape)} and "
                         f"{tuple(end.shape)}")
    t = torch.as_tensor(fraction, dtype=torch.float64, device=start.device)
    if t.ndim == 0:
        return start + t * (end - start)
    return start + t[:, None, None] * (end - start)


def hinge(coords_A: torch.Tensor | np.ndarray, domain_mask: np.ndarray | torch.Tensor,
          pivot_A: np.ndarray | torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate a domain rigidly about a pivot, one rotation per particle.

    Args:
        coords_A: ``(N, 3)``, or ``(B, N, 3)`` one conformation per particle (e.g. a morph), angstrom.
        domain_mask: ``(N,)`` bool, the atoms that move.
        pivot_A: ``(3,)`` fixed point of the rotation, angstrom.
        rotations: ``(B, 3, 3)`` active rotation matrices in the model frame.

    Returns:
        ``(B, N, 3)`` float64 conformations.
    """
    coords = torch.as_tensor(coords_A, dtype=torch.float64)
    rot = torch.as_tensor(rotations, dtype=torch.float64, device=coords.device)
    pivot = torch.as_tensor(np.asarray(pivot_A, dtype=np.float64), device=coords.device)
    mask = torch.as_tensor(np.asarray(domain_mask, dtype=bool), device=coords.device)
    moved = (coords - pivot) @ rot.transpose(-1, -2) + pivot  # (B, N, 3)
    return torch.where(mask[:, None], moved, coords)


def hinge_rotations(axis: np.ndarray | torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """Active rotations by ``angles_deg`` (B,) about one ``axis`` (3,): ``(B, 3, 3)`` float64."""
    ax = torch.as_tensor(np.asarray(axis, dtype=np.float64))
    ax = ax / ax.norm()
    angles = torch.deg2rad(torch.as_tensor(angles_deg, dtype=torch.float64))
    return axis_angle_to_matrix(angles[:, None] * ax)


def random_hinge_angles(n: int, max_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-particle hinge angles, uniform in ``[-max_deg, +max_deg]``: ``(n,)`` float64 degrees."""
    return (2.0 * torch.rand(n, generator=generator, dtype=torch.float64) - 1.0) * max_deg


def random_unit_vectors(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Directions uniform on the sphere: ``(n, 3)`` float64."""
    v = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return v / v.norm(dim=-1, keepdim=True)


def domain_pivot(coords_A: np.ndarray, domain_mask: np.ndarray, contact_A: float = 6.0) -> np.ndarray:
    """Default hinge point: the centroid of the atoms where the domain meets the rest.

    Those are the atoms (on either side) within ``contact_A`` of an atom on the other side; the domain
    turns about where it joins the rest of the model, as a hinge does.

    Args:
        coords_A: ``(N, 3)`` angstrom.
        domain_mask: ``(N,)`` bool.
        contact_A: contact distance, angstrom.

    Returns:
        ``(3,)`` float64 angstrom (the domain's centroid if nothing is in contact).
    """
    from scipy.spatial import cKDTree

    xyz = np.asarray(coords_A, dtype=np.float64)
    mask = np.asarray(domain_mask, dtype=bool)
    dom, rest = xyz[mask], xyz[~mask]
    if len(rest) == 0 or len(dom) == 0:
        return xyz.mean(0)
    d_rest, _ = cKDTree(dom).query(rest, distance_upper_bound=contact_A)
    d_dom, _ = cKDTree(rest).query(dom, distance_upper_bound=contact_A)
    contact = np.concatenate([rest[np.isfinite(d_rest)], dom[np.isfinite(d_dom)]])
    return contact.mean(0) if len(contact) else dom.mean(0)

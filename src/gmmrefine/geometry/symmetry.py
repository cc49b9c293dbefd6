"""Point-group symmetry in RELION's convention (C<n>, D<n>, T, O, I and I1..I4).

Convention (checked against ``relion_particle_symmetry_expand`` in ``tests/test_symmetry.py``):

* ``symmetry_operators(name)`` returns RELION's matrices ``R_k`` (``SymList::get_matrices``, 3x3 part),
  identity first, then in the order RELION lists them: the powers of each generator axis as
  ``read_sym_file`` writes them, then the products found by ``compute_subgroup``.
* The symmetry-equivalent poses of a particle with RELION matrix ``A`` are ``A @ R_k`` (right
  multiplication; this is what ``relion_particle_symmetry_expand`` writes, operator ``k`` on output row
  ``k`` of each particle). Since a symmetric map satisfies ``V(R_k r) = V(r)``, the projection
  ``(A R_k r)_xy`` is the same image.
* Generator axes are RELION's (``SymList::fill_symmetry_class``): C<n> about z; D<n> adds a 2-fold about
  x; T: 3-fold z, 2-fold (0, 0.816496, 0.577350); O: 3-fold (1,1,1)/sqrt(3), 4-fold z; I (= I2): 2-fold z,
  5-fold (0.525731, 0, 0.850651), 3-fold (0, 0.356822, 0.934172).
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import torch
from scipy.ndimage import affine_transform

from gmmrefine.errors import InputError
from gmmrefine.geometry.rotations import axis_angle_to_matrix

# (fold, axis) generators as RELION's SymList::fill_symmetry_class writes them.
_ICOSAHEDRAL = {
    "I1": [(2, (1.0, 0.0, 0.0)), (5, (0.85065080702670, 0.0, -0.5257311142635)),
           (3, (0.9341723640, 0.3568220765, 0.0))],
    "I2": [(2, (0.0, 0.0, 1.0)), (5, (0.525731114, 0.0, 0.850650807)),
           (3, (0.0, 0.356822076, 0.934172364))],
    "I3": [(2, (-0.5257311143, 0.0, 0.8506508070)), (5, (0.0, 0.0, 1.0)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (0.5257311143, 0.0, 0.8506508070)), (5, (0.8944271932547096, 0.0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}
_ICOSAHEDRAL["I"] = _ICOSAHEDRAL["I2"]

_EQUAL_TOL = 1e-6  # RELION's XMIPP_EQUAL_ACCURACY for Matrix2D::equal


def _generators(name: str) -> list[tuple[int, tuple[float, float, float]]]:
    key = name.strip().upper()
    match = re.fullmatch(r"([CD])(\d{1,2})", key)
    if match:
        order = int(match.group(2))
        if order < 1:
            raise InputError(f"symmetry '{name}': the order n of C<n>/D<n> must be at least 1")
        gens = [(order, (0.0, 0.0, 1.0))]
        if match.group(1) == "D":
            gens.append((2, (1.0, 0.0, 0.0)))
        return gens
    if key == "T":
        return [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))]
    if key == "O":
        return [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))]
    if key in _ICOSAHEDRAL:
        return _ICOSAHEDRAL[key]
    raise InputError(f"symmetry '{name}': expected C<n>, D<n>, T, O, I, I1, I2, I3 or I4 "
                     "(RELION point-group names)")


def _axis_rotation(angle_deg: float, axis: tuple[float, float, float]) -> np.ndarray:
    v = torch.tensor(axis, dtype=torch.float64)
    v = v / v.norm() * math.radians(angle_deg)
    return axis_angle_to_matrix(v).numpy()


def _zero_small(m: np.ndarray) -> np.ndarray:
    # RELION's setSmallValuesToZero, so its closure sees the same numbers we do.
    return np.where(np.abs(m) < _EQUAL_TOL, 0.0, m)


@functools.lru_cache(maxsize=64)
def _relion_operator_list(key: str) -> tuple[tuple[float, ...], ...]:
    """Non-identity matrices in RELION's order (``read_sym_file`` then ``compute_subgroup``)."""
    mats: list[np.ndarray] = []
    for fold, axis in _generators(key):
        for j in range(1, fold):
            # RELION stores rotation3DMatrix(angle, axis).transpose() for each power of the axis.
            mats.append(_zero_small(_axis_rotation(360.0 * j / fold, axis).T))
    eye = np.eye(3)
    # compute_subgroup: visit the untried pairs (i, j) square shell by square shell (shell n holds the
    # pairs with max(i, j) = n), in found_not_tried's order, appending each new product as found.
    tried: set[tuple[int, int]] = set()
    first_open_shell = [0]  # shells below it are fully tried; new matrices only add later shells

    def next_untried() -> tuple[int, int] | None:
        size = len(mats)
        n = first_open_shell[0]
        i, j = 0, n
        while n != size:
            if (i, j) not in tried:
                first_open_shell[0] = n
                return i, j
            if i != n:
                i += 1
            else:
                j -= 1
                if j == -1:
                    n += 1
                    j = n
                    i = 0
        return None

    while True:
        pair = next_untried()
        if pair is None:
            break
        tried.add(pair)
        i, j = pair
        new = mats[i] @ mats[j]
        if np.abs(new - eye).max() < _EQUAL_TOL:
            continue
        if (np.abs(np.stack(mats) - new).max(axis=(1, 2)) < _EQUAL_TOL).any():
            continue
        mats.append(_zero_small(new))
        if len(mats) > 200:  # pragma: no cover - guards against a non-closing generator set
            raise RuntimeError(f"symmetry '{key}' did not close")
    return tuple(tuple(m.flatten().tolist()) for m in mats)


def symmetry_operators(name: str, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """RELION's symmetry operators of a point group.

    Args:
        name: RELION point-group name: ``C<n>``, ``D<n>``, ``T``, ``O``, ``I`` (= ``I2``), ``I1``..``I4``
            (case-insensitive).

    Returns:
        ``(K, 3, 3)`` rotation matrices ``R_k``, identity first, in RELION's order; K = n, 2n, 12, 24, 60.

    Raises:
        InputError: for an unknown name.
    """
    if not isinstance(name, str):
        raise InputError(f"symmetry {name!r}: expected a RELION point-group name such as C1, C3, D2, T, O, I")
    key = name.strip().upper()
    _generators(key)  # raises InputError for a bad name before anything is cached
    rest = _relion_operator_list(key)
    eye = torch.eye(3, dtype=torch.float64)
    ops = torch.cat([eye[None], torch.tensor(rest, dtype=torch.float64).reshape(-1, 3, 3)]) if rest else eye[None]
    return ops.to(device=device, dtype=dtype)


def expand_poses(matrices: torch.Tensor, name: str) -> torch.Tensor:
    """Symmetry expansion: one pose per operator for every particle.

    Args:
        matrices: ``(N, 3, 3)`` RELION matrices ``A``.
        name: point-group name (see :func:`symmetry_operators`).

    Returns:
        ``(N * K, 3, 3)``: rows ``n * K + k`` hold ``A_n @ R_k`` (particle-major, operator order as
        ``relion_particle_symmetry_expand`` writes them).
    """
    ops = symmetry_operators(name, device=matrices.device, dtype=matrices.dtype)
    expanded = matrices[:, None] @ ops[None]  # (N, K, 3, 3)
    return expanded.reshape(-1, 3, 3)


def rotate_map(volume: torch.Tensor, matrix: torch.Tensor, *, spline_order: int = 5) -> torch.Tensor:
    """Rotate a map: ``out(r) = volume(matrix.T @ r)`` (content moves by ``matrix``).

    B-spline interpolation (scipy ``affine_transform``, on CPU; the result returns to the input's
    device): exact for operators that permute voxels (90/180-degree turns about the axes); at other
    angles, for a map band-limited well below Nyquist, ~1e-4 of the peak with order 5 (5e-4 with order
    3) where trilinear resampling loses a few percent. Order 5 costs ~3 s per rotation of a 128^3 map.

    Args:
        volume: ``(D, D, D)`` real map indexed ``[z, y, x]``, centre at voxel ``D // 2``.
        matrix: ``(3, 3)`` rotation acting on (x, y, z).
        spline_order: B-spline order (1 = trilinear).

    Returns:
        ``(D, D, D)``; samples from outside the box are 0.
    """
    box = volume.shape[-1]
    # Index space is (z, y, x): reverse the axes of matrix.T (the pull-back out[o] = in[M o + offset]).
    pull = matrix.detach().cpu().double().numpy().T[::-1, ::-1]
    centre = np.full(3, box // 2, dtype=np.float64)
    data = volume.detach().cpu().double().numpy()
    out = affine_transform(data, pull, offset=centre - pull @ centre, order=spline_order, mode="constant",
                           cval=0.0, prefilter=True)
    return torch.as_tensor(out, dtype=volume.dtype).to(volume.device)


def symmetrize_map(volume: torch.Tensor, name: str, *, spline_order: int = 5) -> torch.Tensor:
    """Impose point-group symmetry by averaging the map over its rotated copies.

    Args:
        volume: ``(D, D, D)`` real map, ``[z, y, x]``, centre at ``D // 2``.
        name: point-group name.
        spline_order: interpolation order of :func:`rotate_map`.

    Returns:
        ``(D, D, D)`` = ``mean_k volume(R_k^T r)`` (see :func:`rotate_map` for the interpolation).
    """
    ops = symmetry_operators(name)
    total = torch.zeros_like(volume)
    for op in ops:  # K <= 60 whole-map resamplings; not a per-particle loop
        total = total + rotate_map(volume, op, spline_order=spline_order)
    return total / ops.shape[0]

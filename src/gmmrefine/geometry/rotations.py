"""Rotations in RELION's convention, batched in torch.

Convention (measured with ``relion_project``, see ``tests/test_conventions_relion.py``):

* ``euler_to_matrix(rot, tilt, psi)`` returns RELION's matrix ``A`` (``Euler_angles2matrix``), equal to
  scipy ``Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T``.
* A 3D point ``r`` (x, y, z in angstrom, relative to the box centre) lands in the projection image at
  ``(A @ r)[:2]``; the projection direction is z of the rotated frame.
* By the Fourier slice theorem the 2D frequency ``(kx, ky)`` of the projection samples the 3D
  transform at ``A.T @ (kx, ky, 0)``.

Inside optimisers a rotation is ``axis_angle_to_matrix(v) @ A0``: a small update ``v`` (radians,
in the projection frame, so ``v[2]`` is an in-plane rotation) applied to the input rotation ``A0``.
Raw Euler angles are never optimised: they are singular at tilt 0 and 180.

The Euler-angle conversions live in :mod:`gmmrefine.io.conventions` (the readers need them) and are
re-exported here.
"""

from __future__ import annotations

import torch

from gmmrefine.io.conventions import euler_to_matrix as euler_to_matrix
from gmmrefine.io.conventions import matrix_to_euler as matrix_to_euler


def axis_angle_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, differentiable and exact near zero.

    Args:
        v: ``(..., 3)`` rotation vectors in radians (axis times angle).

    Returns:
        ``(..., 3, 3)`` active rotation matrices ``exp([v]_x)``.
    """
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = torch.sqrt(safe)
    # Taylor series below 1e-4 rad keep the gradient finite at v = 0.
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / safe)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*v.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`axis_angle_to_matrix` for rotation angles below pi.

    Args:
        matrix: ``(..., 3, 3)`` rotation matrices.

    Returns:
        ``(..., 3)`` rotation vectors in radians.
    """
    m = torch.as_tensor(matrix)
    cos = ((m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2] - 1) / 2).clamp(-1.0, 1.0)
    theta = torch.acos(cos)
    w = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = torch.sin(theta)
    scale = torch.where(sin.abs() > 1e-6, theta / (2 * sin.where(sin.abs() > 1e-6, torch.ones_like(sin))),
                        torch.full_like(sin, 0.5))
    return w * scale[..., None]


def rotation_angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Geodesic angle between rotations ``a`` and ``b`` in degrees.

    Args:
        a, b: ``(..., 3, 3)`` broadcastable.

    Returns:
        ``(...)`` angles in [0, 180].
    """
    rel = a @ b.transpose(-1, -2)
    # atan2 of the antisymmetric and the symmetric part rather than acos of the trace: acos cannot
    # resolve small angles (float32: nothing below ~0.03 degree), and equal matrices give exactly 0.
    cos = (rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2] - 1) / 2
    skew = torch.stack([rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0],
                        rel[..., 1, 0] - rel[..., 0, 1]], dim=-1)
    return torch.rad2deg(torch.atan2(torch.linalg.vector_norm(skew, dim=-1) / 2, cos))


def project_points(coords_A: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Image-plane coordinates of 3D points seen at rotation ``matrix``.

    Args:
        coords_A: ``(N, 3)`` or ``(B, N, 3)`` x, y, z relative to the box centre.
        matrix: ``(B, 3, 3)`` RELION matrices ``A``, or their first two rows ``(B, 2, 3)`` when only
            image positions are wanted.

    Returns:
        ``(B, N, 3)`` rotated points (``(B, N, 2)`` from two rows); ``[..., :2]`` is the image
        position (x, y), ``[..., 2]`` depth.
    """
    return coords_A @ matrix.transpose(-1, -2)


def slice_frequencies(freq_2d: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """3D frequencies sampled by a central slice (Fourier slice theorem).

    Args:
        freq_2d: ``(..., 2)`` kx, ky of the projection.
        matrix: ``(B, 3, 3)`` RELION matrices ``A``.

    Returns:
        ``(B, ..., 3)`` frequencies ``A.T @ (kx, ky, 0)`` in the map's frame (x, y, z order).
    """
    rows = matrix[:, :2, :]  # (B, 2, 3): A.T @ (kx, ky, 0) = kx * A[0] + ky * A[1]
    flat = freq_2d.reshape(-1, 2)
    out = flat @ rows  # (B, P, 3)
    return out.reshape(matrix.shape[0], *freq_2d.shape[:-1], 3)


def random_rotations(n: int, generator: torch.Generator | None = None, dtype=torch.float64) -> torch.Tensor:
    """Uniformly distributed rotation matrices (unit quaternions from a 4D normal).

    Returns:
        ``(n, 3, 3)``.
    """
    q = torch.randn(n, 4, generator=generator, dtype=dtype)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    m = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ], -1)
    return m.reshape(n, 3, 3)

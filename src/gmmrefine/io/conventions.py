"""RELION's Euler-angle convention: ZYZ angles (rot, tilt, psi) to and from RELION's rotation matrix ``A``.

``euler_to_matrix(rot, tilt, psi)`` returns RELION's matrix ``A`` (``Euler_angles2matrix``), equal to
scipy ``Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T`` (measured with
``relion_project``, see ``tests/test_conventions_relion.py``). They live in ``io`` because the particle
readers convert other programs' poses with them; :mod:`gmmrefine.geometry.rotations` re-exports them.
"""

from __future__ import annotations

import torch


def _rot_z(a: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(*a.shape, 3, 3)


def _rot_y(a: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([c, z, s, z, o, z, -s, z, c], dim=-1).reshape(*a.shape, 3, 3)


def euler_to_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    """RELION ZYZ Euler angles to RELION's rotation matrix ``A``.

    Args:
        angles_deg: ``(..., 3)`` rot, tilt, psi in degrees.

    Returns:
        ``(..., 3, 3)`` matrices, ``A = Rz(psi)^T-free form = (Rz(rot) Ry(tilt) Rz(psi))^T``.
    """
    a = torch.deg2rad(torch.as_tensor(angles_deg))
    rot, tilt, psi = a[..., 0], a[..., 1], a[..., 2]
    active = _rot_z(rot) @ _rot_y(tilt) @ _rot_z(psi)
    return active.transpose(-1, -2)


def matrix_to_euler(matrix: torch.Tensor) -> torch.Tensor:
    """RELION's rotation matrix ``A`` to ZYZ Euler angles (rot, tilt, psi) in degrees.

    Tilt is in [0, 180]; rot and psi in (-180, 180]. At tilt 0 or 180 (gimbal lock) psi is set to 0
    and the whole in-plane angle goes to rot, as RELION's ``Euler_matrix2angles`` does.

    Args:
        matrix: ``(..., 3, 3)``.

    Returns:
        ``(..., 3)`` degrees.
    """
    m = torch.as_tensor(matrix).transpose(-1, -2)  # active R = Rz(rot) Ry(tilt) Rz(psi)
    cos_tilt = m[..., 2, 2].clamp(-1.0, 1.0)
    tilt = torch.acos(cos_tilt)
    sin_tilt = torch.sqrt(m[..., 0, 2] ** 2 + m[..., 1, 2] ** 2)
    regular = sin_tilt > 1e-6
    rot = torch.atan2(m[..., 1, 2], m[..., 0, 2])
    psi = torch.atan2(m[..., 2, 1], -m[..., 2, 0])
    # Gimbal lock: R = Rz(rot + psi) (tilt 0) or Rz(rot - psi) Ry(pi) (tilt 180); put it all in rot.
    rot_lock = torch.atan2(m[..., 1, 0], m[..., 0, 0])
    rot_lock = torch.where(cos_tilt > 0, rot_lock, torch.atan2(-m[..., 1, 0], -m[..., 0, 0]))
    rot = torch.where(regular, rot, rot_lock)
    psi = torch.where(regular, psi, torch.zeros_like(psi))
    return torch.rad2deg(torch.stack([rot, tilt, psi], dim=-1))

import math

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from gmmrefine.geometry.rotations import (
    axis_angle_to_matrix,
    euler_to_matrix,
    matrix_to_axis_angle,
    matrix_to_euler,
    project_points,
    random_rotations,
    rotation_angle_deg,
    slice_frequencies,
)


def _random_euler(n, seed=0):
    g = np.random.default_rng(seed)
    return torch.tensor(np.stack([g.uniform(-180, 180, n), g.uniform(0, 180, n), g.uniform(-180, 180, n)], 1))


def test_euler_matches_scipy_relion_definition():
    a = _random_euler(500)
    ours = euler_to_matrix(a)
    ref = torch.tensor(np.stack([Rotation.from_euler("ZYZ", x, degrees=True).as_matrix().T for x in a.numpy()]))
    assert (ours - ref).abs().max() < 1e-12


def test_euler_round_trip_including_gimbal_lock():
    a = _random_euler(500, seed=1)
    a[:5, 1] = 0.0
    a[5:10, 1] = 180.0
    m = euler_to_matrix(a)
    back = euler_to_matrix(matrix_to_euler(m))
    assert (back - m).abs().max() < 1e-10
    regular = (a[:, 1] > 1) & (a[:, 1] < 179)
    assert (matrix_to_euler(m)[regular] - a[regular]).abs().max() < 1e-8


def test_axis_angle_round_trip_and_geodesic_angle():
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(200, 3, generator=g, dtype=torch.float64)
    angle = torch.rand(200, 1, generator=g, dtype=torch.float64) * 3.0
    v = axis / axis.norm(dim=-1, keepdim=True) * angle
    m = axis_angle_to_matrix(v)
    assert (matrix_to_axis_angle(m) - v).abs().max() < 1e-10
    eye = torch.eye(3, dtype=torch.float64)
    assert (rotation_angle_deg(m, eye) - torch.rad2deg(angle[:, 0])).abs().max() < 1e-9


def test_axis_angle_gradient_at_zero():
    v = torch.zeros(3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(axis_angle_to_matrix, (v,))


def test_slice_and_projection_are_adjoint():
    # A point at r projects to (A r)_xy; its transform exp(-2 pi i k3.r) on the slice A^T (k,0)
    # must equal the 2D transform exp(-2 pi i k.(A r)_xy) of the projected point.
    m = random_rotations(8, torch.Generator().manual_seed(3))
    r = torch.randn(5, 3, dtype=torch.float64)
    k2 = torch.randn(7, 2, dtype=torch.float64)
    k3 = slice_frequencies(k2, m)  # (8, 7, 3)
    p = project_points(r, m)[..., :2]  # (8, 5, 2)
    lhs = k3 @ r.T
    rhs = k2 @ p.transpose(-1, -2)
    assert (lhs - rhs).abs().max() < 1e-12


def test_random_rotations_are_proper():
    m = random_rotations(100, torch.Generator().manual_seed(0))
    assert (m @ m.transpose(-1, -2) - torch.eye(3, dtype=m.dtype)).abs().max() < 1e-12
    assert (torch.det(m) - 1).abs().max() < 1e-12


def test_rotation_angle_resolves_small_angles_in_float32():
    """acos of the trace could not resolve angles below ~0.03 degree in float32; equal matrices give 0."""
    from gmmrefine.geometry.rotations import axis_angle_to_matrix, random_rotations, rotation_angle_deg

    base = random_rotations(50, torch.Generator().manual_seed(4)).float()
    assert float(rotation_angle_deg(base, base).abs().max()) == 0.0
    for angle_deg in (1e-3, 0.01, 1.0, 179.0):
        turn = axis_angle_to_matrix(torch.tensor([[0.0, 0.6, 0.8]]) * math.radians(angle_deg))
        got = rotation_angle_deg(turn.float() @ base, base)
        assert float((got - angle_deg).abs().max()) < max(2e-4, 1e-5 * angle_deg), (angle_deg, got)

"""Point groups: group structure, map symmetrisation and symmetry expansion against RELION."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.project import project_map
from gmmrefine.geometry.rotations import euler_to_matrix, random_rotations, rotation_angle_deg
from gmmrefine.geometry.symmetry import expand_poses, rotate_map, symmetrize_map, symmetry_operators

ORDERS = {"C1": 1, "C3": 3, "C7": 7, "D2": 4, "D5": 10, "T": 12, "O": 24, "I": 60, "I1": 60, "I3": 60, "I4": 60}


def _contains(ops: torch.Tensor, m: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """For each m[i], whether it equals one of ops."""
    return ((ops[None] - m[:, None]).abs().amax(dim=(-2, -1)) < tol).any(dim=1)


@pytest.mark.parametrize("name", list(ORDERS))
def test_operators_form_a_rotation_group(name):
    ops = symmetry_operators(name)
    k = ops.shape[0]
    assert k == ORDERS[name]
    eye = torch.eye(3, dtype=torch.float64)
    assert (ops[0] - eye).abs().max() == 0  # identity first
    assert (ops @ ops.transpose(-1, -2) - eye).abs().max() < 1e-6
    assert (torch.linalg.det(ops) - 1).abs().max() < 1e-6
    products = (ops[:, None] @ ops[None]).reshape(-1, 3, 3)
    assert bool(_contains(ops, products).all())  # closure
    assert bool(_contains(ops, ops.transpose(-1, -2)).all())  # inverses
    distinct = rotation_angle_deg(ops[:, None], ops[None]) + 1e3 * torch.eye(k, dtype=torch.float64)
    assert distinct.min() > 1.0  # no operator listed twice


def test_axes_follow_relion():
    c4 = symmetry_operators("C4")
    z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    assert (c4 @ z - z).abs().max() < 1e-12  # C<n> about z
    d2 = symmetry_operators("D2")
    x = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    assert bool(((d2 @ x - x).norm(dim=-1) < 1e-9).sum() == 2)  # D<n>: the 2-fold lies on x
    ico = symmetry_operators("I")
    assert torch.equal(ico, symmetry_operators("I2"))  # RELION's default I is I2
    five_fold = torch.tensor([0.525731114, 0.0, 0.850650807], dtype=torch.float64)
    five_fold = five_fold / five_fold.norm()
    assert bool(((ico @ five_fold - five_fold).norm(dim=-1) < 1e-6).sum() == 5)


@pytest.mark.parametrize("bad", ["X3", "C0", "D", "", "I5", "C123", "CX"])
def test_bad_names_raise_input_error(bad):
    with pytest.raises(InputError):
        symmetry_operators(bad)
    with pytest.raises(InputError):
        expand_poses(torch.eye(3)[None], bad)


def _blob_map(box: int, centres, sigma: float = 2.5) -> torch.Tensor:
    c = torch.arange(box, dtype=torch.float64) - box // 2
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    vol = torch.zeros(box, box, box, dtype=torch.float64)
    for i, (cx, cy, cz) in enumerate(centres):
        vol += (1 + 0.3 * i) * torch.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol


def test_rotate_map_moves_content_by_the_matrix():
    vol = _blob_map(32, [(6.0, 0.0, 0.0)])
    rz90 = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    out = rotate_map(vol, rz90)
    expected = _blob_map(32, [(0.0, 6.0, 0.0)])  # x axis goes to y
    assert (out - expected).abs().max() < 1e-8  # exact but for the one box face with no source voxel


@pytest.mark.parametrize("name", ["C4", "D4", "O"])
def test_symmetrized_map_is_invariant_for_grid_aligned_groups(name):
    # These operators permute voxels exactly, so invariance holds to rounding.
    vol = _blob_map(32, [(5.0, -3.0, 2.0), (-2.0, 6.0, -4.0), (1.0, 1.0, 7.0)])
    sym = symmetrize_map(vol, name)
    for op in symmetry_operators(name):
        assert (rotate_map(sym, op) - sym).abs().max() < 1e-4 * sym.abs().max()
    assert (sym - vol).abs().max() > 0.1 * vol.abs().max()  # it did change the asymmetric input


@pytest.mark.parametrize("name", ["C3", "D3", "T", "I"])
def test_symmetrized_map_is_invariant_up_to_interpolation(name):
    # Off-grid operators resample (order-5 B-spline); inside the particle the error stays ~1e-4 of the
    # peak, while a rotation outside the group changes the map by far more.
    vol = _blob_map(32, [(5.0, -3.0, 2.0), (-2.0, 6.0, -4.0), (1.0, 1.0, 7.0)])
    sym = symmetrize_map(vol, name)
    c = torch.arange(32, dtype=torch.float64) - 16
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    inside = x**2 + y**2 + z**2 < 12**2  # away from the box, where rotated copies are truncated
    peak = sym.abs().max()
    errors = torch.stack([(rotate_map(sym, op) - sym).abs()[inside].max() for op in symmetry_operators(name)[1:]])
    assert errors.max() < 1e-3 * peak, errors / peak
    outside = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.2], [0.3, 0.0, -0.1], [-0.2, 0.1, 0.0]],
                                                   dtype=torch.float64))
    assert (rotate_map(sym, outside) - sym).abs()[inside].max() > 20 * errors.max()
    assert (sym - vol).abs().max() > 0.1 * vol.abs().max()


def test_rotate_map_is_accurate_off_grid():
    centres = torch.tensor([(5.0, -3.0, 2.0), (-2.0, 6.0, -4.0), (1.0, 1.0, 7.0)], dtype=torch.float64)
    vol = _blob_map(32, centres.tolist())
    c = torch.arange(32, dtype=torch.float64) - 16
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    inside = x**2 + y**2 + z**2 < 12**2
    for rot in random_rotations(2, torch.Generator().manual_seed(1)):
        expected = _blob_map(32, (centres @ rot.T).tolist())  # blob at c moves to R c
        err = (rotate_map(vol, rot) - expected).abs()[inside].max() / expected.abs().max()
        assert err < 3e-4, err


def test_expand_poses_layout():
    a = random_rotations(5, torch.Generator().manual_seed(0))
    ops = symmetry_operators("D3")
    out = expand_poses(a, "D3")
    assert out.shape == (30, 3, 3)
    assert (out.reshape(5, 6, 3, 3)[:, 0] - a).abs().max() < 1e-12  # operator 0 is the input pose
    assert (out[1 * 6 + 4] - a[1] @ ops[4]).abs().max() < 1e-12  # row n*K + k = A_n @ R_k


@pytest.mark.parametrize("name", ["C3", "D2"])
def test_expanded_poses_project_a_symmetric_map_identically(name):
    # The point of A @ R_k: every expanded pose of a symmetric map shows the same image.
    vol = symmetrize_map(_blob_map(32, [(5.0, -3.0, 2.0), (-2.0, 6.0, -4.0), (1.0, 1.0, 7.0)]), name).float()
    poses = random_rotations(3, torch.Generator().manual_seed(4)).float()
    k = symmetry_operators(name).shape[0]
    images = project_map(vol, expand_poses(poses, name)).reshape(3, k, 32, 32)
    spread = (images - images[:, :1]).abs().amax(dim=(1, 2, 3))
    assert spread.max() < 0.015 * images.abs().max(), spread  # projector interpolation differs per pose
    left = project_map(vol, (symmetry_operators(name)[None].float() @ poses[:, None]).reshape(-1, 3, 3))
    left_spread = (left.reshape(3, k, 32, 32) - images[:, :1]).abs().amax(dim=(1, 2, 3))
    assert left_spread.max() > 0.1 * images.abs().max()  # R_k @ A (the other order) is not a symmetry view


def _write_particles(path, angles):
    lines = ["", "data_optics", "", "loop_", "_rlnOpticsGroup #1", "_rlnOpticsGroupName #2",
             "_rlnImagePixelSize #3", "_rlnImageSize #4", "_rlnVoltage #5", "_rlnSphericalAberration #6",
             "_rlnAmplitudeContrast #7", "_rlnImageDimensionality #8", "1 opticsGroup1 1.5 64 300 2.7 0.1 2",
             "", "", "data_particles", "", "loop_", "_rlnImageName #1", "_rlnAngleRot #2", "_rlnAngleTilt #3",
             "_rlnAnglePsi #4", "_rlnOriginXAngst #5", "_rlnOriginYAngst #6", "_rlnOpticsGroup #7"]
    for i, (rot, tilt, psi) in enumerate(angles):
        lines.append(f"{i + 1:06d}@particles.mrcs {rot:.6f} {tilt:.6f} {psi:.6f} 1.5 -3.0 1")
    path.write_text("\n".join(lines) + "\n")


def _read_angles(path):
    rows = [line.split() for line in path.read_text().splitlines() if "@particles.mrcs" in line]
    return np.array([[float(v) for v in r[1:4]] for r in rows])


@pytest.mark.relion
@pytest.mark.parametrize("name", ["C3", "D2", "I"])
def test_expand_poses_matches_relion_particle_symmetry_expand(tmp_path, name):
    g = np.random.default_rng(7)
    angles = np.stack([g.uniform(-180, 180, 6), g.uniform(0, 180, 6), g.uniform(-180, 180, 6)], 1)
    angles[0] = (0.0, 0.0, 0.0)  # identity pose: RELION's output is its operator list
    angles[1, 1] = 180.0
    _write_particles(tmp_path / "in.star", angles)
    subprocess.run(["relion_particle_symmetry_expand", "--i", "in.star", "--o", "out.star", "--sym", name],
                   cwd=tmp_path, check=True, capture_output=True)
    relion = euler_to_matrix(torch.tensor(_read_angles(tmp_path / "out.star")))
    ours = expand_poses(euler_to_matrix(torch.tensor(angles)), name)
    assert relion.shape == ours.shape
    # same operators, same order, composed on the right: A_n @ R_k (RELION writes 6 decimals)
    assert rotation_angle_deg(ours, relion).max() < 1e-3

"""Densities and projections of atomic models, motions, pose perturbation."""

import numpy as np
import pytest
import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.fsc import fourier_ring_correlation
from gmmrefine.geometry.rotations import euler_to_matrix, random_rotations, rotation_angle_deg
from gmmrefine.io.models import read_atoms
from gmmrefine.simulate.density import (
    atoms_to_map,
    atoms_to_projection,
    center_of_mass,
    form_factor,
    heavy_atom_groups,
)
from gmmrefine.simulate.motion import domain_pivot, hinge, hinge_rotations, morph, superpose
from gmmrefine.simulate.particles import perturb_poses, random_half_sets


@pytest.fixture(scope="module")
def adk(adk_open_pdb):
    atoms = read_atoms(adk_open_pdb)
    heavy = ~atoms.is_hydrogen
    return atoms.coords_A[heavy], [e for e, h in zip(atoms.elements, heavy) if h]


def test_single_atom_lands_where_the_conventions_say():
    # One carbon at x=+6, y=-3, z=+4.5 A; 1.5 A/px, centre at voxel 32: voxel (x, y, z) = (36, 30, 35).
    xyz = np.array([[6.0, -3.0, 4.5]])
    vol = atoms_to_map(xyz, 64, 1.5, elements=["C"], center_A=np.zeros(3))
    assert np.unravel_index(int(vol.argmax()), vol.shape) == (35, 30, 36)  # [z, y, x]
    # Seen at RELION matrix A the atom is at (A r)[:2] / apix, then moved by the translation (+x, +y px).
    angles = torch.tensor([[30.0, 70.0, -40.0]], dtype=torch.float64)
    mat = euler_to_matrix(angles)
    shift = torch.tensor([[3.0, -2.0]], dtype=torch.float64)
    img = atoms_to_projection(xyz, mat, 64, 1.5, shift, elements=["C"], center_A=np.zeros(3))[0]
    expect = (mat[0] @ torch.tensor(xyz[0]))[:2] / 1.5 + shift[0]
    row, col = np.unravel_index(int(img.argmax()), img.shape)
    assert abs(col - 32 - float(expect[0])) <= 0.5 and abs(row - 32 - float(expect[1])) <= 0.5


def test_map_scale_and_projection_along_z_are_exact(adk):
    xyz, elements = adk
    apix, box = 1.5, 64
    vol = atoms_to_map(xyz, box, apix, elements=elements)
    # Sum of voxels = the k = 0 coefficient = sum of the atoms' scattering factors at s = 0 / apix^3.
    f0 = {s: float(form_factor(s, torch.zeros(()), 0.0)) for s in set(elements)}
    expected = sum(f0[e] for e in elements) / apix**3
    assert float(vol.to(torch.float64).sum()) == pytest.approx(expected, rel=1e-4)
    # The identity projection is the sum along z of the map (same Fourier coefficients, same mask).
    proj = atoms_to_projection(xyz, torch.eye(3, dtype=torch.float64)[None], box, apix, elements=elements)[0]
    assert float((proj - vol.sum(0)).abs().max()) < 1e-4 * float(proj.abs().max())
    # The model's centre of mass sits at the box centre.
    grid = torch.arange(box, dtype=torch.float64) - box // 2
    mass = vol.to(torch.float64).clamp_min(0)
    com = [float((mass.sum(dim=tuple(d for d in range(3) if d != a)) * grid).sum() / mass.sum()) for a in range(3)]
    assert max(abs(c) for c in com) < 0.5  # pixels (z, y, x); scattering and mass weights differ slightly


def test_projection_matches_project_map_of_the_map(adk):
    from gmmrefine.fourier.project import project_map

    xyz, elements = adk
    apix, box = 1.5, 64
    vol = atoms_to_map(xyz, box, apix, elements=elements)
    mats = random_rotations(8, torch.Generator().manual_seed(3))
    shift = torch.randn(8, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 2
    direct = atoms_to_projection(xyz, mats, box, apix, shift, elements=elements)
    via_map = project_map(vol, mats.to(torch.float32), shift_px=shift.to(torch.float32))
    a = direct - direct.mean(dim=(-2, -1), keepdim=True)
    b = via_map - via_map.mean(dim=(-2, -1), keepdim=True)
    corr = (a * b).sum(dim=(-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))
    assert float(corr.min()) >= 0.99
    scale = float((a * b).sum() / (b * b).sum())
    assert scale == pytest.approx(1.0, abs=0.05)


def test_per_particle_conformations_project_like_single_models(adk):
    xyz, elements = adk
    mats = random_rotations(3, torch.Generator().manual_seed(0))
    confs = torch.stack([torch.as_tensor(xyz) + torch.tensor([d, 0.0, 0.0]) for d in (0.0, 1.5, -3.0)])
    center = center_of_mass(xyz, elements)
    batched = atoms_to_projection(confs, mats, 48, 2.0, elements=elements, center_A=center)
    single = torch.cat([atoms_to_projection(confs[i], mats[i:i + 1], 48, 2.0, elements=elements, center_A=center)
                        for i in range(3)])
    assert float((batched - single).abs().max()) < 1e-5 * float(single.abs().max())
    # A 1.5 A shift of the model along x is not the same image as the model itself.
    assert float(fourier_ring_correlation(batched[0], batched[1])[8:20].mean()) < 0.95


def test_hydrogens_are_ignored_and_unknown_elements_rejected():
    xyz = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    with_h = atoms_to_map(xyz, 32, 1.0, elements=["C", "H"], center_A=np.zeros(3))
    without = atoms_to_map(xyz[:1], 32, 1.0, elements=["C"], center_A=np.zeros(3))
    assert torch.equal(with_h, without)
    assert list(heavy_atom_groups(["C", "H", "N", "C"], 4)) == ["C", "N"]
    with pytest.raises(InputError, match="Xq"):
        heavy_atom_groups(["C", "Xq"], 2)


def test_morph_and_superpose(adk_open_pdb, adk_closed_pdb):
    a = read_atoms(adk_open_pdb).coords_A
    b = read_atoms(adk_closed_pdb).coords_A
    fit = superpose(b, a)
    rmsd = lambda x, y: float(np.sqrt(((x - y) ** 2).sum(1).mean()))  # noqa: E731
    assert rmsd(fit, a) < rmsd(b, a)
    # Superposition is rigid: internal distances unchanged.
    assert np.allclose(np.linalg.norm(fit[:50, None] - fit[None, :50], axis=-1),
                       np.linalg.norm(b[:50, None] - b[None, :50], axis=-1), atol=1e-9)
    t = torch.tensor([0.0, 0.25, 1.0])
    m = morph(a, fit, t).numpy()
    assert np.array_equal(m[0], a) and np.allclose(m[2], fit)
    assert np.allclose(m[1], 0.75 * a + 0.25 * fit)


def test_hinge_moves_only_the_domain_rigidly(adk):
    xyz, _ = adk
    mask = np.zeros(len(xyz), dtype=bool)
    mask[200:450] = True
    pivot = domain_pivot(xyz, mask)
    # The pivot is where the domain meets the rest: close to both.
    assert np.linalg.norm(xyz[mask] - pivot, axis=1).min() < 6 and np.linalg.norm(xyz[~mask] - pivot, axis=1).min() < 6
    angles = torch.tensor([-8.0, 0.0, 5.0], dtype=torch.float64)
    rot = hinge_rotations(np.array([0.0, 1.0, 1.0]), angles)
    conf = hinge(xyz, mask, pivot, rot).numpy()
    assert np.array_equal(conf[:, ~mask], np.broadcast_to(xyz[~mask], conf[:, ~mask].shape))
    assert np.allclose(conf[1], xyz)
    moved = conf[0, mask]
    d_before = np.linalg.norm(xyz[mask][:, None] - xyz[mask][None], axis=-1)
    d_after = np.linalg.norm(moved[:, None] - moved[None], axis=-1)
    assert np.allclose(d_before, d_after, atol=1e-9)
    ang = rotation_angle_deg(rot, torch.eye(3, dtype=torch.float64)).numpy()
    assert np.allclose(ang, [8.0, 0.0, 5.0], atol=1e-6)


def test_perturbed_poses_move_by_exactly_the_requested_amounts():
    n = 500
    angles = (torch.rand(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64).numpy()
              * [360, 180, 360] - [180, 0, 180])
    shift = np.random.default_rng(0).normal(0, 3, (n, 2))
    new_angles, new_shift = perturb_poses(angles, shift, 4.0, 1.0, seed=7)
    diff = rotation_angle_deg(euler_to_matrix(torch.as_tensor(new_angles)), euler_to_matrix(torch.as_tensor(angles)))
    assert float((diff - 4.0).abs().max()) < 1e-6
    assert np.allclose(np.linalg.norm(new_shift - shift, axis=1), 1.0)
    # Directions are random: the mean displacement is near zero.
    assert np.linalg.norm((new_shift - shift).mean(0)) < 0.15


def test_random_half_sets_are_balanced_and_seeded():
    s = random_half_sets(101, np.random.default_rng(5))
    assert (s == 1).sum() == 51 and (s == 2).sum() == 50
    assert np.array_equal(s, random_half_sets(101, np.random.default_rng(5)))
    assert not np.array_equal(s, random_half_sets(101, np.random.default_rng(6)))

"""Building GMMs from simulated adenylate kinase maps: FSC targets, warm start, bad input, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmmrefine.cli.main import main as cli_main
from gmmrefine.errors import InputError
from gmmrefine.fourier.filters import low_pass
from gmmrefine.fourier.fsc import shell_frequencies
from gmmrefine.gmm import GaussianMixture, build_gmm, map_gmm_fsc
from gmmrefine.io.models import read_atoms
from gmmrefine.simulate.density import atoms_to_map


def _adk_map(pdb, box, apix, resolution_A):
    """adk heavy atoms centred in the box, electron scattering density low-passed at the resolution.

    Returns the map and the atoms in the map frame (origin at voxel 0)."""
    atoms = read_atoms(pdb).heavy()
    center = (atoms.coords_A.max(0) + atoms.coords_A.min(0)) / 2
    vol = atoms_to_map(atoms.coords_A, box, apix, elements=atoms.elements, center_A=center)
    vol = low_pass(vol, resolution_A, apix)
    return vol, atoms.coords_A - center + (box // 2) * apix


def _fsc_floor(fsc, box, apix, resolution_A):
    """Lowest FSC over shells 1 .. the target resolution."""
    freqs = shell_frequencies(box, apix)
    upto = freqs <= 1.0 / resolution_A + 1e-9
    upto[0] = False
    return float(torch.as_tensor(fsc)[upto].min())


def test_kmeans_gmm_from_4A_map_reaches_fsc_09(adk_open_pdb):
    box, apix, res = 48, 1.5, 4.0
    vol, _ = _adk_map(adk_open_pdb, box, apix, res)
    gmm, info = build_gmm(vol, apix, res, seed=0)
    print(f"4 A k-means build: N={info['n']} fit {info['fit_seconds']:.1f} s")
    assert info["seeding"] == "k-means" and 500 < info["n"] < 3000
    assert _fsc_floor(info["fsc"], box, apix, res) >= 0.9
    # info's FSC is the real one (render on the map's grid).
    assert np.allclose(map_gmm_fsc(gmm, vol, apix).numpy(), info["fsc"], atol=1e-6)


def test_atom_seeded_gmm_from_3A_map_reaches_fsc_09_at_3_3A(adk_open_pdb):
    box, apix, res = 64, 1.0, 3.0
    vol, atoms_map_frame = _adk_map(adk_open_pdb, box, apix, res)
    gmm, info = build_gmm(vol, apix, res, model_atoms=atoms_map_frame, seed=0, steps=80)
    print(f"3 A atom-seeded build: N={info['n']} fit {info['fit_seconds']:.1f} s")
    assert info["n"] == len(atoms_map_frame) == 1656 and info["seeding"] == "model atoms"
    assert _fsc_floor(info["fsc"], box, apix, 3.3) >= 0.9


def test_warm_start_keeps_a_good_fit_and_mask_restricts_seeds(adk_open_pdb):
    box, apix, res = 32, 2.5, 8.0
    vol, _ = _adk_map(adk_open_pdb, box, apix, res)
    gmm, info = build_gmm(vol, apix, res, n=150, steps=60)
    floor = _fsc_floor(info["fsc"], box, apix, res)
    again, info2 = build_gmm(vol, apix, res, init=gmm, steps=20)
    assert info2["seeding"] == "warm start" and again.n == gmm.n
    assert _fsc_floor(info2["fsc"], box, apix, res) >= min(floor, 0.95) - 0.01
    half = torch.zeros_like(vol)
    half[:, :, : box // 2] = 1.0  # x < 0
    masked, _ = build_gmm(vol, apix, res, n=50, mask=half, steps=0)
    assert float(masked.centers_A[:, 0].max()) < 0.0


def test_bad_input_raises_one_clear_error(adk_open_pdb):
    vol, _ = _adk_map(adk_open_pdb, 32, 2.5, 8.0)
    with pytest.raises(InputError, match="cubic"):
        build_gmm(vol[:, :, :30], 2.5, 8.0, n=10)
    with pytest.raises(InputError, match="voxels lie above"):
        build_gmm(vol, 2.5, 8.0, n=32**3)
    with pytest.raises(InputError, match="no non-hydrogen atoms"):
        build_gmm(vol, 2.5, 8.0, model_atoms=np.zeros((0, 3)))
    bad = vol.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        build_gmm(bad, 2.5, 8.0, n=10)


def test_cli_build_gmm(tmp_path, adk_open_pdb, capsys):
    from gmmrefine.io.mrc import write_map

    box, apix, res = 32, 2.5, 8.0
    vol, _ = _adk_map(adk_open_pdb, box, apix, res)
    write_map(tmp_path / "m.mrc", vol.numpy(), apix)
    out = tmp_path / "g.npz"
    rc = cli_main(["build-gmm", "--map", str(tmp_path / "m.mrc"), "--resolution", "8", "--n", "150",
                   "--steps", "60", "--out", str(out), "--pdb", str(tmp_path / "g.pdb")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "map-GMM FSC >= 0.9 out to" in text
    gmm = GaussianMixture.load(out)
    assert gmm.n == 150 and (tmp_path / "g_fsc.png").stat().st_size > 1000 and (tmp_path / "g.pdb").exists()
    # Bad input: exit code 2, one line on stderr, nothing written.
    np_bad = np.zeros((32, 32, 30), dtype=np.float32)
    write_map(tmp_path / "bad.mrc", np_bad, apix)
    rc = cli_main(["build-gmm", "--map", str(tmp_path / "bad.mrc"), "--resolution", "8",
                   "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert rc == 2 and "cubic" in err and "Traceback" not in err and not (tmp_path / "x.npz").exists()
    rc = cli_main(["build-gmm", "--map", str(tmp_path / "m.mrc"), "--resolution", "8", "--n", "100000",
                   "--out", str(tmp_path / "y.npz")])
    assert rc == 2 and "voxels lie above" in capsys.readouterr().err and not (tmp_path / "y.npz").exists()


def test_estimated_number_of_gaussians_never_exceeds_the_voxels_to_seed_from():
    # Sparse bright voxels far apart: k-means spacing >> the target spacing, so the correction of the
    # first estimate asks for far more Gaussians than there are voxels (it used to raise).
    vol = torch.zeros(16, 16, 16)
    idx = torch.arange(0, 16, 4)
    vol[idx[:, None, None], idx[None, :, None], idx[None, None, :]] = 1.0
    from gmmrefine.gmm.build import build_gmm, count_seed_voxels

    count = count_seed_voxels(vol)
    assert count == 64
    gmm, info = build_gmm(vol, 1.0, 2.0, seed=0, steps=5)
    assert gmm.n == count and info["seeding"] == "k-means"


def test_noisy_map_in_a_large_box_seeds_near_the_molecule_and_fits_in_a_cropped_box(adk_open_pdb, monkeypatch):
    """A half map's solvent noise does not get Gaussians, and fitting in the molecule's box loses nothing."""
    import gmmrefine.gmm.build as build

    box, apix, res = 96, 1.5, 5.0
    clean, atoms = _adk_map(adk_open_pdb, box, apix, res)
    gen = torch.Generator().manual_seed(1)
    noisy = clean + low_pass(torch.randn(box, box, box, generator=gen), res, apix) * (2.0 * float(clean.std()))
    extent_A = float(np.abs(atoms - (box // 2) * apix).max())
    gmm, info = build_gmm(noisy, apix, res, seed=0)
    outside = (gmm.centers_A.abs().amax(-1) > extent_A + res).float().mean()
    print(f"N={info['n']} fit box {info['fit_box']} of {box}, {float(outside):.3%} beyond the molecule")
    assert float(outside) <= 0.01
    assert info["fit_box"] <= 0.75 * box
    truth_cropped = _fsc_floor(map_gmm_fsc(gmm, clean, apix), box, apix, 8.0)
    # the same start fitted in the whole box
    monkeypatch.setattr(build, "fit_box", lambda volume, *args, **kwargs: volume.shape[-1])
    whole, info_whole = build_gmm(noisy, apix, res, seed=0)
    assert info_whole["fit_box"] == box
    truth_whole = _fsc_floor(map_gmm_fsc(whole, clean, apix), box, apix, 8.0)
    print(f"FSC to the noise-free map (lowest to 8 A): cropped {truth_cropped:.3f}, whole box {truth_whole:.3f}")
    assert truth_cropped >= truth_whole - 0.01


def test_every_half_gmm_after_the_first_takes_a_third_of_the_steps(adk_open_pdb, monkeypatch):
    """refine's first fit takes every step; a warm start and a refit after N grew take a third
    (``WARM_STEP_FRACTION``), the refit seeded afresh by k-means at the band's N, from weighted random
    voxels (``REFIT_KMEANS_INIT``) where the first fit starts k-means++."""
    import gmmrefine.gmm.build as build
    from gmmrefine.gmm.build import REFERENCE_SPACING_FRACTION, estimate_n
    from gmmrefine.refine.global_refine import build_half_gmm

    starts = []
    original = build.seed_kmeans

    def counted(*args, **kwargs):
        starts.append(kwargs["init"])
        return original(*args, **kwargs)

    monkeypatch.setattr(build, "seed_kmeans", counted)
    vol, _ = _adk_map(adk_open_pdb, 48, 2.0, 6.0)
    target = estimate_n(vol, 2.0, 6.0, spacing_fraction=REFERENCE_SPACING_FRACTION)
    first, info = build_half_gmm(vol, 2.0, 6.0, init=None, seed=0, steps=9)
    assert (info["steps"], info["seeding"], first.n) == (9, "k-means", target)
    warm, info = build_half_gmm(vol, 2.0, 6.0, init=first, seed=0, steps=9)
    assert (info["steps"], info["seeding"], warm.n) == (3, "warm start", target)
    few = GaussianMixture(first.centers_A[: target // 2], first.amplitudes[: target // 2], first.widths_A[: target // 2])
    refit, info = build_half_gmm(vol, 2.0, 6.0, init=few, seed=0, steps=9)
    assert (info["steps"], info["seeding"], refit.n) == (3, "k-means", target)
    assert starts == ["k-means++", "random"]


@pytest.mark.usefixtures("kernels")
# (20, 1.0, 2.5): K = 8 exactly, so the last group's planes hold no pixel inside the sphere (no sub-band)
@pytest.mark.parametrize("box, apix, maxres", [(40, 1.5, 3.4), (20, 1.0, 2.5)])
def test_plane_groups_compute_the_transform_the_whole_band_gives_inside_the_sphere(monkeypatch, box, apix, maxres):
    """The GMM's 3D transform is computed per group of kz planes on the 2D band each group needs; inside
    the sphere it must equal the transform of every plane on the whole band (PLANE_GROUPS = 1), and the
    loss and its gradients with it (on both CPU paths: the compiled kernels and the torch code CUDA runs)."""
    import gmmrefine.gmm.build as build

    g = torch.Generator().manual_seed(3)
    n = 300
    centers = ((torch.rand(n, 3, generator=g) - 0.5) * 30).requires_grad_(True)
    amps = (0.5 + torch.rand(n, generator=g)).requires_grad_(True)
    widths = (1.0 + torch.rand(n, generator=g)).requires_grad_(True)
    results = []
    for groups in (build.PLANE_GROUPS, 1):
        monkeypatch.setattr(build, "PLANE_GROUPS", groups)
        samples = build.fourier_samples_3d(box, apix, maxres)
        spec = build.gmm_spectrum_3d(centers, amps, widths, samples)
        loss = (spec.abs() ** 2 * samples.inside).sum()
        grads = torch.autograd.grad(loss, (centers, amps, widths))
        pixels = sum(sub.n_pixels * kz.shape[0] for kz, sub, _ in samples.groups if sub is not None)
        results.append((spec.detach(), loss.detach(), grads, pixels, len(samples.groups)))
    (spec, loss, grads, pixels, count), (spec1, loss1, grads1, pixels1, count1) = results
    assert (count, count1) == (8, 1) and spec.shape == spec1.shape
    inside = samples.inside
    torch.testing.assert_close(spec[inside], spec1[inside], rtol=1e-5, atol=1e-5 * float(spec1.abs().max()))
    torch.testing.assert_close(loss, loss1, rtol=1e-5, atol=0)
    for a, b in zip(grads, grads1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
    assert pixels < 0.8 * pixels1   # the work: 2D pixels computed over all non-negative kz planes

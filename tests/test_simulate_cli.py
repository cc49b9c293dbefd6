"""``gmmrefine simulate`` end to end: files, truth columns, SNR, perturbation, bad input, RELION cross-check."""

import json
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
import torch

from gmmrefine.cli.main import main
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
from gmmrefine.io.star import read_star

BOX, APIX = 64, 1.5


def _simulate(model, out, *extra):
    argv = ["simulate", "--model", str(model), "--box", str(BOX), "--apix", str(APIX), "--out", str(out), *extra]
    assert main(argv) == 0
    return out


def _particles(path):
    return read_star(path)["particles"]


def _matrices(df):
    return euler_to_matrix(torch.tensor(df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()))


@pytest.mark.relion
def test_relion_reconstruct_of_simulated_data_matches_truth_map(adk_open_pdb, tmp_path):
    out = _simulate(adk_open_pdb, tmp_path / "sim", "--n", "1000", "--snr", "1.0", "--seed", "3")
    subprocess.run(["relion_reconstruct", "--i", "particles.star", "--o", "rec.mrc", "--ctf"], cwd=out, check=True,
                   capture_output=True)
    rec = torch.tensor(mrcfile.read(out / "rec.mrc"))
    truth = torch.tensor(mrcfile.read(out / "truth_map.mrc"))
    fsc = fourier_shell_correlation(rec, truth)
    assert float(fsc[1:BOX // 4 + 1].min()) >= 0.9, fsc.numpy().round(3)
    # Same scale: RELION's map of our images has the amplitude of our map.
    scale = float((rec * truth).sum() / (truth * truth).sum())
    assert 0.8 < scale < 1.2


def test_morph_data_truth_columns_snr_and_perturbation(adk_open_pdb, adk_closed_pdb, tmp_path):
    common = ["--model2", str(adk_closed_pdb), "--n", "240", "--seed", "5", "--chunk", "100"]
    noisy = _simulate(adk_open_pdb, tmp_path / "noisy", *common, "--snr", "0.05", "--perturb-deg", "4",
                      "--perturb-A", "1")
    clean = _simulate(adk_open_pdb, tmp_path / "clean", *common, "--snr", "inf")
    for name in ("particles.mrcs", "particles.star", "truth.star", "truth_map.mrc", "particles_perturbed.star",
                 "simulation.json"):
        assert (noisy / name).is_file(), name
    assert not (clean / "particles_perturbed.star").exists()

    truth = _particles(noisy / "truth.star")
    frac = truth["gmmMorphFraction"].to_numpy()
    assert len(frac) == 240 and frac.min() >= 0 and frac.max() <= 1 and frac.min() < 0.05 and frac.max() > 0.95
    # particles.star and truth.star carry the same poses; the clean run drew the same truth.
    parts = _particles(noisy / "particles.star")
    assert "gmmMorphFraction" not in parts.columns
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU"):
        assert np.array_equal(parts[col].to_numpy(), truth[col].to_numpy())
        assert np.array_equal(parts[col].to_numpy(), _particles(clean / "particles.star")[col].to_numpy())
    assert set(parts["rlnRandomSubset"]) == {1, 2} and abs((parts["rlnRandomSubset"] == 1).sum() - 120) == 0

    pert = _particles(noisy / "particles_perturbed.star")
    diff = rotation_angle_deg(_matrices(pert), _matrices(parts))
    assert float((diff - 4.0).abs().max()) < 1e-4
    moved = pert[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() - parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy()
    assert np.allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-9)

    # SNR = mean per-image variance of the clean images / variance of the noise, within 10 %.
    clean_img = mrcfile.read(clean / "particles.mrcs").astype(np.float64)
    noisy_img = mrcfile.read(noisy / "particles.mrcs").astype(np.float64)
    snr = clean_img.var(axis=(1, 2)).mean() / (noisy_img - clean_img).var()
    assert snr == pytest.approx(0.05, rel=0.10)
    assert json.loads((noisy / "simulation.json").read_text())["snr"] == 0.05

    # The fraction says which conformation the images show: clean images of particles near t=1 correlate
    # better with model 2 than with model 1 at the true pose, and the other way round near t=0.
    from gmmrefine.fourier.ctf import ctf_for_box
    from gmmrefine.fourier.fft import irfft2_centered
    from gmmrefine.geometry.shifts import image_translation_px
    from gmmrefine.io.models import read_atoms
    from gmmrefine.io.particles import read_particles
    from gmmrefine.simulate.density import atoms_to_projection_rfft, center_of_mass
    from gmmrefine.simulate.motion import superpose

    ps = read_particles(clean / "particles.star")
    a1, a2 = read_atoms(adk_open_pdb), read_atoms(adk_closed_pdb)
    heavy = ~a1.is_hydrogen
    el = [e for e, h in zip(a1.elements, heavy) if h]
    x1 = a1.coords_A[heavy]
    x2 = superpose(a2.coords_A[heavy], x1)
    center = center_of_mass(x1, el)
    pick = np.concatenate([np.argsort(frac)[:10], np.argsort(frac)[-10:]])
    mats = euler_to_matrix(torch.tensor(ps.angles_deg[pick]))
    shift = image_translation_px(torch.tensor(ps.shift_A[pick]), APIX)
    ctf = ctf_for_box(BOX, APIX, **ps.ctf.as_tensors(pick))

    def corr(x):
        ref = irfft2_centered(atoms_to_projection_rfft(x, mats, BOX, APIX, shift, elements=el, center_A=center) * ctf, BOX)
        img = torch.tensor(clean_img[pick])
        ref, img = ref - ref.mean((-2, -1), keepdim=True), img - img.mean((-2, -1), keepdim=True)
        return ((ref * img).sum((-2, -1)) / (ref.norm(dim=(-2, -1)) * img.norm(dim=(-2, -1)))).numpy()

    c1, c2 = corr(x1), corr(x2)
    assert (c1[:10] > c2[:10]).all() and (c2[10:] > c1[10:]).all()
    assert c1[:10].min() > 0.98 and c2[10:].min() > 0.98


def test_hinge_truth_columns_describe_the_domain_rotation(adk_open_pdb, tmp_path):
    out = _simulate(adk_open_pdb, tmp_path / "hinge", "--n", "60", "--snr", "0.1", "--hinge-residues", "122-159",
                    "--hinge-deg", "8", "--seed", "2")
    truth = _particles(out / "truth.star")
    angle = truth["gmmDomainAngle"].to_numpy()
    assert np.abs(angle).max() <= 8 and np.abs(angle).max() > 6 and angle.min() < 0 < angle.max()
    rot = euler_to_matrix(torch.tensor(truth[["gmmDomainRot", "gmmDomainTilt", "gmmDomainPsi"]].to_numpy()))
    geodesic = rotation_angle_deg(rot, torch.eye(3, dtype=torch.float64)).numpy()
    assert np.allclose(geodesic, np.abs(angle), atol=1e-4)
    # One hinge axis for the data set: all rotation axes are parallel.
    from gmmrefine.geometry.rotations import matrix_to_axis_angle

    axes = matrix_to_axis_angle(rot).numpy()
    big = np.abs(angle) > 1
    unit = axes[big] / np.linalg.norm(axes[big], axis=1, keepdims=True)
    assert np.abs(np.abs(unit @ unit[0]) - 1).max() < 1e-6


@pytest.mark.parametrize("argv, words", [
    (["--model", "MISSING.pdb", "--box", "64"], "not found"),
    (["--model", "ADK", "--box", "32", "--apix", "1.0"], "box"),
    (["--model", "ADK", "--box", "64", "--hinge-residues", "500-600"], "no atoms in residues"),
    (["--model", "ADK", "--box", "64", "--defocus", "2.5-1.0"], "--defocus"),
    (["--model", "ADK", "--box", "64", "--snr", "-1"], "--snr"),
    (["--model", "ADK", "--box", "63"], "--box"),
])
def test_bad_input_exits_2_and_writes_nothing(adk_open_pdb, tmp_path, capsys, argv, words):
    out = tmp_path / "out"
    argv = [str(adk_open_pdb) if a == "ADK" else str(tmp_path / a) if a == "MISSING.pdb" else a for a in argv]
    assert main(["simulate", *argv, "--out", str(out), "--n", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_map_input_round_trip(adk_open_pdb, tmp_path):
    first = _simulate(adk_open_pdb, tmp_path / "a", "--n", "4", "--snr", "inf")
    out = tmp_path / "b"
    assert main(["simulate", "--map", str(first / "truth_map.mrc"), "--n", "16", "--snr", "inf",
                 "--out", str(out), "--seed", "0"]) == 0
    # Same seed, same poses and CTF: the map's projections match the model's images closely.
    from_model = _simulate(adk_open_pdb, tmp_path / "c", "--n", "16", "--snr", "inf", "--seed", "0")
    a = mrcfile.read(out / "particles.mrcs").astype(np.float64)
    b = mrcfile.read(from_model / "particles.mrcs").astype(np.float64)
    a, b = a - a.mean((1, 2), keepdims=True), b - b.mean((1, 2), keepdims=True)
    corr = (a * b).sum((1, 2)) / np.sqrt((a * a).sum((1, 2)) * (b * b).sum((1, 2)))
    assert corr.min() > 0.98
    shutil.rmtree(first)


def test_output_does_not_depend_on_the_chunk_size(adk_open_pdb, tmp_path):
    runs = []
    for chunk in ("7", "1000"):
        out = tmp_path / chunk
        assert main(["simulate", "--model", str(adk_open_pdb), "--box", "48", "--apix", "2", "--n", "30",
                     "--chunk", chunk, "--out", str(out)]) == 0
        runs.append(mrcfile.read(out / "particles.mrcs"))
    assert np.array_equal(runs[0], runs[1]) and np.abs(runs[0]).max() > 0


def test_symmetric_assembly_with_independently_hinged_copies(adk_open_pdb, tmp_path):
    from gmmrefine.fourier.masks import radius_grid
    from gmmrefine.geometry.symmetry import rotate_map, symmetry_operators
    from gmmrefine.refine.composite import symmetry_error

    out = tmp_path / "c3"
    assert main(["simulate", "--model", str(adk_open_pdb), "--box", "40", "--apix", "3.0", "--n", "20", "--snr",
                 "inf", "--sym", "C3", "--sym-offset-A", "20", "--hinge-residues", "1-110", "--hinge-deg", "20",
                 "--seed", "4", "--out", str(out)]) == 0
    truth = _particles(out / "truth.star")
    angles = truth[["gmmDomainAngle1", "gmmDomainAngle2", "gmmDomainAngle3"]].to_numpy()
    assert np.abs(angles).max() <= 20 and np.abs(angles).max() > 15
    # Each copy moves on its own: the copies' angles are not the same numbers.
    assert np.abs(angles[:, 0] - angles[:, 1]).mean() > 5 and np.abs(angles[:, 1] - angles[:, 2]).mean() > 5
    h2 = euler_to_matrix(torch.tensor(truth[["gmmDomainRot2", "gmmDomainTilt2", "gmmDomainPsi2"]].to_numpy()))
    assert np.allclose(rotation_angle_deg(h2, torch.eye(3, dtype=torch.float64)).numpy(), np.abs(angles[:, 1]),
                       atol=1e-4)
    vol = torch.tensor(mrcfile.read(out / "truth_map.mrc"))
    inner = radius_grid(40) < 16
    # The consensus (every domain at angle 0) is C3-symmetric to the accuracy of 120-degree resampling.
    assert symmetry_error(vol, "C3", inner, blur_px=1.5) < 1e-3
    assert symmetry_error(vol, "C2", inner, blur_px=1.5) > 0.1
    # domain_mask.mrc covers the first copy's domain only.
    mask = torch.tensor(mrcfile.read(out / "domain_mask.mrc"))
    assert float(mask.min()) >= 0 and float(mask.max()) == 1.0
    turned = rotate_map(mask, symmetry_operators("C3")[1])
    assert float((mask * turned).sum()) < 0.2 * float(mask.sum())

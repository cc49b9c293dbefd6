"""Reconstruction against relion_reconstruct / relion_postprocess on particles made by relion_project.

Particles: a map of Gaussians (box 48, 2 A/px), random poses, non-zero origins, astigmatic CTF and
white noise, projected by ``relion_project --ctf --add_noise``. Ours and RELION's reconstruct the same
STAR file; both are compared with each other and with the noise-free truth.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gmmrefine.fourier.filters import low_pass
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.fourier.masks import mask_from_map
from gmmrefine.fourier.postprocess import postprocess
from gmmrefine.geometry.symmetry import symmetrize_map
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.io.particles import CTFParams, new_particle_tables, read_particles
from gmmrefine.io.star import write_star
from gmmrefine.reconstruct.invert import accumulate_halves, reconstruct_halves, reconstruct_map, symmetry_matrices

pytestmark = pytest.mark.relion

BOX, APIX = 48, 2.0
SHELLS_08 = slice(1, int(0.8 * BOX // 2) + 1)


def gaussian_map(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * BOX * 0.5
    amps = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    ax = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    r = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij")[::-1], dim=-1)
    d2 = ((r[..., None, :] - centres) ** 2).sum(-1)
    return (amps * torch.exp(-d2 / 2.0)).sum(-1).to(torch.float32)


def simulate(folder: Path, truth: torch.Tensor, n: int, noise: float, seed: int) -> Path:
    """relion_project particles of ``truth``; returns the STAR file relion_project wrote."""
    from scipy.spatial.transform import Rotation

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    angles = Rotation.random(n, random_state=seed).as_euler("ZYZ", degrees=True)
    origins = rng.uniform(-6, 6, (n, 2))
    dfu = rng.uniform(8000, 25000, n)
    ctf = CTFParams(defocus_u_A=dfu, defocus_v_A=dfu - rng.uniform(0, 800, n),
                    defocus_angle_deg=rng.uniform(0, 180, n), voltage_kV=np.full(n, 300.0),
                    cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n),
                    bfactor_A2=np.zeros(n), scale=np.ones(n))
    subset = np.tile([1, 2], n // 2 + 1)[:n]
    names = np.array([f"{i + 1:06d}@none.mrcs" for i in range(n)])
    tables = new_particle_tables(names, angles, origins, ctf, subset, APIX, BOX)
    tables["particles"] = tables["particles"].drop(columns=["rlnImageName"])
    write_map(folder / "truth.mrc", truth.numpy(), APIX)
    write_star(folder / "in.star", tables)
    subprocess.run(["relion_project", "--i", str(folder / "truth.mrc"), "--ang", str(folder / "in.star"),
                    "--o", str(folder / "proj"), "--angpix", str(APIX), "--ctf", "--add_noise",
                    "--white_noise", str(noise)], check=True, capture_output=True)
    return folder / "proj.star"


def relion_reconstruct(star: Path, out: Path, *extra: str) -> torch.Tensor:
    subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(out), "--ctf", *extra],
                   check=True, capture_output=True)
    return torch.from_numpy(read_map(out)[0])


@pytest.fixture(scope="module")
def c1_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c1")
    truth = gaussian_map(60, seed=0)
    star = simulate(folder, truth, 600, noise=1.0, seed=1)
    return folder, star, truth


def test_matches_relion_reconstruct_and_truth(c1_data):
    folder, star, truth = c1_data
    ps = read_particles(star)
    accs = accumulate_halves(ps, ctf_mode="wiener", progress=False)
    ours = reconstruct_map(accs[1] + accs[2])
    relion = relion_reconstruct(star, folder / "relion_all.mrc")
    fsc = fourier_shell_correlation(ours, relion)
    assert float(fsc[SHELLS_08].min()) >= 0.98
    ours_truth = float(fourier_shell_correlation(ours, truth)[1:].sum())
    relion_truth = float(fourier_shell_correlation(relion, truth)[1:].sum())
    assert ours_truth >= 0.99 * relion_truth
    scale = float((ours * relion).sum() / (relion * relion).sum())
    assert abs(scale - 1) < 0.02


def test_flip_mode_matches_relion_only_flip_phases(c1_data):
    folder, star, truth = c1_data
    accs = accumulate_halves(read_particles(star), ctf_mode="flip", progress=False)
    ours = reconstruct_map(accs[1] + accs[2])
    relion = relion_reconstruct(star, folder / "relion_flip.mrc", "--only_flip_phases")
    assert float(fourier_shell_correlation(ours, relion)[SHELLS_08].min()) >= 0.98
    ours_truth = float(fourier_shell_correlation(ours, truth)[1:].sum())
    assert ours_truth >= 0.99 * float(fourier_shell_correlation(relion, truth)[1:].sum())


def test_half_map_resolution_matches_relion_postprocess(c1_data):
    folder, star, truth = c1_data
    ps = read_particles(star)
    half1, half2 = reconstruct_halves(ps, ctf_mode="wiener", progress=False)
    r1 = relion_reconstruct(star, folder / "r_half1_class001_unfil.mrc", "--subset", "1")
    relion_reconstruct(star, folder / "r_half2_class001_unfil.mrc", "--subset", "2")
    mask = mask_from_map(low_pass(truth, 10.0, APIX), 0.1 * float(truth.max()), dilate_px=2, edge_px=4)
    write_map(folder / "mask.mrc", mask.numpy(), APIX)
    subprocess.run(["relion_postprocess", "--i", str(folder / "r_half1_class001_unfil.mrc"), "--i2",
                    str(folder / "r_half2_class001_unfil.mrc"), "--mask", str(folder / "mask.mrc"), "--angpix",
                    str(APIX), "--o", str(folder / "pp")], check=True, capture_output=True)
    text = (folder / "pp.star").read_text()
    relion_res = float(text.split("_rlnFinalResolution")[1].split()[0])
    ours = postprocess(half1, half2, APIX, mask)
    assert abs(ours.resolution_A - relion_res) <= 0.05 * relion_res
    assert float(fourier_shell_correlation(half1, r1)[SHELLS_08].min()) >= 0.98


@pytest.mark.parametrize("sym,n,ngauss", [("C2", 200, 30), ("D2", 120, 20), ("I", 20, 6)])
def test_symmetry_matches_relion(tmp_path, sym, n, ngauss):
    truth = symmetrize_map(gaussian_map(ngauss, seed=2), sym)
    star = simulate(tmp_path, truth, n, noise=1.0, seed=3)
    ps = read_particles(star)
    accs = accumulate_halves(ps, ctf_mode="wiener", progress=False)
    ours = reconstruct_map(accs[1] + accs[2], symmetry=symmetry_matrices(sym))
    relion = relion_reconstruct(star, tmp_path / "relion.mrc", "--sym", sym)
    fsc = fourier_shell_correlation(ours, relion)
    assert float(fsc[SHELLS_08].min()) >= 0.98
    ours_truth = float(fourier_shell_correlation(ours, truth)[1:].sum())
    relion_truth = float(fourier_shell_correlation(relion, truth)[1:].sum())
    assert ours_truth >= 0.99 * relion_truth

"""``gmmrefine reconstruct`` and ``gmmrefine postprocess`` end to end, and their bad-input errors."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from gmmrefine.cli.main import main
from gmmrefine.errors import EXIT_INPUT_ERROR
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.fourier.masks import soft_sphere
from gmmrefine.io.mrc import read_map, write_map, write_stack
from gmmrefine.io.particles import CTFParams, new_particle_tables
from gmmrefine.io.star import write_star

BOX, APIX = 32, 2.0


def _ctf(n: int, rng) -> CTFParams:
    dfu = rng.uniform(8000, 20000, n)
    return CTFParams(defocus_u_A=dfu, defocus_v_A=dfu - 200, defocus_angle_deg=rng.uniform(0, 180, n),
                     voltage_kV=np.full(n, 300.0), cs_mm=np.full(n, 2.7), amplitude_contrast=np.full(n, 0.1),
                     phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n), scale=np.ones(n))


def tiny_set(folder: Path, n: int = 20, angles=None, subset=None) -> Path:
    """A STAR file and stack of random images (enough for the input checks)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_stack(folder / "p.mrcs", rng.normal(size=(n, BOX, BOX)).astype(np.float32), APIX)
    angles = rng.uniform(0, 180, (n, 3)) if angles is None else angles
    subset = np.tile([1, 2], n)[:n] if subset is None else subset
    names = np.array([f"{i + 1:06d}@{folder / 'p.mrcs'}" for i in range(n)])
    write_star(folder / "p.star", new_particle_tables(names, angles, rng.uniform(-2, 2, (n, 2)), _ctf(n, rng),
                                                      subset, APIX, BOX))
    return folder / "p.star"


def test_reconstruct_cli_writes_everything(tmp_path, capsys):
    star = tiny_set(tmp_path / "in", n=40)
    out = tmp_path / "out"
    assert main(["reconstruct", "--particles", str(star), "--out", str(out), "--ctf", "wiener"]) == 0
    assert {p.name for p in out.iterdir()} == {"half1.mrc", "half2.mrc", "full.mrc", "fsc.json", "fsc.png"}
    report = json.loads((out / "fsc.json").read_text())
    assert report["n_half1"] == 20 and report["n_half2"] == 20 and report["box"] == BOX
    curve = report["curves"]
    assert len(curve["fsc_unmasked"]) == BOX // 2 + 1 and curve["resolution_A"][0] is None
    assert curve["frequency_invA"][-1] == pytest.approx(1 / (2 * APIX))
    h1, apix = read_map(out / "half1.mrc")
    assert h1.shape == (BOX,) * 3 and apix == pytest.approx(APIX)
    full = read_map(out / "full.mrc")[0]
    np.testing.assert_allclose(full, 0.5 * (h1 + read_map(out / "half2.mrc")[0]), atol=1e-5)
    assert "resolution" in capsys.readouterr().out
    # refuses to overwrite, then --force and --half 1
    assert main(["reconstruct", "--particles", str(star), "--out", str(out)]) == EXIT_INPUT_ERROR
    out1 = tmp_path / "only1"
    assert main(["reconstruct", "--particles", str(star), "--out", str(out1), "--half", "1", "--sym", "C2"]) == 0
    assert {p.name for p in out1.iterdir()} == {"half1.mrc"}


@pytest.mark.parametrize("case", ["nan_pose", "empty_half", "bad_sym", "missing"])
def test_reconstruct_cli_bad_input_writes_nothing(tmp_path, case, capsys):
    n = 10
    angles = np.random.default_rng(1).uniform(0, 90, (n, 3))
    subset = None
    if case == "nan_pose":
        angles[3, 1] = np.nan
    if case == "empty_half":
        subset = np.ones(n, dtype=int)
    star = tiny_set(tmp_path / "in", n=n, angles=angles, subset=subset)
    if case == "missing":
        star = tmp_path / "nope.star"
    out = tmp_path / "out"
    argv = ["reconstruct", "--particles", str(star), "--out", str(out)]
    if case == "bad_sym":
        argv += ["--sym", "Q7"]
    assert main(argv) == EXIT_INPUT_ERROR
    assert not out.exists()
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


def _halves(tmp_path: Path, box: int = 32, apix: float = APIX):
    g = torch.Generator().manual_seed(0)
    signal = torch.zeros((box,) * 3)
    c = box // 2
    signal[c - 4:c + 4, c - 3:c + 3, c - 5:c + 5] = 1.0
    h1 = signal + 0.1 * torch.randn(signal.shape, generator=g)
    h2 = signal + 0.1 * torch.randn(signal.shape, generator=g)
    write_map(tmp_path / "h1.mrc", h1.numpy(), apix)
    write_map(tmp_path / "h2.mrc", h2.numpy(), apix)
    write_map(tmp_path / "mask.mrc", soft_sphere(box, 9, 3).numpy(), apix)
    return tmp_path / "h1.mrc", tmp_path / "h2.mrc", tmp_path / "mask.mrc"


def test_postprocess_cli_writes_everything(tmp_path, capsys):
    h1, h2, mask = _halves(tmp_path)
    out = tmp_path / "pp"
    assert main(["postprocess", "--half1", str(h1), "--half2", str(h2), "--mask", str(mask), "--out", str(out),
                 "--locres-window", "16"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {"fsc.json", "fsc.png", "guinier.png", "sharpened.mrc", "sharpened_masked.mrc",
                     "local_resolution.mrc", "local_resolution.png"}
    report = json.loads((out / "fsc.json").read_text())
    for key in ("fsc_unmasked", "fsc_masked", "fsc_randomised", "fsc_corrected"):
        assert len(report["curves"][key]) == 17
    assert 2 * APIX <= report["resolution_0143_A"] <= 32 * APIX
    lr, _ = read_map(out / "local_resolution.mrc")
    assert lr[16, 16, 16] > 0 and lr[0, 0, 0] == 0
    assert "resolution" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["size", "apix", "mask_size", "mask_apix", "odd"])
def test_postprocess_cli_bad_input_writes_nothing(tmp_path, case, capsys):
    h1, h2, mask = _halves(tmp_path)
    if case == "size":
        write_map(h2, np.zeros((34,) * 3, np.float32), APIX)
    if case == "apix":
        write_map(h2, read_map(h2)[0], 1.5)
    if case == "mask_size":
        write_map(mask, np.ones((30,) * 3, np.float32), APIX)
    if case == "mask_apix":
        write_map(mask, read_map(mask)[0], 3.0)
    if case == "odd":
        write_map(h1, np.zeros((31,) * 3, np.float32), APIX)
        write_map(h2, np.zeros((31,) * 3, np.float32), APIX)
    out = tmp_path / "pp"
    assert main(["postprocess", "--half1", str(h1), "--half2", str(h2), "--mask", str(mask), "--out", str(out)]) \
        == EXIT_INPUT_ERROR
    assert not out.exists()
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


@pytest.mark.relion
def test_reconstruct_cli_on_relion_project_particles(tmp_path):
    """relion_project particles with CTF and noise: the CLI's half maps agree with relion_reconstruct."""
    from test_reconstruct_relion import gaussian_map, simulate

    truth = gaussian_map(50, seed=4)
    star = simulate(tmp_path / "sim", truth, 300, noise=0.5, seed=5)
    out = tmp_path / "rec"
    assert main(["reconstruct", "--particles", str(star), "--out", str(out), "--ctf", "wiener"]) == 0
    ours = torch.from_numpy(read_map(out / "half1.mrc")[0])
    subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(tmp_path / "r1.mrc"), "--ctf", "--subset",
                    "1"], check=True, capture_output=True)
    relion = torch.from_numpy(read_map(tmp_path / "r1.mrc")[0])
    assert float(fourier_shell_correlation(ours, relion)[1:20].min()) >= 0.98
    flip = tmp_path / "flip"
    assert main(["reconstruct", "--particles", str(star), "--out", str(flip)]) == 0
    report = json.loads((flip / "fsc.json").read_text())
    assert report["resolution_0143_A"] < 8.0

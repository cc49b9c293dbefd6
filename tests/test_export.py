"""`gmmrefine export`: a particle set as a cryoSPARC .cs written with cryosparc-tools (read back by
cryosparc-tools and by our reader with the same poses) or as a RELION STAR file RELION reads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _io_testdata import APIX, particle_values, star31_text, write_dataset
from scipy.spatial.transform import Rotation

from gmmrefine.cli.main import main as cli_main
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
from gmmrefine.io.mrc import read_map
from gmmrefine.io.particles import read_particles

N = 80


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return rotation_angle_deg(euler_to_matrix(torch.as_tensor(a)), euler_to_matrix(torch.as_tensor(b))).numpy()


@pytest.fixture
def star(tmp_path) -> Path:
    names = write_dataset(tmp_path, n=N)
    (tmp_path / "particles.star").write_text(star31_text(names, particle_values(N)))
    return tmp_path / "particles.star"


def test_cs_export_reads_back_with_cryosparc_tools_and_our_reader(star, tmp_path):
    from cryosparc.dataset import Dataset

    out = tmp_path / "out" / "particles.cs"
    out.parent.mkdir()
    assert cli_main(["export", "--particles", str(star), "--out", str(out)]) == 0
    src = read_particles(star)
    cs = Dataset.load(out)
    assert len(cs) == N and len(set(cs["uid"].tolist())) == N
    # cryoSPARC's conventions, computed without gmmrefine: the pose is the rotation vector of the matrix
    # scipy builds from RELION's ZYZ angles (RELION's A transposed), shifts are pixels, split is half - 1.
    expected_pose = Rotation.from_euler("ZYZ", src.angles_deg, degrees=True).as_rotvec()
    np.testing.assert_allclose(cs["alignments3D/pose"], expected_pose, atol=2e-6)
    np.testing.assert_allclose(cs["alignments3D/shift"] * cs["alignments3D/psize_A"][:, None], src.shift_A, atol=1e-5)
    assert np.array_equal(cs["alignments3D/split"] + 1, src.subset)
    assert np.array_equal(cs["blob/idx"], src.image_index)
    np.testing.assert_allclose(cs["ctf/df1_A"], src.ctf.defocus_u_A, rtol=1e-6)
    np.testing.assert_allclose(np.rad2deg(cs["ctf/df_angle_rad"]), src.ctf.defocus_angle_deg, atol=1e-4)
    back = read_particles(out)
    assert back.box == src.box and back.apix == pytest.approx(APIX)
    assert float(_angle_deg(back.angles_deg, src.angles_deg).max()) < 1e-4
    np.testing.assert_allclose(back.shift_A, src.shift_A, atol=1e-5)
    assert np.array_equal(back.subset, src.subset)
    # the same particle gets the same uid in every export
    again = tmp_path / "again.cs"
    assert cli_main(["export", "--particles", str(out), "--out", str(again)]) == 0
    assert np.array_equal(Dataset.load(again)["uid"], cs["uid"])


@pytest.mark.relion
def test_star_export_of_a_cs_gives_relion_the_same_map(star, tmp_path):
    cs, back = tmp_path / "p.cs", tmp_path / "back.star"
    assert cli_main(["export", "--particles", str(star), "--out", str(cs)]) == 0
    assert cli_main(["export", "--particles", str(cs), "--out", str(back)]) == 0
    maps = {}
    for name in ("particles", "back"):
        subprocess.run(["relion_reconstruct", "--i", f"{name}.star", "--o", f"{name}.mrc", "--ctf"], cwd=tmp_path,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        maps[name] = torch.from_numpy(read_map(tmp_path / f"{name}.mrc")[0])
    fsc = fourier_shell_correlation(maps["particles"], maps["back"])
    assert float(fsc[: 3 * maps["back"].shape[-1] // 8].min()) >= 0.998  # float32 poses (see test_io_cryosparc)


def test_export_refuses_an_unknown_format_or_an_existing_file(star, tmp_path, capsys):
    assert cli_main(["export", "--particles", str(star), "--out", str(tmp_path / "p.txt")]) == 2
    assert "--out must end in .cs" in capsys.readouterr().err
    assert cli_main(["export", "--particles", str(star), "--out", str(star)]) == 2
    assert "--out exists" in capsys.readouterr().err

"""cryoSPARC .cs particles: pose/shift convention round trip, path resolution, bad input, RELION check."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _io_testdata import APIX, BOX, particle_values, star31_text, write_dataset
from scipy.spatial.transform import Rotation

from gmmrefine.errors import InputError
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
from gmmrefine.io.cryosparc import pose_from_relion_angles, read_cs, relion_angles_from_pose
from gmmrefine.io.mrc import read_map
from gmmrefine.io.particles import read_particles, write_particles_star

N = 40


def _cs_dtype(path_len: int, drop: tuple[str, ...] = ()) -> np.dtype:
    fields = [("uid", "<u8"), ("blob/path", f"S{path_len}"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
              ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/type", "S1"), ("ctf/accel_kv", "<f4"),
              ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
              ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"),
              ("ctf/bfactor", "<f4"), ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
              ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
              ("alignments3D/error", "<f4")]
    return np.dtype([f for f in fields if f[0] not in drop])


def _write_cs(path: Path, names: list[str], values: dict, drop: tuple[str, ...] = (), prefix: str = "",
              refine_apix: float = APIX) -> None:
    """A .cs as cryoSPARC exports it, from the same values the STAR test files use.

    The pose is built independently of gmmrefine: the rotation vector of
    ``Rotation.from_euler("ZYZ", angles)``, whose matrix is the transpose of RELION's A.
    """
    stacks = [prefix + n.split("@")[1] for n in names]
    data = np.zeros(len(names), dtype=_cs_dtype(max(len(s) for s in stacks), drop))
    angles = np.stack([values["rot"], values["tilt"], values["psi"]], axis=1)
    assigned = {
        "uid": np.arange(len(names)) + 10**12, "blob/path": [s.encode() for s in stacks],
        "blob/idx": [int(n.split("@")[0]) - 1 for n in names], "blob/shape": BOX, "blob/psize_A": APIX,
        "blob/sign": -1.0, "ctf/type": b"i", "ctf/accel_kv": 300.0, "ctf/cs_mm": 2.7, "ctf/amp_contrast": 0.1,
        "ctf/df1_A": values["du"], "ctf/df2_A": values["dv"], "ctf/df_angle_rad": np.deg2rad(values["dang"]),
        "ctf/phase_shift_rad": 0.0, "ctf/scale": 1.0, "ctf/bfactor": 0.0,
        "alignments3D/split": values["subset"] - 1,
        "alignments3D/shift": np.stack([values["ox_A"], values["oy_A"]], 1) / refine_apix,
        "alignments3D/pose": Rotation.from_euler("ZYZ", angles, degrees=True).as_rotvec(),
        "alignments3D/psize_A": refine_apix, "alignments3D/error": 0.0,
    }
    for name, value in assigned.items():
        if name in data.dtype.names:
            data[name] = value
    with open(path, "wb") as fh:  # np.save would append .npy to the name
        np.save(fh, data)


def _angles(values):
    return np.stack([values["rot"], values["tilt"], values["psi"]], axis=1)


def _max_rotation_error_deg(a_deg: np.ndarray, b_deg: np.ndarray) -> float:
    a = euler_to_matrix(torch.as_tensor(a_deg, dtype=torch.float64))
    b = euler_to_matrix(torch.as_tensor(b_deg, dtype=torch.float64))
    return float(rotation_angle_deg(a, b).max())


def test_pose_conversion_matches_relion_matrix():
    angles = np.array([[10.0, 20.0, 30.0], [-170.0, 90.0, 45.0], [0.0, 0.0, 77.0], [33.0, 180.0, 0.0]])
    pose = pose_from_relion_angles(angles)
    # cryoDRGN/pyem: RELION's A is the transpose of the Rodrigues matrix of the pose.
    relion_a = euler_to_matrix(torch.as_tensor(angles)).numpy()
    np.testing.assert_allclose(Rotation.from_rotvec(pose).as_matrix(), np.swapaxes(relion_a, 1, 2), atol=1e-12)
    assert _max_rotation_error_deg(relion_angles_from_pose(pose), angles) < 1e-6


def test_read_cs_gives_the_encoded_relion_poses(tmp_path):
    project = tmp_path / "P1"
    names = write_dataset(project, n=N)
    values = particle_values(N)
    job = project / "J7"
    job.mkdir()
    # Paths relative to the project dir, the .cs inside a job dir: resolved via the .cs file's parent.
    _write_cs(job / "J7_particles.cs", names, values, prefix=">", refine_apix=APIX * 1.5)
    # refine_apix differs from blob/psize_A: the shift is in pixels of alignments3D/psize_A.
    ps = read_particles(job / "J7_particles.cs")
    assert ps.source_format == "cryosparc" and ps.box == BOX and ps.apix == pytest.approx(APIX)
    assert _max_rotation_error_deg(ps.angles_deg, _angles(values)) < 1e-3  # float32 storage
    np.testing.assert_allclose(ps.shift_A, np.stack([values["ox_A"], values["oy_A"]], 1), atol=1e-5)
    np.testing.assert_allclose(ps.ctf.defocus_angle_deg, values["dang"], atol=1e-4)
    np.testing.assert_allclose(ps.ctf.defocus_u_A, values["du"], rtol=1e-6)
    np.testing.assert_array_equal(ps.subset, values["subset"])
    assert not ps.subset_assigned
    assert Path(ps.image_files[0]) == (project / names[0].split("@")[1]).resolve()

    # Same particles as the STAR file with those values.
    (project / "same.star").write_text(star31_text(names, values))
    star = read_particles(project / "same.star")
    np.testing.assert_array_equal(ps.image_files, star.image_files)
    np.testing.assert_array_equal(ps.image_index, star.image_index)

    # Writing gives a RELION 3.1 STAR that reads back to the same poses.
    out = tmp_path / "elsewhere" / "refined.star"
    write_particles_star(ps, out, ps.angles_deg, ps.shift_A)
    back = read_particles(out)
    assert back.source_format == "relion-3.1"
    np.testing.assert_allclose(back.angles_deg, ps.angles_deg, atol=1e-9)
    np.testing.assert_allclose(back.shift_A, ps.shift_A, atol=1e-9)


def test_project_dir_argument_and_missing_split(tmp_path):
    project = tmp_path / "P2"
    names = write_dataset(project, n=N)
    values = particle_values(N)
    exports = tmp_path / "exports" / "jobs" / "J9"
    exports.mkdir(parents=True)
    _write_cs(exports / "p.cs", names, values, drop=("alignments3D/split", "alignments3D/psize_A"))
    with pytest.raises(InputError, match=r"p\.cs: stack file '.*' of blob/path \(row 1\) not found"):
        read_cs(exports / "p.cs")
    with pytest.warns(UserWarning, match=r"p\.cs: no half-set split"):
        ps = read_cs(exports / "p.cs", project_dir=project)
    np.testing.assert_array_equal(ps.subset, np.arange(N) % 2 + 1)
    np.testing.assert_allclose(ps.shift_A, np.stack([values["ox_A"], values["oy_A"]], 1), atol=1e-5)


def test_cs_without_poses_is_input_error(tmp_path):
    names = write_dataset(tmp_path, n=N)
    _write_cs(tmp_path / "noposes.cs", names, particle_values(N), drop=("alignments3D/pose",))
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(InputError, match=r"noposes\.cs: cryoSPARC file has no field alignments3D/pose") as info:
        read_particles(tmp_path / "noposes.cs")
    assert info.value.field == "alignments3D/pose"
    assert sorted(tmp_path.rglob("*")) == before


def test_not_a_cs_file_is_input_error(tmp_path):
    (tmp_path / "junk.cs").write_bytes(b"not numpy at all")
    with pytest.raises(InputError, match=r"junk\.cs: not a readable cryoSPARC \.cs file"):
        read_cs(tmp_path / "junk.cs")


@pytest.mark.relion
def test_relion_reconstructs_the_same_map_from_cs_as_from_star(tmp_path):
    """The .cs built from a STAR file's values, read and written back as STAR, gives RELION the same map.

    The .cs stores float32, so poses differ from the STAR text by ~4e-5 degrees. Measured here:
    relion_reconstruct on these 80 noisy 32 px images is so sensitive that perturbing the reference
    STAR's angles by 1e-5 degrees already lowers the FSC of the last two shells to 0.98-0.99; so the
    bar is 0.998 up to 3/4 Nyquist and 0.95 beyond. The inverse rotation (the other convention) must fail.
    """
    names = write_dataset(tmp_path, n=80)
    values = particle_values(80)
    (tmp_path / "ref.star").write_text(star31_text(names, values))
    _write_cs(tmp_path / "p.cs", names, values)
    ps = read_cs(tmp_path / "p.cs")
    write_particles_star(ps, tmp_path / "from_cs.star", ps.angles_deg, ps.shift_A)
    inverse = relion_angles_from_pose(-pose_from_relion_angles(ps.angles_deg))
    write_particles_star(ps, tmp_path / "inverse.star", inverse, ps.shift_A)
    maps = {}
    for name in ("ref", "from_cs", "inverse"):
        subprocess.run(["relion_reconstruct", "--i", f"{name}.star", "--o", f"{name}.mrc", "--ctf"], cwd=tmp_path,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        maps[name] = torch.from_numpy(read_map(tmp_path / f"{name}.mrc")[0])
    fsc = fourier_shell_correlation(maps["ref"], maps["from_cs"])
    three_quarter_nyquist = 3 * BOX // 8
    assert float(fsc[:three_quarter_nyquist].min()) >= 0.998
    assert float(fsc.min()) >= 0.95
    wrong = fourier_shell_correlation(maps["ref"], maps["inverse"])
    assert float(wrong[1:three_quarter_nyquist].mean()) < 0.9

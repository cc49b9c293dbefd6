"""Particle sets from RELION STAR files: units, optics groups, half sets, images, writing poses, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from _io_testdata import APIX, BOX, make_images, particle_values, star30_text, star31_text, write_dataset

from gmmrefine.errors import InputError
from gmmrefine.io.mrc import write_stack
from gmmrefine.io.particles import (
    CTFParams,
    iter_image_chunks,
    new_particle_tables,
    particles_with_poses,
    read_images,
    read_particles,
    write_particles_star,
)
from gmmrefine.io.star import read_star

N = 40


@pytest.fixture()
def root(tmp_path) -> Path:
    return tmp_path


def _setup(root: Path, n: int = N, **kwargs) -> tuple[list[str], dict]:
    return write_dataset(root, n=n, **kwargs), particle_values(n)


def test_relion30_and_31_give_the_same_particles(root):
    names, values = _setup(root)
    (root / "a30.star").write_text(star30_text(names, values))
    (root / "a31.star").write_text(star31_text(names, values))
    p30, p31 = read_particles(root / "a30.star"), read_particles(root / "a31.star")
    assert (p30.source_format, p31.source_format) == ("relion-3.0", "relion-3.1")
    assert p30.apix == pytest.approx(APIX) and p31.apix == pytest.approx(APIX)
    assert p30.box == p31.box == BOX
    expected_shift = np.stack([values["ox_A"], values["oy_A"]], axis=1)
    # 3.0 stores px with 6 decimals: 1e-6 px * 2 A/px.
    np.testing.assert_allclose(p30.shift_A, expected_shift, atol=2.1e-6)
    np.testing.assert_allclose(p31.shift_A, expected_shift, atol=1e-6)
    np.testing.assert_allclose(p30.angles_deg, p31.angles_deg, atol=0)
    for field in CTFParams.FIELDS:
        np.testing.assert_allclose(getattr(p30.ctf, field), getattr(p31.ctf, field), atol=0, err_msg=field)
    np.testing.assert_array_equal(p31.subset, values["subset"])
    assert not p31.subset_assigned
    assert p31.image_index[:3].tolist() == [0, 1, 2]
    assert Path(p31.image_files[0]).is_absolute() and Path(p31.image_files[0]).is_file()
    assert p31.particles is p31.tables["particles"]


def test_several_optics_groups(root):
    names, values = _setup(root)
    (root / "og.star").write_text(star31_text(names, values, optics_groups=3))
    ps = read_particles(root / "og.star")
    group = np.arange(N) % 3 + 1
    np.testing.assert_array_equal(ps.optics_group, group)
    np.testing.assert_allclose(ps.ctf.voltage_kV, 300 - 100 * (group - 1))
    np.testing.assert_allclose(ps.ctf.cs_mm, 2.7 - 0.7 * (group - 1), rtol=1e-9)
    assert len(ps.optics) == 3


def test_optics_groups_with_different_pixel_sizes_are_refused(root):
    names, values = _setup(root)
    star = root / "og.star"
    star.write_text(star31_text(names, values, optics_groups=2, optics_apix=[2.0, 1.5]))
    with pytest.raises(InputError, match=r"og\.star: rlnImagePixelSize differs") as info:
        read_particles(star)
    assert info.value.field == "rlnImagePixelSize"


def test_missing_random_subset_is_assigned_with_a_warning(root):
    names, values = _setup(root)
    star = root / "nosplit.star"
    star.write_text(star31_text(names, values, drop=("rlnRandomSubset",)))
    with pytest.warns(UserWarning, match=r"nosplit\.star: no half-set split.*row % 2 \+ 1"):
        ps = read_particles(star)
    assert ps.subset_assigned
    np.testing.assert_array_equal(ps.subset, np.arange(N) % 2 + 1)
    np.testing.assert_array_equal(ps.half(2), np.arange(1, N, 2))


def test_missing_optional_ctf_columns_get_relion_defaults(root):
    names, values = _setup(root)
    star = root / "minimal.star"
    star.write_text(star31_text(names, values, drop=("rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor",
                                                     "rlnCtfScalefactor", "rlnPhaseShift", "rlnOriginXAngst",
                                                     "rlnOriginYAngst")))
    ps = read_particles(star)
    np.testing.assert_array_equal(ps.ctf.defocus_v_A, ps.ctf.defocus_u_A)
    assert (ps.ctf.defocus_angle_deg == 0).all() and (ps.ctf.phase_shift_deg == 0).all()
    assert (ps.ctf.bfactor_A2 == 0).all() and (ps.ctf.scale == 1).all()
    assert (ps.shift_A == 0).all()


def test_stacks_resolve_relative_to_the_working_directory_too(root, monkeypatch):
    names, values = _setup(root)
    sub = root / "Refine3D" / "job010"
    sub.mkdir(parents=True)
    (sub / "run_data.star").write_text(star31_text(names, values))  # names relative to root, as RELION does
    monkeypatch.chdir(root)
    ps = read_particles(sub / "run_data.star")
    assert Path(ps.image_files[0]) == (root / names[0].split("@")[1]).resolve()


def test_images_come_back_in_order_by_chunks(root):
    names, values = _setup(root, n=N, stacks=3)
    (root / "a.star").write_text(star31_text(names, values))
    ps = read_particles(root / "a.star")
    truth = make_images(N)
    order = np.random.default_rng(3).permutation(N)
    seen = []
    for idx, images in iter_image_chunks(ps, order, chunk_size=7):
        assert images.dtype == np.float32 and images.shape == (len(idx), BOX, BOX)
        np.testing.assert_array_equal(images, truth[idx])
        seen.append(idx)
    np.testing.assert_array_equal(np.concatenate(seen), order)
    np.testing.assert_array_equal(read_images(ps, [5, 0, 39]), truth[[5, 0, 39]])


@pytest.mark.parametrize("version", ["30", "31"])
def test_particles_with_poses_changes_only_pose_columns(root, tmp_path_factory, version):
    tmp_path = tmp_path_factory.mktemp("elsewhere")
    names, values = _setup(root)
    star = root / f"a{version}.star"
    star.write_text((star30_text if version == "30" else star31_text)(names, values))
    ps = read_particles(star)
    rng = np.random.default_rng(4)
    angles = ps.angles_deg + rng.normal(0, 2, (N, 3))
    shifts = ps.shift_A + rng.normal(0, 1, (N, 2))
    score = rng.uniform(0, 1, N)
    out = root / f"refined{version}.star"
    write_particles_star(ps, out, angles, shifts, extra={"rlnGmmScore": score})
    back = read_particles(out)
    assert back.source_format == ps.source_format
    np.testing.assert_allclose(back.angles_deg, angles, atol=1e-12)
    np.testing.assert_allclose(back.shift_A, shifts, atol=1e-12)
    block = ps.particles_block
    before, after = read_star(star)[block], read_star(out)[block]
    assert list(after.columns) == list(before.columns) + ["rlnGmmScore"]
    posecols = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnOriginXAngst",
                "rlnOriginYAngst"}
    for column in before.columns:
        if column not in posecols:
            assert before[column].tolist() == after[column].tolist(), column
    np.testing.assert_allclose(after["rlnGmmScore"], score, rtol=0)
    if version == "30":
        np.testing.assert_allclose(after["rlnOriginX"], shifts[:, 0] / APIX, rtol=1e-12)
    tables = particles_with_poses(ps, angles, shifts)
    assert tables[block] is not ps.particles and ps.particles["rlnAngleRot"].tolist() == before["rlnAngleRot"].tolist()

    elsewhere = tmp_path / "job001" / "refined.star"  # names relative to root would not resolve from here
    write_particles_star(ps, elsewhere, angles, shifts, absolute_image_paths=True)
    moved = read_particles(elsewhere)
    np.testing.assert_array_equal(moved.image_files, ps.image_files)
    np.testing.assert_array_equal(moved.image_index, ps.image_index)


def test_new_particle_tables_read_back(root):
    names, values = _setup(root)
    n = len(names)
    ctf = CTFParams(values["du"], values["dv"], values["dang"], np.full(n, 300.0), np.full(n, 2.7),
                    np.full(n, 0.07), np.zeros(n), np.zeros(n), np.ones(n))
    angles = np.stack([values["rot"], values["tilt"], values["psi"]], 1)
    shifts = np.stack([values["ox_A"], values["oy_A"]], 1)
    from gmmrefine.io.star import write_star

    write_star(root / "new.star", new_particle_tables(names, angles, shifts, ctf, values["subset"], APIX, BOX))
    ps = read_particles(root / "new.star")
    np.testing.assert_allclose(ps.angles_deg, angles, rtol=0)
    np.testing.assert_allclose(ps.shift_A, shifts, rtol=0)
    np.testing.assert_allclose(ps.ctf.amplitude_contrast, 0.07)
    assert ps.box == BOX and ps.apix == APIX


# ----------------------------------------------------------------------------------------------
# Bad input: one InputError each, naming the file and the field; nothing is written.
# ----------------------------------------------------------------------------------------------

def _expect_input_error(path: Path, pattern: str, field: str | None = None, action=None):
    before = sorted(p.relative_to(path.parent) for p in path.parent.rglob("*"))
    with pytest.raises(InputError, match=pattern) as info:
        (action or (lambda: read_particles(path)))()
    after = sorted(p.relative_to(path.parent) for p in path.parent.rglob("*"))
    assert before == after
    if field is not None:
        assert info.value.field == field
    return info.value


def test_missing_stack_file(root):
    names, values = _setup(root)
    names[5] = "000001@Particles/gone.mrcs"
    (root / "a.star").write_text(star31_text(names, values))
    err = _expect_input_error(root / "a.star", r"a\.star: stack file 'Particles/gone\.mrcs' of rlnImageName "
                                               r"\(row 6\) not found", "rlnImageName")
    assert "STAR file's directory" in str(err) and "working directory" in str(err)


def test_index_past_the_end_of_a_stack(root):
    names, values = _setup(root, stacks=1)
    names[7] = f"{N + 1:06d}@Particles/mic_000_particles.mrcs"
    (root / "a.star").write_text(star31_text(names, values))
    _expect_input_error(root / "a.star", rf"a\.star: rlnImageName at row 8 refers to image {N + 1} of "
                                         rf".*mic_000_particles\.mrcs, which holds only {N} images", "rlnImageName")


def test_box_mismatch_between_star_and_stack(root):
    names, values = _setup(root)
    (root / "a.star").write_text(star31_text(names, values, box=BOX + 8))
    _expect_input_error(root / "a.star", rf"a\.star: .*box of {BOX + 8} px \(rlnImageSize\) but stack "
                                         rf".*mic_000_particles\.mrcs holds {BOX}x{BOX}", "rlnImageSize")


def test_pixel_size_mismatch_between_star_and_stack(root):
    names, values = _setup(root, header_apix=2.5)
    (root / "a.star").write_text(star31_text(names, values))
    _expect_input_error(root / "a.star", r"a\.star: the pixel size is 2 A in the STAR file but 2\.5 A in the "
                                         r"header of .*mic_000_particles\.mrcs", "pixel size")


def test_unset_header_pixel_size_is_not_a_mismatch(root):
    names, values = _setup(root, header_apix=1.0)
    (root / "a.star").write_text(star31_text(names, values))
    assert read_particles(root / "a.star").apix == APIX


def test_missing_pose_column(root):
    names, values = _setup(root)
    (root / "a.star").write_text(star31_text(names, values, drop=("rlnAngleTilt",)))
    _expect_input_error(root / "a.star", r"a\.star: data_particles has no column rlnAngleTilt", "rlnAngleTilt")


def test_missing_ctf_column(root):
    names, values = _setup(root)
    # Cs, voltage and Q0 take RELION 3.1's defaults with one warning (RELION reads such files too) ...
    (root / "a.star").write_text(star31_text(names, values, optics_drop=("rlnSphericalAberration",)))
    with pytest.warns(UserWarning, match=r"a\.star: no rlnSphericalAberration; taking RELION's defaults"):
        parts = read_particles(root / "a.star")
    np.testing.assert_array_equal(parts.ctf.cs_mm, np.zeros(N))
    # ... but a missing defocus is an error: no default could stand for it.
    (root / "b.star").write_text(star30_text(names, values, drop=("rlnDefocusU",)))
    _expect_input_error(root / "b.star", r"b\.star: data_ has no column rlnDefocusU", "rlnDefocusU")


def test_non_numeric_value(root):
    names, values = _setup(root)
    (root / "a.star").write_text(star31_text(names, values, replace={2: {"rlnAngleRot": "ninety"}}))
    _expect_input_error(root / "a.star", r"a\.star: column rlnAngleRot of data_particles has 'ninety' at row 3",
                        "rlnAngleRot")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's header statistics of the bad stack
def test_nan_image_is_reported_with_file_and_index(root):
    names, values = _setup(root, stacks=1)
    images = make_images(N)
    images[11, 3, 4] = np.inf
    write_stack(root / "Particles/mic_000_particles.mrcs", images, APIX)
    (root / "a.star").write_text(star31_text(names, values))
    ps = read_particles(root / "a.star")
    _expect_input_error(root / "a.star", r"mic_000_particles\.mrcs: image 12 \(particle row 12 of .*a\.star\) "
                                         r"contains NaN or Inf", "image data",
                        action=lambda: list(iter_image_chunks(ps, chunk_size=16)))


def test_truncated_stack(root):
    names, values = _setup(root)
    stack = root / "Particles/mic_001_particles.mrcs"
    with open(stack, "r+b") as fh:
        fh.truncate(os.path.getsize(stack) - 100)
    (root / "a.star").write_text(star31_text(names, values))
    _expect_input_error(root / "a.star", r"mic_001_particles\.mrcs: truncated MRC file", "data")


def test_empty_star(root):
    names, values = _setup(root)
    (root / "a.star").write_text(star31_text([], values))
    _expect_input_error(root / "a.star", r"a\.star: the particle table data_particles has no rows",
                        "data_particles")


def test_unknown_suffix_and_missing_file(root):
    (root / "x.txt").write_text("hi")
    _expect_input_error(root / "x.txt", r"x\.txt: unknown particle file type")
    with pytest.raises(InputError, match=r"nope\.star: particle file not found"):
        read_particles(root / "nope.star")


def test_without_image_checks_a_bad_stack_is_caught_when_reading_images(root):
    names, values = _setup(root)
    (root / "a.star").write_text(star31_text(names, values, box=BOX + 8))
    ps = read_particles(root / "a.star", check_images=False)  # header checks skipped
    assert ps.box == BOX + 8
    _expect_input_error(root / "a.star", rf"mic_000_particles\.mrcs: images are {BOX}x{BOX} px; expected "
                                         rf"{BOX + 8}x{BOX + 8}", "nx/ny",
                        action=lambda: read_images(ps, [0]))

"""STAR read/write: exact round trips of RELION 3.0 and 3.1 files, and RELION reading what we write."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _io_testdata import particle_values, star30_text, star31_text, write_dataset

from gmmrefine.errors import InputError
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.io.mrc import read_map
from gmmrefine.io.particles import read_particles, write_particles_star
from gmmrefine.io.star import read_star, write_star

N = 80


def _data_tokens(text: str) -> list[tuple[str, list[str]]]:
    """(block, value tokens) per block from raw STAR text, ignoring comments and layout."""
    blocks, current = [], None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("loop_"):
            continue
        if line.startswith("data_"):
            current = (line, [])
            blocks.append(current)
        elif line.startswith("_"):
            fields = line.split()
            current[1].append(fields[0])
            if re.fullmatch(r"_\S+\s+#\d+", line) is None:  # key-value pair, not a loop column
                current[1].extend(fields[1:])
        else:
            current[1].extend(re.findall(r'"[^"]*"|\S+', line))
    return blocks


def _assert_same_values(text_in: str, text_out: str) -> None:
    blocks_in, blocks_out = _data_tokens(text_in), _data_tokens(text_out)
    assert [b[0] for b in blocks_in] == [b[0] for b in blocks_out]
    for (name, a), (_, b) in zip(blocks_in, blocks_out):
        assert len(a) == len(b), name
        for x, y in zip(a, b):
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                assert x == y
                continue
            if re.fullmatch(r"[+-]?\d+", x):
                assert x == y  # integers (and zero-padded strings like 0007) keep their text
            else:
                assert fy == pytest.approx(fx, rel=1e-6, abs=1e-12)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("star")
    names = write_dataset(root, n=N)
    values = particle_values(N)
    (root / "in30.star").write_text(star30_text(names, values))
    (root / "in31.star").write_text(star31_text(names, values))
    return root


@pytest.mark.parametrize("version", ["30", "31"])
def test_round_trip_keeps_every_value(dataset, tmp_path, version):
    src = dataset / f"in{version}.star"
    tables = read_star(src)
    out = tmp_path / "out.star"
    write_star(out, tables)
    _assert_same_values(src.read_text(), out.read_text())
    again = read_star(out)
    assert list(again) == list(tables)
    for name in tables:
        a, b = tables[name], again[name]
        assert list(a.columns) == list(b.columns)
        assert (a.dtypes == b.dtypes).all()
        for column in a.columns:
            if a[column].dtype.kind == "f":
                np.testing.assert_array_equal(a[column].to_numpy(), b[column].to_numpy())
            else:
                assert a[column].tolist() == b[column].tolist()
    particles = tables["particles" if version == "31" else ""]
    assert particles["rlnRandomSubset"].dtype == np.int64
    assert particles["rlnImageName"].iloc[3] == "000004@Particles/mic_000_particles.mrcs"
    if version == "31":
        assert particles["rlnHelperNote"].iloc[0] == "0007"  # not an integer: kept as text
        assert out.read_text().count("# version 30001") == 2
    else:
        assert "# version" not in out.read_text()


def test_key_value_block_and_quoted_strings(tmp_path):
    src = tmp_path / "general.star"
    src.write_text("# comment\ndata_general\n\n_rlnFinalResolution   3.25\n_rlnNrClasses 4\n"
                   "_rlnComment \"two words\"\n\ndata_model\nloop_\n_rlnA #1\n_rlnB #2\n1 x\n2 y\n")
    tables = read_star(src)
    assert tables["general"].attrs["star_loop"] is False
    assert tables["general"]["rlnNrClasses"].iloc[0] == 4
    assert tables["general"]["rlnComment"].iloc[0] == "two words"
    out = tmp_path / "o.star"
    write_star(out, tables)
    again = read_star(out)
    assert again["general"].iloc[0].tolist() == [3.25, 4, "two words"]
    assert again["model"]["rlnB"].tolist() == ["x", "y"]
    assert "loop_" not in out.read_text().split("data_model")[0]


def test_malformed_rows_are_input_errors(tmp_path):
    bad = tmp_path / "bad.star"
    bad.write_text("data_particles\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3\n")
    with pytest.raises(InputError, match=r"bad\.star: row 2 of block data_particles has 1 values"):
        read_star(bad)
    with pytest.raises(InputError, match=r"nothing\.star: STAR file not found"):
        read_star(tmp_path / "nothing.star")
    (tmp_path / "plain.star").write_text("hello world\n")
    with pytest.raises(InputError, match=r"plain\.star: line 1 comes before any data_ block"):
        read_star(tmp_path / "plain.star")


def test_types_and_errors_do_not_depend_on_the_chunks_rows_are_read_in(tmp_path, monkeypatch):
    """Rows are typed a chunk at a time; a column is typed as a whole all the same."""
    import gmmrefine.io.star as star

    src = tmp_path / "mixed.star"
    rows = [f"{i} {i} {i} 00{i}@a.mrcs" for i in range(1, 5)] + ["5 5.5 x 005@a.mrcs", "6 6 7e0 006@a.mrcs"]
    src.write_text("data_particles\nloop_\n_rlnInt #1\n_rlnNum #2\n_rlnText #3\n_rlnImageName #4\n"
                   + "\n".join(rows) + "\n\n# a comment between rows\n7 7 8 007@a.mrcs\n")
    whole = read_star(src)["particles"]
    monkeypatch.setattr(star, "_CHUNK_ROWS", 2)
    chunked = read_star(src)["particles"]
    assert [chunked[c].dtype.kind for c in chunked.columns] == ["i", "f", "O", "O"]
    assert chunked["rlnNum"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.5, 6.0, 7.0]
    assert chunked["rlnText"].tolist() == ["1", "2", "3", "4", "x", "7e0", "8"]  # the text, not 7.0
    for c in whole.columns:
        assert whole[c].dtype == chunked[c].dtype and whole[c].tolist() == chunked[c].tolist()
    out = tmp_path / "out.star"
    write_star(out, {"particles": chunked})
    monkeypatch.setattr(star, "_CHUNK_ROWS", 8192)
    assert out.read_text() == star.format_star({"particles": whole})  # same widths whatever the chunks
    monkeypatch.setattr(star, "_CHUNK_ROWS", 2)
    src.write_text("data_particles\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4\n5 6\n7 8\n9\n")
    with pytest.raises(InputError, match=r"mixed\.star: row 5 of block data_particles has 1 values"):
        read_star(src)


def _reconstruct(star: Path, out: Path, cwd: Path) -> np.ndarray:
    subprocess.run(["relion_reconstruct", "--i", str(star), "--o", str(out), "--ctf"], cwd=cwd, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return read_map(out)[0]


def _fsc_min(a: np.ndarray, b: np.ndarray) -> float:
    return float(fourier_shell_correlation(torch.from_numpy(a), torch.from_numpy(b)).min())


@pytest.mark.relion
@pytest.mark.parametrize("version", ["30", "31"])
def test_relion_reconstructs_the_same_map_from_written_files(dataset, tmp_path, version):
    """RELION reads our round-tripped STAR and our pose-rewritten STAR exactly as it reads the input."""
    work = tmp_path / "work"
    shutil.copytree(dataset, work)
    src = work / f"in{version}.star"
    write_star(work / "roundtrip.star", read_star(src))
    ps = read_particles(src)
    write_particles_star(ps, work / "poses.star", ps.angles_deg, ps.shift_A)
    reference = _reconstruct(src, work / "ref.mrc", work)
    assert reference.std() > 0
    for name in ("roundtrip", "poses"):
        other = _reconstruct(work / f"{name}.star", work / f"{name}.mrc", work)
        assert _fsc_min(reference, other) >= 0.999, name


@pytest.mark.relion
def test_relion_agrees_that_px_and_angstrom_origins_match(dataset, tmp_path):
    """The 3.0 file (origins in px) and the 3.1 file (origins in A) describe the same particles:
    RELION gives the same map from both, and gmmrefine the same shift_A."""
    work = tmp_path / "work"
    shutil.copytree(dataset, work)
    map30 = _reconstruct(work / "in30.star", work / "m30.mrc", work)
    map31 = _reconstruct(work / "in31.star", work / "m31.mrc", work)
    assert _fsc_min(map30, map31) >= 0.999
    p30, p31 = read_particles(work / "in30.star"), read_particles(work / "in31.star")
    np.testing.assert_allclose(p30.shift_A, p31.shift_A, atol=1e-5)


def test_columns_without_numbers_and_bracketed_vectors(tmp_path):
    """As written by RELION 4/5 and by starfile: no '#N' after column names, Zernike vectors as text."""
    src = tmp_path / "v5.star"
    src.write_text("# Created by some tool\n\ndata_optics\n\nloop_\n_rlnOpticsGroup\n_rlnOddZernike\n_rlnVoltage\n"
                   "1 [0.5,-1.25,0,3] 300.000000\n2 [0.1,0.2,0,0] 200.000000\n")
    tables = read_star(src)
    assert tables["optics"]["rlnOddZernike"].tolist() == ["[0.5,-1.25,0,3]", "[0.1,0.2,0,0]"]
    out = tmp_path / "o.star"
    write_star(out, tables)
    _assert_same_values(src.read_text(), out.read_text())

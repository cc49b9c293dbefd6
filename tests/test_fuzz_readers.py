"""Fuzzing the STAR, .cs and MRC readers (hypothesis): truncated files, random bytes in headers, wrong
types, huge or negative numbers, missing and duplicated columns. Whatever the damage, a reader either
reads the file or raises InputError (one sentence, exit 2 from the CLI) and writes nothing; inputs are
never modified. ``GMMREFINE_FUZZ_EXAMPLES`` sets the examples per test (CI: the default)."""

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gmmrefine.cli.main import main as cli_main
from gmmrefine.errors import InputError
from gmmrefine.io.mrc import open_stack, read_map, write_map, write_stack
from gmmrefine.io.particles import CTFParams, new_particle_tables, read_particles
from gmmrefine.io.star import write_star

REAL = Path(__file__).parent / "data" / "real"
EXAMPLES = int(os.environ.get("GMMREFINE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tiny_set(folder: Path) -> Path:
    """Eight 16-px particles of random noise with poses, CTF and a half split: a valid STAR and stack."""
    rng = np.random.default_rng(0)
    n, box = 8, 16
    write_stack(folder / "tiny.mrcs", rng.normal(size=(n, box, box)).astype(np.float32), 3.0)
    ctf = CTFParams(defocus_u_A=np.full(n, 15000.0), defocus_v_A=np.full(n, 14000.0),
                    defocus_angle_deg=np.zeros(n), voltage_kV=np.full(n, 300.0), cs_mm=np.full(n, 2.7),
                    amplitude_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n),
                    scale=np.ones(n))
    tables = new_particle_tables([f"{i + 1:06d}@tiny.mrcs" for i in range(n)], rng.uniform(0, 180, (n, 3)),
                                 rng.normal(size=(n, 2)), ctf, np.arange(n) % 2 + 1, 3.0, box)
    write_star(folder / "tiny.star", tables)
    return folder / "tiny.star"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _damage(data: bytes, draw) -> bytes:
    """Truncate, overwrite a run of bytes with random ones, or both."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "both"]))
    if kind in ("overwrite", "both") and data:
        at = draw(st.integers(0, len(data) - 1))
        junk = draw(st.binary(min_size=1, max_size=64))
        data = data[:at] + junk + data[at + len(junk):]
    if kind in ("truncate", "both"):
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    return data


def _star_edit(text: str, draw) -> str:
    """A column dropped or duplicated, or a value replaced by text, a huge, negative or odd number."""
    lines = text.splitlines()
    labels = [i for i, line in enumerate(lines) if line.startswith("_rln")]
    rows = [i for i, line in enumerate(lines) if line and line[0] not in "_#d" and not line.startswith("loop_")
            and len(line.split()) > 3]
    kind = draw(st.sampled_from(["drop", "duplicate", "value"]))
    if kind == "drop" and labels:
        del lines[draw(st.sampled_from(labels))]
    elif kind == "duplicate" and labels:
        i = draw(st.sampled_from(labels))
        lines.insert(i + 1, lines[i])
    elif rows:
        i = draw(st.sampled_from(rows))
        words = lines[i].split()
        j = draw(st.integers(0, len(words) - 1))
        words[j] = draw(st.sampled_from(["abc", "1e308", "-1e308", "-5", "nan", "inf", "0", "999999999999", "", "@"]))
        lines[i] = " ".join(words)
    return "\n".join(lines) + "\n"


def _read_or_refuse(read, path) -> None:
    try:
        read(path)
    except InputError as err:
        assert str(err) and "\n" not in str(err)


@FUZZ
@given(st.data())
def test_damaged_star_files_are_read_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        star = _tiny_set(folder)
        text = star.read_text()
        edited = _star_edit(text, data.draw) if data.draw(st.booleans()) else \
            _damage(text.encode(), data.draw).decode("latin-1")
        star.write_text(edited, encoding="latin-1")
        _read_or_refuse(read_particles, star)


@FUZZ
@given(st.data())
def test_damaged_cs_files_are_read_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        cs = Path(tmp) / "particles.cs"
        cs.write_bytes(_damage((REAL / "cryosparc_J2_particles_exported.cs").read_bytes(), data.draw))
        _read_or_refuse(read_particles, cs)


@FUZZ
@given(st.data())
def test_damaged_mrc_files_are_read_or_refused(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "map.mrc"
        write_map(path, np.random.default_rng(1).normal(size=(12, 12, 12)).astype(np.float32), 2.0)
        raw = bytearray(path.read_bytes())
        if data.draw(st.booleans()):  # a header word set to a huge, negative or odd value
            word = data.draw(st.integers(0, 255))
            value = data.draw(st.sampled_from([-1, 0, 7, 2**31 - 1, -2**31, 123456789]))
            raw[4 * word:4 * word + 4] = int(value).to_bytes(4, "little", signed=True)
        else:
            raw = bytearray(_damage(bytes(raw), data.draw))
        path.write_bytes(bytes(raw))
        _read_or_refuse(read_map, path)
        _read_or_refuse(open_stack, path)


@settings(max_examples=max(4, EXAMPLES // 8), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_damaged_inputs_through_the_cli_exit_2_write_nothing_and_stay_unchanged(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        star = _tiny_set(folder)
        if data.draw(st.booleans()):
            star.write_text(_star_edit(star.read_text(), data.draw))
        else:
            stack = folder / "tiny.mrcs"
            stack.write_bytes(_damage(stack.read_bytes(), data.draw))
        before = _digest(folder)
        out = Path(tmp) / "out"
        code = cli_main(["reconstruct", "--particles", str(star), "--out", str(out), "--ctf", "flip"])
        assert code in (0, 2)
        if code == 2:
            assert not out.exists()
        assert _digest(folder) == before


def test_the_undamaged_tiny_set_reconstructs(tmp_path):
    """The base of the CLI fuzz is itself valid (so the fuzz does reach the reconstruction)."""
    star = _tiny_set(tmp_path)
    assert cli_main(["reconstruct", "--particles", str(star), "--out", str(tmp_path / "out")]) == 0
    assert read_map(tmp_path / "out" / "half1.mrc")[0].shape == (16, 16, 16)

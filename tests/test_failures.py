"""What a user meets when something is wrong: errors before any work, one sentence each, a job folder
that a fixed input can start again, a finished job left alone, health warnings, help texts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gmmrefine.cli.main import build_parser
from gmmrefine.cli.main import main as cli_main
from gmmrefine.io.mrc import open_stack, write_stack
from gmmrefine.io.particles import read_particles

OPTIONS = ["--iterations", "1", "--gmm-steps", "20", "--minres", "40"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory, adk_open_pdb):
    root = tmp_path_factory.mktemp("failures")
    assert cli_main(["simulate", "--model", str(adk_open_pdb), "--n", "60", "--box", "32", "--apix", "3.0",
                     "--snr", "1", "--origin-sigma-px", "1", "--perturb-deg", "3", "--perturb-A", "1", "--seed", "4",
                     "--out", str(root / "sim")]) == 0
    return root / "sim"


def _refine(star: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmmrefine", "refine", "--particles", str(star), "--out", str(out),
                           *OPTIONS, *extra], capture_output=True, text=True, timeout=300)


def test_a_folder_given_as_particles_is_named_a_folder(tmp_path, capsys):
    for command in ("refine", "reconstruct"):
        assert cli_main([command, "--particles", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "is a directory" in err and "Traceback" not in err
        assert not (tmp_path / "out").exists()


def test_an_unwritable_out_fails_before_any_particle_is_read(sim, tmp_path, capsys, monkeypatch):
    from gmmrefine.io import particles
    from gmmrefine.pipeline import job

    reads = []
    real_read = particles.read_particles
    monkeypatch.setattr(particles, "read_particles", lambda *a, **k: reads.append(a) or real_read(*a, **k))
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(job.os, "access", lambda path, mode: Path(path) != locked)  # as a read-only mount says
    for argv in (["refine", "--particles", str(sim / "particles_perturbed.star")],
                 ["reconstruct", "--particles", str(sim / "particles.star")], ["demo"]):
        assert cli_main([*argv, "--out", str(locked / "job")]) == 2
        err = capsys.readouterr().err
        assert "cannot write there" in err and str(locked) in err and "Traceback" not in err
    assert reads == [] and list(locked.iterdir()) == []


def test_a_read_only_file_system_is_refused(sim, tmp_path, capsys):
    """A real read-only mount, where this machine lets the tests make one."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only file system here")
    try:
        assert cli_main(["reconstruct", "--particles", str(sim / "particles.star"), "--out", str(mnt / "r")]) == 2
        assert "read-only" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_not_enough_disk_space_is_refused_before_work(sim, tmp_path, capsys, monkeypatch):
    from gmmrefine.pipeline import job

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    assert cli_main(["reconstruct", "--particles", str(sim / "particles.star"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "GB free" in err and not (tmp_path / "r").exists()
    assert job is not None


def test_a_job_that_failed_on_bad_input_logs_why_and_starts_again_once_fixed(sim, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sim, bad)
    ps = read_particles(bad / "particles_perturbed.star")
    good = np.array(open_stack(bad / "particles.mrcs"), dtype=np.float32)
    for half, name in ((1, "first"), (2, "second")):
        stack = good.copy()
        stack[ps.image_index[ps.subset == half][3]] = np.nan  # a damaged image in this half
        write_stack(bad / "particles.mrcs", stack, ps.apix)
        out = tmp_path / f"job_{name}"
        r = _refine(bad / "particles_perturbed.star", out)
        assert r.returncode == 2 and "NaN" in r.stderr and "Traceback" not in r.stderr
        log = (out / "log.txt").read_text()
        assert "error:" in log and "NaN" in log
        write_stack(bad / "particles.mrcs", good, ps.apix)  # fixed
        done = json.loads((out / "state.json").read_text())["done"]
        if half == 1:  # nothing was computed: the same command starts again
            assert done == {}
            r = _refine(bad / "particles_perturbed.star", out)
            assert r.returncode == 0, r.stderr
            assert "starting again" in (out / "log.txt").read_text()
        else:  # half 1's start was computed: the same command asks for --continue, which finishes it
            assert "it000/half1" in done
            r = _refine(bad / "particles_perturbed.star", out)
            assert r.returncode == 2 and "--continue" in r.stderr
            r = _refine(bad / "particles_perturbed.star", out, "--continue")
            assert r.returncode == 0, r.stderr
        assert (out / "final" / "particles.star").is_file()


def test_continue_on_a_finished_job_says_so_and_changes_nothing(sim, tmp_path):
    out = tmp_path / "job"
    assert _refine(sim / "particles_perturbed.star", out).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _refine(sim / "particles_perturbed.star", out, "--continue")
    assert r.returncode == 0 and "finished" in r.stdout and "nothing to do" in r.stdout
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_reconstruct_without_ctf_columns_needs_ctf_none(sim, tmp_path, capsys):
    from gmmrefine.io.star import read_star, write_star

    tables = read_star(sim / "particles.star")
    tables["particles"] = tables["particles"].drop(columns=[c for c in tables["particles"].columns
                                                            if c.startswith("rlnDefocus")])
    star = sim / "no_ctf.star"
    write_star(star, tables)
    assert cli_main(["reconstruct", "--particles", str(star), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "rlnDefocusU" in err and "--ctf none" in err and not (tmp_path / "a").exists()
    assert cli_main(["reconstruct", "--particles", str(star), "--out", str(tmp_path / "b"), "--ctf", "none"]) == 0
    assert json.loads((tmp_path / "b" / "fsc.json").read_text())["ctf"] == "none"


def test_reconstruct_defaults_to_ctf_weighting_as_relion():
    args = build_parser().parse_args(["reconstruct", "--particles", "p.star", "--out", "o"])
    assert args.ctf == "wiener"


def test_help_gives_one_default_per_option_and_no_source_paths(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        text = sub.format_help()
        assert "(default: None)" not in text and ".py" not in text, name
        for action in sub._actions:
            if action.help and action.help != "==SUPPRESS==":
                shown = sub._get_formatter()._get_help_string(action)
                assert shown.count("default") <= 1 or "(default:" not in shown.split("default", 1)[1], (name, shown)
        description = sub.description or ""
        assert description[:1].isupper() and 0 < description.find(". ") < 400, (name, description)
    # the descriptions that started mid-thought now start by saying what the command does
    starts = {"build-gmm": "Fits a Gaussian mixture model", "demo": "Simulates a small adenylate kinase data set",
              "hetero": "Learns each particle's conformation", "refine": "Refines every particle's pose",
              "reconstruct": "Reconstructs the two half sets"}
    for name, start in starts.items():
        assert commands[name].description.startswith(start), name


def test_health_warnings_reach_log_summary_and_report(tmp_path):
    from gmmrefine.cli.refine import job_warnings
    from gmmrefine.refine.global_refine import health_warnings

    start = {"iteration": 0, "resolution_A": 8.0}
    worse = {"iteration": 1, "resolution_A": 9.5, "convergence": {"move_over_precision_deg": 1.0}}
    assert health_warnings(start, worse, 64, 2.0)[0].startswith("iteration 1: the resolution got worse")
    wild = {"iteration": 2, "resolution_A": 9.4, "convergence": {"move_over_precision_deg": 4.2}}
    assert "4.2 x their angular precision" in health_warnings(worse, wild, 64, 2.0)[0]
    assert health_warnings(worse, {"iteration": 2, "resolution_A": 9.4,
                                   "convergence": {"move_over_precision_deg": 0.5}}, 64, 2.0) == []
    worse["warnings"] = health_warnings(start, worse, 64, 2.0)
    warnings = job_warnings([start, worse], 64, 2.0)
    assert len(warnings) == 2 and "made the resolution worse: 8.00 A at the start, 9.50 A" in warnings[1]

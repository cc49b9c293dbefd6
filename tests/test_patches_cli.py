"""``gmmrefine refine --patches``: gold standard across patches, --continue after SIGKILL and --jobs 2,
each bit-identical to the uninterrupted serial run; bad input refused before anything is written."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _halves import copy_with_half2_changed
from _jobs import differing, patch_outputs, reset_to_before_patches
from _kill import kill_after_step

from gmmrefine.cli.main import main as cli_main
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.io.particles import read_particles

OPTIONS = ["--iterations", "1", "--gmm-steps", "30", "--minres", "40", "--patches", "2", "--patch-iterations", "1"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refine(star: Path, out: Path, *extra: str) -> int:
    return cli_main(["refine", "--particles", str(star), "--out", str(out), *OPTIONS, *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, adk_open_pdb):
    root = tmp_path_factory.mktemp("patches")
    sim = root / "sim"
    assert cli_main(["simulate", "--model", str(adk_open_pdb), "--n", "120", "--box", "32", "--apix", "3.0",
                     "--snr", "1", "--origin-sigma-px", "1", "--perturb-deg", "3", "--perturb-A", "1", "--seed", "3",
                     "--out", str(sim)]) == 0
    # The same data with every half-2 image changed: no half-1 output may notice.
    sim2 = copy_with_half2_changed(sim, root / "sim_odd_changed", seed=5)
    assert _refine(sim / "particles_perturbed.star", root / "A") == 0
    assert _refine(sim2 / "particles_perturbed.star", root / "B") == 0
    return dict(root=root, star=sim / "particles_perturbed.star", A=root / "A", B=root / "B")


def test_patch_outputs_and_report(runs):
    job = runs["A"]
    plan = json.loads((job / "patches" / "patches.json").read_text())
    assert plan["k"] == 2 and [p["name"] for p in plan["patches"]] == ["p01", "p02"]
    for name in ("p01/mask_half1.mrc", "p01/mask_half2.mrc", "p01/mask_eval.mrc", "p01/particles.star",
                 "p02/half1.mrc", "p02/half2.mrc", "p02/fsc.json", "p02/it001/gmm_half2.pdb"):
        assert (job / "patches" / name).is_file(), name
    for name in ("composite_half1.mrc", "composite_half2.mrc", "composite_map.mrc", "composite_fsc.json",
                 "patches.png", "half1.mrc", "map.mrc"):
        assert (job / "final" / name).is_file(), name
    report = (job / "final" / "report.html").read_text()
    assert "patches.png" in report and report.count("<td>p0") == 2
    # Per-patch poses are a STAR file RELION reads: every input row, refined angles.
    ps_in = read_particles(runs["star"])
    ps_patch = read_particles(job / "patches" / "p01" / "particles.star")
    assert len(ps_patch) == len(ps_in) and np.array_equal(ps_patch.subset, ps_in.subset)
    assert not np.allclose(ps_patch.angles_deg, read_particles(job / "final" / "particles.star").angles_deg)
    # Each half's masks come from its own GMM's k-means: the two halves' masks differ, and half 1's
    # mask covers the Gaussians that half 1's k-means put in that patch.
    m1 = read_map(job / "patches" / "p01" / "mask_half1.mrc")[0]
    m2 = read_map(job / "patches" / "p01" / "mask_half2.mrc")[0]
    assert not np.array_equal(m1, m2)
    assert np.allclose(read_map(job / "patches" / "p01" / "mask_eval.mrc")[0], 0.5 * (m1 + m2), atol=1e-6)


def test_gold_standard_half1_ignores_half2_data_across_patches(runs):
    a, b = patch_outputs(runs["A"]), patch_outputs(runs["B"])
    half1 = [k for k in a if "half1" in k.split(":")[0].rsplit("/", 1)[-1] or k.endswith("labels_half1.npy")]
    assert len(half1) >= 15
    for key in half1:
        assert np.array_equal(a[key], b[key]), key
    half2 = [k for k in a if k.split(":")[0].endswith("half2.mrc")]
    assert half2 and all(not np.array_equal(a[k], b[k]) for k in half2)


def test_continue_after_sigkill_in_a_patch_gives_the_same_result(runs):
    out = runs["root"] / "killed"
    reset_to_before_patches(runs["A"], out)
    cmd = [sys.executable, "-m", "gmmrefine", "refine", "--particles", str(runs["star"]), "--out", str(out), *OPTIONS,
           "--continue"]
    # The same thread count as the in-process runs it is compared with.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    kill_after_step(cmd, out / "patches" / "p01" / "state.json", "it001/half1/refine", env=env)
    assert "patches/p01" not in json.loads((out / "state.json").read_text())["done"]
    assert _refine(runs["star"], out, "--continue") == 0
    assert differing(patch_outputs(runs["A"]), patch_outputs(out)) == []


def test_jobs_2_gives_the_same_result_as_jobs_1(runs):
    out = runs["root"] / "jobs2"
    reset_to_before_patches(runs["A"], out)
    assert _refine(runs["star"], out, "--continue", "--jobs", "2") == 0
    assert differing(patch_outputs(runs["A"]), patch_outputs(out)) == []


def test_bad_input_is_refused_and_nothing_is_written(runs, capsys):
    root, star = runs["root"], runs["star"]
    ps = read_particles(star)
    write_map(root / "mask_box.mrc", np.full((ps.box + 8,) * 3, 0.5, np.float32), ps.apix)
    write_map(root / "mask_apix.mrc", np.full((ps.box,) * 3, 0.5, np.float32), 2 * ps.apix)
    write_map(root / "mask_range.mrc", np.full((ps.box,) * 3, 1.5, np.float32), ps.apix)
    unfinished = root / "unfinished"
    reset_to_before_patches(runs["A"], unfinished)
    state = json.loads((unfinished / "state.json").read_text())
    del state["done"]["final"]
    (unfinished / "state.json").write_text(json.dumps(state))
    cases = [
        (["--particles", str(star), "--focus-mask", str(root / "mask_box.mrc")], "px wide"),
        (["--particles", str(star), "--focus-mask", str(root / "mask_apix.mrc")], "pixel size"),
        (["--particles", str(star), "--focus-mask", str(root / "mask_range.mrc")], "[0, 1]"),
        (["--particles", str(star), "--patches", "0"], "--patches"),
        (["--from-job", str(runs["A"]), "--patches", "100000"], "Gaussians of half"),
        (["--from-job", str(unfinished), "--patches", "2"], "finished job"),
        (["--from-job", str(runs["A"]), "--particles", str(star)], "exclude each other"),
        (["--particles", str(star), "--sym", "X7"], "symmetry"),
        (["--particles", str(star), "--iterations", "0", "--patches", "2"], "--iterations"),
    ]
    for i, (argv, words) in enumerate(cases):
        out = root / f"bad{i}"
        capsys.readouterr()
        assert cli_main(["refine", *argv, "--out", str(out), "--gmm-steps", "30"]) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert not out.exists(), argv


def test_from_job_starts_at_the_jobs_poses_and_gmms(runs):
    from gmmrefine.fourier.fsc import fourier_shell_correlation
    from gmmrefine.gmm.model import GaussianMixture

    job, out = runs["A"], runs["root"] / "from_job"
    ps = read_particles(runs["star"])
    mask = np.zeros((ps.box,) * 3, np.float32)
    mask[4:-4, 4:-4, 4:ps.box // 2] = 1.0
    write_map(runs["root"] / "half_box.mrc", mask, ps.apix)
    assert cli_main(["refine", "--from-job", str(job), "--out", str(out), "--focus-mask",
                     str(runs["root"] / "half_box.mrc"), *OPTIONS[:6]]) == 0
    params = json.loads((out / "job.json").read_text())["params"]
    assert params["particles"] == str(job / "final" / "particles.star")
    for h in (1, 2):
        start = GaussianMixture.load(out / "it000" / f"gmm_half{h}.npz")
        last = GaussianMixture.load(job / "it001" / f"gmm_half{h}.npz")
        assert np.array_equal(start.centers_A.numpy(), last.centers_A.numpy())
        fsc = fourier_shell_correlation(torch.as_tensor(read_map(out / "it000" / f"half{h}.mrc")[0]),
                                        torch.as_tensor(read_map(job / "final" / f"half{h}.mrc")[0]))
        assert fsc[1:].min() > 0.999  # the job's final poses (as its STAR file stores them)
    assert json.loads((out / "final" / "focus_fsc.json").read_text())["final"]["resolution_A"] > 0

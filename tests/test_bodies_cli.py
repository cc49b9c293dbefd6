"""``gmmrefine refine --bodies``: per-body poses RELION reads, per-body and local resolution of the
composite, body motions; overlapping masks count the density once; half 1 never sees half 2's data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _halves import copy_with_half2_changed
from _jobs import differing, patch_outputs, reset_to_before_patches
from _kill import kill_after_step

from gmmrefine.cli.main import main as cli_main
from gmmrefine.fourier.masks import soft_sphere
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.io.particles import read_particles

OPTIONS = ["--iterations", "1", "--gmm-steps", "30", "--minres", "40", "--patch-iterations", "2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _refine(star: Path, out: Path, masks: list[Path], *extra: str) -> int:
    return cli_main(["refine", "--particles", str(star), "--out", str(out), *OPTIONS, "--bodies",
                     *[str(m) for m in masks], *extra])


def _body_masks(sim: Path, root: Path) -> list[Path]:
    """The hinged lid (the simulator's domain mask) and the rest of the particle, each grown so that they
    overlap by a few pixels all along their border."""
    lid, apix = read_map(sim / "domain_mask.mrc")
    box = lid.shape[0]
    grown = torch.nn.functional.max_pool3d(torch.as_tensor(lid)[None, None], 5, stride=1, padding=2)[0, 0]
    lid_mask = grown.numpy()
    rest = np.clip(1.0 - lid + (grown.numpy() - lid), 0.0, 1.0)  # 1 - lid, and 1 again where the lid was grown
    rest *= soft_sphere(box, box / 2 - 2, 2.0).numpy()
    paths = [root / "lid.mrc", root / "rest.mrc"]
    for path, m in zip(paths, (lid_mask, rest)):
        write_map(path, m.astype(np.float32), apix)
    return paths


@pytest.fixture(scope="module")
def runs(tmp_path_factory, adk_open_pdb):
    root = tmp_path_factory.mktemp("bodies")
    sim = root / "sim"
    assert cli_main(["simulate", "--model", str(adk_open_pdb), "--n", "120", "--box", "32", "--apix", "3.0",
                     "--snr", "1", "--origin-sigma-px", "1", "--perturb-deg", "3", "--perturb-A", "1", "--seed", "3",
                     "--hinge-residues", "122-159", "--hinge-deg", "10", "--out", str(sim)]) == 0
    masks = _body_masks(sim, root)
    sim2 = copy_with_half2_changed(sim, root / "sim_odd_changed", seed=5)
    # Count the rows the default (the rest subtracted) takes the rest out of.
    calls = []
    import gmmrefine.refine.subtract as subtract

    original = subtract.subtract_rest

    def counted(*args, **kwargs):
        calls.append((len(args[3]), len(args[2].parts) - 1))
        return original(*args, **kwargs)

    subtract.subtract_rest = counted
    try:
        assert _refine(sim / "particles_perturbed.star", root / "A", masks) == 0
        assert _refine(sim2 / "particles_perturbed.star", root / "B", masks) == 0
    finally:
        subtract.subtract_rest = original
    # The same bodies with the rest widened instead, from the jobs above (their global refinement, --from-job).
    for src, dst in (("A", "C"), ("B", "D")):
        assert cli_main(["refine", "--from-job", str(root / src), "--out", str(root / dst), "--gmm-steps", "30",
                         "--minres", "40", "--patch-iterations", "1", "--bodies", *[str(m) for m in masks],
                         "--body-context", "width"]) == 0
    return dict(root=root, sim=sim, star=sim / "particles_perturbed.star", masks=masks, A=root / "A", B=root / "B",
                C=root / "C", D=root / "D", subtracted_rows=sum(n for n, _ in calls),
                rows_less_other_body=sum(n for n, moving in calls if moving == 1))


def test_body_outputs_report_and_relion_reads_the_body_poses(runs):
    from conftest import relion_available

    job = runs["A"]
    plan = json.loads((job / "patches" / "patches.json").read_text())
    assert plan["bodies"] == 2 and [p["name"] for p in plan["patches"]] == ["b01", "b02"]
    # each body is refined in the user's mask, the same for both halves
    for p, mask_path in zip(plan["patches"], runs["masks"]):
        for h in (1, 2):
            assert np.array_equal(read_map(job / "patches" / p["name"] / f"mask_half{h}.mrc")[0], read_map(mask_path)[0])
    ps_in = read_particles(runs["star"])
    start = read_particles(job / "final" / "particles.star")
    motion = json.loads((job / "patches" / "motion.json").read_text())
    with np.load(job / "patches" / "motion.npz") as z:
        rotvec = z["rotvec_deg"]
        assert z["scores"].shape == (len(ps_in), 12)
    for i, name in enumerate(("b01", "b02")):
        body = read_particles(job / "patches" / name / "particles.star")
        assert len(body) == len(ps_in) and np.array_equal(body.subset, ps_in.subset)
        # the motion is the body's pose relative to the consensus: its angle is the poses' angular distance
        from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg

        moved = rotation_angle_deg(euler_to_matrix(torch.as_tensor(start.angles_deg)),
                                   euler_to_matrix(torch.as_tensor(body.angles_deg))).numpy()
        assert np.allclose(np.linalg.norm(rotvec[i], axis=1), moved, atol=1e-3)
        assert motion["bodies"][i]["mean_rotation_deg"] == pytest.approx(float(moved.mean()), abs=1e-3)
        assert float(moved.mean()) > 0.05  # the bodies did move
    assert sum(motion["explained_variance"]) == pytest.approx(1.0)
    log = (job / "log.txt").read_text()
    for name in ("b01", "b02"):
        info = json.loads((job / "patches" / name / "fsc.json").read_text())
        assert info["motion_resolved"] == (info["mean_change_deg"] > info["median_precision_deg"] > 0)
        assert (f"patches/{name}: WARNING: its poses moved" in log) == (not info["motion_resolved"])
    local = json.loads((job / "patches" / "local_resolution.json").read_text())
    lr = read_map(job / "final" / "composite_local_resolution.mrc")[0]
    for b in local["bodies"]:
        assert 6.0 <= b["resolution_A"] <= 40.0 and 6.0 <= b["median_local_resolution_A"] <= 40.0
    assert float(lr.max()) > 0
    for name in ("composite_half1.mrc", "composite_half2.mrc", "composite_map.mrc", "bodies.png"):
        assert (job / "final" / name).is_file(), name
    report = (job / "final" / "report.html").read_text()
    assert "Multi-body refinement" in report and "bodies.png" in report and report.count("<td>b0") == 2
    if relion_available():
        rec = runs["root"] / "b01_relion.mrc"
        subprocess.run(["relion_reconstruct", "--i", str(job / "patches" / "b01" / "particles.star"), "--o", str(rec),
                        "--ctf"], check=True, capture_output=True)
        assert read_map(rec)[0].shape == (32, 32, 32)


def test_overlapping_masks_count_the_density_once(runs):
    """Where both bodies' masks are 1, the composite has the truth's density, not twice it: its
    least-squares scale to the noise-free map there is the global half map's."""
    job = runs["A"]
    truth = read_map(runs["sim"] / "truth_map.mrc")[0].astype(np.float64)
    lid, rest = (read_map(m)[0] for m in runs["masks"])
    both = (lid > 0.99) & (rest > 0.99)
    assert both.sum() >= 50
    t = truth[both] - truth[both].mean()

    def scale(m):
        return float(((m[both] - m[both].mean()) * t).sum() / (t * t).sum())

    for h in (1, 2):
        comp = read_map(job / "final" / f"composite_half{h}.mrc")[0].astype(np.float64)
        glob = read_map(job / "it001" / f"half{h}.mrc")[0].astype(np.float64)
        ratio = scale(comp) / scale(glob)
        print(f"half {h}: scale to the truth in the overlap, composite / global = {ratio:.3f}")
        assert 0.8 <= ratio <= 1.25


def test_gold_standard_half1_ignores_half2_data_with_bodies(runs):
    a_job, b_job = runs["A"], runs["B"]
    files = sorted(p.relative_to(a_job) for p in (a_job / "patches").rglob("*half1*") if p.is_file())
    files += [Path("final") / "composite_half1.mrc"]
    maps = [f for f in files if f.suffix == ".mrc"]
    assert len(maps) >= 8
    for f in files:
        if f.suffix == ".mrc":
            assert np.array_equal(read_map(a_job / f)[0], read_map(b_job / f)[0]), f
        elif f.suffix == ".npz":
            with np.load(a_job / f) as za, np.load(b_job / f) as zb:
                for key in za.files:
                    assert np.array_equal(za[key], zb[key]), (f, key)
    assert not np.array_equal(read_map(a_job / "final" / "composite_half2.mrc")[0],
                              read_map(b_job / "final" / "composite_half2.mrc")[0])


def test_bodies_subtract_the_rest_by_default_and_widen_it_on_request_keeping_the_gold_standard(runs):
    """By default every refined and every SNR-sampled image of both bodies and halves had the rest
    subtracted (2 bodies x 120 particles x (2 refinements + SNR samples + precision sample), counted), in
    iteration 2 the other body at its own poses (lock-step); --body-context width gives other poses, and its
    half 1 also ignores half 2's images."""
    n = len(read_particles(runs["star"]))
    assert runs["subtracted_rows"] >= 2 * n * 3
    # iteration 2's refinement, SNR sample and precision sample of both bodies took the other body out
    assert runs["rows_less_other_body"] >= 2 * n
    a, c, d = runs["A"], runs["C"], runs["D"]
    plan = json.loads((a / "patches" / "patches.json").read_text())
    assert plan["context"] == "subtract" and plan["rest_poses"] == "bodies"
    assert "at their own poses of the previous iteration (lock-step)" in (a / "log.txt").read_text()
    # lock-step: body 2's iteration 1 was done before body 1's iteration 2 began
    body2_iteration1 = (a / "patches" / "b02" / "it001" / "fsc.json").stat().st_mtime
    assert body2_iteration1 <= (a / "patches" / "b01" / "it002" / "gmm_half1.npz").stat().st_mtime
    plan = json.loads((c / "patches" / "patches.json").read_text())
    assert plan["context"] == "width" and plan["bodies"] == 2
    assert "the rest widened" in (c / "log.txt").read_text()
    subtracted = read_particles(a / "patches" / "b01" / "particles.star")
    width = read_particles(c / "patches" / "b01" / "particles.star")
    assert not np.allclose(width.angles_deg, subtracted.angles_deg)
    files = sorted(p.relative_to(c) for p in (c / "patches").rglob("*half1*") if p.is_file() and p.suffix == ".mrc")
    assert len(files) >= 8
    for f in [*files, Path("final") / "composite_half1.mrc"]:
        assert np.array_equal(read_map(c / f)[0], read_map(d / f)[0]), f
    assert not np.array_equal(read_map(c / "final" / "composite_half2.mrc")[0],
                              read_map(d / "final" / "composite_half2.mrc")[0])


def test_lockstep_bodies_continue_after_a_kill_and_with_jobs_2_give_the_same_result(runs):
    """Lock-step rounds resume where a killed run stopped (here in body 1's second iteration, after body 2's
    first), and worker processes (--jobs 2) run each round's bodies side by side: the same bits."""
    star, masks, reference = runs["star"], runs["masks"], patch_outputs(runs["A"])
    parallel = runs["root"] / "lockstep_jobs2"
    reset_to_before_patches(runs["A"], parallel)
    assert _refine(star, parallel, masks, "--continue", "--jobs", "2") == 0
    assert differing(reference, patch_outputs(parallel)) == []
    killed = runs["root"] / "lockstep_killed"
    reset_to_before_patches(runs["A"], killed)
    cmd = [sys.executable, "-m", "gmmrefine", "refine", "--particles", str(star), "--out", str(killed), *OPTIONS,
           "--bodies", *map(str, masks), "--continue"]
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # the reference's thread count
    kill_after_step(cmd, killed / "patches" / "b01" / "state.json", "it002/half1/refine", env=env)
    assert "it002/half2/refine" not in json.loads((killed / "patches" / "b01" / "state.json").read_text())["done"]
    assert _refine(star, killed, masks, "--continue") == 0
    assert differing(reference, patch_outputs(killed)) == []


def test_bodies_bad_input_is_refused_before_anything_is_written(runs, capsys):
    root, star = runs["root"], runs["star"]
    ps = read_particles(star)
    write_map(root / "wrong_box.mrc", np.full((ps.box + 8,) * 3, 0.5, np.float32), ps.apix)
    cases = [([runs["masks"][0], root / "wrong_box.mrc"], [], "px wide"),
             ([root / "missing.mrc"], [], "not found"),
             (runs["masks"], ["--patches", "2"], "--bodies excludes"),
             (runs["masks"], ["--sym", "C2"], "C1"),
             (runs["masks"], ["--body-context", "width", "--body-rest-poses", "bodies"], "nothing is subtracted")]
    out = root / "bad_context"
    assert cli_main(["refine", "--particles", str(star), "--out", str(out), "--body-context", "width"]) == 2
    assert "applies to --bodies only" in capsys.readouterr().err and not out.exists()
    for i, (masks, extra, words) in enumerate(cases):
        out = root / f"bad{i}"
        assert _refine(star, out, masks, *extra) == 2
        assert words in capsys.readouterr().err
        assert not out.exists()

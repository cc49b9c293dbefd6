"""Focused and patch-by-patch refinement on simulated flexible data, against the truth, with global
refinement from the same start as the peer, and their runtimes measured in the same run.

    python benchmarks/focus.py --out /tmp/bench_focus [--n 2000 --box 64 --apix 1.8 --snr 0.1
        --hinge-residues 1-110 --hinge-deg 8 --iterations 3 --focus-iterations 3 --patches 4
        --patch-iterations 3 --c3-n 600 --skip-c3]

Two-body adk (``gmmrefine simulate --hinge-residues``: the residue range turns rigidly about its hinge
by a random angle up to ``--hinge-deg`` per particle; poses perturbed by 2 degrees and 1 A):

1. ``global``: ``gmmrefine refine`` from the perturbed poses, ``--iterations`` global iterations.
2. From it (``--from-job global``), three jobs: ``global_more`` (``--focus-iterations`` more global
   iterations: the peer), ``focused`` (as many focused iterations with the simulator's
   ``domain_mask.mrc``) and ``patches`` (``--iterations 0 --patches K --patch-iterations P``: the
   composite of K patches).
3. Conformation to pose (unless ``--skip-hetero``): ``gmmrefine hetero --job global --mask
   domain_mask.mrc`` (domain poses from each particle's decoded conformation: ``conf_to_pose``), then
   ``refine --from-job global --add-patch hetero`` (as many focused iterations from those poses:
   ``conf_pose_focused``; its composite with the global map: ``conf_pose_composite``), to compare with
   ``focused``.

Measured: masked FSC to the noise-free map (mean over shells up to Nyquist) in the domain, in the rest
of the molecule and in all of it, for the start, each job and the composite; mean angle between each
job's poses (and each patch's) and the domain's / the rest's true per-particle poses; runtime ratios
focused / global and patches / global from the same start, both from the jobs' CPU seconds (user +
system of the process; robust on a shared machine when ``OMP_NUM_THREADS=1``, no thread spins while
waiting) and from the iterations' own wall seconds.

C3 (``--sym C3 --sym-offset-A 20``: three copies of adk, each domain hinged independently): ``c3_global``
(symmetrised global refinement), then from it ``c3_global_more`` and ``c3_focused`` (symmetry-expanded
focused refinement on the first copy's domain, symmetry re-imposed): the same measures in that domain,
pose errors of every expanded copy, and the C3 symmetry error of the re-symmetrised map.

Writes ``results.json`` in ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _run(argv: list[str], log: Path) -> dict:
    """Run ``gmmrefine ARGV``; returns its wall and CPU seconds (children's user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-m", "gmmrefine", *argv], stdout=fh, stderr=subprocess.STDOUT, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0,
            "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def _iteration_seconds(job: Path) -> list[float]:
    """Seconds of each refinement iteration (its GMM fits and passes, both halves) of a job."""
    out = []
    for d in sorted(job.glob("it[0-9][0-9][0-9]")):
        f = d / "fsc.json"
        if d.name != "it000" and f.is_file():
            out.append(float(json.loads(f.read_text())["seconds"]))
    return out


def _regions(sim: Path, job: Path, prefix: str, masks: dict) -> dict:
    from gmmrefine.io.mrc import read_map
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth

    truth = read_map(sim / "truth_map.mrc")[0]
    h1, h2 = (read_map(job / f"{prefix}half{h}.mrc")[0] for h in (1, 2))
    return {name: masked_fsc_to_truth(h1, h2, truth, m) for name, m in masks.items()}


def _pose_errors(sim: Path, star: Path, symmetry: str = "C1") -> dict:
    from gmmrefine.io.star import read_star
    from gmmrefine.pipeline.evaluate import domain_pose_errors

    truth = read_star(sim / "truth.star")["particles"]
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
    angles = read_star(star)["particles"][cols].to_numpy(np.float64)
    dom = domain_pose_errors(truth, angles, symmetry)
    out = {"domain_deg": float(dom.mean()), "domain_std_deg": float(dom.std())}
    if symmetry == "C1":
        import torch

        from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg

        rest = rotation_angle_deg(euler_to_matrix(torch.tensor(angles)),
                                  euler_to_matrix(torch.tensor(truth[cols].to_numpy(np.float64)))).numpy()
        out.update(rest_deg=float(rest.mean()), rest_std_deg=float(rest.std()))
    return out


def two_body(args, out: Path) -> dict:
    from gmmrefine.pipeline.evaluate import simulation_masks

    sim = out / "sim"
    common = ["--gmm-steps", str(args.gmm_steps), "--minres", str(args.minres)]
    if not (sim / "simulation.json").is_file():
        subprocess.run([sys.executable, "-m", "gmmrefine", "simulate", "--model", str(args.model), "--n", str(args.n),
                        "--box", str(args.box), "--apix", str(args.apix), "--snr", str(args.snr),
                        "--hinge-residues", args.hinge_residues, "--hinge-deg", str(args.hinge_deg),
                        "--perturb-deg", "2", "--perturb-A", "1", "--seed", str(args.seed), "--out", str(sim)],
                       check=True, capture_output=True)
    star = sim / "particles_perturbed.star"
    runs = {}
    runs["global"] = _run(["refine", "--particles", str(star), "--out", str(out / "global"), "--iterations",
                           str(args.iterations), *common], out / "global.log")
    more = ["--from-job", str(out / "global")]
    runs["global_more"] = _run(["refine", *more, "--out", str(out / "global_more"), "--iterations",
                                str(args.focus_iterations), *common], out / "global_more.log")
    runs["focused"] = _run(["refine", *more, "--out", str(out / "focused"), "--iterations", str(args.focus_iterations),
                            "--focus-mask", str(sim / "domain_mask.mrc"), *common], out / "focused.log")
    runs["patches"] = _run(["refine", *more, "--out", str(out / "patches"), "--iterations", "0", "--patches",
                            str(args.patches), "--patch-iterations", str(args.patch_iterations), *common],
                           out / "patches.log")
    if not args.skip_hetero:
        # Issue 7: conformation to pose (hetero --mask on the domain), then the same number of focused
        # iterations from those poses (--add-patch), against focused refinement alone from the same job.
        runs["hetero"] = _run(["hetero", "--job", str(out / "global"), "--mask", str(sim / "domain_mask.mrc"),
                               "--epochs", str(args.hetero_epochs), "--out", str(out / "hetero")], out / "hetero.log")
        runs["conf_pose_focused"] = _run(["refine", *more, "--add-patch", str(out / "hetero"), "--out",
                                          str(out / "conf_pose"), "--patch-iterations", str(args.focus_iterations),
                                          *common], out / "conf_pose.log")
    masks = simulation_masks(sim)
    fsc = {"start": _regions(sim, out / "global" / "it000", "", masks),
           "global": _regions(sim, out / "global" / "final", "", masks),
           "global_more": _regions(sim, out / "global_more" / "final", "", masks),
           "focused": _regions(sim, out / "focused" / "final", "", masks),
           "composite": _regions(sim, out / "patches" / "final", "composite_", masks)}
    poses = {"start": _pose_errors(sim, star), "global": _pose_errors(sim, out / "global" / "final" / "particles.star"),
             "global_more": _pose_errors(sim, out / "global_more" / "final" / "particles.star"),
             "focused": _pose_errors(sim, out / "focused" / "final" / "particles.star")}
    if not args.skip_hetero:
        added = out / "conf_pose" / "patches" / "p01"
        fsc.update(conf_to_pose=_regions(sim, out / "hetero", "domain_", masks),
                   conf_pose_focused=_regions(sim, added, "", masks),
                   conf_pose_composite=_regions(sim, out / "conf_pose" / "final", "composite_", masks))
        poses.update(conf_to_pose=_pose_errors(sim, out / "hetero" / "particles_domain.star"),
                     conf_pose_focused=_pose_errors(sim, added / "particles.star"))
    patch_seconds = 0.0
    patches = []
    for d in sorted((out / "patches" / "patches").glob("p[0-9][0-9]")):
        info = json.loads((d / "fsc.json").read_text())
        patch_seconds += info["seconds"]
        patches.append({"name": d.name, **_pose_errors(sim, d / "particles.star"), "seconds": info["seconds"],
                        "masked_resolution_global_A": info["global"]["resolution_A"],
                        "masked_resolution_patch_A": info["patch"]["resolution_A"]})
    per_it = {name: _iteration_seconds(out / name) for name in ("global", "global_more", "focused")}
    global_it = float(np.mean(per_it["global_more"]))
    # CPU: the same start (iteration 0 at the global job's poses) and the same number of iterations
    # (focus_iterations = patch_iterations by default), so the ratios are of the iterations.
    cpu = {k: v["cpu_s"] for k, v in runs.items()}
    same = args.focus_iterations == args.patch_iterations
    timing = {"seconds_per_iteration": {k: float(np.mean(v)) for k, v in per_it.items()},
              "focused_over_global_per_iteration_wall": float(np.mean(per_it["focused"])) / global_it,
              "focused_over_global_cpu": cpu["focused"] / cpu["global_more"],
              "patch_stage_seconds": patch_seconds,
              "patches_over_global_wall": patch_seconds / (args.patch_iterations * global_it),
              "patches_over_global_cpu": cpu["patches"] / cpu["global_more"] if same else None,
              "runs": runs}
    composite = json.loads((out / "patches" / "final" / "composite_fsc.json").read_text())
    return {"fsc_to_truth_mean": fsc, "pose_errors": poses, "patches": patches, "timing": timing,
            "gold_standard_resolution_A": {"global": composite["start_resolution_A"],
                                           "composite": composite["resolution_A"]}}


def c3(args, out: Path) -> dict:
    import torch

    from gmmrefine.fourier.masks import radius_grid
    from gmmrefine.io.mrc import read_map
    from gmmrefine.refine.composite import symmetry_error

    sim = out / "sim_c3"
    common = ["--gmm-steps", str(args.gmm_steps), "--minres", str(args.minres), "--sym", "C3"]
    if not (sim / "simulation.json").is_file():
        subprocess.run([sys.executable, "-m", "gmmrefine", "simulate", "--model", str(args.model), "--n", str(args.c3_n),
                        "--box", str(args.c3_box), "--apix", str(args.apix), "--snr", str(args.snr),
                        "--hinge-residues", args.hinge_residues, "--hinge-deg", str(args.hinge_deg),
                        "--sym", "C3", "--sym-offset-A", "20", "--perturb-deg", "2", "--perturb-A", "1",
                        "--seed", str(args.seed), "--out", str(sim)], check=True, capture_output=True)
    star = sim / "particles_perturbed.star"
    runs = {}
    runs["c3_global"] = _run(["refine", "--particles", str(star), "--out", str(out / "c3_global"), "--iterations",
                              str(args.iterations), *common], out / "c3_global.log")
    runs["c3_global_more"] = _run(["refine", "--from-job", str(out / "c3_global"), "--out", str(out / "c3_global_more"),
                                   "--iterations", str(args.focus_iterations), *common], out / "c3_global_more.log")
    runs["c3_focused"] = _run(["refine", "--from-job", str(out / "c3_global"), "--out", str(out / "c3_focused"),
                               "--iterations", str(args.focus_iterations), "--focus-mask",
                               str(sim / "domain_mask.mrc"), *common], out / "c3_focused.log")
    mask = {"domain": torch.as_tensor(read_map(sim / "domain_mask.mrc")[0])}
    fsc = {"start": _regions(sim, out / "c3_global" / "it000", "", mask)["domain"],
           "global": _regions(sim, out / "c3_global" / "final", "", mask)["domain"],
           "global_more": _regions(sim, out / "c3_global_more" / "final", "", mask)["domain"],
           "focused_c1_expanded": _regions(sim, out / "c3_focused" / "final", "", mask)["domain"],
           "focused_resymmetrised": _regions(sim, out / "c3_focused" / "final", "composite_", mask)["domain"]}
    poses = {name: _pose_errors(sim, path, "C3") for name, path in (
        ("start", star), ("global_more", out / "c3_global_more" / "final" / "particles.star"),
        ("focused", out / "c3_focused" / "final" / "particles.star"))}
    truth = torch.as_tensor(read_map(sim / "truth_map.mrc")[0])
    inner = radius_grid(truth.shape[-1]) < truth.shape[-1] / 2 - 4
    comp = json.loads((out / "c3_focused" / "final" / "composite_fsc.json").read_text())
    gm = torch.as_tensor(read_map(out / "c3_global_more" / "final" / "map.mrc")[0])
    sym = {"resymmetrised_map_raw": comp["symmetry_error_of_map"],
           "resymmetrised_map_blur1.5px": comp["symmetry_error_of_map_blur1.5px"],
           "symmetrised_global_map_raw": symmetry_error(gm, "C3", inner),
           "symmetrised_global_map_blur1.5px": symmetry_error(gm, "C3", inner, blur_px=1.5),
           "truth_raw": symmetry_error(truth, "C3", inner), "truth_blur1.5px": symmetry_error(truth, "C3", inner,
                                                                                               blur_px=1.5)}
    per_it = {name: _iteration_seconds(out / name) for name in ("c3_global", "c3_global_more", "c3_focused")}
    timing = {"seconds_per_iteration": {k: float(np.mean(v)) for k, v in per_it.items()},
              "focused_expanded_over_global_per_iteration_wall": float(np.mean(per_it["c3_focused"]))
              / float(np.mean(per_it["c3_global_more"])),
              "focused_expanded_over_global_cpu": runs["c3_focused"]["cpu_s"] / runs["c3_global_more"]["cpu_s"],
              "runs": runs}
    return {"domain_fsc_to_truth_mean": fsc, "pose_errors": poses, "symmetry_error": sym, "timing": timing}


def _table(res: dict) -> str:
    lines = []
    tb = res.get("two_body")
    if tb:
        lines.append("two-body: masked FSC to truth (mean over shells up to Nyquist)")
        lines.append(f"{'':14s}{'domain':>9s}{'rest':>9s}{'whole':>9s}")
        for name, v in tb["fsc_to_truth_mean"].items():
            lines.append(f"{name:14s}{v['domain']:9.4f}{v['rest']:9.4f}{v['whole']:9.4f}")
        lines.append("pose error against the truth (degrees, mean)")
        lines.append(f"{'':14s}{'domain':>9s}{'rest':>9s}")
        for name, v in tb["pose_errors"].items():
            lines.append(f"{name:14s}{v['domain_deg']:9.2f}{v['rest_deg']:9.2f}")
        for p in tb["patches"]:
            lines.append(f"{'patch ' + p['name']:14s}{p['domain_deg']:9.2f}{p['rest_deg']:9.2f}   masked res "
                         f"{p['masked_resolution_global_A']:.2f} -> {p['masked_resolution_patch_A']:.2f} A")
        t = tb["timing"]
        lines.append(f"seconds per iteration: {json.dumps({k: round(v, 1) for k, v in t['seconds_per_iteration'].items()})}")
        k = len(tb["patches"])
        cpu_patch = t["patches_over_global_cpu"]
        lines.append(f"focused / global: {t['focused_over_global_cpu']:.2f} (CPU), "
                     f"{t['focused_over_global_per_iteration_wall']:.2f} (wall per iteration); {k} patches / global "
                     f"(same iterations): {'n/a' if cpu_patch is None else f'{cpu_patch:.2f}'} (CPU), "
                     f"{t['patches_over_global_wall']:.2f} (wall)")
    c = res.get("c3")
    if c:
        lines.append("C3: domain masked FSC to truth: " + ", ".join(f"{k} {v:.4f}" for k, v in
                                                               c["domain_fsc_to_truth_mean"].items()))
        lines.append("C3: domain pose error (deg, every expanded copy): " + ", ".join(
            f"{k} {v['domain_deg']:.2f}" for k, v in c["pose_errors"].items()))
        lines.append("C3 symmetry error (max |R V - V| / peak): " + ", ".join(
            f"{k} {v:.2e}" for k, v in c["symmetry_error"].items()))
        lines.append(f"C3 focused (expanded, 3 copies per particle) / symmetrised global: "
                     f"{c['timing']['focused_expanded_over_global_cpu']:.2f} (CPU), "
                     f"{c['timing']['focused_expanded_over_global_per_iteration_wall']:.2f} (wall per iteration)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "src" / "gmmrefine" / "data" / "adk_open.pdb")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--apix", type=float, default=1.8)
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--hinge-residues", default="1-110")
    parser.add_argument("--hinge-deg", type=float, default=8.0)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--focus-iterations", type=int, default=3)
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--patch-iterations", type=int, default=3)
    parser.add_argument("--gmm-steps", type=int, default=150)
    parser.add_argument("--minres", type=float, default=50.0)
    parser.add_argument("--c3-n", type=int, default=600)
    parser.add_argument("--c3-box", type=int, default=80)
    parser.add_argument("--skip-c3", action="store_true")
    parser.add_argument("--skip-two-body", action="store_true")
    parser.add_argument("--skip-hetero", action="store_true", help="no conformation-to-pose arm (issue 7)")
    parser.add_argument("--hetero-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if not args.skip_two_body:
        res["two_body"] = two_body(args, args.out)
        (args.out / "results.json").write_text(json.dumps(res, indent=2))
    if not args.skip_c3:
        res["c3"] = c3(args, args.out)
    (args.out / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    print(_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

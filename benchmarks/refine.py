"""Accuracy and speed of `gmmrefine refine` on simulated adk data, against the truth, its noise floor
and `relion_refine_mpi` local refinement from the same poses, in one run.

    python benchmarks/refine.py --out /tmp/bench_refine [--n 2000 --box 96 --apix 1.2 --snr 0.1
                                 --iterations 3 --floor-n 500 --relion]

1. Simulates adk (bundled model) with poses perturbed by exactly 4 degrees and 1 A (`gmmrefine simulate`).
2. `gmmrefine refine` from the perturbed poses; per iteration: mean angular and shift error against the
   truth, gold-standard resolution, resolution of the FSC of the half-map average to the truth map
   (FSC 0.5), the same inside a soft mask of the truth map, and wall time.
3. Floor: the same pose optimiser, started from the true poses, against a GMM of the noise-free truth
   map built at the band the refinement reached, for as many iterations (on ``--floor-n`` particles):
   the pose error that noise alone leaves.
4. The fraction of the gap (start error - floor) closed after each iteration.
5. With --relion: `relion_refine_mpi` local refinement (``RELION_OPTIONS``: the settings a RELION user
   would pick for a local refinement of a consensus) from the same poses, with our start map
   low-passed to 8 A as reference, 3 MPI ranks on the same 2 cores; its wall time per iteration (from the
   times its iteration files appear), total time, final pose error and FSC to the truth (plain and masked).

Writes ``results.json`` in ``--out`` and prints a table. Measured numbers are in the issue notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def pose_errors(angles_deg: np.ndarray, shift_A: np.ndarray, truth, rows=None) -> tuple[float, float]:
    from gmmrefine.pipeline.evaluate import pose_errors as errors

    rows = slice(None) if rows is None else rows
    return errors(angles_deg, shift_A, truth.angles_deg[rows], truth.shift_A[rows])


def fsc_to_truth(half1: np.ndarray, half2: np.ndarray, truth_map: np.ndarray, apix: float,
                 mask: np.ndarray | None = None) -> float:
    """Resolution (A, FSC 0.5) of the half-map average against the truth map, optionally both masked."""
    from gmmrefine.pipeline.evaluate import resolution_to_truth

    if mask is None:
        return resolution_to_truth(half1, half2, truth_map, apix, 0.5)
    return resolution_to_truth(half1 * mask, half2 * mask, truth_map * mask, apix, 0.5)


def truth_mask(truth_map: np.ndarray, apix: float) -> np.ndarray:
    """Soft mask of the noise-free map: 8 A low-pass above 2 % of its maximum, dilated 3 px, 6 px edge."""
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.fourier.masks import mask_from_map

    smooth = low_pass(torch.as_tensor(truth_map), 8.0, apix)
    return mask_from_map(smooth, 0.02 * float(smooth.max())).numpy()


def oracle_floor(sim: Path, resolution_A: float, iterations: int, minres_A: float, gmm_steps: int,
                 n_particles: int) -> list[tuple[float, float]]:
    """Mean angular and shift error per iteration of the optimiser started at the truth, against the truth
    map's GMM, on the first ``n_particles`` particles (an unbiased sample: the poses are random)."""
    from gmmrefine.fourier.ctf import ctf_for_box
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.geometry.rotations import euler_to_matrix, matrix_to_euler
    from gmmrefine.geometry.shifts import image_translation_px
    from gmmrefine.gmm.build import build_gmm
    from gmmrefine.gmm.project import fourier_band
    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import iter_image_chunks, read_particles
    from gmmrefine.refine.poses import PoseSettings, particle_band, refine_poses

    truth = read_particles(sim / "particles.star")
    vol, apix = read_map(sim / "truth_map.mrc")
    from gmmrefine.gmm.build import REFERENCE_SPACING_FRACTION, estimate_n

    reference = low_pass(torch.as_tensor(vol), resolution_A, apix)
    # The same N rule as the refinement's references (refine/global_refine.py: build_half_gmm).
    n = estimate_n(reference, apix, resolution_A, spacing_fraction=REFERENCE_SPACING_FRACTION)
    gmm, _ = build_gmm(reference, apix, resolution_A, n=n, seed=0, steps=gmm_steps)
    band = fourier_band(truth.box, apix, minres_A, resolution_A)
    angles = np.array(truth.angles_deg)
    shifts = np.array(truth.shift_A)
    subset = np.arange(min(n_particles, len(truth)))
    errors = []
    for _ in range(iterations):
        for idx, images in iter_image_chunks(truth, subset, 20000):
            ctf = ctf_for_box(truth.box, apix, **truth.ctf.as_tensors(idx)).float()
            rot = euler_to_matrix(torch.as_tensor(angles[idx])).float()
            t0 = image_translation_px(torch.as_tensor(shifts[idx]), apix).float()
            res = refine_poses(gmm, particle_band(torch.from_numpy(images), band, ctf), rot, t0, band, PoseSettings())
            angles[idx] = matrix_to_euler(res.rotations.double()).numpy()
            shifts[idx] = shifts[idx] - (res.translation_px.double() - t0.double()).numpy() * apix
        errors.append(pose_errors(angles[subset], shifts[subset], truth, subset))
    return errors


RELION_OPTIONS = ["--auto_refine", "--split_random_halves", "--ini_high", "8", "--healpix_order", "4",
                  "--auto_local_healpix_order", "4", "--sigma_ang", "2", "--offset_range", "3", "--offset_step", "1",
                  "--ctf", "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--pad", "2", "--j", "1",
                  "--pool", "30", "--dont_combine_weights_via_disc", "--sym", "C1", "--norm", "--scale"]


def relion_poses(star: Path, truth) -> tuple[np.ndarray, np.ndarray]:
    """Angles and origins (A) of a RELION output STAR, in the row order of ``truth`` (matched by image name)."""
    from gmmrefine.io.star import read_star

    df = read_star(star)["particles"]
    order = {name: i for i, name in enumerate(df["rlnImageName"].astype(str))}
    rows = np.array([order[name] for name in truth.particles["rlnImageName"].astype(str)])
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(dtype=np.float64)[rows]
    shifts = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(dtype=np.float64)[rows]
    return angles, shifts


def run_relion(sim: Path, job: Path, out: Path, truth, truth_map: np.ndarray, mask: np.ndarray, apix: float,
               diameter_A: float, timeout_s: float | None = None, reuse: bool = False) -> dict:
    """``relion_refine_mpi`` local refinement (3 MPI ranks: a leader and one worker per half, one thread
    each, i.e. the 2 cores) from the perturbed poses, with the start map of our job low-passed to 8 A as
    reference. Returns its wall time (total and per iteration), peak RSS of its ranks together, pose error
    and FSC to the truth (resolutions at 0.5, and the masked FSC's mean over shells,
    :func:`gmmrefine.pipeline.evaluate.masked_fsc_to_truth`). With ``timeout_s`` a run still going then is
    stopped and judged by its last finished iteration (``converged`` False). With ``reuse`` a converged run
    already in ``out/relion`` (``run_data.star``) is judged again, not run again: its wall time and RSS are
    then those its files and ``rss.*`` reports recorded (start-up time unknown: from the first iteration)."""
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.io.mrc import read_map, write_map

    rdir = out / "relion"
    if reuse and (rdir / "run_data.star").is_file():
        return _judge_relion(rdir, None, None, True, truth, truth_map, mask, apix)
    shutil.rmtree(rdir, ignore_errors=True)
    rdir.mkdir(parents=True)
    h1, h2 = (torch.as_tensor(read_map(job / "it000" / f"half{h}.mrc")[0]) for h in (1, 2))
    if h1.shape != truth_map.shape:
        raise ValueError(f"{job}/it000: the start maps are {h1.shape[-1]} px, the particles {truth_map.shape[-1]} px")
    write_map(rdir / "ref.mrc", low_pass(0.5 * (h1 + h2), 8.0, apix).numpy(), apix)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi",
           "--i", "particles_perturbed.star", "--o", str(rdir / "run"), "--ref", str(rdir / "ref.mrc"),
           "--particle_diameter", str(diameter_A), *RELION_OPTIONS]
    t0 = time.time()
    converged = True
    with open(rdir / "log.txt", "w") as log:
        # /usr/bin/time -v under mpirun would time mpirun itself; RSS is summed over the ranks' reports
        ranks = ["bash", "-c", '/usr/bin/time -v -o "$0.$OMPI_COMM_WORLD_RANK" "$@"', str(rdir / "rss")]
        proc = subprocess.Popen(cmd[:5] + ranks + cmd[5:], cwd=sim, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            if proc.wait(timeout=timeout_s) != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd)
        except subprocess.TimeoutExpired:
            converged = False
            os.killpg(proc.pid, 15)  # mpirun passes it on to its ranks; time -v still reports each
            proc.wait()
    return _judge_relion(rdir, cmd, t0, converged, truth, truth_map, mask, apix)


def relion_current_size(rdir: Path, iteration: int) -> tuple[int | None, float | None]:
    """``(rlnCurrentImageSize px, rlnCurrentResolution A)`` that RELION's half-1 model file of an iteration
    records (the Fourier box its images are cropped to, RELION's working grid); None where not written."""
    path = rdir / f"run_it{iteration:03d}_half1_model.star"
    if not path.is_file():
        return None, None
    text = path.read_text()
    size = re.search(r"_rlnCurrentImageSize\s+(\d+)", text)
    res = re.search(r"_rlnCurrentResolution\s+([\d.eE+-]+|inf)", text)
    return (int(size.group(1)) if size else None), (float(res.group(1)) if res else None)


def _judge_relion(rdir: Path, cmd: list[str] | None, t0: float | None, converged: bool, truth, truth_map: np.ndarray,
                  mask: np.ndarray, apix: float) -> dict:
    """:func:`run_relion`'s measurements of the run in ``rdir`` (``t0``: its start, None if not known)."""
    from gmmrefine.io.mrc import read_map
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth

    its = sorted(rdir.glob("run_it[0-9][0-9][0-9]_data.star"))
    if t0 is None:
        t0 = its[0].stat().st_mtime
    wall = (rdir / "run_data.star").stat().st_mtime - t0 if converged and cmd is None else time.time() - t0
    rss_mb = sum(int(m.group(1)) for f in rdir.glob("rss.*")
                 if (m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", f.read_text()))) / 1024
    # Iteration k ends when run_itNNN_data.star is written; iteration 0 is RELION's start-up pass.
    stamps = [t0] + [p.stat().st_mtime for p in its]
    per_it = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # iterations 1.. (after the start-up pass)
    if converged:
        data, maps = rdir / "run_data.star", [rdir / f"run_half{h}_class001_unfil.mrc" for h in (1, 2)]
    else:  # the last finished iteration
        last = its[-1].name[:len("run_itNNN")]
        data, maps = its[-1], [rdir / f"{last}_half{h}_class001.mrc" for h in (1, 2)]
        wall = stamps[-1] - t0
    angles, shifts = relion_poses(data, truth)
    ang, sh = pose_errors(angles, shifts, truth)
    r1 = read_map(maps[0])[0]
    r2 = read_map(maps[1])[0]
    sizes = [relion_current_size(rdir, k) for k in range(1, len(its))]
    return {"command": None if cmd is None else " ".join(cmd), "wall_s": wall, "iterations": len(its) - 1, "peak_rss_MB": rss_mb,
            "converged": converged, "image_size_each": [x[0] for x in sizes], "resolution_A_each": [x[1] for x in sizes],
            "masked_fsc": masked_fsc_to_truth(r1, r2, truth_map, mask),
            "startup_s": stamps[1] - stamps[0] if len(stamps) > 1 else None,
            "seconds_per_iteration": float(np.mean(per_it)) if per_it else wall,
            "seconds_per_iteration_each": per_it, "angular_error_deg": ang, "shift_error_A": sh,
            "fsc05_to_truth_A": fsc_to_truth(r1, r2, truth_map, apix),
            "masked_fsc05_to_truth_A": fsc_to_truth(r1, r2, truth_map, apix, mask)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=96)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--gmm-steps", type=int, default=150)
    parser.add_argument("--minres", type=float, default=50.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--floor-n", type=int, default=500, help="particles the noise floor is measured on")
    parser.add_argument("--refine-args", default="", help="extra options for gmmrefine refine (quoted)")
    parser.add_argument("--relion", action="store_true", help="also run relion_refine_mpi local refinement")
    parser.add_argument("--diameter", type=float, default=100.0, help="particle diameter for RELION, A")
    args = parser.parse_args()

    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sim = out / "sim"
    model = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data" / "adk_open.pdb"
    gm = [sys.executable, "-m", "gmmrefine"]
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run(gm + ["simulate", "--model", str(model), "--n", str(args.n), "--box", str(args.box),
                             "--apix", str(args.apix), "--snr", str(args.snr), "--perturb-deg", "4", "--perturb-A", "1",
                             "--seed", str(args.seed), "--out", str(sim)], check=True)
    job = out / "job"
    shutil.rmtree(job, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(gm + ["refine", "--particles", str(sim / "particles_perturbed.star"), "--out", str(job),
                         "--iterations", str(args.iterations), "--gmm-steps", str(args.gmm_steps),
                         "--minres", str(args.minres), *args.refine_args.split()], check=True)
    wall = time.perf_counter() - t0

    from gmmrefine.refine.global_refine import it_dir

    truth = read_particles(sim / "particles.star")
    truth_map, apix = read_map(sim / "truth_map.mrc")
    mask = truth_mask(truth_map, apix)
    rows = []
    for k in range(args.iterations + 1):
        d = job / it_dir(k)
        fsc = json.loads((d / "fsc.json").read_text())
        if k == 0:
            ps = read_particles(sim / "particles_perturbed.star")
            angles, shifts = ps.angles_deg, ps.shift_A
        else:
            ps = read_particles(d / "particles.star")
            angles, shifts = ps.angles_deg, ps.shift_A
        ang, sh = pose_errors(angles, shifts, truth)
        rows.append({"iteration": k, "angular_error_deg": ang, "shift_error_A": sh,
                     "gold_standard_A": fsc["resolution_A"], "half_estimates_A": fsc["half_resolution_A"],
                     "fsc05_to_truth_A": fsc_to_truth(read_map(d / "half1.mrc")[0], read_map(d / "half2.mrc")[0],
                                                      truth_map, apix),
                     "masked_fsc05_to_truth_A": fsc_to_truth(read_map(d / "half1.mrc")[0],
                                                             read_map(d / "half2.mrc")[0], truth_map, apix, mask),
                     "seconds": fsc.get("seconds")})
    last_res = min(float(v) for v in rows[-1]["half_estimates_A"].values())
    band_res = max(last_res, 2 * apix)
    t1 = time.perf_counter()
    floor = oracle_floor(sim, band_res, args.iterations, args.minres, args.gmm_steps, args.floor_n)
    floor_s = time.perf_counter() - t1
    floor_ang, floor_sh = floor[-1]
    start_ang, start_sh = rows[0]["angular_error_deg"], rows[0]["shift_error_A"]
    for r in rows:
        r["angular_gap_closed"] = (start_ang - r["angular_error_deg"]) / max(start_ang - floor_ang, 1e-9)
        r["shift_gap_closed"] = (start_sh - r["shift_error_A"]) / max(start_sh - floor_sh, 1e-9)
    result = {"settings": vars(args) | {"out": str(args.out)}, "refine_wall_s": wall, "rows": rows,
              "floor": {"band_A": band_res, "per_iteration": floor, "seconds": floor_s},
              "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if args.relion:
        result["relion"] = run_relion(sim, job, out, truth, truth_map, mask, apix, args.diameter)
        ours_it = float(np.mean([r["seconds"] for r in rows[1:]]))
        result["speed"] = {"ours_seconds_per_iteration": ours_it,
                           "relion_seconds_per_iteration": result["relion"]["seconds_per_iteration"],
                           "per_iteration_speedup": result["relion"]["seconds_per_iteration"] / ours_it,
                           "total_speedup": result["relion"]["wall_s"] / wall}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"floor (oracle, band to {band_res:.2f} A): " + ", ".join(f"{a:.2f} deg / {s:.2f} A" for a, s in floor))
    print("it  ang_err  shift_err  gap_ang  gap_shift  gold_A  fsc0.5_truth_A  masked_A  seconds")
    for r in rows:
        print(f"{r['iteration']:2d}  {r['angular_error_deg']:7.2f}  {r['shift_error_A']:9.2f}  "
              f"{r['angular_gap_closed']:7.0%}  {r['shift_gap_closed']:9.0%}  {r['gold_standard_A']:6.2f}  "
              f"{r['fsc05_to_truth_A']:14.2f}  {r['masked_fsc05_to_truth_A']:8.2f}  {r['seconds'] or 0:7.0f}")
    print(f"refine wall time {wall:.0f} s")
    if args.relion:
        r = result["relion"]
        print(f"relion_refine_mpi: {r['wall_s']:.0f} s, {r['iterations']} iterations "
              f"({r['seconds_per_iteration']:.0f} s each), angular error {r['angular_error_deg']:.2f} deg, "
              f"shift error {r['shift_error_A']:.2f} A, FSC 0.5 to truth {r['fsc05_to_truth_A']:.2f} A "
              f"(masked {r['masked_fsc05_to_truth_A']:.2f} A)")
        sp = result["speed"]
        print(f"per iteration: ours {sp['ours_seconds_per_iteration']:.0f} s, RELION "
              f"{sp['relion_seconds_per_iteration']:.0f} s (ratio {sp['per_iteration_speedup']:.2f}x); "
              f"total: ratio {sp['total_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

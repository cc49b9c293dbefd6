"""What an iteration costs at users' box sizes, against `gmmrefine reconstruct`, the code before the
working-grid change, and `relion_refine_mpi` (issue 17), in one run.

    python benchmarks/boxes.py --out /tmp/bench_boxes [--boxes 128 256 384 512 --counts 100 2000
                               --baseline /path/to/old/src --relion]

1. Per box: the bundled adk model simulated at 1 A/px (``--sim-n`` images, SNR 0.05, poses 3 degrees and
   1 A off), and STAR files of each ``--counts`` rows cycling through that stack (the images are read
   from disk as real data; ``replicate_star`` of benchmarks/reconstruct.py). Same protein, same pixel
   size, same band at every box.
2. Per box and count: ``gmmrefine refine --iterations auto --max-iterations 1 --resolution-start 8``
   (one refinement iteration in the band 50-8 A): from its ``state.json`` the wall time of iteration 0
   (the full-size reconstruction at the input poses and the start FSC), of iteration 1 (both halves'
   GMM fits, pose refinement and working-grid reconstruction) and of the full-size maps of the final
   poses; peak RSS by ``/usr/bin/time -v``. Beside it ``gmmrefine reconstruct --ctf wiener`` of the same
   particles (the peer the fixed part is judged against).
3. ``--baseline SRC``: the same ``refine --iterations 1 --resolution-start 8`` run with the package in
   ``SRC`` (a checkout of the code before this change with its C library built, e.g. ``git worktree add
   /tmp/old 2183d11 && cd /tmp/old && python setup.py build_ext --inplace``), at the smallest count.
4. ``--relion``: at box 256, ``--relion-n`` particles of an octahedral assembly of adk (24 copies, 576 kDa)
   whose copies' lids hinge independently (C1 data), poses 3 degrees and 1 A off: ``gmmrefine refine``
   (``--iterations auto``) and ``relion_refine_mpi`` local auto-refine (``benchmarks/refine.py``
   ``RELION_OPTIONS``, reference: our start map low-passed to 8 A), each to convergence, same 2 cores:
   seconds per iteration, total, pose error and masked FSC to the noise-free map, peak RSS.
5. ``--same-start K ...``: the same data; a fresh ``gmmrefine refine`` job, then for each of its iterations
   K one ``relion_refine_mpi`` iteration from the start our iteration K had, on the grid it worked on
   (:func:`relion_same_start`): the two programs' cost per iteration at equal work.

Writes ``results.json`` in ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruct import measured, replicate_star

from gmmrefine.io.atomic import write_json_atomic

MODEL = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data" / "adk_open.pdb"


def gm(*args: str) -> list[str]:
    return [sys.executable, "-m", "gmmrefine", *args]


def simulate(out: Path, box: int, n: int, *extra: str, name: str | None = None) -> Path:
    sim = out / (name or f"sim_{box}")
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run(gm("simulate", "--model", str(MODEL), "--n", str(n), "--box", str(box), "--apix", "1.0",
                          "--snr", "0.05", "--perturb-deg", "3", "--perturb-A", "1", "--seed", "11", "--device", "cpu",
                          "--out", str(sim), *extra), check=True, stdout=subprocess.DEVNULL)
    return sim


def step_seconds(job: Path) -> dict:
    """Seconds of iteration 0, of the refinement iterations (each half's GMM and refine steps), of the
    full-size maps and of the precision's reference error, from the job's ``state.json``."""
    done = json.loads((job / "state.json").read_text())["done"]
    its: dict[str, float] = {}
    for step, info in done.items():
        if not isinstance(info, dict) or "seconds" not in info:
            continue
        it = step.split("/")[0]
        if step.endswith("/full_maps"):
            its["full_maps"] = its.get("full_maps", 0.0) + info["seconds"]
        elif step.endswith("/precision"):
            its["precision"] = its.get("precision", 0.0) + info["seconds"]
        else:
            its[it] = its.get(it, 0.0) + info["seconds"]
    boxes = {step: (info.get("work_box"), info.get("map_box")) for step, info in done.items()
             if isinstance(info, dict) and "work_box" in info}
    return {"it000_s": its.get("it000", 0.0), "iterations_s": [v for k, v in sorted(its.items())
                                                               if k.startswith("it") and k != "it000"],
            "full_maps_s": its.get("full_maps", 0.0), "precision_s": its.get("precision", 0.0), "boxes": boxes}


def box_rows(out: Path, boxes: list[int], counts: list[int], sim_n: int, baseline: Path | None,
             baseline_boxes: list[int], largest_box_counts: list[int] | None) -> list[dict]:
    rows = []
    for box in boxes:
        sim = simulate(out, box, sim_n)
        for n in (largest_box_counts or counts) if box == max(boxes) else counts:
            star = sim / f"n{n}.star"  # beside the stack its image names point to
            if not star.is_file():
                replicate_star(sim / "particles_perturbed.star", star, n)
            row: dict = {"box": box, "n": n}
            rec = out / f"rec_{box}_{n}"
            shutil.rmtree(rec, ignore_errors=True)
            row["reconstruct"] = measured(gm("reconstruct", "--particles", str(star), "--out", str(rec), "--ctf", "wiener"))
            job = out / f"job_{box}_{n}"
            shutil.rmtree(job, ignore_errors=True)
            row["refine"] = measured(gm("refine", "--particles", str(star), "--out", str(job), "--iterations", "auto",
                                     "--max-iterations", "1", "--resolution-start", "8"))
            row["refine"].update(step_seconds(job))
            if baseline is not None and n == min(counts) and box in baseline_boxes:
                old = out / f"old_{box}_{n}"
                shutil.rmtree(old, ignore_errors=True)
                env = dict(os.environ, PYTHONPATH=str(baseline))
                row["baseline"] = measured(gm("refine", "--particles", str(star), "--out", str(old), "--iterations", "1",
                                           "--resolution-start", "8"), env=env)
                row["baseline"].update(step_seconds(old))
            rows.append(row)
            print_row(row, flush=True)
            shutil.rmtree(rec, ignore_errors=True)
    return rows


def print_row(r: dict, flush: bool = False) -> None:
    f = r["refine"]
    it1 = f["iterations_s"][0] if f["iterations_s"] else float("nan")
    rec = r["reconstruct"]
    line = (f"{r['box']:4d} {r['n']:6d}  refine {f['wall_s']:7.0f} s (it000 {f['it000_s']:6.0f}, iteration "
            f"{it1:6.1f}, full maps {f['full_maps_s']:6.0f}) {f['peak_rss_MB']:7.0f} MB | reconstruct {rec['wall_s']:6.0f} s "
            f"{rec['peak_rss_MB']:6.0f} MB | iteration / reconstruct {it1 / rec['wall_s']:.2f}")
    if "baseline" in r:
        b = r["baseline"]
        line += (f" | before: {b['wall_s']:.0f} s (iteration {b['iterations_s'][0] if b['iterations_s'] else 0:.0f}) "
                 f"{b['peak_rss_MB']:.0f} MB, {b['wall_s'] / f['wall_s']:.1f}x")
    print(line, flush=flush)


def relion_comparison(out: Path, n: int, relion_timeout_s: float | None = None, previous: dict | None = None) -> dict:
    """Box 256, an O assembly of adk (per-copy hinges), gmmrefine against relion_refine_mpi, to convergence.
    With ``previous`` (the ``relion`` entry of an earlier ``results.json`` in ``out``) neither program runs
    again: gmmrefine's measurements are kept and RELION's finished folder is judged again."""
    from refine import run_relion, truth_mask

    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth, pose_errors

    sim = simulate(out, 256, n, "--sym", "O", "--hinge-residues", "122-159", "--hinge-deg", "8", name=f"sim_O256_{n}")
    truth = read_particles(sim / "particles.star")
    truth_map, apix = read_map(sim / "truth_map.mrc")
    mask = truth_mask(truth_map, apix)
    result: dict = {"n": n}
    job = out / "relion_cmp_gmmrefine"
    if previous is not None:
        result["gmmrefine"] = previous["gmmrefine"]
        result["relion"] = run_relion(sim, job, out, truth, truth_map, mask, apix, 140.0, reuse=True)
        result["start"] = previous["start"]
        return result
    shutil.rmtree(job, ignore_errors=True)
    result["gmmrefine"] = measured(gm("refine", "--particles", str(sim / "particles_perturbed.star"), "--out", str(job)))
    steps = step_seconds(job)
    final = read_particles(job / "final" / "particles.star")
    ang, sh = pose_errors(final.angles_deg, final.shift_A, truth.angles_deg, truth.shift_A)
    h1, h2 = (read_map(job / "final" / f"half{h}.mrc")[0] for h in (1, 2))
    result["gmmrefine"].update(steps, iterations=len(steps["iterations_s"]),
                               seconds_per_iteration=float(np.mean(steps["iterations_s"])), angular_error_deg=ang,
                               shift_error_A=sh, masked_fsc=masked_fsc_to_truth(h1, h2, truth_map, mask))
    result["relion"] = run_relion(sim, job, out, truth, truth_map, mask, apix, 140.0, timeout_s=relion_timeout_s)
    start = read_particles(sim / "particles_perturbed.star")
    result["start"] = dict(zip(("angular_error_deg", "shift_error_A"),
                               pose_errors(start.angles_deg, start.shift_A, truth.angles_deg, truth.shift_A)))
    return result


def fourier_pad(volume: np.ndarray, box: int) -> np.ndarray:
    """A map made on a grid cropped to its band, back on the full ``box`` grid (same physical size):
    its spectrum zero-padded, so the map is the same band-limited function sampled finer."""
    n = volume.shape[-1]
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume.astype(np.float64))))
    padded = np.zeros((box,) * 3, dtype=complex)
    o = box // 2 - n // 2
    padded[o:o + n, o:o + n, o:o + n] = spectrum
    return (np.real(np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(padded)))) * (box / n) ** 3).astype(np.float32)


def relion_same_start(out: Path, sim: Path, job: Path, iterations: list[int]) -> list[dict]:
    """One ``relion_refine_mpi`` local auto-refine iteration from the start each of our ``iterations`` k
    had, on the grid it worked on: the poses after our iteration k-1 (``itNNN/particles.star``; k = 1:
    the perturbed input), the average of its half maps Fourier-padded to the box as reference,
    ``--ini_high`` its gold-standard resolution, and ``--incr_size`` chosen so that RELION's image size,
    ``2 (box apix / ini_high + incr_size)``, is our working box of iteration k; every other option as
    ``benchmarks/refine.py`` ``RELION_OPTIONS``, 3 MPI ranks on the same cores. RELION's iteration time is
    from its ``run_it000`` to its ``run_it001`` files (its iteration 0 only reads and reconstructs); it
    is stopped when ``run_it001`` appears. Rows: our iteration's seconds, RELION's, its image size
    (``rlnCurrentImageSize`` of ``run_it001``) and the ratio."""
    import signal
    import time

    import torch
    from refine import RELION_OPTIONS

    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.io.mrc import read_map, write_map

    steps = step_seconds(job)
    done = json.loads((job / "state.json").read_text())["done"]
    truth_map, apix = read_map(sim / "truth_map.mrc")
    box = int(truth_map.shape[-1])
    rows = []
    for k in iterations:
        prev = job / f"it{k - 1:03d}"
        work_box = int(steps["boxes"][f"it{k:03d}/half1/refine"][0])
        resolution = float(done[f"it{k - 1:03d}/fsc"]["resolution_A"])
        incr = max(0, round(work_box / 2 - box * apix / resolution))
        rdir = out / "relion_same_start" / f"it{k:03d}"
        shutil.rmtree(rdir, ignore_errors=True)
        rdir.mkdir(parents=True)
        avg = 0.5 * sum(read_map(prev / f"half{h}.mrc")[0] for h in (1, 2))
        ref = fourier_pad(np.asarray(avg), box)
        write_map(rdir / "ref.mrc", low_pass(torch.as_tensor(ref), resolution, apix).numpy(), apix)
        options = list(RELION_OPTIONS)
        options[options.index("--ini_high") + 1] = f"{resolution:.3f}"
        star = prev / "particles.star" if k > 1 else sim / "particles_perturbed.star"
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi", "--i", str(star),
               "--o", str(rdir / "run"), "--ref", str(rdir / "ref.mrc"), "--particle_diameter", "140.0", *options,
               "--incr_size", str(incr)]
        with open(rdir / "log.txt", "w") as log:
            proc = subprocess.Popen(cmd, cwd=sim, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            first = rdir / "run_it000_half1_model.star"
            second = rdir / "run_it001_half1_model.star"
            while proc.poll() is None and not second.is_file():
                time.sleep(1)
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        if not second.is_file():
            raise RuntimeError(f"relion_refine_mpi stopped before its first iteration; see {rdir / 'log.txt'}")
        size = [int(line.split()[1]) for line in second.read_text().splitlines()
                if line.startswith("_rlnCurrentImageSize")]
        seconds = second.stat().st_mtime - first.stat().st_mtime
        ours = steps["iterations_s"][k - 1]
        rows.append({"iteration": k, "box": work_box, "seconds": ours, "relion_seconds": seconds,
                     "relion_image_size": size[0] if size else None, "ini_high_A": resolution, "incr_size": incr,
                     "relion_command": cmd, "ratio": seconds / ours})
    return rows


def same_size_rows(g: dict, rl: dict, tolerance: float = 0.1) -> list[dict]:
    """Each gmmrefine iteration beside RELION's iterations that worked on a grid of about the same size.

    An iteration's cost follows the Fourier box it works on: our working box (``boxes``, half 1's refine
    step) and RELION's ``rlnCurrentImageSize``. RELION's iterations whose size is within ``tolerance``
    (relative) of ours give the peer's seconds at that size; ``ratio`` is their mean over ours (None
    where RELION never worked at that size)."""
    rows = []
    for k, seconds in enumerate(g["iterations_s"], start=1):
        box = (g["boxes"].get(f"it{k:03d}/half1/refine") or [None])[0]
        peers = [t for t, size in zip(rl.get("seconds_per_iteration_each", []), rl.get("image_size_each", []))
                 if box and size and abs(size - box) <= tolerance * box]
        rows.append({"iteration": k, "box": box, "seconds": seconds, "relion_iterations": len(peers),
                     "relion_seconds": float(np.mean(peers)) if peers else None,
                     "ratio": float(np.mean(peers)) / seconds if peers else None})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boxes", type=int, nargs="*", default=[128, 256, 384, 512],
                        help="boxes of the table (none: only the --relion comparison)")
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--sim-n", type=int, default=200, help="simulated images per box (the rows cycle through them)")
    parser.add_argument("--baseline", type=Path, default=None, help="src folder of the code to compare with")
    parser.add_argument("--baseline-boxes", type=int, nargs="+", default=[128, 256],
                        help="boxes the baseline runs at (it reconstructs three full-size maps per half per iteration)")
    parser.add_argument("--largest-box-counts", type=int, nargs="+", default=None,
                        help="counts at the largest box only (default: --counts)")
    parser.add_argument("--relion", action="store_true", help="also the box-256 comparison with relion_refine_mpi")
    parser.add_argument("--relion-n", type=int, default=2000)
    parser.add_argument("--relion-timeout", type=float, default=None,
                        help="seconds after which RELION is stopped and judged by its last finished iteration")
    parser.add_argument("--same-start", type=int, nargs="+", default=None, metavar="K",
                        help="also a fresh gmmrefine job at box 256 and, for each of its iterations K, one RELION "
                             "iteration from the same start on the same grid (relion_same_start)")
    parser.add_argument("--rejudge", action="store_true",
                        help="run nothing: judge the --relion comparison already in --out again (its results.json "
                             "and RELION's folder) and print the tables")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    if args.rejudge:
        results = json.loads((out / "results.json").read_text())
        previous = results["relion"]
        args.relion, args.relion_n = True, previous["n"]
    else:
        results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
        print("box      n  gmmrefine refine --iterations auto --max-iterations 1 --resolution-start 8 | peer")
        results["boxes"] = box_rows(out, args.boxes, args.counts, args.sim_n, args.baseline, args.baseline_boxes,
                                    args.largest_box_counts)
        write_json_atomic(out / "results.json", results)
    if args.relion:
        r = results["relion"] = relion_comparison(out, args.relion_n, args.relion_timeout, previous)
        r["same_size"] = same_size_rows(r["gmmrefine"], r["relion"])
        write_json_atomic(out / "results.json", results)
        g, rl = r["gmmrefine"], r["relion"]
        print(f"\nbox 256, {r['n']} particles, O assembly (C1), start {r['start']['angular_error_deg']:.2f} deg / "
              f"{r['start']['shift_error_A']:.2f} A")
        print("program      iterations  s/iteration  total s  peak MB  ang_err  shift_err  masked FSC")
        for name, x in (("gmmrefine", g), ("relion", rl)):
            print(f"{name:11s} {x['iterations']:11d}  {x['seconds_per_iteration'] or 0:11.0f}  {x['wall_s']:7.0f}  "
                  f"{x['peak_rss_MB']:7.0f}  {x['angular_error_deg']:7.3f}  {x['shift_error_A']:9.3f}  "
                  f"{x['masked_fsc']:10.4f}")
        if not rl["converged"]:
            print(f"RELION stopped after {args.relion_timeout:.0f} s, not converged: judged by its iteration "
                  f"{rl['iterations']}")
        print(f"per iteration: {rl['seconds_per_iteration'] / g['seconds_per_iteration']:.1f}x faster; total "
              f"{rl['wall_s'] / g['wall_s']:.1f}x; peak RSS {g['peak_rss_MB'] / rl['peak_rss_MB']:.2f} of RELION's")
        print("\nper iteration at the same working grid (RELION's rlnCurrentImageSize within 10 % of our box)")
        print("iteration  box px  gmmrefine s  RELION iterations  RELION s (mean)  ratio")
        for row in r["same_size"]:
            peer = ("none at this size" if row["ratio"] is None
                    else f"{row['relion_iterations']:17d}  {row['relion_seconds']:15.0f}  {row['ratio']:5.1f}x")
            print(f"{row['iteration']:9d}  {row['box'] or 0:6d}  {row['seconds']:11.0f}  {peer}")
        print("RELION's iterations: image size " + ", ".join(f"{s}" for s in rl.get("image_size_each", []))
              + " px; seconds " + ", ".join(f"{t:.0f}" for t in rl["seconds_per_iteration_each"]))
    if args.same_start:
        sim = simulate(out, 256, args.relion_n, "--sym", "O", "--hinge-residues", "122-159", "--hinge-deg", "8",
                       name=f"sim_O256_{args.relion_n}")
        job = out / "same_start_gmmrefine"
        shutil.rmtree(job, ignore_errors=True)
        run = measured(gm("refine", "--particles", str(sim / "particles_perturbed.star"), "--out", str(job)))
        rows = relion_same_start(out, sim, job, args.same_start)
        results["same_start"] = {"gmmrefine": {**run, **step_seconds(job)}, "rows": rows}
        write_json_atomic(out / "results.json", results)
        print(f"\nbox 256, {args.relion_n} particles: each iteration against one RELION iteration from the same "
              "start on the same grid")
        print("iteration  box px  gmmrefine s  RELION px  RELION s  ratio")
        for row in rows:
            print(f"{row['iteration']:9d}  {row['box']:6d}  {row['seconds']:11.0f}  {row['relion_image_size'] or 0:9d}  "
                  f"{row['relion_seconds']:8.0f}  {row['ratio']:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

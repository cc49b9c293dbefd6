"""Benchmark: scaling `gmmrefine refine` out, 1 against 2 processes, and its memory against N.

    python benchmarks/scale.py [--n 10000 --box 128 --apix 1.5 --n-time 2000 --big 200000
                                --repeat 1 --device cpu --workdir DIR --json results.json]

Everything is generated in a temporary folder (``--workdir`` keeps it) and nothing is committed:

1. ``gmmrefine simulate``: adenylate kinase (bundled model), ``--n`` particles of box ``--box`` at
   ``--apix``, SNR 0.1, consensus poses 2 degrees and 1 A off the truth: one stack of ``n D^2 4`` bytes
   (655 MB for 10,000 at box 128).
2. Speed: the first ``--n-time`` particles, ``gmmrefine refine --iterations 1 --resolution-start 8
   --gmm-steps 60`` with the paper's optimiser settings (10 Adam steps, lr 1e-3, batch 16), once as one process
   (torch on 2 threads) and once as ``torchrun --standalone --nproc-per-node 2`` (1 thread each),
   alternating ``--repeat`` times. Reported: wall time of the command, of iteration 0 (reconstruction
   of both halves at the input poses) and of iteration 1 (one refinement iteration: each half's GMM,
   pose refinement and reconstruction), refinement particles/s, the speed-ups 1 process / 2 processes,
   each process's peak RSS, and how far the two runs' final poses (degrees) and half maps (FSC) differ.
   (A fixed band, 50-8 A, so that the cost per particle does not depend on the resolution one
   iteration happens to reach.)
3. Memory: STAR files of ``--n`` and ``--big`` rows cycling through the simulated stack (images are
   read from disk, memory-mapped, exactly as real data; ``replicate_star`` of benchmarks/reconstruct.py)
   and on each ``gmmrefine refine --iterations 1 --steps 1 --resolution-start 8 --gmm-steps 20``, one
   process, peak RSS by ``/usr/bin/time -v``: a reconstruction pass over every particle, two GMM fits,
   a refinement pass (one Adam step per particle, band 50-8 A) with its reconstruction, and every file
   (half maps, poses, particles.star of all particles, report). Goal: under 2 GB at 200,000 and within
   10 % of the 10,000-particle figure.
4. With ``--device cuda`` the speed runs use the GPU (one per process) and particles/s is printed next
   to the paper's ~55 particles/s (400,000 particles, box 196, 3 A, ~2 h per iteration, RTX A5000).

Prints a table and a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruct import replicate_star

REPO = Path(__file__).resolve().parents[1]
PAPER_PARTICLES_PER_S = 400_000 / (2 * 3600)  # ~55/s: 400,000 particles, box 196, ~2 h per iteration


def simulate(work: Path, n: int, box: int, apix: float) -> Path:
    sim = work / "sim"
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run([sys.executable, "-m", "gmmrefine", "simulate", "--model",
                        str(REPO / "src" / "gmmrefine" / "data" / "adk_open.pdb"), "--n", str(n), "--box", str(box),
                        "--apix", str(apix), "--snr", "0.1", "--perturb-deg", "2", "--perturb-A", "1", "--seed", "3",
                        "--out", str(sim), "--device", "cpu"], check=True, capture_output=True)
    return sim / "particles_perturbed.star"


def _peak_rss_mb(path: Path) -> float:
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text()).group(1))
    return round(kb / 1024, 1)


def refine_run(star: Path, out: Path, processes: int, options: list[str], device: str) -> dict:
    """One ``gmmrefine refine`` job, 1 process (2 threads) or ``processes`` under torchrun (1 thread
    each); wall time, the job's step times, and each process's peak RSS (``/usr/bin/time -v`` per rank)."""
    shutil.rmtree(out, ignore_errors=True)
    rss = out.parent / f"{out.name}.rss"
    threads = max(1, (os.cpu_count() or 2) // processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    args = ["-m", "gmmrefine", "refine", "--particles", str(star), "--out", str(out), "--device", device, *options]
    if processes == 1:
        cmd = ["/usr/bin/time", "-v", "-o", f"{rss}.0", sys.executable, *args]
    else:
        # every rank under its own /usr/bin/time, its report named by its RANK
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               "--no-python", "bash", "-c", '/usr/bin/time -v -o "$0.$RANK" "$@"', str(rss), sys.executable, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    done = json.loads((out / "state.json").read_text())["done"]
    it0 = sum(done[f"it000/half{h}"]["seconds"] for h in (1, 2))
    gmm = sum(done[f"it001/half{h}/gmm"]["seconds"] for h in (1, 2))
    refine = sum(done[f"it001/half{h}/refine"]["seconds"] for h in (1, 2))
    n = sum(json.loads((out / "it001" / f"half{h}_resolution.json").read_text())["n_particles"] for h in (1, 2))
    return {"processes": processes, "threads_per_process": threads, "wall_s": round(wall, 1),
            "it000_reconstruct_s": round(it0, 1), "it001_gmm_s": round(gmm, 1), "it001_refine_s": round(refine, 1),
            "it001_s": round(gmm + refine, 1), "refine_particles_per_s": round(n / refine, 1),
            "peak_rss_MB_per_process": [_peak_rss_mb(Path(f"{rss}.{r}")) for r in range(processes)]}


def agreement(job1: Path, job2: Path) -> dict:
    """Largest pose difference (degrees, A) and smallest half-map FSC between two jobs' final outputs."""
    from gmmrefine.fourier.fsc import fourier_shell_correlation
    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles

    a, b = (read_particles(j / "final" / "particles.star") for j in (job1, job2))
    deg = rotation_angle_deg(euler_to_matrix(torch.as_tensor(a.angles_deg)), euler_to_matrix(torch.as_tensor(b.angles_deg)))
    fsc = min(float(fourier_shell_correlation(*(torch.as_tensor(read_map(j / "final" / f"half{h}.mrc")[0])
                                                 for j in (job1, job2)))[1:].min()) for h in (1, 2))
    return {"max_pose_difference_deg": float(deg.max()), "max_shift_difference_A": float(np.abs(a.shift_A - b.shift_A).max()),
            "min_half_map_fsc": fsc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000, help="particles simulated (and the small memory run)")
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--n-time", type=int, default=2000, help="particles of the 1- vs 2-process speed runs")
    parser.add_argument("--big", type=int, default=200000, help="particles of the large memory run (0: skip)")
    parser.add_argument("--repeat", type=int, default=1, help="alternating 1- and 2-process speed runs")
    parser.add_argument("--device", default="cpu", help="device of the speed runs (cuda: one GPU per process)")
    parser.add_argument("--skip-speed", action="store_true", help="only the memory runs")
    parser.add_argument("--memory-processes", type=int, default=1, help="processes of the memory runs (RSS per process)")
    parser.add_argument("--skip-memory", action="store_true", help="only the speed runs")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here instead of a temp folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        free_gb = shutil.disk_usage(work).free / 2**30
        need_gb = args.n * args.box**2 * 4 / 2**30 + 0.5
        if free_gb < need_gb:
            raise SystemExit(f"{work}: {free_gb:.1f} GB free, the simulated stack needs {need_gb:.1f} GB")
        res: dict = {"n": args.n, "box": args.box, "apix": args.apix, "device": args.device,
                     "cpu_count": os.cpu_count(), "disk_free_GB": round(free_gb, 1), "load_avg_start": os.getloadavg()}
        t0 = time.perf_counter()
        star = simulate(work, args.n, args.box, args.apix)
        res["simulate_s"] = round(time.perf_counter() - t0, 1)

        # -- 1 vs 2 processes ------------------------------------------------------------------
        if not args.skip_speed:
            small = replicate_star(star, star.parent / f"time{args.n_time}.star", args.n_time)
            speed_options = ["--iterations", "1", "--resolution-start", "8", "--gmm-steps", "60"]
            runs = {1: [], 2: []}
            for i in range(args.repeat):
                for k in (1, 2):
                    runs[k].append(refine_run(small, work / f"time_p{k}_{i}", k, speed_options, args.device))
            best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
            res["speed"] = {"n_particles": args.n_time, "options": speed_options, "runs_1_process": runs[1],
                            "runs_2_processes": runs[2]}
            for key in ("wall_s", "it000_reconstruct_s", "it001_s", "it001_refine_s"):
                res["speed"][f"speedup_{key}"] = round(best[1][key] / best[2][key], 2)
            res["speed"]["agreement_1_vs_2_processes"] = agreement(work / "time_p1_0", work / "time_p2_0")
            if args.device.startswith("cuda"):
                res["speed"]["paper_particles_per_s"] = round(PAPER_PARTICLES_PER_S, 1)

        # -- memory against N --------------------------------------------------------------------
        if not args.skip_memory:
            mem_options = ["--iterations", "1", "--steps", "1", "--resolution-start", "8", "--gmm-steps", "20"]
            res["memory"] = {"options": mem_options, "processes": args.memory_processes}
            for n in [args.n] + ([args.big] if args.big else []):
                s = replicate_star(star, star.parent / f"mem{n}.star", n)
                r = refine_run(s, work / f"mem{n}_p{args.memory_processes}", args.memory_processes, mem_options, "cpu")
                res["memory"][str(n)] = r
            if args.big:
                small_rss = res["memory"][str(args.n)]["peak_rss_MB_per_process"]
                big_rss = res["memory"][str(args.big)]["peak_rss_MB_per_process"]
                res["memory"]["rss_ratio_big_over_small"] = [round(b / a, 3) for a, b in zip(small_rss, big_rss)]
        res["load_avg_end"] = os.getloadavg()

    if "speed" in res:
        _print_speed(res, best, args)
    if "memory" in res:
        print(f"\nPeak RSS per process ({args.memory_processes} process(es)): refine {' '.join(res['memory']['options'])}")
        for n in [args.n] + ([args.big] if args.big else []):
            r = res["memory"][str(n)]
            print(f"{n:>8d} particles: {r['peak_rss_MB_per_process']} MB  ({r['wall_s']:.0f} s)")
        if args.big:
            print(f"ratio {args.big} / {args.n}: {res['memory']['rss_ratio_big_over_small']}")
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


def _print_speed(res: dict, best: dict, args) -> None:
    sp = res["speed"]
    print(f"\nOne refinement iteration, {args.n_time} particles of box {args.box} ({args.device}), "
          f"{os.cpu_count()} cores; best of {args.repeat}")
    print(f"{'':28s} {'1 process':>12s} {'2 processes':>12s} {'speed-up':>9s}")
    for key, label in (("wall_s", "command wall (s)"), ("it000_reconstruct_s", "iteration 0: reconstruct (s)"),
                       ("it001_s", "iteration 1: refine (s)"), ("it001_refine_s", "  of which passes (s)")):
        print(f"{label:28s} {best[1][key]:12.1f} {best[2][key]:12.1f} {sp['speedup_' + key]:9.2f}")
    print(f"{'refinement particles/s':28s} {best[1]['refine_particles_per_s']:12.1f} "
          f"{best[2]['refine_particles_per_s']:12.1f}"
          + (f"   (paper: ~{PAPER_PARTICLES_PER_S:.0f}/s, box 196, RTX A5000)" if args.device.startswith("cuda") else ""))
    print(f"{'peak RSS per process (MB)':28s} {best[1]['peak_rss_MB_per_process']!s:>12s} "
          f"{best[2]['peak_rss_MB_per_process']!s:>12s}")
    ag = sp["agreement_1_vs_2_processes"]
    print(f"1 vs 2 processes: poses differ by <= {ag['max_pose_difference_deg']:.2e} deg, "
          f"{ag['max_shift_difference_A']:.2e} A; half-map FSC >= {ag['min_half_map_fsc']:.6f}")


if __name__ == "__main__":
    main()

"""Benchmark: gmmrefine reconstruct against relion_reconstruct on the same particles.

Simulates N particles (box 128 by default) with ``relion_project --ctf --add_noise`` in a temporary
folder, then times, each in its own process and measured by ``/usr/bin/time -v`` (wall time, peak RSS):

* ``relion_reconstruct --ctf --subset 1`` and ``--subset 2`` (the two half maps; RELION 3.1's
  relion_reconstruct is single-threaded) one after the other and side by side (the peer on 2 cores),
  and, for reference, one run on all particles;
* ``gmmrefine reconstruct --ctf wiener`` (both half maps, FSC, plot in one pass) with
  ``torch.set_num_threads(1)`` and with 2 threads.

Also checks agreement (FSC between our and RELION's half 1 up to 0.8 Nyquist) and, with
``--scaling``, our peak RSS at 5,000 and 50,000 particles (the larger sets reuse the simulated images
with their poses, so images stream from disk exactly as real data would).

Prints a table and a JSON object (also written with ``--json``). Run on demand, not in the tests::

    python benchmarks/reconstruct.py --n 10000 --box 128 --scaling
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.io.particles import CTFParams, new_particle_tables
from gmmrefine.io.star import read_star, write_star


def gaussian_map(box: int, n: int, seed: int = 0) -> np.ndarray:
    """A protein-like test map: ``n`` Gaussians (1.5 px wide) inside a sphere of radius box/4."""
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n, 3, generator=g) - 0.5) * box * 0.5
    ax = torch.arange(box, dtype=torch.float32) - box // 2
    out = torch.zeros((box,) * 3)
    z, y, x = torch.meshgrid(ax, ax, ax, indexing="ij")
    for c in centres:  # a one-off setup of the test map, not a hot path
        out += torch.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * 1.5 ** 2))
    return out.numpy()


def simulate(folder: Path, box: int, apix: float, n: int, seed: int = 0) -> Path:
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    angles = Rotation.random(n, random_state=seed).as_euler("ZYZ", degrees=True)
    origins = rng.uniform(-5, 5, (n, 2))
    dfu = rng.uniform(8000, 25000, n)
    ctf = CTFParams(defocus_u_A=dfu, defocus_v_A=dfu - rng.uniform(0, 600, n),
                    defocus_angle_deg=rng.uniform(0, 180, n), voltage_kV=np.full(n, 300.0), cs_mm=np.full(n, 2.7),
                    amplitude_contrast=np.full(n, 0.1), phase_shift_deg=np.zeros(n), bfactor_A2=np.zeros(n),
                    scale=np.ones(n))
    tables = new_particle_tables(np.array([f"{i + 1:06d}@x.mrcs" for i in range(n)]), angles, origins, ctf,
                                 np.tile([1, 2], n // 2 + 1)[:n], apix, box)
    tables["particles"] = tables["particles"].drop(columns=["rlnImageName"])
    truth = gaussian_map(box, 300)
    write_map(folder / "truth.mrc", truth, apix)
    write_star(folder / "in.star", tables)
    subprocess.run(["relion_project", "--i", str(folder / "truth.mrc"), "--ang", str(folder / "in.star"), "--o",
                    str(folder / "proj"), "--angpix", str(apix), "--ctf", "--add_noise", "--white_noise",
                    str(float(truth.std()) * 20)], check=True, capture_output=True)
    return folder / "proj.star"


def replicate_star(star: Path, out: Path, n: int) -> Path:
    """A STAR of ``n`` particles cycling through the rows of ``star`` (images read again from disk)."""
    tables = read_star(star)
    parts = tables["particles"]
    rows = np.arange(n) % len(parts)
    tables["particles"] = parts.iloc[rows].reset_index(drop=True)
    tables["particles"]["rlnRandomSubset"] = np.tile([1, 2], n // 2 + 1)[:n]
    write_star(out, tables)
    return out


def measured(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds and peak RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": round(wall, 2), "peak_rss_MB": round(rss_kb / 1024, 1)}


def measured_together(cmds: list[list[str]], env: dict | None = None) -> dict:
    """Run ``cmds`` at the same time, each under /usr/bin/time -v: wall seconds until the last ends,
    and each one's peak RSS (MB)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for cmd in cmds]
    outputs = [proc.communicate() for proc in procs]
    wall = time.perf_counter() - t0
    rss = []
    for cmd, proc, (out, err) in zip(cmds, procs, outputs):
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{err[-2000:]}")
        rss.append(round(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) / 1024, 1))
    return {"wall_s": round(wall, 2), "peak_rss_MB_each": rss, "peak_rss_MB_total": round(sum(rss), 1)}


def ours(star: Path, out: Path, threads: int) -> dict:
    code = ("import sys, torch; torch.set_num_threads(int(sys.argv[1])); "
            "from gmmrefine.cli.main import main; sys.exit(main(sys.argv[2:]))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return measured([sys.executable, "-c", code, str(threads), "reconstruct", "--particles", str(star), "--out",
                     str(out), "--ctf", "wiener", "--force"], env=env)


def relion(star: Path, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return measured(["relion_reconstruct", "--i", str(star), "--o", str(out), "--ctf", *extra], env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--scaling", action="store_true", help="also our peak RSS at 5,000 and 50,000 particles")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--workdir", type=Path, default=None, help="keep files here instead of a temp folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_reconstruct_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        star = simulate(work, args.box, args.apix, args.n)
        sim_s = time.perf_counter() - t0
        res: dict = {"n": args.n, "box": args.box, "apix": args.apix, "simulate_s": round(sim_s, 1),
                     "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}
        res["relion_half1"] = relion(star, work / "r_half1.mrc", "--subset", "1")
        res["relion_half2"] = relion(star, work / "r_half2.mrc", "--subset", "2")
        res["relion_all"] = relion(star, work / "r_all.mrc")
        # The peer on both cores: RELION 3.1's relion_reconstruct has one thread, so its two halves
        # run side by side.
        res["relion_halves_side_by_side"] = measured_together(
            [["relion_reconstruct", "--i", str(star), "--o", str(work / f"r2_half{h}.mrc"), "--ctf", "--subset", str(h)]
             for h in (1, 2)], env=dict(os.environ, OMP_NUM_THREADS="1"))
        res["ours_1thread"] = ours(star, work / "ours1", 1)
        res["ours_2threads"] = ours(star, work / "ours2", 2)
        relion_halves_s = res["relion_half1"]["wall_s"] + res["relion_half2"]["wall_s"]
        relion_rss = max(res["relion_half1"]["peak_rss_MB"], res["relion_half2"]["peak_rss_MB"])
        res["speedup_vs_relion_halves_1thread"] = round(relion_halves_s / res["ours_1thread"]["wall_s"], 2)
        res["speedup_vs_relion_halves_2threads"] = round(relion_halves_s / res["ours_2threads"]["wall_s"], 2)
        res["speedup_vs_relion_single_run_1thread"] = round(res["relion_all"]["wall_s"] / res["ours_1thread"]["wall_s"], 2)
        res["rss_ratio_ours_over_relion"] = round(res["ours_1thread"]["peak_rss_MB"] / relion_rss, 2)
        side = res["relion_halves_side_by_side"]
        res["speedup_2cores_vs_relion_halves_side_by_side"] = round(side["wall_s"] / res["ours_2threads"]["wall_s"], 2)
        res["rss_ratio_2cores_ours_over_relion_side_by_side"] = round(
            res["ours_2threads"]["peak_rss_MB"] / side["peak_rss_MB_total"], 2)
        a = torch.from_numpy(read_map(work / "ours1" / "half1.mrc")[0])
        b = torch.from_numpy(read_map(work / "r_half1.mrc")[0])
        fsc = fourier_shell_correlation(a, b)
        res["fsc_ours_vs_relion_half1_min_to_0.8_nyquist"] = round(float(fsc[1:int(0.8 * args.box / 2) + 1].min()), 4)
        truth = torch.from_numpy(read_map(work / "truth.mrc")[0])
        full_ours = torch.from_numpy(read_map(work / "ours1" / "full.mrc")[0])
        full_relion = torch.from_numpy(read_map(work / "r_all.mrc")[0])
        res["fsc_to_truth_sum_ours_full"] = round(float(fourier_shell_correlation(full_ours, truth)[1:].sum()), 3)
        res["fsc_to_truth_sum_relion_all"] = round(float(fourier_shell_correlation(full_relion, truth)[1:].sum()), 3)
        res["resolution_ours_A"] = json.loads((work / "ours1" / "fsc.json").read_text())["resolution_0143_A"]
        if args.scaling:
            for n in (5000, 50000):
                s = replicate_star(star, work / f"rep{n}.star", n)
                res[f"ours_1thread_{n}"] = ours(s, work / f"ours_{n}", 1)
        res["load_avg_end"] = os.getloadavg()

    rows = [("relion_reconstruct --subset 1", res["relion_half1"]), ("relion_reconstruct --subset 2", res["relion_half2"]),
            ("relion_reconstruct (all, one map)", res["relion_all"]), ("gmmrefine reconstruct, 1 thread", res["ours_1thread"]),
            ("gmmrefine reconstruct, 2 threads", res["ours_2threads"])]
    rows += [(f"gmmrefine, 1 thread, {n} particles", res[f"ours_1thread_{n}"]) for n in (5000, 50000)
             if f"ours_1thread_{n}" in res]
    print(f"\n{args.n} particles, box {args.box}: both half maps (RELION: two runs)")
    print(f"{'run':40s} {'wall (s)':>10s} {'peak RSS (MB)':>14s}")
    for name, r in rows:
        print(f"{name:40s} {r['wall_s']:10.1f} {r['peak_rss_MB']:14.1f}")
    side = res["relion_halves_side_by_side"]
    print(f"{'relion_reconstruct, both halves side by side':40s} {side['wall_s']:10.1f} "
          f"{side['peak_rss_MB_total']:14.1f}  (two processes: {side['peak_rss_MB_each']})")
    print(f"on 2 cores (ours 2 threads / RELION's halves side by side): {res['speedup_2cores_vs_relion_halves_side_by_side']}x "
          f"faster, peak RSS ratio {res['rss_ratio_2cores_ours_over_relion_side_by_side']}")
    print(f"speed-up (RELION two half runs / ours): 1 thread {res['speedup_vs_relion_halves_1thread']}x, "
          f"2 threads {res['speedup_vs_relion_halves_2threads']}x; peak RSS ours/RELION "
          f"{res['rss_ratio_ours_over_relion']}; FSC(ours, RELION) half 1 >= "
          f"{res['fsc_ours_vs_relion_half1_min_to_0.8_nyquist']} to 0.8 Nyquist")
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

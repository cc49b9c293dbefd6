"""Benchmark: heterogeneity training cost (seconds per epoch per 1,000 particles, peak memory) on the
CPU threads given, and the encoder-input comparison (FRC gradient vs band-limited image).

Simulates adenylate kinase morphing open <-> closed (``gmmrefine simulate --model adk_open.pdb --model2
adk_closed.pdb``; truth column ``gmmMorphFraction``), reconstructs each half at the true poses, builds
each half's GMM from its own half map, then, for each encoder input and seed, trains both halves in
a fresh process (``torch.set_num_threads(--threads)``; peak memory is that process's VmHWM, so the
simulation does not count) and reports:

* seconds per epoch per 1,000 particles (coarse stage and full stage separately, mean over epochs
  and halves) and the one-off time of the encoder inputs and pre-training;
* peak resident memory of the training process;
* |Spearman(PC1 of the latents, true morph fraction)| per half, and the mean FRC before and after.

Usage (run on demand, not in the tests)::

    python benchmarks/hetero.py --n 2000 --box 64 --apix 1.6 --snr 0.05 --threads 2 --seeds 2 --json hetero.json

Measured on the shared 2-core machine (2026-11, 1 thread, box 64, 1.6 A/px, SNR 0.05, 2,000 particles,
~230 Gaussians per half, band 100-8 A): 0.16-0.25 s per epoch per 1,000 particles in the coarse stage,
0.22-0.30 s in the full stage, ~3 s setup per half, 620-640 MB peak RSS; |Spearman| 0.90-0.92 per half
(gradient) and 0.89-0.90 (image). The encoder input was chosen with this script (see
:mod:`gmmrefine.hetero.train`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM, Linux), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    return float("nan")


def prepare(folder: Path, n: int, box: int, apix: float, snr: float, resolution_A: float, seed: int) -> dict:
    """Simulated morph particles and one GMM per half from that half's own reconstruction."""
    from gmmrefine.cli.main import main as cli_main
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.gmm.build import build_gmm
    from gmmrefine.io.particles import read_particles
    from gmmrefine.reconstruct.invert import reconstruct_halves

    data = Path(__file__).parents[1] / "src" / "gmmrefine" / "data"
    t0 = time.perf_counter()
    rc = cli_main(["simulate", "--model", str(data / "adk_open.pdb"), "--model2", str(data / "adk_closed.pdb"),
                   "--out", str(folder), "--n", str(n), "--box", str(box), "--apix", str(apix), "--snr", str(snr),
                   "--seed", str(seed), "--device", "cpu"])
    if rc != 0:
        raise SystemExit(f"simulate failed with exit code {rc}")
    t_sim = time.perf_counter() - t0
    ps = read_particles(folder / "particles.star")
    halves = reconstruct_halves(ps, progress=False)
    n_gauss = {}
    t1 = time.perf_counter()
    for h, half_map in zip((1, 2), halves):
        gmm, info = build_gmm(low_pass(half_map, resolution_A, ps.apix), ps.apix, resolution_A, seed=h)
        gmm.save(folder / f"gmm_half{h}.npz")
        n_gauss[h] = gmm.n
    return {"simulate_s": t_sim, "gmm_s": time.perf_counter() - t1, "n_gaussians": n_gauss}


def worker(args) -> None:
    """Train both halves once and print one JSON line."""
    import torch
    from scipy.stats import spearmanr

    torch.set_num_threads(args.threads)
    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.hetero.networks import motion_pca
    from gmmrefine.hetero.train import HeteroSettings, train_halves
    from gmmrefine.io.particles import read_particles
    from gmmrefine.io.star import read_star

    folder = Path(args.worker)
    ps = read_particles(folder / "particles.star")
    fraction = read_star(folder / "truth.star")["particles"]["gmmMorphFraction"].to_numpy()
    gmms = {h: GaussianMixture.load(folder / f"gmm_half{h}.npz") for h in (1, 2)}
    base_mb = _vm_hwm_mb()
    settings = HeteroSettings(epochs=args.epochs, maxres_A=args.resolution, encoder_input=args.encoder_input,
                              seed=args.seed, progress=False)
    t0 = time.perf_counter()
    results = train_halves(ps, gmms, settings)
    wall = time.perf_counter() - t0
    out = {"encoder_input": args.encoder_input, "seed": args.seed, "threads": args.threads, "wall_s": wall,
           "peak_rss_mb": _vm_hwm_mb(), "rss_before_training_mb": base_mb, "halves": {}}
    for h, r in results.items():
        n = len(r.indices)
        per_k = {stage: [e["seconds"] / n * 1000 for e in r.history if e["stage"] == stage]
                 for stage in ("coarse", "full")}
        train_s = sum(e["seconds"] for e in r.history)
        out["halves"][h] = {
            "n_particles": n, "n_gaussians": r.decoder.n_gaussians,
            "spearman_pc1": float(abs(spearmanr(motion_pca(r.latents, r.decoder)[0][:, 0], fraction[r.indices])[0])),
            "frc_neutral": float(r.frc_neutral.mean()), "frc_final": float(r.frc_final.mean()),
            "s_per_epoch_per_1000_coarse": float(np.mean(per_k["coarse"])) if per_k["coarse"] else None,
            "s_per_epoch_per_1000_full": float(np.mean(per_k["full"])) if per_k["full"] else None,
            "setup_s": r.seconds - train_s,
        }
    print(json.dumps(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="particles (both halves)")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--apix", type=float, default=1.6)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--resolution", type=float, default=8.0, help="GMM and FRC band limit, A")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per encoder input")
    parser.add_argument("--inputs", default="gradient,image", help="encoder inputs to compare")
    parser.add_argument("--sim-seed", type=int, default=3)
    parser.add_argument("--keep", type=Path, default=None, help="keep the simulated data in this folder")
    parser.add_argument("--reuse", action="store_true", help="reuse the data in --keep (skip simulation)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-input", default="gradient", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep if args.keep is not None else Path(tmp) / "sim"
        if args.reuse:
            if args.keep is None or not (folder / "gmm_half2.npz").is_file():
                raise SystemExit("--reuse needs --keep FOLDER from an earlier run")
            info = {"reused": str(folder), "n_gaussians": {}}
        else:
            info = prepare(folder, args.n, args.box, args.apix, args.snr, args.resolution, args.sim_seed)
        runs = []
        for inp in args.inputs.split(","):
            for seed in range(args.seeds):
                cmd = [sys.executable, __file__, "--worker", str(folder), "--encoder-input", inp, "--seed", str(seed),
                       "--threads", str(args.threads), "--epochs", str(args.epochs),
                       "--resolution", str(args.resolution)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {"n": args.n, "box": args.box, "apix": args.apix, "snr": args.snr, "resolution_A": args.resolution,
              "epochs": args.epochs, "threads": args.threads, **info, "runs": runs}
    print(f"adk morph, {args.n} particles, box {args.box}, {args.apix} A/px, SNR {args.snr}, "
          f"band 100-{args.resolution} A, "
          f"{args.epochs} epochs, {args.threads} threads; GMMs {info['n_gaussians']}")
    print(f"{'input':>9} {'seed':>4} {'|rho| h1':>8} {'|rho| h2':>8} {'FRC h1':>15} {'s/ep/1k coarse':>14} "
          f"{'s/ep/1k full':>12} {'setup s':>7} {'peak MB':>7}")
    for r in runs:
        h1, h2 = r["halves"]["1"], r["halves"]["2"]
        coarse = np.mean([h["s_per_epoch_per_1000_coarse"] or np.nan for h in (h1, h2)])
        full = np.mean([h["s_per_epoch_per_1000_full"] or np.nan for h in (h1, h2)])
        print(f"{r['encoder_input']:>9} {r['seed']:>4} {h1['spearman_pc1']:8.3f} {h2['spearman_pc1']:8.3f} "
              f"{h1['frc_neutral']:.4f}->{h1['frc_final']:.4f} {coarse:14.3f} {full:12.3f} "
              f"{h1['setup_s'] + h2['setup_s']:7.1f} {r['peak_rss_mb']:7.0f}")
    if args.json:
        from gmmrefine.io.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

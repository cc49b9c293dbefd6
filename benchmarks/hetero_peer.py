"""Heterogeneity against the peer users run today: `gmmrefine hetero` and cryoDRGN on the same particles,
consensus poses and CTF, and both from the true poses (issue 21).

    python benchmarks/hetero_peer.py --out /tmp/hetero_peer [--n 2000 --box 128 --snr 0.03 --epochs 20
                                     --cryodrgn-epochs 8 --cryodrgn-box 64 --zdim 8]

1. Data: adenylate kinase whose LID domain (residues 122-159) turns by a random angle of up to
   ``--hinge-deg`` per particle (``gmmrefine simulate --hinge-residues``; truth column
   ``gmmDomainAngle``), ``--n`` particles, box ``--box``, 1 A/px, SNR ``--snr``; consensus poses
   ``--perturb-deg`` / ``--perturb-A`` off the truth (``particles_perturbed.star``).
2. Per pose set (consensus, truth): each half reconstructed at those poses (``gmmrefine reconstruct``) and
   its GMM built from its own half map at ``--resolution`` (``gmmrefine build-gmm``), then
   ``gmmrefine hetero`` (``--epochs``, default settings otherwise).
3. cryoDRGN (PyPI ``cryodrgn==--cryodrgn-version``) in its own virtual environment made by this script
   (``torch==2.13.0`` first, as everywhere here; kept in ``--out``/cryodrgn_venv): the stack downsampled to
   ``--cryodrgn-box`` (``cryodrgn downsample``), poses and CTF parsed from the same STAR
   (``parse_pose_star``, ``parse_ctf_star``), then ``train_vae --zdim --num-epochs`` on each half
   (``--ind``), as a CPU user would; the latent of the last epoch.
4. Per arm and half: |Spearman(PC1 of the latents, true hinge angle)|, wall time per epoch and the
   training process's peak RSS (``/usr/bin/time -v``).

Writes ``results.json`` in ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruct import measured

DATA = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data"
TRUTH_COLUMN = "gmmDomainAngle"


def gm(*args: str) -> list[str]:
    return [sys.executable, "-m", "gmmrefine", *args]


def simulate(out: Path, args) -> Path:
    sim = out / "sim"
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run(gm("simulate", "--model", str(DATA / "adk_open.pdb"), "--hinge-residues", "122-159",
                          "--hinge-deg", str(args.hinge_deg), "--n", str(args.n), "--box", str(args.box), "--apix",
                          str(args.apix), "--snr", str(args.snr), "--perturb-deg", str(args.perturb_deg),
                          "--perturb-A", str(args.perturb_A), "--seed", str(args.seed), "--device", "cpu",
                          "--out", str(sim)), check=True, stdout=subprocess.DEVNULL)
    return sim


def spearman_pc1(latents: np.ndarray, truth: np.ndarray) -> float:
    """|Spearman| between the first principal component of ``latents`` and ``truth``."""
    from scipy.stats import spearmanr

    from gmmrefine.hetero.networks import pca

    return float(abs(spearmanr(pca(latents)[0][:, 0], truth)[0]))


def ours(sim: Path, star: Path, out: Path, args) -> dict:
    """GMMs from each half's own map at the poses of ``star``, then ``gmmrefine hetero``."""
    from gmmrefine.io.particles import read_particles
    from gmmrefine.io.star import read_star

    rec = out / "rec"
    subprocess.run(gm("reconstruct", "--particles", str(star), "--out", str(rec), "--force"), check=True,
                   stdout=subprocess.DEVNULL)
    for h in (1, 2):
        subprocess.run(gm("build-gmm", "--map", str(rec / f"half{h}.mrc"), "--resolution", str(args.resolution),
                          "--seed", str(h), "--out", str(out / f"gmm_half{h}.npz")), check=True,
                       stdout=subprocess.DEVNULL)
    job = out / "hetero"
    shutil.rmtree(job, ignore_errors=True)
    run = measured(gm("hetero", "--particles", str(star), "--gmm1", str(out / "gmm_half1.npz"), "--gmm2",
                      str(out / "gmm_half2.npz"), "--out", str(job), "--epochs", str(args.epochs),
                      "--maxres", str(args.resolution), "--seed", "0"))
    ps = read_particles(star)
    truth = read_star(sim / "truth.star")["particles"][TRUTH_COLUMN].to_numpy(np.float64)
    latent = np.load(job / "latent.npy")
    summary = json.loads((job / "summary.json").read_text())
    epochs = args.epochs
    halves = {}
    for h in (1, 2):
        rows = ps.half(h)
        train_s = sum(e["seconds"] for e in summary["halves"][str(h)]["history"])
        halves[str(h)] = {"spearman_pc1": spearman_pc1(latent[rows], truth[rows]), "n": int(len(rows)),
                          "s_per_epoch": train_s / epochs}
    return {"wall_s": run["wall_s"], "peak_rss_MB": run["peak_rss_MB"], "epochs": epochs, "halves": halves}


def _seconds(hms: str) -> float:
    h, m, s = hms.split(":")
    return 3600 * float(h) + 60 * float(m) + float(s)


def cryodrgn_env(out: Path, version: str) -> Path:
    """A virtual environment with torch 2.13.0 (the CPU wheel on this disk) and cryoDRGN; its bin folder."""
    venv = out / "cryodrgn_venv"
    exe = venv / "bin" / "cryodrgn"
    if not exe.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, f"cryodrgn=={version}"], check=True)
    return venv / "bin"


def cryodrgn(sim: Path, star: Path, out: Path, args) -> dict:
    """cryoDRGN train_vae on each half (downsampled stack, poses and CTF from ``star``)."""
    from gmmrefine.io.particles import read_particles
    from gmmrefine.io.star import read_star

    bin_ = cryodrgn_env(out.parent, args.cryodrgn_version)
    tool = [str(bin_ / "cryodrgn")]
    out.mkdir(parents=True, exist_ok=True)
    small = out.parent / f"particles.{args.cryodrgn_box}.mrcs"
    if not small.is_file():
        subprocess.run([*tool, "downsample", str(sim / "particles.star"), "--datadir", str(sim), "-D",
                        str(args.cryodrgn_box), "-o", str(small)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*tool, "parse_pose_star", str(star), "-D", str(args.box), "--Apix", str(args.apix), "-o",
                    str(out / "pose.pkl")], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([*tool, "parse_ctf_star", str(star), "-D", str(args.box), "--Apix", str(args.apix), "-o",
                    str(out / "ctf.pkl")], check=True, stdout=subprocess.DEVNULL)
    ps = read_particles(star)
    truth = read_star(sim / "truth.star")["particles"][TRUTH_COLUMN].to_numpy(np.float64)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    halves = {}
    for h in (1, 2):
        rows = ps.half(h)
        ind = out / f"half{h}.pkl"
        with open(ind, "wb") as fh:
            pickle.dump(rows.astype(np.int64), fh)
        train = out / f"train_half{h}"
        shutil.rmtree(train, ignore_errors=True)
        run = measured([*tool, "train_vae", str(small), "--poses", str(out / "pose.pkl"), "--ctf",
                        str(out / "ctf.pkl"), "--ind", str(ind), "--zdim", str(args.zdim), "-n",
                        str(args.cryodrgn_epochs), "--seed", "0", "--no-analysis", "-o", str(train),
                        *args.cryodrgn_args.split()], env=env)
        z_files = sorted(train.glob("z.*.pkl"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
        with open(z_files[-1] if z_files else train / "z.pkl", "rb") as fh:
            z = np.asarray(pickle.load(fh))
        # its own account of the training time: "Finished in H:MM:SS (H:MM:SS per epoch)"
        per_epoch = re.findall(r"\(([\d:.]+) per epoch\)", (train / "run.log").read_text())
        halves[str(h)] = {"spearman_pc1": spearman_pc1(z, truth[rows]), "n": int(len(rows)),
                          "wall_s": run["wall_s"], "peak_rss_MB": run["peak_rss_MB"],
                          "s_per_epoch": _seconds(per_epoch[-1]) if per_epoch else run["wall_s"] / args.cryodrgn_epochs}
    return {"epochs": args.cryodrgn_epochs, "box": args.cryodrgn_box, "zdim": args.zdim, "halves": halves}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=0.03)
    parser.add_argument("--hinge-deg", type=float, default=8.0)
    parser.add_argument("--perturb-deg", type=float, default=3.0)
    parser.add_argument("--perturb-A", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--resolution", type=float, default=8.0, help="GMM resolution and hetero --maxres, A")
    parser.add_argument("--epochs", type=int, default=20, help="gmmrefine hetero epochs")
    parser.add_argument("--cryodrgn-version", default="4.3.1")
    parser.add_argument("--cryodrgn-epochs", type=int, default=8)
    parser.add_argument("--cryodrgn-box", type=int, default=64, help="box the stack is downsampled to for cryoDRGN")
    parser.add_argument("--cryodrgn-args", default="--uninvert-data",
                        help="more train_vae options (quoted); our particles are white on black, as RELION's")
    parser.add_argument("--zdim", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="ours,cryodrgn", help="comma-separated: ours, cryodrgn")
    parser.add_argument("--poses", default="consensus,truth", help="comma-separated: consensus, truth")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate(out, args)
    stars = {"consensus": sim / "particles_perturbed.star", "truth": sim / "particles.star"}
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "cpu_count": os.cpu_count(), "arms": {}}
    for pose in args.poses.split(","):
        for arm in args.arms.split(","):
            run = ours if arm == "ours" else cryodrgn
            results["arms"][f"{arm}/{pose}"] = run(sim, stars[pose], out / f"{arm}_{pose}", args)
            (out / "results.json").write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{args.n} particles, box {args.box}, SNR {args.snr:g}, hinge up to {args.hinge_deg:g} deg, consensus "
          f"poses {args.perturb_deg:g} deg / {args.perturb_A:g} A off")
    print("arm                  |Spearman| h1  h2    s/epoch h1  h2   peak MB")
    for name, r in results["arms"].items():
        h = r["halves"]
        rss = r.get("peak_rss_MB") or max(h[k]["peak_rss_MB"] for k in h)
        print(f"{name:20s} {h['1']['spearman_pc1']:6.3f} {h['2']['spearman_pc1']:6.3f}    "
              f"{h['1']['s_per_epoch']:7.1f} {h['2']['s_per_epoch']:7.1f}  {rss:7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

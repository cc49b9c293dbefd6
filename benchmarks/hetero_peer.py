"""Heterogeneity against the peer users run today: `gmmrefine hetero` and cryoDRGN on the same particles,
consensus poses and CTF, and both from the true poses (issue 21).

    python benchmarks/hetero_peer.py --out /tmp/hetero_peer [--n 2000 --box 128 --snr 0.03 --seed 11
                                     --cryodrgn-epochs 8 --cryodrgn-box 64 --zdim 8 --oracle-n 300]

1. Data: adenylate kinase whose LID domain (residues 122-159) turns by a random angle of up to
   ``--hinge-deg`` per particle (``gmmrefine simulate --hinge-residues``; truth column
   ``gmmDomainAngle``), ``--n`` particles, box ``--box``, 1 A/px, SNR ``--snr``; consensus poses
   ``--perturb-deg`` / ``--perturb-A`` off the truth (``particles_perturbed.star``).
2. Pose sets, each given to every arm:
   * ``consensus``: what a user has, a consensus refinement: ``gmmrefine refine`` (defaults) from the
     perturbed poses; our arm runs ``gmmrefine hetero --job`` on that job (its GMMs and each half's own
     resolution as the band, every other setting the default);
   * ``truth``: the true poses; each half reconstructed at them (``gmmrefine reconstruct``) and its GMM
     built from its own half map at ``--resolution`` (``gmmrefine build-gmm``), then ``gmmrefine hetero
     --maxres --resolution``;
   * ``perturbed``: the perturbed poses themselves, as for ``truth`` (not run by default).
3. cryoDRGN (PyPI ``cryodrgn==--cryodrgn-version``) in its own virtual environment made by this script
   (``torch==2.13.0`` first, as everywhere here; kept in ``--out``/cryodrgn_venv): the stack downsampled to
   ``--cryodrgn-box`` (``cryodrgn downsample``), poses and CTF parsed from the same STAR
   (``parse_pose_star``, ``parse_ctf_star``), then ``train_vae --zdim --num-epochs`` on each half
   (``--ind``), as a CPU user would; the latent of the last epoch.
4. Per arm and half: |Spearman(PC1 of the latents, true hinge angle)|, wall time per epoch and the
   training process's peak RSS (``/usr/bin/time -v``).
5. The ceiling no program of ours defines (``oracle``): on ``--oracle-n`` particles per half, the Bayes
   posterior mean of the hinge angle from the exact model (the simulation's atoms projected at every
   hinge angle of a 33-point grid, the particle's pose of that set and its CTF; white noise of the
   known sigma; uniform prior), and its |Spearman| with the truth.

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


def consensus_job(sim: Path, out: Path) -> Path:
    """``gmmrefine refine`` (defaults) from the perturbed poses: the consensus refinement a user has."""
    job = out / "consensus_refine"
    if not (job / "final" / "particles.star").is_file():
        shutil.rmtree(job, ignore_errors=True)
        subprocess.run(gm("refine", "--particles", str(sim / "particles_perturbed.star"), "--out", str(job)),
                       check=True, stdout=subprocess.DEVNULL)
    return job


def ours(sim: Path, star: Path, out: Path, args, job: Path | None = None) -> dict:
    """``gmmrefine hetero --job`` on a refine job, or GMMs from each half's own map at the poses of
    ``star`` and then ``gmmrefine hetero``."""

    extra = [] if args.epochs is None else ["--epochs", str(args.epochs)]
    if job is not None:
        hj = out / "hetero"
        shutil.rmtree(hj, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        run = measured(gm("hetero", "--job", str(job), "--out", str(hj), "--seed", "0", *extra))
        return _ours_result(sim, star, hj, run)
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
                      str(out / "gmm_half2.npz"), "--out", str(job), "--maxres", str(args.resolution), "--seed", "0",
                      *extra))
    return _ours_result(sim, star, job, run)


def _ours_result(sim: Path, star: Path, job: Path, run: dict) -> dict:
    from scipy.stats import spearmanr

    from gmmrefine.io.particles import read_particles
    from gmmrefine.io.star import read_star

    ps = read_particles(star)
    truth = read_star(sim / "truth.star")["particles"][TRUTH_COLUMN].to_numpy(np.float64)
    latent = np.load(job / "latent.npy")
    # the job's own PC1 (of the decoded motions, what `select --pc1-range` uses), and for comparison
    # the plain PCA of its latents
    pc1 = read_star(job / "particles.star")["particles"]["gmmLatentPC1"].to_numpy(np.float64)
    summary = json.loads((job / "summary.json").read_text())
    epochs = int(json.loads((job / "job.json").read_text())["params"]["epochs"])
    halves = {}
    for h in (1, 2):
        rows = ps.half(h)
        train_s = sum(e["seconds"] for e in summary["halves"][str(h)]["history"])
        halves[str(h)] = {"spearman_pc1": float(abs(spearmanr(pc1[rows], truth[rows])[0])),
                          "spearman_latent_pc1": spearman_pc1(latent[rows], truth[rows]), "n": int(len(rows)),
                          "s_per_epoch": train_s / epochs}
    return {"wall_s": run["wall_s"], "peak_rss_MB": run["peak_rss_MB"], "epochs": epochs, "halves": halves,
            "band_A": summary.get("settings", {}).get("half_maxres_A") or summary.get("settings", {}).get("maxres_A")}


def simulation_source(sim: Path):
    """``(settings, source, box, apix)`` of a simulation folder: the model its particles were made from."""
    from gmmrefine.cli.simulate import build_source

    info = json.loads((sim / "simulation.json").read_text())
    return (info, *build_source(argparse.Namespace(**dict(info, model=Path(info["model"])))))


def cluster_maps(sim: Path, job: Path, refine_job: Path) -> dict:
    """The extreme clusters' maps of our consensus arm against the truth at their conformations.

    Per half, for clusters 1 and K (lowest and highest mean PC1): the noise-free map at the mean true
    hinge angle of the cluster's particles, and the masked FSC (domain mask, mean over shells) of the
    cluster's reconstruction to it, of the same cluster's map to the other extreme's truth, and of the
    consensus half map (``refine_job/final/half{h}.mrc``, brought to the cluster map's grid) to it: over
    every shell of the cluster map's grid (to its Nyquist; the grid follows the hetero band), and, as
    ``..._to_resolution``, over the shells to the consensus refinement's gold-standard resolution (the
    band where the data hold signal; the same band whatever grid the maps are on).
    """
    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.star import read_star
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth, on_grid_of
    from gmmrefine.simulate.density import atoms_to_map

    _, source, box, apix = simulation_source(sim)
    truth = read_star(sim / "truth.star")["particles"][TRUTH_COLUMN].to_numpy(np.float64)
    table = read_star(job / "particles.star")["particles"]
    label, subset = table["gmmLatentCluster"].to_numpy(int), table["rlnRandomSubset"].to_numpy(int)
    mask = read_map(sim / "domain_mask.mrc")[0]
    k = int(label.max())
    resolution = json.loads((refine_job / "final" / "summary.json").read_text())["resolution_final_A"]
    shell = int(box * apix / resolution)

    def truth_at(angle: float) -> np.ndarray:
        coords = source.conformations(None, np.array([angle]))[0].numpy()
        return atoms_to_map(coords, box, apix, elements=source.assembly_elements(), bfactor_A2=source.bfactor_A2,
                            center_A=source.center_A).cpu().numpy()

    out = {}
    for h in (1, 2):
        ends = {c: float(truth[(subset == h) & (label == c)].mean()) for c in (1, k)}
        truths = {c: truth_at(a) for c, a in ends.items()}
        consensus = read_map(refine_job / "final" / f"half{h}.mrc")[0]
        for c, other in ((1, k), (k, 1)):
            cmap = read_map(job / f"cluster_half{h}_k{c}.mrc")[0]
            cons = on_grid_of(cmap, consensus).numpy()
            m = on_grid_of(cmap, mask).numpy()
            row: dict = {"n": int(((subset == h) & (label == c)).sum()), "mean_true_angle_deg": ends[c]}
            for suffix, max_shell in (("", None), ("_to_resolution", shell)):
                row["cluster_to_own_truth" + suffix] = masked_fsc_to_truth(cmap, cmap, truths[c], m, max_shell)
                row["cluster_to_other_truth" + suffix] = masked_fsc_to_truth(cmap, cmap, truths[other], m, max_shell)
                row["consensus_to_own_truth" + suffix] = masked_fsc_to_truth(cons, cons, truths[c], m, max_shell)
            out[f"half{h}_k{c}"] = row
    return out


def oracle(sim: Path, star: Path, args) -> dict:
    """Bayes posterior-mean hinge angle from the exact atomic model at the poses of ``star`` (see item 5)."""
    from scipy.stats import spearmanr

    from gmmrefine.io.particles import iter_image_chunks, read_particles
    from gmmrefine.io.star import read_star
    from gmmrefine.simulate.particles import Truth, clean_images

    info, source, box, apix = simulation_source(sim)
    ps = read_particles(star)
    truth = read_star(sim / "truth.star")["particles"][TRUTH_COLUMN].to_numpy(np.float64)
    grid = np.linspace(-info["hinge_deg"], info["hinge_deg"], 33)
    sigma = float(info["noise_sigma"])
    halves = {}
    for h in (1, 2):
        rows = ps.half(h)[:args.oracle_n]
        images = np.concatenate([im for _, im in iter_image_chunks(ps, rows, 1000)]).astype(np.float64)
        loglik = np.zeros((len(rows), len(grid)))
        for k, angle in enumerate(grid):
            fixed = Truth(angles_deg=ps.angles_deg, shift_A=ps.shift_A, ctf=ps.ctf, subset=np.asarray(ps.subset),
                          hinge_angle_deg=np.full(len(ps), angle))
            for s in range(0, len(rows), 100):
                clean = clean_images(source, fixed, rows[s:s + 100], box, apix).numpy()
                loglik[s:s + 100, k] = -((images[s:s + 100] - clean) ** 2).sum((1, 2)) / (2 * sigma**2)
        post = np.exp(loglik - loglik.max(1, keepdims=True))
        post /= post.sum(1, keepdims=True)
        mean = post @ grid
        halves[str(h)] = {"spearman_pc1": float(abs(spearmanr(mean, truth[rows])[0])), "n": int(len(rows)),
                          "s_per_epoch": float("nan"), "posterior_sd_median_deg":
                          float(np.median(np.sqrt(np.maximum(post @ grid**2 - mean**2, 0))))}
    return {"halves": halves, "peak_rss_MB": float("nan")}


def pose_error(sim: Path, star: Path) -> dict:
    """Mean angular (deg) and shift (A) error of the poses in ``star`` against the truth."""
    import torch

    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
    from gmmrefine.io.particles import read_particles

    est, true = read_particles(star), read_particles(sim / "particles.star")
    ang = rotation_angle_deg(euler_to_matrix(torch.as_tensor(est.angles_deg)),
                             euler_to_matrix(torch.as_tensor(true.angles_deg)))
    return {"angle_deg": float(ang.mean()), "shift_A": float(np.linalg.norm(est.shift_A - true.shift_A, axis=1).mean())}


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


def _finished_training(train: Path, cmd: list[str], args) -> dict | None:
    """The account of a finished ``train_vae`` in ``train`` made by the same command (``measured.json``,
    or for a training from before that file, the arm of ``--reuse-cryodrgn``'s results file), or None.
    Its latents are read again and judged now; only the training is not repeated (its inputs, the
    downsampled stack and the pose and CTF files of the same STAR, are the same)."""
    if not (train / "run.log").is_file() or "Finished in" not in (train / "run.log").read_text():
        return None
    if (train / "measured.json").is_file():
        run = json.loads((train / "measured.json").read_text())
        return {**run, "reused": True} if run.pop("command") == cmd else None
    # the arm of the same pose set ("cryodrgn_consensus" -> "cryodrgn/consensus") and settings
    r = json.loads(Path(args.reuse_cryodrgn).read_text())["arms"].get(train.parent.name.replace("_", "/", 1))
    if r is None or r.get("epochs") != args.cryodrgn_epochs or r.get("zdim") != args.zdim \
            or r.get("box") != args.cryodrgn_box:
        return None
    half = r["halves"][train.name.removeprefix("train_half")]
    return {"wall_s": half["wall_s"], "peak_rss_MB": half["peak_rss_MB"], "reused": True}


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
        cmd = [*tool, "train_vae", str(small), "--poses", str(out / "pose.pkl"), "--ctf", str(out / "ctf.pkl"),
               "--ind", str(ind), "--zdim", str(args.zdim), "-n", str(args.cryodrgn_epochs), "--seed", "0",
               "--no-analysis", "-o", str(train), *args.cryodrgn_args.split()]
        run = _finished_training(train, cmd, args) if args.reuse_cryodrgn else None
        if run is None:
            shutil.rmtree(train, ignore_errors=True)
            run = measured(cmd, env=env)
            (train / "measured.json").write_text(json.dumps({"command": cmd, **run}))
        z_files = sorted(train.glob("z.*.pkl"), key=lambda p: int(re.findall(r"\d+", p.name)[-1]))
        with open(z_files[-1] if z_files else train / "z.pkl", "rb") as fh:
            z = np.asarray(pickle.load(fh))
        # its own account of the training time: "Finished in H:MM:SS (H:MM:SS per epoch)"
        per_epoch = re.findall(r"\(([\d:.]+) per epoch\)", (train / "run.log").read_text())
        halves[str(h)] = {"spearman_pc1": spearman_pc1(z, truth[rows]), "n": int(len(rows)),
                          "wall_s": run["wall_s"], "peak_rss_MB": run["peak_rss_MB"],
                          "reused_training": bool(run.get("reused")),
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
    parser.add_argument("--seed", type=int, default=11, help="simulation seed (7 is the set hetero was tuned on)")
    parser.add_argument("--resolution", type=float, default=4.0,
                        help="GMM resolution and hetero --maxres of the truth and perturbed arms, A")
    parser.add_argument("--epochs", type=int, default=None, help="gmmrefine hetero epochs (default: its own)")
    parser.add_argument("--oracle-n", type=int, default=300, help="particles per half of the Bayes ceiling")
    parser.add_argument("--cryodrgn-version", default="4.3.1")
    parser.add_argument("--cryodrgn-epochs", type=int, default=8)
    parser.add_argument("--cryodrgn-box", type=int, default=64, help="box the stack is downsampled to for cryoDRGN")
    parser.add_argument("--cryodrgn-args", default="--uninvert-data",
                        help="more train_vae options (quoted); our particles are white on black, as RELION's")
    parser.add_argument("--zdim", type=int, default=8)
    parser.add_argument("--reuse-cryodrgn", default=None, metavar="RESULTS_JSON",
                        help="judge a cryoDRGN training already finished in --out by the same command again "
                             "instead of repeating it (its wall time and RSS from its measured.json, or from this "
                             "earlier results.json); marked reused_training in the results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arms", default="ours,cryodrgn,oracle", help="comma-separated: ours, cryodrgn, oracle")
    parser.add_argument("--poses", default="consensus,truth", help="comma-separated: consensus, truth, perturbed")
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = simulate(out, args)
    stars = {"perturbed": sim / "particles_perturbed.star", "truth": sim / "particles.star"}
    jobs: dict[str, Path | None] = {"perturbed": None, "truth": None}
    if "consensus" in args.poses.split(","):
        t_refine = time.perf_counter()
        jobs["consensus"] = consensus_job(sim, out)
        stars["consensus"] = jobs["consensus"] / "final" / "particles.star"
        results_refine_s = time.perf_counter() - t_refine
        # a finished job reused: its own account, the log's last line "done in N s: ..."
        done = re.findall(r"done in (\d+) s", (jobs["consensus"] / "log.txt").read_text())
        results_refine_s = float(done[-1]) if done else results_refine_s
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "cpu_count": os.cpu_count(), "arms": {}}
    if "consensus" in stars:
        results["consensus_refine_s"] = results_refine_s
        results["consensus_pose_error"] = pose_error(sim, stars["consensus"])
    for pose in args.poses.split(","):
        for arm in args.arms.split(","):
            if arm == "ours":
                r = ours(sim, stars[pose], out / f"ours_{pose}", args, jobs[pose])
                refine_job = jobs[pose]
                if refine_job is not None:
                    r["clusters"] = cluster_maps(sim, out / f"ours_{pose}" / "hetero", refine_job)
            elif arm == "oracle":
                r = oracle(sim, stars[pose], args)
            else:
                r = cryodrgn(sim, stars[pose], out / f"{arm}_{pose}", args)
            results["arms"][f"{arm}/{pose}"] = r
            (out / "results.json").write_text(json.dumps(results, indent=2))
    results["wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"{args.n} particles, box {args.box}, SNR {args.snr:g}, hinge up to {args.hinge_deg:g} deg, consensus "
          f"poses {args.perturb_deg:g} deg / {args.perturb_A:g} A off")
    if "consensus_pose_error" in results:
        e = results["consensus_pose_error"]
        print(f"consensus = gmmrefine refine from the perturbed poses ({results['consensus_refine_s']:.0f} s): "
              f"{e['angle_deg']:.2f} deg / {e['shift_A']:.2f} A from the truth")
    print("arm                  |Spearman| h1  h2    s/epoch h1  h2   peak MB")
    for name, r in results["arms"].items():
        h = r["halves"]
        rss = r.get("peak_rss_MB") or max(h[k].get("peak_rss_MB", float("nan")) for k in h)
        if any(h[k].get("reused_training") for k in h):
            name += "*"
        print(f"{name:20s} {h['1']['spearman_pc1']:6.3f} {h['2']['spearman_pc1']:6.3f}    "
              f"{h['1']['s_per_epoch']:7.1f} {h['2']['s_per_epoch']:7.1f}  {rss:7.0f}")
    if any(x.get("reused_training") for r in results["arms"].values() for x in r["halves"].values()):
        print("* training of an earlier run judged again (--reuse-cryodrgn): its time and RSS are from that run")
    for name, r in results["arms"].items():
        for key, c in r.get("clusters", {}).items():
            print(f"{name} {key} ({c['n']} particles, mean true angle {c['mean_true_angle_deg']:+.1f} deg): domain FSC "
                  f"to its truth {c['cluster_to_own_truth']:.4f}, to the other end's {c['cluster_to_other_truth']:.4f}; "
                  f"consensus map to its truth {c['consensus_to_own_truth']:.4f}; to the consensus resolution "
                  f"{c['cluster_to_own_truth_to_resolution']:.4f}, {c['cluster_to_other_truth_to_resolution']:.4f}; "
                  f"{c['consensus_to_own_truth_to_resolution']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The two CPU paths side by side: the compiled kernels (``GMMREFINE_KERNELS=native``) against the torch
code (``GMMREFINE_KERNELS=torch``, what CUDA runs and what a machine without a C compiler gets), so that
the cost of the fallback is known (issue 18).

    python benchmarks/kernels.py [--box 128 --apix 1.5 --gaussians 2000 --n 400 --repeat 3 --json out.json]

Each mode runs in its own process (same thread count), ``--repeat`` times alternating, best time kept:

1. **projection step**: GMM projection and its gradients (centres, amplitudes, widths, poses) for a
   batch of 16 particles in the band 40-4 A: particles/s.
2. **pose refinement**: :func:`gmmrefine.refine.poses.refine_poses` (the Newton optimiser, defaults) of
   ``--n`` noisy particles 3 degrees off: particles/s.
3. **reconstruction**: insertion of ``--n`` images and the map (Pipe-Menon weights): seconds.
4. **one refine iteration**: ``gmmrefine refine --iterations 1 --resolution-start 8`` on a simulated set
   (``--n`` particles of the bundled adk at ``--box``), wall time of iteration 1 from its ``state.json``.

Prints a table and one JSON object (ratios torch / native).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data" / "adk_open.pdb"


def synthetic_gmm(n: int, box: int, apix: float, seed: int = 0):
    """``n`` Gaussians filling a sphere of radius 0.3 box (a particle of the box's size)."""
    import torch

    from gmmrefine.gmm.model import GaussianMixture

    g = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    radius = 0.3 * box * apix * torch.rand(n, 1, generator=g) ** (1 / 3)
    return GaussianMixture(direction * radius, 0.5 + torch.rand(n, generator=g),
                           1.5 * apix + apix * torch.rand(n, generator=g))


def noisy_particles(gmm, n: int, box: int, apix: float, snr: float = 0.1, seed: int = 1):
    """Images of ``gmm`` at random poses with white noise, and starting poses 3 degrees / 1 px off."""
    import torch

    from gmmrefine.geometry.rotations import axis_angle_to_matrix, random_rotations
    from gmmrefine.gmm.render import render_image

    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(n, g).float()
    t = torch.randn(n, 2, generator=g)
    images = torch.cat([render_image(gmm, box, apix, rot[i:i + 64], t[i:i + 64]) for i in range(0, n, 64)])
    images += torch.randn(images.shape, generator=g) * (images.var(dim=(-2, -1)).mean() / snr).sqrt()
    axes = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=1)
    return images, rot, t, axis_angle_to_matrix(axes * math.radians(3.0)) @ rot, t + 1.0


def worker(args) -> dict:
    """The in-process measurements of one mode (GMMREFINE_KERNELS is set by the parent)."""
    import torch

    from gmmrefine import native
    from gmmrefine.gmm.project import fourier_band, project_gmm
    from gmmrefine.reconstruct.insert import FourierAccumulator
    from gmmrefine.reconstruct.invert import prepare_spectra, reconstruct_map
    from gmmrefine.refine.poses import PoseSettings, particle_band, refine_poses

    box, apix = args.box, args.apix
    gmm = synthetic_gmm(args.gaussians, box, apix)
    band = fourier_band(box, apix, 40.0, 4.0)
    images, rot, t, rot0, t0 = noisy_particles(gmm, args.n, box, apix)
    out: dict = {"mode": native.kernel_mode(), "kernels": native.kernels_info()["why"],
                 "threads": torch.get_num_threads()}

    params = [x.clone().requires_grad_() for x in (gmm.centers_A, gmm.amplitudes, gmm.widths_A)]
    from gmmrefine.gmm.model import GaussianMixture

    def projection_step():
        r = rot[:16].clone().requires_grad_()
        s = t[:16].clone().requires_grad_()
        proj = project_gmm(GaussianMixture(*params), r, s, band)
        torch.autograd.grad(proj.abs().square().sum(), [*params, r, s])

    projection_step()  # warm-up: tables, thread pool
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < 3.0:
        projection_step()
        reps += 1
    out["projection_particles_per_s"] = 16 * reps / (time.perf_counter() - start)

    target = particle_band(images, band)
    start = time.perf_counter()
    refine_poses(gmm, target, rot0, t0, band, PoseSettings())
    out["refine_particles_per_s"] = args.n / (time.perf_counter() - start)

    start = time.perf_counter()
    acc = FourierAccumulator(box)
    for i in range(0, args.n, 128):
        spectra, weights = prepare_spectra(images[i:i + 128], t[i:i + 128] * apix, apix, None)
        acc.insert(spectra, rot[i:i + 128], weights)
    reconstruct_map(acc)
    out["reconstruction_s"] = time.perf_counter() - start
    return out


def refine_iteration(mode: str, sim: Path, out: Path) -> float:
    """Wall time (s) of iteration 1 of ``gmmrefine refine`` in ``mode`` (from its state.json)."""
    env = dict(os.environ, GMMREFINE_KERNELS=mode)
    subprocess.run([sys.executable, "-m", "gmmrefine", "refine", "--particles", str(sim / "particles_perturbed.star"),
                    "--out", str(out), "--iterations", "1", "--resolution-start", "8", "--gmm-steps", "60"],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = json.loads((out / "state.json").read_text())["done"]
    return float(sum(v.get("seconds", 0.0) for k, v in done.items() if k.startswith("it001/")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.5)
    parser.add_argument("--gaussians", type=int, default=2000)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-refine-iteration", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    modes = ("native", "torch")
    best: dict[str, dict] = {}
    for _ in range(args.repeat):
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", "--box", str(args.box), "--apix", str(args.apix),
                   "--gaussians", str(args.gaussians), "--n", str(args.n)]
            r = json.loads(subprocess.run(cmd, env=dict(os.environ, GMMREFINE_KERNELS=mode), check=True,
                                          capture_output=True, text=True).stdout.strip().splitlines()[-1])
            b = best.setdefault(mode, r)
            for key in ("projection_particles_per_s", "refine_particles_per_s"):
                b[key] = max(b[key], r[key])
            b["reconstruction_s"] = min(b["reconstruction_s"], r["reconstruction_s"])
    if not args.skip_refine_iteration:
        with tempfile.TemporaryDirectory() as tmp:
            sim = Path(tmp) / "sim"
            subprocess.run([sys.executable, "-m", "gmmrefine", "simulate", "--model", str(MODEL), "--n", str(args.n),
                            "--box", str(args.box), "--apix", str(args.apix), "--snr", "0.1", "--perturb-deg", "3",
                            "--perturb-A", "1", "--seed", "2", "--out", str(sim)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for mode in modes:
                best[mode]["refine_iteration_s"] = min(refine_iteration(mode, sim, Path(tmp) / f"{mode}_{i}")
                                                       for i in range(max(1, min(args.repeat, 2))))
    ratios = {"projection": best["native"]["projection_particles_per_s"] / best["torch"]["projection_particles_per_s"],
              "refine": best["native"]["refine_particles_per_s"] / best["torch"]["refine_particles_per_s"],
              "reconstruction": best["torch"]["reconstruction_s"] / best["native"]["reconstruction_s"]}
    if "refine_iteration_s" in best["native"]:
        ratios["refine_iteration"] = best["torch"]["refine_iteration_s"] / best["native"]["refine_iteration_s"]
    result = {"settings": vars(args) | {"json": str(args.json)}, "native": best["native"], "torch": best["torch"],
              "torch_slowdown": ratios}
    print(f"box {args.box}, {args.apix} A/px, {args.gaussians} Gaussians, {args.n} particles, "
          f"{best['native']['threads']} threads")
    print(f"{'':32s} {'native':>10s} {'torch':>10s} {'torch slower by':>16s}")
    rows = [("projection step (particles/s)", "projection_particles_per_s", "projection"),
            ("pose refinement (particles/s)", "refine_particles_per_s", "refine"),
            ("reconstruction (s)", "reconstruction_s", "reconstruction"),
            ("refine iteration 1 (s)", "refine_iteration_s", "refine_iteration")]
    for label, key, ratio in rows:
        if key in best["native"]:
            print(f"{label:32s} {best['native'][key]:10.2f} {best['torch'][key]:10.2f} {ratios[ratio]:15.2f}x")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

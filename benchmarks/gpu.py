"""GPU throughput in one command: particles/s of the pose refinement and of the reconstruction, peak
GPU memory and the batch ``--batch auto`` chooses, at box 128 and 256 (issue 18).

    python benchmarks/gpu.py                        # CUDA if present (else the CPU), boxes 128 and 256
    python benchmarks/gpu.py --device cuda:1 --boxes 128 256 384 --n 4096 --json gpu.json

Per box: a synthetic particle of the box's size (``--gaussians`` Gaussians filling a sphere of radius
0.3 box), ``--n`` noisy images (SNR 0.1) whose starting poses are 3 degrees / 1 px off; then

1. the pose refinement (:func:`gmmrefine.refine.poses.refine_poses`, Newton, band 40-4 A, or 40 A to
   Nyquist where that is coarser) with the batch ``--batch auto`` would choose on this device
   (:func:`gmmrefine.refine.global_refine.resolve_batch`), after one warm-up batch;
2. the reconstruction of the same images (insertion, Pipe-Menon weights, inversion) on the device;

each timed with the device synchronised, peak memory from ``torch.cuda.max_memory_allocated`` (CUDA) or
the process's peak RSS (CPU). The same run on the CPU is the baseline printed beside it
(``--cpu-baseline``, on by default on a GPU; its particle count is ``--cpu-n``). It runs on a CPU-only
machine too (CI runs it at small sizes, ``--boxes 48 --n 32``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import noisy_particles, synthetic_gmm


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device_name: str, box: int, apix: float, n_gaussians: int, n: int) -> dict:
    """Throughput and memory of refinement and reconstruction at one box on one device."""
    import torch

    from gmmrefine.devices import resolve_device
    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.gmm.project import fourier_band
    from gmmrefine.reconstruct.insert import FourierAccumulator
    from gmmrefine.reconstruct.invert import prepare_spectra, reconstruct_map
    from gmmrefine.refine.global_refine import resolve_batch
    from gmmrefine.refine.poses import PoseSettings, particle_band, refine_poses

    device = resolve_device(device_name)
    gmm_cpu = synthetic_gmm(n_gaussians, box, apix)
    band = fourier_band(box, apix, 40.0, max(4.0, 2.05 * apix))
    images, rot, t, rot0, t0 = noisy_particles(gmm_cpu, n, box, apix)
    gmm = GaussianMixture(*(x.to(device) for x in (gmm_cpu.centers_A, gmm_cpu.amplitudes, gmm_cpu.widths_A)))
    settings = resolve_batch(PoseSettings(), device, n_gaussians, band, box)
    images, rot, t, rot0, t0 = (x.to(device) for x in (images, rot, t, rot0, t0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    target = particle_band(images, band)
    warm = min(settings.batch or 16, n)
    refine_poses(gmm, target[:warm], rot0[:warm], t0[:warm], band, settings)  # kernels, tables, allocator
    _sync(device)
    start = time.perf_counter()
    refine_poses(gmm, target, rot0, t0, band, settings)
    _sync(device)
    refine_s = time.perf_counter() - start
    refine_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    acc = FourierAccumulator(box, device=device)
    for i in range(0, n, 256):
        spectra, weights = prepare_spectra(images[i:i + 256], t[i:i + 256] * apix, apix, None)
        acc.insert(spectra, rot[i:i + 256], weights)
    reconstruct_map(acc)
    _sync(device)
    rec_s = time.perf_counter() - start
    rec_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rss_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"device": str(device), "box": box, "apix": apix, "gaussians": n_gaussians, "particles": n,
            "band_pixels": band.n_pixels, "batch_auto": settings.batch,
            "refine_particles_per_s": n / refine_s, "reconstruct_particles_per_s": n / rec_s,
            "refine_peak_GPU_MB": None if refine_peak is None else refine_peak / 2**20,
            "reconstruct_peak_GPU_MB": None if rec_peak is None else rec_peak / 2**20,
            "process_peak_RSS_MB": rss_MB}


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cuda:1, cpu")
    parser.add_argument("--boxes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--apix", type=float, default=None, help="A/px (default: 192 / box, a 190 A field)")
    parser.add_argument("--gaussians", type=int, default=4000)
    parser.add_argument("--n", type=int, default=2048, help="particles per measurement on the device")
    parser.add_argument("--cpu-n", type=int, default=256, help="particles of the CPU baseline")
    parser.add_argument("--no-cpu-baseline", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from gmmrefine.devices import device_name

    dev = device_name(args.device)
    rows = []
    for box in args.boxes:
        apix = args.apix or 192.0 / box
        row = {"box": box, "device": measure(dev, box, apix, args.gaussians, args.n)}
        if dev != "cpu" and not args.no_cpu_baseline:
            row["cpu"] = measure("cpu", box, apix, args.gaussians, args.cpu_n)
            row["speedup_refine"] = row["device"]["refine_particles_per_s"] / row["cpu"]["refine_particles_per_s"]
            row["speedup_reconstruct"] = (row["device"]["reconstruct_particles_per_s"]
                                          / row["cpu"]["reconstruct_particles_per_s"])
        rows.append(row)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if dev.startswith("cuda") else None, "rows": rows}
    print(f"{'box':>5s} {'device':>8s} {'batch':>6s} {'refine p/s':>11s} {'rec p/s':>9s} {'peak MB':>9s}  vs CPU")
    for row in rows:
        d = row["device"]
        peak = max(d["refine_peak_GPU_MB"] or 0, d["reconstruct_peak_GPU_MB"] or 0) or d["process_peak_RSS_MB"]
        vs = (f"  refine {row['speedup_refine']:.1f}x, reconstruct {row['speedup_reconstruct']:.1f}x"
              if "cpu" in row else "")
        print(f"{row['box']:5d} {d['device']:>8s} {d['batch_auto']:6d} {d['refine_particles_per_s']:11.1f} "
              f"{d['reconstruct_particles_per_s']:9.1f} {peak:9.0f}{vs}")
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

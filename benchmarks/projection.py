"""Projections + gradients per second of the GMM projector, against its peers in the same run.

Peers: (a) a straightforward autograd implementation of the separable Fourier formula (complex
exponential tables per Gaussian and frequency, complex matmul, autograd backward: the baseline);
(b) the machine's float32 matmul rate, and the FLOP roofline of our method (its matmul flops at that
rate). Also memory per batch: the bytes autograd keeps for backward (saved-tensor hooks) and the peak
resident-memory growth of one step measured in a fresh process, and their growth with batch size.

Usage: ``python benchmarks/projection.py [--quick] [--threads 2] [--json out.json]``.
Two measurements per grid point, each for ours and the baseline in the same interleaved rounds:
- projector: project a batch and back-propagate a given gradient (the particle spectra) to the GMM
  parameters, the rotation matrices and the shifts: projections + gradients, nothing else;
- refine step: the same inside what refinement runs, with axis-angle updates of the rotations and
  the FRC loss against the particle spectra (their fixed per-step cost weighs at small N and K).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix, random_rotations
from gmmrefine.gmm.loss import frc_loss
from gmmrefine.gmm.project import FourierBand, fourier_band, image_positions_A, project_band

GRID = [(96, 1.5), (192, 1.0), (256, 1.0)]
CUTS_A = [8.0, 4.0, 3.0]
NS = [2000, 8000, 16000]


def project_baseline(centers_A, amplitudes, widths_A, rotations, translation_px, band: FourierBand):
    """The baseline: complex exponentials per Gaussian and frequency, complex bmm, autograd."""
    pos = image_positions_A(centers_A, rotations, translation_px, band.apix)
    k = band.k_max
    scale = 1.0 / (band.box * band.apix)
    fx = torch.arange(k + 1, dtype=pos.dtype) * scale
    fy = torch.arange(-k, k + 1, dtype=pos.dtype) * scale
    s2 = widths_A[:, None] ** 2
    ex = torch.exp(torch.complex(-2 * math.pi**2 * s2 * fx**2, -2 * math.pi * pos[..., 0, None] * fx))
    mass = amplitudes * (2 * math.pi) ** 1.5 * widths_A**3 / band.apix**3
    ey = mass[:, None] * torch.exp(torch.complex(-2 * math.pi**2 * s2 * fy**2, -2 * math.pi * pos[..., 1, None] * fy))
    img = torch.bmm(ey.transpose(1, 2), ex)  # (B, 2K+1, K+1)
    flat = (band.ny + k) * (k + 1) + band.nx
    return img.flatten(1)[:, flat]


_MM = 1024


def _matmul_seconds() -> float:
    a = torch.ones(_MM, _MM)
    t0 = time.perf_counter()
    a @ a
    return time.perf_counter() - t0


def matmul_gflops(reps: int = 5) -> float:
    """Best float32 matmul rate (GFLOP/s) of a 1024^3 product."""
    _matmul_seconds()
    return 2 * _MM**3 / min(_matmul_seconds() for _ in range(reps)) / 1e9


def saved_bytes(fn) -> int:
    """Bytes of tensors autograd saves for backward during ``fn()`` (the per-batch working set)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def make_case(n, box, apix, cut, batch, gen):
    band = fourier_band(box, apix, 50.0, cut)
    radius = 0.3 * box * apix
    centers = (torch.rand(n, 3, generator=gen) - 0.5) * radius
    amps = torch.rand(n, generator=gen) + 0.5
    widths = torch.rand(n, generator=gen) * 0.5 + cut / 3
    rot0 = random_rotations(batch, gen).float()
    particles = torch.randn(batch, band.n_pixels, dtype=torch.complex64, generator=gen)
    return band, centers, amps, widths, rot0, particles


def step(projector, band, centers, amps, widths, rot0, particles, measure=False):
    """One refinement step; returns the bytes saved for backward when ``measure`` (the hooks that
    count them run Python per saved tensor, so timed calls go without)."""
    params = [centers.clone().requires_grad_(), amps.clone().requires_grad_(), widths.clone().requires_grad_()]
    v = torch.zeros(rot0.shape[0], 3, requires_grad=True)
    t = torch.zeros(rot0.shape[0], 2, requires_grad=True)

    def fwd():
        rot = axis_angle_to_matrix(v) @ rot0
        proj = projector(params[0], params[1], params[2], rot, t, band)
        return frc_loss(proj, particles, band.ring_index, band.n_rings).sum()

    if measure:
        nbytes, loss = saved_bytes(fwd)
    else:
        nbytes, loss = None, fwd()
    loss.backward()
    return nbytes


def projector_step(projector, band, centers, amps, widths, rot0, particles):
    """Projections and their gradients alone: to the GMM parameters, the rotation matrices and the
    shifts, from a given gradient of the projections (the particle spectra)."""
    leaves = [centers.clone().requires_grad_(), amps.clone().requires_grad_(), widths.clone().requires_grad_(),
              rot0.clone().requires_grad_(), torch.zeros(rot0.shape[0], 2, requires_grad=True)]
    projector(*leaves, band).backward(particles)


def interleaved_rates(fns, batch, min_time=2.0, min_rounds=3, max_rounds=20):
    """Best time per call of each function, measured in interleaved rounds (one call of each per
    round), plus the best 1024^3 matmul rate seen in the same rounds.

    The 2 cores are shared with other jobs: interleaving puts every peer under the same load, and the
    best repetition is the least disturbed one. Returns ``([particles/s per fn], matmul GFLOP/s)``.
    """
    for fn in fns:
        fn()  # warm-up
    best = [math.inf] * len(fns)
    best_mm = math.inf
    rounds, t0 = 0, time.perf_counter()
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - t0 < min_time):
        for i, fn in enumerate(fns):
            t1 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t1)
        # three products a round: one 15 ms product is easily caught by a neighbour's burst, and a
        # disturbed peak would flatter the fraction of the roofline
        best_mm = min(best_mm, *(_matmul_seconds() for _ in range(3)))
        rounds += 1
    return [batch / b for b in best], 2 * _MM**3 / best_mm / 1e9


def _peak_rss_mb(n, box, apix, cut, batch, threads) -> float:
    """Peak resident-memory growth (MB) of one projection+gradient step, in a fresh process.

    Reads VmHWM from /proc (Linux): ``ru_maxrss`` would carry the parent's peak across fork/exec.
    """
    import subprocess

    code = ("import sys, torch; sys.path.insert(0, %r); import projection as p; "  # noqa: UP031
            "hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]); "
            "torch.set_num_threads(%d); g = torch.Generator().manual_seed(0); "
            "case = p.make_case(%d, %d, %r, %r, %d, g); "
            "r0 = hwm(); p.step(p.project_band, *case, measure=True); print((hwm() - r0) / 1024)"
            % (os.path.dirname(os.path.abspath(__file__)), threads, n, box, apix, cut, batch))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one grid point per box, N = 2000 and 8000")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"float32 matmul (1024^3): {matmul_gflops():.0f} GFLOP/s on {args.threads} threads "
          f"(load avg {os.getloadavg()[0]:.2f}); each row uses the best rate seen while it ran")
    header = (f"{'N':>6} {'box':>4} {'apix':>4} {'cut':>4} {'K':>3} {'P':>6} | projector: {'ours/s':>7} {'base/s':>7} "
              f"{'speedup':>7} {'of roof':>7} | refine step: {'ours/s':>7} {'base/s':>7} {'speedup':>7} {'of roof':>7} "
              f"| {'GFLOP/s':>7} {'roof/s':>7} | {'MB/batch':>8}")
    print(header)
    rows = []
    grid = [(n, b, a, c) for n in NS for (b, a) in GRID for c in CUTS_A]
    if args.quick:
        grid = [(n, b, a, c) for n in (2000, 8000) for (b, a), c in zip(GRID, CUTS_A)]
    for n, box, apix, cut in grid:
        case = make_case(n, box, apix, cut, args.batch, gen)
        (p_ours, p_base, s_ours, s_base), peak = interleaved_rates(
            [lambda: projector_step(project_band, *case), lambda: projector_step(project_baseline, *case),  # noqa: B023
             lambda: step(project_band, *case), lambda: step(project_baseline, *case)], args.batch)  # noqa: B023
        band = case[0]
        k1 = band.k_max + 1
        flops = 3 * 2 * (2 * k1) ** 2 * n  # forward bmm + two backward bmm, per particle
        roof = peak * 1e9 / flops
        mem = step(project_band, *case, measure=True) / 2**20
        row = dict(n=n, box=box, apix=apix, cut_A=cut, k_max=band.k_max, pixels=band.n_pixels, matmul_gflops=peak,
                   projector_ours_per_s=p_ours, projector_baseline_per_s=p_base, projector_speedup=p_ours / p_base,
                   projector_fraction_of_roofline=p_ours / roof,
                   ours_per_s=s_ours, baseline_per_s=s_base, speedup=s_ours / s_base, roofline_per_s=roof,
                   fraction_of_roofline=s_ours / roof, saved_MB_per_batch=mem)
        rows.append(row)
        print(f"{n:>6} {box:>4} {apix:>4} {cut:>4} {band.k_max:>3} {band.n_pixels:>6} | {'':>10} {p_ours:>7.0f} "
              f"{p_base:>7.0f} {p_ours / p_base:>7.1f} {p_ours / roof:>7.2f} | {'':>12} {s_ours:>7.0f} {s_base:>7.0f} "
              f"{s_ours / s_base:>7.1f} {s_ours / roof:>7.2f} | {peak:>7.0f} {roof:>7.0f} | {mem:>8.1f}", flush=True)
    # Memory growth with batch size at one mid-size case.
    growth = []
    for batch in (1, 4, 16, 64):
        case = make_case(8000, 192, 1.0, 4.0, batch, gen)
        mb = step(project_band, *case, measure=True) / 2**20
        peak_mb = _peak_rss_mb(8000, 192, 1.0, 4.0, batch, args.threads)
        growth.append(dict(batch=batch, saved_MB=mb, peak_rss_growth_MB=peak_mb))
        print(f"memory: N=8000 box 192 cut 4 A batch {batch:>3}: {mb:8.1f} MB saved for backward, "
              f"peak RSS growth of one step {peak_mb:8.1f} MB")
    if args.json:
        from gmmrefine.io.atomic import write_json_atomic

        write_json_atomic(args.json, dict(threads=args.threads, batch=args.batch, rows=rows, memory=growth))
    return 0


if __name__ == "__main__":
    sys.exit(main())

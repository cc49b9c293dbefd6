"""``gmmrefine reconstruct``: half maps by direct Fourier inversion and their gold-standard FSC."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError

COMMAND = "reconstruct"
HELP = "half maps of a particle set at its poses (direct Fourier inversion) and their FSC"
DESCRIPTION = (
    "Reconstructs the two half sets (rlnRandomSubset) of a particle set at the poses in its file and "
    "measures their FSC. Direct Fourier inversion (2x padded trilinear insertion, symmetry summed over the "
    "Fourier grid, Pipe-Menon gridding weights, gridding correction; equivalent to relion_reconstruct) in "
    "one streamed pass. Images are CTF-weighted (--ctf wiener, default, as relion_reconstruct --ctf), "
    "phase-flipped (--ctf flip) or taken as they are (--ctf none, for data without a CTF). Writes half1.mrc, "
    "half2.mrc, full.mrc, fsc.json and fsc.png into --out (only halfN.mrc with --half N). Runs unchanged under "
    "torchrun / srun: each process inserts its share of the particles and rank 0 writes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--particles", type=Path, required=True, help="RELION STAR or cryoSPARC .cs file")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--sym", default="C1", help="point group symmetry (C<n>, D<n>, T, O, I)")
    parser.add_argument("--ctf", choices=("wiener", "flip", "none"), default="wiener",
                        help="CTF correction: CTF-weighted (Wiener-like, as relion_reconstruct --ctf; measured closer "
                             "to the true map than phase flipping), phase flip, or none (data without a CTF)")
    parser.add_argument("--half", choices=("1", "2", "both"), default="both", help="which half sets to reconstruct")
    parser.add_argument("--pad", type=int, default=2, help="Fourier oversampling factor (1 to 4)")
    parser.add_argument("--chunk", type=int, default=128, help="particles read from disk at a time (memory only)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty --out")


def _validate(args):

    from gmmrefine.io.particles import read_particles
    from gmmrefine.reconstruct.invert import _check_poses, symmetry_matrices

    if args.pad < 1 or args.pad > 4:
        raise InputError(f"--pad: expected 1 to 4, got {args.pad}.", field="pad")
    if args.chunk < 1:
        raise InputError(f"--chunk: expected at least 1, got {args.chunk}.", field="chunk")
    resolve_device(args.device)
    ps = read_particles(args.particles, require_ctf=args.ctf != "none")
    if len(ps) == 0:
        raise InputError(f"{args.particles}: the particle set is empty; nothing to reconstruct.",
                         path=str(args.particles))
    _check_poses(ps, np.asarray(ps.angles_deg, dtype=np.float64), np.asarray(ps.shift_A, dtype=np.float64))
    halves = (1, 2) if args.half == "both" else (int(args.half),)
    for h in halves:
        if not (np.asarray(ps.subset) == h).any():
            raise InputError(f"{args.particles}: half set {h} (rlnRandomSubset = {h}) has no particles.",
                             path=str(args.particles), field="rlnRandomSubset")
    symmetry_matrices(args.sym)
    return ps, halves


def main(args) -> int:
    from gmmrefine import distributed
    from gmmrefine.cli.postprocess import check_out_dir, fsc_table, plot_fsc_curves
    from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at
    from gmmrefine.io.atomic import write_json_atomic
    from gmmrefine.io.mrc import write_map
    from gmmrefine.pipeline.job import check_output_folder
    from gmmrefine.reconstruct.invert import accumulate_halves, reconstruct_maps_low_memory, symmetry_matrices

    ctx = distributed.init(args.device)
    distributed.on_main(check_out_dir, args.out, args.force)  # before reading any particle
    ps, halves = _validate(args)
    # the maps written: one per half, the full map (float32)
    distributed.on_main(check_output_folder, args.out, 4 * ps.box**3 * (len(halves) + 1))
    t0 = time.time()
    symmetry = symmetry_matrices(args.sym, device=ctx.device)
    # Several processes: each inserts a contiguous shard of the particles, the accumulators are summed
    # and rank 0 alone inverts them and writes.
    mine = None
    if ctx.active:
        indices = np.flatnonzero(np.isin(np.asarray(ps.subset), halves))
        lo, hi = distributed.shard(len(indices))
        mine = indices[lo:hi]
    accs = accumulate_halves(ps, ctf_mode=args.ctf, halves=halves, chunk_size=args.chunk, pad=args.pad,
                             device=ctx.device, progress=ctx.is_main, particles=mine)
    distributed.sum_accumulators_(accs)
    if not ctx.is_main:
        return 0
    counts = {h: accs[h].count for h in halves}
    maps = {h: vol.cpu() for h, vol in reconstruct_maps_low_memory(accs, symmetry=symmetry).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    for h, vol in maps.items():
        write_map(args.out / f"half{h}.mrc", vol.numpy(), ps.apix)
    elapsed = time.time() - t0
    if len(halves) == 1:
        print(f"half {halves[0]}: {counts[halves[0]]} particles; wrote {args.out / f'half{halves[0]}.mrc'} "
              f"({elapsed:.1f} s)")
        return 0
    full = 0.5 * (maps[1] + maps[2])
    write_map(args.out / "full.mrc", full.numpy(), ps.apix)
    fsc = fourier_shell_correlation(maps[1], maps[2])
    res143 = resolution_at(fsc, ps.box, ps.apix, 0.143)
    res05 = resolution_at(fsc, ps.box, ps.apix, 0.5)
    report = {
        "particles": str(args.particles), "n_half1": counts[1], "n_half2": counts[2], "box": ps.box,
        "apix": ps.apix, "sym": args.sym, "ctf": args.ctf, "pad": args.pad,
        "resolution_0143_A": res143, "resolution_05_A": res05, "seconds": elapsed,
        "curves": fsc_table({"unmasked": fsc}, ps.box, ps.apix),
    }
    write_json_atomic(args.out / "fsc.json", report)
    plot_fsc_curves(args.out / "fsc.png", {"half1 vs half2 (unmasked)": fsc}, ps.box, ps.apix,
                    f"{args.particles.name}: {res143:.2f} A at FSC 0.143", res143)
    print(f"{counts[1]} + {counts[2]} particles, sym {args.sym}, ctf {args.ctf}: resolution {res143:.2f} A "
          f"(FSC 0.143), {res05:.2f} A (FSC 0.5); wrote {args.out} ({elapsed:.1f} s)")
    return 0

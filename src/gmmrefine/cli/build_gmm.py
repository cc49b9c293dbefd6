"""``gmmrefine build-gmm``: fit a Gaussian mixture model to a map.

N is --n, else the number of non-hydrogen atoms of --model, else estimated from the map so the
Gaussians sit about half the target resolution apart. Seeds come from --model (atoms randomised at the
resolution) or from k-means of the voxels above a threshold (inside --mask when given). The model must
be in the map's frame (map origin at voxel 0, as a model fitted in ChimeraX/Coot to an origin-0 map).
Prints the map-GMM FSC and writes its plot next to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError

COMMAND = "build-gmm"
HELP = "fit a Gaussian mixture model (GMM) to a map, from k-means seeds or an atomic model"
DESCRIPTION = ("Fits a Gaussian mixture model (GMM) to a map, so that its projections match the map's at the "
               "target resolution, and writes it as .npz (and pseudo-atoms with --pdb). "
               + __doc__.split("\n\n", 1)[1].replace("\n", " ").strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--map", required=True, type=Path, help="input map (MRC, cubic)")
    parser.add_argument("--resolution", required=True, type=float, help="target resolution (A)")
    parser.add_argument("--n", type=int, default=None, help="number of Gaussians")
    parser.add_argument("--model", type=Path, default=None, help="PDB/mmCIF model to seed from (map frame)")
    parser.add_argument("--mask", type=Path, default=None, help="mask (MRC) restricting k-means seeding")
    parser.add_argument("--init", type=Path, default=None, help="warm start from a GMM (.npz)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="density threshold for k-means seeding (None: mean + 1.5 std)")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps of the fit")
    parser.add_argument("--apix", type=float, default=None, help="pixel size (A) (None: from the map header)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", required=True, type=Path, help="output GMM (.npz)")
    parser.add_argument("--pdb", type=Path, default=None, help="also write the GMM as pseudo-atoms (.pdb or .cif)")
    parser.add_argument("--plot", type=Path, default=None, help="FSC plot (None: <out>_fsc.png)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def main(args) -> int:
    from gmmrefine.fourier.fsc import shell_frequencies
    from gmmrefine.gmm.build import build_gmm
    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.io.atomic import atomic_path
    from gmmrefine.io.models import read_atoms
    from gmmrefine.io.mrc import read_map, require_cubic

    # Validate everything before anything is written.
    if args.out.suffix != ".npz":
        raise InputError(f"--out {args.out}: expected a .npz file name.", field="out")
    from gmmrefine.pipeline.job import check_output_folder

    check_output_folder(args.out.parent)
    if args.pdb is not None and args.pdb.suffix.lower() not in (".pdb", ".cif", ".mmcif"):
        raise InputError(f"--pdb {args.pdb}: expected a .pdb or .cif file name.", field="pdb")
    if not args.resolution > 0:
        raise InputError(f"--resolution: expected a positive number of angstrom, got {args.resolution}.")
    if args.n is not None and args.n < 1:
        raise InputError(f"--n: expected a positive number of Gaussians, got {args.n}.", field="n")
    device = resolve_device(args.device)
    volume, apix_header = read_map(args.map)
    require_cubic(volume, args.map)
    if not np.isfinite(volume).all():
        raise InputError(f"{args.map}: the map contains NaN or infinite values.", field="data")
    apix = args.apix if args.apix is not None else apix_header
    if not apix or apix <= 0:
        raise InputError(f"{args.map}: the header has no pixel size; pass --apix.", field="apix")
    mask = None
    if args.mask is not None:
        mask, _ = read_map(args.mask)
        if mask.shape != volume.shape:
            raise InputError(f"{args.mask}: mask shape {mask.shape} differs from the map's {volume.shape}.",
                             field="shape")
    atoms = read_atoms(args.model).heavy() if args.model is not None else None
    if atoms is not None and len(atoms) == 0:
        raise InputError(f"{args.model}: the model has no non-hydrogen atoms.", field="atoms")
    init = GaussianMixture.load(args.init) if args.init is not None else None

    try:
        gmm, info = build_gmm(torch.from_numpy(volume), apix, args.resolution, n=args.n, model_atoms=atoms,
                              mask=None if mask is None else torch.from_numpy(mask), init=init, seed=args.seed,
                              threshold=args.threshold, steps=args.steps, device=device)
    except InputError as err:
        raise InputError(f"{args.map}: {err}", path=str(args.map)) from None
    gmm.save(args.out)
    if args.pdb is not None:
        writer = gmm.to_pdb if args.pdb.suffix.lower() == ".pdb" else gmm.to_mmcif
        writer(args.pdb, box=volume.shape[0], apix=apix)
    fsc = np.asarray(info["fsc"])
    freqs = shell_frequencies(volume.shape[0], apix).numpy()
    plot = args.plot or args.out.with_name(args.out.stem + "_fsc.png")
    _plot_fsc(plot, freqs, fsc, args.resolution, atomic_path)
    print(f"GMM: {info['n']} Gaussians ({info['seeding']}), fit {info['fit_seconds']:.1f} s")
    print(f"map-GMM FSC >= 0.9 out to {info['resolution_fsc09_A']:.2f} A (target {args.resolution:.2f} A)")
    print("  shell  resolution(A)  FSC")
    for s in range(1, len(fsc)):
        print(f"  {s:5d}  {1 / freqs[s]:13.2f}  {fsc[s]:.3f}")
    print(f"wrote {args.out}" + (f", {args.pdb}" if args.pdb else "") + f", {plot}")
    return 0


def _plot_fsc(path: Path, freqs: np.ndarray, fsc: np.ndarray, resolution_A: float, atomic_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(freqs[1:], fsc[1:], label="map vs GMM")
    ax.axhline(0.9, color="grey", ls="--", lw=0.8, label="0.9")
    ax.axvline(1.0 / resolution_A, color="red", ls=":", lw=0.8, label=f"target {resolution_A:g} A")
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

"""``gmmrefine select``: a particle subset from a heterogeneity job's latent space, as a STAR file that
RELION and cryoSPARC read (every column and block of the job's ``particles.star`` kept)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from gmmrefine.errors import InputError

COMMAND = "select"
HELP = "a particle subset from a hetero job's latent space (a PC1 range or a k-means cluster), as STAR"
DESCRIPTION = (
    "Select particles of a `gmmrefine hetero` job by their latent coordinates and write them as a STAR "
    "file RELION and cryoSPARC read, with every column and block of the job's particles.star. "
    "--pc1-range LOW HIGH keeps the particles whose PC1 score lies in [LOW, HIGH] standard deviations of "
    "their own half's scores (the report's PC1 maps are drawn at -2 and +2). --cluster K of --clusters N "
    "keeps k-means cluster K (1 = lowest mean PC1, N = highest) of each half's particles in their decoded-motion "
    "coordinates (the gmmLatentPC columns, angstrom), clustered per half so the halves stay independent."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hetero", type=Path, required=True, help="a gmmrefine hetero job folder")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--pc1-range", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     help="PC1 score range, in standard deviations of the particle's own half")
    how.add_argument("--cluster", type=int, help="k-means cluster to keep, 1..--clusters, in order of mean PC1")
    from gmmrefine.hetero.outputs import CLUSTERS

    parser.add_argument("--clusters", type=int, default=CLUSTERS,
                        help="k-means clusters per half (with --cluster); the job's own clusters (its cluster maps) "
                             "when it is the number the job made, else k-means anew")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--out", type=Path, required=True, help="output STAR file")


def pc1_in_sd(pc1: np.ndarray, subset: np.ndarray) -> np.ndarray:
    """PC1 scores in standard deviations of each half's own scores."""
    out = np.full(pc1.shape, np.nan)
    for h in (1, 2):
        rows = subset == h
        if rows.any():
            scores = pc1[rows]
            out[rows] = (scores - scores.mean()) / max(float(scores.std()), 1e-30)
    return out


def main(args) -> int:
    from gmmrefine.hetero.outputs import CLUSTER_COLUMN, LATENT_COLUMN, PC1_COLUMN, PC_COLUMN, cluster_labels
    from gmmrefine.io.star import read_star, write_star

    star = args.hetero / "particles.star"
    if not star.is_file():
        raise InputError(f"{args.hetero}: --hetero must be a gmmrefine hetero job folder; it has no particles.star.",
                         path=str(args.hetero), field="--hetero")
    if args.out.exists():
        raise InputError(f"{args.out}: --out exists; choose another file.", path=str(args.out), field="--out")
    if not args.out.parent.is_dir():
        raise InputError(f"{args.out.parent}: the folder of --out does not exist.", path=str(args.out), field="--out")
    tables = read_star(star)
    block = "particles" if "particles" in tables else next(iter(tables))
    df = tables[block]
    prefix = LATENT_COLUMN.format(k="")
    latent_columns = sorted((c for c in df.columns if c.startswith(prefix) and c[len(prefix):].isdigit()),
                            key=lambda c: int(c[len(prefix):]))
    for column in (PC1_COLUMN, "rlnRandomSubset", *latent_columns[:1]):
        if column not in df.columns:
            raise InputError(f"{star}: data_{block} has no column {column}; is it a gmmrefine hetero job's output?",
                             path=str(star), field=column)
    pc1 = df[PC1_COLUMN].to_numpy(dtype=np.float64)
    subset = df["rlnRandomSubset"].to_numpy(dtype=np.int64)
    if args.pc1_range is not None:
        low, high = args.pc1_range
        if not (low <= high) or math.isnan(low) or math.isnan(high):
            raise InputError(f"--pc1-range: expected LOW <= HIGH, got {low:g} {high:g}.", field="--pc1-range")
        sd = pc1_in_sd(pc1, subset)
        keep = (sd >= low) & (sd <= high)
        what = f"PC1 in [{low:g}, {high:g}] sd of its half"
    else:
        if args.clusters < 2 or not (1 <= args.cluster <= args.clusters):
            raise InputError(f"--cluster/--clusters: expected 1 <= cluster <= clusters and clusters >= 2, got "
                             f"{args.cluster} of {args.clusters}.", field="--cluster")
        # the job's motion coordinates: PC1, then PC2.. where written (jobs before them: PC1 alone)
        k_pc = 2
        while PC_COLUMN.format(k=k_pc) in df.columns:
            k_pc += 1
        motion = df[[PC1_COLUMN, *(PC_COLUMN.format(k=c) for c in range(2, k_pc))]].to_numpy(dtype=np.float64)
        own = df[CLUSTER_COLUMN].to_numpy(dtype=np.int64) if CLUSTER_COLUMN in df.columns else None
        if own is not None and int(own.max()) == args.clusters and args.seed == 0:
            labels = own  # the clusters whose maps the job wrote
        else:
            labels = cluster_labels(motion, subset, args.clusters, args.seed)
        keep = labels == args.cluster
        what = f"k-means cluster {args.cluster} of {args.clusters} per half"
    if not keep.any():
        raise InputError(f"{star}: no particle has {what}; nothing written.", path=str(star), field="selection")
    tables[block] = df[keep].reset_index(drop=True)
    write_star(args.out, tables)
    counts = {h: int((subset[keep] == h).sum()) for h in (1, 2)}
    print(f"{int(keep.sum())} of {len(df)} particles ({what}; half 1: {counts[1]}, half 2: {counts[2]}) -> {args.out}")
    return 0

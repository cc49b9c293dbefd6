"""``gmmrefine export``: a particle set (a job's ``particles.star``, any RELION STAR or cryoSPARC ``.cs``) as
a cryoSPARC ``.cs`` file or a RELION 3.1 STAR file, poses, CTF and half sets converted."""

from __future__ import annotations

import argparse
from pathlib import Path

from gmmrefine.errors import InputError

COMMAND = "export"
HELP = "write a particle set as a cryoSPARC .cs (cryosparc-tools) or a RELION 3.1 STAR file"
DESCRIPTION = (
    "Convert a particle set, e.g. a gmmrefine job's final/particles.star, to the format of --out: a "
    "cryoSPARC .cs file (written with cryosparc-tools; cryoSPARC's Import Particle Stack reads it with the "
    "folder of the stacks) or a RELION 3.1 STAR file. Poses follow each program's convention (cryoSPARC: "
    "rotation vectors and shifts in pixels; RELION: Euler angles and origins in angstrom); half sets go to "
    "alignments3D/split or rlnRandomSubset. Image paths are written absolute."
)
FORMATS = {".cs": "cs", ".star": "star"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--particles", type=Path, required=True, help="RELION STAR or cryoSPARC .cs file")
    parser.add_argument("--out", type=Path, required=True, help="output file: NAME.cs or NAME.star")
    parser.add_argument("--project-dir", type=Path, default=None,
                        help="cryoSPARC project folder that a .cs input's blob/path is relative to")


def main(args) -> int:
    from gmmrefine.io.cryosparc import write_cs
    from gmmrefine.io.particles import read_particles, write_particles_star

    fmt = FORMATS.get(args.out.suffix.lower())
    if fmt is None:
        raise InputError(f"{args.out}: --out must end in .cs (cryoSPARC) or .star (RELION).", path=str(args.out),
                         field="--out")
    if args.out.exists():
        raise InputError(f"{args.out}: --out exists; choose another file.", path=str(args.out), field="--out")
    if not args.out.parent.is_dir():
        raise InputError(f"{args.out.parent}: the folder of --out does not exist.", path=str(args.out), field="--out")
    ps = read_particles(args.particles, project_dir=args.project_dir)
    if fmt == "cs":
        write_cs(ps, args.out)
    else:
        write_particles_star(ps, args.out, ps.angles_deg, ps.shift_A, absolute_image_paths=True)
    print(f"wrote {len(ps)} particles to {args.out}")
    return 0

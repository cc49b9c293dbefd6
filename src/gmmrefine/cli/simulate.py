"""``gmmrefine simulate``: a synthetic particle data set with known poses, CTF, noise and motion."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError
from gmmrefine.simulate.density import DEFAULT_BFACTOR_A2, center_of_mass, heavy_atom_groups, max_radius_A
from gmmrefine.simulate.motion import domain_pivot, hinge, hinge_rotations, random_unit_vectors, superpose
from gmmrefine.simulate.particles import AtomicSource, MapSource, draw_truth, parse_range, write_dataset

COMMAND = "simulate"
HELP = "simulate particles (known poses, CTF, noise, optional motion) from an atomic model or a map"
DESCRIPTION = (
    "Simulate a particle data set from an atomic model (PDB/mmCIF) or a map: uniform random poses, "
    "random origins, RELION CTF, white noise at a given SNR (signal variance over the box of the "
    "CTF-modulated noise-free images / noise variance), a random even/odd split. Writes particles.mrcs, "
    "particles.star (true poses), truth.star (plus per-particle truth columns), truth_map.mrc and, with "
    "--perturb-deg/--perturb-A, particles_perturbed.star (poses moved by exactly that angle about a random "
    "axis and exactly that distance in a random direction). --model2 morphs linearly between two models; "
    "--hinge-residues turns a domain by a random angle per particle (and writes domain_mask.mrc, a soft mask on "
    "it); --sym builds a point-group assembly of the model in which every copy's domain turns independently."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="atomic model (PDB or mmCIF); hydrogens are ignored")
    src.add_argument("--map", type=Path, help="density map (MRC) to project instead of a model")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, default=2000, help="number of particles")
    parser.add_argument("--box", type=int, default=None, help="box size in pixels (required with --model; None: the map's)")
    parser.add_argument("--apix", type=float, default=None,
                        help="pixel size in A (None: the map's, or 1.2 with --model)")
    parser.add_argument("--snr", type=float, default=0.05,
                        help="signal variance / noise variance ('inf' for no noise)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--defocus", default="1.0-2.5", help="defocus range in micrometres, LOW-HIGH")
    parser.add_argument("--origin-sigma-px", type=float, default=2.0,
                        help="standard deviation of the random origins, pixels per axis")
    parser.add_argument("--bfactor", type=float, default=DEFAULT_BFACTOR_A2,
                        help="overall B-factor of the model density, A^2")
    parser.add_argument("--model2", type=Path, default=None,
                        help="second conformation (same atoms): each particle is a random linear morph")
    parser.add_argument("--hinge-residues", default=None,
                        help="residue range FIRST-LAST of a domain that turns by a random angle per particle")
    parser.add_argument("--hinge-deg", type=float, default=8.0, help="largest hinge angle, degrees")
    parser.add_argument("--hinge-axis", default=None,
                        help="hinge axis x,y,z in the model frame (None: random, from the seed)")
    parser.add_argument("--sym", default="C1",
                        help="point group (RELION's C<n>, D<n>, T, O, I): the model is one asymmetric unit of an "
                             "assembly; each copy's hinged domain moves by its own angle (truth columns "
                             "gmmDomainRot1..K etc.)")
    parser.add_argument("--sym-offset-A", type=float, default=None,
                        help="with --sym: distance of the model's centre of mass from the symmetry centre along x, A "
                             "(default: the model's largest radius)")
    parser.add_argument("--perturb-deg", type=float, default=0.0,
                        help="write particles_perturbed.star with every rotation moved by this angle")
    parser.add_argument("--perturb-A", type=float, default=0.0,
                        help="... and every origin moved by this distance in A")
    parser.add_argument("--chunk", type=int, default=1000, help="particles rendered per chunk")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def _check(condition: object, message: str, field: str) -> None:
    if not condition:
        raise InputError(message, field=field)


def _validate_numbers(args) -> None:
    _check(args.n >= 2, f"--n: expected at least 2 particles (one per half set), got {args.n}.", "n")
    _check(args.box is None or (args.box >= 16 and args.box % 2 == 0),
           f"--box: expected an even box of at least 16 pixels, got {args.box}.", "box")
    _check(args.apix is None or (math.isfinite(args.apix) and args.apix > 0),
           f"--apix: expected a positive pixel size in A, got {args.apix}.", "apix")
    _check(args.snr > 0 and not math.isnan(args.snr), f"--snr: expected a positive number or inf, got {args.snr}.",
           "snr")
    _check(args.chunk >= 1, f"--chunk: expected at least 1, got {args.chunk}.", "chunk")
    for name in ("origin_sigma_px", "bfactor", "hinge_deg", "perturb_deg", "perturb_A"):
        value = getattr(args, name)
        _check(math.isfinite(value) and value >= 0,
               f"--{name.replace('_', '-')}: expected a non-negative number, got {value}.", name)
    _check(args.hinge_deg < 180, f"--hinge-deg: expected less than 180 degrees, got {args.hinge_deg}.", "hinge_deg")
    _check(args.perturb_deg < 180, f"--perturb-deg: expected less than 180 degrees, got {args.perturb_deg}.",
           "perturb_deg")
    if args.map is not None:
        _check(args.model2 is None and args.hinge_residues is None and str(args.sym).upper() == "C1",
               "--model2, --hinge-residues and --sym need atoms: give --model instead of --map.", "map")
    _check(args.sym_offset_A is None or (math.isfinite(args.sym_offset_A) and args.sym_offset_A >= 0),
           f"--sym-offset-A: expected a non-negative distance in A, got {args.sym_offset_A}.", "sym_offset_A")


def _residue_mask(atoms, path: Path, text: str) -> np.ndarray:
    first, last = parse_range(text, "--hinge-residues", integer=True)
    residues = np.asarray(atoms.residue_numbers)
    mask = (residues >= first) & (residues <= last) & ~np.asarray(atoms.is_hydrogen, dtype=bool)
    _check(mask.any(), f"{path}: no atoms in residues {text} (--hinge-residues); the model has residues "
                       f"{int(residues.min())} to {int(residues.max())}.", "hinge_residues")
    heavy = ~np.asarray(atoms.is_hydrogen, dtype=bool)
    _check(mask.sum() < heavy.sum(), f"{path}: residues {text} (--hinge-residues) cover the whole model; "
                                     "expected a domain that moves against the rest.", "hinge_residues")
    return mask


def _parse_axis(text: str) -> np.ndarray:
    try:
        axis = np.array([float(v) for v in text.split(",")], dtype=np.float64)
    except ValueError:
        axis = np.zeros(0)
    _check(axis.shape == (3,) and np.isfinite(axis).all() and np.linalg.norm(axis) > 0,
           f"--hinge-axis: expected three numbers x,y,z not all zero, got {text!r}.", "hinge_axis")
    return axis / np.linalg.norm(axis)


def build_source(args) -> tuple[AtomicSource | MapSource, int, float]:
    """Validate every argument and load the inputs; nothing is written. Returns ``(source, box, apix)``."""
    _validate_numbers(args)
    low, high = parse_range(args.defocus, "--defocus")
    _check(low > 0, f"--defocus: expected positive defocus in micrometres, got {args.defocus!r}.", "defocus")
    if args.map is not None:
        from gmmrefine.io.mrc import read_map, require_cubic

        volume, map_apix = read_map(args.map)
        require_cubic(volume, args.map)
        box = args.box or volume.shape[0]
        apix = args.apix or map_apix
        _check(box == volume.shape[0], f"{args.map}: the map has box {volume.shape[0]} but --box is {box}; "
                                       "resample the map or leave --box out.", "box")
        _check(apix > 0, f"{args.map}: the header has no pixel size; give --apix.", "apix")
        if args.apix and map_apix > 0:
            _check(abs(map_apix - args.apix) <= 0.01 * args.apix,
                   f"{args.map}: the map's pixel size is {map_apix:.4f} A but --apix is {args.apix}; "
                   "resample the map or leave --apix out.", "apix")
        _check(np.isfinite(volume).all(), f"{args.map}: the map contains NaN or infinite values.", "data")
        return MapSource(volume=np.asarray(volume, dtype=np.float32)), box, apix

    from gmmrefine.io.models import read_atoms

    _check(args.box is not None, "--box: required with --model (the image size in pixels).", "box")
    box, apix = args.box, args.apix or 1.2
    atoms = read_atoms(args.model)
    heavy = ~np.asarray(atoms.is_hydrogen, dtype=bool)
    _check(heavy.any(), f"{args.model}: the model has no non-hydrogen atoms.", "atoms")
    coords = np.asarray(atoms.coords_A, dtype=np.float64)[heavy]
    elements = [e for e, h in zip(atoms.elements, heavy) if h]
    try:
        heavy_atom_groups(elements, len(elements))
    except InputError as err:
        raise InputError(f"{args.model}: {err}", path=str(args.model), field="element") from None
    center = center_of_mass(coords, elements)
    from gmmrefine.geometry.symmetry import symmetry_operators

    group = symmetry_operators(str(args.sym)).numpy()
    operators = None if len(group) == 1 else group
    if operators is not None:
        # The model is one asymmetric unit: its centre of mass sits at +offset along x from the
        # symmetry centre, which goes to the box centre.
        offset = args.sym_offset_A if args.sym_offset_A is not None else max_radius_A(coords, center, elements)
        center = center - np.array([offset, 0.0, 0.0])
    end = None
    radius = max_radius_A(coords, center, elements)
    if args.model2 is not None:
        atoms2 = read_atoms(args.model2)
        same = len(atoms2.coords_A) == len(atoms.coords_A) and list(atoms2.elements) == list(atoms.elements)
        _check(same, f"{args.model2}: --model2 must have the same atoms in the same order as {args.model} "
                     f"({len(atoms.coords_A)} atoms); it has {len(atoms2.coords_A)}.", "model2")
        end = superpose(np.asarray(atoms2.coords_A, dtype=np.float64)[heavy], coords)
        radius = max(radius, max_radius_A(end, center, elements))
    mask = pivot = axis = None
    if args.hinge_residues is not None:
        mask = _residue_mask(atoms, args.model, args.hinge_residues)[heavy]
        pivot = domain_pivot(coords, mask)
        if args.hinge_axis is not None:
            axis = _parse_axis(args.hinge_axis)
        else:
            gen = torch.Generator().manual_seed(int(np.random.default_rng([args.seed, 4]).integers(2**62)))
            axis = random_unit_vectors(1, gen)[0].numpy()
        # The domain swings out: measure the model's radius across the range of hinge angles.
        swung = hinge(coords, mask, pivot, hinge_rotations(axis, torch.linspace(-args.hinge_deg, args.hinge_deg, 9)))
        radius = max(radius, float(np.linalg.norm(swung.numpy()[:, mask] - center, axis=-1).max()))
    size_A = box * apix
    _check(2 * radius <= size_A,
           f"{args.model}: the model needs a box of at least {2 * radius:.1f} A (largest radius {radius:.1f} A "
           f"from its centre of mass) but --box {box} x --apix {apix} gives {size_A:.1f} A; "
           f"use --box {int(math.ceil(2 * radius / apix / 2)) * 2} or more.", "box")
    margin_A = 3 * args.origin_sigma_px * apix
    if 2 * (radius + margin_A) > size_A:
        print(f"gmmrefine simulate: warning: the model (radius {radius:.1f} A) plus 3 sigma of the random origins "
              f"({margin_A:.1f} A) is wider than the {size_A:.1f} A box; some images will wrap around its edges.",
              file=sys.stderr)
    source = AtomicSource(coords_A=coords, elements=elements, center_A=center, bfactor_A2=args.bfactor, end_A=end,
                          domain_mask=mask, pivot_A=pivot, hinge_axis=axis, hinge_deg=args.hinge_deg,
                          operators=operators)
    return source, box, apix


def main(args) -> int:
    from gmmrefine.pipeline.job import check_output_folder

    box_hint = args.box or 0
    # the stack (n box^2 floats) and the truth map (box^3), checked before anything is simulated
    check_output_folder(args.out, 4 * args.n * box_hint**2 + 4 * box_hint**3)
    device = resolve_device(args.device)
    source, box, apix = build_source(args)
    low, high = parse_range(args.defocus, "--defocus")
    truth = draw_truth(args.n, source, apix=apix, seed=args.seed, defocus_um=(low, high),
                       origin_sigma_px=args.origin_sigma_px)
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                if not key.startswith("_") and key != "command"}
    if isinstance(source, AtomicSource):
        # The frame of the truth columns: model coordinates minus model_center_A sit at the box centre.
        settings["model_center_A"] = source.center_A.tolist()
        if source.domain_mask is not None and source.pivot_A is not None and source.hinge_axis is not None:
            settings["hinge_pivot_A"] = source.pivot_A.tolist()
            settings["hinge_axis_unit"] = source.hinge_axis.tolist()
            settings["hinge_atoms"] = int(source.domain_mask.sum())
    start = time.perf_counter()
    result = write_dataset(args.out, source, truth, box=box, apix=apix, snr=args.snr, seed=args.seed,
                           chunk=args.chunk, perturb_deg=args.perturb_deg, perturb_A=args.perturb_A, device=device,
                           settings=settings)
    print(f"Simulated {args.n} particles (box {box}, {apix:g} A/px, SNR {args.snr:g}, noise sigma "
          f"{result.noise_sigma:.4g}) in {time.perf_counter() - start:.1f} s.")
    for role, path in result.paths.items():
        print(f"  {role:<10} {path}")
    return 0

"""``gmmrefine demo``: simulate a small adenylate kinase data set and refine it, no input needed.

The data: the bundled open adenylate kinase model (``gmmrefine/data/adk_open.pdb``), 1,000 particles,
box 64 at 1.8 A/px, SNR 0.2, with the poses of ``data/particles_perturbed.star`` off the truth by
exactly 4 degrees and 1 A (the "consensus" a refinement starts from). The demo runs
``gmmrefine refine`` on it (its defaults: iterations until converged) in ``OUT/job`` and prints, before
and after, the pose error against the true poses, the gold-standard resolution and the resolution of
the FSC against the true map, then where the report is.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError
from gmmrefine.io.atomic import write_json_atomic

COMMAND = "demo"
HELP = "simulate a small adenylate kinase data set and refine it (no input needed)"
DESCRIPTION = ("Simulates a small adenylate kinase data set and refines it, with no input needed: a first run "
               "that shows what gmmrefine does and how long it takes here. "
               + __doc__.split("\n\n", 1)[1].replace("\n", " ").replace("``", "").strip())

DEMO_MODEL = Path(__file__).parents[1] / "data" / "adk_open.pdb"
DEMO_SETTINGS: dict[str, Any] = dict(n=1000, box=64, apix=1.8, snr=0.2, perturb_deg=4.0, perturb_A=1.0, seed=0)
DEMO_ITERATIONS = "auto"
DEFAULT_OUT = Path("gmmrefine_demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: ./{DEFAULT_OUT}, or the first free ./{DEFAULT_OUT}_N)")
    parser.add_argument("--iterations", default=DEMO_ITERATIONS,
                        help="refinement iterations, or auto: until converged (default: auto)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def simulate_demo_data(out_dir: Path, device: torch.device, n: int | None = None) -> Path:
    """Write the demo data set into ``out_dir`` (see the module docstring); returns the perturbed STAR file."""
    from gmmrefine.io.models import read_atoms
    from gmmrefine.simulate.density import center_of_mass
    from gmmrefine.simulate.particles import AtomicSource, draw_truth, write_dataset

    s = dict(DEMO_SETTINGS, n=n or DEMO_SETTINGS["n"])
    atoms = read_atoms(DEMO_MODEL)
    heavy = ~np.asarray(atoms.is_hydrogen, dtype=bool)
    elements = [e for e, h in zip(atoms.elements, heavy) if h]
    coords = np.asarray(atoms.coords_A, dtype=np.float64)[heavy]
    source = AtomicSource(coords_A=coords, elements=elements, center_A=center_of_mass(coords, elements))
    truth = draw_truth(s["n"], source, apix=s["apix"], seed=s["seed"])
    result = write_dataset(out_dir, source, truth, box=s["box"], apix=s["apix"], snr=s["snr"], seed=s["seed"],
                           perturb_deg=s["perturb_deg"], perturb_A=s["perturb_A"], device=device,
                           settings={"model": str(DEMO_MODEL), **s})
    return result.paths["perturbed"]


def _free_default_out() -> Path:
    if not DEFAULT_OUT.exists():
        return DEFAULT_OUT
    k = 2
    while Path(f"{DEFAULT_OUT}_{k}").exists():
        k += 1
    return Path(f"{DEFAULT_OUT}_{k}")


def scores(half1: np.ndarray, half2: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray, truth_ps,
           truth_map: np.ndarray, apix: float) -> dict:
    """Pose error against the truth, gold-standard resolution and resolution against the true map."""
    from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at
    from gmmrefine.pipeline.evaluate import pose_errors, resolution_to_truth

    ang, sh = pose_errors(angles_deg, shift_A, truth_ps.angles_deg, truth_ps.shift_A)
    gold = fourier_shell_correlation(torch.as_tensor(half1), torch.as_tensor(half2))
    map_apix = apix * truth_map.shape[-1] / half1.shape[-1]  # the start's maps may be on a cropped grid
    return {"angular_error_deg": ang, "shift_error_A": sh,
            "resolution_gold_standard_A": resolution_at(gold, half1.shape[-1], map_apix, 0.143),
            "resolution_vs_truth_fsc_0.5_A": resolution_to_truth(half1, half2, truth_map, apix, 0.5)}


def main(args) -> int:
    from gmmrefine.cli import refine as refine_cmd
    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles
    from gmmrefine.refine.global_refine import it_dir

    iterations = str(args.iterations).strip().lower()
    if iterations != "auto" and not (iterations.isdigit() and int(iterations) >= 1):
        raise InputError(f"--iterations: expected auto or an integer >= 1, got {args.iterations}.",
                         field="--iterations")
    out = Path(args.out) if args.out is not None else _free_default_out()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: the demo folder already exists and is not empty; choose another --out.",
                         path=str(out), field="--out")
    from gmmrefine.pipeline.job import check_output_folder

    # the simulated stack (1,000 images of 64^2 floats), maps and job files: ~60 MB
    check_output_folder(out, 60 * 2**20)
    device = resolve_device(args.device)
    start = time.perf_counter()
    print(f"gmmrefine demo: writing into {out.resolve()}", flush=True)
    s = DEMO_SETTINGS
    print(f"Simulating {s['n']} adenylate kinase particles (box {s['box']}, {s['apix']} A/px, SNR {s['snr']}), "
          f"poses perturbed by {s['perturb_deg']} deg and {s['perturb_A']} A ...", flush=True)
    star = simulate_demo_data(out / "data", device)
    job_dir = out / "job"
    print(f"Refining: gmmrefine refine --particles {star} --out {job_dir} --iterations {iterations} "
          f"--device {device}", flush=True)
    params = refine_cmd.params_for(star, job_dir, "--iterations", iterations, "--device", str(device))
    summary = refine_cmd.run(params, command_line=["gmmrefine", "demo", "--out", str(out)])

    truth_ps = read_particles(star.with_name("particles.star"))
    truth_map = read_map(star.with_name("truth_map.mrc"))[0]
    apix = truth_ps.apix
    rows = {}
    for label, d in (("before", job_dir / it_dir(0)), ("after", job_dir / "final")):
        poses = read_particles(star if label == "before" else d / "particles.star", check_images=False)
        rows[label] = scores(read_map(d / "half1.mrc")[0], read_map(d / "half2.mrc")[0], poses.angles_deg,
                             poses.shift_A, truth_ps, truth_map, apix)
    elapsed = time.perf_counter() - start
    report = job_dir / "final" / "report.html"
    write_json_atomic(out / "demo.json", {"settings": s, "iterations": summary["iterations"], "seconds": elapsed,
                                          "report": str(report), **rows})
    b, a = rows["before"], rows["after"]
    print(f"\n{'':35s}before    after ({summary['iterations']} iterations)")
    print(f"  mean angular error vs truth     {b['angular_error_deg']:6.2f}   {a['angular_error_deg']:6.2f}  deg")
    print(f"  mean shift error vs truth       {b['shift_error_A']:6.2f}   {a['shift_error_A']:6.2f}  A")
    print(f"  gold-standard resolution        {b['resolution_gold_standard_A']:6.2f}   "
          f"{a['resolution_gold_standard_A']:6.2f}  A (FSC 0.143, half 1 vs half 2)")
    print(f"  resolution against true map     {b['resolution_vs_truth_fsc_0.5_A']:6.2f}   "
          f"{a['resolution_vs_truth_fsc_0.5_A']:6.2f}  A (FSC 0.5)")
    print(f"\nDone in {elapsed:.0f} s. Report: {report}")
    print(f"Refined poses for RELION/cryoSPARC: {job_dir / 'final' / 'particles.star'}; "
          f"numbers above: {out / 'demo.json'}")
    return 0

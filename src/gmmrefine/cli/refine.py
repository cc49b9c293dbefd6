"""``gmmrefine refine``: gold-standard GMM pose refinement of an existing consensus refinement: global, focused
(``--focus-mask``), patch by patch (``--patches``), with symmetry (``--sym``)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError
from gmmrefine.refine.poses import DEFAULT_PRIOR_A, DEFAULT_PRIOR_DEG, OBJECTIVES, OPTIMISERS

COMMAND = "refine"
HELP = "refine every particle's pose against GMMs of its own half set (gold standard, resumable)"
DESCRIPTION = (
    "Refines every particle's pose against GMMs of its own half set, from a RELION or cryoSPARC consensus "
    "refinement, and writes better poses and maps. Per iteration and for each half set on its own: build "
    "(first iteration) or warm-start the half's GMM from its map low-passed to the half's own resolution; "
    "refine each particle's rotation and shift (Newton steps on its SNR-weighted ring correlations with the "
    "CTF-modulated GMM projection, which also give each pose's precision); reconstruct at the new poses; then "
    "the gold-standard FSC between the halves. Iterations work on Fourier grids cropped to their band and "
    "stop by themselves (--iterations auto) when the poses move less than their precision and the "
    "resolution stops improving. Writes a job folder (job.json, log.txt, itNNN/, final/ with particles.star, "
    "full-size half maps, the filtered map, plots and report.html). A killed job resumes with --continue. "
    "--focus-mask M.mrc aligns to GMMs whose Gaussians outside the mask are widened (focused refinement); "
    "--patches K adds patch-by-patch refinement after the global one (k-means patches of each half's GMM, "
    "--patch-iterations focused iterations per patch, a composite map per half in final/, per-patch poses in "
    "patches/pNN/particles.star); --bodies M1.mrc M2.mrc ... refines each body in its own mask after the "
    "global refinement (multi-body: per-body poses in patches/bNN/particles.star, a composite, per-body and "
    "local resolution, body motions and their principal components); --sym imposes a point group on the "
    "global refinement and symmetry-expands the particles for focused and patch work (symmetry re-imposed on "
    "the composite); --from-job starts from a finished job's poses and GMMs."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--particles", type=Path, default=None,
                        help="RELION STAR (3.0-5) or cryoSPARC .cs of a consensus refinement (or give --from-job)")
    parser.add_argument("--out", type=Path, required=True, help="job folder (must not exist unless --continue)")
    parser.add_argument("--iterations", default=None,
                        help="global refinement iterations, or auto: until the poses move less than their precision "
                             "and the resolution stops improving, at most --max-iterations (default: auto; 0 with "
                             "--from-job and --patches/--add-patch)")
    parser.add_argument("--max-iterations", type=int, default=10, help="most iterations of --iterations auto")
    parser.add_argument("--resolution-start", default="auto",
                        help="band limit of the first iteration in A, or 'auto' (each half's own estimate)")
    parser.add_argument("--minres", type=float, default=50.0, help="low-resolution end of the FRC band, A")
    parser.add_argument("--batch", default="auto",
                        help="particles optimised together (memory/speed only; results do not depend on it): a number, "
                             "or auto: the paper's 16 on the CPU, as many as half the free GPU memory holds on CUDA")
    parser.add_argument("--chunk", type=int, default=20000,
                        help="particles read into memory at a time (at most 64 MB of images whatever the number)")
    parser.add_argument("--optimiser", choices=OPTIMISERS, default="newton",
                        help="newton: Fisher-scoring steps on the SNR-weighted objective with a prior on each "
                             "iteration's move, taken only if they improve it; paper: Adam, --steps steps of --lr")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None,
                        help="snr: ring correlations weighted by their signal-to-noise (the pose's log-likelihood); "
                             "frc: the paper's mean FRC (default: snr with --optimiser newton, frc with paper)")
    parser.add_argument("--steps", type=int, default=None,
                        help="most steps per particle and iteration (default: 8 newton steps, 10 Adam steps)")
    parser.add_argument("--prior-deg", type=float, default=DEFAULT_PRIOR_DEG,
                        help="newton: prior standard deviation of one iteration's rotation, degrees per axis")
    parser.add_argument("--prior-A", type=float, default=DEFAULT_PRIOR_A,
                        help="newton: prior standard deviation of one iteration's shift, angstrom per axis")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="paper: Adam learning rate (a rotation unit is 2 radians, a shift unit the box)")
    parser.add_argument("--ctf", choices=("flip", "full"), default="full",
                        help="full: multiply the GMM projections by each particle's CTF (the matched filter; "
                             "measured more accurate at low SNR); flip: compare with phase-flipped particles (paper)")
    parser.add_argument("--gmm-steps", type=int, default=150,
                        help="Adam steps of the first GMM fitted to each half map (every later fit, warm-started "
                             "from the previous iteration's GMM or seeded afresh when the band asks for more "
                             "Gaussians, takes a third of them)")
    parser.add_argument("--full-maps", action="store_true",
                        help="write every iteration's half maps at the particles' box (default: on the grid the "
                             "iteration works on, cropped to its band; final/ is always full size)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="random seed (GMM seeding)")
    parser.add_argument("--project-dir", type=Path, default=None, help="cryoSPARC project folder (.cs input)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume an interrupted job in --out (same parameters; --jobs and --device may change)")
    group = parser.add_argument_group("focused and patch-by-patch refinement, symmetry")
    group.add_argument("--from-job", type=Path, default=None,
                       help="start from a finished gmmrefine refine job: its final/particles.star (poses, half "
                            "split) and its last GMMs as warm start (instead of --particles)")
    group.add_argument("--focus-mask", type=Path, default=None,
                       help="mask (MRC, the particles' box and pixel size, values 0..1): focused refinement, "
                            "Gaussians outside it widened s' = s / (0.25 + 0.75 M) for the alignment")
    group.add_argument("--patches", type=int, nargs="?", const=8, default=None, metavar="K",
                       help="after the global refinement, patch-by-patch refinement with K patches per half "
                            "(8 when given without a number) and a composite map")
    group.add_argument("--add-patch", type=Path, default=None, metavar="HJOB",
                       help="with --from-job JOB: one more patch, the domain of 'gmmrefine hetero --job JOB --mask M' "
                            "(HJOB): focused refinement in M from its conformation-to-pose domain poses, then "
                            "JOB's composite (its patches, if it has any) with this patch inside M")
    group.add_argument("--bodies", type=Path, nargs="+", default=None, metavar="MASK",
                       help="after the global refinement, multi-body refinement: one body per mask (MRC, the "
                            "particles' box and pixel size, values 0..1), each refined in its mask for "
                            "--patch-iterations iterations per half; poses in patches/bNN/particles.star, a "
                            "composite map, per-body FSC, local resolution and body motions (C1)")
    group.add_argument("--body-context", choices=("subtract", "width"), default=None,
                       help="with --bodies, how the rest of the particle is handled while a body is aligned: "
                            "'subtract' (default) subtracts the rest's GMM projection (times each particle's CTF, where "
                            "--body-rest-poses says) from the images and aligns the body alone; 'width' widens the "
                            "Gaussians outside the body (the paper's focused refinement). On simulated adk with a "
                            "hinged LID (2,000 particles, box 128, SNR 0.05) subtraction gave the better LID map and "
                            "poses on two data sets")
    group.add_argument("--body-rest-poses", choices=("bodies", "consensus"), default=None,
                       help="with --body-context subtract, where the rest of the particle is when it is "
                            "subtracted: 'bodies' (default) takes every other body out at its own poses of the "
                            "previous iteration (all bodies in lock-step, as RELION's multi-body refinement); "
                            "'consensus' holds the rest at the consensus poses and refines each body on its own")
    group.add_argument("--patch-iterations", type=int, default=3,
                       help="focused iterations per patch or body (paper: 3)")
    group.add_argument("--sym", default="C1",
                       help="point group (C<n>, D<n>, T, O, I): symmetrised global reconstructions; focused and "
                            "patch work on symmetry-expanded particles, symmetry re-imposed on the composite")
    group.add_argument("--jobs", type=int, default=1,
                       help="patches refined at a time, in parallel processes (results identical to --jobs 1)")


def _auto_or_int(text: object, bad: int) -> str | int:
    """``"auto"``, the integer ``text`` spells, or ``bad`` when it spells neither."""
    word = str(text).strip().lower()
    if word == "auto":
        return word
    try:
        return int(word)
    except ValueError:
        return bad


def _params(args) -> dict:
    res: str | float = str(args.resolution_start).strip().lower()
    if res != "auto":
        try:
            value = float(res)
        except ValueError:
            raise InputError(f"--resolution-start: expected 'auto' or a resolution in A, got {args.resolution_start!r}.",
                             field="--resolution-start") from None
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"--resolution-start: expected a positive resolution in A, got {value}.",
                             field="--resolution-start")
        res = value
    batch = _auto_or_int(args.batch, 0)
    if isinstance(batch, int) and batch < 1:
        raise InputError(f"--batch: expected 'auto' or an integer >= 1, got {args.batch!r}.", field="--batch")
    from gmmrefine.geometry.symmetry import symmetry_operators

    symmetry_operators(str(args.sym))  # InputError naming the group for a bad --sym
    if args.particles is not None and args.from_job is not None:
        raise InputError("--particles and --from-job exclude each other: --from-job takes the particles and "
                         "poses of the job's final/particles.star.", field="--from-job")
    if args.particles is None and args.from_job is None:
        raise InputError("give --particles (a STAR or .cs file) or --from-job (a finished gmmrefine refine job).",
                         field="--particles")
    if args.focus_mask is not None and args.patches is not None:
        raise InputError("--focus-mask and --patches exclude each other: patch-by-patch refinement makes its own "
                         "masks; run it with --from-job on the focused job if both are wanted.", field="--patches")
    if args.add_patch is not None and args.from_job is None:
        raise InputError("--add-patch needs --from-job: the hetero job's domain joins that job's composite.",
                         field="--add-patch")
    if args.add_patch is not None and (args.focus_mask is not None or str(args.sym).strip().upper() != "C1"):
        raise InputError("--add-patch works in C1 without --focus-mask (the added patch is itself a focused "
                         "refinement, in the hetero job's mask).", field="--add-patch")
    if args.bodies is not None and (args.patches is not None or args.focus_mask is not None
                                    or args.add_patch is not None):
        raise InputError("--bodies excludes --patches, --focus-mask and --add-patch: the bodies' masks are the "
                         "patches; run the others as separate jobs with --from-job.", field="--bodies")
    if args.bodies is not None and str(args.sym).strip().upper() != "C1":
        raise InputError("--bodies works in C1 for now; refine symmetric particles as a whole with --sym, or "
                         "symmetry-expand them first.", field="--bodies")
    if args.body_context is not None and args.bodies is None:
        raise InputError(f"--body-context {args.body_context} applies to --bodies only; give the body masks with "
                         "--bodies M1.mrc M2.mrc ...", field="--body-context")
    if args.body_rest_poses is not None and (args.bodies is None or args.body_context == "width"):
        raise InputError(f"--body-rest-poses {args.body_rest_poses} applies to --bodies with --body-context subtract "
                         "(the default) only: nothing is subtracted otherwise.", field="--body-rest-poses")
    patch_work = args.from_job is not None and (args.patches is not None or args.add_patch is not None
                                                or args.bodies is not None)
    iterations = _auto_or_int(args.iterations if args.iterations is not None else (0 if patch_work else "auto"), -1)
    min_iterations = 0 if patch_work else 1
    objective = args.objective or ("snr" if args.optimiser == "newton" else "frc")
    checks = [("--iterations", not isinstance(iterations, int) or iterations >= min_iterations,
               "auto or an integer >= 1 (0 only with --from-job and --patches, --bodies or --add-patch)"),
              ("--max-iterations", args.max_iterations >= 1, "an integer >= 1"),
              ("--objective", args.optimiser == "paper" or objective == "snr",
               "snr with --optimiser newton (its steps and precision come from the SNR weights)"),
              ("--prior-deg", math.isfinite(args.prior_deg) and args.prior_deg > 0, "a positive angle in degrees"),
              ("--prior-A", math.isfinite(args.prior_A) and args.prior_A > 0, "a positive distance in A"),
              ("--chunk", args.chunk >= 1, "an integer >= 1"),
              ("--steps", args.steps is None or args.steps >= 0, "an integer >= 0"),
              ("--gmm-steps", args.gmm_steps >= 1, "an integer >= 1"),
              ("--lr", math.isfinite(args.lr) and args.lr > 0, "a positive number"),
              ("--minres", math.isfinite(args.minres) and args.minres > 0, "a positive resolution in A"),
              ("--patches", args.patches is None or args.patches >= 1, "a number of patches K >= 1"),
              ("--patch-iterations", args.patch_iterations >= 1, "an integer >= 1"),
              ("--jobs", args.jobs >= 1, "an integer >= 1")]
    for name, ok, expected in checks:
        if not ok:
            raise InputError(f"{name}: expected {expected}, got {getattr(args, name[2:].replace('-', '_'))}.", field=name)
    from_job = None if args.from_job is None else Path(args.from_job).resolve()
    particles = (from_job / "final" / "particles.star") if from_job is not None else Path(args.particles).resolve()
    return {
        "particles": str(particles), "iterations": iterations, "max_iterations": int(args.max_iterations),
        "resolution_start": res, "minres": float(args.minres), "batch": batch, "chunk": int(args.chunk),
        "optimiser": args.optimiser, "objective": objective,
        "steps": None if args.steps is None else int(args.steps), "prior_deg": float(args.prior_deg),
        "prior_A": float(args.prior_A), "lr": float(args.lr), "full_maps": bool(args.full_maps), "ctf": args.ctf,
        "reconstruct_ctf": "wiener", "rotation_unit_rad": 2.0,
        "translation_unit_px": None, "gmm_steps": int(args.gmm_steps), "device": str(args.device), "seed": int(args.seed),
        "project_dir": None if args.project_dir is None else str(Path(args.project_dir).resolve()),
        "from_job": None if from_job is None else str(from_job),
        "focus_mask": None if args.focus_mask is None else str(Path(args.focus_mask).resolve()),
        "patches": None if args.patches is None else int(args.patches), "patch_iterations": int(args.patch_iterations),
        "sym": str(args.sym).strip().upper(), "jobs": int(args.jobs),
        "add_patch": None if args.add_patch is None else str(Path(args.add_patch).resolve()),
        "bodies": None if args.bodies is None else [str(Path(b).resolve()) for b in args.bodies],
        "body_context": None if args.bodies is None else str(args.body_context or "subtract"),
        "body_rest_poses": None if args.bodies is None else str(args.body_rest_poses or "bodies"),
    }


def finish(job, ps, histories: list[dict]) -> dict:
    """The ``final/`` folder: poses, half maps, the filtered average, plots and the report."""
    import shutil

    import torch

    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.io.atomic import atomic_path, write_json_atomic
    from gmmrefine.io.mrc import read_map, write_map
    from gmmrefine.io.particles import write_particles_star
    from gmmrefine.pipeline.report import write_report
    from gmmrefine.refine.global_refine import current_poses, current_precision, it_dir

    last = histories[-1]
    k = last["iteration"]
    final = job.dir("final")
    angles, shifts = current_poses(job, ps, k)
    write_particles_star(ps, final / "particles.star", angles, shifts, current_precision(job, ps, k),
                         absolute_image_paths=True)
    halves = []
    for h in (1, 2):
        src = job.path / it_dir(k) / f"half{h}.mrc"
        with atomic_path(final / f"half{h}.mrc") as tmp:
            shutil.copyfile(src, tmp)
        halves.append(torch.as_tensor(read_map(src)[0]))
    full = low_pass(0.5 * (halves[0] + halves[1]), last["resolution_A"], ps.apix)
    write_map(final / "map.mrc", full.numpy(), ps.apix)
    summary = {"resolution_start_A": histories[0]["resolution_A"], "resolution_final_A": last["resolution_A"],
               "iterations": k, "n_particles": len(ps),
               "per_iteration": [{key: h.get(key) for key in ("iteration", "resolution_A", "half_resolution_A",
                                                                "mean_change_deg", "std_change_deg",
                                                                "mean_change_px", "std_change_px", "seconds",
                                                                "median_precision_deg", "median_precision_A",
                                                                "convergence")}
                                 for h in histories]}
    calibration = job.path / it_dir(k) / "precision.json"
    if calibration.is_file():  # each half's reference error in the precision of final/particles.star
        summary["precision_reference_error"] = json.loads(calibration.read_text())
    summary["warnings"] = job_warnings(histories, ps.box, ps.apix)
    for warning in summary["warnings"][sum(len(h.get("warnings", [])) for h in histories):]:
        job.log(f"WARNING: {warning}")  # the iterations' own were logged as they came
    write_json_atomic(final / "summary.json", summary)
    report = write_report(job.path, extra_rows=_extra_rows(job, ps, histories))
    summary["report"] = str(report)
    return summary


def job_warnings(histories: list[dict], box: int, apix: float) -> list[str]:
    """Every iteration's health warnings, and one more when the refinement ends at a worse resolution
    than it started (by more than one Fourier shell)."""
    out = [w for h in histories for w in h.get("warnings", [])]
    start, end = histories[0]["resolution_A"], histories[-1]["resolution_A"]
    if end - start > start**2 / (box * apix):
        out.append(f"the refinement made the resolution worse: {start:.2f} A at the start, {end:.2f} A at the end")
    return out


def params_for(particles, out, *options: str) -> dict:
    """Job parameters as the command line ``--particles P --out OUT OPTIONS...`` gives them (for callers
    such as ``gmmrefine demo`` that run a refinement without a command line of their own)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--particles", str(particles), "--out", str(out), *options])
    return _params(args) | {"out": str(args.out)}


def _finished_job(path: Path) -> dict:
    """The parameters of a finished ``gmmrefine refine`` job (``--from-job``), or InputError."""
    state = path / "state.json"
    try:
        done = json.loads(state.read_text())["done"]
        params = json.loads((path / "job.json").read_text())["params"]
    except (OSError, KeyError, ValueError):
        raise InputError(f"{path}: --from-job needs a gmmrefine refine job folder (job.json, state.json); none "
                         "was found.", path=str(path), field="--from-job") from None
    if "final" not in done or not (path / "final" / "particles.star").is_file():
        raise InputError(f"{path}: --from-job needs a finished job; this one has not completed its final step "
                         "(resume it with --continue first).", path=str(path), field="--from-job")
    if params.get("focus_mask") and str(params.get("sym", "C1")).upper() != "C1":
        raise InputError(f"{path}: --from-job: this job's poses are symmetry-expanded (focused refinement with "
                         f"--sym {params['sym']}); start from its global refinement instead.", path=str(path),
                         field="--from-job")
    return params


def _extra_rows(job, ps, histories: list[dict]) -> dict[str, str]:
    rows = {"particles": str(len(ps)), "box / pixel size": f"{ps.box} px / {ps.apix:g} A",
            "resolution at start": f"{histories[0]['resolution_A']:.2f} A",
            "resolution after refinement": f"{histories[-1]['resolution_A']:.2f} A"}
    focus = job.path / "final" / "focus_fsc.json"
    if focus.is_file():
        f = json.loads(focus.read_text())
        rows["focus mask: masked resolution start -> final"] = (
            f"{f['start']['resolution_A']:.2f} A -> {f['final']['resolution_A']:.2f} A")
    composite = job.path / "final" / "composite_fsc.json"
    if composite.is_file():
        c = json.loads(composite.read_text())
        rows["composite resolution (final/composite_half1/2.mrc)"] = f"{c['resolution_A']:.2f} A"
        if "symmetry_error_of_map" in c:
            rows[f"composite map: {c['symmetry']} symmetry error, max |R_g V - V| / peak (raw / blurred 1.5 px; "
                 "symmetrised start map blurred)"] = (
                f"{c['symmetry_error_of_map']:.2e} / {c['symmetry_error_of_map_blur1.5px']:.2e}; "
                f"{c['symmetry_error_of_start_map_blur1.5px']:.2e}")
    return rows


def _focus_outputs(job, mask, symmetry: str, apix: float, k: int) -> None:
    """``final/focus_fsc.json`` (masked FSC in the focus mask, start and final); with a point group the
    re-symmetrised halves ``final/composite_half{h}.mrc`` and their FSC."""
    import torch

    from gmmrefine.geometry.symmetry import symmetry_operators
    from gmmrefine.io.atomic import write_json_atomic
    from gmmrefine.io.mrc import read_map, write_map
    from gmmrefine.refine.composite import composite_map
    from gmmrefine.refine.focused import masked_resolution
    from gmmrefine.refine.global_refine import it_dir
    from gmmrefine.refine.patches import composite_outputs

    final = job.path / "final"
    start_dir, last_dir = job.path / it_dir(0), job.path / it_dir(k)
    if not job.is_done("final/focus"):
        seed = job.seed_for("final/focus")
        maps = {name: [torch.as_tensor(read_map(d / f"half{h}.mrc")[0]) for h in (1, 2)]
                for name, d in (("start", start_dir), ("final", last_dir))}
        info = {name: masked_resolution(m[0], m[1], mask, apix, seed=seed) for name, m in maps.items()}
        write_json_atomic(final / "focus_fsc.json", info)
        job.mark_done("final/focus", resolution_A=info["final"]["resolution_A"])
        job.log(f"focus mask: masked resolution {info['start']['resolution_A']:.2f} -> "
                f"{info['final']['resolution_A']:.2f} A")
    if symmetry_operators(symmetry).shape[0] > 1 and not job.is_done("final/composite"):
        for h in (1, 2):
            focused = torch.as_tensor(read_map(last_dir / f"half{h}.mrc")[0])
            fallback = torch.as_tensor(read_map(start_dir / f"half{h}.mrc")[0])
            write_map(final / f"composite_half{h}.mrc",
                      composite_map([focused], [mask], fallback, symmetry=symmetry).numpy(), apix)
        info = composite_outputs(job, "composite", symmetry, apix, start_dir=start_dir)
        write_json_atomic(final / "composite_fsc.json", info)
        job.mark_done("final/composite", resolution_A=info["resolution_A"])
        job.log(f"{symmetry} re-imposed on the focused halves: resolution {info['resolution_A']:.2f} A")


def run(params: dict, *, resume: bool = False, command_line: list[str] | None = None,
        progress: bool = True) -> dict:
    """Run (or resume) a refinement job from its parameters (``_params``); returns ``final/summary.json``
    (plus ``composite``: ``final/composite_fsc.json`` when there is one).

    Used by :func:`main` and by ``gmmrefine demo``. Validates the input before creating anything.
    Under torchrun or srun (:mod:`gmmrefine.distributed`) every rank reads and checks the input; rank 0
    runs the job (GMMs, maps, every file) and the other ranks serve its passes over the particles,
    each on its own shard. SIGTERM stops the job at the next safe point with a checkpoint
    (:class:`gmmrefine.distributed.Interrupted`); ``--continue`` resumes it.
    """
    from gmmrefine import distributed
    from gmmrefine.geometry.symmetry import symmetry_operators
    from gmmrefine.io.particles import read_particles
    from gmmrefine.pipeline.job import check_output_folder, finished

    ctx = distributed.init(params["device"])
    resolve_device(ctx.device)
    out = Path(params["out"])
    done = finished(out) if resume else None
    if done is not None:
        # a finished job: say so and change nothing (not even its log)
        if ctx.is_main:
            print(f"{out}: this job finished on {done.get('at', '?')} (resolution {done.get('resolution_A', 0):.2f} A); "
                  f"nothing to do. Results: {out / 'final'}", flush=True)
        return json.loads((out / "final" / "summary.json").read_text()) | {"report": str(out / "final" / "report.html")}
    if ctx.is_main:
        check_output_folder(out)  # before reading any particle
    from_job = None if params.get("from_job") is None else Path(params["from_job"])
    gmm_dir = None
    if from_job is not None:
        _finished_job(from_job)
        from gmmrefine.refine.job_outputs import job_inputs

        gmm_dir = Path(job_inputs(from_job).gmms[1]).parent
    ps = read_particles(params["particles"], project_dir=params["project_dir"])
    if ctx.is_main:
        check_output_folder(out, output_bytes(ps.box, len(ps)))
    for h in (1, 2):
        if not (np.asarray(ps.subset) == h).any():
            raise InputError(f"{ps.path}: half set {h} has no particles; gold-standard refinement needs both "
                             "halves (rlnRandomSubset 1 and 2).", path=str(ps.path), field="rlnRandomSubset")
    if ps.box % 2:
        raise InputError(f"{ps.path}: the box is {ps.box} px; gmmrefine needs an even box.", path=str(ps.path),
                         field="rlnImageSize")
    symmetry = str(params.get("sym", "C1"))
    expanded = symmetry_operators(symmetry).shape[0] > 1
    mask = None
    if params.get("focus_mask"):
        from gmmrefine.refine.focused import load_focus_mask

        mask = load_focus_mask(params["focus_mask"], ps.box, ps.apix)
    patches = params.get("patches")
    if patches is not None and gmm_dir is not None:
        # Warm starts keep the number of Gaussians, so the job's GMMs bound K already.
        from gmmrefine.gmm.model import GaussianMixture
        from gmmrefine.refine.patches import check_patch_count

        check_patch_count(int(patches), {h: GaussianMixture.load(gmm_dir / f"gmm_half{h}.npz") for h in (1, 2)},
                          str(gmm_dir))
    if params.get("bodies"):
        from gmmrefine.refine.focused import load_focus_mask

        for body in params["bodies"]:
            load_focus_mask(body, ps.box, ps.apix, option="--bodies")  # refused before the folder exists
    added = None
    if params.get("add_patch"):
        from gmmrefine.refine.patches import hetero_domain

        added = hetero_domain(Path(params["add_patch"]), Path(params["particles"]), len(ps))
    if ctx.active and (patches is not None or params.get("bodies") or added is not None or (mask is not None and expanded)):
        raise InputError(f"--patches, --add-patch and --focus-mask with --sym {symmetry} run in one process for now; start "
                         "them without torchrun/srun (the global refinement before them can use many).",
                         field="--patches" if patches is not None else "--focus-mask")
    stage_ps = ps
    if mask is not None and expanded:
        from gmmrefine.refine.focused import expand_particles

        # Focused work on symmetric data: the copies are refined independently, in C1.
        stage_ps = expand_particles(ps, symmetry)
    if not ctx.is_main:
        return _serve(stage_ps, ctx)
    with distributed.leading(), distributed.stop_on_signal():
        return _lead(params, ps, stage_ps, ctx, mask=mask, gmm_dir=gmm_dir, added=added, resume=resume,
                     command_line=command_line, progress=progress)


def output_bytes(box: int, n_particles: int, iterations: int = 10) -> int:
    """What a job writes, about: full-size half maps and the filtered map (final/ and the last iteration),
    the start's and the working grids' maps, and a particles.star per iteration (~1 kB a particle)."""
    return 4 * box**3 * 8 + 1000 * n_particles * (iterations + 1)


def _lead(params: dict, ps, stage_ps, ctx, *, mask, gmm_dir: Path | None, added: tuple[Path, Path] | None,
          resume: bool,
          command_line: list[str] | None, progress: bool) -> dict:
    """The job itself, on rank 0 (or the only process). ``stage_ps``: the particles refined (``ps``, or
    its symmetry expansion for focused work on symmetric data). An error after the folder exists is
    written to its log as well; a job that failed before completing any step starts again from scratch
    with the same command (:class:`gmmrefine.pipeline.job.Job`), one that got further with ``--continue``."""
    from gmmrefine import distributed
    from gmmrefine.pipeline.job import Job

    job_params = {k: v for k, v in params.items() if k != "out"}
    job = Job(Path(params["out"]), job_params, resume=resume, command_line=command_line,
              resume_may_change=("device", "jobs"))
    try:
        return _job(job, params, ps, stage_ps, ctx, mask=mask, gmm_dir=gmm_dir, added=added, progress=progress)
    except distributed.Interrupted:
        raise
    except Exception as err:
        # the error goes to the job's log too, so that the folder tells what stopped it
        job.log(f"error: {err}" if isinstance(err, InputError) else f"error: {type(err).__name__}: {err}",
                echo=False)
        raise


def _job(job, params: dict, ps, stage_ps, ctx, *, mask, gmm_dir: Path | None, added: tuple[Path, Path] | None,
         progress: bool) -> dict:
    """The steps of a job (:func:`_lead`), in its folder."""
    import dataclasses

    from gmmrefine import distributed
    from gmmrefine.geometry.symmetry import symmetry_operators
    from gmmrefine.refine.global_refine import it_dir, run_global_refinement, settings_from_params

    symmetry = str(params.get("sym", "C1"))
    expanded = symmetry_operators(symmetry).shape[0] > 1
    patches = params.get("patches")
    job_params = {k: v for k, v in params.items() if k != "out"}
    if ctx.active:
        job.log(f"{ctx.world_size} processes ({ctx.backend}); rank 0 on {ctx.device}")
    settings = dataclasses.replace(settings_from_params(job_params), progress=progress, device=ctx.device,
                                   checkpoint_dir=str(job.path / "checkpoint"))
    start = time.perf_counter()
    transform = None
    if mask is not None:
        from gmmrefine.refine.focused import focus_transform

        transform = focus_transform({1: mask, 2: mask}, ps.apix)
        if expanded:
            settings = dataclasses.replace(settings, symmetry="C1")
    if gmm_dir is not None:
        from gmmrefine.refine.focused import seed_stage

        seed_stage(job, gmm_dir, maps=False)
    try:
        histories = run_global_refinement(job, stage_ps, settings, on_step=_stop_between_steps,
                                          gmm_transform=transform)
        if not job.is_done("final"):
            summary = finish(job, stage_ps, histories)
            job.mark_done("final", resolution_A=summary["resolution_final_A"])
    except distributed.Interrupted as err:
        job.log(f"{err}; resume with the same command and --continue", echo=False)
        raise
    k = histories[-1]["iteration"]
    if mask is not None:
        _focus_outputs(job, mask, symmetry, ps.apix, k)
    plan = None
    if patches is not None:
        from gmmrefine.refine.patches import setup_patches

        plan = setup_patches(job, job.path / it_dir(k), int(patches), ps.box, ps.apix, start_iteration=k,
                             patch_iterations=int(params["patch_iterations"]), symmetry=symmetry)
    if params.get("bodies"):
        from gmmrefine.refine.patches import setup_bodies

        plan = setup_bodies(job, job.path / it_dir(k), params["bodies"], ps.box, ps.apix, start_iteration=k,
                            patch_iterations=int(params["patch_iterations"]),
                            context=params.get("body_context") or "width",
                            rest_poses=params.get("body_rest_poses") or "consensus")
    if added is not None:
        from gmmrefine.refine.patches import add_domain_patch, inherit_patches

        if plan is None:
            plan = inherit_patches(job, Path(params["from_job"]), job.path / it_dir(k), k)
        plan = add_domain_patch(job, plan, Path(params["add_patch"]), *added, job.path / it_dir(k),
                                start_iteration=k, patch_iterations=int(params["patch_iterations"]), box=ps.box,
                                apix=ps.apix)
    if plan is not None:
        from gmmrefine.refine.patches import composite_step, run_patches

        run_patches(job, plan, jobs=int(params.get("jobs", 1)), progress=progress)
        composite_step(job, plan, ps.apix)
        if plan.get("bodies"):
            from gmmrefine.refine.global_refine import current_poses
            from gmmrefine.refine.patches import body_motion, composite_local_resolution

            body_motion(job, plan, *current_poses(job, ps, int(plan["start_iteration"])))
            composite_local_resolution(job, plan, ps.apix)
    report = job.path / "final" / "report.html"
    if mask is not None or plan is not None:
        from gmmrefine.pipeline.report import write_report

        write_report(job.path, extra_rows=_extra_rows(job, stage_ps, histories))
    summary = json.loads((job.path / "final" / "summary.json").read_text())
    composite = job.path / "final" / "composite_fsc.json"
    if composite.is_file():
        summary["composite"] = json.loads(composite.read_text())
    job.log(f"done in {time.perf_counter() - start:.0f} s: resolution {histories[0]['resolution_A']:.2f} -> "
            f"{histories[-1]['resolution_A']:.2f} A" + (f", composite {summary['composite']['resolution_A']:.2f} A"
                                                         if "composite" in summary else "") + f"; report {report}")
    if not job.is_done("finished"):
        job.mark_done("finished", at=time.strftime("%Y-%m-%d %H:%M:%S"), resolution_A=histories[-1]["resolution_A"])
    return summary | {"report": str(report)}


def _stop_between_steps(step: str) -> None:
    """After each completed step (rank 0): stop there if a signal came."""
    from gmmrefine import distributed

    if distributed.stop_requested():
        raise distributed.Interrupted(f"stopped by a signal after step {step}")


def _serve(ps, ctx) -> dict:
    """Ranks other than 0: run the half passes rank 0 sends, on this rank's device, until the job ends."""
    import dataclasses

    from gmmrefine import distributed
    from gmmrefine.refine.global_refine import half_pass

    def half_pass_task(settings, **kwargs):
        half_pass(ps, settings=dataclasses.replace(settings, device=ctx.device, progress=False), **kwargs)

    with distributed.stop_on_signal():
        code = distributed.serve({"half_pass": half_pass_task})
    if code == distributed.EXIT_INTERRUPTED:
        raise distributed.Interrupted("stopped with rank 0")
    if code:
        raise SystemExit(code)
    return {}


def main(args) -> int:
    params = _params(args)
    run(params | {"out": str(args.out)}, resume=args.resume)
    return 0

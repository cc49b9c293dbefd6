"""``gmmrefine refine``: gold-standard global GMM pose refinement of an existing consensus refinement."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from gmmrefine.errors import InputError

COMMAND = "refine"
HELP = "refine every particle's pose against GMMs of its own half set (gold standard, resumable)"
DESCRIPTION = (
    "Global GMM pose refinement (Chen, Schmid & Chiu 2024). Per iteration and for each half set on its own: "
    "reconstruct the half map at the current poses, low-pass it to the half's resolution, build (first "
    "iteration) or warm-start its GMM, refine every particle's rotation and shift by Adam on the band-limited "
    "FRC against that GMM, reconstruct at the new poses; then the gold-standard FSC between the halves. "
    "Writes a job folder (job.json, log.txt, itNNN/, final/ with particles.star, half maps, the filtered "
    "map, plots and report.html). A killed job resumes with --continue."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--particles", type=Path, required=True,
                        help="RELION STAR (3.0-5) or cryoSPARC .cs of a consensus refinement")
    parser.add_argument("--out", type=Path, required=True, help="job folder (must not exist unless --continue)")
    parser.add_argument("--iterations", type=int, default=5, help="refinement iterations")
    parser.add_argument("--resolution-start", default="auto",
                        help="band limit of the first iteration in A, or 'auto' (each half's own estimate)")
    parser.add_argument("--minres", type=float, default=50.0, help="low-resolution end of the FRC band, A")
    parser.add_argument("--batch", default="auto",
                        help="particles optimised together (memory/speed only; results do not depend on it): a number, "
                             "or auto: the paper's 16 on the CPU, as many as half the free GPU memory holds on CUDA")
    parser.add_argument("--chunk", type=int, default=20000,
                        help="particles read into memory at a time (at most 64 MB of images whatever the number)")
    parser.add_argument("--steps", type=int, default=10, help="Adam steps per particle and iteration")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (rotation unit 2 rad, shift unit 1 box: see refine/poses.py)")
    parser.add_argument("--ctf", choices=("flip", "full"), default="flip",
                        help="flip: compare with phase-flipped particles (paper); full: multiply projections by the CTF")
    parser.add_argument("--gmm-steps", type=int, default=150, help="Adam steps of each GMM fit to a half map")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    parser.add_argument("--seed", type=int, default=0, help="random seed (GMM seeding)")
    parser.add_argument("--project-dir", type=Path, default=None, help="cryoSPARC project folder (.cs input)")
    parser.add_argument("--continue", dest="resume", action="store_true",
                        help="resume an interrupted job in --out (same parameters)")


def _params(args) -> dict:
    res = str(args.resolution_start).strip().lower()
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
    batch = str(args.batch).strip().lower()
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            batch = 0
        if batch < 1:
            raise InputError(f"--batch: expected 'auto' or an integer >= 1, got {args.batch!r}.", field="--batch")
    checks = [("--iterations", args.iterations >= 1, "an integer >= 1"),
              ("--chunk", args.chunk >= 1, "an integer >= 1"), ("--steps", args.steps >= 0, "an integer >= 0"),
              ("--gmm-steps", args.gmm_steps >= 1, "an integer >= 1"),
              ("--lr", math.isfinite(args.lr) and args.lr > 0, "a positive number"),
              ("--minres", math.isfinite(args.minres) and args.minres > 0, "a positive resolution in A")]
    for name, ok, expected in checks:
        if not ok:
            raise InputError(f"{name}: expected {expected}, got {getattr(args, name[2:].replace('-', '_'))}.", field=name)
    return {
        "particles": str(Path(args.particles).resolve()), "iterations": int(args.iterations), "resolution_start": res,
        "minres": float(args.minres), "batch": batch, "chunk": int(args.chunk), "steps": int(args.steps),
        "lr": float(args.lr), "ctf": args.ctf, "reconstruct_ctf": "wiener", "rotation_unit_rad": 2.0,
        "translation_unit_px": None, "gmm_steps": int(args.gmm_steps), "device": str(args.device), "seed": int(args.seed),
        "project_dir": None if args.project_dir is None else str(Path(args.project_dir).resolve()),
    }


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise InputError(f"--device: {device!r} is not usable here ({err}).", field="--device") from None


def finish(job, ps, histories: list[dict]) -> dict:
    """The ``final/`` folder: poses, half maps, the filtered average, plots and the report."""
    import shutil

    import torch

    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.io.atomic import atomic_path, write_json_atomic
    from gmmrefine.io.mrc import read_map, write_map
    from gmmrefine.io.particles import write_particles_star
    from gmmrefine.pipeline.report import write_report
    from gmmrefine.refine.global_refine import current_poses, it_dir

    last = histories[-1]
    k = last["iteration"]
    final = job.dir("final")
    angles, shifts = current_poses(job, ps, k)
    write_particles_star(ps, final / "particles.star", angles, shifts, absolute_image_paths=True)
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
                                                                "mean_change_px", "std_change_px", "seconds")}
                                 for h in histories]}
    write_json_atomic(final / "summary.json", summary)
    report = write_report(job.path, extra_rows={
        "particles": str(len(ps)), "box / pixel size": f"{ps.box} px / {ps.apix:g} A",
        "resolution at start": f"{histories[0]['resolution_A']:.2f} A",
        "resolution after refinement": f"{last['resolution_A']:.2f} A"})
    summary["report"] = str(report)
    return summary


def params_for(particles, out, *options: str) -> dict:
    """Job parameters as the command line ``--particles P --out OUT OPTIONS...`` gives them (for callers
    such as ``gmmrefine demo`` that run a refinement without a command line of their own)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--particles", str(particles), "--out", str(out), *options])
    return _params(args) | {"out": str(args.out)}


def run(params: dict, *, resume: bool = False, command_line: list[str] | None = None,
        progress: bool = True) -> dict:
    """Run (or resume) a refinement job from its parameters (``_params``); returns ``final/summary.json``.

    Used by :func:`main` and by ``gmmrefine demo``. Validates the input before creating anything.
    Under torchrun or srun (:mod:`gmmrefine.distributed`) every rank reads and checks the input; rank 0
    runs the job (GMMs, maps, every file) and the other ranks serve its passes over the particles,
    each on its own shard. SIGTERM stops the job at the next safe point with a checkpoint
    (:class:`gmmrefine.distributed.Interrupted`); ``--continue`` resumes it.
    """
    from gmmrefine import distributed
    from gmmrefine.io.particles import read_particles

    ctx = distributed.init(params["device"])
    _check_device(ctx.device)
    ps = read_particles(params["particles"], project_dir=params["project_dir"])
    for h in (1, 2):
        if not (np.asarray(ps.subset) == h).any():
            raise InputError(f"{ps.path}: half set {h} has no particles; gold-standard refinement needs both "
                             "halves (rlnRandomSubset 1 and 2).", path=str(ps.path), field="rlnRandomSubset")
    if ps.box % 2:
        raise InputError(f"{ps.path}: the box is {ps.box} px; gmmrefine needs an even box.", path=str(ps.path),
                         field="rlnImageSize")
    if not ctx.is_main:
        return _serve(ps, ctx)
    with distributed.leading(), distributed.stop_on_signal():
        return _lead(params, ps, ctx, resume=resume, command_line=command_line, progress=progress)


def _lead(params: dict, ps, ctx, *, resume: bool, command_line: list[str] | None, progress: bool) -> dict:
    """The job itself, on rank 0 (or the only process)."""
    import dataclasses

    from gmmrefine import distributed
    from gmmrefine.pipeline.job import Job
    from gmmrefine.refine.global_refine import run_global_refinement, settings_from_params

    out = Path(params["out"])
    if not resume and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"{out}: the job folder already exists; use --continue to resume it or choose another --out.",
                         path=str(out), field="--out")
    job_params = {k: v for k, v in params.items() if k != "out"}
    job = Job(out, job_params, resume=resume, command_line=command_line)
    if ctx.active:
        job.log(f"{ctx.world_size} processes ({ctx.backend}); rank 0 on {ctx.device}")
    settings = dataclasses.replace(settings_from_params(job_params), progress=progress, device=ctx.device,
                                   checkpoint_dir=str(job.path / "checkpoint"))
    start = time.perf_counter()
    try:
        histories = run_global_refinement(job, ps, settings, on_step=_stop_between_steps)
        if not job.is_done("final"):
            summary = finish(job, ps, histories)
            job.mark_done("final", resolution_A=summary["resolution_final_A"])
    except distributed.Interrupted as err:
        job.log(f"{err}; resume with the same command and --continue", echo=False)
        raise
    report = job.path / "final" / "report.html"
    job.log(f"done in {time.perf_counter() - start:.0f} s: resolution {histories[0]['resolution_A']:.2f} -> "
            f"{histories[-1]['resolution_A']:.2f} A; report {report}")
    return json.loads((job.path / "final" / "summary.json").read_text()) | {"report": str(report)}


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

"""``gmmrefine hetero``: per-particle conformations (latent vectors) learnt by a GMM encoder/decoder,
trained on each half set independently."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from gmmrefine.devices import DEVICE_HELP, resolve_device
from gmmrefine.errors import InputError

COMMAND = "hetero"
HELP = "heterogeneity analysis: per-particle latent conformations from a GMM encoder/decoder per half set"
DESCRIPTION = (
    "Learns each particle's conformation (a latent vector) from a refinement's particles and GMMs, and with "
    "--mask turns it into a pose of the masked domain. "
    "For each half set independently, fit every particle's latent vector (by default a MAP estimate of its own "
    "under a standard normal prior; --inference encoder predicts it with the paper's encoder network) and a "
    "decoder (latent vector -> displacement and amplitude change of every Gaussian; a 32-Gaussian coarse GMM "
    "carries the motion) so that decoded GMMs projected at the consensus poses match the particles over the "
    "band, each ring weighted by its SNR measured on the half's own particles (--objective frc: the paper's "
    "mean FRC); then each half's neutral GMM is refitted to the map of its central particles along PC1 "
    "(sharper where a domain moves than the consensus) and the half trained again (--refits). Input: a "
"gmmrefine refine job (--job: final/particles.star and the last iteration's gmm_half1/2.npz) or the "
    "files directly (--particles, --gmm1, --gmm2). Writes latent.npy (one row per particle, in the particle "
    "file's order), particles.star with gmmLatent1..L, gmmLatentPC1 and gmmLatentPC1Sd columns (PC1: the first "
    "principal component of the particles' decoded motions, in angstrom; each particle's posterior mean and sd "
    "along it, from its own image), latent_pca.png, "
    "training_curves.png, pc1_half{1,2}.pdb (decoded GMMs along PC1, one MODEL per frame), maps at +/-2 "
    "standard deviations, the networks, summary.json and report.html."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--job", type=Path, help="gmmrefine refine job folder")
    parser.add_argument("--particles", type=Path,
                        help="STAR/.cs with consensus poses and half split (instead of --job)")
    parser.add_argument("--gmm1", type=Path, help="neutral GMM of half 1 (.npz; with --particles)")
    parser.add_argument("--gmm2", type=Path, help="neutral GMM of half 2 (.npz; with --particles)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty)")
    parser.add_argument("--mask", type=Path, default=None,
                        help="mask (MRC, the particles' box) on a domain: also find each particle's domain pose from "
                             "its conformation and reconstruct the halves at those poses")
    parser.add_argument("--latent-dim", type=int, default=4, help="length of the latent vectors")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs per half (default: 8 with --inference optimise, 20 with encoder)")
    parser.add_argument("--coarse-epochs", type=int, default=None,
                        help="first epochs that move only the coarse GMM (default: all of them with --inference "
                             "optimise, half of --epochs with encoder)")
    parser.add_argument("--n-coarse", type=int, default=32, help="Gaussians of the coarse GMM")
    parser.add_argument("--batch", type=int, default=32, help="particles per optimiser step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--maxres", type=float, default=None,
                        help="high-resolution end of the FRC band, A (default: 15 %% beyond each half's own "
                             "resolution with --objective snr, down to Nyquist; the resolution itself with frc)")
    parser.add_argument("--minres", type=float, default=100.0, help="low-resolution end of the FRC band, A")
    parser.add_argument("--encoder-input", choices=("gradient", "image"), default="gradient",
                        help="encoder input: FRC gradient w.r.t. the neutral GMM (default) or band-limited images")
    parser.add_argument("--ctf", choices=("flip", "full"), default="full",
                        help="compare the particles with CTF-multiplied projections (full, default) or the "
                             "phase-flipped particles with plain projections (flip, the paper's)")
    parser.add_argument("--inference", choices=("optimise", "encoder"), default="optimise",
                        help="each particle's latent optimised on its own score with a standard normal prior "
                             "(optimise, default), or predicted by an encoder network (encoder, the paper's)")
    parser.add_argument("--inner-steps", type=int, default=4,
                        help="with --inference optimise: latent steps per particle each time its minibatch comes up")
    parser.add_argument("--objective", choices=("snr", "frc"), default="snr",
                        help="training objective: ring correlations weighted by each particle's ring SNR, measured "
                             "on the half's own particles (snr, default), or the paper's mean band FRC (frc)")
    parser.add_argument("--refits", type=int, default=1,
                        help="times each half's neutral GMM is refitted to the map of its central particles along "
                             "PC1 (within 1 sd) and the half trained again: a moving domain is sharper there than "
                             "in the consensus map (0: train once on the given GMMs)")
    parser.add_argument("--chunk", type=int, default=20000, help="particles read from disk at a time")
    parser.add_argument("--seed", type=int, default=0, help="base seed (each half derives its own)")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def _inputs(args):
    from gmmrefine.refine.job_outputs import HeteroInputs, job_inputs

    direct = (args.particles, args.gmm1, args.gmm2)
    if args.job is not None:
        if any(x is not None for x in direct):
            raise InputError("--job and --particles/--gmm1/--gmm2 exclude each other; give one of them.",
                             field="--job")
        return job_inputs(args.job)
    if any(x is None for x in direct):
        raise InputError("give --job JOB, or all of --particles, --gmm1 and --gmm2.", field="--particles")
    return HeteroInputs(args.particles, {1: args.gmm1, 2: args.gmm2}, None)


def _validate(args):
    import torch

    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.hetero.outputs import default_maxres_A
    from gmmrefine.hetero.train import HeteroSettings
    from gmmrefine.io.particles import read_particles

    if args.epochs is None:
        args.epochs = 8 if args.inference == "optimise" else 20
    for name in ("latent_dim", "epochs", "batch", "chunk", "n_coarse", "inner_steps"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: expected at least 1, got {getattr(args, name)}.",
                             field=name)
    if not args.lr > 0:
        raise InputError(f"--lr: expected a positive learning rate, got {args.lr}.", field="lr")
    resolve_device(args.device)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out}: --out exists and is not an empty folder; choose another.",
                         path=str(args.out), field="--out")
    from gmmrefine.pipeline.job import check_output_folder

    check_output_folder(args.out)  # before reading any particle
    inputs = _inputs(args)
    ps = read_particles(inputs.particles)
    for h in (1, 2):
        if not (np.asarray(ps.subset) == h).any():
            raise InputError(f"{inputs.particles}: half set {h} (rlnRandomSubset = {h}) has no particles; each "
                             "half trains on its own particles.", path=str(inputs.particles), field="rlnRandomSubset")
    gmms = {h: GaussianMixture.load(p) for h, p in inputs.gmms.items()}
    for h, g in gmms.items():
        if g.n < 1:
            raise InputError(f"{inputs.gmms[h]}: the GMM has no Gaussians.", path=str(inputs.gmms[h]))
    mask = None
    if args.mask is not None:
        from gmmrefine.hetero.conformation import domain_weights
        from gmmrefine.io.mrc import read_map, require_cubic

        if not args.mask.is_file():
            raise InputError(f"{args.mask}: --mask file not found.", path=str(args.mask), field="--mask")
        mask = torch.as_tensor(require_cubic(read_map(args.mask)[0], args.mask))
        if mask.shape[0] != ps.box:
            raise InputError(f"{args.mask}: the mask is {mask.shape[0]} px wide; expected the particles' box "
                             f"({ps.box} px).", path=str(args.mask), field="--mask")
        for h, g in gmms.items():
            if float(domain_weights(g, mask, ps.apix).sum()) < 1:
                raise InputError(f"{args.mask}: no Gaussian of half {h}'s GMM lies inside the mask (> 0.5).",
                                 path=str(args.mask), field="--mask")
    # The default band: each half's own resolution estimate where the job recorded one (the gold-standard
    # resolution is made from both halves, so a band taken from it would let half 2's data steer half 1).
    half_maxres: tuple[float, float] | None = None
    if args.maxres is not None:
        maxres = args.maxres
    elif inputs.half_resolution_A is not None:
        own = inputs.half_resolution_A
        half_maxres = (default_maxres_A(own[1], ps.apix, args.objective),
                       default_maxres_A(own[2], ps.apix, args.objective))
        maxres = max(half_maxres)
    else:
        maxres = default_maxres_A(inputs.resolution_A, ps.apix, args.objective)
    for value in (maxres,) if half_maxres is None else half_maxres:
        if not (value >= 2 * ps.apix * 0.999 and args.minres > value):
            raise InputError(f"--maxres/--minres: need minres > maxres >= Nyquist ({2 * ps.apix:g} A), got "
                             f"minres {args.minres:g}, maxres {value:g}.", field="maxres")
    settings = HeteroSettings(latent_dim=args.latent_dim, epochs=args.epochs, coarse_epochs=args.coarse_epochs,
                              batch=args.batch, lr=args.lr, n_coarse=args.n_coarse,
                              encoder_input=args.encoder_input, minres_A=args.minres, maxres_A=maxres,
                              half_maxres_A=half_maxres, ctf=args.ctf, objective=args.objective,
                              half_resolution_A=None if inputs.half_resolution_A is None else
                              (float(inputs.half_resolution_A[1]), float(inputs.half_resolution_A[2])),
                              refits=args.refits,
                              inference=args.inference, inner_steps=args.inner_steps,
                              chunk=args.chunk, seed=args.seed, device=args.device)
    return inputs, ps, gmms, settings, mask


def _band_text(settings) -> str:
    if settings.half_maxres_A is None:
        return f"{settings.minres_A:g}-{settings.maxres_A:g} A"
    return (f"{settings.minres_A:g}-{settings.half_maxres_A[0]:g} A (half 1), "
            f"{settings.minres_A:g}-{settings.half_maxres_A[1]:g} A (half 2), each from its own resolution")


def main(args) -> int:
    import dataclasses

    from gmmrefine import distributed
    from gmmrefine.hetero.outputs import write_outputs
    from gmmrefine.hetero.train import train_halves
    from gmmrefine.pipeline.job import Job

    ctx = distributed.init(args.device)
    inputs, ps, gmms, settings, mask = _validate(args)
    distributed.barrier()  # every rank has checked --out before rank 0 creates it
    settings = dataclasses.replace(settings, device=ctx.device, progress=settings.progress and ctx.is_main)
    params = {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if not k.startswith("_") and k != "command"}
    job = Job(args.out, params) if ctx.is_main else None
    start = time.perf_counter()
    if job is not None:
        job.log(f"{len(ps)} particles from {inputs.particles}; band {_band_text(settings)}; "
                f"GMMs of {gmms[1].n} / {gmms[2].n} Gaussians")
    # Several processes: the halves are independent (own particles, GMM, networks and seed), so rank r
    # trains the halves h with (h - 1) % K == r, each exactly as one process would; rank 0 writes.
    mine = tuple(h for h in (1, 2) if (h - 1) % ctx.world_size == ctx.rank)
    results = train_halves(ps, gmms, settings, halves=mine) if mine else {}
    if ctx.active:
        results = {h: r for part in distributed.all_gather_object(results) for h, r in part.items()}
        if not ctx.is_main:
            return 0
        results = dict(sorted(results.items()))
    assert job is not None  # rank 0 (the only one left here) made the job
    summary = write_outputs(job.path, ps, results, settings, inputs)
    for h, r in results.items():
        for i, info in enumerate(r.refits, 1):
            job.log(f"half {h}: neutral GMM refitted ({i}) to the map of its {info['n_particles']} central "
                    f"particles at {info['resolution_A']:.2f} A, {info['seconds']:.0f} s")
    for h, v in summary["halves"].items():
        job.log(f"half {h}: FRC {v['frc_neutral']:.4f} -> {v['frc_final']:.4f}, PC1 "
                f"{100 * v['explained_variance_fraction'][0]:.0f} % of the decoded motion's variance, RMS motion "
                f"{v['pc1_rms_motion_A_at_2sd']:.2f} A at 2 sd, {v['seconds']:.0f} s")
    if mask is not None:
        from gmmrefine.hetero.outputs import write_domain_outputs

        info = write_domain_outputs(job.path, ps, results, settings, mask)
        for h, v in info.items():
            job.log(f"half {h}: domain of {v['n_domain_gaussians']} Gaussians; its poses moved "
                    f"{v['mean_change_deg']:.2f} +/- {v['std_change_deg']:.2f} deg from the consensus")
    job.mark_done("hetero", **{h: {"frc_final": v["frc_final"]} for h, v in summary["halves"].items()})
    job.log(f"done in {time.perf_counter() - start:.0f} s; report {job.path / 'report.html'}")
    return 0

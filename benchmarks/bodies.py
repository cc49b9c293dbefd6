"""Multi-body refinement against the other ways to sharpen a moving domain, and against RELION's
multi-body refinement, on one simulated set with a hinged domain (issue 20), in one run.

    python benchmarks/bodies.py --out /tmp/bench_bodies [--n 2000 --box 128 --snr 0.05 --hinge-deg 10
                                --arms global,focused,patches,bodies,subtract,consensus,relion]

1. Data: adenylate kinase whose LID domain (residues 122-159) turns by a random angle of up to
   ``--hinge-deg`` per particle about a random axis through its hinge (``gmmrefine simulate
   --hinge-residues``), ``--n`` particles, box ``--box`` at ``--apix``, SNR ``--snr``, poses ``--perturb-deg``
   / ``--perturb-A`` off. Two bodies: the LID (the simulator's ``domain_mask.mrc``) and the rest of the
   protein (:func:`gmmrefine.pipeline.evaluate.simulation_masks`), the masks a user would draw; the same
   masks judge every arm.
2. Arms, each from the same start:
   (a) ``global``: ``gmmrefine refine`` (``--iterations auto``);
   (b) ``focused``: ``refine --from-job (a) --focus-mask BODY --iterations 3`` per body, the two composited
       with :func:`gmmrefine.refine.composite.composite_map` (global half maps as fallback);
   (c) ``patches``: ``refine --from-job (a) --patches 8``;
   (d) ``bodies``: ``refine --from-job (a) --bodies LID REST --body-context width`` (the rest widened, the
       paper's way: the same computation as (b));
   (e) ``subtract``: the same with ``--body-context subtract`` (the default): the bodies in lock-step, each
       iteration taking the other body out of the images at its own poses of the previous iteration;
   (e') ``consensus``: subtraction with the rest held at the consensus poses throughout
       (``--body-rest-poses consensus``: each body refined on its own);
   (f) ``relion``: ``relion_refine_mpi`` local auto-refine from the perturbed poses (``benchmarks/refine.py``
       ``RELION_OPTIONS``, reference our start map at 8 A), then ``relion_refine_mpi --continue`` its last
       optimiser with ``--multibody_masks`` (the same two masks, sigma 10 degrees / 2 A, the rest rotating
       relative to the LID and back, ``--reconstruct_subtracted_bodies``), 3 MPI ranks on the same cores,
       until it converges. A stopped multi-body run is continued from its newest optimiser file by the next
       call; every iteration's unfiltered body maps are judged (``multibody_iterations``), the row being the final maps
       once converged, else the last iteration's. ``--arms relion_judge`` judges the folders without running.
3. Per arm: the masked FSC to the noise-free map (mean over shells,
   :func:`gmmrefine.pipeline.evaluate.masked_fsc_to_truth`) of each body (its own half maps in its mask:
   the body's focused or multi-body maps; the composite for patches) and of the whole composite; the
   LID's pose error against its true per-particle pose (:func:`~gmmrefine.pipeline.evaluate.domain_pose_errors`)
   where the arm gives LID poses; wall time and peak RSS.

Writes ``results.json`` in ``--out`` (arms of an earlier or concurrent call with the same ``--out`` kept, so
arms can be run one call at a time, or the RELION arm beside the others; ``global`` is reused) and prints a
table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reconstruct import measured

DATA = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data"
BODIES = ("lid", "rest")


def gm(*args: str) -> list[str]:
    return [sys.executable, "-m", "gmmrefine", *args]


def simulate(out: Path, args) -> Path:
    sim = out / "sim"
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run(gm("simulate", "--model", str(DATA / "adk_open.pdb"), "--hinge-residues", "122-159",
                          "--hinge-deg", str(args.hinge_deg), "--n", str(args.n), "--box", str(args.box), "--apix",
                          str(args.apix), "--snr", str(args.snr), "--perturb-deg", str(args.perturb_deg),
                          "--perturb-A", str(args.perturb_A), "--seed", str(args.seed), "--device", "cpu",
                          "--out", str(sim)), check=True, stdout=subprocess.DEVNULL)
    return sim


def body_masks(sim: Path, out: Path) -> dict[str, Path]:
    from gmmrefine.io.mrc import read_map, write_map
    from gmmrefine.pipeline.evaluate import simulation_masks

    masks = simulation_masks(sim)
    apix = read_map(sim / "truth_map.mrc")[1]
    paths = {}
    for body, key in zip(BODIES, ("domain", "rest")):
        paths[body] = out / f"mask_{body}.mrc"
        write_map(paths[body], masks[key].numpy().astype(np.float32), apix)
    write_map(out / "mask_whole.mrc", masks["whole"].numpy().astype(np.float32), apix)
    return paths


def maps(paths: list[Path]) -> list[np.ndarray]:
    from gmmrefine.io.mrc import read_map

    return [read_map(p)[0] for p in paths]


def judge(halves_per_body: dict[str, list[Path]], composite: list[Path] | None, masks: dict[str, np.ndarray],
          truth_map: np.ndarray) -> dict:
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth

    row = {f"masked_fsc_{b}": masked_fsc_to_truth(*maps(halves_per_body[b]), truth_map, masks[b])
           for b in BODIES if b in halves_per_body}
    if composite is not None:
        row["masked_fsc_whole"] = masked_fsc_to_truth(*maps(composite), truth_map, masks["whole"])
    return row


def lid_error(star: Path, truth) -> float:
    from gmmrefine.io.particles import read_particles
    from gmmrefine.pipeline.evaluate import domain_pose_errors

    ps = read_particles(star)
    return float(domain_pose_errors(truth, ps.angles_deg).mean())


#: RELION's multi-body sampling (kept by every continuation): local searches of sigma 10 deg / 2 A per body.
MULTIBODY_OPTIONS = ["--solvent_correct_fsc", "--oversampling", "1", "--pad", "2", "--healpix_order", "4",
                     "--auto_local_healpix_order", "4", "--offset_range", "3", "--offset_step", "1",
                     "--reconstruct_subtracted_bodies", "--dont_combine_weights_via_disc", "--pool", "30", "--j", "1"]


def multibody_iterations(mb: Path) -> dict[int, str]:
    """Prefix (``run_itNNN`` or, after a continuation, ``run_ctK_itNNN``) of each multi-body iteration whose
    unfiltered body maps are all on disk, the newest file for an iteration that was written twice; ``-1``: the
    final maps. (RELION 3.1 left out body 1's unfiltered maps in some iterations after it refined its angular
    sampling; those iterations are not judged: its filtered maps are not comparable.)"""
    import re

    found: dict[int, tuple[float, str]] = {}
    for f in mb.glob("run*_half1_body001_unfil.mrc"):
        prefix = f.name[: -len("_half1_body001_unfil.mrc")]
        if not all((mb / f"{prefix}_half{h}_body{i + 1:03d}_unfil.mrc").is_file() for h in (1, 2)
                   for i in range(len(BODIES))):
            continue
        m = re.search(r"_it(\d{3})$", prefix)
        it = int(m.group(1)) if m else -1
        if it not in found or f.stat().st_mtime > found[it][0]:
            found[it] = (f.stat().st_mtime, prefix)
    return {it: prefix for it, (_, prefix) in sorted(found.items())}


def relion_multibody(sim: Path, out: Path, global_job: Path, mask_paths: dict[str, Path], truth, truth_map, masks,
                     apix: float, diameter_A: float, *, run: bool = True) -> dict:
    """RELION's consensus local refinement, then its multi-body refinement from that run's last iteration,
    continued from its newest optimiser file when an earlier call was stopped (each RELION iteration takes
    8-30 min on 2 cores); every iteration's body maps judged, and the final ones once RELION has converged.
    ``run=False`` only judges what the folders hold."""
    from refine import run_relion, truth_mask

    from gmmrefine.io.particles import read_particles

    true_poses = read_particles(sim / "particles.star")
    rdir = out / "relion"
    consensus = None
    if run or (rdir / "run_data.star").is_file():  # (a converged consensus is judged, not run again)
        consensus = run_relion(sim, global_job, out, true_poses, truth_map, truth_mask(truth_map, apix), apix,
                               diameter_A, reuse=True)
    mb = out / "relion_multibody"
    commands = []
    t0 = time.time()
    if run and -1 not in multibody_iterations(mb):
        optimisers = sorted(mb.glob("run*_it[0-9][0-9][0-9]_optimiser.star"), key=lambda f: f.stat().st_mtime)
        if optimisers:
            cmd = ["--continue", str(optimisers[-1])]
        else:
            shutil.rmtree(mb, ignore_errors=True)
            mb.mkdir()
            lid, rest = mask_paths["lid"], mask_paths["rest"]
            (mb / "bodies.star").write_text("data_\nloop_\n_rlnBodyMaskName\n_rlnBodyRotateRelativeTo\n"
                                            f"_rlnBodySigmaAngles\n_rlnBodySigmaOffset\n{lid} 2 10 2\n{rest} 1 10 2\n")
            last = sorted(rdir.glob("run_it[0-9][0-9][0-9]_optimiser.star"))[-1]
            cmd = ["--continue", str(last), "--multibody_masks", str(mb / "bodies.star")]
        cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "3", "relion_refine_mpi", *cmd,
               "--o", str(mb / "run"), *MULTIBODY_OPTIONS]
        commands.append(" ".join(cmd))
        with open(mb / "log.txt", "a") as log:
            subprocess.run(cmd, cwd=sim, stdout=log, stderr=subprocess.STDOUT, check=True)
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth
    from gmmrefine.refine.composite import composite_map

    fallbacks = [torch.as_tensor(m) for m in maps([rdir / f"run_half{h}_class001_unfil.mrc" for h in (1, 2)])]

    def judged(prefix: str) -> dict:
        halves = {b: [mb / f"{prefix}_half{h}_body{i + 1:03d}_unfil.mrc" for h in (1, 2)] for i, b in enumerate(BODIES)}
        row = judge(halves, None, masks, truth_map)
        # RELION's composite of its bodies, made as ours are (its own half maps of each body in its mask)
        comp = []
        for h, fallback in zip((1, 2), fallbacks):
            comp.append(composite_map([torch.as_tensor(maps([halves[b][h - 1]])[0]) for b in BODIES],
                                      [torch.as_tensor(masks[b]) for b in BODIES], fallback).numpy())
        row["masked_fsc_whole"] = masked_fsc_to_truth(comp[0], comp[1], truth_map, masks["whole"])
        return row | {"maps": prefix}

    done = multibody_iterations(mb)
    rows = {("final" if it < 0 else f"it{it:03d}"): judged(prefix) for it, prefix in done.items()}
    last = rows.get("final") or (rows[max(k for k in rows)] if rows else {})
    return {"consensus": consensus,
            "multibody": last | {"converged": "final" in rows, "commands_this_call": commands,
                                 "wall_s_this_call": time.time() - t0 if commands else None},
            "multibody_iterations": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.0)
    parser.add_argument("--snr", type=float, default=0.05)
    parser.add_argument("--hinge-deg", type=float, default=10.0)
    parser.add_argument("--perturb-deg", type=float, default=3.0)
    parser.add_argument("--perturb-A", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--focused-iterations", type=int, default=3)
    parser.add_argument("--diameter", type=float, default=80.0, help="RELION --particle_diameter, A")
    parser.add_argument("--arms", default="global,focused,patches,bodies,subtract,consensus,relion")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.out.mkdir(parents=True, exist_ok=True)

    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles
    from gmmrefine.refine.composite import composite_map

    sim = simulate(args.out, args)
    truth_map, apix = read_map(sim / "truth_map.mrc")
    truth = read_particles(sim / "truth.star").tables["particles"]
    mask_paths = body_masks(sim, args.out)
    masks = {b: read_map(p)[0] for b, p in mask_paths.items()} | {"whole": read_map(args.out / "mask_whole.mrc")[0]}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "arms"}
    results: dict = {"settings": settings, "arms": {}}
    if (args.out / "results.json").is_file():
        earlier = json.loads((args.out / "results.json").read_text())
        if earlier["settings"] == settings:
            results["arms"] = earlier["arms"]
    g = args.out / "global"
    if not (g / "final" / "particles.star").is_file():
        shutil.rmtree(g, ignore_errors=True)
        results["arms"]["global"] = measured(gm("refine", "--particles", str(sim / "particles_perturbed.star"),
                                                "--out", str(g)))
    final = [g / "final" / f"half{h}.mrc" for h in (1, 2)]
    results["arms"].setdefault("global", {}).update(
        judge({b: final for b in BODIES}, final, masks, truth_map),
        lid_pose_error_deg=lid_error(g / "final" / "particles.star", truth))
    if "focused" in arms:
        row: dict = {"wall_s": 0.0}
        for b in BODIES:
            f = args.out / f"focused_{b}"
            shutil.rmtree(f, ignore_errors=True)
            m = measured(gm("refine", "--from-job", str(g), "--focus-mask", str(mask_paths[b]), "--iterations",
                            str(args.focused_iterations), "--out", str(f)))
            row["wall_s"] += m["wall_s"]
            row[f"peak_rss_MB_{b}"] = m["peak_rss_MB"]
        halves = {b: [args.out / f"focused_{b}" / "final" / f"half{h}.mrc" for h in (1, 2)] for b in BODIES}
        comp = []
        for h in (1, 2):
            comp_path = args.out / f"focused_composite_half{h}.mrc"
            from gmmrefine.io.mrc import write_map

            fallback = torch.as_tensor(read_map(final[h - 1])[0])
            write_map(comp_path, composite_map([torch.as_tensor(read_map(halves[b][h - 1])[0]) for b in BODIES],
                                               [torch.as_tensor(masks[b]) for b in BODIES], fallback).numpy(), apix)
            comp.append(comp_path)
        row.update(judge(halves, comp, masks, truth_map),
                   lid_pose_error_deg=lid_error(args.out / "focused_lid" / "final" / "particles.star", truth))
        results["arms"]["focused"] = row
    bodies = ["--bodies", *map(str, mask_paths.values())]
    for arm, extra in (("patches", ["--patches", "8"]), ("bodies", [*bodies, "--body-context", "width"]),
                       ("subtract", [*bodies, "--body-context", "subtract"]),
                       ("consensus", [*bodies, "--body-context", "subtract", "--body-rest-poses", "consensus"])):
        if arm not in arms:
            continue
        j = args.out / arm
        shutil.rmtree(j, ignore_errors=True)
        row = measured(gm("refine", "--from-job", str(g), *extra, "--out", str(j)))
        comp = [j / "final" / f"composite_half{h}.mrc" for h in (1, 2)]
        if arm in ("bodies", "subtract", "consensus"):
            halves = {b: [j / "patches" / f"b{i + 1:02d}" / f"half{h}.mrc" for h in (1, 2)] for i, b in enumerate(BODIES)}
            row["lid_pose_error_deg"] = lid_error(j / "patches" / "b01" / "particles.star", truth)
        else:
            halves = {b: comp for b in BODIES}
        row.update(judge(halves, comp, masks, truth_map))
        results["arms"][arm] = row
    if "relion" in arms or "relion_judge" in arms:
        results["arms"]["relion"] = relion_multibody(sim, args.out, g, mask_paths, truth, truth_map, masks, apix,
                                                     args.diameter, run="relion" in arms)
    # Arms another call finished meanwhile (the RELION arm runs for hours beside the others) are kept.
    if (args.out / "results.json").is_file():
        latest = json.loads((args.out / "results.json").read_text())
        if latest["settings"] == settings:
            results["arms"] = latest["arms"] | results["arms"]
    from gmmrefine.io.atomic import write_json_atomic

    write_json_atomic(args.out / "results.json", results)
    print(f"{'arm':10s} {'LID':>7s} {'rest':>7s} {'whole':>7s} {'LID pose err':>12s} {'wall s':>8s}")
    for arm, r in results["arms"].items():
        r = r.get("multibody", r)
        print(f"{arm:10s} {r.get('masked_fsc_lid', float('nan')):7.4f} {r.get('masked_fsc_rest', float('nan')):7.4f} "
              f"{r.get('masked_fsc_whole', float('nan')):7.4f} {r.get('lid_pose_error_deg', float('nan')):12.3f} "
              f"{r.get('wall_s', float('nan')):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

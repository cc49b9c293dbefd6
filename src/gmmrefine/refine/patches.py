"""Patch-by-patch refinement: k-means patches of each half's GMM, a focused refinement per patch,
a composite map per half, and the final FSC between the composites.

Steps (paper, Methods, "Patch-by-patch refinement"), after the main (global) refinement of a job:

1. ``patches/setup``: per half, on its own, k-means of its GMM's centres into ``K`` patches (K = 1 is
   the global refinement again); per patch a soft sphere centred on the cluster centre with radius
   the distance of its farthest Gaussian centre and a 5-pixel cosine edge
   (:func:`gmmrefine.fourier.masks.soft_sphere`). The halves' patches are matched by a Hungarian
   assignment on their centres (:func:`match_patches`); ``patches/pNN`` holds matched pair ``NN``,
   numbered in half 1's k-means order: ``mask_half{h}.mrc`` (the half's own mask, the only one its
   alignment sees) and ``mask_eval.mrc`` (their mean, for the per-patch masked FSC only). Why each
   half has its own masks: :mod:`gmmrefine.refine.focused`.
2. ``patches/pNN``: focused refinement of each half against its own mask for ``patch_iterations``
   (paper: 3) iterations, starting from the main refinement's last iteration (poses, half maps, GMMs as
   warm start; symmetry-expanded when the job has a point group). Its iterations are in
   ``patches/pNN/itNNN`` with their own ``state.json``, so patches run one after another or in parallel
   processes (:func:`run_patches`, ``--jobs``) with the same result; then ``pNN/half{h}.mrc``,
   ``pNN/particles.star`` (the patch's refined poses, for RELION or cryoSPARC) and ``pNN/fsc.json``
   (masked FSC of the patch and of the global refinement in the evaluation mask).
3. ``patches/composite``: per half ``sum_i Mask_i Map_i / sum_i Mask_i`` over its own patches' unmasked,
   unfiltered maps and masks, summed in the half's own k-means order, with the global half map where
   the masks leave less than full weight and symmetry re-imposed by mask-weighted averaging over the
   operators (:func:`gmmrefine.refine.composite.composite_map`); ``final/composite_half{h}.mrc``, the
   FSC between the two composites (``final/composite_fsc.json``) and the average low-passed to that
   resolution (``final/composite_map.mrc``; with a point group limited to the box's inscribed sphere
   and averaged over the group once more, see :func:`composite_outputs`).

Multi-body refinement (``--bodies M1 M2 ...``, :func:`setup_bodies`) runs the same steps with the user's
masks as patches ``bNN`` (one per mask, the same mask for both halves, like ``--focus-mask``), then
``patches/motion`` (:func:`body_motion`: each body's rotation and translation relative to the consensus
and their principal components, as ``relion_flex_analyse``) and ``patches/local_resolution``
(:func:`composite_local_resolution`: the composite halves' masked FSC per body and a local-resolution
map). Overlapping masks count the density once: the composite divides by the summed masks. With
subtraction (the default), the bodies run in lock-step (:func:`lockstep`): every body's iteration ``k``
before any body's ``k + 1``, each taking the others out of the images at their poses of iteration
``k - 1`` (:func:`gmmrefine.refine.subtract.lockstep_subtraction`).

Every step writes atomically and is marked done afterwards (patch steps in their own ``state.json``),
and each reads what it needs from files, so ``--continue`` reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from gmmrefine.errors import InputError
from gmmrefine.gmm.masks import kmeans_patches
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.io.atomic import atomic_path, write_json_atomic
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.refine.stage import SubJob

HALVES = (1, 2)
DEFAULT_PATCHES = 8
PATCH_ITERATIONS = 3
PATCH_EDGE_PX = 5.0


def patch_name(index: int) -> str:
    """``pNN`` folder of matched patch pair ``index`` (0-based)."""
    return f"p{index + 1:02d}"


def body_name(index: int) -> str:
    """``bNN`` folder of body ``index`` (0-based, the order of ``--bodies``)."""
    return f"b{index + 1:02d}"


@dataclass
class HalfPatches:
    """One half's patches.

    Attributes:
        labels: ``(N,)`` patch of each Gaussian (k-means order, 0-based).
        centers_A: ``(K, 3)`` cluster centres (mean of their Gaussians' centres), x y z in A from the
            box centre.
        radii_A: ``(K,)`` distance of each cluster's farthest Gaussian centre from its centre.
        counts: ``(K,)`` Gaussians per patch.
    """

    labels: np.ndarray
    centers_A: np.ndarray
    radii_A: np.ndarray
    counts: np.ndarray


def half_patches(gmm: GaussianMixture, k: int, seed: int) -> HalfPatches:
    """k-means of one GMM's centres into ``k`` patches (:func:`gmmrefine.gmm.masks.kmeans_patches`)."""
    labels = kmeans_patches(gmm, k, seed=seed).cpu().numpy()
    xyz = gmm.centers_A.detach().cpu().to(torch.float64).numpy()
    counts = np.bincount(labels, minlength=k)
    centers = np.zeros((k, 3))
    np.add.at(centers, labels, xyz)
    centers /= counts[:, None]
    dist = np.linalg.norm(xyz - centers[labels], axis=1)
    radii = np.zeros(k)
    np.maximum.at(radii, labels, dist)
    return HalfPatches(labels=labels, centers_A=centers, radii_A=radii, counts=counts)


def patch_mask(center_A: np.ndarray, radius_A: float, box: int, apix: float,
               edge_px: float = PATCH_EDGE_PX) -> torch.Tensor:
    """Soft sphere of a patch: 1 within ``radius_A`` of ``center_A`` (x y z from the box centre), a
    raised-cosine edge of ``edge_px`` pixels beyond. ``(D, D, D)`` float32."""
    from gmmrefine.fourier.masks import soft_sphere

    center_px = np.asarray(center_A, dtype=np.float64) / apix + box // 2
    return soft_sphere(box, float(radius_A) / apix, edge_px, center_px=center_px)


def match_patches(centers1_A: np.ndarray, centers2_A: np.ndarray) -> np.ndarray:
    """Pair the halves' patches: ``order[i]`` is half 2's patch matched to half 1's patch ``i``
    (Hungarian assignment minimising the summed centre distances)."""
    from scipy.optimize import linear_sum_assignment

    cost = np.linalg.norm(np.asarray(centers1_A)[:, None] - np.asarray(centers2_A)[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(rows), dtype=np.int64)
    order[rows] = cols
    return order


def check_patch_count(k: int, gmms: dict[int, GaussianMixture], where: str) -> None:
    """InputError unless ``1 <= k <=`` every half's number of Gaussians."""
    for h, gmm in gmms.items():
        if not 1 <= k <= gmm.n:
            raise InputError(f"--patches: expected 1 <= K <= {gmm.n} (the Gaussians of half {h}'s GMM in {where}), "
                             f"got {k}.", field="--patches")


# ------------------------------------------------------------------------------------------------
# Step 1: setup
# ------------------------------------------------------------------------------------------------

def setup_patches(job, start_dir: Path, k: int, box: int, apix: float, *, start_iteration: int,
                  patch_iterations: int, symmetry: str) -> dict:
    """``patches/setup``: per-half k-means, masks and the matching (see the module docstring).

    Returns:
        The plan (``patches/patches.json``).
    """
    plan_path = job.path / "patches" / "patches.json"
    if job.is_done("patches/setup"):
        return json.loads(plan_path.read_text())
    gmms = {h: GaussianMixture.load(start_dir / f"gmm_half{h}.npz") for h in HALVES}
    try:
        check_patch_count(k, gmms, str(start_dir))
    except InputError as err:
        # Only known once the job's GMMs exist: the global refinement stays usable.
        raise InputError(f"{err} The global refinement in {job.path} is complete; run the patches from it with "
                         f"--from-job {job.path} --iterations 0 --patches K.", field="--patches") from None
    seed = job.seed_for("patches/kmeans")  # a user input (the job seed), the same for both halves
    halves = {h: half_patches(gmms[h], k, seed) for h in HALVES}
    order = match_patches(halves[1].centers_A, halves[2].centers_A)
    root = job.dir("patches")
    for h in HALVES:
        with atomic_path(root / f"labels_half{h}.npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, halves[h].labels)
    patches = []
    for i in range(k):
        own = {1: i, 2: int(order[i])}
        d = job.dir("patches", patch_name(i))
        masks = {h: patch_mask(halves[h].centers_A[own[h]], halves[h].radii_A[own[h]], box, apix) for h in HALVES}
        for h in HALVES:
            write_map(d / f"mask_half{h}.mrc", masks[h].numpy(), apix)
        write_map(d / "mask_eval.mrc", (0.5 * (masks[1] + masks[2])).numpy(), apix)
        patches.append({
            "name": patch_name(i),
            "center_distance_A": float(np.linalg.norm(halves[1].centers_A[own[1]] - halves[2].centers_A[own[2]])),
            **{f"half{h}": {"label": own[h], "center_A": halves[h].centers_A[own[h]].tolist(),
                            "radius_A": float(halves[h].radii_A[own[h]]),
                            "n_gaussians": int(halves[h].counts[own[h]])} for h in HALVES}})
    plan = {"k": k, "start_dir": str(start_dir.relative_to(job.path)), "start_iteration": start_iteration,
            "patch_iterations": patch_iterations, "symmetry": symmetry, "edge_px": PATCH_EDGE_PX,
            "patches": patches}
    write_json_atomic(plan_path, plan)
    job.mark_done("patches/setup", k=k)
    job.log(f"patches: {k} per half; matched centres {np.mean([p['center_distance_A'] for p in patches]):.1f} A "
            "apart on average")
    return plan


def setup_bodies(job, start_dir: Path, mask_paths: list[str], box: int, apix: float, *, start_iteration: int,
                 patch_iterations: int, context: str = "subtract", rest_poses: str = "bodies") -> dict:
    """``patches/setup`` of a multi-body refinement (``--bodies``): one patch per user mask, ``bNN`` in the
    order given, each half refined in the same mask (a user input, like ``--focus-mask``).

    The bodies then run as patches do: a focused refinement per body from the global refinement's last
    iteration, for each half on its own (:func:`run_patch`), the rest of the particle handled as
    ``context`` says (``width``: widened Gaussians; ``subtract``: the rest's projection subtracted from the
    images, :mod:`gmmrefine.refine.subtract`), and the composite ``sum_i M_i Map_i / sum_i M_i``
    (:func:`composite_step`), which counts the density where masks overlap once. With ``subtract``,
    ``rest_poses`` says where the rest is: ``bodies``, the other bodies at their own poses of the previous
    iteration, all bodies in lock-step (:func:`lockstep`); ``consensus``, at the consensus poses throughout,
    each body run on its own.

    Returns:
        The plan (``patches/patches.json``).
    """
    from gmmrefine.refine.focused import load_focus_mask

    plan_path = job.path / "patches" / "patches.json"
    if job.is_done("patches/setup"):
        return json.loads(plan_path.read_text())
    patches = []
    for i, path in enumerate(mask_paths):
        mask = load_focus_mask(path, box, apix, option="--bodies")
        d = job.dir("patches", body_name(i))
        for name in ("mask_half1.mrc", "mask_half2.mrc", "mask_eval.mrc"):
            write_map(d / name, mask.numpy(), apix)
        patches.append({"name": body_name(i), "body": True, "mask": str(path),
                        "volume_A3": float(mask.sum()) * apix**3, **{f"half{h}": {"label": i} for h in HALVES}})
    plan = {"k": 0, "bodies": len(patches), "context": context, "rest_poses": rest_poses,
            "start_dir": str(start_dir.relative_to(job.path)),
            "start_iteration": start_iteration, "patch_iterations": patch_iterations, "symmetry": "C1",
            "edge_px": None, "patches": patches}
    write_json_atomic(plan_path, plan)
    job.mark_done("patches/setup", bodies=len(patches))
    how = {"width": "the rest widened", "consensus": "the rest subtracted from the images at the consensus poses",
           "bodies": "the other bodies subtracted from the images at their own poses of the previous iteration "
                     "(lock-step)"}
    job.log(f"bodies: {len(patches)} masks, each refined in its mask for {patch_iterations} iterations per half, "
            + how["width" if context == "width" else rest_poses])
    return plan


def body_motion(job, plan: dict, start_angles_deg: np.ndarray, start_shift_A: np.ndarray) -> dict:
    """``patches/motion``: each body's motion relative to the consensus and its principal components.

    A body's refined pose ``A_b`` is the consensus pose ``A_c`` followed by a motion of the body in the
    map's frame, ``A_b = A_c M``; ``M = A_c^T A_b`` is written as a rotation vector (degrees) and the
    shift change as a translation in the map's frame (``A_c^T (dx, dy, 0)``, angstrom, the depth not
    observed). The principal components are those of every body's six numbers per particle (centred,
    not scaled: degrees and angstrom are both ~1 at these motions), as ``relion_flex_analyse`` gives.
    Analysis only: it runs after both halves' bodies are done and feeds nothing.

    Writes ``patches/motion.json`` (per body mean and sd of the rotation angle and translation, the
    explained variance of each component) and ``patches/motion.npz`` (per particle: ``rotvec_deg (B, N, 3)``,
    ``translation_A (B, N, 3)``, ``scores (N, C)``, ``components (C, 6B)``).
    """
    from scipy.spatial.transform import Rotation

    from gmmrefine.geometry.rotations import euler_to_matrix
    from gmmrefine.io.particles import read_particles

    out_json = job.path / "patches" / "motion.json"
    if job.is_done("patches/motion"):
        return json.loads(out_json.read_text())
    consensus = euler_to_matrix(torch.as_tensor(start_angles_deg, dtype=torch.float64)).numpy()
    rotvecs, translations, bodies = [], [], []
    for p in plan["patches"]:
        if not p.get("body"):
            continue
        ps = read_particles(job.path / "patches" / p["name"] / "particles.star")
        moved = np.einsum("nji,njk->nik", consensus,
                          euler_to_matrix(torch.as_tensor(ps.angles_deg, dtype=torch.float64)).numpy())
        rotvec = np.degrees(Rotation.from_matrix(moved).as_rotvec())
        d_shift = np.concatenate([np.asarray(ps.shift_A) - start_shift_A, np.zeros((len(ps), 1))], axis=1)
        translation = np.einsum("nji,nj->ni", consensus, d_shift)
        rotvecs.append(rotvec)
        translations.append(translation)
        angle = np.linalg.norm(rotvec, axis=1)
        distance = np.linalg.norm(translation, axis=1)
        bodies.append({"name": p["name"], "mean_rotation_deg": float(angle.mean()), "sd_rotation_deg": float(angle.std()),
                       "mean_translation_A": float(distance.mean()), "sd_translation_A": float(distance.std())})
    features = np.concatenate([np.concatenate([r, t], axis=1) for r, t in zip(rotvecs, translations)], axis=1)
    centred = features - features.mean(0)
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    variance = sing**2 / max(len(centred) - 1, 1)
    explained = variance / max(float(variance.sum()), 1e-30)
    with atomic_path(job.path / "patches" / "motion.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, rotvec_deg=np.stack(rotvecs), translation_A=np.stack(translations), scores=centred @ vt.T,
                     components=vt, names=np.array([b["name"] for b in bodies]))
    info = {"bodies": bodies, "explained_variance": explained.tolist(),
            "component_sd": np.sqrt(variance).tolist()}
    write_json_atomic(out_json, info)
    job.mark_done("patches/motion", pc1=float(explained[0]) if len(explained) else None)
    job.log("body motion: " + "; ".join(f"{b['name']} {b['mean_rotation_deg']:.2f} +/- {b['sd_rotation_deg']:.2f} deg, "
                                        f"{b['mean_translation_A']:.2f} +/- {b['sd_translation_A']:.2f} A" for b in bodies)
            + f"; PC1 explains {100 * explained[0]:.0f} %")
    return info


def composite_local_resolution(job, plan: dict, apix: float) -> dict:
    """``patches/local_resolution``: per-region validation of a multi-body composite from its two
    independent halves: the gold-standard FSC of the composite halves in each body's mask (phase-randomised
    correction) and a local-resolution map (``final/composite_local_resolution.mrc``, windows centred in
    any body), with each body's median local resolution; ``patches/local_resolution.json``."""
    from gmmrefine.fourier.local_resolution import local_resolution
    from gmmrefine.refine.focused import masked_resolution

    out_json = job.path / "patches" / "local_resolution.json"
    if job.is_done("patches/local_resolution"):
        return json.loads(out_json.read_text())
    final = job.path / "final"
    halves = [torch.as_tensor(read_map(final / f"composite_half{h}.mrc")[0]) for h in HALVES]
    masks = {p["name"]: torch.as_tensor(read_map(job.path / "patches" / p["name"] / "mask_eval.mrc")[0])
             for p in plan["patches"] if p.get("body")}
    union = torch.stack(list(masks.values())).amax(0)
    local = local_resolution(halves[0], halves[1], apix, mask=union)
    write_map(final / "composite_local_resolution.mrc", local.numpy(), apix)
    seed = job.seed_for("patches/local_resolution")
    bodies = []
    for name, mask in masks.items():
        inside = local[(mask > 0.5) & (local > 0)]
        fsc = masked_resolution(halves[0], halves[1], mask, apix, seed=seed)
        bodies.append({"name": name, "resolution_A": fsc["resolution_A"], "fsc": fsc["fsc"],
                       "frequency_inv_A": fsc["frequency_inv_A"],
                       "median_local_resolution_A": float(inside.median()) if inside.numel() else None})
    info = {"bodies": bodies}
    write_json_atomic(out_json, info)
    job.mark_done("patches/local_resolution")
    job.log("composite per body: " + "; ".join(
        f"{b['name']} {b['resolution_A']:.2f} A (median local {b['median_local_resolution_A'] or float('nan'):.2f} A)"
        for b in bodies))
    return info


# ------------------------------------------------------------------------------------------------
# Step 2: one patch (in this process or a worker)
# ------------------------------------------------------------------------------------------------

def lockstep(plan: dict) -> bool:
    """Whether a plan's bodies run in lock-step: each iteration subtracts the other bodies at their poses
    of the previous one (``--body-rest-poses bodies``), so every body's iteration ``k`` runs before any
    body's ``k + 1``. Plans written before the option hold the rest at the consensus poses."""
    return plan.get("context") == "subtract" and plan.get("rest_poses") == "bodies"


def run_patch(job_path: str | Path, index: int, *, progress: bool = True, until: int | None = None) -> dict | None:
    """Focused refinement of matched patch pair ``index`` and its outputs; everything from files.

    Safe to call again after an interruption (it continues from its own ``state.json``).

    Args:
        until: run only to this iteration (lock-step bodies, :func:`lockstep`: iterations before it must be
            done, as their subtraction differs); the outputs are made once the last iteration is done.

    Returns:
        The patch's ``fsc.json``, or None when ``until`` stopped it before its last iteration.
    """
    from gmmrefine.io.particles import read_particles, write_particles_star
    from gmmrefine.refine.focused import copy_atomic, focus_transform, masked_resolution, stage_particles
    from gmmrefine.refine.global_refine import current_poses, it_dir, run_global_refinement, settings_from_params

    job_path = Path(job_path)
    params = json.loads((job_path / "job.json").read_text())["params"]
    plan = json.loads((job_path / "patches" / "patches.json").read_text())
    name = plan["patches"][index]["name"]
    stage = SubJob(job_path, f"patches/{name}", params, seed_prefix="patches")
    out_json = stage.path / "fsc.json"
    if stage.is_done("outputs"):
        return json.loads(out_json.read_text())
    from gmmrefine.refine.focused import seed_stage

    start_dir = job_path / plan["start_dir"]
    entry = plan["patches"][index]
    if entry.get("particles"):
        # An added patch (``--add-patch``): it starts from its own poses (the domain poses found from each
        # particle's conformation), so its iteration 0 is reconstructed at them; the GMMs still warm-start.
        stage_ps = read_particles(entry["particles"])
        seed_stage(stage, start_dir, maps=False)
    else:
        ps = read_particles(params["particles"], project_dir=params.get("project_dir"))
        angles, shifts = current_poses(SimpleNamespace(path=job_path), ps, int(plan["start_iteration"]))
        stage_ps = stage_particles(ps, plan["symmetry"], angles, shifts)
        seed_stage(stage, start_dir)
    apix = stage_ps.apix
    iterations = int(entry.get("patch_iterations", plan["patch_iterations"]))
    masks = {h: torch.as_tensor(read_map(stage.path / f"mask_half{h}.mrc")[0]) for h in HALVES}
    settings = dataclasses.replace(settings_from_params(params), iterations=iterations,
                                   symmetry="C1", progress=progress)
    t0 = time.perf_counter()
    transform, subtraction = focus_transform(masks, apix), None
    if plan.get("context") == "subtract":
        from gmmrefine.refine.subtract import body_transform, consensus_subtraction, lockstep_subtraction

        transform = body_transform(masks, apix)
        if lockstep(plan):
            until = iterations if until is None else min(until, iterations)
            assert until == 1 or stage.is_done(f"{it_dir(until - 1)}/fsc"), "lock-step: run iterations in order"
            subtraction = lockstep_subtraction(job_path, plan, index, until, masks, apix, stage_ps.angles_deg,
                                               stage_ps.shift_A)
        else:
            subtraction = consensus_subtraction(start_dir, masks, apix, stage_ps.angles_deg, stage_ps.shift_A)
    histories = run_global_refinement(stage, stage_ps, settings, gmm_transform=transform, subtraction=subtraction,
                                      until=until)
    if until is not None and until < iterations:
        return None
    k = histories[-1]["iteration"]
    last = stage.path / it_dir(k)
    for h in HALVES:
        copy_atomic(last / f"half{h}.mrc", stage.path / f"half{h}.mrc")
    final_angles, final_shifts = current_poses(stage, stage_ps, k)
    write_particles_star(stage_ps, stage.path / "particles.star", final_angles, final_shifts,
                         absolute_image_paths=True)
    mask_eval = torch.as_tensor(read_map(stage.path / "mask_eval.mrc")[0])
    maps = {src: [torch.as_tensor(read_map(d / f"half{h}.mrc")[0]) for h in HALVES]
            for src, d in (("global", start_dir), ("patch", last))}
    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg

    change = rotation_angle_deg(euler_to_matrix(torch.as_tensor(stage_ps.angles_deg)),
                                euler_to_matrix(torch.as_tensor(final_angles))).numpy()
    seed = stage.seed_for("fsc")
    info = {"name": name, "iterations": k,
            "seconds": sum(h.get("seconds", 0.0) for h in histories[1:]),
            # a lock-step body ran over several calls, this one its last iteration only: no wall time
            "wall_seconds": None if lockstep(plan) else time.perf_counter() - t0,
            "mean_change_deg": float(change.mean()), "std_change_deg": float(change.std()),
            "global": masked_resolution(maps["global"][0], maps["global"][1], mask_eval, apix, seed=seed),
            "patch": masked_resolution(maps["patch"][0], maps["patch"][1], mask_eval, apix, seed=seed),
            "half_resolution_A": histories[-1]["half_resolution_A"]}
    precision = histories[-1].get("median_precision_deg")
    # A motion smaller than the poses' own precision is not seen in the images: measured on a 4 kDa
    # domain with 150 particles per half (precision 18 deg, moved 2 deg), such a body's map fell below
    # the consensus map in its mask (masked FSC to the truth 0.55-0.62 against 0.70).
    info["median_precision_deg"] = precision
    info["motion_resolved"] = None if precision is None else bool(info["mean_change_deg"] > precision)
    write_json_atomic(out_json, info)
    stage.mark_done("outputs", resolution_A=info["patch"]["resolution_A"])
    stage.log(f"masked resolution {info['global']['resolution_A']:.2f} A (global) -> "
              f"{info['patch']['resolution_A']:.2f} A; poses moved {info['mean_change_deg']:.2f} deg")
    if info["motion_resolved"] is False:
        stage.log(f"WARNING: its poses moved {info['mean_change_deg']:.2f} deg on average, less than their median "
                  f"precision ({precision:.2f} deg): its images do not resolve a motion relative to the consensus, so "
                  "expect no gain over the global map inside its mask (and a loss if it is too small to align)")
    return info


def _init_worker(threads: int) -> None:
    """Worker start: the parent's torch thread count (same arithmetic, so the same bits as in the
    parent) and, on Linux, death with the parent (a killed job leaves no worker writing files)."""
    torch.set_num_threads(threads)
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_patches(job, plan: dict, *, jobs: int = 1, progress: bool = True) -> list[dict]:
    """Step 2 for every patch not yet done, ``jobs`` at a time in worker processes (1: in this one).

    Each worker uses this process's torch thread count, so results are bit-identical to ``jobs = 1``;
    on a machine with C cores set ``OMP_NUM_THREADS`` to about C / jobs for speed.

    Returns:
        Every patch's ``fsc.json``, in ``pNN`` order.
    """
    names = [p["name"] for p in plan["patches"]]
    pending = [i for i in range(len(names)) if not job.is_done(f"patches/{names[i]}")]
    # Lock-step bodies: every body's iteration k before any body's k + 1 (each subtracts the others' k - 1)
    rounds: list[int | None] = list(range(1, int(plan["patch_iterations"]) + 1)) if lockstep(plan) else [None]

    def finished(i: int, info: dict | None) -> None:
        if info is not None:
            job.mark_done(f"patches/{names[i]}", resolution_A=info["patch"]["resolution_A"])

    for until in rounds:
        if jobs <= 1 or len(pending) <= 1:
            for i in pending:
                finished(i, run_patch(job.path, i, progress=progress, until=until))
            continue
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(torch.get_num_threads(),)) as pool:
            futures = {pool.submit(run_patch, str(job.path), i, progress=False, until=until): i for i in pending}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    return [json.loads((job.path / "patches" / p["name"] / "fsc.json").read_text()) for p in plan["patches"]]


def inherit_patches(job, source_job: Path, start_dir: Path, start_iteration: int) -> dict | None:
    """``patches/inherited``: the finished patches of ``source_job`` (the ``--from-job`` job), copied
    into this job (masks, half maps, poses, FSCs) and marked done, so that an added patch joins that
    job's composite; None when the source job made no patches. The composite's fallback becomes this
    job's ``start_dir``."""
    from gmmrefine.refine.focused import copy_atomic

    plan_path = job.path / "patches" / "patches.json"
    if job.is_done("patches/inherited"):
        return json.loads(plan_path.read_text())
    source_plan = source_job / "patches" / "patches.json"
    if not source_plan.is_file() or not (source_job / "final" / "composite_fsc.json").is_file():
        return None
    plan = json.loads(source_plan.read_text())
    for h in HALVES:
        src = source_job / "patches" / f"labels_half{h}.npy"
        if src.is_file():
            copy_atomic(src, job.dir("patches") / src.name)
    for p in plan["patches"]:
        src, dst = source_job / "patches" / p["name"], job.dir("patches", p["name"])
        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in (".mrc", ".json", ".star") and f.name != "state.json":
                copy_atomic(f, dst / f.name)
    plan = plan | {"start_dir": str(start_dir.relative_to(job.path)), "start_iteration": start_iteration,
                   "inherited_from": str(source_job)}
    write_json_atomic(plan_path, plan)
    for p in plan["patches"]:
        job.mark_done(f"patches/{p['name']}", copied_from=str(source_job))
    job.mark_done("patches/inherited", k=len(plan["patches"]))
    job.log(f"patches: {len(plan['patches'])} taken from {source_job}")
    return plan


def hetero_domain(hjob: Path, particles: Path, n_particles: int) -> tuple[Path, Path]:
    """``(particles_domain.star, mask)`` of a finished ``gmmrefine hetero --mask`` job run on
    ``particles``, or InputError naming what is missing."""
    hjob = Path(hjob)
    try:
        params = json.loads((hjob / "job.json").read_text())["params"]
    except (OSError, KeyError, ValueError):
        raise InputError(f"{hjob}: --add-patch needs a gmmrefine hetero output folder (job.json); none was found.",
                         path=str(hjob), field="--add-patch") from None
    star = hjob / "particles_domain.star"
    if not params.get("mask") or not star.is_file():
        raise InputError(f"{hjob}: --add-patch needs a hetero run with --mask (its particles_domain.star, the "
                         "domain poses); this one has none.", path=str(hjob), field="--add-patch")
    mask = Path(params["mask"])
    if not mask.is_file():
        raise InputError(f"{mask}: the mask of hetero job {hjob} is gone; --add-patch refines in that mask.",
                         path=str(mask), field="--add-patch")
    from gmmrefine.refine.job_outputs import job_inputs

    source = job_inputs(params["job"]).particles if params.get("job") else params.get("particles")
    if source is None or Path(source).resolve() != Path(particles).resolve():
        raise InputError(f"{hjob}: --add-patch: that hetero job was run on {source}, not on this job's particles "
                         f"({particles}); run it with --job on the --from-job job.", path=str(hjob),
                         field="--add-patch")
    from gmmrefine.io.star import read_star

    rows = len(read_star(star)["particles"])
    if rows != n_particles:
        raise InputError(f"{star}: {rows} particles, expected {n_particles} (one per particle of {particles}).",
                         path=str(star), field="particles")
    return star, mask


def add_domain_patch(job, plan: dict | None, hjob: Path, star: Path, mask_path: Path, start_dir: Path, *,
                     start_iteration: int, patch_iterations: int, box: int, apix: float) -> dict:
    """``patches/added``: one more patch, the domain of a ``gmmrefine hetero --mask`` job: its focused
    refinement starts from the domain poses found from each particle's conformation
    (``particles_domain.star``) with that mask for both halves (a user input, like ``--focus-mask``);
    in the composite it replaces the other patches inside its mask (:func:`composite_step`)."""
    from gmmrefine.refine.focused import load_focus_mask

    plan_path = job.path / "patches" / "patches.json"
    if job.is_done("patches/added"):
        return json.loads(plan_path.read_text())
    if plan is None:
        plan = {"k": 0, "start_dir": str(start_dir.relative_to(job.path)), "start_iteration": start_iteration,
                "patch_iterations": patch_iterations, "symmetry": "C1", "edge_px": None, "patches": []}
    mask = load_focus_mask(mask_path, box, apix, option="--add-patch")
    index = len(plan["patches"])
    d = job.dir("patches", patch_name(index))
    for name in ("mask_half1.mrc", "mask_half2.mrc", "mask_eval.mrc"):
        write_map(d / name, mask.numpy(), apix)
    entry = {"name": patch_name(index), "added": True, "hetero_job": str(hjob), "particles": str(star),
             "mask": str(mask_path), "patch_iterations": patch_iterations,
             **{f"half{h}": {"label": index} for h in HALVES}}
    plan = plan | {"patches": [*plan["patches"], entry]}
    write_json_atomic(plan_path, plan)
    job.mark_done("patches/added", name=entry["name"])
    job.log(f"patches: {entry['name']} added, the domain of {hjob} from its conformation-to-pose poses")
    return plan


# ------------------------------------------------------------------------------------------------
# Step 3: composite
# ------------------------------------------------------------------------------------------------

def composite_step(job, plan: dict, apix: float) -> dict:
    """``patches/composite``: the composite half maps, their FSC and the filtered average (``final/``)."""
    from gmmrefine.refine.composite import composite_map

    d = job.dir("final")
    out_json = d / "composite_fsc.json"
    if job.is_done("patches/composite"):
        return json.loads(out_json.read_text())
    t0 = time.perf_counter()
    start_dir = job.path / plan["start_dir"]

    def load(p: dict, name: str) -> torch.Tensor:
        return torch.as_tensor(read_map(job.path / "patches" / p["name"] / name)[0])

    for h in HALVES:
        # The half's own patches in its own k-means order (the summation order must not depend on the
        # other half either).
        mine = sorted((p for p in plan["patches"] if not p.get("added")), key=lambda p: p[f"half{h}"]["label"])
        fallback = torch.as_tensor(read_map(start_dir / f"half{h}.mrc")[0])
        composite = (composite_map([load(p, f"half{h}.mrc") for p in mine],
                                   [load(p, f"mask_half{h}.mrc") for p in mine], fallback, symmetry=plan["symmetry"])
                     if mine else fallback.to(torch.float32))
        for p in (p for p in plan["patches"] if p.get("added")):
            # An added domain patch replaces the composite inside its mask rather than being averaged with
            # the k-means patches there: those were aligned to the consensus domain, and a domain that
            # moves by 10-15 degrees is blurred in them (averaging would bring the blur back).
            mask = load(p, f"mask_half{h}.mrc")
            composite = mask * load(p, f"half{h}.mrc") + (1.0 - mask) * composite
        write_map(d / f"composite_half{h}.mrc", composite.numpy(), apix)
    info = composite_outputs(job, "composite", plan["symmetry"], apix, start_dir=start_dir)
    info["seconds"] = time.perf_counter() - t0
    write_json_atomic(out_json, info)
    job.mark_done("patches/composite", resolution_A=info["resolution_A"])
    what = "bodies" if plan.get("bodies") else "patches"
    job.log(f"composite of {len(plan['patches'])} {what}: resolution {info['resolution_A']:.2f} A (global "
            f"{info['start_resolution_A']:.2f} A)")
    return info


def composite_outputs(job, prefix: str, symmetry: str, apix: float, *, start_dir: Path) -> dict:
    """FSC of ``final/{prefix}_half1/2.mrc``, the filtered average ``final/{prefix}_map.mrc``, and the
    start's FSC for comparison; with a point group, the filtered map's symmetry error."""
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at, shell_frequencies
    from gmmrefine.geometry.symmetry import symmetry_operators
    from gmmrefine.refine.composite import symmetry_error

    d = job.path / "final"
    halves = [torch.as_tensor(read_map(d / f"{prefix}_half{h}.mrc")[0]) for h in HALVES]
    box = halves[0].shape[-1]
    curve = fourier_shell_correlation(halves[0], halves[1])
    res = resolution_at(curve, box, apix, 0.143)
    start = [torch.as_tensor(read_map(start_dir / f"half{h}.mrc")[0]) for h in HALVES]
    start_curve = fourier_shell_correlation(start[0], start[1])
    start_res = resolution_at(start_curve, box, apix, 0.143)
    full = low_pass(0.5 * (halves[0] + halves[1]), res, apix)
    point_group = symmetry_operators(symmetry).shape[0] > 1
    if point_group:
        from gmmrefine.fourier.masks import soft_sphere
        from gmmrefine.geometry.symmetry import symmetrize_map

        # The filtered map within the box's inscribed sphere (cosine edge from D/2 - 4 to D/2 - 1 px),
        # averaged over the group once more there: the noise near the box faces is what no rotation
        # keeps in the box, and what the interpolation and the filter carried inside (C3 test: symmetry
        # error 2.6e-4 -> 5.9e-5 of the peak, blur 1.5 px; the noise-free map measures 7e-5). The half maps,
        # and so every FSC, keep the whole box.
        inside = soft_sphere(box, box / 2 - 4, 3.0).to(full.dtype)
        full = symmetrize_map(full * inside, symmetry)
    write_map(d / f"{prefix}_map.mrc", full.numpy(), apix)
    info = {"resolution_A": res, "fsc": curve.tolist(), "frequency_inv_A": shell_frequencies(box, apix).tolist(),
            "start_resolution_A": start_res, "start_fsc": start_curve.tolist(),
            "symmetry": symmetry}
    if point_group:
        from gmmrefine.fourier.masks import radius_grid

        inner = radius_grid(box) < box / 2 - 4
        info["symmetry_error_of_map"] = symmetry_error(full, symmetry, inner)
        info["symmetry_error_of_map_blur1.5px"] = symmetry_error(full, symmetry, inner, blur_px=1.5)
        # the start map as it is (a reconstruction symmetrised in Fourier space), within the same sphere
        start_map = low_pass(0.5 * (start[0] + start[1]), start_res, apix) * inside
        info["symmetry_error_of_start_map_blur1.5px"] = symmetry_error(start_map, symmetry, inner, blur_px=1.5)
    return info

"""Gold-standard global GMM refinement: the iteration loop, one half set at a time.

Per iteration ``k`` and per half ``h`` (each half on its own; they meet only in the reported FSC):

1. ``itK/half{h}/gmm``: low-pass the half map of the previous step to that half's own resolution
   estimate and build its GMM there (warm-started from the previous GMM after the first iteration).
2. ``itK/half{h}/refine``: stream the half's particles in chunks; refine each particle's rotation and
   shift against the GMM over the band ``[minres, resolution]`` (:func:`gmmrefine.refine.poses.refine_poses`),
   and insert it at its new pose into two accumulators (the half's even and odd particles); the half
   map is their sum; their FSC, corrected to the size of a half set (``2 c / (1 + c)``), is the half's
   resolution estimate for the next band.
3. ``itK/fsc``: gold-standard FSC between the half maps, ``particles.star``; with ``--iterations auto``
   the decision to go on (:func:`convergence`).

After the last iteration: ``itK/full_maps`` (full-size half maps, :func:`full_size_maps`) and
``itK/precision`` (:func:`calibrate_precision`): once the halves have met in the FSC, a sample of each
half is refined against the other half's GMM to add the reference's error to the pose precision of
``final/particles.star``; no pose or map changes.

**Work follows the band, not the box.** Every iteration runs on a Fourier grid cropped to its band plus
a margin (:func:`working_box`: 90 px for a 9.8 A band in a 256-px box at 1 A/px): each block's spectra
are cropped once, before CTFs, comparison and insertion; the half and quarter maps, the FSCs and the
GMM fits are on that grid (``itK/half{h}.mrc`` has its pixel size). The start's maps are made on a grid
of :data:`START_FSC_BOXES` px, and the user's full-size maps once, at the final poses
(:func:`full_size_maps`; every iteration with ``--full-maps``). Measured at box 256, 400 particles
(adk O assembly): an iteration 4-6 s instead of 710 s, ``refine --iterations 1`` 112 s instead of
1,234 s; at box 512 the job's peak RSS is 14.4 GB.

Why a per-half resolution estimate instead of the gold-standard one: the band and the low-pass of
half 1 must not depend on half 2's particles, or half 1's results would change with half 2's data
(a test changes only half 2 and requires bit-identical half-1 outputs). The quarter-map estimate
depends on the half's own particles only, and so does each half's working grid.

Every step writes its outputs atomically and is marked done in ``state.json`` afterwards; every step
reads what it needs from the files of earlier steps, so a resumed run computes exactly what an
uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from gmmrefine.devices import upload
from gmmrefine.fourier.filters import low_pass
from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at, shell_frequencies
from gmmrefine.geometry.rotations import euler_to_matrix, matrix_to_euler, rotation_angle_deg
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import fourier_band
from gmmrefine.io.atomic import atomic_path, write_json_atomic
from gmmrefine.io.mrc import read_map, write_map
from gmmrefine.refine.poses import (
    DEFAULT_BATCH,
    DEFAULT_PRIOR_A,
    DEFAULT_PRIOR_DEG,
    PoseSettings,
    batch_for_memory,
    free_memory_bytes,
    particle_band,
    pose_precision,
    refine_poses,
    ring_correlations_at,
)

HALVES = (1, 2)
CTF_COMPARISONS = ("flip", "full")


@dataclass(frozen=True)
class RefineSettings:
    """Settings of a global refinement (the CLI's options).

    Attributes:
        iterations: refinement iterations; None: until converged (:func:`convergence`), at most
            ``max_iterations``.
        max_iterations: the most iterations when ``iterations`` is None.
        resolution_start_A: band limit of the first iteration; None measures it per half from the
            input poses.
        minres_A: low-resolution end of the FRC band.
        chunk: particles read and refined at a time (memory).
        ctf: ``"flip"`` compares GMM projections with phase-flipped particles (the paper's);
            ``"full"`` multiplies the projections by the CTF and compares with the particles as they are.
        reconstruct_ctf: CTF handling of the reconstructions (``"wiener"``: ``CTF F`` over ``CTF^2``,
            as ``relion_reconstruct --ctf``; ``"flip"``).
        pose: optimiser settings.
        gmm_steps: Adam steps of the first GMM fit (:func:`gmmrefine.gmm.build.build_gmm`); every later fit,
            warm-started or seeded afresh after N grew, takes a third (:data:`WARM_STEP_FRACTION`).
        device: torch device of the hot paths.
        progress: progress bars on a terminal.
        checkpoint_dir: where an interrupted half pass leaves its checkpoint (None: nowhere; the pass
            then restarts from its beginning).
        symmetry: point group imposed on every reconstruction (``C1``: none; see
            :func:`gmmrefine.reconstruct.invert.symmetry_matrices`).
        full_maps: reconstruct every iteration at the particles' box (else on the working grid: the
            last of a fixed number of iterations at full size, and with ``iterations=None`` the last
            iteration's poses once more at full size when it has converged).
    """

    iterations: int | None = 5
    max_iterations: int = 10
    resolution_start_A: float | None = None
    minres_A: float = 50.0
    chunk: int = 20000
    ctf: str = "full"
    reconstruct_ctf: str = "wiener"
    pose: PoseSettings = field(default_factory=PoseSettings)
    gmm_steps: int = 150
    device: str = "cpu"
    progress: bool = True
    checkpoint_dir: str | None = None
    symmetry: str = "C1"
    full_maps: bool = False


def quarter_labels(subset: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """``(N,)`` 1 or 2: alternate particles within each half (in input order) for per-half FSCs.

    ``groups`` ``(N,)`` (e.g. the input particle of each row of a symmetry-expanded set) keeps rows of
    one group in one quarter, so the quarter maps never share an image's noise; groups alternate in
    the order they first appear.
    """
    labels = np.zeros(len(subset), dtype=np.int64)
    for h in HALVES:
        idx = np.flatnonzero(subset == h)
        if groups is None:
            labels[idx] = np.arange(len(idx)) % 2 + 1
            continue
        _, first, inverse = np.unique(np.asarray(groups)[idx], return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        labels[idx] = rank[inverse] % 2 + 1
    return labels


def half_set_fsc(quarter_fsc: torch.Tensor) -> torch.Tensor:
    """FSC expected between two maps of twice the particles (Spearman-Brown: ``2 c / (1 + c)``)."""
    c = quarter_fsc.clamp(min=-0.99)
    return 2 * c / (1 + c)


def it_dir(k: int) -> str:
    return f"it{k:03d}"


# ------------------------------------------------------------------------------------------------
# One half: stream chunks, optionally refine them, and reconstruct
# ------------------------------------------------------------------------------------------------

@dataclass
class HalfPass:
    """What one pass over a half's particles produced.

    Attributes:
        indices: ``(n,)`` particle indices of the half (input order).
        angles_deg, shift_A: ``(n, 3)``, ``(n, 2)`` poses after the pass (float64).
        frc_start, frc_end: ``(n,)`` band FRC before and after refinement (NaN without refinement).
        precision_deg, precision_A: ``(n,)`` expected angular and shift error of each refined pose
            (:func:`gmmrefine.refine.poses.pose_precision`; NaN without the Newton optimiser).
        half_map: ``(D, D, D)`` float32 map of the half at the new poses.
        quarter_fsc: ``(D//2+1,)`` FSC between the half's even and odd particles' maps (None: not made).
        seconds: wall time of the pass.
        apix: pixel size (A/px).
        batch: particles per pose batch it used.
        resumed_rows: particles of the half whose results came from a checkpoint (all ranks).
        ring_snr: ``(R,)`` per-ring SNR the objective was weighted by (:mod:`gmmrefine.refine.snr`),
            with ``ring_shell`` ``(R,)`` the integer Fourier shell of each ring; None if not measured.
    """

    indices: np.ndarray
    angles_deg: np.ndarray
    shift_A: np.ndarray
    frc_start: np.ndarray
    frc_end: np.ndarray
    half_map: torch.Tensor
    quarter_fsc: torch.Tensor | None
    seconds: float
    apix: float
    batch: int = DEFAULT_BATCH
    resumed_rows: int = 0
    precision_deg: np.ndarray | None = None
    precision_A: np.ndarray | None = None
    ring_snr: np.ndarray | None = None
    ring_shell: np.ndarray | None = None

    @property
    def resolution_A(self) -> float:
        """Resolution estimate of the half map alone (corrected quarter FSC at 0.143), on the quarter
        maps' grid (which may be smaller than the half map's)."""
        assert self.quarter_fsc is not None, "a pass without quarter maps has no resolution estimate"
        fsc_box = 2 * (len(self.quarter_fsc) - 1)
        return resolution_at(half_set_fsc(self.quarter_fsc), fsc_box, self.apix * self.half_map.shape[-1] / fsc_box,
                             0.143)


def half_pass(ps, half: int, angles_deg: np.ndarray, shift_A: np.ndarray, settings: RefineSettings, *,
              gmm: GaussianMixture | None = None, maxres_A: float | None = None, desc: str = "",
              work_box: int | None = None, map_box: int | None = None, fsc_box: int | None = None,
              quarters: bool = True, subtract=None) -> HalfPass | None:
    """Read the particles of ``half`` in chunks, refine their poses against ``gmm`` (if given) and
    reconstruct the half at the resulting poses.

    Work follows the band, not the box: each block's images are transformed once and their spectra
    Fourier-cropped to ``work_box`` (:func:`gmmrefine.fourier.fft.crop_projection_spectra`) before CTFs,
    comparison and insertion, and the half is reconstructed on that smaller grid (pixel size
    ``apix * box / work_box``), or on ``map_box`` when a bigger map is wanted. The quarter maps (the
    half's own resolution estimate, :func:`quarter_maps`) are made on the same grid, or, with a
    ``fsc_box`` smaller than ``map_box``, on their own small grids beside one full-size half
    accumulator, so that a full-size pass holds one full-size grid pair, not two.

    The half's particles (input order) are processed in blocks of whole pose batches
    (:func:`block_rows`): a block's CTFs and band coefficients are made, its poses refined and its images
    inserted before the next block starts, so memory does not grow with the chunk or the half, and
    block boundaries are the safe points where a stop signal is honoured (a checkpoint of the partial
    accumulators and poses is written under ``settings.checkpoint_dir``; the same call resumes from it,
    bit-identically). Images are read from disk ``chunk_rows`` at a time, one reader per chunk, so no
    page of the memory-mapped stacks stays mapped after its chunk.

    With several processes (:mod:`gmmrefine.distributed`), rank 0 calls this function and sends its
    arguments to the other ranks, which run it too; each rank takes its shard of the half's blocks
    (:func:`gmmrefine.distributed.shard`), the accumulators are summed by all-reduce and the poses
    gathered, and rank 0 alone makes the maps. Particles never interact, and shards are whole blocks,
    so every particle is refined exactly as in a single process; the maps differ only in the order the
    accumulators were summed.

    Args:
        ps: :class:`~gmmrefine.io.particles.ParticleSet`.
        half: 1 or 2.
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` current poses of all particles (only this half's
            rows are read).
        settings: refinement settings.
        gmm: the half's GMM; None reconstructs at the given poses without refining.
        maxres_A: high-resolution end of the band (needed with ``gmm``).
        desc: progress bar label.
        work_box: even box (px) of the cropped spectra the poses are refined on (None: ``map_box``);
            its Nyquist must reach ``maxres_A``.
        map_box: even box of the reconstruction, ``work_box <= map_box <= box`` (None: ``work_box``, else
            the box).
        fsc_box: even box of the quarter maps, at most ``map_box`` (None: ``map_box``); the estimate
            cannot pass its Nyquist.
        quarters: False makes the half map alone (no quarter maps, ``quarter_fsc`` None): a pass whose
            poses already have their resolution estimate (:func:`full_size_maps`).
        subtract: a body's :class:`~gmmrefine.refine.subtract.Subtraction` of this half (with ``gmm``): the
            rest's projection at the consensus poses is taken out of every compared image (and of the SNR
            sample); images are inserted as they are.

    Returns:
        :class:`HalfPass` (None on ranks other than 0), its map at ``map_box``.

    Raises:
        gmmrefine.distributed.Interrupted: a stop signal arrived; the checkpoint is written.
    """
    task = dict(locals())  # first: exactly the arguments, which the other ranks get as they are
    from tqdm import tqdm

    from gmmrefine import distributed
    from gmmrefine.fourier.fft import crop_projection_spectra, rfft2_centered
    from gmmrefine.io.particles import read_images
    from gmmrefine.reconstruct.insert import FourierAccumulator
    from gmmrefine.reconstruct.invert import (
        PIPE_MENON_ITERATIONS,
        _ctf_of,
        accumulate_images,
        grid_device,
        reconstruct_map,
        release_free_memory,
        symmetry_matrices,
    )

    ctx = distributed.current()
    if ctx.active and ctx.is_main:
        task.pop("ps")
        if gmm is not None:
            task["gmm"] = gmm.to(device="cpu")
        if subtract is not None:
            task["subtract"] = subtract.to("cpu")
        distributed.send_task("half_pass", task)
    device = torch.device(settings.device)
    t_start = time.perf_counter()
    map_box = int(map_box or work_box or ps.box)
    work_box = int(work_box or map_box)
    if not (work_box <= map_box <= ps.box and work_box % 2 == 0 and map_box % 2 == 0):
        raise ValueError(f"need even work_box <= map_box <= box, got {work_box}, {map_box}, {ps.box}")
    fsc_box = min(int(fsc_box or map_box), map_box)
    work_apix, map_apix = ps.apix * ps.box / work_box, ps.apix * ps.box / map_box
    indices = ps.half(half)
    labels_all = quarter_labels(np.asarray(ps.subset), getattr(ps, "source_index", None))
    symmetry = symmetry_matrices(settings.symmetry)
    n = len(indices)
    new_angles = np.array(angles_deg[indices], dtype=np.float64)
    new_shift = np.array(shift_A[indices], dtype=np.float64)
    frc_start = np.full(n, np.nan)
    frc_end = np.full(n, np.nan)
    precision_deg = np.full(n, np.nan)
    precision_A = np.full(n, np.nan)
    band = None
    ring_snr = None
    pose = settings.pose
    if gmm is not None:
        assert maxres_A is not None, "half_pass: a GMM needs maxres_A"
        band = fourier_band(work_box, work_apix, settings.minres_A, maxres_A, device=device)
        gmm = gmm.to(device=device, dtype=torch.float32)
        pose = resolve_batch(pose, device, gmm.n, band, ps.box)
        assert pose.batch is not None  # resolve_batch sets it
        if ctx.active:  # every rank must cut the same blocks: the batch the tightest GPU allows
            pose = dataclasses.replace(pose, batch=distributed.all_min(pose.batch))
        if subtract is not None:
            from gmmrefine.refine.subtract import measure_scale

            subtract = subtract.to(device)
            subtract.scale = measure_scale(ps, indices, subtract, band, settings.ctf, device)
        if pose.needs_snr:
            # Every rank measures the same sample, so each particle is refined as in one process.
            ring_snr = measure_ring_snr(ps, indices, new_angles, new_shift, gmm, band, settings.ctf, device,
                                        subtract)
    block = block_rows(pose.batch or DEFAULT_BATCH, ps.box)
    chunk = chunk_rows(settings.chunk, ps.box, block)
    lo, hi = distributed.shard(n, block)
    my_blocks = [(s, min(s + block, hi)) for s in range(lo, hi, block)]
    n_steps = distributed.max_blocks(n, block)
    # Grids alive at once: two quarter grids at fsc_box (unless quarters=False) and, when it is smaller
    # or there are no quarters, one at map_box; each is inverted alone
    # (:func:`gmmrefine.reconstruct.invert.map_bytes`), the first quarter's inverse weights (4 of the 50
    # bytes per voxel the two quarters are planned at) kept while the second is made for the half map
    # (:func:`quarter_maps`). Several processes sum them by all-reduce on the
    # device (NCCL takes GPU tensors only), so they stay there.
    boxes = ([fsc_box, fsc_box] if quarters else []) + ([map_box] if fsc_box < map_box or not quarters else [])
    grids = device if ctx.active else grid_device(device, boxes)
    accs = {q: FourierAccumulator(fsc_box, device=grids) for q in ((1, 2) if quarters else ())}
    if fsc_box < map_box or not quarters:
        accs[0] = FourierAccumulator(map_box, device=grids)
    arrays = (new_angles, new_shift, frc_start, frc_end, precision_deg, precision_A)
    ckpt = None
    if settings.checkpoint_dir is not None:
        key = pass_key(ps, half, angles_deg, shift_A, gmm, maxres_A, settings, pose, (work_box, map_box, fsc_box, quarters),
                       subtract)
        ckpt = Path(settings.checkpoint_dir) / f"{key}.rank{ctx.rank}of{ctx.world_size}.pt"
    first = _resume(ckpt, accs, arrays, lo, hi, grids)
    shards = [distributed.shard(n, block, r, ctx.world_size) for r in range(ctx.world_size)]
    resumed = sum(min(a + first * block, b) - a for a, b in shards)

    def blocks():
        bar = tqdm(total=hi - lo, initial=min(first * block, hi - lo), desc=desc or f"half {half}", unit="particle",
                   disable=None if settings.progress else True)
        images, img_lo, img_hi = None, lo, lo
        try:
            for step in range(first, n_steps):
                # A safe point: the blocks before it are inserted, the ones after it untouched.
                if distributed.stop_agreed():
                    done_rows = min(lo + step * block, hi) - lo
                    if ckpt is not None and step > first:  # (at ``first`` the checkpoint, if any, is on disk)
                        _save_checkpoint(ckpt, accs, arrays, lo, hi, step)
                    raise distributed.Interrupted(
                        f"{desc or f'half {half}'}: stopped by a signal after {done_rows} of this process's "
                        f"{hi - lo} particles" + ("; checkpoint written" if ckpt is not None else ""))
                if step >= len(my_blocks):
                    continue  # this rank's shard is one block shorter than the longest
                s, e = my_blocks[step]
                if e > img_hi:
                    # One reader per chunk: its memory maps close with it.
                    img_lo, img_hi = s, min(s + chunk, hi)
                    images = None
                    images = read_images(ps, indices[img_lo:img_hi])
                rows = np.arange(s, e)
                idx = indices[rows]
                # One transform per image at the full box; everything after works on cropped spectra.
                spectra = rfft2_centered(upload(images[s - img_lo:e - img_lo], device))
                spec = crop_projection_spectra(spectra, map_box)
                ctf = _ctf_of(ps, idx, device, box=map_box, apix=map_apix)
                del spectra
                matrices = euler_to_matrix(torch.as_tensor(new_angles[rows], device=device)).to(torch.float32)
                shifts = torch.as_tensor(new_shift[rows], device=device, dtype=torch.float64)
                if gmm is not None:
                    t0 = image_translation_px(shifts, work_apix).to(torch.float32)
                    work_spec, work_ctf = spec, ctf
                    if work_box != map_box:
                        work_spec = crop_projection_spectra(spec, work_box)
                        work_ctf = _ctf_of(ps, idx, device, box=work_box, apix=work_apix)
                    target, ctf_band, rho = comparison_inputs(work_spec, work_ctf, band, settings.ctf, ring_snr)
                    if subtract is not None:
                        from gmmrefine.refine.subtract import subtract_rest

                        target = subtract_rest(target, band.gather(work_ctf), subtract, idx, band, settings.ctf)
                    res = refine_poses(gmm, target, matrices, t0, band, pose, ctf=ctf_band, rho=rho)
                    matrices = res.rotations
                    # origin = -translation * apix; keep float64 where the float32 update adds nothing.
                    shifts = shifts - (res.translation_px.to(torch.float64) - t0.to(torch.float64)) * work_apix
                    new_angles[rows] = matrix_to_euler(matrices.to(torch.float64)).cpu().numpy()
                    new_shift[rows] = shifts.cpu().numpy()
                    frc_start[rows] = res.frc_start.cpu().numpy()
                    frc_end[rows] = res.frc_end.cpu().numpy()
                    if res.covariance is not None:
                        deg, ang = pose_precision(res.covariance, work_apix)  # translations are in working pixels
                        precision_deg[rows] = deg.cpu().numpy()
                        precision_A[rows] = ang.cpu().numpy()
                    # Insert at the pose as it will be stored (Euler angles), so a reconstruction
                    # from the written STAR file is the same map.
                    matrices = euler_to_matrix(torch.as_tensor(new_angles[rows], device=device)).to(torch.float32)
                yield spec, matrices, shifts.to(torch.float32), ctf, torch.as_tensor(labels_all[idx])
                bar.update(len(idx))
        finally:
            bar.close()

    accs = accumulate_images(blocks(), map_box, map_apix, ctf_mode=settings.reconstruct_ctf, device=grids,
                             accs=accs)
    if ctx.active:
        distributed.sum_accumulators_(accs)
        for a, b, *parts in distributed.all_gather_object((lo, hi, *(x[lo:hi] for x in arrays))):
            for x, part in zip(arrays, parts):
                x[a:b] = part
        distributed.task_done()
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
        if ctx.is_main:  # left by an interrupted run with another number of processes
            for stale in ckpt.parent.glob(f"{key}.rank*.pt"):
                stale.unlink(missing_ok=True)
    if not ctx.is_main:
        return None
    # A half on its own grid (accs[0]) makes its own iteration, from 1; otherwise it continues the quarters'.
    quarter, start = (quarter_maps(accs[1], accs[2], symmetry=symmetry, for_half=0 not in accs) if quarters
                      else (None, None))
    whole = accs.pop(0) if 0 in accs else accs[1].add_(accs.pop(2))
    accs.clear()
    release_free_memory()
    done_iterations = QUARTER_PM_ITERATIONS if start is not None else 0
    half_map = reconstruct_map(whole, consume=True, symmetry=symmetry, inverse_start=start,
                               preweight_iterations=PIPE_MENON_ITERATIONS - done_iterations).cpu()
    del whole, start
    release_free_memory()
    return HalfPass(indices=indices, angles_deg=new_angles, shift_A=new_shift, frc_start=frc_start,
                    frc_end=frc_end, half_map=half_map, quarter_fsc=quarter, seconds=time.perf_counter() - t_start,
                    apix=map_apix, batch=int(pose.batch or DEFAULT_BATCH), resumed_rows=resumed,
                    precision_deg=precision_deg, precision_A=precision_A,
                    ring_snr=None if ring_snr is None else ring_snr.cpu().numpy(),
                    ring_shell=None if band is None else band.shell.cpu().numpy())


#: Particles of a half whose ring correlations set the per-ring SNR (spread evenly over the half).
SNR_SAMPLE = 1000


def comparison_inputs(images: torch.Tensor, ctf: torch.Tensor, band, ctf_mode: str,
                      ring_snr: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """What the optimiser compares for a block of particles.

    Args:
        images: ``(B, D, D)`` images or their ``(B, D, D//2+1)`` complex spectra (:func:`particle_band`);
            ctf: ``(B, D, D//2+1)``; band: the band (of box ``D``); ctf_mode: ``"flip"`` or ``"full"``.
        ring_snr: ``(R,)`` per-ring SNR (:func:`measure_ring_snr`), or None.

    Returns:
        ``(target (B, P), ctf_band (B, P) or None, rho (B, R) or None)``: the band coefficients (phase
        flipped with ``flip``), the CTF the projections are multiplied by (``full``), and the expected
        ring correlations (:func:`gmmrefine.refine.snr.expected_correlation`) when ``ring_snr`` is given.
    """
    from gmmrefine.refine.snr import expected_correlation, ring_ctf_moments

    full = band.gather(ctf)
    target = particle_band(images, band) if ctf_mode == "full" else particle_band(images, band, ctf)
    rho = None
    if ring_snr is not None:
        m1, m2 = ring_ctf_moments(full, band.ring_index, band.n_rings)
        rho = expected_correlation(ring_snr, m1, m2, ctf_mode)
    return target, (full if ctf_mode == "full" else None), rho


def sample_rows(n: int, size: int = SNR_SAMPLE) -> np.ndarray:
    """``size`` rows of a half (``0..n-1``) spread evenly: the particles a measurement uses."""
    return np.unique(np.linspace(0, n - 1, min(n, size)).round().astype(np.int64))


#: Particles of a half refined against the other half's reference to measure its reference error
#: (:func:`reference_spread`): the factor's statistical error is about 2 % at 500.
PRECISION_SAMPLE = 500


@dataclass
class SampleBlock:
    """A block of sampled particles as the optimiser sees them (:func:`_sample_blocks`).

    Attributes:
        rows: ``(B,)`` rows of the half's index array; target: ``(B, P)`` compared coefficients (the rest
            subtracted with a :class:`~gmmrefine.refine.subtract.Subtraction`); ctf_band: ``(B, P)`` CTF
            multiplying the projections (``full``) or None; ctf_full: ``(B, P)`` the CTF in the band;
            m1, m2: ring CTF moments; rotations: ``(B, 3, 3)``; translation_px: ``(B, 2)``.
    """

    rows: np.ndarray
    target: torch.Tensor
    ctf_band: torch.Tensor | None
    ctf_full: torch.Tensor
    m1: torch.Tensor
    m2: torch.Tensor
    rotations: torch.Tensor
    translation_px: torch.Tensor


def _sample_blocks(ps, indices: np.ndarray, rows: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray, band,
                   ctf_mode: str, device, subtract=None):
    """Yield a :class:`SampleBlock` for the particles ``indices[rows]`` at poses ``angles_deg[rows],
    shift_A[rows]``, at most :data:`CHUNK_BYTES` of images at a time; with ``subtract``
    (:class:`~gmmrefine.refine.subtract.Subtraction`, its scale measured) the rest's projection is taken
    out of the targets."""
    from gmmrefine.fourier.fft import crop_projection_spectra, rfft2_centered
    from gmmrefine.io.particles import read_images
    from gmmrefine.reconstruct.invert import _ctf_of
    from gmmrefine.refine.snr import ring_ctf_moments
    from gmmrefine.refine.subtract import subtract_rest

    step = max(1, CHUNK_BYTES // (ps.box * ps.box * 4))
    for s in range(0, len(rows), step):
        part = rows[s:s + step]
        idx = indices[part]
        spectra = crop_projection_spectra(rfft2_centered(upload(read_images(ps, idx), device)), band.box)
        ctf = _ctf_of(ps, idx, device, box=band.box, apix=band.apix)
        target, ctf_band, _ = comparison_inputs(spectra, ctf, band, ctf_mode, None)
        ctf_full = band.gather(ctf)
        if subtract is not None:
            target = subtract_rest(target, ctf_full, subtract, idx, band, ctf_mode)
        rot = euler_to_matrix(torch.as_tensor(angles_deg[part], device=device)).to(torch.float32)
        t0 = image_translation_px(torch.as_tensor(shift_A[part], device=device), band.apix).to(torch.float32)
        m1, m2 = ring_ctf_moments(ctf_full, band.ring_index, band.n_rings)
        yield SampleBlock(part, target, ctf_band, ctf_full, m1, m2, rot, t0)


def measure_ring_snr(ps, indices: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray, gmm: GaussianMixture,
                     band, ctf_mode: str, device, subtract=None) -> torch.Tensor:
    """Per-ring SNR of a half's particles against the half's GMM at their current poses.

    Measured on :data:`SNR_SAMPLE` particles spread evenly over the half (``indices``, input order), so
    it depends on this half's particles only (:func:`gmmrefine.refine.snr.fit_ring_snr`).

    Args:
        ps: the particle set; indices: ``(n,)`` the half's particles.
        angles_deg, shift_A: ``(n, 3)``, ``(n, 2)`` their current poses (rows of ``indices``).
        gmm, band, ctf_mode: as the refinement uses them (the band's box is the working box).
        subtract: the half's :class:`~gmmrefine.refine.subtract.Subtraction` (scale measured), or None.

    Returns:
        ``(R,)`` float32 on ``device``.
    """
    from gmmrefine.refine.snr import fit_ring_snr

    corr, m1s, m2s = [], [], []
    for b in _sample_blocks(ps, indices, sample_rows(len(indices)), angles_deg, shift_A, band, ctf_mode, device,
                            subtract):
        corr.append(ring_correlations_at(gmm, b.target, b.rotations, b.translation_px, band, ctf=b.ctf_band))
        m1s.append(b.m1)
        m2s.append(b.m2)
    return fit_ring_snr(torch.cat(corr), torch.cat(m1s), torch.cat(m2s), ctf_mode).to(torch.float32)


def reference_spread(ps, indices: np.ndarray, angles_deg: np.ndarray, shift_A: np.ndarray, refined: dict,
                     other_gmm: GaussianMixture, band, settings: RefineSettings, subtract=None) -> dict:
    """How far a half's poses move when only their reference changes: the reference's share of their error.

    The Fisher information of a pose (:func:`gmmrefine.refine.poses.pose_precision`) counts the noise of
    the particle's images only; the half's reference adds its own error (its noise, and the distortion
    the poses it was built from leave in it), which the half cannot see alone: both of its quarter maps
    share those poses. Measured on the benchmark of issue 16 (adk, SNR 0.03, box 128, 2,000 particles),
    the Fisher precision alone put the root mean square of error / precision at 1.65 (rotation) and 1.29
    (shift), the spread between poses refined against two quarter GMMs of a half explained a quarter of
    the excess, and the spread against the other half's GMM all of it (1.19 and 1.12).

    So, once the last iteration's FSC has compared the halves, a sample of the half's particles
    (:data:`PRECISION_SAMPLE`) is refined again from the same starting poses, with the same settings, against the
    other half's GMM. Image noise is common to both results and cancels in their difference; what is left
    are the two references' errors, independent and alike, so half its mean square is one reference's
    share: ``k = <|d|^2> / (2 <sigma_Fisher^2>)``, and each particle's precision becomes
    ``sigma_Fisher sqrt(1 + k)`` (rotation and shift separately). Like the gold-standard FSC this needs
    both halves; it changes no pose and no map, only the precision reported in ``final/particles.star``.

    Args:
        ps: the particle set; indices: ``(n,)`` the half's particles.
        angles_deg, shift_A: ``(n, 3)``, ``(n, 2)`` the poses the last iteration started from.
        refined: that iteration's ``poses_half{h}.npz`` contents (its poses and Fisher precision).
        other_gmm: the other half's GMM of that iteration (as the particles were aligned to their own).
        band: the band of the half's last iteration (its working box).
        settings: the refinement settings.
        subtract: the half's own :class:`~gmmrefine.refine.subtract.Subtraction` (scale measured), or None.

    Returns:
        ``{"k_deg", "k_A", "factor_deg", "factor_A", "spread_rms_deg", "spread_rms_A", "n"}``.
    """
    device = torch.device(settings.device)
    rows = sample_rows(len(indices), PRECISION_SAMPLE)
    gmm = other_gmm.to(device=device, dtype=torch.float32)
    pose = resolve_batch(settings.pose, device, gmm.n, band, ps.box)
    ring_snr = measure_ring_snr(ps, indices, angles_deg, shift_A, gmm, band, settings.ctf, device, subtract)
    from gmmrefine.refine.snr import expected_correlation

    spread_deg, spread_A = [], []
    for b in _sample_blocks(ps, indices, rows, angles_deg, shift_A, band, settings.ctf, device, subtract):
        part, t0 = b.rows, b.translation_px
        rho = expected_correlation(ring_snr, b.m1, b.m2, settings.ctf)
        r = refine_poses(gmm, b.target, b.rotations, t0, band, pose, ctf=b.ctf_band, rho=rho)
        own = euler_to_matrix(torch.as_tensor(refined["angles_deg"][part])).to(torch.float64)
        spread_deg.append(rotation_angle_deg(own, r.rotations.cpu().to(torch.float64)).numpy())
        moved_px = (r.translation_px - t0).cpu().numpy().astype(np.float64)
        other_shift = shift_A[part] - moved_px * band.apix   # image translation is minus the origin shift
        spread_A.append(np.linalg.norm(refined["shift_A"][part] - other_shift, axis=1))
    d_deg, d_A = np.concatenate(spread_deg), np.concatenate(spread_A)
    p_deg, p_A = refined["precision_deg"][rows], refined["precision_A"][rows]
    k_deg = float(np.mean(d_deg**2) / (2 * np.mean(p_deg**2)))
    k_A = float(np.mean(d_A**2) / (2 * np.mean(p_A**2)))
    return {"k_deg": k_deg, "k_A": k_A, "factor_deg": math.sqrt(1 + k_deg), "factor_A": math.sqrt(1 + k_A),
            "spread_rms_deg": float(np.sqrt(np.mean(d_deg**2))), "spread_rms_A": float(np.sqrt(np.mean(d_A**2))),
            "n": int(len(rows))}


# Pose batches per block, the unit of work between two safe points (~2 s on these 2 CPU cores at box
# 128, 10 steps; a stop signal is honoured within one block, well inside the 30 s torchrun and SLURM
# give by default before they kill).
_BATCHES_PER_BLOCK = 4
# A block's images take at most this many bytes (its CTFs, spectra and band coefficients scale with it).
_BLOCK_BYTES = 64 * 2**20
#: Images read from disk at a time take at most this many bytes (float32), whatever ``--chunk`` says:
#: at box 128 the paper's 20,000 particles would be 1.3 GB, and their CTFs 0.7 GB more.
CHUNK_BYTES = 64 * 2**20


def block_rows(batch: int, box: int) -> int:
    """Particles per block: ``_BATCHES_PER_BLOCK`` pose batches of ``batch``, fewer when a block's
    images would pass ``_BLOCK_BYTES`` (at least one batch)."""
    per_batch = max(int(batch), 1) * box * box * 4
    return max(int(batch), 1) * max(1, min(_BATCHES_PER_BLOCK, _BLOCK_BYTES // per_batch))


def chunk_rows(chunk: int, box: int, block: int) -> int:
    """Particles read from disk at a time: ``chunk`` (``--chunk``), at most :data:`CHUNK_BYTES` of
    float32 images, in whole blocks (at least one)."""
    limit = min(int(chunk), CHUNK_BYTES // (box * box * 4))
    return max(block, limit // block * block)


def resolve_batch(pose: PoseSettings, device: torch.device, n_gaussians: int, band, box: int) -> PoseSettings:
    """``pose`` with its batch set: as given, else (``--batch auto``) from the free memory of a CUDA
    device (:func:`gmmrefine.refine.poses.batch_for_memory`), else the paper's 16."""
    if pose.batch:
        return pose
    free = free_memory_bytes(device)
    batch = DEFAULT_BATCH if free is None else batch_for_memory(free, n_gaussians, band, box)
    return dataclasses.replace(pose, batch=batch)


def pass_key(ps, half: int, angles_deg: np.ndarray, shift_A: np.ndarray, gmm: GaussianMixture | None,
             maxres_A: float | None, settings: RefineSettings, pose: PoseSettings, boxes: tuple = (),
             subtract=None) -> str:
    """A digest of everything a half pass's result depends on: a checkpoint is resumed only by the same
    pass (a stale one, of another step or other settings, is ignored)."""
    h = hashlib.sha256()
    idx = ps.half(half)
    h.update(repr((str(ps.path), len(ps), ps.box, float(ps.apix), half, maxres_A, settings.minres_A,
                   settings.ctf, settings.reconstruct_ctf, pose, boxes)).encode())
    h.update(np.ascontiguousarray(np.asarray(angles_deg, dtype=np.float64)[idx]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(shift_A, dtype=np.float64)[idx]).tobytes())
    posed = [(gmm, None, None)] + ([] if subtract is None else [(m.gmm, m.angles_deg, m.shift_A) for m in subtract.parts])
    for g, part_angles, part_shift in posed:
        if g is not None:
            for t in (g.centers_A, g.amplitudes, g.widths_A):
                h.update(t.detach().cpu().numpy().tobytes())
        for x in (part_angles, part_shift):
            if x is not None:
                h.update(np.ascontiguousarray(np.asarray(x, dtype=np.float64)[idx]).tobytes())
    return h.hexdigest()[:20]


def _save_checkpoint(path: Path, accs: dict, arrays: tuple, lo: int, hi: int, step: int) -> None:
    """This rank's partial pass: its accumulators and its shard's poses after ``step`` blocks."""
    from gmmrefine.io.atomic import atomic_path

    state = {"step": step, "lo": lo, "hi": hi, "arrays": [torch.from_numpy(x[lo:hi].copy()) for x in arrays],
             "accs": {q: {"data": a.data, "weight": a.weight, "count": a.count} for q, a in accs.items()}}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(path: Path | None, accs: dict, arrays: tuple, lo: int, hi: int, device) -> int:
    """Load this rank's checkpoint into ``accs`` and ``arrays`` if every rank has one of the same step;
    returns the first block to process (0: start afresh)."""
    from gmmrefine import distributed

    state = None
    if path is not None and path.is_file():
        state = torch.load(path, map_location=device, weights_only=True)
        if (state["lo"], state["hi"]) != (lo, hi):
            state = None
    step = 0 if state is None else int(state["step"])
    lowest, highest = distributed.all_min(step), distributed.all_max(step)
    if lowest != highest or step == 0:
        return 0
    assert state is not None  # step > 0 was read from it
    for q, a in accs.items():
        a.data, a.weight, a.count = state["accs"][q]["data"], state["accs"][q]["weight"], int(state["accs"][q]["count"])
    for x, part in zip(arrays, state["arrays"]):
        x[lo:hi] = part.numpy()
    return step


#: Pipe-Menon iterations of the quarter maps (RELION's 10 for every other map). The corrected quarter
#: FSC estimates the gold-standard FSC of two half maps (made with 10 iterations, at the same poses).
#: Measured, half 1 / half 2 estimate against that gold standard (A):
#:
#: =================================================  ===========  ===========  =====
#: set (per half; iteration, grid)                    10           3            gold
#: =================================================  ===========  ===========  =====
#: box-256 O assembly, 1,000 (it. 1, 120 px)          4.33 / 4.31  4.28 / 4.27  4.29
#: same, iteration 3 (180 px)                         4.02 / 4.03  3.93 / 3.97  3.93
#: adk, +/-15 deg hinge, 1,000 (it. 1, 90 px)         3.52 / 3.53  3.50 / 3.51  3.47
#: same, iteration 3 (120 px)                         3.47 / 3.47  3.43 / 3.46  3.43
#: adk, 1,000 (it. 3, 120 px)                         3.21 / 3.17  3.20 / 3.15  3.11
#: adk, box 96, 2 A/px, SNR 0.2, true poses, 500      4.25 / 4.28  4.04 / 4.02  4.06
#: same, 250                                          7.33 / 7.26  5.83 / 5.88  5.71
#: same, 120                                          10.9 / 9.85  7.86 / 8.19  9.21
#: =================================================  ===========  ===========  =====
#:
#: 10 iterations came out coarser than the gold standard on every set: by 1-3 % at 1,000 particles per
#: half, 5 % at 500, 27-28 % at 250. 3 were within 3 % from 250 per half up; at 120 per half they were
#: 11-15 % finer, where 10 were 7-18 % coarser. 1 iteration: 4.22 / 4.25 A against 5.71 A at 250 per
#: half; 0 (plain division) moved a box-64 estimate from 8.5 to 10.0 A against a gold 7.9 A.
QUARTER_PM_ITERATIONS = 3


def quarter_maps(a, b, *, symmetry: torch.Tensor | None = None, for_half: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """FSC between the maps of two accumulators (a half set's even and odd particles), and where the
    half map's Pipe-Menon iteration can go on from.

    The maps are made as the half maps are (Pipe-Menon weights), with :data:`QUARTER_PM_ITERATIONS`
    iterations: plain division is ~10x faster but, measured on 200 simulated adk particles (box 64, SNR
    0.1), moved the corrected estimate from 8.5 to 10.0 A (the gold-standard FSC of the two halves gave
    7.9 A), and the numerator grids' own FSC on the padded grid gave 10.1 A: cropping the padded map in
    real space averages neighbouring Fourier voxels, which those estimates miss. Sharing the half's
    weights between the quarters (one inversion instead of three) moved it by up to 3 % on 100-1,000
    noisy particles and dropped the FSC of noise-free sparse data by up to 0.23, so each quarter keeps
    its own.

    The half's density is the sum of the quarters', so the quarters' inverse weights combined
    (:func:`gmmrefine.reconstruct.invert.combined_inverse_weights`) are where the half's own iteration
    from 1 stands after as many steps: continued for the rest of RELION's 10, the half map matched the
    one of 10 iterations from 1 to FSC >= 0.9999 at every shell on the first five sets of
    :data:`QUARTER_PM_ITERATIONS` (FSC to the noise-free map equal to 5 digits), and to >= 0.998 on
    20-150 noise-free particles of box 40 (tests/test_reconstruct.py), for 13 transforms of the grid
    pair instead of 30 (a half's maps at 180 px, box 256, 2 cores: 11.4 -> 5.8 s).

    Args:
        a, b: :class:`~gmmrefine.reconstruct.insert.FourierAccumulator` (not modified).
        symmetry: ``(K, 3, 3)`` operators imposed on both maps, or None.
        for_half: keep the weights for the map of ``a + b`` (False: that map is made on another grid).

    Returns:
        ``(fsc, inverse_start)``: ``(d//2+1,)`` float64 FSC per shell of the accumulators' box ``d``, and the
        ``inverse_start`` of :func:`gmmrefine.reconstruct.invert.reconstruct_map` for the map of ``a + b``
        (with ``PIPE_MENON_ITERATIONS - QUARTER_PM_ITERATIONS`` iterations; None without ``for_half``).
    """
    from gmmrefine.reconstruct.invert import combined_inverse_weights, reconstruct_map

    maps: list[torch.Tensor] = []
    inverse: list[torch.Tensor] = []   # one real grid of weights alive beside the second quarter's inversion
    for acc in (a, b):
        maps.append(reconstruct_map(acc, symmetry=symmetry, preweight_iterations=QUARTER_PM_ITERATIONS,
                                    inverse_out=inverse if for_half else None).cpu())
        if len(inverse) == 2:
            inverse = [combined_inverse_weights(*inverse)]
    return fourier_shell_correlation(maps[0], maps[1]), inverse[0] if inverse else None


# ------------------------------------------------------------------------------------------------
# GMM building
# ------------------------------------------------------------------------------------------------

#: Adam steps of a warm-started GMM fit, as a fraction of a fresh fit's. Measured on the box-256
#: benchmark's last iteration (half 1, 6,646 Gaussians warm-started from the previous iteration's):
#: 150 / 75 / 50 / 30 steps took 25.6 / 12.1 / 8.1 / 5.1 s, their FSC to the map over the band was
#: 0.753 / 0.752 / 0.751 / 0.749, and the refinement against them left 0.3319 / - / 0.3327 / 0.3323 deg of
#: pose error (from 0.358 deg). A refit after the number of Gaussians grew (seeded afresh by k-means) takes
#: the same share: on the same benchmark's iteration 2 (6,689 Gaussians at 4.3 A, half 1), 150 / 50 steps
#: gave an FSC to the map over the band of 0.754 / 0.756 and 0.3542 / 0.3547 deg of pose error after the
#: pass (from 0.583 deg); at iteration 1 (1,509 Gaussians at 7.2 A) 0.5854 / 0.5814 deg.
WARM_STEP_FRACTION = 1 / 3

#: k-means start of a refit (the band asked for more than 25 % more or fewer Gaussians than the previous
#: GMM has): weighted random voxels instead of the greedy k-means++, whose one step per centre dominated
#: the refit at thousands of Gaussians. Measured on the box-256 benchmark's iteration-2 refit (half 1,
#: 1,509 -> 6,888 Gaussians at 4.29 A, 35,244 voxels, 50 Adam steps, 2 cores): k-means 6.7 -> 2.7 s,
#: the refit 15.3 -> 10.8 s, the FSC to the map over the band 0.759 -> 0.754 (k-means++ with one trial
#: per centre: 4.6 s, 0.757). Stop 27 measured 0.3576 deg of pose error after a pass either way. The
#: first fit of a run keeps k-means++: it takes all of ``--gmm-steps`` and sets the start of the rest.
REFIT_KMEANS_INIT = "random"


def build_half_gmm(volume: torch.Tensor, apix: float, resolution_A: float, *, init: GaussianMixture | None,
                   seed: int, steps: int = 150, device: str = "cpu",
                   builder: Callable | None = None) -> tuple[GaussianMixture, dict]:
    """The half's GMM at ``resolution_A`` from its low-passed map (warm-started from ``init``).

    N follows the resolution by the paper's rule (Gaussians spaced by the resolution,
    :data:`gmmrefine.gmm.build.REFERENCE_SPACING_FRACTION`): as the band widens the reference needs more
    Gaussians (at 3 A, 350 Gaussians fitted at 4.3 A aligned worse than 1,000: see gmm/build.py), so
    ``init`` is only a warm start while its N is within 25 % of the target; otherwise the GMM is seeded
    afresh from the map (k-means from :data:`REFIT_KMEANS_INIT`). Every fit after the first (``init``
    given, warm or refit) takes a third of ``steps`` (:data:`WARM_STEP_FRACTION`); only the first fit of
    a run takes them all.
    ``builder`` defaults to :func:`gmmrefine.gmm.build.build_gmm` and is called as it is.

    Returns:
        ``(gmm on the CPU, float32; the builder's info dict)``.
    """
    from gmmrefine.gmm.build import REFERENCE_SPACING_FRACTION, estimate_n

    if builder is None:
        from gmmrefine.gmm.build import build_gmm

        builder = build_gmm
    target_n = estimate_n(volume, apix, resolution_A, spacing_fraction=REFERENCE_SPACING_FRACTION)
    kmeans_init = "k-means++"
    if init is not None:
        steps = max(1, round(steps * WARM_STEP_FRACTION))
    if init is not None and abs(init.n - target_n) > 0.25 * target_n:
        init, kmeans_init = None, REFIT_KMEANS_INIT
    gmm, info = builder(volume, apix, resolution_A, n=None if init is not None else target_n, init=init, seed=seed,
                        steps=steps, device=device, kmeans_init=kmeans_init)
    return gmm.detach().to(device="cpu", dtype=torch.float32), info


# ------------------------------------------------------------------------------------------------
# Files of a step
# ------------------------------------------------------------------------------------------------

def save_poses(path: Path, p: HalfPass, start_angles: np.ndarray, start_shift: np.ndarray, apix: float) -> None:
    """``poses_half{h}.npz``: indices, new poses, FRC before/after, pose change (degrees, pixels) and
    the poses' precision (degrees, angstrom; NaN without the Newton optimiser)."""
    before = euler_to_matrix(torch.as_tensor(start_angles[p.indices]))
    after = euler_to_matrix(torch.as_tensor(p.angles_deg))
    change_deg = rotation_angle_deg(before, after).numpy()
    change_px = np.linalg.norm(p.shift_A - start_shift[p.indices], axis=1) / apix
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, indices=p.indices, angles_deg=p.angles_deg, shift_A=p.shift_A, frc_start=p.frc_start,
                     frc_end=p.frc_end, change_deg=change_deg, change_px=change_px,
                     precision_deg=_or_nan(p.precision_deg, len(p.indices)),
                     precision_A=_or_nan(p.precision_A, len(p.indices)))


def _or_nan(values: np.ndarray | None, n: int) -> np.ndarray:
    return np.full(n, np.nan) if values is None else np.asarray(values, dtype=np.float64)


def load_poses(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: np.asarray(data[k]) for k in data.files}


def _resolution_json(path: Path, p: HalfPass, box: int) -> dict:
    assert p.quarter_fsc is not None  # passes without quarter maps keep their poses' estimate
    info = {"resolution_A": p.resolution_A, "quarter_fsc": p.quarter_fsc.tolist(),
            "corrected_fsc": half_set_fsc(p.quarter_fsc).tolist(), "seconds": p.seconds,
            "n_particles": int(len(p.indices))}
    if np.isfinite(p.frc_end).any():
        info["frc_start_mean"] = float(np.nanmean(p.frc_start))
        info["frc_end_mean"] = float(np.nanmean(p.frc_end))
    if p.ring_snr is not None:
        assert p.ring_shell is not None  # set with ring_snr
        info["ring_snr"] = {"shell": p.ring_shell.tolist(), "snr": p.ring_snr.tolist()}
    if p.precision_deg is not None and np.isfinite(p.precision_deg).any():
        assert p.precision_A is not None  # set with precision_deg
        info["median_precision_deg"] = float(np.nanmedian(p.precision_deg))
        info["median_precision_A"] = float(np.nanmedian(p.precision_A))
    write_json_atomic(path, info)
    return info


def current_poses(job, ps, k: int, *, halves: tuple[int, ...] = HALVES) -> tuple[np.ndarray, np.ndarray]:
    """Poses of all particles after iteration ``k`` (0: the input's), from the job's files; only the rows
    of ``halves`` are read (the others keep the input's poses)."""
    angles = np.array(ps.angles_deg, dtype=np.float64)
    shifts = np.array(ps.shift_A, dtype=np.float64)
    if k == 0:
        return angles, shifts
    for h in halves:
        d = load_poses(job.path / it_dir(k) / f"poses_half{h}.npz")
        angles[d["indices"]] = d["angles_deg"]
        shifts[d["indices"]] = d["shift_A"]
    return angles, shifts


#: Columns of the per-particle precision in ``particles.star`` (RELION ignores unknown columns).
PRECISION_COLUMNS = {"precision_deg": "gmmAngularPrecisionDeg", "precision_A": "gmmShiftPrecisionAngst"}


#: Health check: poses that move more than this many times their precision (root mean square) after the
#: first iteration moved more than their images justify.
MOVE_WARNING = 3.0


def health_warnings(previous: dict, current: dict, box: int, apix: float) -> list[str]:
    """What an iteration did that a user must hear about (the job goes on): the gold-standard resolution
    got worse by more than one Fourier shell, or, after the first iteration, the poses moved more than
    :data:`MOVE_WARNING` times their precision."""
    out = []
    shell = previous["resolution_A"] ** 2 / (box * apix)
    k = current["iteration"]
    if current["resolution_A"] - previous["resolution_A"] > shell:
        out.append(f"iteration {k}: the resolution got worse, {previous['resolution_A']:.2f} -> "
                   f"{current['resolution_A']:.2f} A")
    moved = current.get("convergence", {}).get("move_over_precision_deg", float("nan"))
    if k > 1 and np.isfinite(moved) and moved > MOVE_WARNING:
        out.append(f"iteration {k}: poses moved {moved:.1f} x their angular precision (rms), more than their images "
                   "justify")
    return out


def current_precision(job, ps, k: int) -> dict[str, np.ndarray]:
    """Per-particle precision after iteration ``k`` as ``particles.star`` columns
    (:data:`PRECISION_COLUMNS`); empty if iteration ``k`` has none (``k = 0``, the paper's optimiser).
    Each half's own (Fisher) precision, times its reference-error factor once the last iteration has one
    (``itK/precision.json``, :func:`calibrate_precision`)."""
    if k == 0:
        return {}
    out = {key: np.full(len(ps), np.nan) for key in PRECISION_COLUMNS}
    for h in HALVES:
        d = load_poses(job.path / it_dir(k) / f"poses_half{h}.npz")
        for key in PRECISION_COLUMNS:
            if key in d:
                out[key][d["indices"]] = d[key]
    if not np.isfinite(out["precision_deg"]).any():
        return {}
    calibration = job.path / it_dir(k) / "precision.json"
    if calibration.is_file():  # the halves' reference errors, measured after the final FSC
        factors = json.loads(calibration.read_text())
        for h in HALVES:
            rows = ps.half(h)
            out["precision_deg"][rows] *= factors[str(h)]["factor_deg"]
            out["precision_A"][rows] *= factors[str(h)]["factor_A"]
    return {PRECISION_COLUMNS[key]: values for key, values in out.items()}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------

def convergence(previous: dict, current: dict, changes: list[dict], box: int, apix: float) -> dict:
    """Whether refinement has converged after an iteration (``--iterations auto``), and why.

    Converged when both hold, as RELION's auto-refine decides: the poses moved less than their own
    precision (root mean square over particles of move / precision below 1, for rotations and for
    shifts; the precision of the Newton optimiser, :func:`gmmrefine.refine.poses.pose_precision`) and the
    gold-standard resolution improved by less than one Fourier shell (``res^2 / (box apix)``, the
    granularity of the FSC it is read from). Without precisions (the paper's optimiser) the
    resolution alone decides.

    Args:
        previous, current: ``fsc.json`` of the iteration before and of this one.
        changes: the ``poses_half{h}.npz`` contents of this iteration.
        box, apix: box (px) and pixel size (A/px).

    Returns:
        ``{"converged", "reason", "move_over_precision_deg", "move_over_precision_A", "resolution_gain_A",
        "shell_A"}``.
    """
    deg = np.concatenate([c["change_deg"] for c in changes])
    shift_A = np.concatenate([c["change_px"] for c in changes]) * apix
    prec_deg = np.concatenate([c.get("precision_deg", np.full(len(c["change_deg"]), np.nan)) for c in changes])
    prec_A = np.concatenate([c.get("precision_A", np.full(len(c["change_deg"]), np.nan)) for c in changes])
    have = np.isfinite(prec_deg) & (prec_deg > 0) & np.isfinite(prec_A) & (prec_A > 0)
    ratio_deg = float(np.sqrt(np.mean((deg[have] / prec_deg[have]) ** 2))) if have.any() else float("nan")
    ratio_A = float(np.sqrt(np.mean((shift_A[have] / prec_A[have]) ** 2))) if have.any() else float("nan")
    gain = previous["resolution_A"] - current["resolution_A"]
    shell = previous["resolution_A"] ** 2 / (box * apix)
    settled = not have.any() or (ratio_deg < 1.0 and ratio_A < 1.0)
    improving = gain >= shell
    moves = (f"poses moved {ratio_deg:.2f} x their angular and {ratio_A:.2f} x their shift precision (rms)"
             if have.any() else "no pose precision (paper optimiser)")
    res = (f"resolution {previous['resolution_A']:.2f} -> {current['resolution_A']:.2f} A "
           f"({gain:+.3f} A; one Fourier shell is {shell:.3f} A)")
    if settled and not improving:
        reason = f"converged: {moves}, {res}"
    else:
        reason = "continuing: " + (f"{res}" if improving else moves)
    return {"converged": bool(settled and not improving), "reason": reason, "move_over_precision_deg": ratio_deg,
            "move_over_precision_A": ratio_A, "resolution_gain_A": float(gain), "shell_A": float(shell)}


def _half_resolution(job, k: int, h: int) -> float:
    return float(json.loads((job.path / it_dir(k) / f"half{h}_resolution.json").read_text())["resolution_A"])


def _gold_fsc(job, k: int, apix: float) -> dict:
    """Gold-standard FSC of iteration ``k``'s half maps; maps of different working boxes (each half's
    follows its own resolution) are compared on the smaller one's frequencies."""
    from gmmrefine.fourier.fft import downsample_map

    d = job.path / it_dir(k)
    (map1, apix1), (map2, _) = read_map(d / "half1.mrc"), read_map(d / "half2.mrc")
    box = min(map1.shape[-1], map2.shape[-1])
    apix = apix1 * map1.shape[-1] / box
    h1 = downsample_map(torch.as_tensor(map1), box)
    h2 = downsample_map(torch.as_tensor(map2), box)
    curve = fourier_shell_correlation(h1, h2)
    return {"iteration": k, "fsc": curve.tolist(), "frequency_inv_A": shell_frequencies(box, apix).tolist(),
            "resolution_A": resolution_at(curve, box, apix, 0.143),
            "half_resolution_A": {str(h): _half_resolution(job, k, h) for h in HALVES}}


def full_size_maps(job, ps, settings: RefineSettings, k: int, done: Callable[..., None]) -> None:
    """Step ``itK/full_maps``: the last iteration's half maps at the particles' full box.

    Iterations reconstruct on their working grids (:func:`working_box`); what the user gets (``final/``,
    focused and patch outputs) is the full-size map at the final poses: one more pass over the
    particles, without refinement, whose half maps and gold-standard FSC replace the working-size ones
    of iteration ``k`` (its pose changes and convergence are kept). The per-half estimates stay those of
    the working grid, made at the same poses: quarter maps at full size would cost two more
    reconstructions per half (1.7 s of the pass's 4.1 s per half at box 128, 1,000 particles) for an
    estimate the grid's Nyquist already holds.
    """
    step = f"{it_dir(k)}/full_maps"
    if job.is_done(step):
        return
    d = job.path / it_dir(k)
    t0 = time.perf_counter()
    if any(read_map(d / f"half{h}.mrc")[0].shape[-1] != ps.box for h in HALVES):
        angles, shifts = current_poses(job, ps, k)
        for h in HALVES:
            work = job.summary(f"{it_dir(k)}/half{h}/refine").get("work_box") or ps.box
            p = half_pass(ps, h, angles, shifts, settings, desc=f"it{k:03d} full-size map half {h}", map_box=ps.box,
                          fsc_box=work, quarters=False)
            assert p is not None  # rank 0 gets the pass
            write_map(d / f"half{h}.mrc", p.half_map.numpy(), p.apix)
        previous = json.loads((d / "fsc.json").read_text())
        fsc = _gold_fsc(job, k, ps.apix)
        write_json_atomic(d / "fsc.json", previous | fsc | {"working_resolution_A": previous["resolution_A"]})
        job.log(f"iteration {k}: full-size half maps ({ps.box} px): resolution {fsc['resolution_A']:.2f} A "
                f"(working grid {previous['resolution_A']:.2f} A), {time.perf_counter() - t0:.0f} s")
    done(step, seconds=time.perf_counter() - t0)


def calibrate_precision(job, ps, settings: RefineSettings, k: int, done: Callable[..., None],
                        gmm_transform: Callable[[int, GaussianMixture], GaussianMixture] | None = None,
                        subtraction: Callable | None = None) -> None:
    """Step ``itK/precision``: each half's reference error added to the last iteration's pose precision
    (:func:`reference_spread`), written to ``itK/precision.json`` and used by :func:`current_precision`
    for ``final/particles.star``. Nothing to do without a precision (the paper's optimiser)."""
    step = f"{it_dir(k)}/precision"
    if job.is_done(step):
        return
    d = job.path / it_dir(k)
    refined = {h: load_poses(d / f"poses_half{h}.npz") for h in HALVES}
    if not all(np.isfinite(refined[h]["precision_deg"]).any() for h in HALVES):
        done(step, calibrated=False)
        return
    t0 = time.perf_counter()
    device = torch.device(settings.device)
    angles, shifts = current_poses(job, ps, k - 1)
    out = {}
    for h in HALVES:
        prev_res = (settings.resolution_start_A if (k == 1 and settings.resolution_start_A)
                    else _half_resolution(job, k - 1, h))
        maxres = band_limit(prev_res, settings, ps.apix)
        work = int(job.summary(f"{it_dir(k)}/half{h}/refine").get("work_box") or ps.box)
        band = fourier_band(work, ps.apix * ps.box / work, settings.minres_A, maxres, device=device)
        other = GaussianMixture.load(d / f"gmm_half{3 - h}.npz")
        if gmm_transform is not None:
            other = gmm_transform(3 - h, other)
        indices = ps.half(h)
        assert np.array_equal(indices, refined[h]["indices"])  # the pass wrote the half in input order
        subtract = None
        if subtraction is not None:  # the half's own rest, as its pass subtracted it
            from gmmrefine.refine.subtract import measure_scale

            subtract = subtraction(h).to(device)
            subtract.scale = measure_scale(ps, indices, subtract, band, settings.ctf, device)
        out[str(h)] = reference_spread(ps, indices, angles[indices], shifts[indices], refined[h], other, band,
                                       settings, subtract)
    write_json_atomic(d / "precision.json", out)
    job.log("pose precision with each half's reference error (measured against the other half's reference, "
            "after the final FSC): x " + ", ".join(f"{out[str(h)]['factor_deg']:.2f} (rotation) / "
                                                 f"{out[str(h)]['factor_A']:.2f} (shift) in half {h}" for h in HALVES))
    done(step, calibrated=True, seconds=time.perf_counter() - t0)


#: Grids of the maps at the start (when the resolution is not known yet), smallest first. Each half's
#: maps are made on the first (or the full box, if smaller); when its estimate lies too near that grid's
#: Nyquist to hold the next iteration's band (:func:`larger_start_box`), again on the next. Beyond the
#: last, the estimate is at most its Nyquist and iteration 1 measures further. A full-size map is made
#: only for the final poses. Measured on the box-256 benchmark (1,000 particles per half, 1 A/px, 3 deg
#: off): half 1's start took 5.2 s on 128 px against 49.8 s on 256 px, for 7.173 against 7.175 A.
START_FSC_BOXES = (128, 256)


def start_fsc_box(box: int, apix: float, resolution_A: float | None) -> int:
    """Grid of the quarter maps (and, in a global refinement, the half maps) of iteration 0: the working
    grid of ``--resolution-start`` if given, else the first of :data:`START_FSC_BOXES` (at most the box)."""
    if resolution_A:
        return working_box(box, apix, resolution_A)
    return min(box, START_FSC_BOXES[0])


def larger_start_box(box: int, apix: float, resolution_A: float, grid: int) -> int | None:
    """The next start grid for a half whose estimate on ``grid`` was ``resolution_A``: None when that grid
    holds the working grid of the band the estimate gives (:func:`working_box`), else the next of
    :data:`START_FSC_BOXES` (at most the box; None when there is none larger)."""
    if working_box(box, apix, resolution_A) <= grid:
        return None
    larger = [min(box, size) for size in START_FSC_BOXES if min(box, size) > grid]
    return larger[0] if larger else None


#: Beyond the band of an iteration, the working grid keeps this fraction more frequency and this many
#: Fourier shells (RELION's ``incr_size``), so the FSC can show how far the next band may go.
WORK_MARGIN = 1.25
WORK_EXTRA_SHELLS = 10


def working_box(box: int, apix: float, maxres_A: float) -> int:
    """The even box of the grid an iteration works on: Nyquist at least ``WORK_MARGIN`` times the band's
    frequency plus ``WORK_EXTRA_SHELLS`` shells, rounded up to a size whose FFT is fast (factors 2, 3,
    5), at most ``box``. Same physical size, so Fourier pixels keep their frequencies (1/A)."""
    shells = box * apix / maxres_A
    size = 2 * math.ceil(WORK_MARGIN * shells + WORK_EXTRA_SHELLS)
    while not _fft_friendly(size):
        size += 2
    return int(min(box, size))


def _fft_friendly(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def band_limit(resolution_A: float, settings: RefineSettings, apix: float) -> float:
    """High-resolution end of the band for a half whose resolution estimate is ``resolution_A``."""
    return float(min(max(resolution_A, 2.0 * apix), settings.minres_A / 2.0))


def run_global_refinement(job, ps, settings: RefineSettings, *, builder: Callable | None = None,
                          on_step: Callable[[str], None] | None = None,
                          gmm_transform: Callable[[int, GaussianMixture], GaussianMixture] | None = None,
                          subtraction: Callable | None = None, until: int | None = None) -> list[dict]:
    """Run (or resume) the iterations of a job.

    Args:
        job: :class:`gmmrefine.pipeline.job.Job` (its completed steps are skipped), or a
            :class:`gmmrefine.refine.stage.SubJob` (a stage in a sub-folder: focused refinement of a patch).
        ps: the input particle set (its poses are the start; iteration 0 reconstructs at them unless its
            steps were done beforehand, e.g. copied from the stage this one continues).
        settings: refinement settings.
        builder: GMM builder (defaults to :func:`gmmrefine.gmm.build.build_gmm`).
        on_step: called with each step name after it completes (tests use it to interrupt).
        gmm_transform: ``(half, fitted GMM) -> GMM the particles are aligned to`` (focused refinement:
            :func:`gmmrefine.gmm.masks.width_mask`); the fitted GMM is what is saved and warm-starts the
            next fit. A ``gmm_half{h}.npz`` in ``it000`` warm-starts the first fit.
        subtraction: ``half -> Subtraction`` (:mod:`gmmrefine.refine.subtract`): what is taken out of that
            half's images before they are compared (multi-body refinement with ``--body-context subtract``).
        until: stop after this iteration (a lock-step multi-body refinement runs every body's iteration
            ``k`` before any body's ``k + 1``); the steps after the last iteration (full-size maps,
            precision) run only once the last iteration is done. None: run to the end.

    Returns:
        The ``fsc.json`` contents of iterations ``0..iterations`` (``0..until`` with ``until``).
    """
    apix, box = ps.apix, ps.box

    def done(step: str, **summary) -> None:
        job.mark_done(step, **summary)
        if on_step is not None:
            on_step(step)

    # Iteration 0: half maps at the input poses.
    for h in HALVES:
        step = f"{it_dir(0)}/half{h}"
        if job.is_done(step):
            continue
        angles, shifts = current_poses(job, ps, 0)
        # The start's maps only seed iteration 1's GMMs (on its working grid) unless a focused refinement
        # compares its mask's resolution with them or full-size maps are asked for.
        start_box, seconds = start_fsc_box(ps.box, apix, settings.resolution_start_A), 0.0
        while True:
            p = half_pass(ps, h, angles, shifts, settings, desc=f"it000 reconstruct half {h}", fsc_box=start_box,
                          map_box=ps.box if (settings.full_maps or gmm_transform is not None) else start_box)
            assert p is not None  # rank 0 gets the pass
            seconds += p.seconds
            larger = None if settings.resolution_start_A else larger_start_box(ps.box, apix, p.resolution_A, start_box)
            if larger is None:
                break
            job.log(f"start, half {h}: {p.resolution_A:.2f} A is too near the Nyquist of the {start_box} px grid; "
                    f"again on {larger} px")
            start_box = larger
        p = dataclasses.replace(p, seconds=seconds)  # every grid's pass
        d = job.dir(it_dir(0))
        write_map(d / f"half{h}.mrc", p.half_map.numpy(), p.apix)
        info = _resolution_json(d / f"half{h}_resolution.json", p, box)
        done(step, resolution_A=info["resolution_A"], seconds=p.seconds)
    histories = []
    step = f"{it_dir(0)}/fsc"
    if not job.is_done(step):
        fsc = _gold_fsc(job, 0, apix)
        write_json_atomic(job.dir(it_dir(0)) / "fsc.json", fsc)
        done(step, resolution_A=fsc["resolution_A"])
        job.log(f"start: gold-standard resolution {fsc['resolution_A']:.2f} A (half estimates "
                f"{fsc['half_resolution_A']['1']:.2f} / {fsc['half_resolution_A']['2']:.2f} A)")
    histories.append(json.loads((job.path / it_dir(0) / "fsc.json").read_text()))

    auto = settings.iterations is None
    for k in range(1, (settings.max_iterations if settings.iterations is None else settings.iterations) + 1):
        if auto and histories[-1].get("convergence", {}).get("converged"):
            break
        if until is not None and k > until:
            return histories
        d = job.dir(it_dir(k))
        for h in HALVES:
            prev_res = (settings.resolution_start_A if (k == 1 and settings.resolution_start_A)
                        else _half_resolution(job, k - 1, h))
            maxres = band_limit(prev_res, settings, apix)
            step = f"{it_dir(k)}/half{h}/gmm"
            work = working_box(box, apix, maxres)
            if not job.is_done(step):
                t0 = time.perf_counter()
                from gmmrefine.fourier.fft import downsample_map

                half_map, map_apix = read_map(job.path / it_dir(k - 1) / f"half{h}.mrc")
                # The GMM is fitted on the working grid (or the previous one, smaller, that holds the band).
                size = min(half_map.shape[-1], work)
                map_apix = map_apix * half_map.shape[-1] / size
                reference = low_pass(downsample_map(torch.as_tensor(half_map), size), maxres, map_apix)
                init_path = job.path / it_dir(k - 1) / f"gmm_half{h}.npz"
                init = GaussianMixture.load(init_path) if init_path.is_file() else None
                gmm, info = build_half_gmm(reference, map_apix, maxres, init=init, seed=job.seed_for(step),
                                           steps=settings.gmm_steps, device=settings.device, builder=builder)
                gmm.save(d / f"gmm_half{h}.npz")
                gmm.to_pdb(d / f"gmm_half{h}.pdb", box=box, apix=apix)
                done(step, n_gaussians=gmm.n, resolution_A=maxres, seconds=time.perf_counter() - t0,
                     gmm_fsc09_A=info.get("resolution_fsc09_A"), map_box=size)
            step = f"{it_dir(k)}/half{h}/refine"
            if not job.is_done(step):
                gmm = GaussianMixture.load(d / f"gmm_half{h}.npz")
                if gmm_transform is not None:
                    gmm = gmm_transform(h, gmm)
                angles, shifts = current_poses(job, ps, k - 1)
                p = half_pass(ps, h, angles, shifts, settings, gmm=gmm, maxres_A=maxres,
                              desc=f"it{k:03d} refine half {h}", work_box=work, fsc_box=work,
                              map_box=box if settings.full_maps or k == settings.iterations else work,
                              subtract=None if subtraction is None else subtraction(h))
                assert p is not None  # rank 0 gets the pass
                save_poses(d / f"poses_half{h}.npz", p, angles, shifts, apix)
                write_map(d / f"half{h}.mrc", p.half_map.numpy(), p.apix)
                info = _resolution_json(d / f"half{h}_resolution.json", p, box)
                done(step, resolution_A=info["resolution_A"], seconds=p.seconds,
                     particles_per_s=len(p.indices) / max(p.seconds, 1e-9), batch=p.batch,
                     resumed_particles=p.resumed_rows, work_box=work, map_box=p.half_map.shape[-1])
        step = f"{it_dir(k)}/fsc"
        if not job.is_done(step):
            fsc = _gold_fsc(job, k, apix)
            changes = [load_poses(d / f"poses_half{h}.npz") for h in HALVES]
            deg = np.concatenate([c["change_deg"] for c in changes])
            px = np.concatenate([c["change_px"] for c in changes])
            seconds = sum(job.summary(f"{it_dir(k)}/half{h}/{s}").get("seconds", 0.0)
                          for h in HALVES for s in ("gmm", "refine"))
            fsc.update(mean_change_deg=float(deg.mean()), std_change_deg=float(deg.std()),
                       mean_change_px=float(px.mean()), std_change_px=float(px.std()), seconds=seconds,
                       n_gaussians={str(h): job.summary(f"{it_dir(k)}/half{h}/gmm")["n_gaussians"] for h in HALVES})
            prec = np.concatenate([c["precision_deg"] for c in changes])
            if np.isfinite(prec).any():
                prec_A = np.concatenate([c["precision_A"] for c in changes])
                fsc.update(median_precision_deg=float(np.nanmedian(prec)), median_precision_A=float(np.nanmedian(prec_A)))
            fsc["convergence"] = convergence(histories[-1], fsc, changes, box, apix)
            fsc["warnings"] = health_warnings(histories[-1], fsc, box, apix)
            write_json_atomic(d / "fsc.json", fsc)
            angles, shifts = current_poses(job, ps, k)
            from gmmrefine.io.particles import write_particles_star

            write_particles_star(ps, d / "particles.star", angles, shifts, current_precision(job, ps, k),
                                 absolute_image_paths=True)
            done(step, resolution_A=fsc["resolution_A"])
            precision = (f", precision (median) {fsc['median_precision_deg']:.2f} deg / "
                         f"{fsc['median_precision_A']:.2f} A" if "median_precision_deg" in fsc else "")
            job.log(f"iteration {k}: resolution {fsc['resolution_A']:.2f} A, pose change "
                    f"{fsc['mean_change_deg']:.2f} +/- {fsc['std_change_deg']:.2f} deg, "
                    f"{fsc['mean_change_px']:.2f} +/- {fsc['std_change_px']:.2f} px{precision}, {seconds:.0f} s")
            for warning in fsc["warnings"]:
                job.log(f"WARNING: {warning}")
            if auto:
                job.log(f"iteration {k}: {fsc['convergence']['reason']}")
                if k == settings.max_iterations and not fsc["convergence"]["converged"]:
                    job.log(f"stopping after {k} iterations (the maximum, --max-iterations) without converging")
        histories.append(json.loads((d / "fsc.json").read_text()))
    if histories[-1]["iteration"] > 0:
        full_size_maps(job, ps, settings, histories[-1]["iteration"], done)
        calibrate_precision(job, ps, settings, histories[-1]["iteration"], done, gmm_transform, subtraction)
        histories[-1] = json.loads((job.path / it_dir(histories[-1]["iteration"]) / "fsc.json").read_text())
    return histories


def settings_from_params(params: dict) -> RefineSettings:
    """:class:`RefineSettings` from a job's parameter dictionary (``job.json``)."""
    from gmmrefine.devices import device_name

    batch = params["batch"]
    steps = params.get("steps")
    # Jobs written before the Newton optimiser existed ran the paper's.
    optimiser = str(params.get("optimiser", "paper"))
    objective = params.get("objective") or ("snr" if optimiser == "newton" else "frc")
    pose = PoseSettings(steps=None if steps in (None, "auto") else int(steps), lr=float(params["lr"]),
                        batch=None if batch in (None, "auto") else int(batch),
                        rotation_unit_rad=float(params.get("rotation_unit_rad", 2.0)),
                        translation_unit_px=params.get("translation_unit_px"), optimiser=optimiser,
                        objective=str(objective), prior_deg=float(params.get("prior_deg", DEFAULT_PRIOR_DEG)),
                        prior_A=float(params.get("prior_A", DEFAULT_PRIOR_A)))
    res = params.get("resolution_start")
    iterations = params["iterations"]
    return RefineSettings(iterations=None if iterations == "auto" else int(iterations),
                          max_iterations=int(params.get("max_iterations", 10)),
                          resolution_start_A=None if res in (None, "auto") else float(res),
                          minres_A=float(params.get("minres", 50.0)), chunk=int(params["chunk"]),
                          ctf=str(params.get("ctf", "flip")),
                          reconstruct_ctf=str(params.get("reconstruct_ctf", "wiener")),
                          pose=pose, gmm_steps=int(params.get("gmm_steps", 150)),
                          device=device_name(params.get("device", "cpu")),  # "auto": CUDA if present
                          progress=bool(params.get("progress", True)),
                          symmetry=str(params.get("sym", "C1")), full_maps=bool(params.get("full_maps", False)))

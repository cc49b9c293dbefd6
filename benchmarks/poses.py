"""The pose optimiser against an information floor it did not make, the paper's optimiser and RELION,
in one run (issue 16).

    python benchmarks/poses.py --out /tmp/bench_poses [--n 2000 --box 128 --apix 1.0 --snrs 0.1 0.03
                                --floor-n 300 --relion]

For each SNR a data set is simulated (`gmmrefine simulate`, the bundled adk model, poses 3 degrees and 1 A
off the truth), then:

1. **Refinement** (at the lowest SNR): `gmmrefine refine` with the Newton optimiser and `--iterations
   auto`, with the paper's optimiser (Adam, unweighted FRC, `--iterations 3`), optionally
   `relion_refine_mpi` local auto-refine (settings in ``benchmarks/refine.py``), all from the same
   perturbed poses. Per iteration: mean angular and shift error against the truth, gold-standard
   resolution, masked FSC to the noise-free map (mean over shells, :func:`masked_fsc_to_truth`) and
   its ratio to the FSC of a reconstruction at the true poses, wall time. The per-particle precision
   the Newton run reports is checked against the true error (RMS of error / precision).
2. **Information floor** (independent of any optimiser of ours): per particle of a sample, the pose
   that maximises the SNR-weighted objective against projections of the noise-free map (Fourier
   slices, CTF as in the refinement), found by an exhaustive grid around the true pose (+/-1.5 deg at
   0.25 deg on each rotation axis, +/-1 px at 0.25 px on each shift axis: 2,197 x 81 poses) and refined
   from the 3 best distinct grid points by a derivative-free compass search. The ring weights come from
   the particles' correlations with the noise-free projections at the true poses. Scored in the band the
   Newton run ended at.
3. **No drift**: from the true poses, 3 passes of each optimiser against a GMM of the noise-free map built
   in the same band (the "floor" of issue 5 was the paper's optimiser in this setting), on the same sample.

Writes ``results.json`` in ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine import run_relion, truth_mask

MODEL = Path(__file__).resolve().parents[1] / "src" / "gmmrefine" / "data" / "adk_open.pdb"
GM = [sys.executable, "-m", "gmmrefine"]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def simulate(out: Path, n: int, box: int, apix: float, snr: float, seed: int) -> Path:
    sim = out / f"sim_snr{snr:g}"
    if not (sim / "particles_perturbed.star").is_file():
        subprocess.run(GM + ["simulate", "--model", str(MODEL), "--n", str(n), "--box", str(box), "--apix", str(apix),
                             "--snr", str(snr), "--perturb-deg", "3", "--perturb-A", "1", "--seed", str(seed),
                             "--out", str(sim), "--device", "cpu"], check=True)
    return sim


class Particles:
    """A sample of a simulation's particles in a band: targets, CTFs and true poses."""

    def __init__(self, sim: Path, rows: np.ndarray, band, ctf_mode: str):
        from gmmrefine.geometry.rotations import euler_to_matrix
        from gmmrefine.geometry.shifts import image_translation_px
        from gmmrefine.io.particles import read_images, read_particles
        from gmmrefine.reconstruct.invert import _ctf_of
        from gmmrefine.refine.global_refine import comparison_inputs
        from gmmrefine.refine.snr import ring_ctf_moments

        truth = read_particles(sim / "particles.star")
        self.rows = rows
        images = torch.from_numpy(read_images(truth, rows))
        ctf = _ctf_of(truth, rows, "cpu")
        self.target, self.ctf_band, _ = comparison_inputs(images, ctf, band, ctf_mode, None)
        self.m1, self.m2 = ring_ctf_moments(band.gather(ctf), band.ring_index, band.n_rings)
        self.rot = euler_to_matrix(torch.as_tensor(truth.angles_deg[rows])).float()
        self.t_px = image_translation_px(torch.as_tensor(truth.shift_A[rows]), truth.apix).float()


class MapProjector:
    """Band-limited projections of a voxel map at arbitrary poses (Fourier slices of its 2x padded,
    gridding-corrected transform; :mod:`gmmrefine.fourier.project`)."""

    def __init__(self, volume: np.ndarray, band):
        from gmmrefine.fourier.project import padded_map_spectrum

        self.spectrum = padded_map_spectrum(torch.as_tensor(volume, dtype=torch.float32), pad=2)
        self.band = band
        self.freq_px = torch.stack([band.nx, band.ny], -1).float() / band.box  # cycles per pixel

    def __call__(self, rot: torch.Tensor, t_px: torch.Tensor) -> torch.Tensor:
        """``(G, P)`` band coefficients at ``(G, 3, 3)`` rotations and ``(G, 2)`` translations."""
        from gmmrefine.fourier.project import sample_spectrum_3d
        from gmmrefine.geometry.rotations import slice_frequencies

        k3 = slice_frequencies(self.freq_px, rot.float()) * self.spectrum.shape[0]
        values = sample_spectrum_3d(self.spectrum, k3)
        phase = -2 * math.pi * (t_px.float() @ self.freq_px.T)              # content moves by +t
        return values * torch.polar(torch.ones_like(phase), phase)


def objective(proj: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, band) -> torch.Tensor:
    """The SNR-weighted objective ``sum_r w_r c_r`` of ``(G, P)`` projections against one target."""
    from gmmrefine.gmm.loss import ring_correlations

    return (ring_correlations(proj, target.expand_as(proj), band.ring_index, band.n_rings) * weights).sum(-1)


# ------------------------------------------------------------------------------------------------
# The information floor
# ------------------------------------------------------------------------------------------------

def information_floor(sim: Path, rows: np.ndarray, band, ctf_mode: str, *, grid_deg: float = 1.5,
                      step_deg: float = 0.25, grid_px: float = 1.0, step_px: float = 0.25, starts: int = 3) -> dict:
    """Per particle, the best pose against the noise-free map near the truth (see the module docstring)."""
    from gmmrefine.geometry.rotations import axis_angle_to_matrix
    from gmmrefine.gmm.loss import ring_correlations
    from gmmrefine.io.mrc import read_map
    from gmmrefine.refine.snr import expected_correlation, fit_ring_snr, ring_weights

    t_start = time.perf_counter()
    p = Particles(sim, rows, band, ctf_mode)
    project = MapProjector(read_map(sim / "truth_map.mrc")[0], band)

    def with_ctf(proj, i):
        return proj if p.ctf_band is None else proj * p.ctf_band[i]

    truth_proj = torch.cat([with_ctf(project(p.rot[s:s + 64], p.t_px[s:s + 64]), slice(s, s + 64))
                            for s in range(0, len(rows), 64)])
    snr = fit_ring_snr(ring_correlations(truth_proj, p.target, band.ring_index, band.n_rings), p.m1, p.m2, ctf_mode)
    weights = ring_weights(expected_correlation(snr.float(), p.m1, p.m2, ctf_mode), band.ring_index, band.n_rings)

    axis = torch.arange(-grid_deg, grid_deg + 1e-9, step_deg)
    grid_rot = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)   # degrees
    saxis = torch.arange(-grid_px, grid_px + 1e-9, step_px)
    grid_t = torch.stack(torch.meshgrid(saxis, saxis, indexing="xy"), -1).reshape(-1, 2)       # px
    # exp(+2 pi i k . dt) for every grid shift: the objective over shifts is one product per rotation.
    shift_phase = torch.polar(torch.ones(()), 2 * math.pi * (project.freq_px @ grid_t.T))         # (P, S)
    ring_index, n_rings = band.ring_index, band.n_rings

    def evaluate(i: int, rot_deg: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        rot = axis_angle_to_matrix(torch.deg2rad(rot_deg.double())).float() @ p.rot[i]
        return objective(with_ctf(project(rot, p.t_px[i] + t), i), p.target[i], weights[i], band)

    ang_err, shift_err, gain, on_edge = [], [], [], 0
    for i in range(len(rows)):
        scores = []
        for s in range(0, len(grid_rot), 256):
            rot = axis_angle_to_matrix(torch.deg2rad(grid_rot[s:s + 256].double())).float() @ p.rot[i]
            y = with_ctf(project(rot, p.t_px[i].expand(len(rot), 2)), i)
            x = p.target[i].expand_as(y)
            power_y = torch.zeros(len(y), n_rings).index_add_(1, ring_index, (y.abs() ** 2).float())
            power_x = torch.zeros(1, n_rings).index_add_(1, ring_index, (x[:1].abs() ** 2).float())
            z = x * y.conj() * (weights[i] / torch.sqrt(power_x * power_y))[:, ring_index]
            scores.append((z @ shift_phase).real)                                       # (256, S)
        scores = torch.cat(scores)                                                      # (R, S)
        order = torch.argsort(scores.flatten(), descending=True)
        picks: list[tuple[torch.Tensor, torch.Tensor]] = []
        for flat in order[:2000].tolist():
            r, sh = divmod(flat, scores.shape[1])
            cand = (grid_rot[r].clone(), grid_t[sh].clone())
            if all((cand[0] - a).norm() > 2 * step_deg or (cand[1] - b).norm() > 2 * step_px for a, b in picks):
                picks.append(cand)
            if len(picks) == starts:
                break
        on_edge += int((picks[0][0].abs().max() >= grid_deg - 1e-6) or (picks[0][1].abs().max() >= grid_px - 1e-6))
        best_score, best = -math.inf, None
        for rot_deg, t in picks:
            # Compass search: try +/- h on each of the 5 axes, move to the best improvement, else halve h.
            h_rot, h_t = step_deg / 2, step_px / 2
            current = float(evaluate(i, rot_deg[None], t[None])[0])
            while h_rot > step_deg / 128:
                eye = torch.eye(5)
                moves = torch.cat([eye, -eye])
                cand_rot = rot_deg[None] + moves[:, :3] * h_rot
                cand_t = t[None] + moves[:, 3:] * h_t
                vals = evaluate(i, cand_rot, cand_t)
                k = int(torch.argmax(vals))
                if float(vals[k]) > current:
                    rot_deg, t, current = cand_rot[k], cand_t[k], float(vals[k])
                else:
                    h_rot, h_t = h_rot / 2, h_t / 2
            if current > best_score:
                best_score, best = current, (rot_deg, t)
        at_truth = float(evaluate(i, torch.zeros(1, 3), torch.zeros(1, 2))[0])
        ang_err.append(float(best[0].norm()))       # the rotation vector's length is the angle
        shift_err.append(float(best[1].norm()) * band.apix)
        gain.append(best_score - at_truth)
    ang_err, shift_err = np.array(ang_err), np.array(shift_err)
    return {"angular_error_deg": float(ang_err.mean()), "shift_error_A": float(shift_err.mean()),
            "angular_error_deg_each": ang_err.tolist(), "shift_error_A_each": shift_err.tolist(),
            "objective_gain_over_truth_min": float(np.min(gain)), "best_grid_point_on_edge": on_edge,
            "band_A": [band.minres_A, band.maxres_A], "ctf": ctf_mode, "n_particles": len(rows),
            "seconds": time.perf_counter() - t_start}


# ------------------------------------------------------------------------------------------------
# Drift from the truth against the noise-free map's GMM
# ------------------------------------------------------------------------------------------------

def drift_from_truth(sim: Path, rows: np.ndarray, band, settings: dict, passes: int = 3,
                     gmm_steps: int = 150) -> dict:
    """Mean errors after each pass of each optimiser setting (``name: (PoseSettings, ctf mode)``) started
    at the true poses, against a GMM of the noise-free map built in ``band`` (the refinement's N rule)."""
    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.geometry.rotations import rotation_angle_deg
    from gmmrefine.gmm.build import REFERENCE_SPACING_FRACTION, build_gmm, estimate_n
    from gmmrefine.io.mrc import read_map
    from gmmrefine.refine.poses import refine_poses, ring_correlations_at
    from gmmrefine.refine.snr import expected_correlation, fit_ring_snr

    vol, apix = read_map(sim / "truth_map.mrc")
    reference = low_pass(torch.as_tensor(vol), band.maxres_A, apix)
    n = estimate_n(reference, apix, band.maxres_A, spacing_fraction=REFERENCE_SPACING_FRACTION)
    gmm, info = build_gmm(reference, apix, band.maxres_A, n=n, seed=0, steps=gmm_steps)
    out = {"n_gaussians": gmm.n, "gmm_fsc09_A": info.get("resolution_fsc09_A")}
    for name, (pose, ctf_mode) in settings.items():
        p = Particles(sim, rows, band, ctf_mode)
        rot, t = p.rot.clone(), p.t_px.clone()
        errors = []
        t0 = time.perf_counter()
        for _ in range(passes):
            rho = None
            if pose.needs_snr:
                corr = ring_correlations_at(gmm, p.target, rot, t, band, ctf=p.ctf_band)
                rho = expected_correlation(fit_ring_snr(corr, p.m1, p.m2, ctf_mode).float(), p.m1, p.m2, ctf_mode)
            res = refine_poses(gmm, p.target, rot, t, band, pose, ctf=p.ctf_band, rho=rho)
            rot, t = res.rotations, res.translation_px
            errors.append((float(rotation_angle_deg(rot.double(), p.rot.double()).mean()),
                           float((t - p.t_px).norm(dim=1).mean()) * apix))
        out[name] = {"per_pass": errors, "seconds": time.perf_counter() - t0, "ctf": ctf_mode}
        if res.covariance is not None:  # the precision against the truth in the oracle setting
            from gmmrefine.refine.poses import pose_precision

            prec_deg, prec_A = pose_precision(res.covariance, apix)
            err = rotation_angle_deg(rot.double(), p.rot.double()).float()
            out[name]["error_over_precision_rms_deg"] = float(((err / prec_deg) ** 2).mean().sqrt())
    return out


# ------------------------------------------------------------------------------------------------
# Refinement runs
# ------------------------------------------------------------------------------------------------

def score_iterations(sim: Path, job: Path, truth_fsc: float, mask: np.ndarray) -> list[dict]:
    """Per iteration: pose errors, gold-standard resolution, time and convergence; the masked FSC to the
    truth for the iterations whose maps are full size (the last one, after its full-size pass; the
    others are on working grids). The final row is ``final/``."""
    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
    from gmmrefine.io.mrc import read_map
    from gmmrefine.io.particles import read_particles
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth, pose_errors

    truth = read_particles(sim / "particles.star")
    truth_map = read_map(sim / "truth_map.mrc")[0]
    rows = []
    for d in sorted(job.glob("it[0-9][0-9][0-9]")):
        k = int(d.name[2:])
        ps = read_particles(sim / "particles_perturbed.star" if k == 0 else d / "particles.star")
        ang, sh = pose_errors(ps.angles_deg, ps.shift_A, truth.angles_deg, truth.shift_A)
        fsc = json.loads((d / "fsc.json").read_text())
        h1, h2 = read_map(d / "half1.mrc")[0], read_map(d / "half2.mrc")[0]
        masked = masked_fsc_to_truth(h1, h2, truth_map, mask) if h1.shape == truth_map.shape else None
        row = {"iteration": k, "angular_error_deg": ang, "shift_error_A": sh, "gold_standard_A": fsc["resolution_A"],
               "masked_fsc": masked, "masked_fsc_over_true_poses": None if masked is None else masked / truth_fsc,
               "seconds": fsc.get("seconds"), "convergence": fsc.get("convergence", {}).get("reason")}
        if "gmmAngularPrecisionDeg" in ps.particles:
            err = rotation_angle_deg(euler_to_matrix(torch.as_tensor(ps.angles_deg)),
                                     euler_to_matrix(torch.as_tensor(truth.angles_deg))).numpy()
            dist = np.linalg.norm(ps.shift_A - truth.shift_A, axis=1)
            prec = ps.particles["gmmAngularPrecisionDeg"].to_numpy(np.float64)
            prec_A = ps.particles["gmmShiftPrecisionAngst"].to_numpy(np.float64)
            row["error_over_precision_rms_deg"] = float(np.sqrt(np.mean((err / prec) ** 2)))
            row["error_over_precision_rms_A"] = float(np.sqrt(np.mean((dist / prec_A) ** 2)))
            row["median_precision_deg"] = float(np.median(prec))
        rows.append(row)
    final = job / "final" / "particles.star"
    if rows and final.is_file() and "gmmAngularPrecisionDeg" in read_particles(final).particles:
        # final/ reports each half's precision with its reference error (after the last FSC)
        ps = read_particles(final)
        err = rotation_angle_deg(euler_to_matrix(torch.as_tensor(ps.angles_deg)),
                                 euler_to_matrix(torch.as_tensor(truth.angles_deg))).numpy()
        dist = np.linalg.norm(ps.shift_A - truth.shift_A, axis=1)
        rows[-1]["final_error_over_precision_rms_deg"] = float(
            np.sqrt(np.mean((err / ps.particles["gmmAngularPrecisionDeg"].to_numpy(np.float64)) ** 2)))
        rows[-1]["final_error_over_precision_rms_A"] = float(
            np.sqrt(np.mean((dist / ps.particles["gmmShiftPrecisionAngst"].to_numpy(np.float64)) ** 2)))
    return rows


def run_refine(sim: Path, job: Path, options: list[str], code: Path | None = None) -> float:
    """Wall seconds of ``gmmrefine refine`` from the perturbed poses (``code``: a src folder to run instead
    of the installed package, e.g. the code before this change)."""
    shutil.rmtree(job, ignore_errors=True)
    env = None if code is None else dict(os.environ, PYTHONPATH=str(code))
    t0 = time.perf_counter()
    subprocess.run(GM + ["refine", "--particles", str(sim / "particles_perturbed.star"), "--out", str(job), *options],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def true_pose_fsc(sim: Path, out: Path, mask: np.ndarray) -> float:
    """Masked FSC to the truth of a reconstruction at the true poses (``gmmrefine reconstruct --ctf wiener``,
    as the refinement's maps are made)."""
    from gmmrefine.io.mrc import read_map
    from gmmrefine.pipeline.evaluate import masked_fsc_to_truth

    rec = out / f"true_poses_{sim.name}"
    if not (rec / "half2.mrc").is_file():
        subprocess.run(GM + ["reconstruct", "--particles", str(sim / "particles.star"), "--out", str(rec), "--ctf",
                             "wiener", "--force"], check=True, stdout=subprocess.DEVNULL)
    return masked_fsc_to_truth(read_map(rec / "half1.mrc")[0], read_map(rec / "half2.mrc")[0],
                               read_map(sim / "truth_map.mrc")[0], mask)


def final_band(job: Path, box: int, apix: float, minres: float):
    """The band of the job's last iteration (its lower half-resolution estimate, as the next iteration would
    use)."""
    from gmmrefine.gmm.project import fourier_band
    from gmmrefine.refine.global_refine import RefineSettings, band_limit

    last = max(job.glob("it[0-9][0-9][0-9]"))
    res = min(json.loads((last / f"half{h}_resolution.json").read_text())["resolution_A"] for h in (1, 2))
    return fourier_band(box, apix, minres, band_limit(res, RefineSettings(minres_A=minres), apix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--apix", type=float, default=1.0)
    parser.add_argument("--snrs", type=float, nargs="+", default=[0.1, 0.03])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--minres", type=float, default=50.0)
    parser.add_argument("--ctf", default="full", help="--ctf of the Newton refinement and the floor's objective")
    parser.add_argument("--floor-n", type=int, default=300, help="particles the floor and drift are measured on")
    parser.add_argument("--paper-iterations", type=int, default=3)
    parser.add_argument("--relion", action="store_true", help="also run relion_refine_mpi local auto-refine")
    parser.add_argument("--diameter", type=float, default=70.0, help="particle diameter for RELION, A")
    parser.add_argument("--skip-refine", action="store_true", help="floors and drift only (uses existing jobs)")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="src folder of the code before this change: its refine (the paper's optimiser, "
                             "--iterations 3) is today's cost and accuracy")
    args = parser.parse_args()

    from gmmrefine.io.mrc import read_map
    from gmmrefine.refine.poses import PoseSettings

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "snr": {}}
    low = min(args.snrs)
    for snr in sorted(args.snrs):  # the lowest first: its Newton run sets the band of every floor
        sim = simulate(out, args.n, args.box, args.apix, snr, args.seed)
        truth_map, apix = read_map(sim / "truth_map.mrc")
        mask = truth_mask(truth_map, apix)
        entry: dict = {"true_pose_masked_fsc": true_pose_fsc(sim, out, mask)}
        jobs = {"newton": out / f"newton_snr{snr:g}", "paper": out / f"paper_snr{snr:g}"}
        if args.baseline is not None:
            jobs["today"] = out / f"today_snr{snr:g}"
        paper = ["--optimiser", "paper", "--ctf", "flip", "--iterations", str(args.paper_iterations)]
        if snr == low and not args.skip_refine:
            entry["newton_wall_s"] = run_refine(sim, jobs["newton"], ["--ctf", args.ctf])
            entry["paper_wall_s"] = run_refine(sim, jobs["paper"], paper)
            if "today" in jobs:
                entry["today_wall_s"] = run_refine(sim, jobs["today"], ["--iterations", str(args.paper_iterations)],
                                                   code=args.baseline)
        if jobs["newton"].is_dir():
            for name, job in jobs.items():
                entry[name] = score_iterations(sim, job, entry["true_pose_masked_fsc"], mask)
            band = final_band(jobs["newton"], args.box, apix, args.minres)
        else:  # the band the low-SNR Newton run ended at
            band = final_band(out / f"newton_snr{low:g}", args.box, apix, args.minres)
        rows = np.arange(min(args.floor_n, args.n))
        entry["floor"] = information_floor(sim, rows, band, args.ctf)
        entry["drift"] = drift_from_truth(sim, rows, band, {
            "newton": (PoseSettings(optimiser="newton", objective="snr"), args.ctf),
            "paper": (PoseSettings(optimiser="paper", objective="frc"), "flip")})
        if snr == low and args.relion:
            from gmmrefine.io.particles import read_particles

            r = run_relion(sim, jobs["newton"], out, read_particles(sim / "particles.star"), truth_map, mask, apix,
                           args.diameter)
            entry["relion"] = r | {"masked_fsc_over_true_poses": r["masked_fsc"] / entry["true_pose_masked_fsc"]}
        results["snr"][str(snr)] = entry
        (out / "results.json").write_text(json.dumps(results, indent=2))
        report(snr, entry)
    return 0


def report(snr: float, e: dict) -> None:
    f = e["floor"]
    print(f"\n== SNR {snr:g}: information floor (band {f['band_A'][0]:g}-{f['band_A'][1]:.2f} A, {f['n_particles']} "
          f"particles, {f['seconds']:.0f} s): {f['angular_error_deg']:.3f} deg / {f['shift_error_A']:.3f} A "
          f"(best grid point on the grid's edge: {f['best_grid_point_on_edge']})")
    d = e["drift"]
    print(f"from the truth against the noise-free map's GMM ({d['n_gaussians']} Gaussians), error per pass "
          "(deg / A) and ratio to the floor:")
    for name in ("newton", "paper"):
        passes = "  ".join(f"{a:.3f}/{s:.3f} ({a / f['angular_error_deg']:.2f}x)" for a, s in d[name]["per_pass"])
        calib = d[name].get("error_over_precision_rms_deg")
        print(f"  {name:7s} ({d[name]['ctf']}) {passes}" + (f"  error/precision rms {calib:.2f}" if calib else ""))
    if "newton" not in e:
        return
    print(f"masked FSC to truth at the true poses: {e['true_pose_masked_fsc']:.4f}")
    print("run     it  ang_err  shift_err  gap_ang  gap_shift  gold_A  maskedFSC  /true  err/prec(ang,shift)  seconds")
    for name in ("newton", "paper", "today"):
        if name not in e:
            continue
        rows = e[name]
        a0, s0 = rows[0]["angular_error_deg"], rows[0]["shift_error_A"]
        for r in rows:
            # fraction of the gap between the start and the floor closed (NaN if the floor is not below the start)
            gap_a = (a0 - r["angular_error_deg"]) / (a0 - f["angular_error_deg"]) if a0 > f["angular_error_deg"] \
                else float("nan")
            gap_s = (s0 - r["shift_error_A"]) / (s0 - f["shift_error_A"]) if s0 > f["shift_error_A"] else float("nan")
            calib = (f"{r['error_over_precision_rms_deg']:.2f},{r['error_over_precision_rms_A']:.2f}"
                     if "error_over_precision_rms_deg" in r else "-")
            masked = "-" if r["masked_fsc"] is None else f"{r['masked_fsc']:.4f}"
            ratio = "-" if r["masked_fsc"] is None else f"{r['masked_fsc_over_true_poses']:.3f}"
            print(f"{name:7s} {r['iteration']:2d}  {r['angular_error_deg']:7.3f}  {r['shift_error_A']:9.3f}  "
                  f"{gap_a:7.0%}  {gap_s:9.0%}  {r['gold_standard_A']:6.2f}  {masked:>9s}  {ratio:>5s}  {calib:>19s}  "
                  f"{r['seconds'] or 0:7.0f}")
        if "final_error_over_precision_rms_deg" in rows[-1]:
            print(f"{name} final/particles.star (precision with the reference's error): error/precision rms "
                  f"{rows[-1]['final_error_over_precision_rms_deg']:.2f} (rotation), "
                  f"{rows[-1]['final_error_over_precision_rms_A']:.2f} (shift)")
        per_it = [r["seconds"] for r in rows[1:] if r["seconds"]]
        print(f"{name}: wall time {e[f'{name}_wall_s']:.0f} s, {len(per_it)} iterations, "
              f"{np.mean(per_it):.0f} s per iteration")
    if "today" in e:
        t_it = np.mean([r["seconds"] for r in e["today"][1:]])
        n_it = np.mean([r["seconds"] for r in e["newton"][1:]])
        print(f"newton against today's code: {n_it / t_it:.2f}x the time per iteration, "
              f"{e['newton_wall_s'] / e['today_wall_s']:.2f}x the total time")
    if "relion" in e:
        r = e["relion"]
        print(f"relion_refine_mpi: {r['wall_s']:.0f} s, {r['iterations']} iterations, {r['angular_error_deg']:.3f} deg, "
              f"{r['shift_error_A']:.3f} A, masked FSC {r['masked_fsc']:.4f} ({r['masked_fsc_over_true_poses']:.3f} of "
              "true poses)")


if __name__ == "__main__":
    sys.exit(main())

"""Scores of a refinement against a simulation's truth (demo and benchmarks)."""

from __future__ import annotations

import numpy as np
import torch

from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at
from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg


def pose_errors(angles_deg: np.ndarray, shift_A: np.ndarray, true_angles_deg: np.ndarray,
                true_shift_A: np.ndarray) -> tuple[float, float]:
    """Mean geodesic angle (degrees) and mean origin distance (angstrom) between poses and the truth.

    Args:
        angles_deg, true_angles_deg: ``(N, 3)`` RELION Euler angles.
        shift_A, true_shift_A: ``(N, 2)`` RELION origins in angstrom.
    """
    err = rotation_angle_deg(euler_to_matrix(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64))),
                             euler_to_matrix(torch.as_tensor(np.asarray(true_angles_deg, dtype=np.float64))))
    dist = np.linalg.norm(np.asarray(shift_A, dtype=np.float64) - np.asarray(true_shift_A, dtype=np.float64), axis=1)
    return float(err.mean()), float(dist.mean())


def on_grid_of(reference: np.ndarray | torch.Tensor, volume: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``volume`` (e.g. a noise-free map of the particles' full box) on the grid of ``reference`` (a half
    map of an iteration, made on a grid cropped to its band; same physical size): Fourier-cropped when
    the reference's box is smaller."""
    from gmmrefine.fourier.fft import downsample_map

    vol = torch.as_tensor(np.asarray(volume))
    return downsample_map(vol, int(np.asarray(reference).shape[-1]))


def resolution_to_truth(half1: np.ndarray, half2: np.ndarray, truth_map: np.ndarray, apix: float,
                        threshold: float = 0.5) -> float:
    """Resolution (A) where the FSC of the halves' average to the noise-free map falls below ``threshold``.

    ``apix`` is the noise-free map's pixel size; half maps on a smaller grid of the same physical size
    are compared on theirs."""
    avg = torch.as_tensor(0.5 * (np.asarray(half1) + np.asarray(half2)))
    truth = on_grid_of(avg, truth_map)
    curve = fourier_shell_correlation(avg, truth)
    return resolution_at(curve, avg.shape[-1], apix * np.asarray(truth_map).shape[-1] / avg.shape[-1], threshold)


def masked_fsc_to_truth(half1, half2, truth_map, mask, max_shell: int | None = None) -> float:
    """Mean over the shells up to Nyquist, or up to ``max_shell`` (shell 0 left out), of the FSC between
    the masked average of two half maps and the masked noise-free map: how close a region of a
    reconstruction is to the truth. A shell is ``box * apix / resolution`` on every grid of the same
    physical size, so ``max_shell`` compares maps on different grids over the same band."""
    avg = 0.5 * (torch.as_tensor(np.asarray(half1)) + torch.as_tensor(np.asarray(half2)))
    m = on_grid_of(avg, mask).clamp(0, 1)
    curve = fourier_shell_correlation(avg * m, on_grid_of(avg, truth_map) * m)
    return float(curve[1:None if max_shell is None else max_shell + 1].mean())


def simulation_masks(sim_dir) -> dict[str, torch.Tensor]:
    """Evaluation masks of a simulated data set with a hinged domain: ``domain`` (its
    ``domain_mask.mrc``), ``whole`` (the noise-free map low-passed to 8 A, thresholded at a fifth of its
    peak, dilated by 1 px with a 2-px edge) and ``rest`` (``whole`` outside the domain)."""
    from pathlib import Path

    from gmmrefine.fourier.filters import low_pass
    from gmmrefine.fourier.masks import mask_from_map
    from gmmrefine.io.mrc import read_map

    sim_dir = Path(sim_dir)
    truth, apix = read_map(sim_dir / "truth_map.mrc")
    smooth = low_pass(torch.as_tensor(truth), 8.0, apix)
    whole = mask_from_map(smooth, 0.2 * float(smooth.max()), dilate_px=1, edge_px=2)
    domain = torch.as_tensor(read_map(sim_dir / "domain_mask.mrc")[0])
    return {"domain": domain, "rest": (whole - domain).clamp(0, 1), "whole": whole}


def domain_pose_errors(truth_particles, angles_deg: np.ndarray, symmetry: str = "C1") -> np.ndarray:
    """Per-particle angle (degrees) between refined poses and the hinged domain's true poses.

    Args:
        truth_particles: the particle table of a simulation's ``truth.star`` (``gmmDomainRot/Tilt/Psi``,
            or ``gmmDomainRot1..K`` etc. for an assembly of ``K`` copies).
        angles_deg: ``(N, 3)`` refined RELION angles, or ``(N K, 3)`` for a symmetry-expanded set
            (row ``n K + k``: particle ``n`` seen through operator ``k``).
        symmetry: the assembly's point group.

    Returns:
        ``(N,)`` or ``(N K,)``: the domain's true pose is ``A H`` (``A R_k H_k`` for copy ``k``); a
        non-expanded ``(N, 3)`` input is expanded for an assembly.
    """
    from gmmrefine.geometry.symmetry import expand_poses, symmetry_operators

    t = truth_particles
    a = euler_to_matrix(torch.tensor(t[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(np.float64)))
    ops = symmetry_operators(symmetry)
    if len(ops) == 1:
        h = euler_to_matrix(torch.tensor(t[["gmmDomainRot", "gmmDomainTilt", "gmmDomainPsi"]].to_numpy(np.float64)))
        truth = a @ h
    else:
        h = torch.stack([euler_to_matrix(torch.tensor(
            t[[f"gmmDomainRot{k}", f"gmmDomainTilt{k}", f"gmmDomainPsi{k}"]].to_numpy(np.float64)))
            for k in range(1, len(ops) + 1)], 1)
        truth = (a[:, None] @ ops[None] @ h).reshape(-1, 3, 3)
    refined = euler_to_matrix(torch.as_tensor(np.array(angles_deg, dtype=np.float64)))
    if len(refined) != len(truth):
        refined = expand_poses(refined, symmetry)
    return rotation_angle_deg(refined, truth).numpy()

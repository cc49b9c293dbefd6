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


def resolution_to_truth(half1: np.ndarray, half2: np.ndarray, truth_map: np.ndarray, apix: float,
                        threshold: float = 0.5) -> float:
    """Resolution (A) where the FSC of the halves' average to the noise-free map falls below ``threshold``."""
    avg = torch.as_tensor(0.5 * (np.asarray(half1) + np.asarray(half2)))
    curve = fourier_shell_correlation(avg, torch.as_tensor(np.asarray(truth_map)))
    return resolution_at(curve, avg.shape[-1], apix, threshold)

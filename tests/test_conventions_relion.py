"""Pose, origin and CTF conventions measured against RELION 3.1's ``relion_project``.

Every later number stands on these: the Euler matrix (``euler_to_matrix``), the origin sign
(``image_translation_px``), the Fourier-slice projector (``project_map``) and the CTF (``ctf_for_box``)
must reproduce what RELION makes from the same STAR file.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from gmmrefine.fourier.ctf import ctf_for_box, phase_flip
from gmmrefine.fourier.fft import irfft2_centered, rfft2_centered
from gmmrefine.fourier.project import project_map
from gmmrefine.geometry.rotations import euler_to_matrix, project_points
from gmmrefine.geometry.shifts import image_translation_px

BOX = 48
APIX = 2.0
OPTICS = {"voltage": 300.0, "cs": 2.7, "q0": 0.1}

# (x, y, z) px from the centre, sigma px, amplitude: an asymmetric test particle.
BLOBS = [((6, -3, 2), 2.5, 1.0), ((-8, 5, -4), 3.0, 0.8), ((2, 9, 7), 2.0, 1.2), ((-4, -9, -6), 2.2, 0.6),
         ((10, 2, -9), 1.8, 0.9)]


def _gaussian_map(box: int, blobs) -> np.ndarray:
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((box,) * 3, np.float32)
    for (cx, cy, cz), sigma, amp in blobs:
        vol += amp * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return vol


def _write_map(path: Path, vol: np.ndarray, apix: float) -> None:
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(vol.astype(np.float32))
        m.voxel_size = apix


def _write_star(path: Path, box: int, apix: float, rows: dict[str, np.ndarray]) -> None:
    """A RELION 3.1 STAR file (one optics group) with the given particle columns."""
    lines = ["", "data_optics", "", "loop_"]
    optics = {"rlnOpticsGroup": 1, "rlnOpticsGroupName": "opticsGroup1", "rlnImagePixelSize": apix,
              "rlnImageSize": box, "rlnVoltage": OPTICS["voltage"], "rlnSphericalAberration": OPTICS["cs"],
              "rlnAmplitudeContrast": OPTICS["q0"], "rlnImageDimensionality": 2}
    lines += [f"_{k} #{i + 1}" for i, k in enumerate(optics)]
    lines += [" ".join(str(v) for v in optics.values()), "", "", "data_particles", "", "loop_"]
    cols = {"rlnOpticsGroup": np.ones(len(next(iter(rows.values()))), int), **rows}
    lines += [f"_{k} #{i + 1}" for i, k in enumerate(cols)]
    n = len(cols["rlnOpticsGroup"])
    for r in range(n):
        lines.append(" ".join(f"{cols[k][r]:.6f}" if np.issubdtype(np.asarray(cols[k]).dtype, np.floating)
                              else str(cols[k][r]) for k in cols))
    path.write_text("\n".join(lines) + "\n")


def _relion_project(tmp: Path, vol: np.ndarray, rows: dict, *args: str, name: str = "proj") -> torch.Tensor:
    _write_map(tmp / "map.mrc", vol, APIX)
    _write_star(tmp / f"{name}.star", vol.shape[0], APIX, rows)
    subprocess.run(["relion_project", "--i", "map.mrc", "--ang", f"{name}.star", "--o", f"{name}_out", *args],
                   cwd=tmp, check=True, capture_output=True)
    return torch.tensor(mrcfile.read(tmp / f"{name}_out.mrcs").copy()).reshape(-1, vol.shape[0], vol.shape[0])


def _poses(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    angles = np.stack([g.uniform(-180, 180, n), np.degrees(np.arccos(g.uniform(-1, 1, n))),
                       g.uniform(-180, 180, n)], 1)
    # tilts at and near the gimbal-lock poles
    angles[0, 1], angles[1, 1], angles[2, 1], angles[3, 1] = 0.0, 0.7, 179.4, 180.0
    origins_A = g.uniform(-8, 8, (n, 2))
    origins_A[0] = (10.0, 0.0)
    return angles, origins_A


def _pose_columns(angles: np.ndarray, origins_A: np.ndarray) -> dict:
    return {"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1], "rlnAnglePsi": angles[:, 2],
            "rlnOriginXAngst": origins_A[:, 0], "rlnOriginYAngst": origins_A[:, 1]}


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last two axes."""
    a = a - a.mean(dim=(-2, -1), keepdim=True)
    b = b - b.mean(dim=(-2, -1), keepdim=True)
    return (a * b).sum(dim=(-2, -1)) / (a.norm(dim=(-2, -1)) * b.norm(dim=(-2, -1)))


def _ours(vol: np.ndarray, angles: np.ndarray, origins_A: np.ndarray) -> torch.Tensor:
    matrices = euler_to_matrix(torch.tensor(angles)).float()
    shift_px = image_translation_px(torch.tensor(origins_A), APIX).float()
    return project_map(torch.tensor(vol), matrices, shift_px=shift_px)


def _ctf_kwargs(rows: dict) -> dict:
    """``ctf_2d`` keywords for the particle columns written by ``_write_star`` (optics from OPTICS)."""
    n = len(rows["rlnDefocusU"])

    def col(label: str, default: float) -> torch.Tensor:
        return torch.tensor(np.asarray(rows.get(label, np.full(n, default)), dtype=np.float64))

    return dict(defocus_u_A=col("rlnDefocusU", 0.0), defocus_v_A=col("rlnDefocusV", 0.0),
                defocus_angle_deg=col("rlnDefocusAngle", 0.0), voltage_kV=torch.full((n,), OPTICS["voltage"]),
                cs_mm=torch.full((n,), OPTICS["cs"]), amplitude_contrast=torch.full((n,), OPTICS["q0"]),
                phase_shift_deg=col("rlnPhaseShift", 0.0), bfactor_A2=col("rlnCtfBfactor", 0.0))


@pytest.mark.relion
def test_blob_position_follows_euler_matrix_and_origin(tmp_path):
    """A single blob at r lands at (A r)_xy - origin / apix in RELION's image ([y, x], centre D//2)."""
    centre = np.array([7.0, -4.0, 3.0])
    vol = _gaussian_map(BOX, [(tuple(centre), 1.5, 1.0)])
    angles, origins_A = _poses(12, seed=3)
    angles[0] = 0.0  # identity pose, origin x = +10 A = +5 px
    img = _relion_project(tmp_path, vol, _pose_columns(angles, origins_A))
    expected = project_points(torch.tensor(centre)[None], euler_to_matrix(torch.tensor(angles)))[:, 0, :2]
    expected = expected + image_translation_px(torch.tensor(origins_A), APIX)
    coords = torch.arange(BOX, dtype=torch.float64) - BOX // 2
    img = img.double()
    # centroid of the peak only: sub-pixel origins leave faint interpolation ripples elsewhere
    weights = torch.where(img > 0.2 * img.amax(dim=(1, 2), keepdim=True), img, torch.zeros_like(img))
    measured_x = (weights.sum(1) * coords).sum(-1) / weights.sum((1, 2))
    measured_y = (weights.sum(2) * coords).sum(-1) / weights.sum((1, 2))
    err = (torch.stack([measured_x, measured_y], -1) - expected).norm(dim=-1)
    assert err.max() < 0.15, err  # sampling bias of a thresholded centroid; a wrong convention is pixels off
    # identity pose: the blob at x = +7 px appears at 7 - 10 A / 2 A/px = +2 px, y unchanged
    assert abs(measured_x[0] - 2.0) < 0.15 and abs(measured_y[0] - centre[1]) < 0.15


@pytest.mark.relion
def test_project_map_matches_relion_project(tmp_path):
    vol = _gaussian_map(BOX, BLOBS)
    angles, origins_A = _poses(20)
    rows = _pose_columns(angles, origins_A)
    relion = _relion_project(tmp_path, vol, rows)
    ours = _ours(vol, angles, origins_A)
    corr = _corr(ours, relion)
    assert corr.min() > 0.999, corr
    scale = ours.std(dim=(-2, -1)) / relion.std(dim=(-2, -1))
    assert (scale - 1).abs().max() < 0.01, scale  # same amplitude: a sum along z, no normalisation
    rel_err = (ours - relion).norm(dim=(-2, -1)) / relion.norm(dim=(-2, -1))
    assert rel_err.max() < 2e-3, rel_err  # measured 1.4e-4: same padding, gridding and interpolation
    # a wrong convention (transposed matrix, or origin sign flipped) is far off
    wrong = project_map(torch.tensor(vol), euler_to_matrix(torch.tensor(angles)).float().transpose(-1, -2),
                        shift_px=image_translation_px(torch.tensor(origins_A), APIX).float())
    assert _corr(wrong, relion)[4:].mean() < 0.8
    flipped = _ours(vol, angles, -origins_A)
    assert _corr(flipped, relion)[0] < 0.9


@pytest.mark.relion
def test_project_times_ctf_matches_relion_ctf_and_phase_flip(tmp_path):
    vol = _gaussian_map(BOX, BLOBS)
    angles, origins_A = _poses(8, seed=1)
    g = np.random.default_rng(5)
    rows = _pose_columns(angles, origins_A)
    rows.update(rlnDefocusU=g.uniform(8000, 20000, 8), rlnDefocusAngle=g.uniform(-90, 180, 8))
    rows["rlnDefocusV"] = rows["rlnDefocusU"] - g.uniform(500, 4000, 8)
    relion_ctf = _relion_project(tmp_path, vol, rows, "--ctf", name="ctf")
    relion_flip = _relion_project(tmp_path, vol, rows, "--ctf", "--ctf_phase_flip", name="flip")

    spectra = rfft2_centered(_ours(vol, angles, origins_A))
    ctf = ctf_for_box(BOX, APIX, **_ctf_kwargs(rows))
    ours_ctf = irfft2_centered(spectra * ctf, BOX)
    assert _corr(ours_ctf, relion_ctf).min() > 0.999
    # RELION 3.1's --ctf_phase_flip writes the CTF-modulated projection with its phases flipped,
    # i.e. projection * |CTF|, which is phase_flip(projection * CTF).
    ours_flip = irfft2_centered(phase_flip(spectra * ctf, ctf), BOX)
    assert _corr(ours_flip, relion_flip).min() > 0.999


def _relion_ctf_image(tmp: Path, box: int, rows: dict) -> torch.Tensor:
    """RELION's CTF on the rfft2 grid: --ctf projection of a delta map over the plain projection."""
    delta = np.zeros((box,) * 3, np.float32)
    delta[box // 2, box // 2, box // 2] = 1.0
    n = len(rows["rlnDefocusU"])
    rows = {**_pose_columns(np.zeros((n, 3)), np.zeros((n, 2))), **rows}
    with_ctf = rfft2_centered(_relion_project(tmp, delta, rows, "--ctf", name="ctfcurve").double())
    without = rfft2_centered(_relion_project(tmp, delta, rows, name="plain").double())
    return (with_ctf / without).real


@pytest.mark.relion
@pytest.mark.parametrize("case", ["astigmatic", "phase_plate", "bfactor"])
def test_ctf_for_box_matches_relion_ctf_curve(tmp_path, case):
    rows = {"rlnDefocusU": np.array([12000.0, 25000.0]), "rlnDefocusV": np.array([9000.0, 21000.0]),
            "rlnDefocusAngle": np.array([30.0, -65.0])}
    if case == "phase_plate":
        rows.update(rlnDefocusU=np.array([5000.0, 8000.0]), rlnDefocusV=np.array([5000.0, 7000.0]),
                    rlnPhaseShift=np.array([90.0, 45.0]))
    if case == "bfactor":
        rows["rlnCtfBfactor"] = np.array([50.0, 200.0])
    relion = _relion_ctf_image(tmp_path, BOX, rows)
    ours = ctf_for_box(BOX, APIX, dtype=torch.float64, **_ctf_kwargs(rows))
    inside = (torch.fft.fftfreq(BOX)[:, None] ** 2 + torch.fft.rfftfreq(BOX)[None] ** 2) <= 0.24
    corr = torch.stack([torch.corrcoef(torch.stack([ours[i][inside], relion[i][inside]]))[0, 1] for i in range(2)])
    assert corr.min() > 0.99, corr
    strong = (ours.abs() > 0.2) & inside
    agree = (torch.sign(ours) == torch.sign(relion))[strong].double().mean()
    assert agree > 0.99, agree
    assert (ours - relion)[:, inside].abs().max() < 1e-3  # measured 1e-7: the same formula
    if case == "astigmatic":
        kwargs = _ctf_kwargs(rows)
        mirrored = ctf_for_box(BOX, APIX, dtype=torch.float64,
                               **{**kwargs, "defocus_angle_deg": -kwargs["defocus_angle_deg"]})
        assert (torch.sign(mirrored) == torch.sign(relion))[strong].double().mean() < 0.95
    if case == "phase_plate":
        no_plate = ctf_for_box(BOX, APIX, dtype=torch.float64, **{**_ctf_kwargs(rows), "phase_shift_deg": 0.0})
        assert (no_plate - relion)[:, inside].abs().max() > 0.5  # relion_project honours rlnPhaseShift
    if case == "bfactor":
        no_b = ctf_for_box(BOX, APIX, dtype=torch.float64, **{**_ctf_kwargs(rows), "bfactor_A2": 0.0})
        assert (no_b - relion)[:, inside].abs().max() > 0.3  # relion_project honours rlnCtfBfactor


@pytest.mark.relion
def test_odd_box_relion_project_is_one_pixel_off_our_centre(tmp_path):
    """Documents a RELION quirk: for odd boxes relion_project's images sit +1 px in x and y from the
    direct sum along z (our centre, voxel D // 2), whatever the pose. RELION refines even boxes only,
    so gmmrefine keeps one centre convention and its RELION cross-checks use even boxes."""
    box = 49
    vol = _gaussian_map(box, BLOBS)
    angles = np.array([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [10.0, 50.0, 70.0], [-100.0, 120.0, 33.0]])
    origins_A = np.array([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [3.0, 5.0]])
    relion = _relion_project(tmp_path, vol, _pose_columns(angles, origins_A)).double()
    direct = torch.tensor(vol.sum(0), dtype=torch.float64)
    assert _corr(project_map(torch.tensor(vol), euler_to_matrix(torch.zeros(1, 3)).float())[0].double(),
                 direct).item() > 0.9995
    matrices = euler_to_matrix(torch.tensor(angles)).float()
    shift = image_translation_px(torch.tensor(origins_A), APIX).float() + 1.0
    ours = project_map(torch.tensor(vol), matrices, shift_px=shift).double()
    assert ((ours - relion).norm(dim=(-2, -1)) / relion.norm(dim=(-2, -1))).max() < 2e-3
    unshifted = project_map(torch.tensor(vol), matrices, shift_px=shift - 1.0).double()
    assert _corr(unshifted, relion).max() < 0.95

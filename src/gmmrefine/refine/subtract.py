"""Signal subtraction for multi-body refinement: the rest of the particle taken out of each image.

A body can be aligned in two ways (``refine --bodies ... --body-context``). ``width`` is the paper's
focused refinement: the whole GMM, widened outside the body's mask (:func:`gmmrefine.gmm.masks.width_mask`).
``subtract`` is RELION's multi-body idea done on the model instead of a voxel map: the GMM is split by
the body's mask into the body, ``A_i M(c_i)``, and the rest, ``A_i (1 - M(c_i))``
(:func:`split_gmm`); before a body is aligned, the rest's projection at the particle's consensus pose,
times the particle's CTF, is subtracted from its Fourier coefficients in the band
(:func:`subtract_rest`), and what is left is compared with the body alone. No map is projected: the
rest is a sum of Gaussians whose projections are exact (and as cheap as one step of the optimiser).

In the first iteration the rest comes from the half's GMM of the refinement the bodies start from (the
consensus), at its consensus poses (:func:`consensus_subtraction`). From the second on, the bodies run in
lock-step, as RELION's multi-body refinement does (:func:`lockstep_subtraction`): what lies in another
body's mask is that body's GMM of the previous iteration at the poses it gave that body, so a body is
aligned against images from which the others have been taken out where they are now, not where the
consensus put them; only what no mask holds stays at the consensus. The GMM's amplitudes are on their own
scale, so the scale of the subtracted model is measured per Fourier ring (:func:`measure_scale`): the
least-squares factor between the half's particles and the whole consensus GMM projected at their consensus
poses, on the sample the per-ring SNR is measured on. Everything here is one half's own: its GMMs, its
particles, its poses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from gmmrefine.geometry.rotations import euler_to_matrix
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.gmm.masks import sample_volume
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import FourierBand, project_gmm

#: A Gaussian's share of a body below this is none (mask values carry float rounding).
_NONE = 1e-4
#: Particles whose rest is projected at once (memory: one ``(B, P)`` complex array per batch).
_BATCH = 64


@dataclass
class PosedPart:
    """Gaussians projected at their own per-particle poses: another body where it is in each image, or the
    rest of the consensus at the consensus poses.

    Attributes:
        gmm: the body's Gaussians (amplitudes already weighted by its share, :func:`weighted_gmm`).
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` that body's poses of all particles (input order).
    """

    gmm: GaussianMixture
    angles_deg: np.ndarray
    shift_A: np.ndarray


@dataclass
class Subtraction:
    """What is subtracted from one half's images before its body is aligned.

    Attributes:
        parts: every subtracted model with the poses it is projected at. The first iteration subtracts one:
            the Gaussians of the consensus GMM outside the body, amplitudes ``A_i (1 - M(c_i))``
            (:func:`split_gmm`), at the consensus poses; lock-step iterations subtract each other body at
            its own poses, and what no other body's mask holds at the consensus poses.
        whole: the consensus GMM (the per-ring scale is measured against it).
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` consensus poses of all particles (input order).
        scale: ``(R,)`` per-ring factor of the band the half is refined in (:func:`measure_scale`);
            None until measured.
    """

    parts: tuple[PosedPart, ...]
    whole: GaussianMixture
    angles_deg: np.ndarray
    shift_A: np.ndarray
    scale: torch.Tensor | None = None

    def to(self, device) -> Subtraction:
        def gmm(g: GaussianMixture) -> GaussianMixture:
            return g.to(device=device, dtype=torch.float32)

        return dataclasses.replace(self, whole=gmm(self.whole),
                                   scale=None if self.scale is None else self.scale.to(device),
                                   parts=tuple(dataclasses.replace(m, gmm=gmm(m.gmm)) for m in self.parts))


def split_gmm(gmm: GaussianMixture, mask: torch.Tensor, apix: float) -> tuple[GaussianMixture, GaussianMixture]:
    """The body and the rest of a GMM: amplitudes times ``M(c)`` and ``1 - M(c)`` at each centre.

    Args:
        gmm: the GMM; mask: ``(D, D, D)`` body mask in [0, 1] on the GMM's box; apix: A/voxel of the mask.

    Returns:
        ``(body, rest)``, each holding only the Gaussians with a non-zero share (their sum is ``gmm``).
    """
    mask = torch.as_tensor(mask)
    return weighted_gmm(gmm, mask, apix), weighted_gmm(gmm, 1.0 - mask, apix)


def weighted_gmm(gmm: GaussianMixture, weight: torch.Tensor, apix: float) -> GaussianMixture:
    """A GMM's share of a weight volume: amplitudes times ``W(c)`` at each centre, the Gaussians with no
    share dropped.

    Args:
        gmm: the GMM; weight: ``(D, D, D)`` values in [0, 1] on the GMM's box; apix: A/voxel of ``weight``.
    """
    w = sample_volume(weight, gmm.centers_A.detach(), apix).clamp(0.0, 1.0).to(gmm.amplitudes.dtype)
    # Interpolation leaves float rounding beside 0 and 1; such a share is none.
    w = torch.where(w < _NONE, torch.zeros_like(w), torch.where(w > 1 - _NONE, torch.ones_like(w), w))
    keep = w > 0
    return GaussianMixture(gmm.centers_A[keep], gmm.amplitudes[keep] * w[keep], gmm.widths_A[keep])


def model_ctf(ctf_band_full: torch.Tensor, ctf_mode: str) -> torch.Tensor:
    """What multiplies a projection to model the compared coefficients: the CTF (``full``), or its
    magnitude (``flip``: the particle's coefficients are phase-flipped). ``(B, P)`` -> ``(B, P)``."""
    return ctf_band_full if ctf_mode == "full" else ctf_band_full.abs()


def _poses(angles_deg: np.ndarray, shift_A: np.ndarray, idx: np.ndarray, band: FourierBand
           ) -> tuple[torch.Tensor, torch.Tensor]:
    rot = euler_to_matrix(torch.as_tensor(angles_deg[idx], device=band.device)).to(torch.float32)
    t0 = image_translation_px(torch.as_tensor(shift_A[idx], device=band.device), band.apix).to(torch.float32)
    return rot, t0


def _project(gmm: GaussianMixture, rot: torch.Tensor, t0: torch.Tensor, band: FourierBand) -> torch.Tensor:
    gmm = gmm.to(device=band.device, dtype=torch.float32)
    with torch.no_grad():
        return torch.cat([project_gmm(gmm, rot[s:s + _BATCH], t0[s:s + _BATCH], band)
                          for s in range(0, rot.shape[0], _BATCH)])


def subtract_rest(target: torch.Tensor, ctf_band_full: torch.Tensor, sub: Subtraction, idx: np.ndarray,
                  band: FourierBand, ctf_mode: str) -> torch.Tensor:
    """Particles' band coefficients less the rest's projection: each of ``sub.parts`` at its own poses.

    Args:
        target: ``(B, P)`` compared coefficients (:func:`gmmrefine.refine.global_refine.comparison_inputs`).
        ctf_band_full: ``(B, P)`` the particles' CTF in the band.
        sub: the half's subtraction, its ``scale`` measured on this band.
        idx: ``(B,)`` the particles' rows in the particle set.
        band, ctf_mode: as the refinement uses them.

    Returns:
        ``(B, P)`` complex64.
    """
    assert sub.scale is not None, "subtract_rest: measure the scale first (measure_scale)"
    rest = torch.zeros_like(target)
    for part in sub.parts:
        if part.gmm.n:
            rest += _project(part.gmm, *_poses(part.angles_deg, part.shift_A, idx, band), band)
    return target - sub.scale[band.ring_index] * model_ctf(ctf_band_full, ctf_mode) * rest


def measure_scale(ps, indices: np.ndarray, sub: Subtraction, band: FourierBand, ctf_mode: str, device) -> torch.Tensor:
    """Per-ring least-squares scale of the whole GMM to a half's particles at their consensus poses.

    ``s_r = sum Re(conj(C P) X) / sum |C P|^2`` over the pixels of ring ``r`` of the sampled particles
    (``X`` their compared coefficients, ``P`` the whole GMM's projection, ``C`` :func:`model_ctf`), on the
    sample :func:`gmmrefine.refine.global_refine.measure_ring_snr` uses: the half's own particles only.

    Returns:
        ``(R,)`` float32 on ``device``.
    """
    from gmmrefine.refine.global_refine import _sample_blocks, sample_rows

    num = torch.zeros(band.n_rings, dtype=torch.float64, device=device)
    den = torch.zeros(band.n_rings, dtype=torch.float64, device=device)
    for b in _sample_blocks(ps, indices, sample_rows(len(indices)), sub.angles_deg[indices], sub.shift_A[indices],
                            band, ctf_mode, device):
        model = model_ctf(b.ctf_full, ctf_mode) * _project(sub.whole, b.rotations, b.translation_px, band)
        num.index_add_(0, band.ring_index, (model.conj() * b.target).real.sum(0).to(torch.float64))
        den.index_add_(0, band.ring_index, model.abs().square().sum(0).to(torch.float64))
    return (num / den.clamp_min(1e-30)).to(torch.float32)


def body_transform(masks: dict[int, torch.Tensor], apix: float):
    """The GMM transform of a body aligned with subtraction: half ``h``'s GMM inside ``masks[h]`` only
    (for :func:`~gmmrefine.refine.global_refine.run_global_refinement`, ``gmm_transform``)."""
    def transform(half: int, gmm: GaussianMixture) -> GaussianMixture:
        return split_gmm(gmm, masks[half], apix)[0]

    return transform


def consensus_subtraction(start_dir, masks: dict[int, torch.Tensor], apix: float, angles_deg: np.ndarray,
                          shift_A: np.ndarray):
    """``half -> Subtraction`` of a body: the rest of the half's consensus GMM (``start_dir/gmm_half{h}.npz``,
    the iteration the bodies start from) outside ``masks[h]``, at the consensus poses ``(N, 3)`` degrees
    and ``(N, 2)`` A (for :func:`~gmmrefine.refine.global_refine.run_global_refinement`, ``subtraction``)."""
    from pathlib import Path

    def subtraction(half: int) -> Subtraction:
        whole = GaussianMixture.load(Path(start_dir) / f"gmm_half{half}.npz")
        angles, shifts = np.asarray(angles_deg), np.asarray(shift_A)
        return Subtraction(parts=(PosedPart(split_gmm(whole, masks[half], apix)[1], angles, shifts),), whole=whole,
                           angles_deg=angles, shift_A=shifts)

    return subtraction


def lockstep_subtraction(job_path, plan: dict, index: int, k: int, masks: dict[int, torch.Tensor], apix: float,
                         angles_deg: np.ndarray, shift_A: np.ndarray):
    """``half -> Subtraction`` of body ``index`` in iteration ``k`` of a lock-step multi-body refinement.

    Iteration 1 is :func:`consensus_subtraction`. From iteration 2 on, every other body ``c`` is taken
    out with its own GMM and poses of iteration ``k - 1`` (``patches/bNN/itK``: the GMM it was aligned
    against and the poses that alignment gave, a consistent pair), in its share of what lies outside
    this body, ``(1 - M_b) M_c / max(1, sum_c M_c)``; what no other mask holds,
    ``(1 - M_b)(1 - min(1, sum_c M_c))``, stays the consensus GMM at the consensus poses. The shares and
    the body's own ``M_b`` add up to 1 everywhere, so nothing is subtracted twice where masks overlap.
    Half ``h`` reads only half ``h``'s files.

    Args:
        job_path: the multi-body job; plan: its ``patches/patches.json``; index: the body (0-based).
        k: the iteration about to run (>= 1).
        masks: ``half -> (D, D, D)`` this body's mask; apix: A/voxel of the masks.
        angles_deg, shift_A: ``(N, 3)``, ``(N, 2)`` consensus poses.
    """
    from pathlib import Path
    from types import SimpleNamespace

    from gmmrefine.io.mrc import read_map
    from gmmrefine.refine.global_refine import current_poses, it_dir

    job_path = Path(job_path)
    start_dir = job_path / plan["start_dir"]
    if k <= 1:
        return consensus_subtraction(start_dir, masks, apix, angles_deg, shift_A)
    others = [p["name"] for i, p in enumerate(plan["patches"]) if i != index]

    def subtraction(half: int) -> Subtraction:
        whole = GaussianMixture.load(start_dir / f"gmm_half{half}.npz")
        outside = 1.0 - torch.as_tensor(masks[half])
        other_masks = [torch.as_tensor(read_map(job_path / "patches" / c / f"mask_half{half}.mrc")[0]) for c in others]
        claimed = torch.stack(other_masks).sum(0)
        consensus = SimpleNamespace(angles_deg=angles_deg, shift_A=shift_A)
        parts = [PosedPart(weighted_gmm(whole, outside * (1.0 - claimed.clamp(max=1.0)), apix),
                           np.asarray(angles_deg), np.asarray(shift_A))]
        for name, m in zip(others, other_masks):
            stage = SimpleNamespace(path=job_path / "patches" / name)
            # this half's rows only (the other half's stay at the consensus, its files unread)
            poses = current_poses(stage, consensus, k - 1, halves=(half,))
            gmm = GaussianMixture.load(stage.path / it_dir(k - 1) / f"gmm_half{half}.npz")
            parts.append(PosedPart(weighted_gmm(gmm, outside * m / claimed.clamp(min=1.0), apix), *poses))
        return Subtraction(parts=tuple(parts), whole=whole, angles_deg=np.asarray(angles_deg),
                           shift_A=np.asarray(shift_A))

    return subtraction

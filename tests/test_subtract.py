"""Signal subtraction for multi-body refinement (:mod:`gmmrefine.refine.subtract`): the body and the rest
of a GMM add up to it, and particles made from a GMM leave exactly the body's projection once the rest
is subtracted, with the scale measured from the particles as written on disk (poses, origins, CTFs)."""

import numpy as np
import pytest
import torch
from _io_testdata import particle_values, star31_text, write_dataset

from gmmrefine.fourier.fft import irfft2_centered
from gmmrefine.geometry.rotations import euler_to_matrix
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import fourier_band, project_gmm
from gmmrefine.io.mrc import write_stack
from gmmrefine.io.particles import read_particles
from gmmrefine.reconstruct.invert import _ctf_of
from gmmrefine.refine.subtract import PosedPart, Subtraction, measure_scale, split_gmm, subtract_rest

BOX, APIX = 32, 2.0


def _gmm(n: int = 60, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(n, 3, generator=g, dtype=torch.float32) * 6.0,
                           torch.rand(n, generator=g, dtype=torch.float32) + 0.5,
                           torch.rand(n, generator=g, dtype=torch.float32) * 1.5 + 2.0)


def _half_space_mask(box: int = BOX) -> torch.Tensor:
    """1 where x > 2 px from the centre, 0 where x < -2 px, linear in between."""
    x = torch.arange(box, dtype=torch.float32) - box // 2
    return ((x + 2) / 4).clamp(0, 1).expand(box, box, box).contiguous()


def test_split_gmm_body_and_rest_add_up_to_the_whole():
    gmm = _gmm()
    body, rest = split_gmm(gmm, _half_space_mask(), APIX)
    whole = gmm.render_map(BOX, APIX)
    assert torch.allclose(body.render_map(BOX, APIX) + rest.render_map(BOX, APIX), whole, atol=1e-5 * float(whole.max()))
    x_px = gmm.centers_A[:, 0] / APIX
    assert body.n == int((x_px > -2).sum()) and rest.n == int((x_px < 2).sum())
    assert body.n < gmm.n and rest.n < gmm.n


@pytest.mark.parametrize("ctf_mode", ["full", "flip"])
def test_subtract_rest_leaves_the_body_of_model_particles(ctf_mode):
    gmm = _gmm(seed=1)
    body, rest = split_gmm(gmm, _half_space_mask(), APIX)
    n = 12
    values = particle_values(n, seed=2)
    angles = np.stack([values["rot"], values["tilt"], values["psi"]], 1)
    shift_A = np.stack([values["ox_A"], values["oy_A"]], 1)
    band = fourier_band(BOX, APIX, 40.0, 5.0)
    rot = euler_to_matrix(torch.as_tensor(angles)).to(torch.float32)
    t0 = image_translation_px(torch.as_tensor(shift_A), APIX).to(torch.float32)
    ctf = torch.cos(torch.linspace(0, 20, band.n_pixels))[None].expand(n, -1) * 0.9 + 0.05 * torch.rand(n, 1)
    scale = torch.linspace(2.0, 0.5, band.n_rings)
    s = scale[band.ring_index]
    whole = project_gmm(gmm, rot, t0, band)
    target = s * ctf * whole if ctf_mode == "full" else s * ctf.abs() * whole
    sub = Subtraction(parts=(PosedPart(rest, angles, shift_A),), whole=gmm, angles_deg=angles, shift_A=shift_A,
                      scale=scale)
    left = subtract_rest(target, ctf, sub, np.arange(n), band, ctf_mode)
    expected = s * (ctf if ctf_mode == "full" else ctf.abs()) * project_gmm(body, rot, t0, band)
    err = (left - expected).abs().max() / expected.abs().max()
    assert float(err) < 1e-4
    # and what is left is not the whole particle: the rest was there to subtract
    assert float((target - expected).abs().max() / expected.abs().max()) > 0.5


def test_measure_scale_finds_the_factor_of_particles_written_to_disk(tmp_path):
    """Images made from a GMM (times each particle's CTF as RELION defines it from the STAR file, at its
    pose and origin, times a known factor per ring) give back that factor per ring of the band."""
    n = 40
    names = write_dataset(tmp_path, n=n, box=BOX, apix=APIX, stacks=1)
    values = particle_values(n, seed=3)
    star = tmp_path / "particles.star"
    star.write_text(star31_text(names, values, apix=APIX, box=BOX))
    ps = read_particles(star)
    gmm = _gmm(seed=4)
    full = fourier_band(BOX, APIX, 1000.0, 2 * APIX)  # every pixel to Nyquist
    rot = euler_to_matrix(torch.as_tensor(ps.angles_deg)).to(torch.float32)
    t0 = image_translation_px(torch.as_tensor(ps.shift_A), APIX).to(torch.float32)
    freq = full.shell.to(torch.float32)[full.ring_index] / (BOX * APIX)       # 1/A of each band pixel
    factor = 3.0 * torch.exp(-40.0 * freq**2)                                  # a B-factor-like fall-off
    spectra = full.scatter(factor * project_gmm(gmm, rot, t0, full))
    images = irfft2_centered(spectra * _ctf_of(ps, np.arange(n), "cpu"), BOX)
    write_stack(tmp_path / names[0].split("@")[1], images.numpy().astype(np.float32), APIX)
    band = fourier_band(BOX, APIX, 40.0, 6.0)
    for ctf_mode in ("full", "flip"):
        sub = Subtraction(parts=(PosedPart(gmm, ps.angles_deg, ps.shift_A),), whole=gmm, angles_deg=ps.angles_deg,
                          shift_A=ps.shift_A)
        scale = measure_scale(ps, ps.half(1), sub, band, ctf_mode, torch.device("cpu"))
        truth = 3.0 * torch.exp(-40.0 * (band.shell.to(torch.float32) / (BOX * APIX)) ** 2)
        assert torch.allclose(scale, truth, rtol=2e-3), (ctf_mode, scale, truth)


def test_lockstep_subtraction_takes_the_other_body_out_at_its_own_poses(tmp_path):
    """Body 1 of two in a lock-step multi-body job: iteration 1 subtracts the rest of the consensus GMM at
    the consensus poses; iteration 2 takes body 2 out with body 2's GMM of iteration 1 at body 2's
    poses of iteration 1, read from its folder (here moved 6 degrees from the consensus)."""
    from gmmrefine.io.mrc import write_map
    from gmmrefine.refine.subtract import lockstep_subtraction

    gmm = _gmm(n=80, seed=6)
    # No centre in the masks' linear ramp (|x| < 2 px): every Gaussian is wholly in one body
    x_px = gmm.centers_A[:, 0] / APIX
    gmm = GaussianMixture(gmm.centers_A[x_px.abs() > 2.5], gmm.amplitudes[x_px.abs() > 2.5],
                          gmm.widths_A[x_px.abs() > 2.5])
    first, second = _half_space_mask(), 1.0 - _half_space_mask()
    (tmp_path / "start").mkdir()
    gmm.save(tmp_path / "start" / "gmm_half1.npz")
    for name, mask in (("b01", first), ("b02", second)):
        (tmp_path / "patches" / name).mkdir(parents=True)
        write_map(tmp_path / "patches" / name / "mask_half1.mrc", mask.numpy(), APIX)
    plan = {"start_dir": "start", "patches": [{"name": "b01"}, {"name": "b02"}]}
    n = 10
    values = particle_values(n, seed=7)
    angles = np.stack([values["rot"], values["tilt"], values["psi"]], 1)
    shift_A = np.stack([values["ox_A"], values["oy_A"]], 1)
    moved = angles + np.array([0.0, 6.0, 0.0])
    it1 = tmp_path / "patches" / "b02" / "it001"
    it1.mkdir()
    # body 2's own GMM of iteration 1: another fit of the same density (amplitudes 10 % higher)
    own = GaussianMixture(gmm.centers_A, gmm.amplitudes * 1.1, gmm.widths_A)
    own.save(it1 / "gmm_half1.npz")
    np.savez(it1 / "poses_half1.npz", indices=np.arange(n), angles_deg=moved, shift_A=shift_A)

    band = fourier_band(BOX, APIX, 40.0, 5.0)
    g = torch.Generator().manual_seed(8)
    target = torch.randn(n, band.n_pixels, generator=g, dtype=torch.complex64)
    ctf = torch.cos(torch.linspace(0, 20, band.n_pixels))[None].expand(n, -1).contiguous()
    scale = torch.linspace(2.0, 0.5, band.n_rings)
    idx = np.arange(n)

    def left(k: int) -> torch.Tensor:
        sub = lockstep_subtraction(tmp_path, plan, 0, k, {1: first}, APIX, angles, shift_A)(1)
        sub.scale = scale
        return subtract_rest(target, ctf, sub, idx, band, "full")

    def expected(model: GaussianMixture, poses: np.ndarray) -> torch.Tensor:
        rot = euler_to_matrix(torch.as_tensor(poses)).to(torch.float32)
        t0 = image_translation_px(torch.as_tensor(shift_A), APIX).to(torch.float32)
        return target - scale[band.ring_index] * ctf * project_gmm(split_gmm(model, first, APIX)[1], rot, t0, band)

    for k, model, poses in ((1, gmm, angles), (2, own, moved)):
        got, want = left(k), expected(model, poses)
        err = float((got - want).abs().max() / (target - want).abs().max())
        assert err < 1e-4, (k, err)
    # the move matters: iteration 2 differs from what the consensus poses would subtract
    assert float((left(2) - expected(own, angles)).abs().max() / (target - left(2)).abs().max()) > 0.1

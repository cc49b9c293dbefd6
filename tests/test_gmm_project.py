"""GMM projection: accuracy against a float64 formula, gradients, scale against voxel maps, FRC loss."""

from __future__ import annotations

import math

import pytest
import torch

from gmmrefine.fourier.fft import irfft2_centered, rfft2_centered
from gmmrefine.fourier.fsc import fourier_ring_correlation
from gmmrefine.geometry.rotations import euler_to_matrix, random_rotations
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.gmm import GaussianMixture, fourier_band, frc_loss, project_band, project_gmm
from gmmrefine.gmm.project import project_positions, project_reference

# Every test here runs on both CPU paths: the compiled kernels and the torch code (CUDA's).
pytestmark = pytest.mark.usefixtures("kernels")


def _random_gmm(n, spread_A, gen, width=(0.8, 2.3)):
    return GaussianMixture(torch.randn(n, 3, generator=gen) * spread_A,
                           torch.rand(n, generator=gen) + 0.5,
                           torch.rand(n, generator=gen) * (width[1] - width[0]) + width[0])


def test_projection_matches_float64_formula_n5000_box128():
    gen = torch.Generator().manual_seed(1)
    gmm = _random_gmm(5000, 15.0, gen)
    rot = random_rotations(2, gen).float()
    trans = torch.randn(2, 2, generator=gen) * 3
    band = fourier_band(128, 1.0, 60.0, 2.0)  # out to Nyquist
    fast = project_gmm(gmm, rot, trans, band)
    assert fast.dtype == torch.complex64 and fast.shape == (2, band.n_pixels)
    ref = project_reference(gmm.centers_A, gmm.amplitudes, gmm.widths_A, rot, trans, band)
    err = (fast.to(torch.complex128) - ref).abs()
    assert float(err.norm() / ref.norm()) <= 1e-4
    # Ring by ring too: the FRC normalises each ring, so weak outer rings must be accurate as well.
    num = torch.zeros(2, band.n_rings, dtype=torch.float64).index_add_(1, band.ring_index, err**2)
    den = torch.zeros(2, band.n_rings, dtype=torch.float64).index_add_(1, band.ring_index, ref.abs() ** 2)
    assert float((num / den).sqrt().max()) <= 1e-4


def test_gradcheck_all_inputs():
    gen = torch.Generator().manual_seed(2)
    band = fourier_band(16, 1.5, 20.0, 3.5)
    c = (torch.randn(6, 3, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    s = (torch.rand(6, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    a = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    a_batch = (torch.rand(2, 6, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    s_batch = (torch.rand(2, 6, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    rot = random_rotations(2, gen).requires_grad_()
    t = torch.randn(2, 2, generator=gen, dtype=torch.float64).requires_grad_()

    def f(*x):
        return torch.view_as_real(project_band(*x, band))

    assert torch.autograd.gradcheck(f, (c, a, s, rot, t))
    assert torch.autograd.gradcheck(f, (c, a_batch, s_batch, rot, t))  # per-particle GMM parameters
    pos = torch.randn(1, 6, 2, generator=gen, dtype=torch.float64, requires_grad=True)  # shared positions
    assert torch.autograd.gradcheck(lambda p, aa, ss: torch.stack(project_positions(p, aa, ss, band)),
                                    (pos, a_batch, s))
    # Through the loss, as refinement uses it.
    target = torch.randn(2, band.n_pixels, generator=gen, dtype=torch.complex128)
    assert torch.autograd.gradcheck(
        lambda c_, r_, t_: frc_loss(project_band(c_, a, s, r_, t_, band), target, band.ring_index, band.n_rings),
        (c, rot, t))


def test_chunked_evaluation_equals_single_pass(monkeypatch):
    import gmmrefine.gmm.project as project

    gen = torch.Generator().manual_seed(6)
    band = fourier_band(16, 1.5, 20.0, 3.5)
    c = (torch.randn(7, 3, generator=gen, dtype=torch.float64) * 5).requires_grad_()
    a = (torch.rand(7, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    s = (torch.rand(7, generator=gen, dtype=torch.float64) + 1).requires_grad_()
    rot = random_rotations(2, gen)
    whole = project_band(c, a, s, rot, None, band)
    monkeypatch.setattr(project, "_MIN_CHUNK", 2)
    monkeypatch.setattr(project, "_CHUNK_FLOATS", 1)  # chunks of 2 Gaussians: 4 chunks
    chunked = project_band(c, a, s, rot, None, band)
    assert torch.allclose(whole, chunked, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: torch.view_as_real(project_band(*x, rot, None, band)), (c, a, s))


def test_scale_and_position_match_voxel_map_projection():
    gen = torch.Generator().manual_seed(3)
    box, apix = 48, 1.5
    gmm = _random_gmm(40, 7.0, gen, width=(2.0, 3.0))
    band = fourier_band(box, apix, math.inf, 2 * apix)
    # Identity rotation: the voxel map summed along z is the projection, in the same Fourier scale.
    vol = gmm.render_map(box, apix)
    spec = band.gather(rfft2_centered(vol.sum(0)[None]))
    proj = project_gmm(gmm, torch.eye(3)[None], None, band)
    assert float((proj - spec).abs().norm() / spec.abs().norm()) < 1e-4
    # Any rotation and RELION origin: Fourier projection == FFT of the real-space render.
    rot = euler_to_matrix(torch.tensor([[30.0, 60.0, -20.0], [-100.0, 120.0, 45.0]]))
    trans = image_translation_px(torch.tensor([[4.5, -3.0], [0.0, 6.0]]), apix)
    img = gmm.render_image(box, apix, rot, trans)
    proj = project_gmm(gmm, rot, trans, band)
    assert float((band.gather(rfft2_centered(img)) - proj).abs().norm() / proj.abs().norm()) < 1e-4
    # scatter -> irfft gives the real image back, except its mean (the band has no DC term).
    back = irfft2_centered(band.scatter(proj), box)
    want = img - img.mean(dim=(-2, -1), keepdim=True)
    assert float((back - want).norm() / want.norm()) < 1e-4


def test_single_gaussian_lands_where_relion_puts_it():
    box, apix = 32, 2.0
    gmm = GaussianMixture(torch.tensor([[6.0, -4.0, 2.0]]), torch.ones(1), torch.ones(1) * 1.5)
    rot = euler_to_matrix(torch.tensor([[90.0, 0.0, 0.0]]))  # image position (A c)[:2]
    pos = (rot[0] @ gmm.centers_A[0])[:2]
    origin_A = torch.tensor([[4.0, 2.0]])  # RELION origin: the particle is the projection moved by -origin
    img = gmm.render_image(box, apix, rot, image_translation_px(origin_A, apix))[0]
    peak = torch.nonzero(img == img.max())[0]
    want = (pos - origin_A[0]) / apix + box // 2
    assert int(peak[1]) == round(float(want[0])) and int(peak[0]) == round(float(want[1]))
    # The Fourier projection agrees with that image.
    band = fourier_band(box, apix, math.inf, 2 * apix)
    back = irfft2_centered(band.scatter(project_gmm(gmm, rot, image_translation_px(origin_A, apix), band)), box)[0]
    assert torch.equal(torch.nonzero(back == back.max())[0], peak)


def test_band_layout_and_rings():
    band = fourier_band(32, 1.0, 16.0, 4.0)
    k = band.freqs_A.norm(dim=-1)
    assert float(k.min()) >= 1 / 16.0 - 1e-6 and float(k.max()) <= 1 / 4.0 + 1e-6
    assert bool(((band.nx > 0) | (band.ny > 0)).all())  # no redundant kx = 0, ky < 0 pixels
    assert torch.equal(band.shell[band.ring_index], torch.round(k * 32).long())
    assert band.k_max == 8 and len(set(band.pixel_index.tolist())) == band.n_pixels


def test_frc_loss_equals_ring_correlation_and_has_gradient():
    gen = torch.Generator().manual_seed(4)
    box = 32
    band = fourier_band(box, 1.0, math.inf, box / 12.5)  # rings 1..12 whole
    a = torch.randn(3, box, box, generator=gen, dtype=torch.float64)
    b = a + 2 * torch.randn(3, box, box, generator=gen, dtype=torch.float64)
    fa, fb = band.gather(rfft2_centered(a)), band.gather(rfft2_centered(b))
    loss = frc_loss(fa, fb, band.ring_index, band.n_rings)
    want = fourier_ring_correlation(a, b)[:, band.shell].mean(-1)
    assert torch.allclose(loss, want, atol=1e-12)
    assert float(frc_loss(fa, fa, band.ring_index, band.n_rings).min()) > 1 - 1e-9
    x = fa.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: frc_loss(z, fb, band.ring_index, band.n_rings), (x,))


def test_frc_gradient_points_to_true_pose():
    gen = torch.Generator().manual_seed(5)
    gmm = _random_gmm(300, 8.0, gen, width=(1.5, 2.5))
    band = fourier_band(48, 1.5, 40.0, 6.0)
    rot_true = random_rotations(4, gen).float()
    particles = project_gmm(gmm, rot_true, torch.zeros(4, 2), band)
    from gmmrefine.geometry.rotations import axis_angle_to_matrix, rotation_angle_deg

    v = (torch.randn(4, 3, generator=gen) * 0.05).requires_grad_()  # ~5 degrees off
    t = (torch.randn(4, 2, generator=gen) * 0.7).requires_grad_()   # ~1 px off
    opt = torch.optim.Adam([{"params": [v], "lr": 0.01}, {"params": [t], "lr": 0.05}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 80)
    for _ in range(80):
        opt.zero_grad()
        loss = -frc_loss(project_gmm(gmm, axis_angle_to_matrix(v) @ rot_true, t, band), particles,
                         band.ring_index, band.n_rings).sum()
        loss.backward()
        opt.step()
        sched.step()
    err = rotation_angle_deg(axis_angle_to_matrix(v.detach()) @ rot_true, rot_true)
    assert float(err.max()) < 0.5 and float(t.detach().abs().max()) < 0.1


@pytest.mark.compares_kernels
def test_fused_kernels_equal_tensor_path(monkeypatch):
    """The fused C kernels (float32 on the CPU: tables built in cache and multiplied by BLAS sgemm)
    against the torch code that CUDA runs: forward and every gradient, over several chunks of
    Gaussians (one not a multiple of the kernels' 64 lanes), with shared and per-particle GMM
    parameters, Gaussians wide enough that their envelopes underflow, and positions hundreds of A
    out (phases of many turns)."""
    import gmmrefine.gmm.project as project
    from gmmrefine import native

    assert native.fused_projection_available(), "the compiled kernels are not built, or torch's BLAS has no sgemm_"
    gen = torch.Generator().manual_seed(8)
    band = fourier_band(48, 1.5, 40.0, 3.2)
    n, batch = 300, 3
    monkeypatch.setattr(project, "_FUSED_CHUNK", 100)  # 3 chunks of 100 Gaussians (64 + 36 lanes)
    cases = {
        "shared GMM": ((batch, n, 2), (n,), (n,), 1.0),
        "per-particle GMM": ((batch, n, 2), (batch, n), (batch, n), 1.0),
        "shared positions": ((1, n, 2), (batch, n), (n,), 1.0),
        "wide Gaussians": ((batch, n, 2), (n,), (n,), 12.0),
        "far positions": ((batch, n, 2), (n,), (n,), 1.0),  # phases of many turns: the sin/cos reduction
    }
    for name, (pos_shape, amp_shape, width_shape, width_scale) in cases.items():
        pos = torch.randn(pos_shape, generator=gen) * (200 if name == "far positions" else 20)
        amp = torch.rand(amp_shape, generator=gen) + 0.5
        width = (torch.rand(width_shape, generator=gen) + 1.0) * width_scale
        weights = torch.randn(2, batch, band.n_pixels, generator=gen)
        results = {}
        for fused in (True, False):
            calls = []
            with monkeypatch.context() as m:
                if fused:
                    for kernel in ("project_fused_forward", "project_fused_backward"):
                        fn = getattr(native, kernel)
                        m.setattr(native, kernel, lambda *args, fn=fn, calls=calls: calls.append(1) or fn(*args))
                else:
                    m.setattr(project, "_fused", lambda *args: False)
                leaves = [t.clone().requires_grad_() for t in (pos, amp, width)]
                re, im = project_positions(*leaves, band)
                ((re * weights[0]).sum() + (im * weights[1]).sum()).backward()
            assert len(calls) == (2 if fused else 0), name  # one forward and one backward kernel call
            results[fused] = [re.detach(), im.detach()] + [t.grad for t in leaves]
        for label, c, t in zip(("re", "im", "d pos", "d amp", "d width"), results[True], results[False]):
            assert c.shape == t.shape, (name, label)
            assert torch.isfinite(c).all(), (name, label)
            err = float((c - t).abs().max() / t.abs().max())
            assert err < 2e-5, f"{name}, {label}: relative difference {err:.2e}"


@pytest.mark.compares_kernels
def test_fused_projection_of_centres_equals_tensor_path(monkeypatch):
    """project_band through the fused kernels (positions, shifts and their gradients computed in C)
    against the torch path: the projection and the gradients to centres, amplitudes, widths, the
    rotation matrices and the shifts, for shared and per-particle centres, with and without shifts."""
    import gmmrefine.gmm.project as project
    from gmmrefine.geometry.rotations import random_rotations

    gen = torch.Generator().manual_seed(9)
    band = fourier_band(64, 1.2, 50.0, 3.0)
    n, batch = 700, 5   # 3 chunks, the last partial
    weights = torch.randn(batch, band.n_pixels, dtype=torch.complex64, generator=gen)
    for per_particle in (False, True):
        for shifted in (False, True):
            centers = torch.randn((batch, n, 3) if per_particle else (n, 3), generator=gen) * 15
            amp = torch.rand(n, generator=gen) + 0.5
            width = torch.rand(n, generator=gen) + 1.0
            rot = random_rotations(batch, gen).float()
            shift = torch.randn(batch, 2, generator=gen) * 3 if shifted else None
            results = {}
            for fused in (True, False):
                calls = []
                with monkeypatch.context() as m:
                    if fused:
                        fn = project._FusedProjection.apply
                        m.setattr(project._FusedProjection, "apply",
                                  lambda *a, fn=fn, calls=calls: calls.append(1) or fn(*a))
                    else:
                        m.setattr(project, "_fused", lambda *args: False)
                    leaves = [t.clone().requires_grad_() for t in (centers, amp, width, rot)]
                    t_leaf = None if shift is None else shift.clone().requires_grad_()
                    z = project_band(*leaves, t_leaf, band)
                    (z * weights).real.sum().backward()
                assert len(calls) == (1 if fused else 0)
                results[fused] = [z.detach()] + [t.grad for t in leaves] + ([] if t_leaf is None else [t_leaf.grad])
            labels = ("projection", "d centres", "d amp", "d width", "d rotation", "d shift")
            for label, c, t in zip(labels, results[True], results[False]):
                assert c.shape == t.shape, label
                err = float((c - t).abs().max() / t.abs().max())
                assert err < 2e-5, f"per_particle={per_particle}, shifted={shifted}, {label}: {err:.2e}"

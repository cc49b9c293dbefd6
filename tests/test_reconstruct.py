"""Direct Fourier inversion against exact central slices of a known map (no RELION needed).

The particles are the exact Fourier slices of a sum of Gaussians, shifted by their origins; the
reconstruction must give back the truth map (the same Gaussians sampled on the grid). The Gaussians are
1.2 px wide, so aliasing of the sampled map changes the comparison by < 0.5 % up to 0.8 Nyquist.
"""

from __future__ import annotations

import math

import pytest
import torch

from gmmrefine.fourier.fft import freq_grid_2d, irfft2_centered, phase_shift_2d
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.geometry.rotations import random_rotations
from gmmrefine.geometry.shifts import image_translation_px
from gmmrefine.geometry.symmetry import expand_poses
from gmmrefine.reconstruct.insert import FourierAccumulator
from gmmrefine.reconstruct.invert import (
    accumulate_images,
    prepare_spectra,
    reconstruct_map,
    reconstruct_maps_low_memory,
    symmetry_matrices,
)

# Every test here runs on both CPU paths: the compiled kernels and the torch code (CUDA's).
pytestmark = pytest.mark.usefixtures("kernels")

BOX, APIX = 40, 2.0


def gaussian_model(n: int, box: int, seed: int = 0, sigma_px: float = 1.2):
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * box * 0.5
    amps = 0.5 + torch.rand(n, generator=g, dtype=torch.float64)
    return centres, amps, sigma_px


def render(model, box: int) -> torch.Tensor:
    centres, amps, s = model
    ax = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij")[::-1], dim=-1)  # x, y, z
    d2 = ((r[..., None, :] - centres) ** 2).sum(-1)
    return (amps * torch.exp(-d2 / (2 * s * s))).sum(-1).to(torch.float32)


def exact_slices(model, box: int, matrices: torch.Tensor) -> torch.Tensor:
    """Spectra of the projections: the Gaussians' transform at A.T (kx, ky, 0), cycles/px."""
    centres, amps, s = model
    k2 = freq_grid_2d(box, dtype=torch.float64)
    mats = matrices.to(torch.float64)
    k3 = k2[None, ..., 0, None] * mats[:, None, None, 0, :] + k2[None, ..., 1, None] * mats[:, None, None, 1, :]
    env = (2 * math.pi * s * s) ** 1.5 * torch.exp(-2 * math.pi ** 2 * s * s * (k3 ** 2).sum(-1))
    phase = -2 * math.pi * torch.einsum("bijk,nk->bijn", k3, centres)
    return ((amps * torch.polar(torch.ones_like(phase), phase)).sum(-1) * env).to(torch.complex64)


def particles(model, box, n, seed=1, max_shift_A=6.0):
    g = torch.Generator().manual_seed(seed)
    mats = random_rotations(n, g).to(torch.float32)
    shift_A = ((torch.rand(n, 2, generator=g) - 0.5) * 2 * max_shift_A).to(torch.float32)
    spectra = phase_shift_2d(exact_slices(model, box, mats), image_translation_px(shift_A, APIX))
    return irfft2_centered(spectra, box), mats, shift_A


@pytest.fixture(scope="module")
def truth_and_particles():
    model = gaussian_model(50, BOX)
    images, mats, shift_A = particles(model, BOX, 300)
    return render(model, BOX), images, mats, shift_A


def test_noise_free_reconstruction_matches_truth(truth_and_particles):
    truth, images, mats, shift_A = truth_and_particles
    acc = FourierAccumulator(BOX)
    spectra, weights = prepare_spectra(images, shift_A, APIX, None)
    acc.insert(spectra, mats, weights)
    vol = reconstruct_map(acc)
    fsc = fourier_shell_correlation(vol, truth)
    nyq = BOX // 2
    assert float(fsc[1:int(0.8 * nyq) + 1].min()) > 0.995
    scale = float((vol * truth).sum() / (truth * truth).sum())
    assert abs(scale - 1) < 0.02
    assert float((vol - truth).norm() / truth.norm()) < 0.08


def test_plain_division_also_works_and_pipe_menon_is_better(truth_and_particles):
    truth, images, mats, shift_A = truth_and_particles
    acc = FourierAccumulator(BOX)
    acc.insert(*prepare_spectra(images, shift_A, APIX, None)[:1], mats)
    err_pm = float((reconstruct_map(acc) - truth).norm())
    err_div = float((reconstruct_map(acc, preweight_iterations=0) - truth).norm())
    assert err_pm < err_div < 0.15 * float(truth.norm())


def test_accumulators_add_up_exactly(truth_and_particles):
    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images, shift_A, APIX, None)
    whole = FourierAccumulator(BOX)
    whole.insert(spectra, mats)
    part1, part2 = FourierAccumulator(BOX), FourierAccumulator(BOX)
    part1.insert(spectra[:130], mats[:130])
    part2.insert(spectra[130:], mats[130:])
    total = part1 + part2
    assert total.count == whole.count == 300
    torch.testing.assert_close(total.data, whole.data, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(total.weight, whole.weight, rtol=1e-5, atol=1e-4)
    before = part1.data.clone()
    part1.add_(part2)
    torch.testing.assert_close(part1.weight, whole.weight, rtol=1e-5, atol=1e-4)
    assert not torch.equal(before, part1.data)  # add_ is in place, __add__ was not
    with pytest.raises(ValueError):
        part1.add_(FourierAccumulator(BOX + 2))


def test_reconstruct_map_leaves_accumulator_untouched(truth_and_particles):
    _, images, mats, shift_A = truth_and_particles
    acc = FourierAccumulator(BOX)
    acc.insert(prepare_spectra(images[:50], shift_A[:50], APIX, None)[0], mats[:50])
    data, weight = acc.data.clone(), acc.weight.clone()
    first = reconstruct_map(acc)
    assert torch.equal(acc.data, data) and torch.equal(acc.weight, weight)
    torch.testing.assert_close(reconstruct_map(acc, consume=True), first)


def test_symmetry_insertion_equals_expanded_poses():
    model = gaussian_model(20, BOX, seed=3)
    images, mats, shift_A = particles(model, BOX, 12, seed=4)
    spectra, _ = prepare_spectra(images, shift_A, APIX, None)
    sym = FourierAccumulator(BOX)
    sym.insert(spectra, mats, symmetry=symmetry_matrices("D2"))
    expanded = FourierAccumulator(BOX)
    expanded.insert(spectra.repeat_interleave(4, dim=0), expand_poses(mats, "D2"))
    torch.testing.assert_close(sym.data, expanded.data, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sym.weight, expanded.weight, rtol=1e-5, atol=1e-5)


def test_symmetric_map_from_few_particles_with_symmetry():
    # A C4-symmetric model (each Gaussian and its 3 rotated copies): 40 views with C4 inserted must beat
    # the same 40 views in C1 and match the truth.
    model_pts = gaussian_model(15, BOX, seed=5)
    ops = symmetry_matrices("C4").to(torch.float64)
    centres, amps, s = model_pts
    sym_model = (torch.cat([centres @ op.T for op in ops]), amps.repeat(4) / 4, s)
    truth = render(sym_model, BOX)
    images, mats, shift_A = particles(sym_model, BOX, 40, seed=6)
    spectra, _ = prepare_spectra(images, shift_A, APIX, None)
    c1, c4 = FourierAccumulator(BOX), FourierAccumulator(BOX)
    c1.insert(spectra, mats)
    c4.insert(spectra, mats, symmetry=symmetry_matrices("C4"))
    f1 = fourier_shell_correlation(reconstruct_map(c1), truth)
    f4 = fourier_shell_correlation(reconstruct_map(c4), truth)
    shells = slice(1, int(0.8 * BOX // 2) + 1)
    assert float(f4[shells].min()) > 0.99
    assert float(f4[shells].sum()) > float(f1[shells].sum())


def test_ctf_modes_recover_the_map():
    model = gaussian_model(50, BOX, seed=7)
    truth = render(model, BOX)
    images, mats, shift_A = particles(model, BOX, 200, seed=8)
    # a radial CTF-like modulation with zeros, different per particle
    k = freq_grid_2d(BOX).norm(dim=-1)
    g = torch.Generator().manual_seed(9)
    defocus = 15 + 25 * torch.rand(len(images), generator=g)
    ctf = -torch.sin(defocus[:, None, None] * k ** 2 * 4 - 0.1)
    spec = torch.fft.rfft2(torch.fft.ifftshift(images, dim=(-2, -1))) * ctf
    ctf_images = torch.fft.fftshift(torch.fft.irfft2(spec, s=(BOX, BOX)), dim=(-2, -1))
    g2 = torch.Generator().manual_seed(10)
    noisy = ctf_images + 0.5 * ctf_images.std() * torch.randn(ctf_images.shape, generator=g2)
    shells = slice(3, BOX // 4 + 1)  # the CTF is ~0.1 at the lowest shells: little signal there
    sums = {}
    for mode in ("flip", "wiener"):
        acc = FourierAccumulator(BOX)
        acc.insert(*prepare_spectra(noisy, shift_A, APIX, ctf, mode)[:1], mats,
                   prepare_spectra(noisy, shift_A, APIX, ctf, mode)[1])
        f = fourier_shell_correlation(reconstruct_map(acc), truth)
        assert float(f[shells].min()) > 0.9, mode
        sums[mode] = float(f[shells].sum())
    # CTF^2 weighting gives more weight to the samples with signal: at least as good as flipping.
    assert sums["wiener"] >= sums["flip"] - 0.05


def test_streamed_chunks_equal_one_batch(truth_and_particles):
    _, images, mats, shift_A = truth_and_particles
    subset = torch.tensor([1, 2] * 150)

    def chunks(size):
        for i in range(0, 300, size):
            yield images[i:i + size], mats[i:i + size], shift_A[i:i + size], None, subset[i:i + size]

    a = accumulate_images(chunks(300), BOX, APIX)
    b = accumulate_images(chunks(37), BOX, APIX)
    for h in (1, 2):
        assert a[h].count == b[h].count == 150
        torch.testing.assert_close(a[h].data, b[h].data, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a[h].weight, b[h].weight, rtol=1e-5, atol=1e-4)
    only1 = accumulate_images(chunks(64), BOX, APIX, halves=(1,))
    assert set(only1) == {1}
    torch.testing.assert_close(only1[1].weight, a[1].weight, rtol=1e-5, atol=1e-4)


def test_halves_inserted_on_two_threads_equal_one_after_the_other(truth_and_particles):
    """With several torch threads the halves fill their grids concurrently: bit-identical grids."""
    _, images, mats, shift_A = truth_and_particles
    subset = torch.tensor([1, 2, 2] * 100)

    def chunks():
        for i in range(0, 300, 64):
            yield images[i:i + 64], mats[i:i + 64], shift_A[i:i + 64], None, subset[i:i + 64]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = accumulate_images(chunks(), BOX, APIX)
        torch.set_num_threads(2)
        parallel = accumulate_images(chunks(), BOX, APIX)
    finally:
        torch.set_num_threads(threads)
    for h in (1, 2):
        assert serial[h].count == parallel[h].count == (100 if h == 1 else 200)
        assert torch.equal(serial[h].data, parallel[h].data) and torch.equal(serial[h].weight, parallel[h].weight)


@pytest.mark.compares_kernels
@pytest.mark.parametrize("sym,wiener", [(None, False), ("D2", True)])
def test_compiled_insertion_equals_tensor_insertion(truth_and_particles, sym, wiener):
    """The C kernel (the CPU default) against the torch code (CUDA's): same sums in another order."""
    from gmmrefine import native

    assert native.available(), "the compiled kernels are not built (pip install -e . builds them)"
    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images[:150], shift_A[:150], APIX, None)
    weights = torch.rand(spectra.shape, generator=torch.Generator().manual_seed(5)) if wiener else None
    ops = symmetry_matrices(sym) if sym else None
    accs = {}
    for method in ("tensor", "compiled", "auto"):
        accs[method] = FourierAccumulator(BOX)
        accs[method].insert(spectra, mats[:150], weights, symmetry=ops, method=method)
    tensor, compiled = accs["tensor"], accs["compiled"]
    assert torch.equal(accs["auto"].data, compiled.data)  # auto picks the kernel on the CPU, and it repeats
    assert compiled.weight.sum() > 0 and compiled.count == tensor.count == 150
    scale = tensor.data.abs().max()
    assert (compiled.data - tensor.data).abs().max() / scale < 1e-6
    assert (compiled.weight - tensor.weight).abs().max() / tensor.weight.max() < 1e-6
    with pytest.raises(ValueError):
        FourierAccumulator(BOX, device="meta").insert(spectra[:1], mats[:1], method="compiled")


@pytest.mark.compares_kernels
def test_compiled_insertion_wraps_any_position_as_the_tensor_insertion(truth_and_particles):
    """Matrices that scale samples past the grid (not rotations) wrap exactly as torch.remainder does,
    and a non-finite matrix is refused, never written out of bounds."""
    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images[:20], shift_A[:20], APIX, None)
    stretched = mats[:20] * torch.linspace(1.0, 3.5, 20)[:, None, None]  # |A.T k| up to 1.75 Nyquist
    tensor, compiled = FourierAccumulator(BOX), FourierAccumulator(BOX)
    tensor.insert(spectra, stretched, method="tensor")
    compiled.insert(spectra, stretched, method="compiled")
    assert (compiled.data - tensor.data).abs().max() / tensor.data.abs().max() < 1e-6
    assert (compiled.weight - tensor.weight).abs().max() / tensor.weight.max() < 1e-6
    bad = mats[:2].clone()
    bad[1, 0, 0] = float("nan")
    for method in ("compiled", "tensor"):
        with pytest.raises(ValueError, match="finite"):
            FourierAccumulator(BOX).insert(spectra[:2], bad, method=method)


@pytest.mark.compares_kernels
def test_compiled_pipe_menon_steps_equal_tensor_steps(truth_and_particles, monkeypatch):
    """The Pipe-Menon iteration's elementwise steps in C (CPU) and in torch (CUDA): the same float32
    operations, so bit-identical weights."""
    from gmmrefine import native
    from gmmrefine.reconstruct.invert import nyquist_ball, pipe_menon_inverse_weights

    _, images, mats, shift_A = truth_and_particles
    acc = FourierAccumulator(BOX)
    acc.insert(prepare_spectra(images[:60], shift_A[:60], APIX, None)[0], mats[:60])
    ball = nyquist_ball(acc.padded_box)
    compiled = pipe_menon_inverse_weights(acc.weight, ball, BOX, 4)
    monkeypatch.setattr(native, "available", lambda: False)
    tensor = pipe_menon_inverse_weights(acc.weight, ball, BOX, 4)
    assert torch.equal(compiled, tensor)
    assert float(compiled[ball].min()) > 0 and float(compiled[~ball].abs().max()) == 0.0


def test_insert_rejects_bad_shapes():
    acc = FourierAccumulator(BOX)
    with pytest.raises(ValueError):
        acc.insert(torch.zeros(2, BOX, BOX, dtype=torch.complex64), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError):
        acc.insert(torch.zeros(2, BOX, BOX // 2 + 1, dtype=torch.complex64), torch.eye(3).expand(3, 3, 3))
    with pytest.raises(ValueError):
        FourierAccumulator(41)


def test_grid_symmetrisation_equals_inserting_each_operator_for_c4(truth_and_particles):
    # C4 operators map grid voxels onto grid voxels, so summing the grid over the group is exact.
    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images[:30], shift_A[:30], APIX, None)
    ops = symmetry_matrices("C4")
    inserted, plain = FourierAccumulator(BOX), FourierAccumulator(BOX)
    inserted.insert(spectra, mats[:30], symmetry=ops)
    plain.insert(spectra, mats[:30])
    torch.testing.assert_close(reconstruct_map(plain, symmetry=ops), reconstruct_map(inserted), rtol=1e-3, atol=1e-4)


def test_save_load_and_low_memory_inversion(tmp_path, truth_and_particles):
    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images[:40], shift_A[:40], APIX, None)
    acc = FourierAccumulator(BOX)
    acc.insert(spectra, mats[:40])
    acc.save(tmp_path / "acc.pt")
    back = FourierAccumulator.load(tmp_path / "acc.pt")
    assert back.count == 40 and torch.equal(back.data, acc.data) and torch.equal(back.weight, acc.weight)
    expected = reconstruct_map(acc)
    maps = reconstruct_maps_low_memory({1: acc.copy(), 2: back})
    torch.testing.assert_close(maps[1], expected)
    torch.testing.assert_close(maps[2], expected)


def test_cropped_spectra_reconstruct_the_downsampled_map(truth_and_particles):
    """Spectra Fourier-cropped to a smaller box (same physical size) reconstruct the full map
    downsampled to that box: same density per voxel, FSC ~1 below the small grid's Nyquist."""
    from gmmrefine.fourier.fft import crop_projection_spectra, downsample_map, rfft2_centered

    truth, images, mats, shift_A = truth_and_particles
    small = 24
    full = accumulate_images([(images, mats, shift_A, None, torch.ones(len(mats), dtype=torch.long))], BOX, APIX,
                             halves=(1,))
    cropped = crop_projection_spectra(rfft2_centered(images), small)
    work = accumulate_images([(cropped, mats, shift_A, None, torch.ones(len(mats), dtype=torch.long))], small,
                             APIX * BOX / small, halves=(1,))
    # key 0 takes every image, and a smaller accumulator gets cropped spectra itself
    both = accumulate_images([(images, mats, shift_A, None, torch.ones(len(mats), dtype=torch.long))], BOX, APIX,
                             accs={1: FourierAccumulator(small), 0: FourierAccumulator(BOX)})
    assert torch.equal(both[0].data, full[1].data)
    torch.testing.assert_close(both[1].data, work[1].data, rtol=1e-5, atol=1e-5 * float(work[1].data.abs().max()))
    expected = downsample_map(reconstruct_map(full[1]), small)
    got = reconstruct_map(work[1])
    fsc = fourier_shell_correlation(got, expected)
    assert float(fsc[1:int(0.8 * small // 2) + 1].min()) > 0.995
    assert abs(float((got * expected).sum() / (expected * expected).sum()) - 1) < 0.02
    assert abs(float(downsample_map(truth, small).mean() / truth.mean()) - 1) < 1e-5  # density per voxel kept



# measured (min FSC over shells to the map of 10 iterations from 1, relative difference): 300 particles
# 0.99996, 0.05 %; 40 particles 0.9986, 0.5 %; the 3 iterations from 1 alone 0.963 / 3.0 % and 0.862 / 8.0 %
@pytest.mark.parametrize("n, min_fsc", [(300, 0.9999), (40, 0.998)])
def test_half_map_continued_from_its_quarters_weights_equals_ten_iterations_from_one(truth_and_particles, n, min_fsc):
    """A refinement pass makes the quarter maps with 3 Pipe-Menon iterations and continues the half's
    iteration from their combined weights for the other 7 (refine/global_refine.py: quarter_maps): the half
    map must be the one of RELION's 10 iterations from 1, and the quarters' FSC the one of their own maps."""
    from gmmrefine.reconstruct.invert import pipe_menon_inverse_weights
    from gmmrefine.refine.global_refine import QUARTER_PM_ITERATIONS, quarter_maps

    _, images, mats, shift_A = truth_and_particles
    spectra, _ = prepare_spectra(images[:n], shift_A[:n], APIX, None)
    a, b = FourierAccumulator(BOX), FourierAccumulator(BOX)
    a.insert(spectra[0::2], mats[:n][0::2])
    b.insert(spectra[1::2], mats[:n][1::2])
    calls = []
    import gmmrefine.reconstruct.invert as invert

    def counted(*args, **kwargs):
        calls.append((args[3], kwargs.get("start") is not None))
        return pipe_menon_inverse_weights(*args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(invert, "pipe_menon_inverse_weights", counted):
        fsc, start = quarter_maps(a, b)
        continued = reconstruct_map(a + b, inverse_start=start, preweight_iterations=10 - QUARTER_PM_ITERATIONS)
    assert calls == [(3, False), (3, False), (7, True)]
    own = fourier_shell_correlation(*(reconstruct_map(x, preweight_iterations=3) for x in (a, b)))
    torch.testing.assert_close(fsc, own)
    cold = reconstruct_map(a + b)
    assert float(fourier_shell_correlation(continued, cold)[1:].min()) > min_fsc
    assert float((continued - cold).norm() / cold.norm()) < 0.01
    three = reconstruct_map(a + b, preweight_iterations=3)
    assert float((three - cold).norm()) > 10 * float((continued - cold).norm())

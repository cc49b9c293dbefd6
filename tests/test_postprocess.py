"""Masks, filters, masked FSC with phase-randomisation correction, B-factor, local resolution."""

from __future__ import annotations

import math

import pytest
import torch

from gmmrefine.fourier.filters import apply_bfactor, fsc_weights, low_pass, radial_amplitude, randomise_phases
from gmmrefine.fourier.fsc import fourier_shell_correlation, resolution_at
from gmmrefine.fourier.local_resolution import crossing_resolution, local_resolution
from gmmrefine.fourier.masks import mask_from_map, soft_mask_outside_map, soft_sphere
from gmmrefine.fourier.postprocess import auto_bfactor, corrected_fsc, postprocess, sharpen_to_profile

BOX, APIX = 48, 1.5


def blobs(n: int, seed: int, sigma_px: float = 1.0, box: int = BOX) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * box * 0.45
    ax = torch.arange(box, dtype=torch.float64) - box // 2
    r = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij")[::-1], dim=-1)
    d2 = ((r[..., None, :] - centres) ** 2).sum(-1)
    return torch.exp(-d2 / (2 * sigma_px ** 2)).sum(-1).to(torch.float32)


def noise(seed: int, box: int = BOX) -> torch.Tensor:
    return torch.randn((box,) * 3, generator=torch.Generator().manual_seed(seed))


def test_soft_sphere_and_mask_from_map():
    m = soft_sphere(BOX, 10.0, 4.0)
    c = BOX // 2
    assert float(m[c, c, c]) == 1.0 and float(m[c, c, c + 10]) == 1.0
    assert float(m[c, c, c + 12]) == pytest.approx(0.5, abs=1e-6)
    assert float(m[c, c, c + 14]) == 0.0 and float(m[0, 0, 0]) == 0.0
    vol = torch.zeros((BOX,) * 3)
    vol[c, c, c] = 1.0
    mask = mask_from_map(vol, 0.5, dilate_px=3, edge_px=2)
    assert float(mask[c, c, c + 3]) == 1.0  # inside the dilation
    assert float(mask[c, c, c + 4]) == pytest.approx(0.5, abs=1e-6)  # half way along the edge
    assert float(mask[c, c, c + 5]) == 0.0
    with pytest.raises(ValueError):
        mask_from_map(vol, 2.0)


def test_soft_mask_outside_map_keeps_inside_and_flattens_corners():
    vol = noise(1)
    out = soft_mask_outside_map(vol)
    c = BOX // 2
    assert torch.equal(out[c - 10:c + 10, c - 10:c + 10, c - 10:c + 10], vol[c - 10:c + 10, c - 10:c + 10, c - 10:c + 10])
    assert float(out[0, 0, 0]) == float(out[1, 0, 0]) == float(out[0, 2, 1])  # one background value


def test_low_pass_has_cosine_edge_at_resolution():
    vol = noise(2)
    res = 6.0  # shell BOX * APIX / 6 = 12
    out = low_pass(vol, res, APIX, edge_shells=2)
    ratio = radial_amplitude(out) / radial_amplitude(vol)
    assert float(ratio[1:11].min()) > 0.99
    assert float(ratio[12]) == pytest.approx(0.5, abs=0.15)
    assert float(ratio[14:].max()) < 1e-6


def test_auto_bfactor_recovers_applied_bfactor():
    # white-spectrum map: its own Guinier slope is ~0, so the fitted B is the applied one
    vol = noise(3)
    base, _ = auto_bfactor(vol, APIX, lowres_A=10.0, highres_A=3.5)
    for b_applied in (50.0, 150.0):
        blurred = apply_bfactor(vol, b_applied, APIX)
        fitted, _ = auto_bfactor(blurred, APIX, lowres_A=10.0, highres_A=3.5)
        assert -(fitted - base) == pytest.approx(b_applied, rel=0.10)
    # and sharpening with the fitted B brings the fall-off back
    blurred = apply_bfactor(blobs(40, 4), 100.0, APIX)
    fitted, _ = auto_bfactor(blurred, APIX, lowres_A=10.0, highres_A=3.5)
    orig, _ = auto_bfactor(blobs(40, 4), APIX, lowres_A=10.0, highres_A=3.5)
    assert fitted - orig == pytest.approx(-100.0, rel=0.10)


def test_corrected_fsc_of_pure_noise_is_zero():
    h1, h2 = noise(5), noise(6)
    mask = soft_sphere(BOX, 12.0, 4.0)
    curves = corrected_fsc(h1, h2, mask, randomise_from_shell=2, generator=torch.Generator().manual_seed(0))
    tail = curves["corrected"][6:]
    assert abs(float(tail.mean())) < 0.02
    assert float(tail.abs().max()) < 0.2


def test_correction_removes_mask_induced_correlation():
    # Shared signal only below shell 8, independent noise everywhere; a tight, sharp mask convolves the
    # strong low-resolution signal into the high shells and inflates the masked FSC there.
    signal = low_pass(blobs(60, 7, sigma_px=2.0), BOX * APIX / 8, APIX) * 20
    h1, h2 = signal + noise(8), signal + noise(9)
    mask = soft_sphere(BOX, 8.0, 1.0)
    curves = corrected_fsc(h1, h2, mask, generator=torch.Generator().manual_seed(1))
    start = curves["randomise_from_shell"]
    assert 4 <= start <= 10
    beyond = slice(start + 4, BOX // 2)
    assert float(curves["masked"][beyond].mean()) > 0.1  # inflated by the mask
    assert abs(float(curves["corrected"][beyond].mean())) < 0.05
    torch.testing.assert_close(curves["corrected"][: start + 3], curves["masked"][: start + 3])


def test_postprocess_resolution_and_sharpening():
    truth = apply_bfactor(blobs(80, 10), 80.0, APIX)
    g = torch.Generator().manual_seed(11)
    n1 = 0.02 * torch.randn(truth.shape, generator=g)
    n2 = 0.02 * torch.randn(truth.shape, generator=g)
    h1, h2 = truth + n1, truth + n2
    mask = soft_sphere(BOX, 16.0, 5.0)
    res = postprocess(h1, h2, APIX, mask)
    unmasked_res = resolution_at(res.curves["unmasked"], BOX, APIX)
    assert res.resolution_A <= unmasked_res + 1e-6  # masking removes solvent noise
    assert 2 * APIX <= res.resolution_A < 8.0
    assert res.bfactor_A2 < 0  # a blurred map gets sharpened
    fixed = postprocess(h1, h2, APIX, mask, bfactor_A2=-50.0)
    assert fixed.bfactor_A2 == -50.0
    # no mask: the unmasked curve decides
    plain = postprocess(h1, h2, APIX)
    assert plain.resolution_A == pytest.approx(unmasked_res)
    assert plain.sharpened_masked is None and res.sharpened_masked is not None


def test_sharpen_to_reference_profile():
    vol = apply_bfactor(blobs(60, 12), 120.0, APIX)
    reference = radial_amplitude(blobs(60, 12))
    out = sharpen_to_profile(vol, reference)
    amp = radial_amplitude(out)
    torch.testing.assert_close(amp[1:BOX // 2], reference[1:BOX // 2], rtol=0.02, atol=1e-6)


def test_randomise_phases_keeps_amplitudes_and_low_shells():
    vol = blobs(30, 13)
    out = randomise_phases(vol, 10, generator=torch.Generator().manual_seed(2))
    fsc = fourier_shell_correlation(vol, out)
    assert float(fsc[1:9].min()) > 0.999
    assert float(fsc[12:].abs().mean()) < 0.1
    torch.testing.assert_close(radial_amplitude(out)[1:20], radial_amplitude(vol)[1:20], rtol=0.02, atol=0)


def test_fsc_weights():
    w = fsc_weights(torch.tensor([1.0, 0.5, 0.0, -0.2]))
    torch.testing.assert_close(w, torch.tensor([1.0, math.sqrt(2 / 3), 0.0, 0.0], dtype=torch.float64))


def test_crossing_resolution_matches_resolution_at():
    g = torch.Generator().manual_seed(3)
    curves = torch.sort(torch.rand(20, 25, generator=g, dtype=torch.float64), dim=1, descending=True).values
    curves[:, 0] = 1.0
    curves[0] = 1.0  # never crosses: Nyquist
    got = crossing_resolution(curves, 48, APIX)
    want = torch.tensor([resolution_at(c, 48, APIX) for c in curves], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_local_resolution_sees_a_blurred_half():
    sharp = blobs(120, 14)
    blurred = low_pass(sharp, 12.0, APIX)
    x = torch.arange(BOX)
    left = (x < BOX // 2).to(torch.float32)[None, None, :]
    signal = sharp * left + blurred * (1 - left)
    g = torch.Generator().manual_seed(4)
    h1 = signal + 0.05 * torch.randn(signal.shape, generator=g)
    h2 = signal + 0.05 * torch.randn(signal.shape, generator=g)
    lr = local_resolution(h1, h2, APIX, window_px=16, step_px=4)
    c = BOX // 2
    sharp_side = float(lr[c - 8:c + 8, c - 8:c + 8, 6:14].median())
    blurred_side = float(lr[c - 8:c + 8, c - 8:c + 8, 34:42].median())
    assert sharp_side < 5.0
    assert blurred_side > 1.3 * sharp_side  # windowed FSC is coarse: 8 shells in a 16 px window
    masked = local_resolution(h1, h2, APIX, window_px=16, step_px=4, mask=soft_sphere(BOX, 10.0, 2.0))
    assert float(masked[0, 0, 0]) == 0.0 and float(masked[c, c, c]) > 0

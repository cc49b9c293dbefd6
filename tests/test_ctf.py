"""RELION's CTF without RELION: values at known points, symmetries, envelope and phase flipping."""

from __future__ import annotations

import math

import pytest
import torch

from gmmrefine.errors import InputError
from gmmrefine.fourier.ctf import ctf_2d, ctf_for_box, electron_wavelength_A, phase_flip, phase_flip_images
from gmmrefine.fourier.fft import irfft2_centered, rfft2_centered

BASE = dict(defocus_u_A=15000.0, defocus_v_A=15000.0, defocus_angle_deg=0.0, voltage_kV=300.0, cs_mm=2.7,
            amplitude_contrast=0.1)


def _params(**changes):
    p = {k: torch.tensor([v], dtype=torch.float64) for k, v in BASE.items()}
    p.update({k: torch.as_tensor(v, dtype=torch.float64).reshape(-1) for k, v in changes.items()})
    return p


def test_wavelength_is_relativistic():
    lam = electron_wavelength_A(torch.tensor([100.0, 200.0, 300.0], dtype=torch.float64))
    assert torch.allclose(lam, torch.tensor([0.037014, 0.025079, 0.019687], dtype=torch.float64), atol=2e-6)


def test_ctf_at_zero_frequency_is_plus_amplitude_contrast():
    zero = torch.zeros(1, 2, dtype=torch.float64)
    assert ctf_2d(zero, **_params()).item() == pytest.approx(0.1, abs=1e-12)
    # a phase plate adds to the amplitude-contrast phase: sin(asin(Q0) + phase)
    plate = ctf_2d(zero, **_params(phase_shift_deg=90.0)).item()
    assert plate == pytest.approx(math.cos(math.asin(0.1)), abs=1e-12)
    # positive (no contrast inversion) from 0 up to the first zero
    k = torch.linspace(0, 0.02, 50, dtype=torch.float64)[:, None] * torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert bool((ctf_2d(k, **_params()) > 0).all())


def test_first_zero_matches_closed_form():
    # Cs = 0, no astigmatism: gamma = -pi lambda df k^2 - asin(Q0); the first zero is at gamma = -pi.
    p = _params(cs_mm=0.0)
    lam = electron_wavelength_A(torch.tensor(300.0, dtype=torch.float64))
    k0 = math.sqrt((math.pi - math.asin(0.1)) / (math.pi * lam.item() * 15000.0))
    values = ctf_2d(torch.tensor([[k0 * 0.999, 0.0], [k0 * 1.001, 0.0]], dtype=torch.float64), **p)[0]
    assert values[0] > 0 > values[1]
    assert abs(ctf_2d(torch.tensor([[0.0, k0]], dtype=torch.float64), **p).item()) < 1e-8


def test_astigmatism_rotates_with_the_angle():
    g = torch.Generator().manual_seed(0)
    freq = (torch.rand(200, 2, generator=g, dtype=torch.float64) - 0.5) * 0.4
    a = math.radians(37.0)
    rot = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    astig = dict(defocus_u_A=20000.0, defocus_v_A=12000.0)
    at_angle = ctf_2d(freq @ rot.T, **_params(defocus_angle_deg=37.0, **astig))
    at_zero = ctf_2d(freq, **_params(defocus_angle_deg=0.0, **astig))
    assert (at_angle - at_zero).abs().max() < 1e-10
    # U is the defocus along the angle direction (from +x towards +y), V perpendicular to it
    k = 0.05
    along = torch.tensor([[k * math.cos(a), k * math.sin(a)]], dtype=torch.float64)
    across = torch.tensor([[-k * math.sin(a), k * math.cos(a)]], dtype=torch.float64)
    u_only = _params(defocus_u_A=20000.0, defocus_v_A=20000.0)
    v_only = _params(defocus_u_A=12000.0, defocus_v_A=12000.0)
    assert ctf_2d(along, **_params(defocus_angle_deg=37.0, **astig)).item() == pytest.approx(
        ctf_2d(along, **u_only).item(), abs=1e-12)
    assert ctf_2d(across, **_params(defocus_angle_deg=37.0, **astig)).item() == pytest.approx(
        ctf_2d(across, **v_only).item(), abs=1e-12)
    # a 180-degree turn of the angle is the same CTF
    assert (ctf_2d(freq @ rot.T, **_params(defocus_angle_deg=217.0, **astig)) - at_angle).abs().max() < 1e-10


def test_bfactor_envelope_and_scale():
    freq = torch.rand(100, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.3
    plain = ctf_2d(freq, **_params())
    damped = ctf_2d(freq, **_params(bfactor_A2=80.0, scale=0.7))
    k2 = (freq**2).sum(-1)
    assert (damped - 0.7 * plain * torch.exp(-80.0 * k2 / 4)).abs().max() < 1e-12


def test_batch_layout_and_dtype():
    params = dict(defocus_u_A=torch.tensor([10000.0, 20000.0, 30000.0]), defocus_v_A=torch.tensor([9000.0] * 3),
                  defocus_angle_deg=torch.tensor([0.0, 10.0, 20.0]), voltage_kV=300.0, cs_mm=2.7,
                  amplitude_contrast=0.07)
    ctf = ctf_for_box(64, 1.2, **params)
    assert ctf.shape == (3, 64, 33) and ctf.dtype == torch.float32
    one = ctf_for_box(64, 1.2, **{k: (v[1:2] if torch.is_tensor(v) else v) for k, v in params.items()})
    assert (ctf[1] - one[0]).abs().max() < 1e-6
    # the rfft grid: kx along the last axis, so a pure-x frequency sees only defocus U at angle 0
    kx = torch.fft.rfftfreq(64)[5] / 1.2
    first = {k: (v[0:1] if torch.is_tensor(v) else v) for k, v in params.items()}
    ref = ctf_2d(torch.tensor([[kx, 0.0]]), **first)
    assert ctf[0, 0, 5].item() == pytest.approx(ref.item(), abs=1e-6)


def test_amplitude_contrast_out_of_range_is_input_error():
    with pytest.raises(InputError):
        ctf_2d(torch.zeros(1, 2), **_params(amplitude_contrast=1.5))
    with pytest.raises(InputError):
        ctf_2d(torch.zeros(1, 2), **{**_params(), "defocus_u_A": torch.zeros(2, 2)})


def test_phase_flip_gives_abs_ctf_and_is_an_involution():
    g = torch.Generator().manual_seed(2)
    noise = rfft2_centered(torch.randn(4, 48, 48, generator=g))
    # band-limit below Nyquist: an oblique CTF is not Hermitian on the kx = Nyquist column of an even box
    band = (torch.fft.fftfreq(48)[:, None] ** 2 + torch.fft.rfftfreq(48)[None] ** 2).sqrt() < 0.45
    images = irfft2_centered(noise * band, 48)
    params = dict(defocus_u_A=torch.tensor([8000.0, 12000.0, 16000.0, 20000.0]),
                  defocus_v_A=torch.tensor([7000.0, 11000.0, 15500.0, 19000.0]),
                  defocus_angle_deg=torch.tensor([0.0, 30.0, 60.0, 90.0]), voltage_kV=300.0, cs_mm=2.7,
                  amplitude_contrast=0.1)
    ctf = ctf_for_box(48, 1.5, **params)
    spectra = rfft2_centered(images)
    assert (phase_flip(spectra * ctf, ctf) - spectra * ctf.abs()).abs().max() < 1e-4
    flipped = phase_flip_images(images, 1.5, **params)
    assert (phase_flip_images(flipped, 1.5, **params) - images).abs().max() < 1e-4
    assert (flipped - irfft2_centered(phase_flip(spectra, ctf), 48)).abs().max() < 1e-5
    assert (flipped - images).abs().max() > 0.5 * images.abs().max()  # it did flip something

"""The two CPU paths (compiled kernels and torch code) and every device agree: projection and its
gradients to float32 rounding, reconstructed maps to FSC >= 0.9999, refined poses to 0.01 degree.
``GMMREFINE_KERNELS`` switches the path; each test counts the calls so that it really ran the path it
names."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gmmrefine import native
from gmmrefine.errors import InputError
from gmmrefine.fourier.fsc import fourier_shell_correlation
from gmmrefine.geometry.rotations import axis_angle_to_matrix, random_rotations, rotation_angle_deg
from gmmrefine.gmm import project
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import fourier_band, project_gmm
from gmmrefine.gmm.render import render_image
from gmmrefine.io.models import read_atoms
from gmmrefine.reconstruct.insert import FourierAccumulator
from gmmrefine.reconstruct.invert import prepare_spectra, reconstruct_map
from gmmrefine.refine.poses import PoseSettings, particle_band, refine_poses

BOX, APIX = 48, 2.0
pytestmark = pytest.mark.skipif(native._load()[0] is None, reason="needs the compiled kernels to compare with")


class Calls:
    """Counts the calls of the compiled kernels and of the torch projection while it is active."""

    def __init__(self, monkeypatch):
        self.counts = {"fused": 0, "insert": 0, "torch_projection": 0}
        for name, module, attr in (("fused", native, "project_fused_forward"), ("insert", native, "insert_slices"),
                                   ("torch_projection", project._SeparableProjection, "apply")):
            fn = getattr(module, attr)
            monkeypatch.setattr(module, attr, self._counted(name, fn))

    def _counted(self, name, fn):
        def wrapper(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper


@pytest.fixture(scope="module")
def gmm(adk_open_pdb) -> GaussianMixture:
    atoms = read_atoms(adk_open_pdb).heavy()
    c = torch.tensor(np.asarray(atoms.coords_A), dtype=torch.float32)
    c = (c - c.mean(0))[::5]
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(c, 0.5 + torch.rand(len(c), generator=g), 2.0 + torch.rand(len(c), generator=g))


def _projection_and_gradients(gmm: GaussianMixture, device: torch.device):
    g = torch.Generator().manual_seed(1)
    rot = random_rotations(12, g).float().to(device)
    band = fourier_band(BOX, APIX, 40.0, 5.0)
    params = [t.detach().clone().to(device).requires_grad_() for t in (gmm.centers_A, gmm.amplitudes, gmm.widths_A)]
    shift = torch.randn(12, 2, generator=g).to(device).requires_grad_()
    rot = rot.requires_grad_()
    weight = torch.randn(12, band.n_pixels, dtype=torch.complex64, generator=g).to(device)
    proj = project_gmm(GaussianMixture(*params), rot, shift, band)
    grads = torch.autograd.grad((proj * weight).real.sum(), [*params, rot, shift])
    return proj.detach().cpu(), [x.cpu() for x in grads]


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.compares_kernels
def test_projection_and_gradients_agree_across_kernels_and_devices(gmm, device, monkeypatch):
    calls = Calls(monkeypatch)
    monkeypatch.setenv("GMMREFINE_KERNELS", "native")
    ref, ref_grads = _projection_and_gradients(gmm, torch.device("cpu"))
    assert calls.counts["fused"] == 1 and calls.counts["torch_projection"] == 0
    monkeypatch.setenv("GMMREFINE_KERNELS", "torch")
    proj, grads = _projection_and_gradients(gmm, device)
    assert calls.counts["fused"] == 1 and calls.counts["torch_projection"] == 1
    # float32 rounding of two summation orders (measured 2e-7 on the CPU)
    assert _close(proj, ref) < 2e-5
    for name, a, b in zip(("centers", "amplitudes", "widths", "rotations", "shifts"), grads, ref_grads):
        assert _close(a, b) < 1e-4, name


def _particles(gmm: GaussianMixture, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rot = random_rotations(n, g).float()
    shift_A = torch.randn(n, 2, generator=g) * 2
    images = render_image(gmm, BOX, APIX, rot, shift_A / APIX)
    return images, rot, shift_A, g


@pytest.mark.compares_kernels
def test_reconstructed_maps_agree_across_kernels_and_devices(gmm, device, monkeypatch):
    images, rot, shift_A, _ = _particles(gmm, 200, 2)
    calls = Calls(monkeypatch)
    maps = {}
    for mode, dev in (("native", torch.device("cpu")), ("torch", device)):
        monkeypatch.setenv("GMMREFINE_KERNELS", mode)
        acc = FourierAccumulator(BOX, device=dev)
        spectra, weights = prepare_spectra(images.to(dev), shift_A.to(dev), APIX, None)
        acc.insert(spectra, rot.to(dev), weights)
        maps[mode] = reconstruct_map(acc).cpu()
        assert calls.counts["insert"] == 1  # the compiled insertion ran for "native" only
    fsc = fourier_shell_correlation(maps["torch"], maps["native"])
    assert float(fsc[1:].min()) >= 0.9999, fsc
    assert _close(maps["torch"], maps["native"]) < 1e-4


@pytest.mark.compares_kernels
def test_refined_poses_agree_across_kernels_and_devices(gmm, device, monkeypatch):
    images, rot, shift_A, g = _particles(gmm, 48, 3)
    noisy = images + torch.randn(images.shape, generator=g) * images.std() * 2
    axes = torch.nn.functional.normalize(torch.randn(48, 3, generator=g), dim=1)
    rot0 = axis_angle_to_matrix(axes * math.radians(3.0)) @ rot
    t0 = shift_A / APIX + 0.5
    band = fourier_band(BOX, APIX, 40.0, 5.0)
    calls = Calls(monkeypatch)
    results = {}
    for mode, dev in (("native", torch.device("cpu")), ("torch", device)):
        monkeypatch.setenv("GMMREFINE_KERNELS", mode)
        on = GaussianMixture(*(t.to(dev) for t in (gmm.centers_A, gmm.amplitudes, gmm.widths_A)))
        res = refine_poses(on, particle_band(noisy.to(dev), band), rot0.to(dev), t0.to(dev), band, PoseSettings())
        results[mode] = (res.rotations.cpu(), res.translation_px.cpu())
    assert calls.counts["fused"] > 0 and calls.counts["torch_projection"] > 0
    moved = rotation_angle_deg(results["native"][0], rot0)
    assert float(moved.mean()) > 1.0  # the poses did move: the comparison is not of two starting points
    # measured: 7e-6 degree (the Newton optimiser), the paths differ by float32 rounding only
    assert float(rotation_angle_deg(results["torch"][0], results["native"][0]).max()) < 0.01
    assert float((results["torch"][1] - results["native"][1]).abs().max()) * APIX < 0.01  # A


def test_kernel_switch_and_its_errors(monkeypatch):
    monkeypatch.setenv("GMMREFINE_KERNELS", "torch")
    assert not native.available() and not native.fused_projection_available()
    assert native.kernels_info()["why"].startswith("GMMREFINE_KERNELS=torch")
    monkeypatch.setenv("GMMREFINE_KERNELS", "auto")
    assert native.available() and native.fused_projection_available()
    monkeypatch.setenv("GMMREFINE_KERNELS", "fast")
    with pytest.raises(InputError, match="GMMREFINE_KERNELS='fast': expected one of auto, native, torch"):
        native.available()
    # A library that is missing: one warning under auto (saying what runs instead), an error under native.
    monkeypatch.setattr(native, "_load", lambda: (None, "the compiled kernels are not built"))
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setenv("GMMREFINE_KERNELS", "auto")
    with pytest.warns(RuntimeWarning, match="not built; the torch code runs on the CPU instead"):
        assert not native.available()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert not native.available()
    monkeypatch.setenv("GMMREFINE_KERNELS", "native")
    with pytest.raises(InputError, match="GMMREFINE_KERNELS=native, but the compiled kernels are not built"):
        native.available()


def test_info_reports_kernels_and_devices(capsys, monkeypatch):
    from gmmrefine.cli.main import main

    monkeypatch.setenv("GMMREFINE_KERNELS", "torch")
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GMMREFINE_KERNELS=torch: the torch code runs on the CPU" in out
    assert f"torch {torch.__version__}" in out and "device     cpu" in out
    monkeypatch.setenv("GMMREFINE_KERNELS", "auto")
    assert main(["info", "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["kernels"]["fused_projection_in_use"] is True and info["devices"][0]["device"] == "cpu"

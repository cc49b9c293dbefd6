"""GaussianMixture: files, pseudo-atom export, rendering, width masks, patches, bad input."""

from __future__ import annotations

import math

import gemmi
import numpy as np
import pytest
import torch

from gmmrefine.errors import InputError
from gmmrefine.gmm import GaussianMixture, kmeans_patches, width_mask


def _gmm(n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(n, 3, generator=gen) * 5, torch.rand(n, generator=gen) + 0.1,
                           torch.rand(n, generator=gen) + 0.5)


def test_npz_round_trip(tmp_path):
    gmm = _gmm()
    gmm.save(tmp_path / "g.npz")
    back = GaussianMixture.load(tmp_path / "g.npz")
    for name in ("centers_A", "amplitudes", "widths_A"):
        assert torch.equal(getattr(back, name), getattr(gmm, name))
    assert [p.name for p in tmp_path.iterdir()] == ["g.npz"]  # no temporary left behind


def test_pdb_and_mmcif_pseudo_atoms(tmp_path):
    gmm = _gmm()
    gmm.to_pdb(tmp_path / "g.pdb", box=32, apix=1.5)
    gmm.to_mmcif(tmp_path / "g.cif")
    for path, offset in ((tmp_path / "g.pdb", 16 * 1.5), (tmp_path / "g.cif", 0.0)):
        st = gemmi.read_structure(str(path))
        atoms = [a for r in st[0][0] for a in r]
        assert len(atoms) == gmm.n
        pos = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms])
        np.testing.assert_allclose(pos, gmm.centers_A.numpy() + offset, atol=2e-3)
        b = np.array([a.b_iso for a in atoms])
        np.testing.assert_allclose(b, 8 * math.pi**2 * gmm.widths_A.numpy() ** 2, rtol=1e-3, atol=0.01)
        occ = np.array([a.occ for a in atoms])
        np.testing.assert_allclose(occ, (gmm.amplitudes / gmm.amplitudes.max()).numpy(), atol=0.006)


def test_nan_and_bad_shapes_raise_input_error(tmp_path):
    good = _gmm(3)
    with pytest.raises(InputError, match="NaN"):
        GaussianMixture(good.centers_A, torch.tensor([1.0, float("nan"), 1.0]), good.widths_A)
    with pytest.raises(InputError, match="positive"):
        GaussianMixture(good.centers_A, good.amplitudes, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(InputError, match=r"\(N, 3\)"):
        GaussianMixture(good.centers_A[:, :2], good.amplitudes, good.widths_A)
    np.savez(tmp_path / "bad.npz", centers_A=np.zeros((2, 3)), amplitudes=np.ones(2))
    with pytest.raises(InputError, match="widths_A"):
        GaussianMixture.load(tmp_path / "bad.npz")


def test_render_map_matches_formula():
    gmm = GaussianMixture(torch.tensor([[3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]), torch.tensor([2.0, 1.0]),
                          torch.tensor([1.5, 2.0]))
    box, apix = 20, 1.5
    vol = gmm.render_map(box, apix)
    z, y, x = 13, 9, 12  # voxel -> (x, y, z) A = ((12-10)*1.5, (9-10)*1.5, (13-10)*1.5)
    p = torch.tensor([3.0, -1.5, 4.5])
    want = sum(float(a) * math.exp(-float(((p - c) ** 2).sum()) / (2 * float(s) ** 2))
               for c, a, s in zip(gmm.centers_A, gmm.amplitudes, gmm.widths_A))
    assert abs(float(vol[z, y, x]) - want) < 1e-5
    # A 2D projection is the map summed along z.
    img = gmm.render_image(box, apix)[0]
    assert torch.allclose(img, vol.sum(0), atol=1e-4)


def test_width_mask_formula():
    box, apix = 16, 2.0
    mask = torch.zeros(box, box, box)
    mask[8, 8, 10] = 1.0  # voxel z=8, y=8, x=10 -> (4, 0, 0) A
    gmm = GaussianMixture(torch.tensor([[4.0, 0, 0], [2.0, 0, 0], [4.0, 0, 1.0]]), torch.ones(3), torch.ones(3))
    out = width_mask(gmm, mask, apix)
    # M = 1, 0 and 0.5 (trilinear, half a voxel along z): s / (0.25 + 0.75 M)
    factor = torch.tensor([1.0, 4.0, 1.0 / (0.25 + 0.375)])
    assert torch.allclose(out.widths_A, factor)
    assert torch.equal(out.centers_A, gmm.centers_A)
    # Each Gaussian keeps its mass (A s^3): the rendered maps integrate to the same total.
    assert torch.allclose(out.amplitudes, gmm.amplitudes / factor**3)
    g = GaussianMixture(torch.tensor([[2.0, 0, 0], [-3.0, 1.0, 0]]), torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0]))
    wide = width_mask(g, torch.zeros(96, 96, 96), 1.0)
    assert torch.allclose(wide.widths_A, 4 * g.widths_A)
    assert torch.allclose(wide.render_map(96, 1.0).sum(), g.render_map(96, 1.0).sum(), rtol=1e-4)


def test_kmeans_patches_separate_clusters():
    gen = torch.Generator().manual_seed(1)
    offsets = torch.tensor([[0.0, 0, 0], [30.0, 0, 0], [0, 30.0, 0]])
    truth = torch.arange(90) % 3
    centers = torch.randn(90, 3, generator=gen) * 3 + offsets[truth]
    labels = kmeans_patches(GaussianMixture(centers, torch.ones(90), torch.ones(90)), 3, seed=0)
    assert labels.shape == (90,) and set(labels.tolist()) == {0, 1, 2}
    # Same partition as the truth, up to label names.
    for k in range(3):
        assert len(set(labels[truth == k].tolist())) == 1
    with pytest.raises(InputError):
        kmeans_patches(GaussianMixture(centers, torch.ones(90), torch.ones(90)), 91)

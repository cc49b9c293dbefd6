"""Conformation to pose: a domain turned by a known rotation gets the pose A0 R (not A0 R^-1)."""

from __future__ import annotations

import pytest
import torch

from gmmrefine.geometry.rotations import axis_angle_to_matrix, random_rotations, rotation_angle_deg
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import fourier_band
from gmmrefine.hetero.conformation import conformation_to_pose, domain_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_domain_turn_is_recovered_as_a_pose():
    g = torch.Generator().manual_seed(0)
    n_dom = 40
    body = torch.randn(n_dom, 3, generator=g) * 5.0 + torch.tensor([-10.0, 0.0, 0.0])
    dom = torch.randn(n_dom, 3, generator=g) * 5.0 + torch.tensor([10.0, 0.0, 0.0])
    neutral = GaussianMixture(torch.cat([body, dom]), torch.ones(2 * n_dom), torch.full((2 * n_dom,), 2.5))
    domain = torch.cat([torch.zeros(n_dom), torch.ones(n_dom)])
    b, apix = 12, 1.5
    band = fourier_band(48, apix, 100.0, 6.0)
    axes = torch.nn.functional.normalize(torch.randn(b, 3, generator=g), dim=1)
    turn = axis_angle_to_matrix(axes * torch.deg2rad(torch.tensor(2.0))).float()        # (b, 3, 3)
    pivot = dom.mean(0)
    conf_dom = (dom - pivot) @ turn.transpose(1, 2) + pivot                             # (b, n, 3)
    conf = torch.cat([body.expand(b, -1, -1), conf_dom], 1)
    rot0 = random_rotations(b, g).float()
    t0 = torch.randn(b, 2, generator=g)
    res = conformation_to_pose(neutral, conf, neutral.amplitudes.expand(b, -1), domain, rot0, t0, band)
    expected = rot0 @ turn
    # Translation that goes with turning about the pivot rather than the box centre.
    offset = pivot - torch.einsum("bij,j->bi", turn, pivot)
    expected_t = t0 + torch.einsum("bij,bj->bi", rot0, offset)[:, :2] / apix
    err_start = rotation_angle_deg(rot0, expected)
    err_end = rotation_angle_deg(res.rotations, expected)
    assert torch.allclose(err_start, torch.full((b,), 2.0), atol=1e-3)
    assert err_end.max() < 0.6 and err_end.mean() < 0.4, err_end
    assert (res.translation_px - expected_t).norm(dim=1).max() < 0.15
    assert (res.rmsd_end < 0.3 * res.rmsd_start).all()
    # The opposite reading of the objective would have moved the pose the other way.
    assert (rotation_angle_deg(res.rotations, rot0 @ turn.transpose(1, 2)) > 3.0).all()


def test_domain_weights_from_a_mask():
    gmm = GaussianMixture(torch.tensor([[-10.0, 0.0, 0.0], [10.0, 0.0, 0.0]]), torch.ones(2), torch.ones(2))
    mask = torch.zeros(32, 32, 32)
    mask[:, :, 16:] = 1.0                      # x >= 0 (voxel 16 is the centre)
    assert torch.equal(domain_weights(gmm, mask, 1.0), torch.tensor([0.0, 1.0]))

"""Heterogeneity networks and training: decoder construction, continuous motion (adk open <-> closed
morph) found in each half independently, and the gold standard (half 1 ignores half 2's data)."""

from __future__ import annotations

import shutil

import mrcfile
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from gmmrefine.cli.main import main as cli_main
from gmmrefine.fourier.filters import low_pass
from gmmrefine.gmm.build import build_gmm
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.gmm.project import fourier_band
from gmmrefine.hetero.networks import (
    blend_weights,
    build_decoder,
    coarse_clusters,
    half_seed,
    motion_pca,
    pca,
    pretrain_decoder,
)
from gmmrefine.hetero.train import HalfStream, HeteroSettings, frc_gradient_features, latent_table, train_halves
from gmmrefine.io.particles import read_particles
from gmmrefine.io.star import read_star
from gmmrefine.reconstruct.invert import reconstruct_halves

# The morph test's data: SNR 0.1 (signal variance over the box of the CTF-modulated images / noise
# variance), box 48 at 2 A/px, 1,000 particles (~500 per half), FRC band 100-8 A.
SNR = 0.1
RESOLUTION_A = 8.0


pytestmark = pytest.mark.usefixtures("one_torch_thread", "kernels")  # kernels: both CPU paths


def _toy_gmm(n: int = 60, seed: int = 0) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    return GaussianMixture(torch.randn(n, 3, generator=g) * 10.0, 1.0 + torch.rand(n, generator=g),
                           2.0 + torch.rand(n, generator=g))


def test_decoder_zero_latent_is_neutral_and_pretraining_keeps_latents_near_it():
    neutral = _toy_gmm()
    gen = torch.Generator().manual_seed(3)
    dec = build_decoder(neutral, 4, n_coarse=8, seed=1, generator=gen)
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(9))
    before = dec.deformation(z)[0].pow(2).sum(-1).mean().sqrt().item()
    rms = pretrain_decoder(dec, gen, steps=300, target_rms_A=0.05)
    after = dec.deformation(z)[0].pow(2).sum(-1).mean().sqrt().item()
    assert before > 0.5                      # a random decoder moves Gaussians by angstroms
    assert rms < 0.05 and after < 0.2        # pre-trained: near neutral for |z| ~ 1
    for stage in ("coarse", "full"):
        dec.set_stage(stage)
        centers, amps = dec(torch.zeros(3, 4))
        assert torch.equal(centers, neutral.centers_A.expand(3, -1, -1))
        assert torch.equal(amps, neutral.amplitudes.expand(3, -1))


def test_coarse_gmm_and_blend_weights():
    neutral = _toy_gmm(80)
    labels, coarse = coarse_clusters(neutral, 32, seed=0)
    assert coarse.shape == (32, 3) and set(labels.tolist()) == set(range(32))
    w = blend_weights(neutral.centers_A, coarse)
    assert w.shape == (80, 32)
    assert torch.allclose(w.sum(1), torch.ones(80), atol=1e-6)
    # A uniform coarse displacement moves every Gaussian by exactly that displacement.
    shift = torch.tensor([1.0, -2.0, 3.0])
    assert torch.allclose(w @ shift.expand(32, 3), shift.expand(80, 3), atol=1e-5)
    # Each Gaussian follows its own cluster's centre most.
    assert (w.argmax(1) == labels).float().mean() > 0.9


def test_half_seeds_and_pca_are_deterministic():
    assert half_seed(0, 1) == half_seed(0, 1) != half_seed(0, 2) != half_seed(1, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)) * np.array([5.0, 2.0, 1.0, 0.1])
    scores, comps, mean, var = pca(x)
    assert np.all(np.diff(var) <= 0) and abs(abs(comps[0, 0]) - 1) < 0.02
    assert np.allclose(scores @ comps + mean, x)
    assert np.allclose(pca(-x)[1], comps)   # signs are fixed by the component, not the data


class _LinearMotion:
    """A stand-in decoder: latent 0 moves the Gaussians by ``u``, latent 1 by a hundredth of ``v``."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.centers_A = torch.randn(n, 3, generator=g) * 10
        self.amplitudes = torch.rand(n, generator=g) + 0.5
        self.widths_A = torch.rand(n, generator=g) + 1.0
        self.u, self.v = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)

    def deformation(self, z):
        disp = z[:, 0, None, None] * self.u + 0.01 * z[:, 1, None, None] * self.v
        return disp, torch.zeros(z.shape[0], self.u.shape[0])


def test_motion_components_follow_what_the_latents_do_to_the_map():
    """The latent PCA ranks by latent spread; the motion PCA by the displacement the decoder makes of it."""
    dec = _LinearMotion(300, 1)
    rng = np.random.default_rng(2)
    z = np.stack([rng.normal(size=3000) * 0.5, rng.normal(size=3000) * 2.0], 1).astype(np.float32)
    scores, directions, mean, var = motion_pca(z, dec, sample=1000)
    assert abs(np.corrcoef(pca(z)[0][:, 0], z[:, 1])[0, 1]) > 0.99        # the latents' PC1: the idle dimension
    assert abs(np.corrcoef(scores[:, 0], z[:, 0])[0, 1]) > 0.999          # the motion's PC1: the moving one
    mass = dec.amplitudes * dec.widths_A**3
    rms_u = float(((mass / mass.sum())[:, None] * dec.u**2).sum().sqrt())   # A of motion per unit of latent 0
    assert abs(var[0] / (z[:, 0].var(ddof=1) * rms_u**2) - 1) < 1e-3 and var[0] > 100 * var[1]
    # one standard deviation along the component's latent direction is one of latent 0's
    step = np.sqrt(var[0]) * directions[0]
    assert abs(abs(step[0]) / z[:, 0].std(ddof=1) - 1) < 0.01 and abs(step[1]) < 0.05 * z[:, 1].std()
    assert np.allclose(scores.mean(0), 0, atol=1e-9)
    again = motion_pca(z, dec, sample=1000)
    assert all(np.array_equal(a, b) for a, b in zip(again, (scores, directions, mean, var)))


@pytest.fixture(scope="module")
def morph_data(tmp_path_factory, adk_open_pdb, adk_closed_pdb):
    """adk morph particles and, per half, a GMM built from that half's own reconstruction."""
    root = tmp_path_factory.mktemp("hetero")
    sim = root / "sim"
    assert cli_main(["simulate", "--model", str(adk_open_pdb), "--model2", str(adk_closed_pdb), "--out", str(sim),
                     "--n", "1000", "--box", "48", "--apix", "2.0", "--snr", str(SNR), "--seed", "3",
                     "--device", "cpu"]) == 0
    ps = read_particles(sim / "particles.star")
    halves = reconstruct_halves(ps, progress=False)
    gmms = {}
    for h, half_map in zip((1, 2), halves):
        gmm, _ = build_gmm(low_pass(half_map, RESOLUTION_A, ps.apix), ps.apix, RESOLUTION_A, seed=h)
        gmms[h] = gmm
        gmm.save(sim / f"gmm_half{h}.npz")
    fraction = read_star(sim / "truth.star")["particles"]["gmmMorphFraction"].to_numpy()
    return sim, ps, gmms, fraction


def test_frc_gradient_features_point_uphill(morph_data):
    _, ps, gmms, _ = morph_data
    settings = HeteroSettings(progress=False, maxres_A=RESOLUTION_A)
    band = fourier_band(ps.box, ps.apix, settings.minres_A, settings.maxres_A)
    stream = HalfStream(ps, ps.half(1)[:32], ps.angles_deg, ps.shift_A, band, settings, gmms[1])
    chunk = next(stream.chunks())
    neutral = gmms[1]
    feats, frc = frc_gradient_features(neutral, chunk, slice(0, 32), band)
    assert feats.shape == (32, 4 * neutral.n)
    # A small step of each particle's centres along its own gradient raises its FRC (first order).
    step = 0.05 / feats[:, :3 * neutral.n].abs().max()
    moved = neutral.centers_A[None] + step * feats[:, :3 * neutral.n].view(32, neutral.n, 3)
    from gmmrefine.hetero.train import decoded_frc

    frc_moved = decoded_frc(moved, neutral.amplitudes, neutral.widths_A, chunk, slice(0, 32), band)
    assert (frc_moved > frc).all()


def test_ctf_multiplied_projections_tell_conformations_apart_better_than_phase_flipping():
    """The default comparison (``ctf="full"``) weighs each pixel by the CTF, a matched filter; the paper's
    phase flip gives the pixels near the CTF's zeros (astigmatic, so not constant on a ring) as much
    weight as the rest. Noisy particles of two conformations (20 of 80 Gaussians moved 1.5 A) are told
    apart by the score difference between the two GMMs: its separation d' must be larger with the CTF."""
    from gmmrefine.fourier.ctf import ctf_for_box
    from gmmrefine.geometry.rotations import random_rotations
    from gmmrefine.gmm.project import project_band
    from gmmrefine.hetero.train import _Chunk, decoded_frc

    assert HeteroSettings().ctf == "full"
    g = torch.Generator().manual_seed(0)
    box, apix, n = 64, 1.5, 1000
    band = fourier_band(box, apix, 100.0, 4.0)
    centers = torch.randn(80, 3, generator=g) * 9.0
    amps, widths = torch.ones(80), torch.full((80,), 1.5)
    moved = centers.clone()
    moved[:20] += torch.tensor([1.5, 0.0, 0.0])
    rot = random_rotations(n, g).float()
    t = torch.zeros(n, 2)
    du = 10000 + 15000 * torch.rand(n, generator=g)
    ctf = band.gather(ctf_for_box(box, apix, defocus_u_A=du, defocus_v_A=du - 800,
                                  defocus_angle_deg=360 * torch.rand(n, generator=g), voltage_kV=torch.full((n,), 300.0),
                                  cs_mm=torch.full((n,), 2.7), amplitude_contrast=torch.full((n,), 0.1)))
    state = torch.arange(n) % 2 == 1
    clean = torch.where(state[:, None], project_band(moved, amps, widths, rot, t, band),
                        project_band(centers, amps, widths, rot, t, band)) * ctf
    sigma = 6.0 * clean.abs().pow(2).mean().sqrt()
    images = clean + sigma * torch.complex(torch.randn(clean.shape, generator=g), torch.randn(clean.shape, generator=g)) / 2**0.5
    separation = {}
    for mode, chunk in (("full", _Chunk(torch.arange(n), images, rot, t, ctf)),
                        ("flip", _Chunk(torch.arange(n), images * torch.where(ctf < 0, -1.0, 1.0), rot, t, None))):
        d = (decoded_frc(moved, amps, widths, chunk, slice(0, n), band)
             - decoded_frc(centers, amps, widths, chunk, slice(0, n), band))
        separation[mode] = float((d[state].mean() - d[~state].mean()) / d.std())
    assert separation["flip"] > 0.5  # the data do tell the states apart
    assert separation["full"] > 1.05 * separation["flip"], separation


@pytest.mark.parametrize("inference,epochs,refits", [("optimise", 8, 1), ("encoder", 20, 0)])
def test_continuous_motion_pc1_follows_morph_fraction_in_each_half(morph_data, inference, epochs, refits,
                                                                    monkeypatch):
    import gmmrefine.hetero.train as train

    sim, ps, gmms, fraction = morph_data
    calls = {"latent": 0, "refit": 0}
    steps = train._FreeLatents.steps_
    refit = train.refit_neutral

    def counted(*args, **kwargs):
        calls["latent"] += 1
        return steps(*args, **kwargs)

    def counted_refit(*args, **kwargs):
        calls["refit"] += 1
        return refit(*args, **kwargs)

    monkeypatch.setattr(train._FreeLatents, "steps_", counted)
    monkeypatch.setattr(train, "refit_neutral", counted_refit)
    settings = HeteroSettings(epochs=epochs, maxres_A=RESOLUTION_A, progress=False, seed=0, inference=inference,
                              refits=refits)
    results = train_halves(ps, gmms, settings)
    # the optimised latents: every minibatch of every epoch, and once more at the end, in every training
    batches = sum(-(-len(ps.half(h)) // settings.batch) for h in (1, 2))
    assert calls["latent"] == ((refits + 1) * (epochs + 1) * batches if inference == "optimise" else 0)
    assert calls["refit"] == 2 * refits
    for h, r in results.items():
        assert len(r.refits) == refits
        # the decoder moves the refitted neutral GMM, not the one it was given
        assert torch.equal(r.decoder.widths_A, gmms[h].widths_A) == (refits == 0)
    table = latent_table(ps, results)
    assert table.shape == (len(ps), 4) and np.isfinite(table).all()
    for h, r in results.items():
        assert np.array_equal(r.indices, ps.half(h))
        pc1 = motion_pca(r.latents, r.decoder)[0][:, 0]
        rho = spearmanr(pc1, fraction[r.indices])[0]
        print(f"half {h}: Spearman(PC1, morph fraction) = {rho:.3f}, FRC {r.frc_neutral.mean():.4f} -> "
              f"{r.frc_final.mean():.4f}")
        assert abs(rho) >= 0.8
        assert r.frc_final.mean() > r.frc_neutral.mean() + 0.02
        # each particle's posterior position along PC1 (the column a user selects by) ranks as well, and
        # its posterior is narrower than the prior (the half's spread of scores): the image informed it
        assert r.pc1_A is not None and r.pc1_sd_A is not None
        rho_post = spearmanr(r.pc1_A, fraction[r.indices])[0]
        print(f"half {h}: posterior mean {rho_post:.3f}, sd {np.median(r.pc1_sd_A):.3f} of {pc1.std():.3f} A")
        assert abs(rho_post) >= 0.8 and np.sign(rho_post) == np.sign(rho)
        assert 0 < np.median(r.pc1_sd_A) < 0.8 * pc1.std()


@pytest.mark.parametrize("inference", ["optimise", "encoder"])
def test_gold_standard_half1_is_bit_identical_when_only_half2_changes(morph_data, tmp_path, inference):
    sim, ps, gmms, _ = morph_data
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(sim / "particles.star", other / "particles.star")
    shutil.copy(sim / "particles.mrcs", other / "particles.mrcs")
    with mrcfile.open(other / "particles.mrcs", mode="r+") as m:
        rows = ps.image_index[ps.half(2)]
        m.data[rows] = np.random.default_rng(1).normal(size=(len(rows), ps.box, ps.box)).astype(np.float32)
    ps2 = read_particles(other / "particles.star")
    settings = HeteroSettings(epochs=3, maxres_A=RESOLUTION_A, progress=False, seed=7, inference=inference)
    assert settings.refits == 1  # the default: each half's neutral GMM is refitted from its own particles
    a = train_halves(ps, gmms, settings)
    b = train_halves(ps2, gmms, settings)
    assert np.array_equal(a[1].latents, b[1].latents)
    assert np.array_equal(a[1].pc1_A, b[1].pc1_A) and not np.array_equal(a[2].pc1_A, b[2].pc1_A)
    assert (a[1].encoder is None) == (inference == "optimise")
    for net in ("encoder", "decoder") if inference == "encoder" else ("decoder",):
        sa, sb = getattr(a[1], net).state_dict(), getattr(b[1], net).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not np.array_equal(a[2].latents, b[2].latents)


def test_streaming_without_cache_gives_the_same_networks(morph_data):
    """Chunks re-read and encoder inputs recomputed every epoch (data larger than memory) give the
    same result as keeping them in memory."""
    _, ps, gmms, _ = morph_data
    base = dict(epochs=2, maxres_A=RESOLUTION_A, progress=False, seed=2, chunk=128)
    cached = train_halves(ps, gmms, HeteroSettings(**base), halves=(1,))[1]
    streamed = train_halves(ps, gmms, HeteroSettings(**base, cache_bytes=0), halves=(1,))[1]
    assert np.array_equal(cached.latents, streamed.latents)
    assert np.array_equal(cached.frc_neutral, streamed.frc_neutral)


def test_refitted_neutral_is_nearer_the_central_conformation_than_the_consensus_gmm(morph_data):
    """A half's GMM refitted to its central particles along the motion (:func:`refit_neutral`, here given
    the true morph fraction as the position) must describe the conformation at their mean better than the
    consensus GMM, whose moving parts average the whole morph: its rendered map's FSC with the atomic
    density of that conformation, averaged over the shells of the band, must be higher."""
    import argparse
    import json

    from gmmrefine.cli.simulate import build_source
    from gmmrefine.fourier.fsc import fourier_shell_correlation
    from gmmrefine.hetero.train import CENTRAL_SD, refit_neutral
    from gmmrefine.simulate.density import atoms_to_map

    sim, ps, gmms, fraction = morph_data
    ns = argparse.Namespace(**json.loads((sim / "simulation.json").read_text()))
    source, _, _ = build_source(ns)
    settings = HeteroSettings(maxres_A=RESOLUTION_A, progress=False)
    shells = int(ps.box * ps.apix / RESOLUTION_A)
    for h in (1, 2):
        idx = ps.half(h)
        gmm, info = refit_neutral(ps, idx, fraction[idx], ps.angles_deg, ps.shift_A, gmms[h], settings, half=h,
                                  seed=h)
        central = np.abs(fraction[idx] - fraction[idx].mean()) <= CENTRAL_SD * fraction[idx].std()
        assert info["n_particles"] == int(central.sum()) and 0.5 < central.mean() < 0.75
        f = float(fraction[idx][central].mean())
        coords = source.coords_A + f * (source.end_A - source.coords_A)
        truth = atoms_to_map(coords, ps.box, ps.apix, elements=source.elements, center_A=source.center_A,
                             bfactor_A2=source.bfactor_A2)
        fsc = {name: float(fourier_shell_correlation(g.render_map(ps.box, ps.apix), truth)[1:shells + 1].mean())
               for name, g in (("consensus", gmms[h]), ("refit", gmm))}
        print(f"half {h}: {info['n_particles']} central particles, mean fraction {f:.2f}: FSC to its "
              f"conformation over the band {fsc}")
        assert gmm.n == gmms[h].n
        assert fsc["refit"] > fsc["consensus"] + 0.01, fsc

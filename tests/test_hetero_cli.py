"""``gmmrefine hetero`` end to end on a tiny simulated data set: outputs, row order, --job input, bad input."""

from __future__ import annotations

import json
import shutil

import gemmi
import numpy as np
import pytest
import torch

from gmmrefine.cli.main import main as cli_main
from gmmrefine.gmm.build import build_gmm
from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.hetero.outputs import BAND_BEYOND_RESOLUTION, load_networks
from gmmrefine.hetero.train import HalfStream, HeteroSettings, compute_features, hetero_band
from gmmrefine.io.mrc import read_map
from gmmrefine.io.particles import read_particles
from gmmrefine.io.star import read_star

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory, adk_open_pdb, adk_closed_pdb):
    root = tmp_path_factory.mktemp("hetero_cli")
    sim = root / "sim"
    assert cli_main(["simulate", "--model", str(adk_open_pdb), "--model2", str(adk_closed_pdb), "--out", str(sim),
                     "--n", "120", "--box", "40", "--apix", "2.4", "--snr", "0.1", "--seed", "1",
                     "--device", "cpu"]) == 0
    volume, apix = read_map(sim / "truth_map.mrc")
    gmm, _ = build_gmm(volume, apix, 9.6, seed=0, steps=60)
    for h in (1, 2):
        gmm.save(sim / f"gmm_half{h}.npz")
    out = root / "hj"
    rc = cli_main(["hetero", "--particles", str(sim / "particles.star"), "--gmm1", str(sim / "gmm_half1.npz"),
                   "--gmm2", str(sim / "gmm_half2.npz"), "--out", str(out), "--epochs", "2", "--latent-dim", "3",
                   "--inference", "encoder"])
    assert rc == 0
    return root, sim, out, gmm


def test_outputs_and_row_order(data):
    root, sim, out, gmm = data
    for name in ("latent.npy", "particles.star", "latent_pca.png", "training_curves.png", "pc1_half1.pdb",
                 "pc1_half2.pdb", "pc1_half1_minus2sd.mrc", "pc1_half2_plus2sd.mrc", "networks_half1.pt",
                 "summary.json", "report.html"):
        assert (out / name).is_file(), name
    ps = read_particles(sim / "particles.star")
    latent = np.load(out / "latent.npy")
    assert latent.shape == (len(ps), 3) and latent.dtype == np.float32 and np.isfinite(latent).all()
    star = read_star(out / "particles.star")["particles"]
    for k in range(3):
        assert np.allclose(star[f"gmmLatent{k + 1}"].to_numpy(), latent[:, k], atol=1e-6)
    assert np.array_equal(star["rlnRandomSubset"].to_numpy(), ps.subset)
    # Row i of latent.npy is particle i: re-encode half 2 with the saved encoder.
    summary = json.loads((out / "summary.json").read_text())
    settings = HeteroSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["settings"].items()})
    enc, dec = load_networks(out / "networks_half2.pt")
    idx = ps.half(2)
    # the encoder's input is the FRC gradient against the half's neutral GMM as refitted (the decoder's)
    assert len(summary["halves"]["2"]["neutral_refits"]) == 1
    neutral = GaussianMixture(dec.centers_A, dec.amplitudes, dec.widths_A)
    assert neutral.n == gmm.n and not torch.allclose(neutral.centers_A, gmm.centers_A)
    stream = HalfStream(ps, idx, ps.angles_deg, ps.shift_A, hetero_band(ps, settings), settings, neutral)
    feats, _ = compute_features(stream)
    with torch.no_grad():
        z = enc(feats.cpu()).numpy()   # the job may have run on a GPU (--device auto)
    assert np.allclose(z, latent[idx], atol=1e-5)
    # The multi-model PDB: 7 frames along PC1, each with every Gaussian; the decoder's zero latent is neutral.
    st = gemmi.read_structure(str(out / "pc1_half1.pdb"))
    assert len(st) == 7 and all(m.count_atom_sites() == gmm.n for m in st)
    _, dec1 = load_networks(out / "networks_half1.pt")
    centers, _ = dec1(torch.zeros(1, 3))
    assert torch.allclose(centers[0], dec1.centers_A, atol=1e-5)
    assert summary["halves"]["1"]["n_particles"] + summary["halves"]["2"]["n_particles"] == len(ps)


def test_job_folder_input(data, tmp_path):
    root, sim, out, _ = data
    job = tmp_path / "job"
    (job / "final").mkdir(parents=True)
    (job / "it001").mkdir()
    (job / "it002").mkdir()
    shutil.copy(sim / "particles.star", job / "final" / "particles.star")
    shutil.copy(sim / "particles.mrcs", job / "final" / "particles.mrcs")
    for h in (1, 2):
        shutil.copy(sim / f"gmm_half{h}.npz", job / "it002" / f"gmm_half{h}.npz")
    (job / "it001" / "gmm_half1.npz").write_bytes(b"not a GMM")  # older iteration: must not be used
    (job / "final" / "summary.json").write_text(json.dumps({"resolution_final_A": 12.0}))
    hj = tmp_path / "hj"
    assert cli_main(["hetero", "--job", str(job), "--out", str(hj), "--epochs", "1"]) == 0
    summary = json.loads((hj / "summary.json").read_text())
    # no half estimates in this job: its resolution, with the band reaching 15 % beyond it (snr objective)
    assert summary["settings"]["maxres_A"] == pytest.approx(12.0 / BAND_BEYOND_RESOLUTION) and BAND_BEYOND_RESOLUTION == 1.15
    assert summary["gmms"]["1"].endswith("it002/gmm_half1.npz")
    assert np.load(hj / "latent.npy").shape == (120, 4)


def test_bad_input_exits_2_and_writes_nothing(data, tmp_path, capsys):
    root, sim, out, _ = data
    hj = tmp_path / "hj"
    cases = [
        ["--particles", str(sim / "particles.star"), "--gmm1", str(sim / "missing.npz"), "--gmm2",
         str(sim / "gmm_half2.npz")],
        ["--particles", str(sim / "particles.star"), "--gmm1", str(sim / "gmm_half1.npz")],
        ["--job", str(root), "--particles", str(sim / "particles.star")],
        ["--job", str(tmp_path / "nojob")],
        ["--particles", str(sim / "particles.star"), "--gmm1", str(sim / "gmm_half1.npz"), "--gmm2",
         str(sim / "gmm_half2.npz"), "--maxres", "3"],
    ]
    for extra in cases:
        assert cli_main(["hetero", *extra, "--out", str(hj)]) == 2
        assert not hj.exists()
    assert cli_main(["hetero", "--particles", str(sim / "particles.star"), "--gmm1", str(sim / "gmm_half1.npz"),
                     "--gmm2", str(sim / "gmm_half2.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err


def test_mask_gives_domain_poses_and_maps(data, tmp_path):
    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
    from gmmrefine.io.mrc import write_map

    root, sim, out, gmm = data
    ps = read_particles(sim / "particles.star")
    mask = np.zeros((ps.box,) * 3, dtype=np.float32)
    mask[:, :, ps.box // 2:] = 1.0
    write_map(tmp_path / "mask.mrc", mask, ps.apix)
    write_map(tmp_path / "small.mrc", mask[:8, :8, :8], ps.apix)
    base = ["hetero", "--particles", str(sim / "particles.star"), "--gmm1", str(sim / "gmm_half1.npz"),
            "--gmm2", str(sim / "gmm_half2.npz"), "--epochs", "1"]
    assert cli_main([*base, "--mask", str(tmp_path / "small.mrc"), "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    hj = tmp_path / "hj"
    assert cli_main([*base, "--mask", str(tmp_path / "mask.mrc"), "--out", str(hj)]) == 0
    for name in ("particles_domain.star", "domain_half1.mrc", "domain_half2.mrc"):
        assert (hj / name).is_file()
    dom = read_particles(hj / "particles_domain.star")
    change = rotation_angle_deg(euler_to_matrix(torch.as_tensor(dom.angles_deg)),
                                euler_to_matrix(torch.as_tensor(ps.angles_deg))).numpy()
    # 30 Adam steps at lr 1e-3 (2 rad per unit) move each rotation component by at most ~3.4 degrees.
    assert np.isfinite(change).all() and change.max() < 6.0
    summary = json.loads((hj / "summary.json").read_text())
    # Trilinear sampling: the mask exceeds 0.5 from half a voxel left of its edge.
    _, dec = load_networks(hj / "networks_half1.pt")  # its neutral GMM, as refitted
    assert summary["domain"]["1"]["n_domain_gaussians"] == int((dec.centers_A[:, 0] > -0.5 * ps.apix).sum())


def _job_folder(root, sim, *, half_resolution: dict, resolution: float, noisy_half2: bool):
    """A refine job folder as `hetero --job` reads it: final/particles.star, last iteration's GMMs and
    fsc.json (each half's own resolution), final/summary.json (the gold-standard resolution)."""
    from gmmrefine.gmm.model import GaussianMixture
    from gmmrefine.io.mrc import open_stack, write_stack

    job = root
    (job / "final").mkdir(parents=True)
    (job / "it002").mkdir()
    shutil.copy(sim / "particles.star", job / "final" / "particles.star")
    ps = read_particles(sim / "particles.star")
    stack = np.array(open_stack(sim / "particles.mrcs"), dtype=np.float32)
    gmm2 = GaussianMixture.load(sim / "gmm_half2.npz")
    if noisy_half2:
        rows = ps.image_index[ps.subset == 2]
        stack[rows] += np.random.default_rng(7).normal(0, stack.std(), stack[rows].shape).astype(np.float32)
        gmm2 = GaussianMixture(gmm2.centers_A + 0.5, gmm2.amplitudes * 1.1, gmm2.widths_A)
    write_stack(job / "final" / "particles.mrcs", stack, ps.apix)
    shutil.copy(sim / "gmm_half1.npz", job / "it002" / "gmm_half1.npz")
    gmm2.save(job / "it002" / "gmm_half2.npz")
    (job / "it002" / "fsc.json").write_text(json.dumps({"resolution_A": resolution,
                                                         "half_resolution_A": half_resolution}))
    (job / "final" / "summary.json").write_text(json.dumps({"resolution_final_A": resolution}))
    return job


def test_job_defaults_keep_half1_independent_of_half2(data, tmp_path):
    """`hetero --job` with the default band: half 2's images, GMM, own resolution and the gold-standard
    resolution all change, and every half-1 output stays bit-identical (each half's band comes from its
    own resolution estimate, not from the resolution both halves made)."""
    root, sim, _, _ = data
    a = _job_folder(tmp_path / "a", sim, half_resolution={"1": 12.0, "2": 14.0}, resolution=11.0, noisy_half2=False)
    b = _job_folder(tmp_path / "b", sim, half_resolution={"1": 12.0, "2": 10.0}, resolution=9.8, noisy_half2=True)
    for job in (a, b):
        assert cli_main(["hetero", "--job", str(job), "--out", str(job / "hj"), "--epochs", "1"]) == 0
    sa = json.loads((a / "hj" / "summary.json").read_text())
    sb = json.loads((b / "hj" / "summary.json").read_text())
    assert sa["settings"]["half_maxres_A"] == [12.0 / BAND_BEYOND_RESOLUTION, 14.0 / BAND_BEYOND_RESOLUTION]
    assert sb["settings"]["half_maxres_A"] == [12.0 / BAND_BEYOND_RESOLUTION, 10.0 / BAND_BEYOND_RESOLUTION]
    assert sa["settings"]["refits"] == 1 and len(sa["halves"]["1"]["neutral_refits"]) == 1  # the default path
    half1 = sorted(p.name for p in (a / "hj").iterdir() if "half1" in p.name)
    # networks, PC1 model series, the two PC1 maps, the 7 maps of the PC1 volume series, and per k-means
    # cluster its reconstruction and decoder map
    assert len(half1) == 4 + 7 + 2 * 4, half1
    for name in half1:
        if name.endswith(".pt"):  # the zip's folder name comes from the atomic write's temporary name
            na, nb = (torch.load(j / "hj" / name, weights_only=False) for j in (a, b))
            assert na.keys() == nb.keys()
            for key in na:
                if isinstance(na[key], dict):
                    assert all(torch.equal(na[key][k], nb[key][k]) for k in na[key]), key
                else:
                    assert na[key] == nb[key], key
        elif name.endswith(".mrc"):  # the header's label holds the time of writing
            ma, mb = read_map(a / "hj" / name), read_map(b / "hj" / name)
            assert np.array_equal(ma[0], mb[0]) and ma[1] == mb[1], name
        else:
            assert (a / "hj" / name).read_bytes() == (b / "hj" / name).read_bytes(), name
    def untimed(x):  # wall times differ between any two runs
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items() if not k.startswith("seconds")}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    assert untimed(sa["halves"]["1"]) == untimed(sb["halves"]["1"])
    assert sa["clusters"]["sizes"]["1"] == sb["clusters"]["sizes"]["1"]
    ps = read_particles(sim / "particles.star")
    la, lb = np.load(a / "hj" / "latent.npy"), np.load(b / "hj" / "latent.npy")
    assert np.array_equal(la[ps.half(1)], lb[ps.half(1)])
    assert not np.array_equal(la[ps.half(2)], lb[ps.half(2)])  # half 2 did see its changes


def test_select_writes_a_subset_relion_reads(data, tmp_path):
    """`gmmrefine select`: a PC1 range (in sd of each half) and a k-means cluster, as STAR files with
    every column of the hetero job's particles.star, which read_particles and relion_reconstruct read."""
    import subprocess

    from conftest import relion_available

    root, sim, out, _ = data
    full = read_star(out / "particles.star")["particles"]
    pc1, subset = full["gmmLatentPC1"].to_numpy(), full["rlnRandomSubset"].to_numpy()
    assert cli_main(["select", "--hetero", str(out), "--pc1-range", "-100", "0", "--out", str(tmp_path / "low.star")]) == 0
    low = read_star(tmp_path / "low.star")["particles"]
    assert list(low.columns) == list(full.columns)
    expected = np.zeros(len(full), dtype=bool)
    for h in (1, 2):
        rows = subset == h
        expected[rows] = pc1[rows] <= pc1[rows].mean()
    assert np.array_equal(low["rlnImageName"].to_numpy(), full["rlnImageName"].to_numpy()[expected])
    assert 0 < len(low) < len(full)
    for k in (1, 3):
        assert cli_main(["select", "--hetero", str(out), "--cluster", str(k), "--clusters", "3",
                         "--out", str(tmp_path / f"c{k}.star")]) == 0
    c1, c3 = (read_particles(tmp_path / f"c{k}.star") for k in (1, 3))
    names1, names3 = set(c1.tables["particles"]["rlnImageName"]), set(c3.tables["particles"]["rlnImageName"])
    assert names1 and names3 and not names1 & names3
    # clusters are numbered by mean PC1: cluster 1 sits below cluster 3 in each half
    for h in (1, 2):
        m1 = c1.tables["particles"]["gmmLatentPC1"][c1.subset == h].mean()
        m3 = c3.tables["particles"]["gmmLatentPC1"][c3.subset == h].mean()
        assert m1 < m3
    if relion_available():
        rec = tmp_path / "c1.mrc"
        subprocess.run(["relion_reconstruct", "--i", str(tmp_path / "c1.star"), "--o", str(rec), "--ctf"],
                       check=True, capture_output=True)
        assert read_map(rec)[0].shape == (40, 40, 40)
    # bad input: one sentence, exit 2, nothing written
    assert cli_main(["select", "--hetero", str(out), "--pc1-range", "1", "-1", "--out", str(tmp_path / "x.star")]) == 2
    assert cli_main(["select", "--hetero", str(tmp_path), "--cluster", "1", "--out", str(tmp_path / "x.star")]) == 2
    assert not (tmp_path / "x.star").exists()


def test_cluster_maps_select_and_chimerax_series(data, tmp_path):
    """Per half and k-means cluster: a column, a decoder map and a reconstruction of exactly that cluster's
    particles (the same map `select --cluster` + `reconstruct` make from them, to FSC 0.95 over the band);
    and a ChimeraX script whose volume series name files that exist."""
    import re

    from gmmrefine.fourier.fft import downsample_map
    from gmmrefine.fourier.fsc import fourier_shell_correlation
    from gmmrefine.hetero.outputs import CLUSTERS

    root, sim, out, _ = data
    star = read_star(out / "particles.star")["particles"]
    labels, subset = star["gmmLatentCluster"].to_numpy(np.int64), star["rlnRandomSubset"].to_numpy()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clusters"]["k"] == CLUSTERS
    for h in (1, 2):
        assert sorted(set(labels[subset == h])) == list(range(1, CLUSTERS + 1))
        assert summary["clusters"]["sizes"][str(h)] == {str(c): int(((labels == c) & (subset == h)).sum())
                                                        for c in range(1, CLUSTERS + 1)}
        for c in range(1, CLUSTERS + 1):
            assert (out / f"cluster_half{h}_k{c}_gmm.mrc").is_file()
    # the clusters are made in the written motion coordinates (PC1 position, PC2.. scores, angstrom), numbered
    # by their mean PC1; the job's labels are exactly k-means of those columns, not of the latents
    from gmmrefine.hetero.outputs import cluster_labels

    latent_dim = sum(c.startswith("gmmLatent") and c[len("gmmLatent"):].isdigit() for c in star.columns)
    motion = star[[f"gmmLatentPC{k}" for k in range(1, latent_dim + 1)]].to_numpy(np.float64)
    assert latent_dim >= 2 and np.isfinite(motion).all() and "gmmLatentPC1Sd" in star.columns
    assert np.array_equal(cluster_labels(motion, subset, CLUSTERS, seed=0), labels)
    for h in (1, 2):
        means = [motion[(subset == h) & (labels == c), 0].mean() for c in range(1, CLUSTERS + 1)]
        assert np.all(np.diff(means) > 0), means
    # select --cluster picks the job's own clusters
    assert cli_main(["select", "--hetero", str(out), "--cluster", "2", "--out", str(tmp_path / "c2.star")]) == 0
    chosen = read_star(tmp_path / "c2.star")["particles"]
    assert np.array_equal(chosen["rlnImageName"].to_numpy(), star["rlnImageName"].to_numpy()[labels == 2])
    assert cli_main(["reconstruct", "--particles", str(tmp_path / "c2.star"), "--out", str(tmp_path / "rec"),
                     "--half", "1"]) == 0
    ours, apix = read_map(out / "cluster_half1_k2.mrc")
    theirs = downsample_map(torch.as_tensor(read_map(tmp_path / "rec" / "half1.mrc")[0]), ours.shape[-1])
    fsc = fourier_shell_correlation(torch.as_tensor(ours), theirs)
    band_shells = int(ours.shape[-1] * apix / summary["settings"]["maxres_A"])
    assert float(fsc[1:band_shells + 1].min()) > 0.95, fsc
    script = (out / "pc1_series.cxc").read_text()
    patterns = re.findall(r"open (\S+) vseries true", script)
    assert len(patterns) == 2 and "vseries play #2" in script
    for p in patterns:
        assert len(list(out.glob(p))) == 7

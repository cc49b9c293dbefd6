"""Inputs and outputs of ``gmmrefine hetero``: the files a heterogeneity job writes (latents, STAR
columns, plots, GMMs and maps along the principal directions, the trained networks, a report page).
Where a refinement job keeps its particles and GMMs: :mod:`gmmrefine.refine.job_outputs`."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import cast

import numpy as np
import torch

from gmmrefine.gmm.model import GaussianMixture
from gmmrefine.hetero.networks import Decoder, Encoder
from gmmrefine.hetero.train import HalfResult, HeteroSettings
from gmmrefine.io.atomic import atomic_path, write_json_atomic, write_text_atomic
from gmmrefine.refine.job_outputs import HeteroInputs

LATENT_COLUMN = "gmmLatent{k}"          # 1-based
PC1_COLUMN = "gmmLatentPC1"             # position along PC1 (A of motion) within the particle's own half
PC_COLUMN = "gmmLatentPC{k}"            # score (A of motion) on component k >= 2 within the particle's own half
PC1_SD_COLUMN = "gmmLatentPC1Sd"        # its posterior standard deviation (A)
CLUSTER_COLUMN = "gmmLatentCluster"     # k-means cluster within the particle's own half, 1..CLUSTERS by mean PC1
TRAJECTORY_SD = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
#: k-means clusters of each half's latents a hetero job writes maps of (and ``select --cluster`` picks from).
CLUSTERS = 4


#: With the ``"snr"`` objective the default band reaches this factor beyond the half's resolution (in
#: frequency): its rings are weighted by their measured SNR, so rings past the FSC threshold still add
#: what they carry. Measured on the tuning sets of ``benchmarks/hetero_peer.py`` (seed 7, half
#: resolutions 3.37-3.43 A, box 128, 1 A/px; |Spearman| of PC1 with the true hinge, half 1 / half 2):
#: band to 4 A (the former 4-pixel floor) / 3.5 / 3.0 / 2.5 A gave 0.822 / 0.806, 0.845 / 0.832,
#: 0.854 / 0.842, 0.858 / 0.845 (LID +/-8 deg) and 0.893 / 0.878, 0.894 / 0.888, 0.896 / 0.893,
#: 0.896 / 0.893 (+/-15 deg).
BAND_BEYOND_RESOLUTION = 1.15


def default_maxres_A(resolution_A: float | None, apix: float, objective: str = "snr") -> float:
    """FRC band limit (A) from a resolution estimate: with the ``"snr"`` objective
    :data:`BAND_BEYOND_RESOLUTION` beyond it, down to Nyquist; with ``"frc"`` (every ring weighs the
    same) the resolution itself, no finer than 4 pixels. Without an estimate, 4 pixels."""
    if resolution_A is None:
        return 4.0 * apix
    if objective == "snr":
        return max(float(resolution_A) / BAND_BEYOND_RESOLUTION, 2.0 * apix)
    return max(float(resolution_A), 4.0 * apix)


# ------------------------------------------------------------------------------------------------
# Latents along principal directions
# ------------------------------------------------------------------------------------------------

Components = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def pc_trajectory(components: Components, component: int = 0, sd: tuple[float, ...] = TRAJECTORY_SD) -> np.ndarray:
    """``(F, L)`` latents at ``mean + t * sd_k * direction_k`` for ``t`` in ``sd`` (standard deviations
    of the half's scores along principal component ``k``), from ``components`` =
    :func:`~gmmrefine.hetero.networks.motion_pca` ``(scores, directions, mean, variance)``."""
    _, directions, mean, var = components
    step = np.sqrt(max(float(var[component]), 0.0))
    return np.stack([mean + t * step * directions[component] for t in sd]).astype(np.float32)


def cluster_labels(motion: np.ndarray, subset: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means labels ``1..k`` of each half's particles in their decoded-motion coordinates, numbered by
    the clusters' mean position along PC1.

    The coordinates are the columns :data:`PC1_COLUMN`, :data:`PC_COLUMN` (angstrom of motion), not the
    latent vectors: a latent dimension that only fits noise spreads as widely as the motion (the prior
    holds each near unit variance) but moves the map little, so it has little spread here and the clusters
    split the particles along what moves. Measured on ``benchmarks/hetero_peer.py``'s tuning set (seed 7,
    LID hinged +/-15 deg, consensus poses), the extreme clusters of 4 per half, true hinge angle mean / sd
    of their particles, latents -> motion coordinates: half 1 +6.5 / 5.4 and -8.1 / 4.8 -> +10.2 / 3.6 and
    -10.7 / 3.2 deg; half 2 +5.9 / 6.2 and -6.7 / 5.5 -> +10.3 / 3.5 and -11.1 / 2.9 deg.

    Args:
        motion: ``(N, C)`` motion coordinates, column 0 the PC1 position; subset: ``(N,)`` half sets (1, 2;
            other values are left out, label 0).
        k: clusters per half; seed: k-means seed.

    Raises:
        InputError: a half has fewer than ``k`` particles.
    """
    from sklearn.cluster import KMeans

    from gmmrefine.errors import InputError

    labels = np.zeros(len(motion), dtype=np.int64)
    for h in (1, 2):
        rows = np.flatnonzero(subset == h)
        if len(rows) < k:
            raise InputError(f"--clusters {k}: half {h} has only {len(rows)} particles.", field="--clusters")
        coords = np.asarray(motion, dtype=np.float64)[rows]
        coords = coords[:, np.isfinite(coords).all(0)]  # a half with fewer components than the other
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(coords)
        order = np.argsort([coords[raw == c, 0].mean() for c in range(k)])
        rank = np.empty(k, dtype=np.int64)
        rank[order] = np.arange(1, k + 1)
        labels[rows] = rank[raw]
    return labels


def write_multimodel_pdb(gmms: list[GaussianMixture], path: Path, *, box: int, apix: float) -> None:
    """One PDB with a MODEL per GMM (a movie in ChimeraX: ``open f.pdb; mseries play #1``)."""
    structure = None
    for i, gmm in enumerate(gmms):
        one = gmm._structure(((box // 2) * apix,) * 3)
        model = one[0].clone()
        model.num = i + 1
        if structure is None:
            structure = one
            del structure[0]
        structure.add_model(model)
    assert structure is not None, "write_multimodel_pdb needs at least one GMM"
    with atomic_path(path) as tmp:
        structure.write_pdb(str(tmp))


# ------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------

def save_networks(result: HalfResult, settings: HeteroSettings, path: Path) -> None:
    """Encoder and decoder weights plus what rebuilds them (``torch.load(..., weights_only=True)``)."""
    dec = result.decoder
    payload = {
        "half": result.half, "seed": result.seed, "latent_dim": settings.latent_dim,
        "n_features": 0 if result.encoder is None else int(result.encoder.feature_mean.shape[0]),
        "encoder_hidden": list(settings.encoder_hidden), "decoder_hidden": list(settings.decoder_hidden),
        "coarse_scale_A": dec.coarse_scale_A, "fine_scale_A": dec.fine_scale_A,
        "amplitude_scale": dec.amplitude_scale, "stage": dec.stage,
        "encoder": {} if result.encoder is None else result.encoder.state_dict(), "decoder": dec.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_networks(path: Path) -> tuple[Encoder | None, Decoder]:
    """The networks written by :func:`save_networks` (CPU, eval mode; no encoder from an ``"optimise"`` run)."""
    p = torch.load(path, map_location="cpu", weights_only=True)
    gen = torch.Generator().manual_seed(0)
    enc = None
    if p["encoder"]:
        enc = Encoder(p["n_features"], p["latent_dim"], tuple(p["encoder_hidden"]), gen)
        enc.load_state_dict(p["encoder"])
    d = p["decoder"]
    neutral = GaussianMixture(d["centers_A"], d["amplitudes"], d["widths_A"])
    dec = Decoder(neutral, p["latent_dim"], d["blend"], tuple(p["decoder_hidden"]), gen,
                  coarse_scale_A=p["coarse_scale_A"], fine_scale_A=p["fine_scale_A"],
                  amplitude_scale=p["amplitude_scale"])
    dec.load_state_dict(d)
    dec.set_stage(p["stage"])
    return (None if enc is None else enc.eval()), dec.eval()


# ------------------------------------------------------------------------------------------------
# Plots and report
# ------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latent_pca(results: dict[int, HalfResult], components: dict[int, Components], path: Path,
                    labels: np.ndarray | None = None) -> None:
    """PC1 against PC2 of each half's decoded motions (one panel per half; ``components``:
    :func:`~gmmrefine.hetero.networks.motion_pca` per half), coloured by k-means cluster (``labels``:
    ``(N,)`` per particle, :func:`cluster_labels`) if given."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 4.2), squeeze=False)
    for ax, (h, r) in zip(axes[0], sorted(results.items())):
        scores, _, _, var = components[h]
        frac = var / max(var.sum(), 1e-30)
        y = scores[:, 1] if scores.shape[1] > 1 else np.zeros(len(scores))
        if labels is None:
            ax.scatter(scores[:, 0], y, s=4, alpha=0.5)
        else:
            mine = labels[r.indices]
            for c in np.unique(mine):
                sel = mine == c
                ax.scatter(scores[sel, 0], y[sel], s=4, alpha=0.6, label=f"cluster {c} ({int(sel.sum())})")
            ax.legend(fontsize=7, markerscale=3)
        ax.set_xlabel(f"motion PC1, A ({100 * frac[0]:.0f} % of variance)")
        ax.set_ylabel(f"motion PC2, A ({100 * frac[1]:.0f} % of variance)" if len(frac) > 1
                      else "(one latent dimension)")
        ax.set_title(f"half {h}: {len(scores)} particles")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_training_curves(results: dict[int, HalfResult], path: Path) -> None:
    """Mean training FRC per epoch of each half (the stage switch marked)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for h, r in sorted(results.items()):
        epochs = [e["epoch"] for e in r.history]
        ax.plot([0] + epochs, [float(r.frc_neutral.mean())] + [e["frc"] for e in r.history], marker="o", ms=3,
                label=f"half {h}")
        full = [e["epoch"] for e in r.history if e["stage"] == "full"]
        if full:
            ax.axvline(full[0] - 0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch (0: neutral GMM; dashed: full-GMM refinement starts)")
    ax.set_ylabel("mean band FRC (decoded GMM vs particle)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(out: Path, summary: dict) -> Path:
    """``report.html``: the heterogeneity section (numbers, plots, files)."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary["table"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>gmmrefine hetero</title></head><body>
<h1>Heterogeneity analysis</h1>
<p>Each half set fitted its own latents and decoder on its own particles (gold standard). The decoder
moves the neutral GMM's Gaussians (through a {summary['n_coarse']}-Gaussian coarse GMM, and with the full stage every
Gaussian and its amplitude); training maximises the agreement over the band between decoded projections and
the particles at their consensus poses ({html.escape(summary['objective'])}).</p>
<table>{rows}</table>
<h2>Latent space</h2><p>PC1, PC2, ... are the principal components of what the latents do to the map: of each
particle's decoded displacement of the Gaussians, weighted by their mass (scores in angstrom), not of the
latent vectors, whose spare dimensions can spread as widely as the motion while moving almost nothing.</p>
<img src="latent_pca.png" alt="principal components of each half's decoded motions">
<h2>Training</h2><img src="training_curves.png" alt="training curves">
<h2>Outputs</h2><p><code>latent.npy</code> (one row per particle, in the order of the particle file),
<code>particles.star</code> (columns {html.escape(LATENT_COLUMN.format(k='1..L'))}, {PC1_COLUMN}: each particle's
position along PC1, the posterior mean from its own image along the decoded path, and {PC1_SD_COLUMN}, its
posterior standard deviation), {PC_COLUMN.format(k='2..')} (scores on the other components; the k-means
clusters are made in these coordinates),
<code>pc1_half{{1,2}}.pdb</code> (decoded GMMs along PC1 at {', '.join(f'{t:g}' for t in TRAJECTORY_SD)} standard
deviations: a movie in ChimeraX with <code>mseries</code>), <code>pc1_half{{1,2}}_{{minus,plus}}2sd.mrc</code>
(maps of the decoded GMMs at the ends), <code>pc1_series.cxc</code> (open it in ChimeraX: each half's maps along
PC1, <code>pc1_half{{1,2}}_series_NN.mrc</code>, play as a volume series), per half and k-means cluster
(column {CLUSTER_COLUMN}, coloured in the plot above; <code>gmmrefine select --cluster K</code> picks one)
<code>cluster_half{{1,2}}_kK.mrc</code> (the cluster's particles reconstructed: real density) and
<code>cluster_half{{1,2}}_kK_gmm.mrc</code> (the decoder at the cluster's mean latent),
<code>networks_half{{1,2}}.pt</code>, <code>summary.json</code>.</p>
</body></html>
"""
    path = out / "report.html"
    write_text_atomic(path, page)
    return path


def write_outputs(out: Path, ps, results: dict[int, HalfResult], settings: HeteroSettings,
                  inputs: HeteroInputs) -> dict:
    """Every output file of a heterogeneity job into ``out``; returns the summary."""
    from gmmrefine.hetero.train import latent_table
    from gmmrefine.io.particles import write_particles_star

    table = latent_table(ps, results)
    with atomic_path(out / "latent.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table)
    extra = {LATENT_COLUMN.format(k=k + 1): table[:, k].astype(np.float64) for k in range(table.shape[1])}
    assert all(r.components is not None for r in results.values()), "train_half sets the motion components"
    components = {h: cast(Components, r.components) for h, r in results.items()}
    motion = np.full((len(ps), max(c[0].shape[1] for c in components.values())), np.nan)
    pc1 = motion[:, 0]  # a view: PC1 is the first motion coordinate
    pc1_sd = np.full(len(ps), np.nan)
    per_half = {}
    for h, r in sorted(results.items()):
        scores, comps, _, var = components[h]
        motion[r.indices, :scores.shape[1]] = scores
        pc1[r.indices] = scores[:, 0] if r.pc1_A is None else r.pc1_A
        if r.pc1_sd_A is not None:
            pc1_sd[r.indices] = r.pc1_sd_A
        trajectory = torch.as_tensor(pc_trajectory(components[h]))
        gmms = r.decoder.decode_gmm(trajectory)
        write_multimodel_pdb(gmms, out / f"pc1_half{h}.pdb", box=ps.box, apix=ps.apix)
        for t, name in ((0, "minus2sd"), (len(gmms) - 1, "plus2sd")):
            from gmmrefine.io.mrc import write_map

            write_map(out / f"pc1_half{h}_{name}.mrc", gmms[t].render_map(ps.box, ps.apix).numpy(), ps.apix)
        save_networks(r, settings, out / f"networks_half{h}.pt")
        disp = (torch.stack([g.centers_A for g in gmms]) - r.decoder.centers_A).norm(dim=-1)
        per_half[str(h)] = {
            "n_particles": int(len(r.indices)), "n_gaussians": r.decoder.n_gaussians, "seed": r.seed,
            "frc_neutral": float(r.frc_neutral.mean()), "frc_final": float(r.frc_final.mean()),
            "explained_variance_fraction": (var / max(var.sum(), 1e-30)).tolist(),
            "pc1_direction": (comps[0] / max(float(np.linalg.norm(comps[0])), 1e-30)).tolist(),
            "pc1_rms_motion_A_at_2sd": float(disp[-1].pow(2).mean().sqrt()),
            "pc1_max_motion_A_at_2sd": float(disp[-1].max()),
            "seconds": r.seconds, "history": r.history, "neutral_refits": r.refits,
        }
    extra[PC1_COLUMN] = pc1.copy()
    for c in range(1, motion.shape[1]):
        extra[PC_COLUMN.format(k=c + 1)] = motion[:, c].copy()
    if any(r.pc1_sd_A is not None for r in results.values()):
        extra[PC1_SD_COLUMN] = pc1_sd
    subset = np.zeros(len(ps), dtype=np.int64)
    for h, r in results.items():
        subset[r.indices] = h
    k = min([CLUSTERS] + [len(r.indices) for r in results.values()])
    labels = cluster_labels(motion, subset, k, seed=0) if k >= 2 and len(results) == 2 else None
    if labels is not None:
        extra[CLUSTER_COLUMN] = labels
    write_particles_star(ps, out / "particles.star", ps.angles_deg, ps.shift_A, extra=extra,
                         absolute_image_paths=True)
    plot_latent_pca(results, components, out / "latent_pca.png", labels)
    clusters = write_cluster_maps(out, ps, results, settings, labels) if labels is not None else {}
    write_chimerax_series(out, ps, results, components)
    plot_training_curves(results, out / "training_curves.png")
    summary = {
        "particles": str(inputs.particles), "gmms": {str(h): str(p) for h, p in inputs.gmms.items()},
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.__dict__.items()},
        "halves": per_half, "clusters": {"k": k if labels is not None else 0, "sizes": clusters},
    }
    write_json_atomic(out / "summary.json", summary)
    counts = ", ".join(f"half {h}: {v['n_particles']}" for h, v in per_half.items())
    table_rows = {"particles": f"{len(ps)} ({counts})",
                  "latent dimension": settings.latent_dim, "epochs": settings.epochs,
                  "FRC band": f"{settings.minres_A:g} - {settings.maxres_A:g} A" if settings.half_maxres_A is None
                  else (f"half 1: {settings.minres_A:g} - {settings.half_maxres_A[0]:g} A; "
                        f"half 2: {settings.minres_A:g} - {settings.half_maxres_A[1]:g} A"),
                  "inference": settings.inference if settings.inference == "optimise"
                  else f"encoder (input: {settings.encoder_input})",
                  "objective": settings.objective}
    for half_key, v in per_half.items():
        table_rows[f"half {half_key}: mean FRC neutral -> decoded"] = f"{v['frc_neutral']:.4f} -> {v['frc_final']:.4f}"
        table_rows[f"half {half_key}: PC1 variance / RMS motion at 2 sd"] = (
            f"{100 * v['explained_variance_fraction'][0]:.0f} % / {v['pc1_rms_motion_A_at_2sd']:.2f} A")
    objective = ("ring correlations weighted by their SNR" if settings.objective == "snr"
                 else "mean band FRC")
    write_report(out, {"table": table_rows, "n_coarse": settings.n_coarse, "objective": objective})
    return summary


def write_cluster_maps(out: Path, ps, results: dict[int, HalfResult], settings: HeteroSettings,
                       labels: np.ndarray) -> dict:
    """Maps of each half's k-means clusters (``labels``, :func:`cluster_labels`), two kinds per cluster:
    ``cluster_half{h}_k{c}_gmm.mrc``, the half's decoder at the cluster's mean latent (what the model says),
    and ``cluster_half{h}_k{c}.mrc``, the cluster's own particles reconstructed at their consensus poses
    (real density, CTF-weighted as ``refine`` reconstructs; on the grid of the half's band, pixel size in
    the header). One pass over each half's images fills every cluster's grid. Returns per-half cluster
    sizes."""
    import dataclasses

    from gmmrefine.io.mrc import write_map
    from gmmrefine.reconstruct.insert import FourierAccumulator
    from gmmrefine.reconstruct.invert import accumulate_halves, reconstruct_maps_low_memory
    from gmmrefine.refine.global_refine import working_box

    info = {}
    for h, r in sorted(results.items()):
        mine = labels[r.indices]
        clusters = [int(c) for c in np.unique(mine) if c > 0]
        means = torch.as_tensor(np.stack([r.latents[mine == c].mean(0) for c in clusters]), dtype=torch.float32)
        for c, gmm in zip(clusters, r.decoder.decode_gmm(means)):
            write_map(out / f"cluster_half{h}_k{c}_gmm.mrc", gmm.render_map(ps.box, ps.apix).numpy(), ps.apix)
        work = working_box(ps.box, ps.apix, settings.for_half(h).maxres_A)
        by_cluster = dataclasses.replace(ps, subset=np.where(np.isin(np.arange(len(ps)), r.indices), labels, 0))
        accs = {c: FourierAccumulator(work, device=settings.device) for c in clusters}
        accs = accumulate_halves(by_cluster, ctf_mode="wiener", halves=tuple(clusters), device=settings.device,
                                 progress=settings.progress, accs=accs)
        for c, m in reconstruct_maps_low_memory(accs).items():
            write_map(out / f"cluster_half{h}_k{c}.mrc", m.cpu().numpy(), ps.apix * ps.box / work)
        info[str(h)] = {str(c): int((mine == c).sum()) for c in clusters}
    return info


def write_chimerax_series(out: Path, ps, results: dict[int, HalfResult], components: dict[int, Components]) -> Path:
    """``pc1_half{h}_series_NN.mrc`` (the decoder's maps along PC1 at :data:`TRAJECTORY_SD`) and
    ``pc1_series.cxc``, a ChimeraX script that opens each half's maps as a volume series and plays them
    (``open pc1_series.cxc`` in ChimeraX; it runs in its own folder)."""
    from gmmrefine.io.mrc import write_map

    lines = ["# gmmrefine hetero: each half's maps along motion PC1 "
             f"({', '.join(f'{t:g}' for t in TRAJECTORY_SD)} sd) as a volume series"]
    for model, (h, r) in enumerate(sorted(results.items()), start=1):
        gmms = r.decoder.decode_gmm(torch.as_tensor(pc_trajectory(components[h])))
        maps = [g.render_map(ps.box, ps.apix).numpy() for g in gmms]
        for i, m in enumerate(maps):
            write_map(out / f"pc1_half{h}_series_{i:02d}.mrc", m, ps.apix)
        level = float(np.percentile(maps[len(maps) // 2], 99.0))  # about the top 1 % of voxels: the particle
        lines += [f"open pc1_half{h}_series_*.mrc vseries true",
                  f"volume #{model} level {level:.4g}",
                  f"vseries play #{model} loop true direction oscillate"]
    lines.append("tile")
    path = out / "pc1_series.cxc"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def write_domain_outputs(out: Path, ps, results: dict[int, HalfResult], settings: HeteroSettings,
                         mask: torch.Tensor) -> dict:
    """Conformation to pose for the masked domain: per half, the domain pose of every particle from its
    own networks, then ``particles_domain.star`` (those poses) and ``domain_half{1,2}.mrc`` (each half
    reconstructed at them). Returns per-half statistics (also added to ``summary.json``)."""
    from gmmrefine.geometry.rotations import euler_to_matrix, rotation_angle_deg
    from gmmrefine.hetero.conformation import domain_poses, domain_weights
    from gmmrefine.hetero.train import HalfStream, hetero_band
    from gmmrefine.io.mrc import write_map
    from gmmrefine.io.particles import write_particles_star
    from gmmrefine.reconstruct.invert import reconstruct_halves

    angles = np.array(ps.angles_deg, dtype=np.float64)
    shifts = np.array(ps.shift_A, dtype=np.float64)
    info = {}
    for h, r in sorted(results.items()):
        band = hetero_band(ps, settings.for_half(h))
        dec = r.decoder
        neutral = GaussianMixture(dec.centers_A, dec.amplitudes, dec.widths_A)
        domain = domain_weights(neutral, mask, ps.apix)
        stream = HalfStream(ps, r.indices, ps.angles_deg, ps.shift_A, band, settings.for_half(h), neutral)
        a, s, ratio = domain_poses(stream, torch.as_tensor(r.latents), dec, domain)
        angles[r.indices] = a.numpy()
        shifts[r.indices] = s.numpy()
        change = rotation_angle_deg(euler_to_matrix(torch.as_tensor(ps.angles_deg[r.indices])),
                                    euler_to_matrix(a)).numpy()
        info[str(h)] = {"n_domain_gaussians": int(domain.sum()), "mean_change_deg": float(change.mean()),
                        "std_change_deg": float(change.std()), "median_rmsd_ratio": float(ratio.median())}
        dec.cpu()
    write_particles_star(ps, out / "particles_domain.star", angles, shifts, absolute_image_paths=True)
    # As gmmrefine refine reconstructs (Wiener-like CTF weighting), so these maps compare with its own.
    halves = reconstruct_halves(ps, angles, shifts, ctf_mode="wiener", device=settings.device,
                                progress=settings.progress)
    for h, m in zip((1, 2), halves):
        write_map(out / f"domain_half{h}.mrc", m.cpu().numpy(), ps.apix)
    summary_path = out / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        summary["domain"] = info
        write_json_atomic(summary_path, summary)
    return info

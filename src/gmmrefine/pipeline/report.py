"""Plots and the one-page HTML report of a refinement job.

Inputs are the job's own files (``itNNN/fsc.json``, ``itNNN/poses_half{h}.npz``), so a report can be
rebuilt from any finished or interrupted job.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from gmmrefine.io.atomic import atomic_path, write_text_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def iteration_dirs(job_path: Path) -> list[Path]:
    """``itNNN`` folders that hold an ``fsc.json``, in order."""
    return sorted(p.parent for p in Path(job_path).glob("it[0-9][0-9][0-9]/fsc.json"))


def plot_fsc(histories: list[dict], path: Path) -> None:
    """Gold-standard FSC of every iteration against spatial frequency (1/A)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for h in histories:
        f = np.asarray(h["frequency_inv_A"])
        label = "start" if h["iteration"] == 0 else f"iteration {h['iteration']}"
        ax.plot(f[1:], np.asarray(h["fsc"])[1:], label=f"{label}: {h['resolution_A']:.2f} A")
    ax.axhline(0.143, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("FSC half 1 vs half 2")
    ax.set_ylim(-0.1, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Gold-standard FSC per iteration")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_pose_changes(changes: list[tuple[int, np.ndarray, np.ndarray]], path: Path) -> None:
    """Histograms of the rotation change (degrees) and shift change (pixels) per iteration.

    Args:
        changes: ``(iteration, change_deg (N,), change_px (N,))`` per iteration.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _histograms(axes[0], [(k, deg) for k, deg, _ in changes], lambda x: f"{x.mean():.2f} +/- {x.std():.2f} deg")
    _histograms(axes[1], [(k, px) for k, _, px in changes], lambda x: f"{x.mean():.2f} +/- {x.std():.2f} px")
    axes[0].set_xlabel("rotation change (degrees)")
    axes[1].set_xlabel("shift change (pixels)")
    for ax in axes:
        ax.set_ylabel("particles")
        ax.legend(fontsize=8)
    fig.suptitle("Pose change per iteration")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _histograms(ax, series: list[tuple[int | str, np.ndarray]], describe) -> None:
    """One step histogram per iteration ``(k, values)`` on shared bins up to the 99.5th percentile,
    each labelled ``it k: describe(values)`` (or ``k: ...`` for a named series)."""
    top = max([float(np.nanpercentile(v, 99.5)) for _, v in series] + [1e-3])
    for k, values in series:
        ax.hist(values[np.isfinite(values)], bins=np.linspace(0, top, 41), histtype="step",
                label=f"{f'it {k}' if isinstance(k, int) else k}: {describe(values)}")


def load_changes(job_path: Path) -> list[tuple[int, np.ndarray, np.ndarray]]:
    out = []
    for d in iteration_dirs(job_path):
        k = int(d.name[2:])
        files = sorted(d.glob("poses_half*.npz"))
        if k == 0 or not files:
            continue
        deg, px = [], []
        for f in files:
            with np.load(f) as z:
                deg.append(z["change_deg"])
                px.append(z["change_px"])
        out.append((k, np.concatenate(deg), np.concatenate(px)))
    return out


def load_precision(job_path: Path) -> list[tuple[int | str, np.ndarray, np.ndarray]]:
    """``(iteration, precision_deg (N,), precision_A (N,))`` of the iterations that estimated one (each
    half's own, from its images), and ``("final", ...)``, the precision of ``final/particles.star`` with
    each half's reference error (``itNNN/precision.json``), if the job measured it."""
    out: list[tuple[int | str, np.ndarray, np.ndarray]] = []
    for d in iteration_dirs(job_path):
        deg, ang, factors = [], [], []
        calibration = json.loads((d / "precision.json").read_text()) if (d / "precision.json").is_file() else None
        for h in (1, 2):
            f = d / f"poses_half{h}.npz"
            if not f.is_file():
                continue
            with np.load(f) as z:
                if "precision_deg" in z.files:
                    deg.append(z["precision_deg"])
                    ang.append(z["precision_A"])
                    if calibration is not None:
                        factors.append((calibration[str(h)]["factor_deg"], calibration[str(h)]["factor_A"]))
        if deg and np.isfinite(np.concatenate(deg)).any():
            out.append((int(d.name[2:]), np.concatenate(deg), np.concatenate(ang)))
            if calibration is not None and len(factors) == len(deg):
                out.append(("final", np.concatenate([x * f for x, (f, _) in zip(deg, factors)]),
                            np.concatenate([x * f for x, (_, f) in zip(ang, factors)])))
    return out


def load_ring_snr(job_path: Path) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(iteration, half, frequency (1/A) (R,), SNR (R,))`` of every half pass that measured its ring SNR."""
    out = []
    for d in iteration_dirs(job_path):
        for h in (1, 2):
            f = d / f"half{h}_resolution.json"
            info = json.loads(f.read_text()) if f.is_file() else {}
            if "ring_snr" in info:
                fsc = json.loads((d / "fsc.json").read_text())
                step = fsc["frequency_inv_A"][1] if len(fsc["frequency_inv_A"]) > 1 else 1.0
                out.append((int(d.name[2:]), h, np.asarray(info["ring_snr"]["shell"]) * step,
                            np.asarray(info["ring_snr"]["snr"])))
    return out


def plot_precision(precision: list[tuple[int | str, np.ndarray, np.ndarray]],
                   ring_snr: list[tuple[int, int, np.ndarray, np.ndarray]], path: Path) -> None:
    """Per-particle precision (expected angular and shift error) per iteration, and the per-ring SNR the
    objective was weighted by."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.9))
    _histograms(axes[0], [(k, deg) for k, deg, _ in precision], lambda x: f"median {np.nanmedian(x):.2f} deg")
    _histograms(axes[1], [(k, ang) for k, _, ang in precision], lambda x: f"median {np.nanmedian(x):.2f} A")
    axes[0].set_xlabel("angular precision (expected error, degrees)")
    axes[1].set_xlabel("shift precision (expected error, A)")
    for ax in axes[:2]:
        ax.set_ylabel("particles")
        ax.legend(fontsize=8)
    for k, h, freq, snr in ring_snr:
        axes[2].semilogy(freq, np.maximum(snr, 1e-6), ls="-" if h == 1 else "--", label=f"it {k} half {h}")
    axes[2].set_xlabel("spatial frequency (1/A)")
    axes[2].set_ylabel("SNR per ring (CTF-free)")
    if ring_snr:
        axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle("Pose precision per particle, and the per-ring SNR that weighted the objective")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_patches(plan: dict, job_path: Path, path: Path) -> None:
    """GMM centres of each half (rows) in two projections (columns), coloured by matched patch ``pNN``."""
    import torch

    from gmmrefine.gmm.model import GaussianMixture

    kmeans = [p for p in plan["patches"] if not p.get("added")]  # an added domain patch has no k-means label
    plt = _pyplot()
    cmap = plt.get_cmap("tab20" if plan["k"] > 10 else "tab10")
    fig, axes = plt.subplots(2, 2, figsize=(9, 8.4))
    start = Path(job_path) / plan["start_dir"]
    for row, h in enumerate((1, 2)):
        xyz = GaussianMixture.load(start / f"gmm_half{h}.npz").centers_A.to(torch.float64).numpy()
        labels = np.load(Path(job_path) / "patches" / f"labels_half{h}.npy")
        pair = np.empty(plan["k"], dtype=np.int64)
        for i, p in enumerate(kmeans):
            pair[p[f"half{h}"]["label"]] = i
        colour = cmap(pair[labels] % cmap.N)
        for col, (a, b, names) in enumerate(((0, 1, "x y"), (0, 2, "x z"))):
            ax = axes[row, col]
            ax.scatter(xyz[:, a], xyz[:, b], c=colour, s=6, linewidths=0)
            for p in kmeans:
                c = p[f"half{h}"]["center_A"]
                ax.annotate(p["name"], (c[a], c[b]), fontsize=8, ha="center", weight="bold")
            x, y = names.split()
            ax.set_xlabel(f"{x} (A)")
            ax.set_ylabel(f"{y} (A)")
            ax.set_aspect("equal")
            ax.set_title(f"half {h}: Gaussian centres by patch ({x}-{y})", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_bodies(job_path: Path, path: Path) -> None:
    """Multi-body refinement at a glance: each body's FSC in the composite, its rotation relative to the
    consensus, the particles on the first two principal components of the body motions, and the
    variance each component explains."""
    job_path = Path(job_path)
    local = json.loads((job_path / "patches" / "local_resolution.json").read_text())
    motion = json.loads((job_path / "patches" / "motion.json").read_text())
    with np.load(job_path / "patches" / "motion.npz") as z:
        rotvec, scores = z["rotvec_deg"], z["scores"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for b in local["bodies"]:
        axes[0].plot(b["frequency_inv_A"], b["fsc"], label=f"{b['name']} {b['resolution_A']:.2f} A")
    axes[0].axhline(0.143, color="grey", lw=0.8, ls="--")
    axes[0].set_xlabel("spatial frequency (1/A)")
    axes[0].set_ylabel("FSC in the body's mask (corrected)")
    axes[0].set_title("composite halves, per body", fontsize=9)
    axes[0].legend(fontsize=8)
    for i, b in enumerate(motion["bodies"]):
        axes[1].hist(np.linalg.norm(rotvec[i], axis=1), bins=40, histtype="step", label=b["name"])
    axes[1].set_xlabel("rotation relative to the consensus (deg)")
    axes[1].set_ylabel("particles")
    axes[1].legend(fontsize=8)
    if scores.shape[1] >= 2:
        axes[2].scatter(scores[:, 0], scores[:, 1], s=3, alpha=0.4, linewidths=0)
    axes[2].set_xlabel("PC1 of the body motions")
    axes[2].set_ylabel("PC2")
    explained = np.asarray(motion["explained_variance"])
    axes[3].bar(np.arange(1, len(explained) + 1), 100 * explained)
    axes[3].set_xlabel("principal component")
    axes[3].set_ylabel("variance explained (%)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def body_section(job_path: Path, plan: dict) -> str:
    """The report's multi-body section (``--bodies``)."""
    job_path = Path(job_path)
    local_path, motion_path = job_path / "patches" / "local_resolution.json", job_path / "patches" / "motion.json"
    if not (local_path.is_file() and motion_path.is_file()):
        return ""
    plot_bodies(job_path, job_path / "final" / "bodies.png")
    local = {b["name"]: b for b in json.loads(local_path.read_text())["bodies"]}
    motion = json.loads(motion_path.read_text())
    moves = {b["name"]: b for b in motion["bodies"]}
    rows = []
    for p in plan["patches"]:
        info = json.loads((job_path / "patches" / p["name"] / "fsc.json").read_text())
        lr, mv = local[p["name"]], moves[p["name"]]
        median = lr["median_local_resolution_A"]
        cells = [p["name"], html.escape(Path(p["mask"]).name), f"{p['volume_A3'] / 1000:.0f}",
                 f"{info['global']['resolution_A']:.2f}", f"{info['patch']['resolution_A']:.2f}",
                 f"{lr['resolution_A']:.2f}", "-" if median is None else f"{median:.2f}",
                 f"{mv['mean_rotation_deg']:.2f} &plusmn; {mv['sd_rotation_deg']:.2f}",
                 f"{mv['mean_translation_A']:.2f} &plusmn; {mv['sd_translation_A']:.2f}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    comp = json.loads((job_path / "final" / "composite_fsc.json").read_text())
    explained = ", ".join(f"{100 * v:.0f} %" for v in motion["explained_variance"][:4])
    if plan.get("context") != "subtract":
        context = "each refined on its own, the rest of the particle widened (Gaussians outside the mask up to 4x wider)"
    elif plan.get("rest_poses") == "bodies":
        context = ("in lock-step, each iteration subtracting from the images the other bodies' GMMs at their own poses "
                   "of the previous iteration (the consensus GMM at the consensus poses in the first, and wherever no "
                   "mask reaches), times the CTF")
    else:
        context = ("each refined on its own, the rest of the particle (its consensus GMM projected at the consensus "
                   "pose, times the CTF) subtracted from the images")
    return f"""<h2>Multi-body refinement</h2>
<p>{len(rows)} bodies, each in its mask (the same mask for both halves), for
{plan['patch_iterations']} iterations per half from the global refinement's poses, {context}. Composite of the bodies'
half maps, <code>sum M_i Map_i / sum M_i</code> (overlaps counted once, the global map where no mask
reaches): gold-standard resolution {comp['resolution_A']:.2f} A (global refinement
{comp['start_resolution_A']:.2f} A); local resolution of the composite in
<code>final/composite_local_resolution.mrc</code>. Masked FSCs are corrected by phase randomisation.
Body motions are relative to the consensus pose, in the map's frame; their principal components explain
{explained} of the variance.</p>
<table><tr><th>body</th><th>mask</th><th>volume (nm&sup3;)</th><th>masked resolution, global (A)</th>
<th>body's own half maps (A)</th><th>composite in the mask (A)</th><th>median local resolution (A)</th>
<th>rotation (deg)</th><th>translation (A)</th></tr>
{''.join(rows)}</table>
<img src="bodies.png" alt="per-body FSC, body rotations and principal components of the body motions">
<p>Per body in <code>patches/bNN/</code>: the mask, the body's unmasked, unfiltered half maps, its refined poses
<code>particles.star</code> (for RELION; <code>gmmrefine export</code> writes a cryoSPARC <code>.cs</code>),
<code>fsc.json</code> and the iterations <code>itNNN/</code>; motions in <code>patches/motion.json</code> and
<code>patches/motion.npz</code>.</p>
"""


def patch_section(job_path: Path) -> str:
    """The report's patch-by-patch section (empty without ``patches/patches.json``)."""
    job_path = Path(job_path)
    plan_path = job_path / "patches" / "patches.json"
    if not plan_path.is_file():
        return ""
    plan = json.loads(plan_path.read_text())
    if plan.get("bodies"):
        return body_section(job_path, plan)
    if plan["k"] > 0 and (job_path / "patches" / "labels_half1.npy").is_file():
        plot_patches(plan, job_path, job_path / "final" / "patches.png")
    rows = []
    for p in plan["patches"]:
        f = job_path / "patches" / p["name"] / "fsc.json"
        info = json.loads(f.read_text()) if f.is_file() else None
        if p.get("added"):
            cells = [p["name"], f"domain of {html.escape(Path(p['hetero_job']).name)} (conformation to pose)",
                     "its mask", "-"]
        else:
            cells = [p["name"], f"{p['half1']['n_gaussians']} / {p['half2']['n_gaussians']}",
                     f"{p['half1']['radius_A']:.1f} / {p['half2']['radius_A']:.1f}", f"{p['center_distance_A']:.1f}"]
        if info is not None:
            cells += [f"{info['global']['resolution_A']:.2f}", f"{info['patch']['resolution_A']:.2f}",
                      f"{info['mean_change_deg']:.2f} &plusmn; {info['std_change_deg']:.2f}", f"{info['seconds']:.0f}"]
        else:
            cells += ["", "", "", ""]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    comp = job_path / "final" / "composite_fsc.json"
    summary = ""
    if comp.is_file():
        c = json.loads(comp.read_text())
        added = sum(1 for p in plan["patches"] if p.get("added"))
        what = f"the {plan['k']} patches" + (f" and {added} added domain patch (replacing them inside its mask)"
                                             if added else "")
        summary = (f"<p>Composite of {what} (per half, own masks): gold-standard resolution "
                   f"{c['resolution_A']:.2f} A (global refinement {c['start_resolution_A']:.2f} A); "
                   "<code>final/composite_half1.mrc</code>, <code>final/composite_half2.mrc</code>, "
                   "<code>final/composite_map.mrc</code>.</p>")
    return f"""<h2>Patch-by-patch refinement</h2>
<p>{plan['k']} k-means patches per half (each half from its own GMM; patches matched across halves by their
centres, for naming and evaluation only), {plan['patch_iterations']} focused iterations each
{'(symmetry-expanded, ' + html.escape(plan['symmetry']) + ')' if plan['symmetry'] != 'C1' else ''}.
Masked FSC in the mean of the two halves' masks, corrected by phase randomisation.</p>
<table><tr><th>patch</th><th>Gaussians half 1 / 2</th><th>radius half 1 / 2 (A)</th>
<th>centre distance (A)</th><th>masked resolution, global (A)</th><th>masked resolution, patch (A)</th>
<th>pose change (deg)</th><th>time (s)</th></tr>
{''.join(rows)}</table>
{summary}
<p>Per patch in <code>patches/pNN/</code>: the masks (<code>mask_half1.mrc</code>, <code>mask_half2.mrc</code>:
the one each half was aligned with; <code>mask_eval.mrc</code>), the unmasked, unfiltered half maps
<code>half1.mrc</code>, <code>half2.mrc</code>, the patch's refined poses <code>particles.star</code> (for RELION or
cryoSPARC), <code>fsc.json</code> and the iterations <code>itNNN/</code>.</p>
<img src="patches.png" alt="GMM centres coloured by patch">
"""


def write_report(job_path: Path, *, extra_rows: dict[str, str] | None = None) -> Path:
    """Write ``final/fsc.png``, ``final/pose_changes.png`` (and with patches ``final/patches.png``) and
    ``final/report.html``; returns the report."""
    job_path = Path(job_path)
    final = job_path / "final"
    final.mkdir(parents=True, exist_ok=True)
    histories = [json.loads((d / "fsc.json").read_text()) for d in iteration_dirs(job_path)]
    changes = load_changes(job_path)
    precision = load_precision(job_path)
    plot_fsc(histories, final / "fsc.png")
    if changes:
        plot_pose_changes(changes, final / "pose_changes.png")
    if precision:
        plot_precision(precision, load_ring_snr(job_path), final / "pose_precision.png")
    job = json.loads((job_path / "job.json").read_text())
    rows = []
    for h in histories:
        k = h["iteration"]
        halves = h.get("half_resolution_A", {})
        rows.append(
            "<tr>" + "".join(f"<td>{v}</td>" for v in (
                "start" if k == 0 else k,
                f"{h['resolution_A']:.2f}",
                " / ".join(f"{float(halves[x]):.2f}" for x in sorted(halves)),
                "" if k == 0 else f"{h['mean_change_deg']:.2f} &plusmn; {h['std_change_deg']:.2f}",
                "" if k == 0 else f"{h['mean_change_px']:.2f} &plusmn; {h['std_change_px']:.2f}",
                "" if k == 0 else " / ".join(str(v) for v in h.get("n_gaussians", {}).values()),
                "" if "median_precision_deg" not in h else
                f"{h['median_precision_deg']:.2f} / {h['median_precision_A']:.2f}",
                "" if k == 0 else f"{h.get('seconds', 0.0):.0f}",
                html.escape(h.get("convergence", {}).get("reason", "")),
            )) + "</tr>")
    params = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                     for k, v in job["params"].items())
    extra = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                    for k, v in (extra_rows or {}).items())
    pose_img = '<img src="pose_changes.png" alt="pose changes">' if changes else ""
    precision_section = ("<h2>Pose precision</h2><p>Each particle's expected angular and shift error, from the "
                         "curvature of its SNR-weighted objective (Fisher information), written to "
                         "<code>final/particles.star</code> as <code>gmmAngularPrecisionDeg</code> and "
                         "<code>gmmShiftPrecisionAngst</code>.</p>"
                         '<img src="pose_precision.png" alt="pose precision">') if precision else ""
    summary_path = final / "summary.json"
    warnings = json.loads(summary_path.read_text()).get("warnings", []) if summary_path.is_file() else []
    warnings_html = ("<div style=\"background:#fdd;border:2px solid #c00;padding:6px 12px\"><b>Warnings</b><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul></div>") if warnings else ""
    # the command that made the job (``gmmrefine demo`` runs a refinement job of its own)
    words = str(job.get("command_line", "")).split()
    command = f"gmmrefine {words[1]}" if len(words) > 1 and words[0].endswith("gmmrefine") else "gmmrefine refine"
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(command)}: {html.escape(job_path.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>{html.escape(command)} &mdash; {html.escape(job_path.name)}</h1>
<p>Command: <code>{html.escape(job.get('command_line', ''))}</code><br>Started {html.escape(job.get('started', ''))};
versions: {html.escape(', '.join(f'{k} {v}' for k, v in job.get('versions', {}).items()))}</p>
{warnings_html}<h2>Iterations</h2>
<table><tr><th>iteration</th><th>gold-standard resolution (A, FSC 0.143)</th><th>half 1 / half 2 own estimate (A)</th>
<th>rotation change (deg)</th><th>shift change (px)</th><th>Gaussians half 1 / 2</th>
<th>precision, median (deg / A)</th><th>time (s)</th><th>convergence</th></tr>
{''.join(rows)}</table>
{'<h2>Result</h2><table>' + extra + '</table>' if extra else ''}
<h2>FSC</h2><img src="fsc.png" alt="FSC per iteration">
<h2>Pose changes</h2>{pose_img}
{precision_section}
{patch_section(job_path)}<h2>Outputs</h2><p><code>final/particles.star</code> (refined poses, every input column kept),
<code>final/half1.mrc</code>, <code>final/half2.mrc</code>, <code>final/map.mrc</code> (average of the halves,
low-pass filtered to the final resolution); per iteration <code>itNNN/</code>: half maps, GMMs
(<code>.npz</code>, <code>.pdb</code>), <code>fsc.json</code>, <code>particles.star</code>.</p>
<h2>Parameters</h2><table>{params}</table>
</body></html>
"""
    write_text_atomic(final / "report.html", page)
    return final / "report.html"

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
    max_deg = max([float(np.percentile(d, 99.5)) for _, d, _ in changes] + [1e-3])
    max_px = max([float(np.percentile(p, 99.5)) for _, _, p in changes] + [1e-3])
    for k, deg, px in changes:
        axes[0].hist(deg, bins=np.linspace(0, max_deg, 41), histtype="step",
                     label=f"it {k}: {deg.mean():.2f} +/- {deg.std():.2f} deg")
        axes[1].hist(px, bins=np.linspace(0, max_px, 41), histtype="step",
                     label=f"it {k}: {px.mean():.2f} +/- {px.std():.2f} px")
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


def write_report(job_path: Path, *, extra_rows: dict[str, str] | None = None) -> Path:
    """Write ``final/fsc.png``, ``final/pose_changes.png`` and ``final/report.html``; returns the report."""
    job_path = Path(job_path)
    final = job_path / "final"
    final.mkdir(parents=True, exist_ok=True)
    histories = [json.loads((d / "fsc.json").read_text()) for d in iteration_dirs(job_path)]
    changes = load_changes(job_path)
    plot_fsc(histories, final / "fsc.png")
    if changes:
        plot_pose_changes(changes, final / "pose_changes.png")
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
                "" if k == 0 else f"{h.get('seconds', 0.0):.0f}",
            )) + "</tr>")
    params = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                     for k, v in job["params"].items())
    extra = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>"
                    for k, v in (extra_rows or {}).items())
    pose_img = '<img src="pose_changes.png" alt="pose changes">' if changes else ""
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>gmmrefine refine: {html.escape(job_path.name)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}img{{max-width:100%}}</style></head><body>
<h1>gmmrefine refine &mdash; {html.escape(job_path.name)}</h1>
<p>Command: <code>{html.escape(job.get('command_line', ''))}</code><br>Started {html.escape(job.get('started', ''))};
versions: {html.escape(', '.join(f'{k} {v}' for k, v in job.get('versions', {}).items()))}</p>
<h2>Iterations</h2>
<table><tr><th>iteration</th><th>gold-standard resolution (A, FSC 0.143)</th><th>half 1 / half 2 own estimate (A)</th>
<th>rotation change (deg)</th><th>shift change (px)</th><th>Gaussians half 1 / 2</th><th>time (s)</th></tr>
{''.join(rows)}</table>
{'<h2>Result</h2><table>' + extra + '</table>' if extra else ''}
<h2>FSC</h2><img src="fsc.png" alt="FSC per iteration">
<h2>Pose changes</h2>{pose_img}
<h2>Outputs</h2><p><code>final/particles.star</code> (refined poses, every input column kept),
<code>final/half1.mrc</code>, <code>final/half2.mrc</code>, <code>final/map.mrc</code> (average of the halves,
low-pass filtered to the final resolution); per iteration <code>itNNN/</code>: half maps, GMMs
(<code>.npz</code>, <code>.pdb</code>), <code>fsc.json</code>, <code>particles.star</code>.</p>
<h2>Parameters</h2><table>{params}</table>
</body></html>
"""
    write_text_atomic(final / "report.html", page)
    return final / "report.html"

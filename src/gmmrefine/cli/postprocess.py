"""``gmmrefine postprocess``: gold-standard FSC (masked, phase-randomisation corrected), sharpening,
local resolution from two half maps."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from gmmrefine.errors import InputError

COMMAND = "postprocess"
HELP = "FSC (unmasked, masked, corrected), resolution, sharpened map and local resolution from half maps"
DESCRIPTION = (
    "Post-process two half maps as relion_postprocess does: FSC of the unmasked and masked halves, the "
    "phase-randomisation correction of Chen et al. (2013), resolution at FSC 0.143 and 0.5, FSC weighting, "
    "sharpening by a B-factor (fitted to the Guinier plot unless --bfactor is given) or by the amplitude "
    "profile of a reference map (--reference), low-pass to the resolution, and a local resolution map. "
    "Writes fsc.json, fsc.png, guinier.png, sharpened.mrc (and sharpened_masked.mrc with a mask), "
    "local_resolution.mrc and local_resolution.png into --out."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--half1", type=Path, required=True, help="first unfiltered half map (MRC)")
    parser.add_argument("--half2", type=Path, required=True, help="second unfiltered half map (MRC)")
    parser.add_argument("--mask", type=Path, default=None, help="soft mask (MRC, values 0..1)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--apix", type=float, default=None, help="pixel size in A (default: from the maps)")
    parser.add_argument("--bfactor", type=float, default=None,
                        help="sharpening B-factor in A^2 (negative sharpens); default: fitted (auto)")
    parser.add_argument("--autob-lowres", type=float, default=10.0,
                        help="lowest resolution (A) in the Guinier fit of the B-factor")
    parser.add_argument("--reference", type=Path, default=None,
                        help="map whose radial amplitude profile the result is sharpened to (instead of a B-factor)")
    parser.add_argument("--locres-window", type=int, default=24, help="local resolution window box (px, even)")
    parser.add_argument("--locres-step", type=int, default=4, help="spacing of local resolution windows (px)")
    parser.add_argument("--no-locres", action="store_true", help="skip the local resolution map")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty --out")


# ----------------------------------------------------------------------------------------------
# Shared with ``gmmrefine reconstruct``
# ----------------------------------------------------------------------------------------------

def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty output folder unless ``force``, a file in its place, and a place that
    cannot be written (:func:`gmmrefine.pipeline.job.check_output_folder`)."""
    from gmmrefine.pipeline.job import check_output_folder

    check_output_folder(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder.", path=str(out), field="--out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise InputError(f"--out {out}: folder exists and is not empty; choose another or pass --force.",
                         path=str(out), field="--out")


def fsc_table(curves: dict[str, torch.Tensor], box: int, apix: float) -> dict:
    """JSON-ready FSC curves: shells, frequency (1/A), resolution (A; null at shell 0) and each curve."""
    shells = list(range(box // 2 + 1))
    freq = [s / (box * apix) for s in shells]
    table = {"shell": shells, "frequency_invA": freq,
             "resolution_A": [None if f == 0 else 1.0 / f for f in freq]}
    for name, curve in curves.items():
        table[f"fsc_{name}"] = [float(v) for v in curve.detach().cpu().tolist()]
    return table


def plot_fsc_curves(path: Path, curves: dict[str, torch.Tensor], box: int, apix: float, title: str,
                    resolution_A: float | None = None) -> None:
    """FSC curves against spatial frequency (1/A), a top axis in A, 0.143 and 0.5 lines; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmmrefine.io.atomic import atomic_path

    freq = np.arange(box // 2 + 1) / (box * apix)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, curve in curves.items():
        ax.plot(freq, curve.detach().cpu().numpy(), label=name)
    ax.axhline(0.143, color="grey", lw=0.8, ls="--", label="0.143")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="0.5")
    if resolution_A:
        ax.axvline(1.0 / resolution_A, color="k", lw=0.8, ls="--")
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, freq[-1])
    top = ax.secondary_xaxis("top", functions=(lambda f: 1.0 / np.maximum(f, 1e-6),
                                                 lambda r: 1.0 / np.maximum(r, 1e-6)))
    ticks = [f for f in ax.get_xticks() if 0 < f <= freq[-1]]
    top.set_xticks([1.0 / f for f in ticks])
    top.set_xticklabels([f"{1.0 / f:.1f}" for f in ticks])
    top.set_xlabel("resolution (A)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def read_cubic_map(path: Path, what: str) -> tuple[np.ndarray, float]:
    """A cubic map and its pixel size; InputError naming the file otherwise."""
    from gmmrefine.io.mrc import read_map, require_cubic

    if not path.is_file():
        raise InputError(f"{what} {path}: file not found.", path=str(path), field=what)
    try:
        data, apix = read_map(path)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{what} {path}: not a readable MRC map ({err}).", path=str(path), field=what) from None
    require_cubic(data, path)
    if not np.isfinite(data).all():
        raise InputError(f"{what} {path}: contains NaN or Inf values.", path=str(path), field=what)
    return data, apix


# ----------------------------------------------------------------------------------------------

def _load_inputs(args) -> dict:
    h1, apix1 = read_cubic_map(args.half1, "--half1")
    h2, apix2 = read_cubic_map(args.half2, "--half2")
    if h1.shape != h2.shape:
        raise InputError(f"--half2 {args.half2}: size {h2.shape[0]}^3 differs from --half1 {args.half1} "
                         f"({h1.shape[0]}^3); the half maps must have the same box.", path=str(args.half2),
                         field="shape")
    if h1.shape[0] % 2:
        raise InputError(f"--half1 {args.half1}: odd box {h1.shape[0]}; expected an even box.",
                         path=str(args.half1), field="shape")
    if apix1 > 0 and apix2 > 0 and abs(apix1 - apix2) > 1e-3 * max(apix1, apix2):
        raise InputError(f"--half2 {args.half2}: pixel size {apix2:.4f} A differs from --half1 {args.half1} "
                         f"({apix1:.4f} A).", path=str(args.half2), field="voxel size")
    apix = args.apix if args.apix is not None else (apix1 if apix1 > 0 else apix2)
    if not apix or not math.isfinite(apix) or apix <= 0:
        raise InputError(f"--half1 {args.half1}: the header has no pixel size; pass --apix.", path=str(args.half1),
                         field="voxel size")
    out = {"half1": torch.from_numpy(h1), "half2": torch.from_numpy(h2), "apix": float(apix), "mask": None,
           "reference": None}
    if args.mask is not None:
        m, mapix = read_cubic_map(args.mask, "--mask")
        if m.shape != h1.shape:
            raise InputError(f"--mask {args.mask}: size {m.shape[0]}^3 differs from the half maps "
                             f"({h1.shape[0]}^3).", path=str(args.mask), field="shape")
        if mapix > 0 and abs(mapix - apix) > 1e-3 * apix:
            raise InputError(f"--mask {args.mask}: pixel size {mapix:.4f} A differs from the half maps "
                             f"({apix:.4f} A).", path=str(args.mask), field="voxel size")
        if m.min() < -1e-3 or m.max() > 1 + 1e-3 or m.max() <= 0:
            raise InputError(f"--mask {args.mask}: values must lie in [0, 1] with some above 0, got "
                             f"{m.min():.3g}..{m.max():.3g}.", path=str(args.mask), field="values")
        out["mask"] = torch.from_numpy(np.clip(m, 0, 1))
    if args.reference is not None:
        r, _ = read_cubic_map(args.reference, "--reference")
        if r.shape != h1.shape:
            raise InputError(f"--reference {args.reference}: size {r.shape[0]}^3 differs from the half maps "
                             f"({h1.shape[0]}^3).", path=str(args.reference), field="shape")
        out["reference"] = torch.from_numpy(r)
    for name in ("bfactor", "autob_lowres"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise InputError(f"--{name.replace('_', '-')}: expected a finite number, got {v}.", field=name)
    if args.autob_lowres <= 0:
        raise InputError(f"--autob-lowres: expected a positive resolution in A, got {args.autob_lowres}.",
                         field="autob_lowres")
    if not args.no_locres:
        w = args.locres_window
        if w % 2 or w < 8 or w > h1.shape[0]:
            raise InputError(f"--locres-window: expected an even size from 8 to the box ({h1.shape[0]}), got {w}.",
                             field="locres_window")
        if args.locres_step < 1:
            raise InputError(f"--locres-step: expected at least 1, got {args.locres_step}.", field="locres_step")
    return out


def main(args) -> int:
    from gmmrefine.fourier.filters import radial_amplitude
    from gmmrefine.fourier.local_resolution import local_resolution
    from gmmrefine.fourier.postprocess import postprocess
    from gmmrefine.io.atomic import write_json_atomic
    from gmmrefine.io.mrc import write_map

    inputs = _load_inputs(args)
    check_out_dir(args.out, args.force)
    apix = inputs["apix"]
    ref_amp = None if inputs["reference"] is None else radial_amplitude(inputs["reference"])
    result = postprocess(inputs["half1"], inputs["half2"], apix, inputs["mask"], bfactor_A2=args.bfactor,
                         lowres_A=args.autob_lowres, reference_amplitude=ref_amp)
    box = result.box
    args.out.mkdir(parents=True, exist_ok=True)
    write_map(args.out / "sharpened.mrc", result.sharpened.numpy(), apix)
    if result.sharpened_masked is not None:
        write_map(args.out / "sharpened_masked.mrc", result.sharpened_masked.numpy(), apix)
    locres_summary = None
    if not args.no_locres:
        lr = local_resolution(inputs["half1"], inputs["half2"], apix, window_px=args.locres_window,
                              step_px=args.locres_step, mask=inputs["mask"])
        write_map(args.out / "local_resolution.mrc", lr.numpy(), apix)
        inside = lr[lr > 0]
        locres_summary = {"median_A": float(inside.median()) if inside.numel() else None,
                          "min_A": float(inside.min()) if inside.numel() else None,
                          "max_A": float(inside.max()) if inside.numel() else None,
                          "window_px": args.locres_window, "step_px": args.locres_step}
        _plot_local_resolution(args.out / "local_resolution.png", lr, inputs["mask"], apix)
    report = {
        "half1": str(args.half1), "half2": str(args.half2), "mask": None if args.mask is None else str(args.mask),
        "apix": apix, "box": box,
        "resolution_0143_A": result.resolution_A, "resolution_05_A": result.resolution_05_A,
        "randomise_from_shell": result.randomise_from_shell,
        "randomise_from_A": None if result.randomise_from_shell is None else box * apix / result.randomise_from_shell,
        "bfactor_A2": result.bfactor_A2, "sharpening": "reference profile" if ref_amp is not None else
        ("given B-factor" if args.bfactor is not None else "auto B-factor (Guinier fit)"),
        "local_resolution": locres_summary,
        "curves": fsc_table(result.curves, box, apix),
        "guinier": result.guinier,
    }
    write_json_atomic(args.out / "fsc.json", report)
    plot_fsc_curves(args.out / "fsc.png", result.curves, box, apix,
                    f"gold-standard FSC: {result.resolution_A:.2f} A at 0.143", result.resolution_A)
    _plot_guinier(args.out / "guinier.png", result.guinier, result.bfactor_A2)
    bf = "reference profile" if result.bfactor_A2 is None else f"B = {result.bfactor_A2:.0f} A^2"
    print(f"resolution {result.resolution_A:.2f} A (FSC 0.143), {result.resolution_05_A:.2f} A (FSC 0.5); "
          f"sharpened with {bf}; wrote {args.out}")
    return 0


def _plot_guinier(path: Path, guinier: dict, bfactor: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmmrefine.io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    ax.plot(guinier["k2_invA2"][1:], guinier["ln_amplitude"][1:], label="FSC-weighted map")
    ax.set_xlabel("squared spatial frequency (1/A^2)")
    ax.set_ylabel("ln(mean Fourier amplitude)")
    ax.set_title("Guinier plot" + ("" if bfactor is None else f", B = {bfactor:.0f} A^2"), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _plot_local_resolution(path: Path, lr: torch.Tensor, mask: torch.Tensor | None, apix: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gmmrefine.io.atomic import atomic_path

    box = lr.shape[0]
    c = box // 2
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    ext = [-c * apix, (box - c) * apix, -c * apix, (box - c) * apix]
    vals = lr[lr > 0]
    vmin, vmax = (float(vals.min()), float(vals.max())) if vals.numel() else (0.0, 1.0)
    for ax, img, (xl, yl), name in zip(axes, (lr[c], lr[:, c], lr[:, :, c]),
                                       (("x (A)", "y (A)"), ("x (A)", "z (A)"), ("y (A)", "z (A)")),
                                       ("z = 0", "y = 0", "x = 0")):
        im = ax.imshow(img.numpy(), origin="lower", extent=ext, vmin=vmin, vmax=vmax, cmap="viridis_r")
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.set_title(f"local resolution, {name}", fontsize=9)
    fig.colorbar(im, ax=axes, label="resolution (A)", shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)

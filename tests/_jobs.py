"""Outputs of a job's patch or body stage, compared between runs that must give the same bits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from gmmrefine.io.mrc import read_map


def patch_outputs(job: Path) -> dict[str, object]:
    """Every patch-stage output that is not a log or a timing: maps, GMMs, poses, STAR files."""
    out = {}
    for path in sorted([*(job / "patches").rglob("*"), *(job / "final").glob("composite_*")]):
        rel = str(path.relative_to(job))
        if path.suffix == ".mrc":
            out[rel] = read_map(path)[0]
        elif path.suffix in (".npz",):
            with np.load(path) as z:
                out.update({f"{rel}:{k}": np.asarray(z[k]) for k in z.files})
        elif path.suffix == ".npy":
            out[rel] = np.load(path)
        elif path.suffix == ".star":
            out[rel] = path.read_text()
    return out


def reset_to_before_patches(src: Path, dst: Path) -> None:
    """A copy of a finished job as it was when its global refinement had just finished."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "patches")
    for f in (dst / "final").glob("composite_*"):
        f.unlink()
    state = json.loads((dst / "state.json").read_text())
    state["done"] = {k: v for k, v in state["done"].items() if not k.startswith("patches") and k != "finished"}
    (dst / "state.json").write_text(json.dumps(state))


def differing(a: dict, b: dict) -> list[str]:
    """Names of the outputs that differ between two :func:`patch_outputs` (which must name the same)."""
    assert a.keys() == b.keys()
    return [k for k in a if not (np.array_equal(a[k], b[k]) if isinstance(a[k], np.ndarray) else a[k] == b[k])]

"""Small particle data sets for the io tests, written the way RELION writes them (with quirks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gmmrefine.io.mrc import write_stack

APIX = 2.0
BOX = 32


def make_images(n: int, box: int = BOX, seed: int = 0) -> np.ndarray:
    """``(n, box, box)`` float32: a Gaussian blob at a random place plus white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:box, :box] - box // 2
    centres = rng.uniform(-box / 6, box / 6, size=(n, 2))
    blobs = np.exp(-((xx[None] - centres[:, 0, None, None]) ** 2 + (yy[None] - centres[:, 1, None, None]) ** 2)
                   / (2 * (box / 10) ** 2))
    return (blobs + 0.3 * rng.standard_normal((n, box, box))).astype(np.float32)


def particle_values(n: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "rot": rng.uniform(-180, 180, n), "tilt": rng.uniform(0, 180, n), "psi": rng.uniform(-180, 180, n),
        "ox_A": rng.uniform(-4, 4, n), "oy_A": rng.uniform(-4, 4, n),
        "du": rng.uniform(10000, 25000, n), "dv": rng.uniform(10000, 25000, n), "dang": rng.uniform(0, 180, n),
        "subset": (np.arange(n) % 2 + 1),
    }


def write_dataset(root: Path, n: int = 60, box: int = BOX, apix: float = APIX, stacks: int = 2,
                  header_apix: float | None = None) -> list[str]:
    """Write ``stacks`` stacks under ``root/Particles`` holding ``n`` images in all; return the image names."""
    images = make_images(n, box)
    per = int(np.ceil(n / stacks))
    names = []
    for s in range(stacks):
        chunk = images[s * per:(s + 1) * per]
        rel = f"Particles/mic_{s:03d}_particles.mrcs"
        write_stack(root / rel, chunk, header_apix if header_apix is not None else apix)
        names += [f"{i + 1:06d}@{rel}" for i in range(len(chunk))]
    return names


def star30_text(names: list[str], values: dict, apix: float = APIX, drop: tuple[str, ...] = (),
                replace: dict | None = None) -> str:
    """A RELION 3.0 particle STAR: no optics table, origins in pixels, pixel size from detector/magnification."""
    columns = ["rlnImageName", "rlnMicrographName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
               "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnMagnification", "rlnDetectorPixelSize",
               "rlnCtfFigureOfMerit", "rlnGroupNumber", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
               "rlnOriginX", "rlnOriginY", "rlnClassNumber", "rlnRandomSubset", "rlnMyUnknownScore"]
    columns = [c for c in columns if c not in drop]
    lines = ["", "# RELION; version 3.0-beta-2", "# a comment line", "", "data_", "", "loop_ "]
    lines += [f"_{c} #{i + 1} " for i, c in enumerate(columns)]
    for i, name in enumerate(names):
        row = {
            "rlnImageName": name, "rlnMicrographName": f"MotionCorr/job002/mic_{i // 30:03d}.mrc",
            "rlnDefocusU": f"{values['du'][i]:.6f}", "rlnDefocusV": f"{values['dv'][i]:.6f}",
            "rlnDefocusAngle": f"{values['dang'][i]:.6f}", "rlnVoltage": "300.000000",
            "rlnSphericalAberration": "2.700000", "rlnAmplitudeContrast": "0.100000",
            "rlnMagnification": "25000.000000", "rlnDetectorPixelSize": f"{apix * 25000 / 1e4:.6f}",
            "rlnCtfFigureOfMerit": "0.131", "rlnGroupNumber": str(i // 30 + 1),
            "rlnAngleRot": f"{values['rot'][i]:.6f}", "rlnAngleTilt": f"{values['tilt'][i]:.6f}",
            "rlnAnglePsi": f"{values['psi'][i]:.6f}", "rlnOriginX": f"{values['ox_A'][i] / apix:.6f}",
            "rlnOriginY": f"{values['oy_A'][i] / apix:.6f}", "rlnClassNumber": "1",
            "rlnRandomSubset": str(values["subset"][i]), "rlnMyUnknownScore": f"{0.5 + i * 1e-3:.4e}",
        }
        row.update((replace or {}).get(i, {}))
        lines.append("  ".join(row[c] for c in columns) + " ")
    return "\n".join(lines) + "\n\n"


def star31_text(names: list[str], values: dict, apix: float = APIX, box: int = BOX, drop: tuple[str, ...] = (),
                replace: dict | None = None, optics_groups: int = 1, optics_apix: list[float] | None = None,
                optics_drop: tuple[str, ...] = ()) -> str:
    """A RELION 3.1 particle STAR: optics table, origins in angstrom, ``# version 30001`` headers."""
    optics_columns = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
                      "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                      "rlnImageDimensionality"]
    optics_columns = [c for c in optics_columns if c not in optics_drop]
    lines = ["", "# version 30001", "", "data_optics", "", "loop_ "]
    lines += [f"_{c} #{i + 1} " for i, c in enumerate(optics_columns)]
    for g in range(optics_groups):
        row = {"rlnOpticsGroupName": f"opticsGroup{g + 1}", "rlnOpticsGroup": str(g + 1),
               "rlnMicrographOriginalPixelSize": "1.000000", "rlnVoltage": f"{300 - 100 * g:.6f}",
               "rlnSphericalAberration": f"{2.7 - g * 0.7:.6f}", "rlnAmplitudeContrast": "0.100000",
               "rlnImagePixelSize": f"{(optics_apix or [apix] * optics_groups)[g]:.6f}", "rlnImageSize": str(box),
               "rlnImageDimensionality": "2"}
        lines.append("  ".join(row[c] for c in optics_columns) + " ")
    columns = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnDefocusU", "rlnDefocusV",
               "rlnDefocusAngle", "rlnCtfBfactor", "rlnCtfScalefactor", "rlnPhaseShift", "rlnOpticsGroup",
               "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
               "rlnRandomSubset", "rlnHelperNote", "rlnMyUnknownScore"]
    columns = [c for c in columns if c not in drop]
    lines += ["", "", "# version 30001", "", "data_particles", "", "loop_ "]
    lines += [f"_{c} #{i + 1} " for i, c in enumerate(columns)]
    for i, name in enumerate(names):
        row = {
            "rlnImageName": name, "rlnMicrographName": f"MotionCorr/job002/mic_{i // 30:03d}.mrc",
            "rlnCoordinateX": f"{1000 + 3 * i:.6f}", "rlnDefocusU": f"{values['du'][i]:.6f}",
            "rlnDefocusV": f"{values['dv'][i]:.6f}", "rlnDefocusAngle": f"{values['dang'][i]:.6f}",
            "rlnCtfBfactor": "0.000000", "rlnCtfScalefactor": "1.000000", "rlnPhaseShift": "0.000000",
            "rlnOpticsGroup": str(i % optics_groups + 1),
            "rlnAngleRot": f"{values['rot'][i]:.6f}", "rlnAngleTilt": f"{values['tilt'][i]:.6f}",
            "rlnAnglePsi": f"{values['psi'][i]:.6f}", "rlnOriginXAngst": f"{values['ox_A'][i]:.6f}",
            "rlnOriginYAngst": f"{values['oy_A'][i]:.6f}", "rlnRandomSubset": str(values["subset"][i]),
            "rlnHelperNote": "0007", "rlnMyUnknownScore": f"{0.5 + i * 1e-3:.4e}",
        }
        row.update((replace or {}).get(i, {}))
        lines.append("\t".join(row[c] for c in columns))
    return "\n".join(lines) + "\n\n# trailing comment\n"

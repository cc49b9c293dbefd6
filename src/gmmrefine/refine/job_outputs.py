"""Where a ``gmmrefine refine`` job keeps its particles and GMMs: what a heterogeneity run
(``gmmrefine hetero --job``) and an added patch (``gmmrefine refine --add-patch``) read from it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gmmrefine.errors import InputError


@dataclass
class HeteroInputs:
    """What a heterogeneity run starts from.

    Attributes:
        particles: STAR/.cs file with the consensus poses and the half split.
        gmms: ``{half: path}`` of each half's consensus GMM (``.npz``).
        resolution_A: the consensus resolution when known (a job's ``final/summary.json``), else None.
            Both halves made it: a default that feeds both halves' training would couple them.
        half_resolution_A: ``{half: A}`` each half's own resolution estimate (its quarter-map FSC in
            the job's last ``itNNN/fsc.json``), where the job recorded them, else None.
    """

    particles: Path
    gmms: dict[int, Path]
    resolution_A: float | None = None
    half_resolution_A: dict[int, float] | None = None


def _last_iteration_with(job: Path, names: tuple[str, ...]) -> Path | None:
    dirs = sorted((p for p in job.glob("it[0-9][0-9][0-9]") if all((p / n).is_file() for n in names)),
                  key=lambda p: int(p.name[2:]))
    return dirs[-1] if dirs else None


def _json_number(path: Path, key: str) -> float | None:
    try:
        return float(json.loads(path.read_text())[key])
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError):
        return None


def job_inputs(job: str | Path) -> HeteroInputs:
    """Particles and GMMs of a ``gmmrefine refine`` job folder.

    Particles: ``JOB/final/particles.star`` (else the last ``itNNN/particles.star``). GMMs: the
    ``gmm_half1.npz`` / ``gmm_half2.npz`` of the last iteration that has both (the references the
    final poses were refined against). Resolution: ``final/summary.json`` ``resolution_final_A`` (else
    the last ``itNNN/fsc.json`` ``resolution_A``); each half's own estimate from that ``fsc.json``.
    """
    job = Path(job)
    if not job.is_dir():
        raise InputError(f"{job}: --job must be a gmmrefine refine job folder; it does not exist.",
                         path=str(job), field="--job")
    particles = job / "final" / "particles.star"
    if not particles.is_file():
        it = _last_iteration_with(job, ("particles.star",))
        if it is None:
            raise InputError(f"{job}: no final/particles.star nor itNNN/particles.star; is it a finished "
                             "gmmrefine refine job?", path=str(job), field="--job")
        particles = it / "particles.star"
    it = _last_iteration_with(job, ("gmm_half1.npz", "gmm_half2.npz"))
    if it is None:
        raise InputError(f"{job}: no itNNN/gmm_half1.npz and gmm_half2.npz (the halves' GMMs); pass "
                         "--gmm1/--gmm2.", path=str(job), field="--job")
    resolution = _json_number(job / "final" / "summary.json", "resolution_final_A")
    last = _last_iteration_with(job, ("fsc.json",))
    if resolution is None:
        resolution = None if last is None else _json_number(last / "fsc.json", "resolution_A")
    return HeteroInputs(particles, {1: it / "gmm_half1.npz", 2: it / "gmm_half2.npz"}, resolution,
                        None if last is None else _half_resolutions(last / "fsc.json"))


def _half_resolutions(path: Path) -> dict[int, float] | None:
    """``{1: A, 2: A}`` from an ``fsc.json``'s ``half_resolution_A`` (each half's quarter-map estimate)."""
    try:
        found = json.loads(path.read_text())["half_resolution_A"]
        halves = {h: float(found[str(h)]) for h in (1, 2)}
    except (OSError, KeyError, ValueError, TypeError, json.JSONDecodeError):
        return None
    return halves if all(v > 0 for v in halves.values()) else None

"""Resumable steps of a job folder, and a stage of a job in its own sub-folder.

:class:`gmmrefine.pipeline.job.Job` builds on :class:`_Steps` and :func:`step_seed`; they are here, below
the pipeline, because the refinement runs stages of a job itself (:class:`SubJob`, one per patch).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from gmmrefine.io.atomic import write_json_atomic


class _Steps:
    """Completed steps of a job or stage, kept in its ``state.json`` (``path``, ``state`` and
    ``_state_path`` are set by the subclass)."""

    path: Path
    state: dict[str, Any]
    _state_path: Path

    def is_done(self, step: str) -> bool:
        """Whether ``step`` completed in this or an earlier (interrupted) run."""
        return step in self.state["done"]

    def summary(self, step: str) -> dict[str, Any]:
        """The summary recorded when ``step`` completed."""
        return self.state["done"][step]

    def mark_done(self, step: str, **summary: Any) -> None:
        """Record ``step`` as complete, after all its outputs have been written."""
        self.state["done"][step] = summary
        write_json_atomic(self._state_path, self.state)

    def dir(self, *parts: str) -> Path:
        """A sub-folder of the job (created on first use), e.g. ``job.dir('it001')``."""
        d = self.path.joinpath(*parts)
        d.mkdir(parents=True, exist_ok=True)
        return d


def step_seed(job_seed: int, step: str) -> int:
    """The seed of ``step`` in a job with seed ``job_seed`` (:meth:`gmmrefine.pipeline.job.Job.seed_for`)."""
    digest = hashlib.sha256(f"{job_seed}:{step}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class SubJob(_Steps):
    """A stage of a job in its own sub-folder with its own ``state.json`` (e.g. one patch's focused
    refinement), so that stages can run in parallel processes without sharing a state file.

    It offers what the refinement loop uses of a :class:`~gmmrefine.pipeline.job.Job` (``path``, ``dir``, ``is_done``,
    ``mark_done``, ``summary``, ``seed_for``, ``log``, ``params``); paths and steps are relative to
    the sub-folder. Opened again after an interruption it continues from its last completed step.

    Args:
        job_path: the job folder (its ``log.txt`` gets this stage's lines, prefixed by ``name``).
        name: the sub-folder, relative to the job folder (``patches/p03``).
        params: the job's parameters (``seed`` is used).
        seed_prefix: seeds are the job's seeds of ``{seed_prefix}/{step}``.
    """

    def __init__(self, job_path: str | os.PathLike, name: str, params: dict[str, Any], *, seed_prefix: str):
        self.job_path = Path(job_path)
        self.name = name
        self.params = dict(params)
        self.path = self.job_path / name
        self.path.mkdir(parents=True, exist_ok=True)
        self.seed_prefix = seed_prefix
        self._state_path = self.path / "state.json"
        self.state = json.loads(self._state_path.read_text()) if self._state_path.is_file() else {"done": {}}

    def log(self, message: str, *, echo: bool = True) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {self.name}: {message}"
        with open(self.job_path / "log.txt", "a") as fh:
            fh.write(line + "\n")
        if echo:
            print(f"{self.name}: {message}", flush=True)

    def seed_for(self, step: str) -> int:
        return step_seed(self.params.get("seed", 0), f"{self.seed_prefix}/{step}")

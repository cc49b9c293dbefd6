"""A job folder, RELION style: parameters, a log, per-step outputs and resumable progress.

A job is a directory holding ``job.json`` (every parameter, versions, the command line), ``log.txt``
and ``state.json`` (the steps completed so far, each with a small summary). Every output is written
atomically, and a step is recorded as done only after all its outputs are in place, so a run killed at
any moment (SIGKILL included) can be resumed with ``--continue`` from the last completed step.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from gmmrefine.errors import InputError
from gmmrefine.io.atomic import write_json_atomic


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import gmmrefine

    return {"gmmrefine": gmmrefine.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


class Job:
    """A job directory.

    Args:
        path: the job folder (``--out``).
        params: every parameter of the run (JSON-serialisable); on ``--continue`` they must equal
            the saved ones, except the keys in ``resume_may_change``.
        resume: True for ``--continue``.
        command_line: recorded in ``job.json``; defaults to ``sys.argv``.
    """

    def __init__(self, path: str | os.PathLike, params: dict[str, Any], *, resume: bool = False,
                 command_line: list[str] | None = None, resume_may_change: tuple[str, ...] = ("device",)):
        self.path = Path(path)
        self.params = dict(params)
        self._state_path = self.path / "state.json"
        job_json = self.path / "job.json"
        if resume:
            if not job_json.is_file():
                raise InputError(f"{self.path}: --continue needs an existing job folder with job.json; "
                                 "none was found", path=str(self.path), field="--continue")
            saved = json.loads(job_json.read_text())["params"]
            changed = sorted(k for k in set(saved) | set(self.params)
                             if k not in resume_may_change and saved.get(k) != self.params.get(k))
            if changed:
                raise InputError(f"{job_json}: --continue must use the parameters of the original run; "
                                 f"these differ: {', '.join(changed)}", path=str(job_json), field=changed[0])
            self.state = json.loads(self._state_path.read_text()) if self._state_path.is_file() else {"done": {}}
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise InputError(f"{self.path}: the job folder already exists; use --continue to resume it "
                                 "or choose another --out", path=str(self.path), field="--out")
            self.path.mkdir(parents=True, exist_ok=True)
            write_json_atomic(job_json, {
                "params": self.params,
                "command_line": shlex.join(command_line if command_line is not None else sys.argv),
                "versions": _versions(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            })
            self.state = {"done": {}}
            write_json_atomic(self._state_path, self.state)
        self.log(("continuing" if resume else "starting") + f" job {self.path}")

    def log(self, message: str, *, echo: bool = True) -> None:
        """Append a timestamped line to ``log.txt`` (and print it)."""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        with open(self.path / "log.txt", "a") as fh:
            fh.write(line + "\n")
        if echo:
            print(message, flush=True)

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

    def seed_for(self, step: str) -> int:
        """A seed for ``step`` derived from the job seed, so a resumed step draws the same numbers."""
        digest = hashlib.sha256(f"{self.params.get('seed', 0)}:{step}".encode()).digest()
        return int.from_bytes(digest[:4], "little")

"""A job folder, RELION style: parameters, a log, per-step outputs and resumable progress.

A job is a directory holding ``job.json`` (every parameter, versions, the command line), ``log.txt``
and ``state.json`` (the steps completed so far, each with a small summary). Every output is written
atomically, and a step is recorded as done only after all its outputs are in place, so a run killed at
any moment (SIGKILL included) can be resumed with ``--continue`` from the last completed step.
"""

from __future__ import annotations

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
from gmmrefine.refine.stage import _Steps, step_seed


def _versions() -> dict[str, str]:
    import numpy
    import torch

    import gmmrefine

    return {"gmmrefine": gmmrefine.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


class Job(_Steps):
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
            # A run killed while writing leaves its temporary file (never the output): remove them.
            for stale in self.path.rglob(".*.tmp*"):
                if stale.is_file():
                    stale.unlink(missing_ok=True)
        else:
            if self.path.exists() and any(self.path.iterdir()) and not _nothing_computed(self.path):
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
        restarted = not resume and (self.path / "log.txt").is_file()
        self.log(("continuing" if resume else "starting again (nothing was computed before)" if restarted else
                  "starting") + f" job {self.path}")

    def log(self, message: str, *, echo: bool = True) -> None:
        """Append a timestamped line to ``log.txt`` (and print it)."""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        with open(self.path / "log.txt", "a") as fh:
            fh.write(line + "\n")
        if echo:
            print(message, flush=True)

    def seed_for(self, step: str) -> int:
        """A seed for ``step`` derived from the job seed, so a resumed step draws the same numbers."""
        return step_seed(self.params.get("seed", 0), step)


def _nothing_computed(path: Path) -> bool:
    """Whether a job folder holds a job that stopped (an error, a kill) before completing any step: the
    same command may then start it again from scratch."""
    try:
        return not json.loads((path / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def finished(path: str | os.PathLike) -> dict | None:
    """The ``finished`` summary of a completed job folder, or None (not a job, or not completed)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())["done"].get("finished")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_output_folder(out: str | os.PathLike, need_bytes: int = 0, *, option: str = "--out") -> None:
    """Fail before any work when the outputs cannot be written: ``out`` (or the nearest folder above it that
    exists) must be a writable folder on a file system with ``need_bytes`` free.

    Raises:
        InputError: naming the folder and what is wrong.
    """
    import shutil

    out = Path(out)
    existing = out.resolve()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{out}: {option} must be a folder; {existing} is a file.", path=str(out), field=option)
    writable = os.access(existing, os.W_OK | os.X_OK)
    if writable:
        import tempfile

        try:  # what the file system says, not only the permission bits (a read-only mount, a full quota)
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError:
            writable = False
    if not writable:
        raise InputError(f"{out}: cannot write there ({existing} is read-only or not writable by this user); "
                         f"choose another {option}.", path=str(out), field=option)
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise InputError(f"{out}: its file system has {free / 1e9:.1f} GB free and the outputs need about "
                         f"{need_bytes / 1e9:.1f} GB; free some space or choose another {option}.",
                         path=str(out), field=option)

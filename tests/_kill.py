"""Kill a job mid-run: start a ``gmmrefine`` command and SIGKILL it once a step is marked done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_step(cmd: list[str], state: Path, step: str, *, env: dict | None = None, timeout_s: float = 240) -> None:
    """Run ``cmd`` and SIGKILL it as soon as ``state`` (a ``state.json``) lists ``step`` as done.

    Fails (AssertionError) if the command ends first, so a test never compares two straight runs.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None:
            if state.is_file() and step in json.loads(state.read_text() or "{}").get("done", {}):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()

"""The torch device a command runs on: ``--device auto`` (the default of every command) is CUDA when
present, else the CPU; any other name is checked by allocating on it, so a typo or a missing GPU is
one clear sentence before any work starts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gmmrefine.errors import InputError

if TYPE_CHECKING:  # torch is imported when a device is resolved, so that `--help` stays fast
    import torch

DEVICE_HELP = "torch device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, mps"


def device_name(name: str | None) -> str:
    """``--device`` with ``auto`` (or None) replaced by ``cuda`` or ``cpu``; other names unchanged."""
    import torch

    if name is None or str(name).strip().lower() in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(name)


def resolve_device(name: str | None) -> torch.device:
    """The usable torch device that ``--device name`` asks for.

    Raises:
        InputError: the name is not a torch device, or nothing can be allocated on it here.
    """
    import torch

    chosen = device_name(name)
    try:
        device = torch.device(chosen)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"--device {chosen}: not usable here ({reason}); expected auto, cpu or an available GPU "
                         "such as cuda or cuda:0.", field="--device") from None
    return device


def available_devices() -> list[str]:
    """Every device this machine can run on: ``cpu``, then each CUDA GPU, then ``mps`` on a Mac."""
    import torch

    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def upload(array, device: torch.device) -> torch.Tensor:
    """A host array (e.g. a block of images read from disk) as a tensor on ``device``.

    On CUDA the copy goes through pinned memory and does not block the host, so that reading the next
    block overlaps the transfer; on the CPU the array's memory is shared, not copied.
    """
    import numpy as np
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)

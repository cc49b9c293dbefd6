"""``gmmrefine info``: what this installation runs with, the first thing to paste into a bug report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any

COMMAND = "info"
HELP = "versions, compiled kernels in use (and why), threads and devices with free memory"
DESCRIPTION = ("Print the versions of gmmrefine and its libraries, which CPU kernels run (compiled or torch, "
               "and why; GMMREFINE_KERNELS=torch|native|auto chooses), the thread count, and every device "
               "with its free memory. Paste it into a bug report.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def collect() -> dict[str, Any]:
    """Everything ``gmmrefine info`` prints, as a dict."""
    import importlib.metadata as md

    import torch

    import gmmrefine
    from gmmrefine import native
    from gmmrefine.devices import available_devices

    versions = {"gmmrefine": gmmrefine.__version__, "python": platform.python_version(), "torch": torch.__version__}
    for dist in ("numpy", "scipy", "mrcfile", "gemmi", "pandas", "scikit-learn", "matplotlib"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    devices = []
    for name in available_devices():
        entry: dict[str, Any] = {"device": name}
        if name.startswith("cuda"):
            free, total = torch.cuda.mem_get_info(torch.device(name))
            entry |= {"name": torch.cuda.get_device_name(torch.device(name)), "free_GB": round(free / 1e9, 2),
                      "total_GB": round(total / 1e9, 2)}
        elif name == "cpu":
            entry |= {"name": platform.processor() or platform.machine(), **_host_memory()}
        devices.append(entry)
    return {
        "versions": versions,
        "platform": platform.platform(),
        "kernels": native.kernels_info(),
        "threads": {"torch": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                    "cpu_count": os.cpu_count()},
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda},
        "devices": devices,
        "default_device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def _host_memory() -> dict[str, float]:
    """Free and total host memory (GB) from /proc/meminfo where there is one (Linux)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: float(line.split()[1]) for line in f if ":" in line}
        return {"free_GB": round(info["MemAvailable"] * 1024 / 1e9, 2), "total_GB": round(info["MemTotal"] * 1024 / 1e9, 2)}
    except (OSError, KeyError, ValueError, IndexError):
        return {}


def main(args) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    out = sys.stdout
    out.write("gmmrefine " + str(info["versions"]["gmmrefine"]) + "\n")
    out.write("versions   " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + "\n")
    out.write(f"platform   {info['platform']}\n")
    k = info["kernels"]
    out.write(f"kernels    {k['why']} (GMMREFINE_KERNELS={k['mode']}; library {k['library'] or 'not built'}; "
              f"OpenMP threads {k['openmp_threads']})\n")
    t = info["threads"]
    out.write(f"threads    torch {t['torch']}, OMP_NUM_THREADS={t['OMP_NUM_THREADS']}, {t['cpu_count']} CPUs\n")
    for d in info["devices"]:
        memory = f", {d['free_GB']} of {d['total_GB']} GB free" if "free_GB" in d else ""
        out.write(f"device     {d['device']}: {d.get('name', '')}{memory}\n")
    out.write(f"--device auto runs on {info['default_device']}\n")
    return 0

"""Shared fixtures.

Tests marked ``relion`` compare against RELION 3.1 binaries. They skip on a machine without RELION
unless ``GMMREFINE_REQUIRE_RELION`` is set (CI sets it), where a missing binary is a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
PACKAGE_DATA = Path(__file__).parents[1] / "src" / "gmmrefine" / "data"

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


def relion_available() -> bool:
    return shutil.which("relion_project") is not None and shutil.which("relion_reconstruct") is not None


def pytest_collection_modifyitems(config, items):
    if relion_available():
        return
    if os.environ.get("GMMREFINE_REQUIRE_RELION"):
        pytest.exit("RELION binaries are missing but GMMREFINE_REQUIRE_RELION is set: install relion",
                    returncode=1)
    skip = pytest.mark.skip(reason="RELION 3.1 binaries not on PATH")
    for item in items:
        if "relion" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def adk_open_pdb() -> Path:
    return PACKAGE_DATA / "adk_open.pdb"


@pytest.fixture(scope="session")
def adk_closed_pdb() -> Path:
    return PACKAGE_DATA / "adk_closed.pdb"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of many small runs, restored afterwards: on the shared 2-core
    machine two OpenMP threads spin at every barrier when the other core is busy (measured: a test
    file's CPU time grew ~20x with 2 threads under load, results identical). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------
# Kernels and devices: the same tests on every CPU path and every device this machine has
# ------------------------------------------------------------------------------------------------

def kernel_modes() -> list[str]:
    """``GMMREFINE_KERNELS`` values to test: the compiled kernels (when built) and the torch code."""
    from gmmrefine import native

    return ["native", "torch"] if native._load()[0] is not None else ["torch"]


def pytest_generate_tests(metafunc):
    """Tests that take ``device`` run on each device; tests that use the ``kernels`` fixture (modules opt in with ``pytestmark =
    pytest.mark.usefixtures("kernels")``) run once per kernel mode; those marked ``compares_kernels``
    compare the two paths themselves and run once."""
    if "kernels" in metafunc.fixturenames:
        single = metafunc.definition.get_closest_marker("compares_kernels") is not None
        metafunc.parametrize("kernels", ["auto"] if single else kernel_modes(), indirect=True)
    if "device" in metafunc.fixturenames:
        from gmmrefine.devices import available_devices

        metafunc.parametrize("device", available_devices(), indirect=True)


@pytest.fixture
def kernels(request, monkeypatch) -> str:
    """The CPU kernels a test runs with (``GMMREFINE_KERNELS``), set for the test and restored."""
    mode = getattr(request, "param", "auto")
    monkeypatch.setenv("GMMREFINE_KERNELS", mode)
    return mode


@pytest.fixture
def device(request) -> torch.device:
    """Each device this machine has (CPU, every CUDA GPU, MPS): the same test runs on all."""
    return torch.device(getattr(request, "param", "cpu"))

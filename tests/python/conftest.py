"""Shared fixtures for the engine specification tests.

Every engine test runs on each device in ``devices`` and, where it makes
sense, on float64 (tight tolerance) and float32 (cosine tolerance). CUDA
parameters are always generated so that a machine without a GPU reports them
as skipped, with the reason, instead of silently dropping them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

# The tests import the shared model zoo as ``zoo``, whatever pytest's import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

CUDA_AVAILABLE = torch.cuda.is_available()

# The devices this machine can run the engine on.
devices: list[str] = ["cpu"] + (["cuda"] if CUDA_AVAILABLE else [])

NO_CUDA_REASON = (
    "CUDA is not available on this machine (torch.cuda.is_available() is False)"
)

DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not CUDA_AVAILABLE, reason=NO_CUDA_REASON),
    ),
]

DTYPE_PARAMS = [
    pytest.param(torch.float64, id="float64"),
    pytest.param(torch.float32, id="float32"),
]


@pytest.fixture(params=DEVICE_PARAMS)
def device(request: pytest.FixtureRequest) -> str:
    """Each device the engine supports; CUDA is skipped with a reason when absent."""
    return request.param


@pytest.fixture(params=DTYPE_PARAMS)
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    """float64 (checked to 1e-10 relative error) and float32 (checked by cosine)."""
    return request.param


@pytest.fixture
def torch_ar():
    """The package under test; a failed import fails the test with the reason."""
    from zoo import load_torch_ar

    return load_torch_ar()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA device (benchmarks/gpu_check.sh runs `-m cuda`)"
    )


def _needs_cuda(item: pytest.Item) -> bool:
    if "cuda" in item.nodeid.lower():
        return True
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", "")).lower()
        if ("cuda" in reason or "gpu" in reason) and "without" not in reason:
            return True
    return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks every test that needs CUDA (by its id or its skip reason) `cuda`,
    so that a GPU host can run exactly those with `-m cuda`."""
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.cuda)


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch_ar engine tests on devices: {', '.join(devices)}"

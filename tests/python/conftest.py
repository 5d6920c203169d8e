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

NO_CUDA_REASON = "CUDA is not available on this machine (torch.cuda.is_available() is False)"
CUDA_DEVICE_COUNT = torch.cuda.device_count() if CUDA_AVAILABLE else 0


def cuda_marks(devices: int = 1) -> list[pytest.MarkDecorator]:
    """The marks of a test that needs `devices` CUDA devices: `cuda` (what
    benchmarks/gpu_check.sh selects) and a skip, with the reason, below that."""
    if CUDA_DEVICE_COUNT == 0:
        reason = NO_CUDA_REASON
    else:
        reason = f"needs {devices} CUDA devices; this machine has {CUDA_DEVICE_COUNT}"
    return [pytest.mark.cuda, pytest.mark.skipif(devices > CUDA_DEVICE_COUNT, reason=reason)]


def needs_cuda(test=None, *, devices: int = 1):
    """Decorator: ``@needs_cuda`` or ``@needs_cuda(devices=2)``."""

    def mark(fn):
        for m in cuda_marks(devices):
            fn = m(fn)
        return fn

    return mark(test) if test is not None else mark


DEVICE_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=cuda_marks()),
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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that skips without CUDA must say it needs CUDA with the `cuda`
    marker (conftest.needs_cuda / cuda_marks), or the GPU check would miss it."""
    unmarked = []
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            continue
        for mark in item.iter_markers("skipif"):
            reason = str(mark.kwargs.get("reason", ""))
            if reason == NO_CUDA_REASON or "CUDA devices" in reason:
                unmarked.append(item.nodeid)
                break
    if unmarked:
        raise pytest.UsageError(
            "tests skipped without CUDA but not marked `cuda` (use conftest.needs_cuda): "
            + ", ".join(unmarked[:10])
        )


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch_ar engine tests on devices: {', '.join(devices)}"

"""torch_ar.selftest: the first thing to run on a new machine or GPU.

On the CPU it runs here in full; on a GPU benchmarks/gpu_check.sh runs it
with --device cuda. Its checks must be able to fail: a kernel whose result is
wrong shows up in the table.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import needs_cuda


def test_selftest_on_cpu_passes_every_check(torch_ar) -> None:
    report = torch_ar.selftest("cpu")
    assert report.ok, report.table()
    names = [c.name for c in report.checks]
    # Every kernel, every evaluation on every graph, every variant.
    assert any(n.startswith("kernel relax_update_activation_") for n in names)
    assert any(n.startswith("kernel horner_update_") for n in names)
    for graph in ("mlp", "cnn+bn", "residual", "cnn+bn channels_last"):
        for what in (
            "exact sweep = autograd",
            "literal steps eta 1 = autograd",
            "closed form = literal steps (fused)",
            "closed form = literal steps (unfused)",
        ):
            assert f"engine {graph}: {what}" in names
    # float16 states whose sums pass 65504 (they raised RelaxationDivergedError).
    assert "engine float16, sums past 65504: exact sweep = autograd" in names
    assert "engine float16, sums past 65504: closed form = literal steps" in names
    for variant in (
        "learned_backward_weights",
        "feedback_alignment",
        "no_nonlinear_derivative",
        "combined",
    ):
        for evaluation in ("exact sweep", "closed form", "literal"):
            assert f"variant {variant}: {evaluation} = oracle" in names
    assert all(c.error is not None and c.error <= c.limit for c in report.checks)
    assert report.seconds < 60
    for key in ("torch", "torch CUDA", "torch_ar build arch list", "torch_ar CUDA kernels"):
        assert key in report.versions


def test_selftest_reports_a_wrong_kernel(torch_ar, monkeypatch) -> None:
    """A kernel that computes the wrong step fails its check (and only the
    kernel checks that use it)."""
    from torch_ar import diagnostics as st

    real = torch.ops.torch_ar

    class WrongOps:
        def __getattr__(self, name):
            if name == "relax_update_":
                return lambda xs, ts, eta, flush: real.relax_update_(xs, ts, eta * 1.01, flush)
            return getattr(real, name)

    monkeypatch.setattr(st.torch.ops, "torch_ar", WrongOps(), raising=False)
    runner = st._Runner(torch.device("cpu"))
    st._kernel_checks(runner)
    failed = {c.name for c in runner.checks if not c.ok}
    assert "kernel relax_update_ float64" in failed
    assert not any("horner" in n for n in failed)


def test_selftest_command_writes_its_report(tmp_path) -> None:
    out = tmp_path / "selftest.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch_ar", "selftest", "--device", "cpu", "--json", str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| check | result | error | limit |" in result.stdout
    assert "passed, 0 failed" in result.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["device"] == "cpu"


def test_selftest_refuses_cuda_without_a_gpu(torch_ar) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_selftest_on_cuda runs instead")
    with pytest.raises(RuntimeError, match="cuda"):
        torch_ar.selftest("cuda")


@needs_cuda
def test_selftest_on_cuda(torch_ar) -> None:
    report = torch_ar.selftest("cuda")
    assert report.ok, report.table()
    assert any("CUDA graph replay" in c.name for c in report.checks)
    assert any("CUDA RNG" in c.name for c in report.checks)
    assert "GPU" in report.versions and "compute capability" in report.versions

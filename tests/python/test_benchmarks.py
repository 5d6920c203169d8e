"""The benchmark baseline and entry points.

``benchmarks/plain_ar.py`` is the plain-PyTorch AR that bench_paper.py times
torch_ar against; it must compute the same thing: exactly autograd's
gradients at eta 1 after D steps, autograd's gradients to a cosine of 0.9999
at the paper's eta 0.1 with enough steps, and torch_ar's own literal steps
where both relax the same states (the MLP). bench_paper.py and
gpu_check.sh get a smoke run on CPU.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


plain_ar = _load("plain_ar")


def mlp(activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[activation]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(20, 16),
        act(),
        nn.Linear(16, 12),
        act(),
        nn.Linear(12, 8),
        act(),
        nn.Linear(8, 5),
    )


def cnn(activation: str) -> nn.Sequential:
    act = {"relu": nn.ReLU, "tanh": nn.Tanh}[activation]
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    )


def problem(kind: str, activation: str, device: str, dtype: torch.dtype = torch.float64):
    model = (mlp if kind == "mlp" else cnn)(activation).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    shape = (6, 20) if kind == "mlp" else (3, 3, 8, 8)
    x = torch.randn(*shape, generator=g, dtype=dtype).to(device)
    target = torch.randn(shape[0], 5, generator=g, dtype=dtype).to(device)
    return model, x, target


def rel_errs(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    return [float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(grads, ref)]


def cosine(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    a = torch.cat([g.flatten() for g in grads]).double()
    b = torch.cat([g.flatten() for g in ref]).double()
    return float(a @ b / (a.norm() * b.norm()))


# (implementation, model kind, activation)
CASES = [
    ("explicit", "mlp", "relu"),
    ("explicit", "mlp", "tanh"),
    ("explicit", "mlp", "sigmoid"),
    ("autograd", "mlp", "relu"),
    ("autograd", "cnn", "relu"),
    ("autograd", "cnn", "tanh"),
]


def ar_grads(impl: str, model, x, target, eta: float, steps: int, schedule: str = "jacobi"):
    fn = plain_ar.ar_gradients_mlp if impl == "explicit" else plain_ar.ar_gradients_blocks
    return fn(model, x, target, F.mse_loss, eta=eta, steps=steps, schedule=schedule)


def depth(impl: str, model) -> int:
    """D: relaxing states between the input and the clamped output."""
    n = len(plain_ar.mlp_layers(model)) if impl == "explicit" else len(plain_ar.split_blocks(model))
    return n - 1


@pytest.mark.parametrize(("impl", "kind", "activation"), CASES)
def test_plain_ar_exact_at_eta_one(device: str, impl: str, kind: str, activation: str) -> None:
    model, x, target = problem(kind, activation, device)
    ref = plain_ar.autograd_gradients(model, x, target, F.mse_loss)
    d = depth(impl, model)
    for steps in (d, d + 2):
        errs = rel_errs(ar_grads(impl, model, x, target, 1.0, steps), ref)
        assert max(errs) <= 1e-10, (steps, errs)
    # The Gauss-Seidel sweep from the output down is exact after one step.
    errs = rel_errs(ar_grads(impl, model, x, target, 1.0, 1, "sweep"), ref)
    assert max(errs) <= 1e-10, errs
    # Fewer Jacobi steps than D are not: the check above means something.
    errs = rel_errs(ar_grads(impl, model, x, target, 1.0, d - 1), ref)
    assert max(errs) > 1e-3, errs


@pytest.mark.parametrize(("impl", "kind", "activation"), CASES)
@pytest.mark.parametrize("schedule", ["jacobi", "sweep"])
def test_plain_ar_converges_at_paper_eta(
    device: str, impl: str, kind: str, activation: str, schedule: str
) -> None:
    model, x, target = problem(kind, activation, device)
    ref = plain_ar.autograd_gradients(model, x, target, F.mse_loss)
    grads = ar_grads(impl, model, x, target, 0.1, 200, schedule)
    assert cosine(grads, ref) >= 0.9999


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_plain_ar_matches_torch_ar_literal_steps(device: str, activation: str, torch_ar) -> None:
    """On the MLP both relax the same states from the same forward values:
    the same numbers step by step, so the benchmark compares equal work."""
    model, x, target = problem("mlp", activation, device)
    for (eta, steps), evaluation in itertools.product(
        ((0.1, 30), (0.5, 7)), ("literal", "closed_form")
    ):
        ar = torch_ar.ARBackward(model, eta=eta, steps=steps, evaluation=evaluation)
        model.zero_grad(set_to_none=True)
        F.mse_loss(ar(x), target).backward()
        assert ar.last_stats.evaluation == evaluation
        engine = [p.grad.clone() for p in model.parameters()]
        assert ar.last_stats.depth == depth("explicit", model)
        for impl in ("explicit", "autograd"):
            errs = rel_errs(ar_grads(impl, model, x, target, eta, steps), engine)
            assert max(errs) <= 1e-10, (impl, eta, steps, errs)


def test_bench_paper_smoke_cpu(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_paper.py"),
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--steps",
            "3",
            "--lo-steps",
            "1",
            "--mlp-batch",
            "4",
            "--cnn-batch",
            "2",
            "--sweep-calls",
            "1",
            "--out",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "paper_cpu.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["machine"]
    rows = {r["model"].split()[0]: r for r in data["rows"]}
    assert set(rows) == {"paper", "CIFAR"}
    for r in rows.values():
        for key in (
            "ar_paper_backward_ms",
            "plain_paper_backward_ms",
            "vjp_sweep_ms",
            "ar_step_ms",
            "plain_step_ms",
            "ar_step_over_vjp_sweep",
            "ar_closed_backward_ms",
            "plain_over_closed_backward",
            "ar_closed_over_autograd_total",
        ):
            assert isinstance(r[key], float), key
        # On CPU through the profiler; no CUDA graph there.
        assert set(r["memory_mib"]) == {
            "autograd",
            "ar_exact",
            "ar_closed",
            "ar_paper",
            "plain_paper",
        }
        assert all(v > 0 for v in r["memory_mib"].values())
        assert set(r["features"]) == {"unfused"}
        assert r["correctness"]["cos_ar_exact"] > 0.9999
        # The closed form is the literal steps' outcome (float32 rounding apart).
        assert r["correctness"]["closed_vs_literal_rel_err"] < 1e-4
    # Same states, same updates: torch_ar and the explicit plain AR agree (float32).
    assert rows["paper"]["correctness"]["ar_paper_vs_plain_paper_rel_err"] < 1e-4
    text = (tmp_path / "paper_cpu.md").read_text()
    assert "torch_ar step / sweep" in text and "cpu" in text
    assert "closed form" in text
    assert "Peak memory" in text and "Not measured" not in text


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_script_syntax(tmp_path: Path) -> None:
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    # Without OUT it refuses to start, naming the variable.
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "OUT" in result.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not found")
def test_gpu_check_dry_run_on_cpu(tmp_path: Path) -> None:
    """The whole driver on the CPU (FORCE_CPU_CHECK=1): selftest, one CUDA test
    file (its CUDA tests skip here), the targets and the CIFAR-10 job, each
    through its own step, with the report written as it goes. The benchmarks'
    CPU runs are tested above; the build is the suite's own."""
    out = tmp_path / "out"
    found = [
        d
        for d in (ROOT / "benchmarks" / ".data", ROOT.parent / "shared" / "data")
        if (d / "cifar10-jpeg.tar.gz").is_file()
    ]
    env = dict(
        os.environ,
        OUT=str(out),
        FORCE_CPU_CHECK="1",
        GPU_CHECK_SKIP_BUILD="1",
        GPU_CHECK_KEEP_LOGS="1",
        GPU_CHECK_SKIP="bench_paper bench_exact",
        GPU_CHECK_TEST_FILES="tests/python/test_cuda_review.py",
        TORCH_AR_CACHE=str(tmp_path / "cache"),
        OMP_NUM_THREADS="1",
        # Per-step limits 10x the GPU's: a loaded 2-core machine must not
        # turn a slow step into a failure (the subprocess timeout still holds).
        GPU_CHECK_SCALE="10",
        GPU_CHECK_BUDGET_S="1150",
    )
    has_data = bool(found)
    env.pop("GPU_CHECK_DATA", None)
    result = subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=1200,
    )
    report = (out / "gpu_report.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in report.splitlines()
        if line.startswith("| ") and line.count("|") == 4
    }
    assert rows["env"] == "ok" and rows["build"] == "ok", report
    assert rows["selftest"] == "ok", report
    assert rows["tests_test_cuda_review"] == "ok", report
    assert rows["bench_paper"].startswith("skipped"), report
    assert rows["chunk_size"] == "ok", report
    chunks = json.loads((out / "chunk_size_cpu.json").read_text())
    assert chunks["sizes"] == [4096, 16384] and all(
        r["relax_ms"] > 0 for rows_ in chunks["rows"].values() for r in rows_
    )
    assert (out / "tests" / "test_cuda_review.xml").is_file()
    selftest = json.loads((out / "selftest.json").read_text())
    assert selftest["ok"] and len(selftest["checks"]) > 40
    if has_data:
        assert rows["job"] == "ok", report
        job = json.loads((out / "gpu_job.json").read_text())
        assert {(r["model"], r["method"].split(" /")[0]) for r in job["rows"]} == {
            (m, k) for m in ("cnn", "resnet20") for k in ("backprop", "AR eta 1", "AR eta 0.1")
        }
        assert all(r["images_per_s"] > 0 for r in job["rows"])
        # targets are reported, not judged, on the CPU: nothing failed.
        assert result.returncode == 0, report
    else:
        assert rows["job"].startswith("FAILED (missing"), report
        assert result.returncode != 0

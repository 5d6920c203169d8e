"""torch_ar installs like any PyTorch extension: the wheel built from this
checkout installs into a fresh virtual environment (with the system's torch
through system site packages), imports from outside the checkout, computes
exact gradients, and provides the ``torch-ar`` command. Also: ``import
torch_ar`` stays free of the harness's dependencies.

The wheel is built in the tree (``pip wheel --no-build-isolation``), where
setuptools reuses the objects the in-place build compiled: only packaging runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900):
    result = subprocess.run(
        cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
        f"{result.stderr[-3000:]}"
    )
    return result


def build_env() -> dict[str, str]:
    """Build the wheel as the in-place library was built, so that nothing is
    recompiled: CPU-only when the loaded extension has no CUDA kernels."""
    import torch_ar  # noqa: F401  (registers the operators)

    env = dict(os.environ)
    has_cuda_kernels = torch._C._dispatch_has_kernel_for_dispatch_key(
        "torch_ar::relax_update_", "CUDA"
    )
    if not has_cuda_kernels:
        env["TORCH_AR_CPU_ONLY"] = "1"
    return env


EXACT_CHECK = """
import pathlib, sys, torch
import torch_ar
assert not pathlib.Path(torch_ar.__file__).is_relative_to(pathlib.Path(sys.argv[1])), torch_ar.__file__
assert hasattr(torch.ops.torch_ar, "relax_update_"), "torch.ops.torch_ar is empty"
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
x = torch.randn(4, 5, dtype=torch.double)
ref = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
ar = torch_ar.ARBackward(net)
got = torch.autograd.grad(ar(x).square().sum(), list(net.parameters()))
err = max(((g - r).norm() / r.norm()).item() for g, r in zip(got, ref))
assert err < 1e-12, err
print("exact gradient from", torch_ar.__file__, "relative error", err)
"""


def test_wheel_installs_and_runs_in_a_fresh_environment(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-w",
            str(dist),
            str(ROOT),
        ],
        cwd=ROOT,
        env=build_env(),
    )
    wheels = list(dist.glob("torch_ar-*.whl"))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry_points = whl.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert any(n.startswith("torch_ar/_C.") and n.endswith(".so") for n in names), names
    assert "torch_ar/experiments/cli.py" in names
    major, minor = torch.__version__.split(".")[:2]
    assert f"Requires-Dist: torch~={major}.{minor}.0" in metadata, metadata
    assert "Requires-Dist: numpy" in metadata
    assert "Provides-Extra: experiments" in metadata
    assert "torch-ar = torch_ar.experiments.cli:main" in entry_points

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # No index: torch and numpy come from the system site packages.
    run([str(python), "-m", "pip", "install", "--no-index", str(wheels[0])], cwd=tmp_path)

    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = run([str(python), "-c", EXACT_CHECK, str(ROOT)], cwd=tmp_path, env=clean)
    assert str(env_dir) in out.stdout, out.stdout
    help_text = run([str(env_dir / "bin" / "torch-ar"), "--help"], cwd=tmp_path, env=clean)
    assert "usage: torch-ar" in help_text.stdout
    assert "train" in help_text.stdout and "compare" in help_text.stdout


def test_import_torch_ar_does_not_load_the_harness() -> None:
    # torch itself imports tqdm (through torch.hub): only what torch_ar adds counts.
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import torch_ar\n"
        "added = set(sys.modules) - before\n"
        "assert 'torch_ar._C' in added or 'torch_ar' in added, sorted(added)\n"
        "heavy = sorted(m for m in added if m.split('.')[0] in"
        " ('matplotlib', 'tqdm', 'torchvision') or m.startswith('torch_ar.experiments'))\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"import torch_ar loaded {result.stdout.strip()}\n{result.stderr}"
    )


def test_module_entry_point_still_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "torch_ar", "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m torch_ar" in result.stdout

"""The tree is held to one format: ruff (lint and format, pyproject.toml's
[tool.ruff]) for Python and Markdown code blocks, clang-format (.clang-format)
for csrc/, kernels/ and tests/cpp/. Each test names the files that are off and
the command that fixes them. The tools are pinned in requirements.txt, which
scripts/setup.sh installs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPP_SUFFIXES = (".h", ".cpp", ".cu", ".cuh")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install -r requirements.txt")
    return path


def tracked(*patterns: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", *patterns],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:  # not a git checkout (an unpacked sdist): walk the folders
        return sorted(
            str(p.relative_to(ROOT))
            for folder in ("csrc", "kernels", "tests/cpp")
            for p in (ROOT / folder).rglob("*")
            if p.suffix in CPP_SUFFIXES
        )
    return [f for f in out.stdout.split() if f.endswith(CPP_SUFFIXES)]


def tracked_python() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "--", "*.py"], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.split() if out.returncode == 0 else []


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_ruff_lint_is_clean() -> None:
    out = run([tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."])
    assert out.returncode == 0, f"ruff check . found (fix: ruff check --fix .):\n{out.stdout}"


def test_ruff_format_is_clean() -> None:
    out = run([tool("ruff"), "format", "--no-cache", "--check", "."])
    assert out.returncode == 0, f"off the format (fix: ruff format .):\n{out.stdout}"
    # The configuration must not exclude the tree: every Python file is checked.
    checked = int(out.stdout.split(" files already formatted")[0].split()[-1])
    assert checked >= len(tracked_python()), out.stdout


def test_clang_format_is_clean() -> None:
    files = tracked("csrc", "kernels", "tests/cpp")
    assert len(files) > 40, f"expected the C++ and CUDA sources, found {files}"
    out = run([tool("clang-format"), "--dry-run", "-Werror", *files])
    off = sorted({line.split(":", 1)[0] for line in out.stderr.splitlines() if ": error:" in line})
    assert out.returncode == 0, (
        f"off the format (fix: clang-format -i {' '.join(off)}):\n{out.stderr[:4000]}"
    )

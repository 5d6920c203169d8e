"""The documentation: the site builds in strict mode (a broken link, anchor,
snippet or API reference fails the build), its API page documents every
public name of torch_ar, its op table page is the engine's table, no section
of the former long README was lost, and the README stays a front page whose
links all resolve."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import torch_ar

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"

# The sections of the README before the documentation moved to docs/: each is
# a heading of some docs page now (the API section is the API reference page).
FORMER_README_SECTIONS = (
    "The two commands",
    "Install into your own environment",
    "Use it on your model",
    "API reference",
    "Several GPUs, mixed precision",
    "CUDA",
    "How it works",
    "Supported ops",
    "Variants (paper section 3)",
    "Benchmarks",
    "Results",
    "The paper on Fashion-MNIST, in the original code's setting",
    "Granularity: layers and blocks",
    "Relaxation steps on CNNs",
    "CIFAR-10",
    "ResNet-20 with BatchNorm (the field's setting)",
    "The small CNN without normalisation",
    "Experiments",
    "Compatibility",
    "Limitations",
    "Layout",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    mkdocs = shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: pip install -r requirements.txt")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    # Built from another folder: every path in mkdocs.yml is the config's own.
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{build.stderr[-6000:]}"
    return out


def test_api_page_documents_every_public_name(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    documented = set(re.findall(r'id="(torch_ar\.[A-Za-z_][\w.]*)"', api))
    missing = [n for n in torch_ar.__all__ if f"torch_ar.{n}" not in documented]
    assert not missing, f"public names without an API entry: {missing}"
    # Each option of ARBackward is described (from RelaxConfig's docstring).
    undocumented = [
        option
        for option in torch_ar.RelaxConfig.__dataclass_fields__
        if f'title="torch_ar.RelaxConfig.{option}"' not in api
    ]
    assert not undocumented, f"RelaxConfig options missing from its Attributes: {undocumented}"


def test_api_page_shows_options_as_users_write_them(site: Path) -> None:
    """RelaxConfig's signature shows plain defaults (it showed a private
    helper, `eta: float = _option(1.0, bound="positive")`), and VARIANTS is a
    table of every variant, not its source."""
    api = re.sub(r"<[^>]+>", "", (site / "api" / "index.html").read_text())
    api = html.unescape(api)
    assert "_option(" not in api and "choices=" not in api
    assert re.search(r"eta:\s*float\s*=\s*1\.0", api), "RelaxConfig's eta default is not shown"
    assert 'Variant("exact"' not in api, "VARIANTS is rendered as its source"
    page = (site / "api" / "index.html").read_text()
    rows = re.findall(r"<tr>\s*<td><code>(\w+)</code></td>", page)
    assert rows == list(torch_ar.VARIANTS), rows


def test_every_torch_ar_name_the_docs_write_is_an_attribute() -> None:
    """`torch_ar.X.y` in the README or docs works after `import torch_ar`
    alone (torch_ar.alignment raised AttributeError)."""
    pages = [README, *DOCS.glob("*.md")]
    written = sorted(
        {m for page in pages for m in re.findall(r"\btorch_ar\.([a-z_]+)\b", page.read_text())}
    )
    assert "alignment" in written and "experiments" in written, written
    probe = "import torch_ar\n" + "".join(f"torch_ar.{name}\n" for name in written)
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_op_table_page_is_the_engines_table(site: Path) -> None:
    page = (site / "ops" / "index.html").read_text()
    rows = re.findall(r"<tr>\s*<td>(\w+)</td>", page)
    assert sorted(rows) == sorted(o.node for o in torch_ar.supported_ops())


def test_no_former_readme_section_is_lost() -> None:
    headings = set()
    for page in DOCS.glob("*.md"):
        in_code = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                in_code = not in_code
            elif not in_code and line.startswith("#"):
                headings.add(line.lstrip("#").strip())
    missing = [s for s in FORMER_README_SECTIONS if s not in headings]
    assert not missing, f"sections of the former README missing from docs/: {missing}"


def test_readme_is_a_front_page_with_live_links() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local, "the README links its pages"
    broken = [t for t in local if not (ROOT / t).exists()]
    assert not broken, f"README links to missing files: {broken}"
    # The backticked paths it cites as evidence exist too.
    cited = re.findall(r"`((?:results|benchmarks|docs)/[^`\s]+)`", text)
    assert cited
    assert not [c for c in cited if not (ROOT / c).exists()], cited

"""The examples of docs/getting-started.md's "Using torch_ar with trainers,
EMA and checkpoints" run as printed and do what the text says."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"
SECTION = "## Using torch_ar with trainers, EMA and checkpoints"


def example(heading: str) -> str:
    section = PAGE.read_text().split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    part = section.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block under '{heading}', found {len(blocks)}"
    return blocks[0]


def run(heading: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.chdir(folder)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "getting_started_example"}
    exec(compile(example(heading), str(PAGE), "exec"), namespace)  # noqa: S102 (the page's own example)
    return namespace


def _psi(ar) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in ar.backward_weights().items()}


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")
def test_lightning_example(tmp_path, monkeypatch):
    ns = run("PyTorch Lightning", tmp_path, monkeypatch)
    model, restored = ns["model"], ns["restored"]
    assert ns["trainer"].global_step == 2  # 4 batches, accumulated in pairs
    assert model.net.last_stats is not None, "the relaxation did not run"
    assert _psi(model.net), "sign_symmetry has psi"
    for name, psi in _psi(model.net).items():
        assert torch.equal(_psi(restored.net)[name], psi), name
    for (name, p), (_, q) in zip(model.named_parameters(), restored.named_parameters()):
        assert torch.equal(p, q), name


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None
    or importlib.util.find_spec("accelerate") is None,
    reason="needs transformers and accelerate",
)
def test_transformers_trainer_example(tmp_path, monkeypatch):
    ns = run("Hugging Face `Trainer`", tmp_path, monkeypatch)
    stats = ns["ar"].last_stats
    assert stats is not None and stats.evaluation == "closed_form" and stats.steps == 100
    assert all(torch.isfinite(p).all() for p in ns["ar"].parameters())


def test_ema_example(tmp_path, monkeypatch):
    ns = run("EMA and SWA", tmp_path, monkeypatch)
    ar, ema = ns["ar"], ns["ema"]
    assert int(ema.n_averaged) == 10
    averaged = ema.module
    assert averaged is not ar and _psi(averaged).keys() == _psi(ar).keys()
    # Fixed psi averages to itself; the trained weights do not.
    for name, psi in _psi(ar).items():
        assert torch.equal(_psi(averaged)[name], psi), name
    assert not torch.equal(averaged.module[0].weight, ar.module[0].weight)
    assert ns["prediction"].shape == (8, 4)


def test_checkpoints_example(tmp_path, monkeypatch):
    ns = run("Checkpoints", tmp_path, monkeypatch)
    ar = ns["ar"]
    for copy_name in ("again", "whole", "twin"):
        other = ns[copy_name]
        for (name, p), (_, q) in zip(ar.state_dict().items(), other.state_dict().items()):
            assert torch.equal(p, q), (copy_name, name)
    # The copy is independent: its psi is its own tensor.
    twin_psi, psi = _psi(ns["twin"]), _psi(ar)
    assert all(twin_psi[n].data_ptr() != psi[n].data_ptr() for n in psi)
    assert any(k.startswith("backward_weight_store.") for k in ar.state_dict())

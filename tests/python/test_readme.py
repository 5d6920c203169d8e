"""The README's "Use it on your model" example runs as printed and does what
it says: AR gradients (closed form at eta 0.1) close to autograd's, and the
optimizer step moved the weights."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_block(heading: str) -> str:
    text = README.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, f"expected one python block under '{heading}', found {len(blocks)}"
    return blocks[0]


def test_use_it_on_your_model_runs_and_matches_autograd(capsys) -> None:
    torch.manual_seed(0)
    code = readme_block("Use it on your model")
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 (the README's own example)

    model, report = namespace["model"], namespace["report"]
    assert model.last_stats.evaluation == "closed_form"
    assert model.last_stats.steps == 300
    assert set(report) == {n for n, _ in model.module.named_parameters()}
    assert min(r["cosine"] for r in report.values()) > 0.999
    out = capsys.readouterr().out
    assert "closed_form" in out and "lowest cosine:" in out
    # The optimizer step used the AR gradients: every parameter moved.
    for p in model.module.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0

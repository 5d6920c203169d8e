"""Attention masked with the dtype's most negative value (GPT-2's eager
attention adds finfo.min to the masked scores): the closed form and the
literal steps agree, at every granularity and in float32 and float64.

The state of the mask add starts at its forward value; at the masked scores
that is about -finfo.max, whose transient overflows every term it feeds (the
literal steps turned NaN at step 7, the closed form returned gradients at
cosine -0.21 to autograd). Such sentinels, like -inf, start at zero: their
gradient is what relaxation has to find.
"""

from __future__ import annotations

import math

import pytest
import torch
from loaded_models import loaded_models, loss_of
from torch import nn
from zoo import load_torch_ar, rel_err

# Closed form against literal steps, and both against autograd after enough
# steps to converge (eta 0.5, 200 steps: (1 - eta)^T is far below either eps).
AGREE = {torch.float64: 1e-12, torch.float32: 2e-5}
CONVERGED = {torch.float64: 1e-10, torch.float32: 1e-4}

GRANULARITIES = ["layer", "block"]
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]


class CausalAttention(nn.Module):
    """One head of causal self-attention, masked the way eager Hugging Face
    attention masks it: `fill` (default finfo.min) added to the scores."""

    def __init__(self, width: int = 16, fill: float | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, 4)
        self.fill = fill

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        fill = torch.finfo(x.dtype).min if self.fill is None else self.fill
        mask = torch.zeros(n, n, dtype=x.dtype, device=x.device).masked_fill(~causal, fill)
        return self.out(torch.relu(torch.softmax(scores + mask, dim=-1) @ v))


def _gradients(model: nn.Module, loss_of, wrap: dict | None) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    if wrap is None:
        return list(torch.autograd.grad(loss_of(model), params))
    torch_ar = load_torch_ar()
    ar = torch_ar.ARBackward(model, **wrap)
    grads = torch.autograd.grad(loss_of(ar), params)
    assert ar.last_stats.evaluation == wrap["evaluation"]
    assert ar.last_stats.converged, ar.last_stats.max_residual
    return list(grads)


def _flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def _assert_evaluations_agree(model: nn.Module, loss_of, granularity: str, dtype) -> None:
    common = {"eta": 0.5, "steps": 200, "granularity": granularity}
    expected = _flat(_gradients(model, loss_of, None))
    closed = _flat(_gradients(model, loss_of, {**common, "evaluation": "closed_form"}))
    literal = _flat(_gradients(model, loss_of, {**common, "evaluation": "literal"}))
    assert rel_err(closed, literal) <= AGREE[dtype]
    assert rel_err(closed, expected) <= CONVERGED[dtype]
    assert rel_err(literal, expected) <= CONVERGED[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("fill", [None, float("-inf")], ids=["finfo_min", "minus_inf"])
def test_masked_attention_closed_form_equals_literal_steps(fill, granularity, dtype):
    torch.manual_seed(0)
    model = CausalAttention(fill=fill).to(dtype)
    x = torch.randn(3, 6, 16, dtype=dtype)
    _assert_evaluations_agree(model, lambda m: m(x).pow(2).sum(), granularity, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_literal_steps_at_eta_1_from_a_finfo_min_start(dtype):
    # D literal steps at eta 1 (trace asks for them) reach autograd's gradient
    # from any start; a finfo.min start used to overflow at the second step.
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = CausalAttention().to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    expected = _flat(_gradients(model, lambda m: m(x).pow(2).sum(), None))
    ar = torch_ar.ARBackward(model, granularity="layer", trace=True)
    got = _flat(torch.autograd.grad(ar(x).pow(2).sum(), list(model.parameters())))
    assert ar.last_stats.evaluation == "literal"
    assert rel_err(got, expected) <= CONVERGED[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gpt2_eager_attention_closed_form_equals_literal_steps(granularity, dtype):
    cases = [c for c in loaded_models("transformers") if c.name == "gpt2-eager"]
    if not cases:
        pytest.skip("transformers is an optional test dependency (requirements.txt)")
    model, batch = cases[0].make(dtype)
    _assert_evaluations_agree(model, lambda m: loss_of(m, batch), granularity, dtype)

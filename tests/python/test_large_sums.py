"""Convergence and divergence are decided on sums and norms taken in double:
a half state whose elements are all finite can sum past 65504.

The model: Linear(64, 4096), ReLU, Linear(4096, 10) with the first bias 8 and
the second weight 1, batch 64, loss the sum of the outputs: the hidden
state's 262,144 elements are 10 each (finite in every dtype), their sum 2.6e6.
Before, the exact sweep summed each state in its own dtype and raised
RelaxationDivergedError at eta 1 on a .half() model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import load_torch_ar

DTYPES = [
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16"),
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float64, id="float64"),
]
EVALUATIONS = [
    pytest.param({}, id="exact_sweep"),
    pytest.param({"eta": 0.5, "steps": 20, "evaluation": "closed_form"}, id="closed_form"),
    pytest.param({"eta": 0.5, "steps": 20, "evaluation": "literal"}, id="literal"),
]


def _net(dtype) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))
    with torch.no_grad():
        net[0].bias.fill_(8.0)
        net[2].weight.fill_(1.0)
    return net.to(dtype)


@pytest.mark.parametrize("settings", EVALUATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_states_whose_sum_overflows_their_dtype(dtype, settings):
    torch_ar = load_torch_ar()
    net = _net(dtype)
    x = torch.randn(64, 64).to(dtype)
    ar = torch_ar.ARBackward(net, **settings)
    ar(x).float().sum().backward()
    stats = ar.last_stats
    assert not stats.nonfinite
    assert stats.converged
    for name, p in net.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("settings", EVALUATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_under_autocast_the_stats_stay_right(dtype, settings):
    torch_ar = load_torch_ar()
    net = _net(torch.float32)
    x = torch.randn(64, 64)
    ar = torch_ar.ARBackward(net, **settings)
    with torch.autocast("cpu", dtype=dtype):
        out = ar(x)
    out.float().sum().backward()
    assert not ar.last_stats.nonfinite
    assert ar.last_stats.converged

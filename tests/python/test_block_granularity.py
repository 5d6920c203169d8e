"""granularity="block": a layer is a parametrised op (linear, conv, lookup)
with everything after it up to the next parametrised op or branch point
(norms, pools, activations, views, a residual add). Fewer, deeper layers;
the same gradients: at eta 1 autograd's on every zoo graph, and the closed
form equals the literal steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo import CASES, ar_vs_autograd, assert_grads_match

from torch_ar.experiments.models import build_model

SMALL_CASES = [name for name in CASES if name != "resnet18_train"]


@pytest.mark.parametrize("case_name", list(CASES))
def test_block_granularity_is_exact(case_name, device, dtype):
    cmp = ar_vs_autograd(CASES[case_name], device, dtype, {"granularity": "block"})
    assert_grads_match(cmp.pairs, dtype)
    assert cmp.ar.last_stats.converged


@pytest.mark.parametrize("case_name", SMALL_CASES)
@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({"init": "zero", "trace": True}, id="literal_steps"),
        pytest.param({"schedule": "sweep"}, id="sweep"),
    ],
)
def test_block_granularity_literal_steps_are_exact(case_name, ar_kwargs, device):
    cmp = ar_vs_autograd(
        CASES[case_name], device, torch.float64, {"granularity": "block", **ar_kwargs}
    )
    assert_grads_match(cmp.pairs, torch.float64)


def _grads(torch_ar, model, x, y, **kwargs):
    ar = torch_ar.ARBackward(model, granularity="block", **kwargs)
    model.zero_grad()
    F.cross_entropy(ar(x), y).backward()
    return [p.grad.clone() for p in model.parameters()], ar.last_stats


@pytest.mark.parametrize("name", ["cnn", "resnet20", "resnet18"])
@pytest.mark.parametrize("eta, steps", [(0.5, 7), (0.1, 60)])
def test_block_closed_form_equals_literal_steps(torch_ar, name, eta, steps):
    torch.manual_seed(0)
    model = build_model(name, "cifar10").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    closed, c = _grads(torch_ar, model, x, y, eta=eta, steps=steps)
    literal, lit = _grads(torch_ar, model, x, y, eta=eta, steps=steps, evaluation="literal")
    assert c.evaluation == "closed_form" and lit.evaluation == "literal"
    scale = torch.cat([g.flatten() for g in literal]).norm()
    for a, b in zip(closed, literal):
        assert (a - b).norm() <= 1e-10 * scale


@pytest.mark.parametrize(
    "name, dataset, layer_depth, block_depth, block_states",
    [
        ("mlp", "fashion-mnist", 3, 3, 3),  # the paper's MLP: its three states stay
        ("cnn", "cifar10", 6, 3, 3),  # conv-ReLU-pool blocks: one state each
        ("resnet20", "cifar10", 48, 19, 21),  # two per basic block (+ two shortcut pads)
        ("resnet18", "cifar10", 43, 17, 20),
    ],
)
def test_block_granularity_depth(torch_ar, name, dataset, layer_depth, block_depth, block_states):
    torch.manual_seed(0)
    model = build_model(name, dataset).double()
    shape = (2, 1, 28, 28) if dataset == "fashion-mnist" else (2, 3, 32, 32)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.tensor([1, 7])
    depths = {}
    for granularity in ("layer", "block"):
        ar = torch_ar.ARBackward(model, granularity=granularity)
        F.cross_entropy(ar(x), y).backward()
        depths[granularity] = ar.last_stats
    assert depths["layer"].depth == layer_depth
    assert depths["block"].depth == block_depth
    assert depths["block"].relaxing_states == block_states


@pytest.mark.parametrize("case_name", SMALL_CASES)
def test_block_is_never_deeper_than_layer(case_name):
    depth = {}
    for granularity in ("layer", "block"):
        cmp = ar_vs_autograd(CASES[case_name], "cpu", torch.float64, {"granularity": granularity})
        depth[granularity] = cmp.ar.last_stats.depth
    assert depth["block"] <= depth["layer"]

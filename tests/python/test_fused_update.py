"""The fused activation update.

torch.ops.torch_ar.relax_update_activation_ against ATen's own backward of
each activation, and the engine with the fusion on against the unfused
reference path (fuse_activations=False) and against autograd.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE_PARAMS, DTYPE_PARAMS
from torch import nn
from zoo import F32_MAX_REL_ERR

import torch_ar._C  # noqa: F401  (registers torch.ops.torch_ar)

aten = torch.ops.aten
relax_update_ = torch.ops.torch_ar.relax_update_
relax_update_activation_ = torch.ops.torch_ar.relax_update_activation_

# name -> (kind, the saved input from the pre-activation a, (p0, p1), ATen's
# VJP of v from that saved input)
ACTIVATIONS = {
    "relu": (1, torch.relu, (0.0, 0.0), lambda v, r: aten.threshold_backward(v, r, 0)),
    "leaky_relu": (
        2,
        lambda a: a,
        (0.2, 0.0),
        lambda v, a: aten.leaky_relu_backward(v, a, 0.2, False),
    ),
    "tanh": (3, torch.tanh, (0.0, 0.0), aten.tanh_backward),
    "sigmoid": (4, torch.sigmoid, (0.0, 0.0), aten.sigmoid_backward),
    "hardtanh": (5, lambda a: a, (-1.0, 1.0), lambda v, a: aten.hardtanh_backward(v, a, -1.0, 1.0)),
    "scale": (6, torch.cos, (0.0, 0.0), lambda v, d: v * d),
}
OP_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
OP_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-3,
}


def pre_activation(n: int, dtype: torch.dtype, device: str, nan: bool) -> torch.Tensor:
    """Random values plus the boundaries of every formula (0, +-1) and a NaN."""
    g = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=g, dtype=torch.float64) * 2
    a[:4] = torch.tensor([0.0, -1.0, 1.0, float("nan") if nan else 0.5], dtype=torch.float64)
    return a.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_op_matches_aten_backward(name: str, dtype: torch.dtype, device: str) -> None:
    kind, saved_of, params, vjp = ACTIVATIONS[name]
    sizes = (10_000, 37, 5000)  # several chunks, a tail, a state without activation
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    targets = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    # ATen's own hardtanh backward treats NaN differently on its CPU vector
    # and scalar paths; the kernel follows the scalar (and CUDA) one.
    a = [pre_activation(n, dtype, device, nan=name != "hardtanh") for n in sizes[:2]]
    inputs = [saved_of(x) for x in a]
    grads = [torch.full_like(x, 7.0) for x in a[::-1]]
    want_states = [s.clone() for s in states]
    want_norms = relax_update_(want_states, [t.clone() for t in targets], 0.3, 0.0)

    norms = relax_update_activation_(
        states, targets, 0.3, 0.0, [1, 0], [kind, kind], list(params) * 2, inputs[::-1], grads
    )
    # grads[k] belongs to states[activation_states[k]]: grads[0] -> state 1.
    tol = OP_TOLERANCE[dtype]
    torch.testing.assert_close(norms, want_norms, rtol=1e-6, atol=1e-6)
    for got, want in zip(states, want_states):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for k, s in enumerate((1, 0)):
        want = vjp(states[s].double(), inputs[s].double()).to(dtype)
        torch.testing.assert_close(grads[k], want, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation_states": [5]}, "is not an index"),
        ({"activation_states": [0, 0]}, "listed twice"),
        ({"activation_kinds": [9]}, "not a known activation derivative"),
        ({"activation_params": [0.0]}, "two params per activation"),
        ({"activation_inputs": [torch.zeros(3)]}, "activation_inputs\\[0\\]"),
        ({"activation_grads": [torch.zeros(4, dtype=torch.float64)]}, "activation_grads\\[0\\]"),
    ],
)
def test_op_rejects_bad_activation_lists(kwargs: dict, message: str) -> None:
    args = {
        "activation_states": [0],
        "activation_kinds": [1],
        "activation_params": [0.0, 0.0],
        "activation_inputs": [torch.zeros(4)],
        "activation_grads": [torch.zeros(4)],
    }
    args.update(kwargs)
    n = len(args["activation_states"])
    for key in ("activation_kinds", "activation_inputs", "activation_grads"):
        if len(args[key]) < n:
            args[key] = args[key] * n
    if len(args["activation_params"]) == 2 and n == 2:
        args["activation_params"] = args["activation_params"] * 2
    with pytest.raises(RuntimeError, match=message):
        relax_update_activation_(
            [torch.zeros(4)],
            [torch.ones(4)],
            0.5,
            0.0,
            args["activation_states"],
            args["activation_kinds"],
            args["activation_params"],
            args["activation_inputs"],
            args["activation_grads"],
        )


ENGINE_ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "hardtanh": nn.Hardtanh,
    "relu6": nn.ReLU6,
    "elu": nn.ELU,
}


def mlp(act, dtype: torch.dtype, device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12),
        act(),
        nn.Linear(12, 12),
        act(),
        nn.Linear(12, 12),
        act(),
        nn.Linear(12, 3),
    ).to(dtype=dtype, device=device)


def ar_grads(torch_ar, net, x, **kwargs):
    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad()
    x = x.detach().requires_grad_(True)
    ar(x).square().sum().backward()
    return [p.grad.clone() for p in net.parameters()] + [x.grad.clone()], ar.last_stats


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("schedule", ["jacobi", "sweep"])
@pytest.mark.parametrize("name", list(ENGINE_ACTIVATIONS))
def test_engine_fused_equals_unfused(torch_ar, name, schedule, dtype, device) -> None:
    net = mlp(ENGINE_ACTIVATIONS[name], dtype, device)
    x = torch.randn(5, 6, dtype=dtype, device=device)
    # Literal steps: the closed form has no fused update.
    settings = {"eta": 0.4, "steps": 25, "schedule": schedule, "evaluation": "literal"}
    fused, fused_stats = ar_grads(torch_ar, net, x, **settings)
    unfused, unfused_stats = ar_grads(torch_ar, net, x, fuse_activations=False, **settings)
    # The first activation's layer sends nothing to a state (only to W1, b1, x).
    assert fused_stats.fused_activations == 2
    assert unfused_stats.fused_activations == 0
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(fused, unfused):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_engine_fused_literal_steps_are_exact(torch_ar, dtype, device) -> None:
    """eta 1 with literal D steps through the fused path equals autograd."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
    ).to(dtype=dtype, device=device)
    x = torch.randn(4, 3, 8, 8, dtype=dtype, device=device)
    net.zero_grad()
    net(x).square().sum().backward()
    want = [p.grad.clone() for p in net.parameters()]
    # trace: literal Jacobi steps; at layer granularity the second conv's
    # pre-pooling relu output and the flattened tanh output are fused states
    # (the first layer sends nothing to a state); a block ends at its pool.
    got, stats = ar_grads(torch_ar, net, x, trace=True, granularity="layer")
    assert not stats.exact_shortcut
    assert stats.fused_activations == 2
    tol = 1e-10 if dtype == torch.float64 else F32_MAX_REL_ERR
    for g, w in zip(got, want):
        assert ((g - w).norm() / w.norm()).item() < tol


def test_fuse_activations_must_be_a_bool(torch_ar) -> None:
    with pytest.raises(ValueError, match="fuse_activations must be True or False"):
        torch_ar.ARBackward(nn.Linear(2, 2), fuse_activations=1)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        torch_ar.ARBackward(nn.Linear(2, 2), cuda_graph="yes")

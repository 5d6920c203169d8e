"""cuda_graph=True: one relaxation step recorded as a CUDA graph and replayed.

The replayed steps must give the same gradients as the steps run one by one.
Without a CUDA device the option does nothing, which is checked on the CPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import DEVICE_PARAMS, DTYPE_PARAMS, needs_cuda
from torch import nn


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 16 * 16, 64),
        nn.Sigmoid(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def grads_and_stats(torch_ar, net, x, **kwargs):
    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad()
    ar(x).logsumexp(1).sum().backward()
    return [p.grad.clone() for p in net.parameters()], ar.last_stats


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("schedule", ["jacobi", "sweep"])
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_replayed_steps_equal_eager_steps(torch_ar, make, schedule, dtype, device) -> None:
    torch.manual_seed(0)
    net = make().to(dtype=dtype, device=device)
    x = torch.randn(8, 3, 16, 16, dtype=dtype, device=device)
    # Literal steps on both sides (without a graph the default is the closed form).
    settings = {"eta": 0.1, "steps": 20, "schedule": schedule, "evaluation": "literal"}
    eager, eager_stats = grads_and_stats(torch_ar, net, x, **settings)
    graphed, stats = grads_and_stats(torch_ar, net, x, cuda_graph=True, **settings)
    assert eager_stats.graph_steps == 0
    # Step 0 runs as is and step 1 is recorded; on a CPU nothing is recorded.
    assert stats.graph_steps == (19 if device == "cuda" else 0)
    assert stats.steps == 20
    if device == "cpu":
        # The option does nothing on a CPU: the very same literal steps.
        for g, e in zip(graphed, eager):
            assert torch.equal(g, e)
        return
    # Same kernels on the same values; only kernels with atomics (some cuDNN
    # backward algorithms) may round differently from run to run.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for g, e in zip(graphed, eager):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * e.abs().max().item())


@needs_cuda
def test_tolerance_with_graph_is_tested_about_every_check_every_steps(torch_ar) -> None:
    torch.manual_seed(0)
    net = mlp().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    _, stats = grads_and_stats(torch_ar, net, x, eta=0.5, tol=1e-5, check_every=7, cuda_graph=True)
    assert stats.converged
    assert stats.max_residual <= 1e-5
    # 9999 steps after step 0: blocks of 3 (the largest divisor up to 7),
    # residuals read whenever a multiple of 7 steps is passed.
    assert (stats.steps - 1) % 3 == 0
    assert stats.graph_steps == stats.steps - 1
    _, eager_stats = grads_and_stats(torch_ar, net, x, eta=0.5, tol=1e-5, check_every=7)
    assert eager_stats.steps % 7 == 0
    assert abs(eager_stats.steps - stats.steps) < 7


@needs_cuda
def test_generic_node_relaxes_without_graph_and_warns(torch_ar) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(10, 20), nn.Softplus(), nn.Linear(20, 20), nn.Softplus(), nn.Linear(20, 3)
    ).cuda()
    x = torch.randn(4, 10, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        eager, _ = grads_and_stats(torch_ar, net, x, eta=0.2, steps=10, evaluation="literal")
        graphed, stats = grads_and_stats(torch_ar, net, x, eta=0.2, steps=10, cuda_graph=True)
    assert stats.graph_steps == 0
    assert any("SoftplusBackward0" in str(w.message) for w in caught)
    for g, e in zip(graphed, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_graph_memory_is_released_across_batches(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    ar = torch_ar.ARBackward(net, eta=0.1, steps=10, cuda_graph=True)
    allocated, reserved = [], []
    for _ in range(30):
        x = torch.randn(16, 3, 16, 16, device="cuda")
        net.zero_grad()
        ar(x).logsumexp(1).sum().backward()
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
        reserved.append(torch.cuda.memory_reserved())
        assert ar.last_stats.graph_steps == 9  # every backward records its steps
    assert ar.last_stats.graph_steps == 9
    # Every backward leases the same side stream and pool: a destroyed graph's
    # blocks are taken again by the next capture, so neither the live memory
    # nor the allocator's reserve grows with the batches (nor does a cuBLAS
    # workspace per stream).
    # A leak grows with every batch; the allocator's own jitter does not: the
    # last 20 batches stay within what the first ten reached.
    assert max(allocated[10:]) <= max(allocated[1:10]), allocated
    assert max(reserved[10:]) <= max(reserved[1:10]), reserved


@needs_cuda
def test_replayed_steps_under_bfloat16_autocast(torch_ar) -> None:
    """bfloat16 activations (float32 states, cast for each VJP) in the graph."""
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    grads = {}
    for graph in (False, True):
        ar = torch_ar.ARBackward(net, eta=0.1, steps=20, cuda_graph=graph, evaluation="literal")
        net.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ar(x).float().logsumexp(1).sum()
        loss.backward()
        grads[graph] = [p.grad.clone() for p in net.parameters()]
        assert ar.last_stats.graph_steps == (19 if graph else 0)
    for g, e in zip(grads[True], grads[False]):
        torch.testing.assert_close(g, e, rtol=1e-2, atol=1e-3 * e.abs().max().item())

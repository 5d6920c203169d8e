"""The CUDA paths a review of the kernels and the graph recorder singled out.

Each test runs on a CUDA device and is skipped, with the reason, elsewhere
(benchmarks/gpu_check.sh runs them on a GPU host): many states in one
launch, a refused capture and what it leaves behind, a caller on a side
stream, the worker-thread path of torch.autograd.grad, traces, sweeps and
tolerances with a graph, cuDNN batch norm, non-contiguous activation inputs.
The batch-norm nodes that can be made on the CPU are checked there too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn
from zoo import rel_err

from torch_ar.metrics import gradients_at


def cnn(batch_norm: bool = True) -> nn.Module:
    norm = [nn.BatchNorm2d(16)] if batch_norm else []
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        *norm,
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def gradients(torch_ar, net, x, backward=None, **kwargs):
    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad()
    loss = ar(x).logsumexp(1).sum()
    if backward is None:
        loss.backward()
        grads = [p.grad.clone() for p in net.parameters()]
    else:
        grads = list(backward(loss, list(net.parameters())))
    return grads, ar.last_stats


def assert_close(got, want, dtype=torch.float32):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= tol * 10 or float((g - w).abs().max()) <= tol * float(w.abs().max())


@needs_cuda
@pytest.mark.parametrize("count", [321, 700])
def test_more_states_than_one_launch_table(count: int) -> None:
    """More tensors than one kernel's parameter table holds: several launches."""
    import torch_ar  # noqa: F401  (registers the ops)

    gen = torch.Generator().manual_seed(0)
    states = [torch.randn(1 + i % 37, generator=gen) for i in range(count)]
    targets = [torch.randn_like(s) for s in states]
    cuda_states = [s.cuda() for s in states]
    cpu_norms = torch.ops.torch_ar.relax_update_(states, targets, 0.3, 0.0)
    cuda_norms = torch.ops.torch_ar.relax_update_(
        cuda_states, [t.cuda() for t in targets], 0.3, 0.0
    )
    for s, c in zip(states, cuda_states, strict=True):
        torch.testing.assert_close(c.cpu(), s, rtol=0, atol=0)
    torch.testing.assert_close(cuda_norms.cpu(), cpu_norms, rtol=1e-12, atol=0)
    outs = [torch.empty_like(s) for s in states]
    cuda_outs = [o.cuda() for o in outs]
    cpu_h = torch.ops.torch_ar.horner_update_(
        outs, states, targets, states, [None] * count, 0.25, 0.75, 0.0, False
    )
    cuda_h = torch.ops.torch_ar.horner_update_(
        cuda_outs,
        [s.cuda() for s in states],
        [t.cuda() for t in targets],
        [s.cuda() for s in states],
        [None] * count,
        0.25,
        0.75,
        0.0,
        False,
    )
    for o, c in zip(outs, cuda_outs, strict=True):
        torch.testing.assert_close(c.cpu(), o, rtol=0, atol=0)
    torch.testing.assert_close(cuda_h.cpu(), cpu_h, rtol=1e-12, atol=0)


@needs_cuda
def test_norms_are_the_same_on_every_run() -> None:
    """No floating-point atomics: a tolerance stop does not move between runs."""
    import torch_ar  # noqa: F401

    x = torch.randn(3_000_000, device="cuda")
    t = torch.randn_like(x)
    runs = {
        tuple(torch.ops.torch_ar.relax_update_([x.clone()], [t], 0.5, 0.0).flatten().tolist())
        for _ in range(5)
    }
    assert len(runs) == 1


@needs_cuda
def test_refused_capture_leaves_the_allocator_usable(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    eager, _ = gradients(torch_ar, net, x, eta=0.1, steps=20, evaluation="literal")
    torch.ops.torch_ar._refuse_next_cuda_graph_capture()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused, stats = gradients(torch_ar, net, x, eta=0.1, steps=20, cuda_graph=True)
    assert stats.graph_steps == 0
    assert any("could not be recorded" in str(w.message) for w in caught)
    assert_close(refused, eager)
    # The allocator no longer believes a capture is under way ...
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    # ... and the next graphed backward records and replays as usual.
    graphed, stats = gradients(torch_ar, net, x, eta=0.1, steps=20, cuda_graph=True)
    assert stats.graph_steps == 19
    assert_close(graphed, eager)


@needs_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
def test_caller_on_a_side_stream(torch_ar, graph: bool) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    settings = {"eta": 0.2, "steps": 15, "evaluation": "literal", "cuda_graph": graph}
    default, _ = gradients(torch_ar, net, x, **settings)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side, stats = gradients(torch_ar, net, x, **settings)
    torch.cuda.current_stream().wait_stream(side)
    assert stats.graph_steps == (14 if graph else 0)
    assert_close(on_side, default)


@needs_cuda
@pytest.mark.parametrize("graph", [False, True], ids=["literal", "graph"])
def test_autograd_grad_worker_thread_path(torch_ar, graph: bool) -> None:
    """torch.autograd.grad(loss, inputs=...) relaxes on a worker thread, on the caller's stream."""
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    settings = {"eta": 0.2, "steps": 15, "evaluation": "literal", "cuda_graph": graph}
    via_backward, _ = gradients(torch_ar, net, x, **settings)
    via_grad, stats = gradients(
        torch_ar,
        net,
        x,
        backward=lambda loss, params: torch.autograd.grad(loss, params),
        **settings,
    )
    assert stats.graph_steps == (14 if graph else 0)
    assert_close(via_grad, via_backward)


@needs_cuda
def test_trace_with_a_graph(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    eager, eager_stats = gradients(torch_ar, net, x, eta=0.3, steps=12, trace=True)
    graphed, stats = gradients(torch_ar, net, x, eta=0.3, steps=12, trace=True, cuda_graph=True)
    assert stats.graph_steps == 11 and stats.residual_trace.shape[0] == 12
    torch.testing.assert_close(
        stats.residual_trace, eager_stats.residual_trace, rtol=1e-4, atol=1e-8
    )
    assert_close(graphed, eager)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_sweep_and_tolerance_with_a_graph_on_the_cnn(torch_ar, dtype) -> None:
    torch.manual_seed(0)
    net = cnn().cuda().to(dtype)
    x = torch.randn(8, 3, 16, 16, device="cuda", dtype=dtype)
    eager, _ = gradients(
        torch_ar, net, x, eta=0.3, steps=30, schedule="sweep", evaluation="literal"
    )
    graphed, stats = gradients(
        torch_ar, net, x, eta=0.3, steps=30, schedule="sweep", cuda_graph=True
    )
    assert stats.graph_steps == 29
    assert_close(graphed, eager, dtype)
    _, stats = gradients(torch_ar, net, x, eta=0.5, tol=1e-4, check_every=5, cuda_graph=True)
    assert stats.converged and stats.graph_steps == stats.steps - 1


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_cudnn_batch_norm_is_specialised(torch_ar, dtype, train: bool) -> None:
    """cuDNN's batch-norm node has an input-only VJP: exact, and inside a graph."""
    torch.manual_seed(0)
    net = cnn().cuda().to(dtype).train(train)
    x = torch.randn(8, 3, 16, 16, device="cuda", dtype=dtype)
    ref = [
        g.clone() for g in torch.autograd.grad(net(x).logsumexp(1).sum(), list(net.parameters()))
    ]
    exact, stats = gradients(torch_ar, net, x)
    if torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        assert any("CudnnBatchNormBackward0" in n for n in stats.state_names), stats.state_names
    assert_close(exact, ref, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "runs its own backward" fallback warning
        _, stats = gradients(torch_ar, net, x, eta=0.2, steps=10, cuda_graph=True)
    assert stats.graph_steps == 9


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_activation_update_with_non_contiguous_tensors(dtype) -> None:
    import torch_ar  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=gen).to(dtype)
    states = [base.t().contiguous().t()]  # column-major
    targets = [torch.randn(6, 10, generator=gen).to(dtype).t().contiguous().t()]
    inputs = [torch.randn(10, 6, generator=gen).to(dtype).t()]  # a transposed view
    grads = [torch.empty(10, 6, dtype=dtype).t()]
    args = (0.4, 0.0, [0], [1], [0.0, 0.0])
    cpu = [t.clone() for t in states]
    cpu_grads = [g.clone() for g in grads]
    torch.ops.torch_ar.relax_update_activation_(cpu, targets, *args, inputs, cpu_grads)
    cuda = [t.cuda() for t in states]
    cuda_grads = [g.cuda() for g in grads]
    torch.ops.torch_ar.relax_update_activation_(
        cuda, [t.cuda() for t in targets], *args, [i.cuda() for i in inputs], cuda_grads
    )
    torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=0, atol=0)
    torch.testing.assert_close(cuda_grads[0].cpu(), cpu_grads[0], rtol=0, atol=0)


# ----------------------------------------------------------------- on the CPU


class FunctionalBatchNorm(nn.Module):
    """Batch norm through one of ATen's functional batch-norm ops."""

    def __init__(self, op: str, training: bool) -> None:
        super().__init__()
        self.op, self.training_mode = op, training
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.weight = nn.Parameter(torch.rand(6) + 0.5)
        self.bias = nn.Parameter(torch.randn(6) / 10)
        self.register_buffer("mean", torch.randn(6) / 10)
        self.register_buffer("var", torch.rand(6) + 0.5)
        self.head = nn.Linear(6 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        aten = torch.ops.aten
        if self.op == "legit":
            h = aten._native_batch_norm_legit(
                h, self.weight, self.bias, self.mean, self.var, self.training_mode, 0.1, 1e-5
            )[0]
        elif self.op == "legit_no_training":
            h = aten._native_batch_norm_legit_no_training(
                h, self.weight, self.bias, self.mean, self.var, 0.1, 1e-5
            )[0]
        elif self.op == "with_update":
            h = aten._batch_norm_with_update(
                h, self.weight, self.bias, self.mean, self.var, 0.1, 1e-5
            )[0]
        else:
            h = aten._batch_norm_no_update(
                h, self.weight, self.bias, self.mean, self.var, 0.1, 1e-5
            )[0]
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize(
    "op, training, node",
    [
        ("legit", True, "NativeBatchNormLegitBackward0"),
        ("legit", False, "NativeBatchNormLegitBackward0"),
        ("legit_no_training", False, "NativeBatchNormLegitNoTrainingBackward0"),
        ("with_update", True, "BatchNormWithUpdateBackward0"),
        ("no_update", False, "BatchNormNoUpdateBackward0"),
    ],
)
@pytest.mark.parametrize(
    "ar_kwargs",
    [{}, {"eta": 0.5, "steps": 200, "evaluation": "literal"}, {"eta": 0.5, "steps": 200}],
    ids=["exact", "literal", "closed_form"],
)
def test_functional_batch_norm_nodes(torch_ar, op, training, node, ar_kwargs) -> None:
    torch.manual_seed(0)
    net = FunctionalBatchNorm(op, training).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    target = torch.ones(5, 4, dtype=torch.float64)
    ref = gradients_at(net, lambda out: F.mse_loss(out, target), (x,), list(net.parameters()))
    ar = torch_ar.ARBackward(net, **ar_kwargs)
    F.mse_loss(ar(x), torch.ones(5, 4, dtype=torch.float64)).backward()
    assert any(node in n for n in ar.last_stats.state_names), ar.last_stats.state_names
    for p, r in zip(net.parameters(), ref, strict=True):
        # Against the whole gradient's size: the conv bias before a training-mode
        # batch norm has a zero gradient in exact arithmetic.
        scale = max(float(g.norm()) for g in ref)
        assert float((p.grad - r).norm()) <= 1e-9 * max(float(r.norm()), scale)

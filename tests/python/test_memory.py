"""No memory growth over a training loop, and the inner graph freed after backward.

2,000 SGD iterations of a small MLP through ``ARBackward`` must not grow the
resident set (after a warm-up, within a small allowance) nor the number of
objects the garbage collector tracks. The allowance is far below what one
leaked activation per iteration would add (48 x 48 float32 = 9 KiB, so
about 13 MiB over the measured 1,500 iterations).

Separately, weak references show that a tensor made inside the wrapped
forward dies with backward (without ``retain_graph``), that ``retain_graph``
keeps it until the last backward, and that nothing needs the cycle collector.
"""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn

ITERATIONS = 2_000
WARMUP = 500
RSS_ALLOWANCE_BYTES = 2 * 2**20
GC_OBJECT_ALLOWANCE = 200

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/statm").exists(), reason="needs /proc/self/statm (Linux)"
)


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a loaded machine OpenMP's
    spinning threads make each iteration 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 8)
    )


@pytest.mark.parametrize(
    ("ar_kwargs", "use_autograd_grad"),
    [
        pytest.param({}, False, id="exact"),
        pytest.param({"eta": 0.5, "steps": 5}, False, id="eta0.5_forward_init"),
        pytest.param({"trace": True, "trace_cosine": True}, False, id="traced"),
        # autograd.grad(inputs=...) runs the relaxation on a short-lived thread.
        pytest.param({}, True, id="exact_autograd_grad"),
    ],
)
def test_training_loop_does_not_grow_memory(ar_kwargs, use_autograd_grad, torch_ar, one_thread):
    torch.manual_seed(0)
    model = _mlp()
    ar = torch_ar.ARBackward(model, **ar_kwargs)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    x, y = torch.randn(48, 32), torch.randn(48, 8)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(ar(x), y)
        if use_autograd_grad:
            for p, g in zip(params, torch.autograd.grad(loss, params)):
                p.grad = g
        else:
            loss.backward()
        opt.step()

    for _ in range(WARMUP):
        step()
    # gc.get_objects() builds a large list: take it before the first RSS reading
    # and after the second, so that its own allocation is not counted.
    gc.collect()
    objects0 = len(gc.get_objects())
    rss0 = rss_bytes()
    for _ in range(ITERATIONS - WARMUP):
        step()
    gc.collect()
    rss1 = rss_bytes()
    objects1 = len(gc.get_objects())
    assert all(torch.isfinite(p).all() for p in params)
    assert rss1 - rss0 <= RSS_ALLOWANCE_BYTES, (
        f"RSS grew by {(rss1 - rss0) / 2**20:.2f} MiB over "
        f"{ITERATIONS - WARMUP} iterations after warm-up"
    )
    assert objects1 - objects0 <= GC_OBJECT_ALLOWANCE, (
        f"{objects1 - objects0} more gc-tracked objects after {ITERATIONS - WARMUP} iterations"
    )


class RecordsHidden(nn.Module):
    """Keeps a weak reference to a hidden tensor made during forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.hidden: weakref.ref | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        self.hidden = weakref.ref(h)
        return self.b(h)

    def hidden_alive(self) -> bool:
        return self.hidden is not None and self.hidden() is not None


@pytest.mark.parametrize(
    "ar_kwargs", [{}, {"eta": 0.5, "steps": 10}], ids=["exact", "eta0.5_forward_init"]
)
@pytest.mark.parametrize("use_autograd_grad", [False, True], ids=["backward", "autograd_grad"])
def test_inner_graph_freed_after_backward(ar_kwargs, use_autograd_grad, torch_ar):
    gc.disable()  # anything still alive below must be held by a real reference
    try:
        net = RecordsHidden()
        ar = torch_ar.ARBackward(net, **ar_kwargs)
        x = torch.randn(5, 4)
        out = ar(x)
        loss = out.square().mean()
        assert net.hidden_alive(), "the hidden tensor should be alive before backward"
        if use_autograd_grad:
            torch.autograd.grad(loss, list(net.parameters()))
        else:
            loss.backward()
        assert not net.hidden_alive(), (
            "a tensor made inside forward survived backward (inner graph not freed)"
        )
        out_ref = weakref.ref(out)
        del out, loss
        assert out_ref() is None, "the output is kept alive after the user dropped it"
    finally:
        gc.enable()


def test_retain_graph_keeps_inner_graph_until_last_backward(torch_ar):
    gc.disable()
    try:
        net = RecordsHidden()
        ar = torch_ar.ARBackward(net)
        out = ar(torch.randn(5, 4))
        loss = out.square().mean()
        loss.backward(retain_graph=True)
        assert net.hidden_alive(), "retain_graph=True must keep the inner graph"
        loss.backward()
        assert not net.hidden_alive(), "the last backward must free the inner graph"
        del out, loss
        assert not net.hidden_alive()
    finally:
        gc.enable()


def test_no_grad_forward_keeps_nothing(torch_ar):
    gc.disable()
    try:
        net = RecordsHidden()
        ar = torch_ar.ARBackward(net)
        with torch.no_grad():
            out = ar(torch.randn(5, 4))
        assert out.grad_fn is None
        assert not net.hidden_alive(), "a no_grad forward kept a hidden tensor alive"
    finally:
        gc.enable()


@needs_cuda
@pytest.mark.parametrize("ar_kwargs", [{}, {"eta": 0.5, "steps": 10}], ids=["exact", "eta0.5"])
def test_cuda_memory_does_not_grow_over_2000_iterations(ar_kwargs):
    import torch_ar

    torch.manual_seed(0)
    net = _mlp().cuda()
    ar = torch_ar.ARBackward(net, **ar_kwargs)
    opt = torch.optim.SGD(ar.parameters(), lr=1e-3)
    x = torch.randn(16, 32, device="cuda")
    y = torch.randn(16, 8, device="cuda")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.mse_loss(ar(x), y).backward()
        opt.step()

    for _ in range(200):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    for _ in range(2000):
        step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - base <= 64 * 1024, (
        f"CUDA memory grew by {torch.cuda.memory_allocated() - base} bytes"
    )


class _StorageProbe(torch.autograd.Function):
    """Identity whose backward records whether a watched storage is freed."""

    @staticmethod
    def forward(ctx, x, watch):
        ctx.watch = watch
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.watch.append(ctx.watch[0].expired())
        return grad, None


class _ProbedNet(nn.Module):
    """x -> tanh(l1) -> probe -> tanh(l2) = h2 -> l3. h2's storage is saved by
    tanh (its result) and by l3 (its input), both above the probe."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.watch: list = []
        self.pre_activation: weakref.ref | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.multiprocessing.reductions import StorageWeakRef

        h1 = _StorageProbe.apply(torch.tanh(self.l1(x)), self.watch)
        a2 = self.l2(h1)
        self.pre_activation = weakref.ref(a2)
        h2 = torch.tanh(a2)
        self.watch[:] = [StorageWeakRef(h2.untyped_storage())]
        return self.l3(h2)


@pytest.mark.parametrize("wrapped", [False, True], ids=["autograd", "ar_exact"])
def test_saved_values_freed_layer_by_layer(wrapped, torch_ar):
    """Like autograd, the exact sweep frees a layer's saved values once it has
    run, not at the end of the backward."""
    net = _ProbedNet()
    model = torch_ar.ARBackward(net) if wrapped else net
    model(torch.randn(5, 4)).square().sum().backward()
    assert net.watch[1:] == [True], "values saved above the probe were still held"


def test_forward_values_kept_only_for_states(torch_ar):
    """init="forward" keeps the states' forward values until backward, and
    nothing else made in forward (a pre-activation dies as in autograd)."""
    net = _ProbedNet()
    x = torch.randn(5, 4)
    ar = torch_ar.ARBackward(net, eta=0.5, steps=3)
    out = ar(x)
    assert net.pre_activation() is None, "a pre-activation outlived the forward"
    out.square().sum().backward()
    forward_init = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    zero = torch_ar.ARBackward(net, eta=0.5, steps=3, init="zero")
    zero(x).square().sum().backward()
    # The states did start from their forward values: the transients differ.
    assert any(not torch.allclose(a, p.grad) for a, p in zip(forward_init, net.parameters()))

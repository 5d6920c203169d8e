"""The eight items of the second CUDA review, each pinned by a test.

The tests that need a GPU carry the `cuda` marker (benchmarks/gpu_check.sh
runs them one file at a time); the parts of each item that the CPU can show
(memory formats, the closed form's overflow and divergence rules, the
release call) run everywhere.

1. successive and refused captures leave the allocator and CUDA RNG usable;
2. memory flat over graphed backwards (one side stream per lane);
4. the norms of large states (one block per tensor);
5. channels_last states and gradients keep their layout;
6. a model split over two GPUs;
7. the graph pool given back on request;
8. the closed form off the CPU raises at the stage that diverged and rescales
   an overflowed residual.
(3 is benchmarks/gpu_check.sh's smoke step, now torch_ar.selftest: see
test_selftest.py.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE_PARAMS, needs_cuda
from torch import nn
from zoo import rel_err


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
        nn.Tanh(),
        nn.Linear(32, 10),
    )


def grads(torch_ar, net, x, **kwargs):
    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad()
    ar(x).logsumexp(1).sum().backward()
    return [p.grad.clone() for p in net.parameters()], ar.last_stats


def autograd_grads(net, x):
    net.zero_grad()
    net(x).logsumexp(1).sum().backward()
    return [p.grad.clone() for p in net.parameters()]


# --------------------------------------------------------------------------
# 1. Captures after the first, refused captures, and CUDA random numbers
# --------------------------------------------------------------------------


@needs_cuda
def test_many_captures_in_one_process(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    eager, _ = grads(torch_ar, net, x, eta=0.1, steps=12, evaluation="literal")
    for _ in range(5):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no capture may fall back
            graphed, stats = grads(torch_ar, net, x, eta=0.1, steps=12, cuda_graph=True)
        assert stats.graph_steps == 11
        for g, e in zip(graphed, eager):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def cuda_random_numbers_work() -> None:
    a = torch.randn(4096, device="cuda")
    b = F.dropout(torch.ones(4096, device="cuda"), 0.5)
    torch.cuda.synchronize()
    assert 0.9 < a.std().item() < 1.1
    assert 1000 < int((b == 0).sum()) < 3000


@needs_cuda
@pytest.mark.parametrize("refused", [False, True], ids=["recorded", "refused"])
def test_cuda_rng_after_a_capture(torch_ar, refused: bool) -> None:
    torch.manual_seed(0)
    net = small_net().cuda()
    x = torch.randn(8, 16, device="cuda")
    for _ in range(3):
        if refused:
            torch.ops.torch_ar._refuse_next_cuda_graph_capture()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, stats = grads(torch_ar, net, x, eta=0.5, steps=8, cuda_graph=True)
        assert (stats.graph_steps == 0) == refused
        assert any("could not be recorded" in str(w.message) for w in caught) == refused
        cuda_random_numbers_work()
    # And a capture after the refusals records again.
    _, stats = grads(torch_ar, net, x, eta=0.5, steps=8, cuda_graph=True)
    assert stats.graph_steps == 7


# --------------------------------------------------------------------------
# 2. Memory over many graphed backwards
# --------------------------------------------------------------------------


# (Ten and more graphed backwards with flat memory: test_cuda_graph.py.)


@needs_cuda
def test_autograd_grad_worker_threads_reuse_one_lane(torch_ar) -> None:
    """torch.autograd.grad(inputs=...) relaxes on a short-lived thread: each one
    must still take the same side stream (a new stream costs a cuBLAS
    workspace that torch never frees)."""
    torch.manual_seed(0)
    net = cnn().cuda()
    ar = torch_ar.ARBackward(net, eta=0.1, steps=6, cuda_graph=True)
    reserved = []
    for _ in range(16):
        x = torch.randn(8, 3, 16, 16, device="cuda")
        loss = ar(x).logsumexp(1).sum()
        torch.autograd.grad(loss, list(net.parameters()))
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    # A workspace per thread would grow the reserve with every call; the
    # allocator's jitter stays within what the first calls reached.
    assert max(reserved[8:]) <= max(reserved[1:8]), reserved


# --------------------------------------------------------------------------
# 4. Norms of large states, and many states over several launches
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_of_large_states_match_the_cpu(dtype) -> None:
    import torch_ar  # noqa: F401

    gen = torch.Generator().manual_seed(0)
    sizes = [3_000_001, 4096 * 300 + 7, 1, 0]
    states = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    targets = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    cpu = torch.ops.torch_ar.relax_update_([s.clone() for s in states], targets, 0.25, 0.0)
    runs = []
    for _ in range(2):
        cuda_states = [s.cuda() for s in states]
        runs.append(
            torch.ops.torch_ar.relax_update_(
                cuda_states, [t.cuda() for t in targets], 0.25, 0.0
            ).cpu()
        )
    assert torch.equal(runs[0], runs[1])  # a fixed order: the same on every run
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(runs[0], cpu, rtol=tol, atol=0.0)


def cuda_and_cpu(dtype):
    return [("cpu", dtype)] + ([("cuda", dtype)] if torch.cuda.is_available() else [])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("missing", ["none", "initial", "loss", "targets"])
def test_horner_update_on_cuda_equals_the_cpu_kernel(dtype, residual: bool, missing: str) -> None:
    import torch_ar  # noqa: F401

    sizes = [9000, 5, 0, 4096]
    names = ("initial", "loss", "targets", "residual")

    def term(j: int, i: int, n: int, device: str) -> torch.Tensor:
        t = torch.randn(n, generator=torch.Generator().manual_seed(10 * j + i), dtype=torch.float64)
        if names[j] == "initial" and n > 3:
            t[3] = float("nan")  # a NaN initial state counts as zero
        return t.to(dtype).to(device)

    results = {}
    for device in ("cpu", "cuda"):
        out = [torch.empty(n, dtype=dtype, device=device) for n in sizes]
        t = {
            name: [None if name == missing else term(j, i, n, device) for i, n in enumerate(sizes)]
            for j, name in enumerate(names)
        }
        norms = torch.ops.torch_ar.horner_update_(
            out,
            t["initial"],
            t["loss"],
            t["targets"],
            t["residual"] if residual else [None] * len(sizes),
            0.3,
            0.9,
            0.0,
            residual,
        )
        results[device] = ([o.cpu() for o in out], norms.cpu())
    (cpu_out, cpu_norms), (cuda_out, cuda_norms) = results["cpu"], results["cuda"]
    for a, b in zip(cuda_out, cpu_out):
        # One rounding per operation in opmath on both (ops/relax_math.h).
        assert torch.equal(a, b)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(cuda_norms, cpu_norms, rtol=tol, atol=0.0)


@needs_cuda
@pytest.mark.parametrize("count", [17, 300, 700])
def test_horner_update_over_several_launch_tables(count: int) -> None:
    """More states than the small table (16) and the large one (256) hold."""
    import torch_ar  # noqa: F401

    gen = torch.Generator().manual_seed(3)
    b = [torch.randn(1 + 523 * (i % 11), generator=gen, dtype=torch.float64) for i in range(count)]
    t = [torch.randn_like(v) for v in b]
    outs = {}
    for device in ("cpu", "cuda"):
        out = [torch.empty_like(v, device=device) for v in b]
        norms = torch.ops.torch_ar.horner_update_(
            out,
            [None] * count,
            [v.to(device) for v in b],
            [v.to(device) for v in t],
            [None] * count,
            0.0,
            0.5,
            0.0,
            False,
        )
        outs[device] = ([o.cpu() for o in out], norms.cpu())
    for a, e in zip(outs["cuda"][0], outs["cpu"][0]):
        assert torch.equal(a, e)
    torch.testing.assert_close(outs["cuda"][1], outs["cpu"][1], rtol=1e-12, atol=0.0)


@needs_cuda
def test_horner_update_counts_non_finite_values_on_cuda() -> None:
    import torch_ar  # noqa: F401

    out = [torch.empty(5000, device="cuda")]
    b = torch.ones(5000, device="cuda")
    b[4097] = float("inf")
    b[1] = float("nan")
    norms = torch.ops.torch_ar.horner_update_(out, [None], [b], [None], [None], 0.0, 1.0, 0.0, True)
    assert norms[0, 3].item() == 4.0  # out and its target, twice each


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("in_place", [False, True])
def test_horner_update_non_contiguous_out(device, in_place: bool) -> None:
    # A non-dense out used to be refused ("overlaps one of its inputs"):
    # ATen's overlap test answers TooHard for it, with nothing overlapping.
    import torch_ar  # noqa: F401

    base = torch.zeros(64, 64, device=device)
    out = base.t()[::2]  # neither contiguous nor dense
    out.copy_(torch.randn(32, 64))
    t = out if in_place else torch.randn(32, 64, device=device)
    b = torch.randn(32, 64, device=device)
    want = 2 * b + t
    norms = torch.ops.torch_ar.horner_update_([out], [None], [b], [t], [None], 0.0, 2.0, 0.0, False)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(norms[0, 0], want.norm().double())
    assert base.t()[1::2].abs().sum() == 0  # the rows between were not written


# --------------------------------------------------------------------------
# 5. Memory formats (CPU and CUDA)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_state_is_updated_where_it_is(device, fused: bool) -> None:
    import torch_ar  # noqa: F401

    torch.manual_seed(0)
    x = torch.randn(2, 8, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    t = torch.randn(2, 8, 5, 5, device=device).contiguous(memory_format=torch.channels_last)
    want = x + 0.5 * (t - x)
    before = x.data_ptr()
    if fused:
        a = torch.randn_like(x).relu()
        g = torch.empty_like(x)
        torch.ops.torch_ar.relax_update_activation_(
            [x], [t], 0.5, 0.0, [0], [1], [0.0, 0.0], [a], [g]
        )
        torch.testing.assert_close(g, torch.where(a <= 0, torch.zeros_like(want), want))
        assert g.is_contiguous(memory_format=torch.channels_last)
    else:
        torch.ops.torch_ar.relax_update_([x], [t], 0.5, 0.0)
    torch.testing.assert_close(x, want)
    assert x.data_ptr() == before and x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_mixed_layouts_are_paired_by_index(device) -> None:
    """A channels_last state with an NCHW target (and the other way round)."""
    import torch_ar  # noqa: F401

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, device=device)
    t = torch.randn(2, 3, 4, 5, device=device)
    for xs, ts in (
        (x.contiguous(memory_format=torch.channels_last), t.clone()),
        (x.clone(), t.contiguous(memory_format=torch.channels_last)),
        (x.clone().transpose(2, 3).contiguous().transpose(2, 3), t.clone()),
    ):
        norms = torch.ops.torch_ar.relax_update_([xs], [ts], 0.25, 0.0)
        torch.testing.assert_close(xs, x + 0.25 * (t - x))
        torch.testing.assert_close(norms[0, 0].float(), (t - x).norm(), rtol=1e-5, atol=0)
    out = torch.empty(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    torch.ops.torch_ar.horner_update_([out], [x], [t], [None], [None], 0.5, 2.0, 0.0, False)
    torch.testing.assert_close(out, 0.5 * x + 2 * t)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"eta": 0.2, "steps": 15},
        {"eta": 0.2, "steps": 15, "evaluation": "literal"},
    ],
    ids=["exact", "closed_form", "literal"],
)
def test_channels_last_cnn_gradients(torch_ar, device, settings) -> None:
    torch.manual_seed(0)
    net = cnn().double().to(device)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, device=device)
    reference, _ = grads(torch_ar, net, x, **settings)
    net_cl = net.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    got, _ = grads(torch_ar, net_cl, x_cl, **settings)
    # Against the whole gradient's size: the first conv's bias, before a
    # train-mode BatchNorm, has an exact gradient of zero.
    scale = torch.cat([e.flatten() for e in reference]).norm()
    for g, e in zip(got, reference):
        assert (g - e).norm() <= 1e-10 * scale
    # The gradients have the layout autograd gives the same model.
    for g, e in zip(got, autograd_grads(net_cl, x_cl)):
        assert g.stride() == e.stride()


@needs_cuda
def test_channels_last_with_a_graph(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda().to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
    eager, _ = grads(torch_ar, net, x, eta=0.1, steps=10, evaluation="literal")
    graphed, stats = grads(torch_ar, net, x, eta=0.1, steps=10, cuda_graph=True)
    assert stats.graph_steps == 9
    for g, e in zip(graphed, eager):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


@needs_cuda
@pytest.mark.parametrize(
    "variant",
    [
        "learned_backward_weights",
        "feedback_alignment",
        "no_nonlinear_derivative",
        "combined",
    ],
)
def test_every_variant_with_a_graph(torch_ar, variant: str) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    torch.manual_seed(1)
    eager, _ = grads(torch_ar, net, x, eta=0.1, steps=10, evaluation="literal", variant=variant)
    torch.manual_seed(1)
    graphed, stats = grads(torch_ar, net, x, eta=0.1, steps=10, cuda_graph=True, variant=variant)
    assert stats.graph_steps == 9
    for g, e in zip(graphed, eager):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * e.abs().max().item())


@needs_cuda
def test_trace_cosine_with_a_graph(torch_ar) -> None:
    """One recorded step replayed per step, the cosines read between replays."""
    torch.manual_seed(0)
    net = cnn().cuda()
    x = torch.randn(8, 3, 16, 16, device="cuda")
    _, eager = grads(torch_ar, net, x, eta=0.2, steps=30, evaluation="literal", trace_cosine=True)
    _, stats = grads(torch_ar, net, x, eta=0.2, steps=30, cuda_graph=True, trace_cosine=True)
    assert stats.graph_steps == 29
    assert set(stats.cosine_trace) == set(eager.cosine_trace)
    for name, curve in stats.cosine_trace.items():
        assert len(curve) == 30
        torch.testing.assert_close(curve, eager.cosine_trace[name], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------
# 6. A model split over two GPUs
# --------------------------------------------------------------------------


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh())
        self.second = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.second(self.first(x).to(self.second[0].weight.device))


@needs_cuda(devices=2)
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"eta": 0.3, "steps": 20},
        {"eta": 0.3, "steps": 20, "evaluation": "literal"},
        {"eta": 0.3, "steps": 20, "cuda_graph": True},
    ],
    ids=["exact", "closed_form", "literal", "graph"],
)
def test_model_split_over_two_gpus(torch_ar, settings) -> None:
    torch.manual_seed(0)
    net = TwoStage().double()
    net.first.to("cuda:0")
    net.second.to("cuda:1")
    x = torch.randn(8, 16, dtype=torch.float64, device="cuda:0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cuda_graph: one device per graph
        got, _ = grads(torch_ar, net, x, **settings)
    one = TwoStage().double().cuda()
    one.load_state_dict(net.state_dict())
    want, _ = grads(torch_ar, one, x, **settings)
    for g, e in zip(got, want):
        assert rel_err(g.cpu(), e.cpu()) <= 1e-10


# --------------------------------------------------------------------------
# 7. The graph pool, given back on request
# --------------------------------------------------------------------------


def test_release_without_graphs_releases_nothing(torch_ar) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine may hold graph pools; the CUDA case is tested below")
    assert torch_ar.release_cuda_graph_memory() == 0


@needs_cuda
def test_release_cuda_graph_memory(torch_ar) -> None:
    torch.manual_seed(0)
    net = cnn().cuda()
    for _ in range(3):
        grads(
            torch_ar,
            net,
            torch.randn(64, 3, 16, 16, device="cuda"),
            eta=0.1,
            steps=10,
            cuda_graph=True,
        )
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    assert torch_ar.release_cuda_graph_memory() >= 1
    assert torch.cuda.memory_reserved() < held
    assert torch_ar.release_cuda_graph_memory() == 0  # nothing left to give back
    # The next graphed backward makes a new pool and records as before.
    _, stats = grads(
        torch_ar, net, torch.randn(64, 3, 16, 16, device="cuda"), eta=0.1, steps=10, cuda_graph=True
    )
    assert stats.graph_steps == 9


# --------------------------------------------------------------------------
# 8. The closed form off the CPU behaves as on it
# --------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_closed_form_divergence_names_its_stage(torch_ar, device) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(8)]).double().to(device)
    with torch.no_grad():
        for m in net:
            m.weight.mul_(10)  # each J application grows the states ~10x
    x = torch.randn(4, 16, dtype=torch.float64, device=device)
    ar = torch_ar.ARBackward(net, eta=0.5, steps=40)
    with pytest.raises(torch_ar.RelaxationDivergedError, match=r"stage \d+ of \d+") as err:
        (ar(x).sum() * 1e306).backward()
    stage = int(str(err.value).split("stage ")[1].split(" ")[0])
    assert stage > 0  # found where it happened, not after the whole sweep


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_closed_form_residual_of_huge_finite_states(torch_ar, device) -> None:
    """float64 states beyond 1e154: the sums of squares overflow, the residual
    is rescaled instead of reported as unknown."""
    torch.manual_seed(0)
    net = (
        nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        .double()
        .to(device)
    )
    x = torch.randn(4, 8, dtype=torch.float64, device=device)
    # Zero initial states: the relaxation is then linear in the loss gradient,
    # and the relative residual the same at every scale.
    ar = torch_ar.ARBackward(net, eta=0.5, steps=6, init="zero")
    (ar(x).sum() * 1e200).backward()
    stats = ar.last_stats
    assert stats.evaluation == "closed_form"
    assert not stats.nonfinite
    assert 0 < stats.max_residual < 1  # measured, finite, and not NaN
    small = torch_ar.ARBackward(net, eta=0.5, steps=6, init="zero")
    net.zero_grad()
    small(x).sum().backward()
    assert stats.max_residual == pytest.approx(small.last_stats.max_residual, rel=1e-9)


ASYNC_ALLOCATOR_SCRIPT = """
import warnings
import torch
from torch import nn
import torch_ar

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).cuda()
x = torch.randn(5, 8, device="cuda")
expected = torch.autograd.grad(net(x).pow(2).sum(), list(net.parameters()))
ar = torch_ar.ARBackward(net, eta=0.5, steps=40, cuda_graph=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = torch.autograd.grad(ar(x).pow(2).sum(), list(net.parameters()))
assert any("allocator" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert ar.last_stats.graph_steps == 0
closed = torch_ar.ARBackward(net, eta=0.5, steps=40)
want = torch.autograd.grad(closed(x).pow(2).sum(), list(net.parameters()))
for g, w in zip(got, want):
    torch.testing.assert_close(g, w)
print("ok")
"""


@needs_cuda
def test_cuda_graph_with_the_async_allocator_relaxes_without_one(tmp_path) -> None:
    # Graph pools are the native allocator's: with cudaMallocAsync,
    # createOrIncrefPool raised outside the fallback to eager steps.
    import os
    import subprocess
    import sys

    script = tmp_path / "async_allocator.py"
    script.write_text(ASYNC_ALLOCATOR_SCRIPT)
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


@needs_cuda(devices=2)
@pytest.mark.parametrize("evaluation", ["literal", "closed_form"])
def test_model_split_over_two_gpus_does_not_sync_every_step(torch_ar, evaluation) -> None:
    """The row indices of each device group are built once per call site: the
    host synchronises a bounded number of times, not once per group and step
    (a blocking host-to-device copy of the indices at every update before)."""
    torch.manual_seed(0)
    net = TwoStage().double()
    net.first.to("cuda:0")
    net.second.to("cuda:1")
    x = torch.randn(8, 16, dtype=torch.float64, device="cuda:0")
    syncs = {}
    for steps in (20, 200):
        ar = torch_ar.ARBackward(
            net, eta=0.3, steps=steps, evaluation=evaluation, check_every=10_000
        )
        loss = ar(x).square().sum()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs[steps] = sum("synchroniz" in str(w.message) for w in caught)
    # Ten times the steps, the same synchronisations (the final read-back).
    assert syncs[200] <= syncs[20] + 2, syncs

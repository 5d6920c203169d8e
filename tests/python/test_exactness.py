"""At eta = 1 with the default number of steps, AR gradients equal autograd's.

float64: relative error <= 1e-10 per parameter; float32: cosine >= 0.99999.
Every model runs through ``ar_vs_autograd``: the same batch, the same forward
seed, autograd on a deep copy of the module.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    CASES,
    CORE_CASES,
    Outer,
    SharedWeight,
    TwoOutputs,
    ar_vs_autograd,
    assert_grads_match,
    assert_outputs_equal,
    make_batch,
    make_model,
    paper_mlp,
    rel_err,
    seeded_forward,
)


@pytest.mark.parametrize("case_name", list(CASES))
def test_exact_gradients_match_autograd(case_name, device, dtype):
    case = CASES[case_name]
    cmp = ar_vs_autograd(case, device, dtype)
    assert_outputs_equal(cmp.ar_out, cmp.ref_out)
    assert_grads_match(cmp.pairs, dtype)
    stats = cmp.ar.last_stats
    assert stats is not None
    assert stats.converged


EXACT_VARIANTS = [
    pytest.param({"schedule": "sweep"}, id="sweep"),
    pytest.param({"granularity": "op"}, id="op"),
    pytest.param({"init": "zero"}, id="zero_init"),
    pytest.param({"trace": True}, id="literal_steps_traced"),
]


@pytest.mark.parametrize("case_name", CORE_CASES)
@pytest.mark.parametrize("ar_kwargs", EXACT_VARIANTS)
def test_exact_variants_match_autograd(case_name, ar_kwargs, device, dtype):
    cmp = ar_vs_autograd(CASES[case_name], device, dtype, ar_kwargs)
    assert_grads_match(cmp.pairs, dtype)


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({"granularity": "op"}, id="op"),
        pytest.param({"granularity": "op", "schedule": "sweep"}, id="op_sweep"),
        pytest.param({"init": "zero", "trace": True}, id="literal_steps_zero_init"),
    ],
)
def test_resnet18_variants_match_autograd(ar_kwargs, device):
    """The largest graph, per-op and with literal Jacobi steps (float64 only, to stay fast)."""
    cmp = ar_vs_autograd(CASES["resnet18_train"], device, torch.float64, ar_kwargs)
    assert_grads_match(cmp.pairs, torch.float64)


@pytest.mark.parametrize(
    "case_name", ["paper_mlp_mse", "small_cnn", "cat_residual", "batchnorm_train"]
)
def test_input_gradient_matches_autograd(case_name, device, dtype):
    cmp = ar_vs_autograd(CASES[case_name], device, dtype, input_requires_grad=True)
    assert "input[0]" in cmp.pairs, "the input that requires grad got no gradient"
    assert_grads_match(cmp.pairs, dtype)


@pytest.mark.parametrize(
    "case_name", ["paper_mlp_mse", "shared_weight", "two_outputs", "custom_function"]
)
def test_autograd_grad_path_matches(case_name, device, dtype):
    """``torch.autograd.grad(loss, params)`` must give AR gradients, not nothing."""
    cmp = ar_vs_autograd(
        CASES[case_name],
        device,
        dtype,
        input_requires_grad=True,
        use_autograd_grad=True,
    )
    assert_grads_match(cmp.pairs, dtype)
    # autograd.grad must not touch .grad
    assert all(p.grad is None for p in cmp.ar.parameters())


def _nested_pair(device, dtype, torch_ar):
    torch.manual_seed(0)
    plain = Outer(
        nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    ).to(device=device, dtype=dtype)
    wrapped = copy.deepcopy(plain)
    wrapped.inner = torch_ar.ARBackward(wrapped.inner)
    return plain, wrapped


@pytest.mark.parametrize("use_autograd_grad", [False, True], ids=["backward", "autograd_grad"])
def test_nested_inside_plain_model(device, dtype, use_autograd_grad, torch_ar):
    """ARBackward as one block of a bigger autograd model: outer and inner grads right."""
    plain, wrapped = _nested_pair(device, dtype, torch_ar)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, 3, (6,), generator=gen).to(device)

    ref_loss = F.cross_entropy(plain(x), y)
    ar_loss = F.cross_entropy(wrapped(x), y)
    ref_params = dict(plain.named_parameters())
    # The wrapper registers the inner block under ``inner.module``.
    ar_params = {n.replace("inner.module.", "inner."): p for n, p in wrapped.named_parameters()}
    assert set(ar_params) == set(ref_params)
    names = sorted(ref_params)
    if use_autograd_grad:
        ref_g = torch.autograd.grad(ref_loss, [ref_params[n] for n in names])
        ar_g = torch.autograd.grad(ar_loss, [ar_params[n] for n in names])
    else:
        ref_loss.backward()
        ar_loss.backward()
        ref_g = [ref_params[n].grad for n in names]
        ar_g = [ar_params[n].grad for n in names]
    pairs = {n: (a, b) for n, a, b in zip(names, ar_g, ref_g)}
    assert any(n.startswith("pre.") for n in pairs) and any(n.startswith("inner.") for n in pairs)
    assert_grads_match(pairs, dtype)


def test_weight_used_twice_counts_both_uses(device, torch_ar):
    """The shared Linear's gradient is the sum over both applications, once."""
    cmp = ar_vs_autograd(CASES["shared_weight"], device, torch.float64)
    a, b = cmp.pairs["shared.weight"]
    assert rel_err(a, b) <= 1e-10
    # Neither half nor double of the right answer.
    assert rel_err(a, 2 * b) > 0.1 and rel_err(2 * a, b) > 0.1


def test_two_outputs_one_computed_from_other(device, dtype):
    """The first output is both a loss term and a producer of the second."""
    cmp = ar_vs_autograd(CASES["two_outputs"], device, dtype)
    assert isinstance(cmp.ar_out, tuple) and len(cmp.ar_out) == 2
    assert_grads_match(cmp.pairs, dtype)


@pytest.mark.parametrize("repeats", [0, 1, 4])
def test_python_control_flow_from_argument(repeats, device, dtype, torch_ar):
    """The loop count comes from a keyword argument; each call captures its own graph."""
    case = CASES["control_flow"]
    model = make_model(case, device, dtype)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    (x,), _, y = make_batch(case, device, dtype)
    F.cross_entropy(ar(x, repeats=repeats), y).backward()
    F.cross_entropy(ref(x, repeats=repeats), y).backward()
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    if repeats == 0:
        # The loop body never ran: like autograd, no gradient for ``step``.
        assert model.step.weight.grad is None and ref.step.weight.grad is None
        pairs = {n: v for n, v in pairs.items() if not n.startswith("step.")}
    assert_grads_match(pairs, dtype)


def test_dropout_masks_follow_the_seed(device, dtype):
    """Same seed -> same masks -> same gradients; the dropout case really drops."""
    case = CASES["dropout_seeded"]
    cmp = ar_vs_autograd(case, device, dtype)
    assert_grads_match(cmp.pairs, dtype)
    model = make_model(case, device, dtype)
    (x,), kwargs, _ = make_batch(case, device, dtype)
    a = seeded_forward(model, (x,), kwargs)
    model.eval()
    b = model(x)
    assert not torch.allclose(a, b), "dropout had no effect: the test would prove nothing"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batchnorm_running_stats_updated_like_autograd(train, device, torch_ar):
    """The wrapper runs the module's forward once: running stats move exactly as without it."""
    case = CASES["batchnorm_train"]
    model = make_model(case, device, torch.float64)
    ref = copy.deepcopy(model)
    model.train(train)
    ref.train(train)
    ar = torch_ar.ARBackward(model)
    (x,), _, y = make_batch(case, device, torch.float64)
    F.cross_entropy(ar(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (name, buf), ref_buf in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(buf, ref_buf), f"buffer {name} differs"
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    assert_grads_match(pairs, torch.float64)


def test_module_and_parameters_are_the_wrapped_ones(torch_ar):
    model = paper_mlp()
    ar = torch_ar.ARBackward(model)
    assert isinstance(ar, nn.Module)
    assert ar.module is model
    assert [id(p) for p in ar.parameters()] == [id(p) for p in model.parameters()]


def test_output_computed_from_other_output_only(device, torch_ar):
    """Loss on the second output only: the first output's state is a relaxing one."""
    model = TwoOutputs().to(device=device, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    x = torch.randn(5, 10, dtype=torch.float64, device=device)
    ar(x)[1].pow(2).sum().backward()
    ref(x)[1].pow(2).sum().backward()
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    assert_grads_match(pairs, torch.float64)


def test_shared_weight_module_reused_across_calls(device, torch_ar):
    """Two forward calls before one backward: each graph relaxes on its own."""
    model = SharedWeight().to(device=device, dtype=torch.float64)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    x1 = torch.randn(4, 10, dtype=torch.float64, device=device)
    x2 = torch.randn(3, 10, dtype=torch.float64, device=device)
    (ar(x1).square().mean() + ar(x2).tanh().sum()).backward()
    (ref(x1).square().mean() + ref(x2).tanh().sum()).backward()
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    assert_grads_match(pairs, torch.float64)


class SharedWithOuter(nn.Module):
    """One Linear used inside the ARBackward block and again outside it."""

    def __init__(self, wrap) -> None:
        super().__init__()
        self.shared = nn.Linear(8, 8)
        inner = nn.Sequential(self.shared, nn.Tanh(), nn.Linear(8, 8))
        self.block = wrap(inner)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.shared(self.block(x))))


def test_weight_shared_between_block_and_outer_model(device, dtype, torch_ar):
    """Both uses are summed exactly once: the AR part and the autograd part."""
    torch.manual_seed(0)
    plain = SharedWithOuter(lambda m: m).to(device=device, dtype=dtype)
    torch.manual_seed(0)
    wrapped = SharedWithOuter(torch_ar.ARBackward).to(device=device, dtype=dtype)
    x = torch.randn(5, 8, device=device, dtype=dtype)
    plain(x).square().mean().backward()
    wrapped(x).square().mean().backward()
    ref = dict(plain.named_parameters())
    pairs = {
        n: (p.grad, ref[n.replace("block.module.", "block.")].grad)
        for n, p in wrapped.named_parameters()
    }
    assert_grads_match(pairs, dtype)


def test_parameter_hooks_see_ar_gradients(device, torch_ar):
    model = make_model(CASES["cat_residual"], device, torch.float64)
    ref = copy.deepcopy(model)
    seen = {}
    for n, p in model.named_parameters():
        p.register_hook(lambda g, n=n: seen.__setitem__(n, g.clone()))
    (x,), _, y = make_batch(CASES["cat_residual"], device, torch.float64)
    F.cross_entropy(torch_ar.ARBackward(model)(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    assert set(seen) == {n for n, _ in model.named_parameters()}
    pairs = {n: (seen[n], q.grad) for n, q in ref.named_parameters()}
    assert_grads_match(pairs, torch.float64)


class ReturnsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(x)), x


def test_output_that_is_an_input(device, dtype, torch_ar):
    """An input returned unchanged still routes its gradient to the input."""
    model = ReturnsInput().to(device=device, dtype=dtype)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    base = torch.randn(6, 4, device=device, dtype=dtype)
    grads = []
    for module in (ar, ref):
        x = base.t().detach().requires_grad_(True)  # non-contiguous input
        y, same = module(x)
        (y.square().sum() + (3.0 * same).sum()).backward()
        grads.append(x.grad)
    pairs = {"input": (grads[0], grads[1])}
    pairs.update(
        {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    )
    assert_grads_match(pairs, dtype)


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_training_at_eta_1_is_backprop_bit_for_bit(torch_ar, granularity):
    """What the README's ResNet-20 and CNN rows rest on: 40 SGD steps (momentum,
    weight decay) of a CNN with BatchNorm, pooling and a residual add, with
    backprop and with AR at eta 1, give identical losses at every step and
    identical weights and BatchNorm buffers at the end (float32, CPU)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(F.relu(h + self.branch(h)))

    torch.manual_seed(0)
    plain = Net()
    wrapped = torch_ar.ARBackward(copy.deepcopy(plain), granularity=granularity)
    losses = {}
    for name, model in (("backprop", plain), ("ar", wrapped)):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(1)
        losses[name] = []
        for _ in range(40):
            x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[name].append(loss.detach())
    assert wrapped.last_stats.relaxing_states > 0
    for step, (a, b) in enumerate(zip(losses["backprop"], losses["ar"])):
        assert torch.equal(a, b), f"loss differs at step {step}: {a.item()} vs {b.item()}"
    for (name, a), (_, b) in zip(plain.state_dict().items(), wrapped.module.state_dict().items()):
        assert torch.equal(a, b), name

"""Bad arguments, misuse and numerical failure raise clear errors.

Argument errors are ValueErrors raised by the constructor and name the
argument. Graph misuse (second backward, in-place modification, nothing to
differentiate) fails the way autograd fails. A relaxation that produces NaN
raises ``torch_ar.RelaxationDivergedError`` naming the node and the step, and
leaves the wrapper usable.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from zoo import (
    CASES,
    NaNGrad,
    NaNGradNet,
    assert_grads_match,
    load_torch_ar,
    make_batch,
    make_model,
    paper_mlp,
)

# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": -0.1}, "eta"),
        ({"eta": 1.5}, "eta"),
        ({"eta": math.nan}, "eta"),
        ({"eta": math.inf}, "eta"),
        ({"eta": 1.5, "schedule": "sweep"}, "eta"),
        ({"eta": 0.0, "schedule": "sweep", "steps": 10}, "eta"),
        ({"steps": 0}, "steps"),
        ({"steps": -3}, "steps"),
        ({"eta": 0.5, "steps": 0}, "steps"),
        ({"eta": 0.5, "tol": 0.0}, "tol"),
        ({"eta": 0.5, "tol": -1e-3}, "tol"),
        ({"tol": 0.0}, "tol"),
        ({"init": "ones"}, "init"),
        ({"init": "Forward "}, "init"),
        ({"schedule": "gauss"}, "schedule"),
        ({"granularity": "neuron"}, "granularity"),
        ({"eta": 0.5, "tol": 1e-6, "max_steps": 0}, "max_steps"),
    ],
)
def test_invalid_argument_raises_value_error(kwargs, argument, torch_ar):
    with pytest.raises(ValueError, match=argument):
        torch_ar.ARBackward(paper_mlp(), **kwargs)


@pytest.mark.parametrize("schedule", ["jacobi", "sweep"])
def test_eta_below_one_needs_steps_or_tol(schedule, torch_ar):
    with pytest.raises(ValueError, match=r"steps|tol"):
        torch_ar.ARBackward(paper_mlp(), eta=0.1, schedule=schedule)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"eta": 1.0},
        {"eta": 0.1, "steps": 1},
        {"eta": 0.5, "tol": 1e-6},
        {"eta": 1.0, "schedule": "sweep", "init": "zero", "granularity": "op"},
        {
            "eta": 0.3,
            "steps": 5,
            "tol": 1e-6,
            "trace": True,
            "trace_cosine": True,
            "max_steps": 5,
        },
    ],
)
def test_valid_arguments_are_accepted(kwargs, torch_ar):
    torch_ar.ARBackward(paper_mlp(), **kwargs)


# --------------------------------------------------------------------------
# Graph misuse: as autograd
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ar_kwargs", [{}, {"eta": 0.5, "steps": 10}], ids=["exact", "eta0.5"])
def test_second_backward_without_retain_graph(ar_kwargs, device, torch_ar):
    case = CASES["paper_mlp_mse"]
    ar = torch_ar.ARBackward(make_model(case, device, torch.float32), **ar_kwargs)
    (x,), _, target = make_batch(case, device, torch.float32)
    loss = case.loss(ar(x), target)
    loss.backward()
    with pytest.raises(RuntimeError, match=r"retain_graph|second time"):
        loss.backward()


def test_inplace_change_of_saved_weight_is_detected(device, torch_ar):
    """Autograd refuses to differentiate with a weight changed after the forward; so must AR."""
    case = CASES["paper_mlp_mse"]
    model = make_model(case, device, torch.float32)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    (x,), _, target = make_batch(case, device, torch.float32)
    ref_loss = case.loss(ref(x), target)
    ar_loss = case.loss(ar(x), target)
    with torch.no_grad():
        ref[2].weight.add_(1.0)
        model[2].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ref_loss.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        ar_loss.backward()


def test_no_differentiable_path_fails_like_autograd(device, torch_ar):
    """All parameters frozen and an input without grad: the loss has no grad_fn."""
    case = CASES["paper_mlp_mse"]
    model = make_model(case, device, torch.float32).requires_grad_(False)
    ar = torch_ar.ARBackward(model)
    (x,), _, target = make_batch(case, device, torch.float32)
    out = ar(x)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError, match="does not require grad"):
        case.loss(out, target).backward()


class DetachedSecondOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), (2.0 * x[:, :4]).detach()


def test_output_without_differentiable_path(device, torch_ar):
    ar = torch_ar.ARBackward(DetachedSecondOutput().to(device))
    x = torch.randn(3, 6, device=device)
    y1, y2 = ar(x)
    assert y1.requires_grad and not y2.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        y2.sum().backward()
    y1.sum().backward()
    assert ar.module.lin.weight.grad is not None


class IgnoresSecondInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


def test_unused_input_like_autograd(device, torch_ar):
    """An input that requires grad but is not used: autograd.grad errors, allow_unused gives None."""
    model = IgnoresSecondInput().to(device)
    ar = torch_ar.ARBackward(copy.deepcopy(model))
    for module in (model, ar):
        x = torch.randn(4, 5, device=device, requires_grad=True)
        z = torch.randn(4, 5, device=device, requires_grad=True)
        loss = module(x, z).sum()
        with pytest.raises(RuntimeError, match="not have been used in the graph"):
            torch.autograd.grad(loss, [x, z], retain_graph=True)
        gx, gz = torch.autograd.grad(loss, [x, z], allow_unused=True)
        assert gx is not None and gz is None, f"{type(module).__name__}: unused input must get None"


# --------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------


def test_compiled_module_is_refused(torch_ar):
    compiled = torch.compile(paper_mlp(), backend="aot_eager")
    x = torch.rand(2, 784)
    with pytest.raises(Exception, match=r"torch\.compile"):
        ar = torch_ar.ARBackward(compiled)
        ar(x).sum().backward()


class CompiledInside(nn.Module):
    """A compiled region inside an ordinary module: one opaque backward node."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.block = torch.compile(lambda h: torch.tanh(h) * h, backend="aot_eager")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.lin(x)))


def test_compiled_region_inside_module_is_refused(torch_ar):
    ar = torch_ar.ARBackward(CompiledInside())
    x = torch.randn(3, 6)
    with pytest.raises(torch_ar.UnsupportedGraphError, match=r"torch\.compile") as info:
        ar(x).sum().backward()
    assert "CompiledFunction" in info.value.node


COMPILE_SETTINGS = [
    pytest.param({}, id="exact"),
    pytest.param({"eta": 0.5, "tol": 1e-9}, id="literal_steps"),
    pytest.param({"eta": 0.5, "steps": 40}, id="closed_form"),
    pytest.param({"variant": "feedback_alignment"}, id="feedback_alignment"),
    pytest.param({"variant": "sign_symmetry"}, id="sign_symmetry"),
]


@pytest.mark.parametrize("settings", COMPILE_SETTINGS)
def test_compiling_the_wrapper_is_refused_at_once(torch_ar, settings):
    """torch.compile(ar) and ar.compile() raise before dynamo traces anything
    (they used to compile for 18-30 s and then fail, or run, by variant)."""
    ar = torch_ar.ARBackward(paper_mlp(), **settings)
    with pytest.raises(TypeError, match=r"ARBackward cannot be compiled with torch\.compile"):
        torch.compile(ar, backend="aot_eager")
    with pytest.raises(TypeError, match=r"ARBackward cannot be compiled with torch\.compile"):
        ar.compile(backend="aot_eager")
    with pytest.raises(TypeError, match=r"ARBackward cannot be compiled"):
        torch.compile(nn.Sequential(nn.Identity(), ar), backend="aot_eager")._orig_mod[1].compile()


def test_importing_torch_ar_does_not_load_dynamo():
    """Keeping the wrapper out of dynamo's traces must not cost every user the
    import of dynamo (0.75 s here): it is made when torch.compile is used."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    probe = "import sys, torch, torch_ar\nassert 'torch._dynamo' not in sys.modules\n"
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _wrapped_with_a_head(torch_ar, settings: dict) -> tuple[nn.Module, nn.Module]:
    """(a model with an ARBackward block then a plain head, the same model with
    the block unwrapped), equal weights, float64."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).double()
    head = nn.Sequential(nn.ReLU(), nn.Linear(5, 3)).double()
    wrapped = nn.Sequential(torch_ar.ARBackward(body, **settings), head)
    plain_wrapped = copy.deepcopy(wrapped)
    return wrapped, plain_wrapped


@pytest.mark.parametrize("settings", COMPILE_SETTINGS)
@pytest.mark.parametrize("how", ["compiled_module", "compiled_function"])
def test_wrapper_inside_compiled_code_runs_eagerly(torch_ar, settings, how):
    """A compiled module or function that contains the wrapper compiles the
    code around it; the wrapper runs eagerly and its gradients are those of
    the same model uncompiled (the engine sees the module's own ops)."""
    model, reference = _wrapped_with_a_head(torch_ar, settings)
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    if how == "compiled_module":
        run = torch.compile(model, backend="aot_eager")
    else:
        run = torch.compile(lambda t: model(t), backend="aot_eager")
    run(x).square().sum().backward()
    reference(x).square().sum().backward()
    assert model[0].last_stats is not None, "the wrapper did not run its relaxation"
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)


# --------------------------------------------------------------------------
# Divergence
# --------------------------------------------------------------------------


def _diverged_message(torch_ar, ar_kwargs, device):
    ar = torch_ar.ARBackward(NaNGradNet().to(device), **ar_kwargs)
    x = torch.randn(4, 6, device=device)
    loss = ar(x).square().mean()
    with pytest.raises(torch_ar.RelaxationDivergedError) as info:
        loss.backward()
    return ar, str(info.value)


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({}, id="exact_default"),
        pytest.param({"eta": 0.5, "steps": 10}, id="eta0.5_steps"),
        pytest.param({"eta": 0.5, "tol": 1e-6}, id="eta0.5_tol"),
        pytest.param({"schedule": "sweep"}, id="sweep_eta1"),
        pytest.param({"trace": True}, id="exact_traced"),
    ],
)
def test_nan_during_relaxation_raises_diverged_error(ar_kwargs, device, torch_ar):
    assert issubclass(torch_ar.RelaxationDivergedError, RuntimeError)
    ar, message = _diverged_message(torch_ar, ar_kwargs, device)
    assert "step" in message.lower(), f"the message must give the step: {message!r}"
    assert any(ch.isdigit() for ch in message), (
        f"the message must give the step number: {message!r}"
    )
    assert "NaNGrad" in message or "node" in message.lower() or "state" in message.lower(), (
        f"the message must name the node: {message!r}"
    )
    # Nothing half-done is written into .grad.
    assert all(p.grad is None for p in ar.parameters())


class SwitchableNaN(nn.Module):
    """NaNGradNet with the NaN switchable: from the second block's backward
    into the first block's state."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.poison = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.mid(torch.relu(self.inp(x))))
        if self.poison:
            h = NaNGrad.apply(h)
        return self.out(h)


def test_wrapper_usable_after_divergence(device, torch_ar):
    model = SwitchableNaN().to(device=device, dtype=torch.float64)
    ar = torch_ar.ARBackward(model, eta=0.5, steps=60)
    x = torch.randn(5, 6, device=device, dtype=torch.float64)
    with pytest.raises(torch_ar.RelaxationDivergedError):
        ar(x).square().mean().backward()
    model.poison = False
    ref = copy.deepcopy(model)
    ar(x).square().mean().backward()
    ref(x).square().mean().backward()
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    # eta 0.5 for 60 steps on a depth-2 graph: converged far below 1e-10.
    assert_grads_match(pairs, torch.float64)


def test_nan_loss_gradient_is_never_silently_finite(device, torch_ar):
    """A NaN loss gradient clamped at the output: NaN grads (as autograd) or the diverged
    error, never a finite gradient. A single Linear also has no relaxing state at all."""
    model = nn.Linear(4, 2).to(device)
    ar = torch_ar.ARBackward(copy.deepcopy(model))
    x = torch.randn(3, 4, device=device)
    try:
        (ar(x).sum() * math.nan).backward()
    except torch_ar.RelaxationDivergedError:
        return
    assert torch.isnan(ar.module.weight.grad).all()


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="exact_sweep"),
        pytest.param({"eta": 0.5, "steps": 20}, id="closed_form"),
        pytest.param({"eta": 0.5, "steps": 20, "evaluation": "literal"}, id="literal"),
    ],
)
def test_a_nan_target_is_named_as_the_loss_gradients_not_the_relaxations(settings):
    # Before, the closed form advised "or use a smaller eta" for a NaN target.
    torch_ar = load_torch_ar()
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    ar = torch_ar.ARBackward(net, **settings)
    target = torch.tensor([[0.0, float("nan")]] * 3)
    with pytest.raises(torch_ar.RelaxationDivergedError, match="loss gradient") as caught:
        torch.nn.functional.mse_loss(ar(torch.randn(3, 4)), target).backward()
    assert "smaller eta" not in str(caught.value)
    assert caught.value.node == "output 0"


NONFINITE_SOURCES = ["input", "parameter", "backward_weight", "forward_overflow", "target"]


@pytest.mark.parametrize("source", NONFINITE_SOURCES)
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="exact_sweep"),
        pytest.param({"eta": 0.5, "steps": 20}, id="closed_form"),
        pytest.param({"eta": 0.5, "tol": 1e-8}, id="literal"),
    ],
)
def test_nonfinite_values_from_outside_are_named_for_what_they_are(settings, source):
    """A NaN/Inf input, parameter, psi, forward overflow or target is reported
    as that tensor, by the engine's node name, and not as a divergence of the
    relaxation (at eta 1 a NaN input read "relaxation diverged at step 2" and
    the closed form advised a smaller eta)."""
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    variant = {"variant": "feedback_alignment"} if source == "backward_weight" else {}
    ar = torch_ar.ARBackward(net, **settings, **variant)
    x, target = torch.randn(3, 4), torch.zeros(3, 2)
    expected = {
        "input": "input 0",
        "parameter": "2.weight",
        "backward_weight": "2.weight",
        "forward_overflow": "output 0",
        "target": "output 0",
    }[source]
    with torch.no_grad():
        if source == "input":
            x[1, 2] = math.nan
        elif source == "parameter":
            net[2].weight[0, 0] = math.inf
        elif source == "backward_weight":
            ar.backward_weights()["2.weight"][0, 0] = math.nan
        elif source == "forward_overflow":
            # finite parameters whose output overflows float32
            net[4].weight.fill_(3e38)
            net[4].bias.fill_(3e38)
        else:
            target[0, 1] = math.nan
    with pytest.raises(torch_ar.NonFiniteValueError, match="from outside it") as caught:
        torch.nn.functional.mse_loss(ar(x), target).backward()
    err = caught.value
    assert isinstance(err, torch_ar.RelaxationDivergedError), "catching the base still works"
    assert err.node == expected and err.culprits[0] == expected, err.culprits
    assert err.step == 0
    message = str(err)
    assert "smaller eta" not in message and "diverged at" not in message
    assert all(p.grad is None for p in net.parameters()), "half-done gradients written"

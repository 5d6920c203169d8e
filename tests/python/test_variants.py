"""The paper's variants (learned backward weights, feedback alignment, no f', combined).

Each variant changes some VJPs, and so the fixed point of the relaxation. The
oracle here is written independently of the engine: one reverse sweep of
autograd through small custom ``autograd.Function`` s that apply the variant's
VJPs, layer by layer:

- a weight layer (``nn.Linear``/``nn.Conv2d``) fused with the activation that
  follows it receives the state ``g`` at the activation's output. It
  propagates ``delta_prop = g`` (f' dropped) or ``f'(a) * g`` through psi (the
  backward weight) or W, and computes its weight gradient from
  ``delta_weight = f'(a) * g`` unless ``weight_update_derivative=False``
  drops f' there too;
- an activation that follows a structural op (the ReLU after a residual add)
  passes ``g`` through when f' is dropped: for everything downstream, weight
  updates included;
- pooling, flatten and adds are autograd's own.

At eta = 1 the engine's default single sweep must equal the oracle to a
relative error of 1e-10 in float64 (2e-5 in float32); with eta < 1
the literal steps must converge to it.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn
from zoo import F32_MAX_REL_ERR, F64_MAX_REL_ERR, cosine, f32_errors, load_torch_ar, rel_err

ALL_VARIANTS = [
    "exact",
    "learned_backward_weights",
    "feedback_alignment",
    "no_nonlinear_derivative",
    "combined",
]


@dataclass(frozen=True)
class Rule:
    """The VJP changes one variant makes, written down here independently of the engine."""

    backward_weights: bool
    drop_derivative: bool
    weight_update_derivative: bool = True


RULES = {
    "exact": Rule(False, False),
    "learned_backward_weights": Rule(True, False),
    "feedback_alignment": Rule(True, False),
    "no_nonlinear_derivative": Rule(False, True),
    "combined": Rule(True, True),
}

# (variant, weight_update_derivative): the flag only matters where f' is dropped.
VARIANT_CONFIGS = [pytest.param(v, True, id=v) for v in ALL_VARIANTS] + [
    pytest.param(v, False, id=f"{v}-no_wud") for v in ("no_nonlinear_derivative", "combined")
]


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """relu(conv_b(relu(conv_a(h))) + skip(h)), skip the identity or a 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.conv_b = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if cin != cout or stride != 1
            else None
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.conv_b(torch.relu(self.conv_a(h)))
        return torch.relu(y + (h if self.skip is None else self.skip(h)))


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 10),
        nn.Sigmoid(),
        nn.Linear(10, 5),
    )


def cnn() -> nn.Sequential:
    # The strided conv makes the transposed convolution need an output padding.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 10),
        nn.ReLU(),
        nn.Linear(10, 5),
    )


def residual_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        ResidualBlock(4, 4),
        nn.MaxPool2d(2),
        ResidualBlock(4, 6, stride=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    )


NETS = {
    "mlp": (mlp, (8, 12)),
    "cnn": (cnn, (4, 3, 8, 8)),
    "residual_cnn": (residual_cnn, (4, 3, 8, 8)),
}


def make_problem(net: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A network and a cross-entropy batch for it."""
    build, shape = NETS[net]
    torch.manual_seed(seed)
    model = build().to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)
    y = torch.randint(0, 5, (shape[0],), generator=gen).to(device)
    return model, x, y


# --------------------------------------------------------------------------
# The oracle: one reverse sweep with the variant's VJPs
# --------------------------------------------------------------------------

ACTIVATIONS = {
    nn.ReLU: (torch.relu, lambda a: (a > 0).to(a.dtype)),
    nn.Tanh: (torch.tanh, lambda a: 1 - torch.tanh(a) ** 2),
    nn.Sigmoid: (torch.sigmoid, lambda a: torch.sigmoid(a) * (1 - torch.sigmoid(a))),
}


def _input_vjp(
    layer: nn.Module,
    delta: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    psi: torch.Tensor | None,
):
    """The layer's input-VJP through psi when given (linear psi is [in, out]), else W."""
    if isinstance(layer, nn.Linear):
        return delta @ weight if psi is None else delta @ psi.t()
    back = weight if psi is None else psi
    return torch.nn.grad.conv2d_input(
        h.shape, back, delta, layer.stride, layer.padding, layer.dilation, layer.groups
    )


def _weight_vjp(layer: nn.Module, delta: torch.Tensor, h: torch.Tensor, w: torch.Tensor):
    if isinstance(layer, nn.Linear):
        return delta.t() @ h, delta.sum(0)
    grad_w = torch.nn.grad.conv2d_weight(
        h, w.shape, delta, layer.stride, layer.padding, layer.dilation, layer.groups
    )
    return grad_w, delta.sum((0, 2, 3))


class OracleWeightLayer(torch.autograd.Function):
    """act(layer(h)) whose backward applies the variant's rule (see the module docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, layer, psi, act, rule):
        if isinstance(layer, nn.Linear):
            a = F.linear(h, weight, bias)
        else:
            a = F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
        ctx.save_for_backward(h, weight, a)
        ctx.layer, ctx.psi, ctx.act, ctx.rule = layer, psi, act, rule
        ctx.has_bias = bias is not None
        return a if act is None else ACTIVATIONS[type(act)][0](a)

    @staticmethod
    def backward(ctx, g):
        h, weight, a = ctx.saved_tensors
        rule = ctx.rule
        fprime = torch.ones_like(a) if ctx.act is None else ACTIVATIONS[type(ctx.act)][1](a)
        delta_exact = fprime * g
        delta_prop = g if rule.drop_derivative else delta_exact
        keep_f = rule.weight_update_derivative or not rule.drop_derivative
        delta_weight = delta_exact if keep_f else g
        psi = ctx.psi if rule.backward_weights else None
        grad_h = _input_vjp(ctx.layer, delta_prop, h, weight, psi)
        grad_w, grad_b = _weight_vjp(ctx.layer, delta_weight, h, weight)
        return grad_h, grad_w, grad_b if ctx.has_bias else None, None, None, None, None


class OracleActivation(torch.autograd.Function):
    """A standalone activation: f' applied, or the state passed through."""

    @staticmethod
    def forward(ctx, a, act, rule):
        ctx.save_for_backward(a)
        ctx.act, ctx.rule = act, rule
        return ACTIVATIONS[type(act)][0](a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        if ctx.rule.drop_derivative:
            return g, None, None
        return ACTIVATIONS[type(ctx.act)][1](a) * g, None, None


class Oracle:
    """Runs a network of this file with the variant's VJPs on copies of its parameters."""

    def __init__(self, model: nn.Module, psis: dict[str, torch.Tensor], rule: Rule) -> None:
        self.model = copy.deepcopy(model)
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.rule = rule
        self.psi = {}
        for m in self.model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                name = names[id(m.weight)]
                self.psi[id(m)] = psis[name].detach() if name in psis else None

    def weight_layer(self, layer: nn.Module, h: torch.Tensor, act: nn.Module | None):
        return OracleWeightLayer.apply(
            h, layer.weight, layer.bias, layer, self.psi[id(layer)], act, self.rule
        )

    def run(self, layers, h: torch.Tensor) -> torch.Tensor:
        layers = list(layers)
        i = 0
        while i < len(layers):
            m = layers[i]
            nxt = layers[i + 1] if i + 1 < len(layers) else None
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                act = nxt if type(nxt) in ACTIVATIONS else None
                h = self.weight_layer(m, h, act)
                i += 1 if act is None else 2
                continue
            if type(m) in ACTIVATIONS:
                h = OracleActivation.apply(h, m, self.rule)
            elif isinstance(m, ResidualBlock):
                y = self.weight_layer(m.conv_a, h, nn.ReLU())
                y = self.weight_layer(m.conv_b, y, None)
                s = h if m.skip is None else self.weight_layer(m.skip, h, None)
                h = OracleActivation.apply(y + s, nn.ReLU(), self.rule)
            else:
                h = m(h)  # pooling, flatten: their true VJPs
            i += 1
        return h

    def gradients(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        F.cross_entropy(self.run(self.model, x), y).backward()
        return {n: p.grad for n, p in self.model.named_parameters()}


def ar_and_oracle(net, variant, wud, device, dtype, **ar_kwargs):
    """Gradients of one batch by ARBackward(variant) and by the variant's oracle."""
    torch_ar = load_torch_ar()
    model, x, y = make_problem(net, device, dtype)
    torch.manual_seed(7)
    ar = torch_ar.ARBackward(model, variant=variant, weight_update_derivative=wud, **ar_kwargs)
    psis = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
    rule = Rule(RULES[variant].backward_weights, RULES[variant].drop_derivative, wud)
    expected = Oracle(model, psis, rule).gradients(x, y)
    F.cross_entropy(ar(x), y).backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    return ar, got, expected


def assert_close(got, expected, dtype, max_rel_err=F64_MAX_REL_ERR, what=""):
    assert set(got) == set(expected)
    missing = [k for k, g in got.items() if g is None]
    assert not missing, f"{what}no gradient for {missing}"
    if dtype == torch.float64:
        errs = {k: rel_err(got[k], expected[k]) for k in expected}
        bad = {k: e for k, e in errs.items() if not e <= max_rel_err}
        assert not bad, f"{what}relative error above {max_rel_err}: {bad}"
    else:
        errs = f32_errors({k: (got[k], expected[k]) for k in expected})
        bad = {k: e for k, e in errs.items() if not e <= F32_MAX_REL_ERR}
        assert not bad, f"{what}relative error above {F32_MAX_REL_ERR}: {bad}"


# --------------------------------------------------------------------------
# The fixed point is the oracle's
# --------------------------------------------------------------------------


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant, wud", VARIANT_CONFIGS)
def test_single_sweep_equals_oracle(net, variant, wud, device, dtype):
    ar, got, expected = ar_and_oracle(net, variant, wud, device, dtype)
    assert_close(got, expected, dtype)
    assert ar.last_stats.converged


@pytest.mark.parametrize("net", list(NETS))
def test_oracles_differ_between_variants(net):
    """The oracle tests are not vacuous: every configuration has its own fixed point."""
    model, x, y = make_problem(net, "cpu", torch.float64)
    torch.manual_seed(7)
    psis = {
        n: 0.05 * torch.randn(p.t().shape if p.dim() == 2 else p.shape, dtype=p.dtype)
        for n, p in model.named_parameters()
        if n.endswith("weight")
    }
    grads = {}
    for param in VARIANT_CONFIGS:
        variant, wud = param.values
        if variant == "feedback_alignment":
            continue  # the same rule as learned_backward_weights; only psi's update differs
        rule = Rule(RULES[variant].backward_weights, RULES[variant].drop_derivative, wud)
        grads[param.id] = Oracle(model, psis, rule).gradients(x, y)
    assert rel_err(grads["exact"]["0.weight"], _autograd_grads(model, x, y)["0.weight"]) < 1e-12
    for (a, ga), (b, gb) in itertools.combinations(grads.items(), 2):
        diff = max(rel_err(ga[k], gb[k]) for k in ga)
        assert diff > 1e-2, f"{a} and {b} have the same gradients on {net}"


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant, wud", VARIANT_CONFIGS)
def test_literal_steps_converge_to_oracle(net, variant, wud, device, dtype):
    """eta 0.5, 200 Jacobi steps from the forward values: the oracle's gradients."""
    _, got, expected = ar_and_oracle(net, variant, wud, device, dtype, eta=0.5, steps=200)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("net", ["mlp", "residual_cnn"])
@pytest.mark.parametrize("variant", ["feedback_alignment", "combined"])
def test_small_eta_converges_to_oracle(net, variant, device):
    """eta 0.1: far from the oracle after a few steps, on it after enough."""
    errors = {}
    for steps in (5, 600):
        _, got, expected = ar_and_oracle(
            net, variant, True, device, torch.float64, eta=0.1, steps=steps
        )
        errors[steps] = max(rel_err(got[k], expected[k]) for k in expected)
    assert errors[5] > 1e-2, f"5 steps at eta 0.1 should still be far off: {errors}"
    assert errors[600] <= 1e-10, errors


LAYOUTS = [
    ({"schedule": "sweep"}, True, "sweep-wud"),
    ({"schedule": "sweep"}, False, "sweep-no_wud"),
    # At op granularity only weight_update_derivative=False is allowed (below).
    ({"granularity": "op"}, False, "op-no_wud"),
    ({"granularity": "op", "eta": 0.5, "steps": 200}, False, "op_eta0.5-no_wud"),
]


@pytest.mark.parametrize("ar_kwargs, wud", [pytest.param(k, w, id=i) for k, w, i in LAYOUTS])
@pytest.mark.parametrize("variant", ["no_nonlinear_derivative", "combined"])
def test_schedule_and_granularity_reach_the_same_fixed_point(variant, wud, ar_kwargs, device):
    """The fixed point is the variant's, not the state layout's.

    At op granularity the activation's output is a state of its own, so a
    weight update cannot see f' there: that combination is refused (below).
    """
    _, got, expected = ar_and_oracle("mlp", variant, wud, device, torch.float64, **ar_kwargs)
    assert_close(got, expected, torch.float64)


@pytest.mark.parametrize("variant", ["no_nonlinear_derivative", "combined"])
def test_op_granularity_refuses_weight_update_derivative(variant, torch_ar):
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="weight_update_derivative"):
        torch_ar.ARBackward(net, variant=variant, granularity="op")
    # Dropping f' in the update too is well defined at op granularity.
    torch_ar.ARBackward(net, variant=variant, granularity="op", weight_update_derivative=False)


@pytest.mark.parametrize("variant", ["learned_backward_weights", "combined"])
def test_psi_gradient_is_weight_gradient_transposed(variant, device, dtype):
    """The paper's rule: psi moves by W's increment (transposed for linear layers)."""
    ar, got, _ = ar_and_oracle("cnn", variant, True, device, dtype)
    psis = ar.backward_weights()
    assert set(psis) == {"0.weight", "3.weight", "6.weight", "8.weight"}
    for name, psi in psis.items():
        w_grad = got[name]
        expected = w_grad.t() if w_grad.dim() == 2 else w_grad
        assert psi.grad is not None, name
        assert psi.grad.shape == psi.shape
        assert torch.equal(psi.grad, expected), name


def test_input_gradient_uses_backward_weights(device):
    """A leaf input's gradient is propagated through psi like every state."""
    torch_ar = load_torch_ar()
    model, x, y = make_problem("mlp", device, torch.float64)
    ar = torch_ar.ARBackward(model, variant="combined")
    psis = {n: p.detach() for n, p in ar.backward_weights().items()}
    oracle = Oracle(model, psis, RULES["combined"])
    x_ref = x.clone().requires_grad_(True)
    F.cross_entropy(oracle.run(oracle.model, x_ref), y).backward()
    x_ar = x.clone().requires_grad_(True)
    F.cross_entropy(ar(x_ar), y).backward()
    assert rel_err(x_ar.grad, x_ref.grad) <= F64_MAX_REL_ERR


# --------------------------------------------------------------------------
# Where a variant must coincide with backprop
# --------------------------------------------------------------------------


def _autograd_grads(model, x, y):
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    return {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("net", list(NETS))
def test_exact_variant_equals_autograd(net, device, dtype):
    torch_ar = load_torch_ar()
    model, x, y = make_problem(net, device, dtype)
    expected = _autograd_grads(model, x, y)
    ar = torch_ar.ARBackward(model, variant="exact")
    assert ar.backward_weights() == {}
    assert not any("backward_weight" in k for k in ar.state_dict())
    F.cross_entropy(ar(x), y).backward()
    assert_close({n: p.grad for n, p in model.named_parameters()}, expected, dtype)


def linear_cnn() -> nn.Sequential:
    """Convs, pooling and linears with no nonlinearity in between."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.Flatten(),
        nn.Linear(24, 10),
        nn.Linear(10, 5),
    )


@pytest.mark.parametrize("variant", ["learned_backward_weights", "combined"])
@pytest.mark.parametrize("eta_steps", [(1.0, None), (0.5, 200)], ids=["eta1", "eta0.5"])
def test_transpose_init_without_nonlinearity_is_exact(variant, eta_steps, device, dtype):
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = linear_cnn().to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64).to(device, dtype)
    y = torch.randint(0, 5, (4,), generator=gen).to(device)
    expected = _autograd_grads(model, x, y)
    eta, steps = eta_steps
    ar = torch_ar.ARBackward(
        model, variant=variant, backward_weight_init="transpose", eta=eta, steps=steps
    )
    F.cross_entropy(ar(x), y).backward()
    assert_close({n: p.grad for n, p in model.named_parameters()}, expected, dtype)


# --------------------------------------------------------------------------
# Backward weights as parameters
# --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["learned_backward_weights", "feedback_alignment", "combined"])
def test_backward_weights_are_registered(variant, device):
    torch_ar = load_torch_ar()
    model, _, _ = make_problem("residual_cnn", device, torch.float64)
    ar = torch_ar.ARBackward(model, variant=variant)
    psis = ar.backward_weights()
    weights = {
        n: p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() in (2, 4)
    }
    assert set(psis) == set(weights)
    for name, psi in psis.items():
        w = weights[name]
        expected_shape = w.t().shape if w.dim() == 2 else w.shape
        assert psi.shape == expected_shape, name
        assert psi.dtype == w.dtype and psi.device == w.device
        assert psi.requires_grad == (variant != "feedback_alignment")
    in_params = {id(p) for p in ar.parameters()}
    assert all(id(p) in in_params for p in psis.values())
    state = ar.state_dict()
    stored = [v for k, v in state.items() if k.startswith("backward_weight_store.")]
    assert len(stored) == len(psis)
    # The paper's initialisation: N(0, 0.05), independent of W.
    flat = torch.cat([p.detach().flatten() for p in psis.values()])
    assert abs(flat.std().item() - 0.05) < 0.005
    assert abs(flat.mean().item()) < 0.005


def test_backward_weight_std_and_transpose_init():
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    ar = torch_ar.ARBackward(model, variant="combined", backward_weight_std=0.2)
    flat = torch.cat([p.detach().flatten() for p in ar.backward_weights().values()])
    assert abs(flat.std().item() - 0.2) < 0.01
    ar = torch_ar.ARBackward(model, variant="combined", backward_weight_init="transpose")
    for name, psi in ar.backward_weights().items():
        assert torch.equal(psi, model.get_parameter(name).t())


def test_matched_init_draws_psi_at_each_weights_own_scale():
    """A CNN's default init gives each layer its own scale; "matched" psi follows it."""
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 10),
    )
    ar = torch_ar.ARBackward(model, variant="feedback_alignment", backward_weight_init="matched")
    psis = ar.backward_weights()
    assert set(psis) == {"0.weight", "2.weight", "5.weight"}
    stds = []
    for name, psi in psis.items():
        w = model.get_parameter(name)
        stds.append(w.std().item())
        assert abs(psi.std().item() / w.std().item() - 1.0) < 0.1, name
        assert abs(psi.mean().item()) < 0.1 * w.std().item(), name
        # Random, not a copy of W: nearly orthogonal to it.
        assert abs(cosine(psi, w if psi.shape == w.shape else w.t())) < 0.2
    assert max(stds) / min(stds) > 3.0  # the layers' scales really differ


def test_matched_init_names_a_weight_without_spread():
    torch_ar = load_torch_ar()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[2].weight.zero_()
    with pytest.raises(ValueError, match=r"'2.weight' \(shape \(4, 8\)\) has std 0"):
        torch_ar.ARBackward(model, variant="combined", backward_weight_init="matched")
    with pytest.raises(ValueError, match="'normal', 'matched', 'xavier' or 'transpose'"):
        torch_ar.ARBackward(model, variant="combined", backward_weight_init="kaiming")


def test_feedback_alignment_psi_is_fixed(device):
    torch_ar = load_torch_ar()
    model, x, y = make_problem("cnn", device, torch.float64)
    ar = torch_ar.ARBackward(model, variant="feedback_alignment")
    before = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
    weights_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(ar.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(ar(x), y).backward()
        opt.step()
    for name, psi in ar.backward_weights().items():
        assert not psi.requires_grad
        assert psi.grad is None, name
        assert torch.equal(psi, before[name]), name
    assert not any(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------
# Training: the paper's rule and Kolen-Pollack decay
# --------------------------------------------------------------------------


TRAIN_LR, TRAIN_STEPS, KP_DECAY = 0.1, 200, 0.2


def regression_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    y = 3.0 * torch.sin(x @ torch.randn(6, 3, generator=gen, dtype=torch.float64))
    return model, x, y


def _differences(ar) -> dict[str, torch.Tensor]:
    """psi - W^T per linear layer."""
    return {
        n: psi.detach() - ar.module.get_parameter(n).detach().t()
        for n, psi in ar.backward_weights().items()
    }


@dataclass
class TrainingRun:
    start_angles: dict[str, float]
    end_angles: dict[str, float]
    start_norms: dict[str, float]
    end_norms: dict[str, float]
    start_differences: dict[str, torch.Tensor]
    end_differences: dict[str, torch.Tensor]
    max_drift: float  # max over steps of |(psi - W^T) - (psi_0 - W_0^T)|
    start_loss: float
    end_loss: float


def train_regression(decay: float) -> TrainingRun:
    """Plain SGD over ar.parameters() (W and psi) on the regression problem."""
    torch_ar = load_torch_ar()
    from torch_ar.alignment import backward_weight_angles

    model, x, y = regression_problem()
    ar = torch_ar.ARBackward(model, variant="learned_backward_weights", backward_weight_decay=decay)
    d0 = _differences(ar)

    def norms() -> dict[str, float]:
        return {n: model.get_parameter(n).norm().item() for n in d0}

    start = backward_weight_angles(ar), norms(), F.mse_loss(model(x), y).item()
    opt = torch.optim.SGD(ar.parameters(), lr=TRAIN_LR)
    drift = 0.0
    for _ in range(TRAIN_STEPS):
        opt.zero_grad()
        F.mse_loss(ar(x), y).backward()
        opt.step()
        d = _differences(ar)
        drift = max(drift, *((d[n] - d0[n]).abs().max().item() for n in d0))
    return TrainingRun(
        start[0],
        backward_weight_angles(ar),
        start[1],
        norms(),
        d0,
        _differences(ar),
        drift,
        start[2],
        F.mse_loss(model(x), y).item(),
    )


@pytest.fixture(scope="module")
def paper_rule_run() -> TrainingRun:
    return train_regression(decay=0.0)


def test_paper_rule_keeps_psi_minus_w_transpose_constant(paper_rule_run):
    run = paper_rule_run
    assert run.end_loss < 0.5 * run.start_loss, "the regression did not train"
    assert run.max_drift < 1e-12, f"psi - W^T drifted by {run.max_drift}"


def test_paper_rule_angle_falls_only_as_the_weights_grow(paper_rule_run):
    """psi = W^T + D with D fixed: the angle is small only once |W| outgrows |D|."""
    run = paper_rule_run
    for name, d in run.start_differences.items():
        shrank = run.end_angles[name] < run.start_angles[name] - 1.0
        grew = run.end_norms[name] > run.start_norms[name]
        assert grew or not shrank, (name, run.start_angles[name], run.end_angles[name])
        # tan(angle(W^T + D, W^T)) <= |D| / (|W| - |D|) once |W| > |D|.
        slack = run.end_norms[name] - d.norm().item()
        assert slack > 0, f"{name}: |W| did not outgrow |D|: the bound below is vacuous"
        tan_bound = d.norm().item() / slack
        assert math.tan(math.radians(run.end_angles[name])) <= tan_bound, name
        # And it is no smaller than the geometry allows: still far from aligned.
        assert run.end_angles[name] > 10.0, (name, run.end_angles[name])


def test_kolen_pollack_decay_aligns_psi_with_w_transpose(paper_rule_run):
    run = train_regression(decay=KP_DECAY)
    assert run.end_loss < 0.6 * run.start_loss, "the regression did not train"
    # psi - W^T shrinks by (1 - lr * decay) per step, whatever the gradients.
    factor = (1.0 - TRAIN_LR * KP_DECAY) ** TRAIN_STEPS
    for name, d in run.end_differences.items():
        expected = factor * run.start_differences[name]
        assert (d - expected).abs().max().item() < 1e-12, name
    for name, angle in run.end_angles.items():
        # The weights do not grow much here: the decay, not |W|, aligns psi.
        assert angle < 0.05 * run.start_angles[name], (name, run.start_angles[name], angle)
        assert angle < 0.2 * paper_rule_run.end_angles[name]


def test_decay_adds_lambda_times_weight_to_both_gradients():
    torch_ar = load_torch_ar()
    model, x, y = regression_problem()
    plain = copy.deepcopy(model)
    ar0 = torch_ar.ARBackward(plain, variant="combined", backward_weight_init="transpose")
    ar = torch_ar.ARBackward(
        model, variant="combined", backward_weight_init="transpose", backward_weight_decay=0.1
    )
    for a in (ar0, ar):
        F.mse_loss(a(x), y).backward()
    for name, psi in ar.backward_weights().items():
        w = model.get_parameter(name)
        w0 = plain.get_parameter(name)
        assert rel_err(w.grad, w0.grad + 0.1 * w0.detach()) <= F64_MAX_REL_ERR
        psi0 = ar0.backward_weights()[name]
        assert rel_err(psi.grad, psi0.grad + 0.1 * psi0.detach()) <= F64_MAX_REL_ERR
    # Biases have no backward weight and no decay.
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p.grad, plain.get_parameter(name).grad)


# --------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------

CHECKPOINT_SCRIPT = textwrap.dedent(
    """
    import sys

    sys.path.insert(0, sys.argv[1])
    from test_variants import resume_from_checkpoint

    resume_from_checkpoint(sys.argv[2], sys.argv[3])
    """
)

CHECKPOINT_STEPS, CHECKPOINT_AT = 10, 5


def _checkpoint_setup(seed: int):
    """A small conv net under "combined" with decay, and SGD with momentum (stateful)."""
    torch_ar = load_torch_ar()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4)
    ).double()
    ar = torch_ar.ARBackward(
        model, variant="combined", backward_weight_decay=0.01, eta=0.5, steps=20
    )
    opt = torch.optim.SGD(ar.parameters(), lr=0.1, momentum=0.9)
    return ar, opt


def _checkpoint_steps(ar, opt, start: int, stop: int) -> None:
    for t in range(start, stop):
        gen = torch.Generator().manual_seed(100 + t)
        x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
        y = torch.randn(6, 4, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        F.mse_loss(ar(x), y).backward()
        opt.step()


def resume_from_checkpoint(checkpoint: str, final: str) -> None:
    """Load the checkpoint into a differently initialised model, finish, save the result."""
    ar, opt = _checkpoint_setup(seed=99)
    state = torch.load(checkpoint)
    ar.load_state_dict(state["ar"])
    opt.load_state_dict(state["opt"])
    _checkpoint_steps(ar, opt, CHECKPOINT_AT, CHECKPOINT_STEPS)
    torch.save(ar.state_dict(), final)


def test_checkpoint_resumes_bit_identically(tmp_path):
    ar, opt = _checkpoint_setup(seed=0)
    _checkpoint_steps(ar, opt, 0, CHECKPOINT_AT)
    checkpoint, final = tmp_path / "checkpoint.pt", tmp_path / "final.pt"
    torch.save({"ar": ar.state_dict(), "opt": opt.state_dict()}, checkpoint)
    _checkpoint_steps(ar, opt, CHECKPOINT_AT, CHECKPOINT_STEPS)
    uninterrupted = ar.state_dict()

    script = tmp_path / "resume.py"
    script.write_text(CHECKPOINT_SCRIPT)
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": str(tests_dir.parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(tests_dir), str(checkpoint), str(final)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    resumed = torch.load(final)
    assert set(resumed) == set(uninterrupted)
    assert sum(k.startswith("backward_weight_store.") for k in resumed) == 2
    for k, v in uninterrupted.items():
        assert torch.equal(resumed[k], v), k


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["backprop", "Exact", "", None])
def test_unknown_variant_lists_the_valid_names(name):
    torch_ar = load_torch_ar()
    with pytest.raises(ValueError) as info:
        torch_ar.ARBackward(nn.Linear(3, 2), variant=name)
    for valid in ALL_VARIANTS:
        assert valid in str(info.value)


def _edit_first_psi(ar, how: str) -> str:
    name, psi = next(iter(ar.backward_weights().items()))
    key = name.replace(".", "__")
    assert ar.backward_weight_store[key] is psi
    if how == "replace_shape":
        ar.backward_weight_store[key] = nn.Parameter(torch.randn(3, 3, dtype=psi.dtype))
    elif how == "data_shape":
        psi.data = torch.randn(psi.shape[1], psi.shape[0], dtype=psi.dtype)
    elif how == "data_dtype":
        psi.data = psi.data.float()
    elif how == "replace_device":
        ar.backward_weight_store[key] = nn.Parameter(
            torch.empty(psi.shape, dtype=psi.dtype, device="meta")
        )
    return name


@pytest.mark.parametrize("how", ["replace_shape", "data_shape", "data_dtype", "replace_device"])
def test_mismatched_psi_is_a_clear_error(how):
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double()
    ar = torch_ar.ARBackward(model, variant="learned_backward_weights")
    name = _edit_first_psi(ar, how)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"'{name}'"):
        ar(x).sum().backward()


@needs_cuda
def test_psi_on_another_device_is_a_clear_error():
    torch_ar = load_torch_ar()
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2)).double().cuda()
    ar = torch_ar.ARBackward(model, variant="combined")
    psi = ar.backward_weights()["2.weight"]
    psi.data = psi.data.cpu()
    with pytest.raises(ValueError, match="'2.weight'"):
        ar(torch.randn(4, 6, dtype=torch.float64, device="cuda")).sum().backward()


# --------------------------------------------------------------------------
# Alignment metrics
# --------------------------------------------------------------------------


def test_backward_weight_angles_transpose_and_random():
    torch_ar = load_torch_ar()
    from torch_ar.alignment import backward_weight_angles

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
    ).double()
    ar = torch_ar.ARBackward(model, variant="combined", backward_weight_init="transpose")
    angles = backward_weight_angles(ar)
    assert set(angles) == {"0.weight", "3.weight", "5.weight"}
    assert all(a < 1e-5 for a in angles.values()), angles
    ar = torch_ar.ARBackward(model, variant="feedback_alignment")
    angles = backward_weight_angles(ar)
    assert abs(angles["5.weight"] - 90.0) < 1.0, angles  # 262144 entries: ~0.1 deg spread
    assert abs(angles["3.weight"] - 90.0) < 2.0, angles
    assert all(isinstance(a, float) for a in angles.values())
    assert backward_weight_angles(torch_ar.ARBackward(model)) == {}


def test_variant_gradient_cosines(device, dtype):
    torch_ar = load_torch_ar()
    from torch_ar.alignment import variant_gradient_cosines

    model, x, y = make_problem("cnn", device, dtype)
    names = [n for n, _ in model.named_parameters()]

    def loss_fn(out):
        return F.cross_entropy(out, y)

    exact = variant_gradient_cosines(torch_ar.ARBackward(model), loss_fn, x)
    assert set(exact) == set(names)
    assert all(c > 1 - 1e-5 for c in exact.values()), exact

    torch.manual_seed(7)  # the psi of ar_and_oracle below
    ar = torch_ar.ARBackward(model, variant="feedback_alignment")
    for p in ar.parameters():
        p.grad = None
    cos = variant_gradient_cosines(ar, loss_fn, x)
    assert all(p.grad is None for p in ar.parameters()), "the metric must not touch .grad"
    assert set(cos) == set(names)
    assert all(-1.0 <= c <= 1.0 for c in cos.values())
    # The output layer's gradient does not depend on psi; the ones below do.
    assert cos["8.weight"] > 1 - 1e-5 and cos["8.bias"] > 1 - 1e-5
    assert cos["0.weight"] < 0.9, cos
    # The same numbers as the oracle's gradients against autograd's.
    _, _, expected = ar_and_oracle("cnn", "feedback_alignment", True, device, dtype)
    true = _autograd_grads(model, x, y)
    for n in names:
        assert cos[n] == pytest.approx(cosine(expected[n], true[n]), abs=1e-4), n


# --------------------------------------------------------------------------
# Sign-concordant feedback (uSF, frSF, brSF): psi from W's signs
# --------------------------------------------------------------------------

SIGN_VARIANTS = ["sign_symmetry", "sign_symmetry_fixed_random", "sign_symmetry_batch_random"]
SIGN_SETTINGS = [
    pytest.param({}, id="exact_sweep"),
    pytest.param({"eta": 0.5, "steps": 200}, id="closed_form"),
    pytest.param({"eta": 0.5, "steps": 200, "evaluation": "literal"}, id="literal"),
]


def sign_ar_and_oracle(net, variant, device, dtype, **ar_kwargs):
    """ARBackward(variant) and the oracle with the psi the backward used
    (brSF draws its magnitudes at every backward, so psi is read after it)."""
    torch_ar = load_torch_ar()
    model, x, y = make_problem(net, device, dtype)
    torch.manual_seed(7)
    ar = torch_ar.ARBackward(model, variant=variant, **ar_kwargs)
    F.cross_entropy(ar(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    psis = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
    model.zero_grad(set_to_none=True)
    expected = Oracle(model, psis, Rule(True, False)).gradients(x, y)
    return ar, model, got, expected, psis


def xavier_std(w: torch.Tensor) -> float:
    fan_in = w.shape[1] * (w[0, 0].numel() if w.dim() > 2 else 1)
    fan_out = w.shape[0] * (w[0, 0].numel() if w.dim() > 2 else 1)
    return math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant", SIGN_VARIANTS)
@pytest.mark.parametrize("settings", SIGN_SETTINGS)
def test_sign_variants_converge_to_their_oracle(net, variant, settings, device, dtype):
    ar, model, got, expected, psis = sign_ar_and_oracle(net, variant, device, dtype, **settings)
    assert_close(got, expected, dtype)
    # Only the signs of W travel: psi agrees with W (transposed for linear) in sign.
    for name, psi in psis.items():
        w = model.get_parameter(name).detach()
        w = w.t() if w.dim() == 2 else w
        assert torch.equal(torch.sign(psi), torch.sign(w)), name
        if variant == "sign_symmetry":
            torch.testing.assert_close(psi.abs(), torch.full_like(psi, xavier_std(w)))


def test_sign_feedback_follows_w_and_its_magnitudes(torch_ar):
    model, x, y = make_problem("cnn", "cpu", torch.float64)
    runs = {}
    for variant in SIGN_VARIANTS:
        torch.manual_seed(7)
        net = copy.deepcopy(model)
        ar = torch_ar.ARBackward(net, variant=variant)
        opt = torch.optim.SGD(net.parameters(), lr=5.0)  # large: some signs flip
        seen = []
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(ar(x), y).backward()
            seen.append({n: p.detach().clone() for n, p in ar.backward_weights().items()})
            before = {n: p.detach().clone() for n, p in net.named_parameters()}
            opt.step()
        runs[variant] = (seen, before, net, ar)
    # The signs are W's at the backward that used them, even after W's signs changed.
    seen, _, net, ar = runs["sign_symmetry"]
    flipped = sum(int((torch.sign(seen[0][n]) != torch.sign(seen[2][n])).sum()) for n in seen[0])
    assert flipped > 0
    magnitudes = lambda s: {n: p.abs() for n, p in s.items()}  # noqa: E731
    for variant, fixed in (
        ("sign_symmetry", True),
        ("sign_symmetry_fixed_random", True),
        ("sign_symmetry_batch_random", False),
    ):
        seen = runs[variant][0]
        same = all(torch.equal(magnitudes(seen[0])[n], magnitudes(seen[2])[n]) for n in seen[0])
        assert same == fixed, variant
    # psi is not learned: no gradient, and the optimizer never moves it.
    for variant in SIGN_VARIANTS:
        ar = runs[variant][3]
        assert all(not p.requires_grad and p.grad is None for p in ar.backward_weights().values())


def test_xavier_backward_weight_init(torch_ar):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    ar = torch_ar.ARBackward(net, variant="feedback_alignment", backward_weight_init="xavier")
    psi = ar.backward_weights()["0.weight"]
    bound = math.sqrt(6.0 / (300 + 100))
    assert psi.shape == (300, 100)
    assert psi.abs().max() <= bound and psi.abs().max() > 0.95 * bound
    assert abs(psi.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    with pytest.raises(ValueError, match="'xavier'"):
        torch_ar.ARBackward(net, variant="feedback_alignment", backward_weight_init="glorot")


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("variant, wud", VARIANT_CONFIGS)
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="exact_sweep"),
        pytest.param({"eta": 0.5, "steps": 200}, id="closed_form"),
    ],
)
def test_block_granularity_reaches_the_oracle(net, variant, wud, settings, device):
    """A block holds a weight layer, its activation and what follows it up to the
    next weight layer: the variants' fixed points are the same."""
    _, got, expected = ar_and_oracle(
        net, variant, wud, device, torch.float64, granularity="block", **settings
    )
    assert_close(got, expected, torch.float64)

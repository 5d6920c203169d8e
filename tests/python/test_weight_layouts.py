"""Backward weights whatever way an op reads its weight.

F.linear reads W^T (the operand of addmm is W^T); Hugging Face's Conv1D
(GPT-2 and its family) reads its (in, out) weight W itself, in
addmm(bias, x, W). psi is kept as W^T for every 2-D weight and given to each
op in the layout it reads. Before, a Conv1D weight got no psi ("the weight of
node 'AddmmBackward0' has none"), and named by hand it was applied
transposed: "transpose"-initialised learned psi gave gradients at cosine 0.70
to autograd on a square Conv1D. The oracle is the same network written with
nn.Linear (weight W^T), whose psi path the variant tests hold.

Also here: the angle of psi to its exact value in that layout, and the
warning when learned psi is left out of the optimizer.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import load_torch_ar, rel_err

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32")]
PSI_VARIANTS = [
    "learned_backward_weights",
    "feedback_alignment",
    "sign_symmetry",
    "sign_symmetry_fixed_random",
    "combined",
]


class Conv1D(nn.Module):
    """Hugging Face's Conv1D as transformers writes it: weight (in, out) read by addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


def conv1d_mlp(dtype, square: bool) -> nn.Sequential:
    torch.manual_seed(0)
    hidden = 12 if square else 20
    return nn.Sequential(Conv1D(hidden, 12), nn.Tanh(), Conv1D(5, hidden)).to(dtype)


def as_linear(net: nn.Sequential) -> nn.Sequential:
    """The same function with nn.Linear layers (weight W^T)."""
    layers = []
    for m in net:
        if isinstance(m, Conv1D):
            lin = nn.Linear(m.weight.shape[0], m.nf).to(m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                lin.bias.copy_(m.bias)
            layers.append(lin)
        else:
            layers.append(m)
    return nn.Sequential(*layers)


def _ar_grads(torch_ar, net, x, **kwargs):
    torch.manual_seed(3)
    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad(set_to_none=True)
    ar(x).pow(2).sum().backward()
    return ar, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("square", [True, False], ids=["square", "rectangular"])
def test_conv1d_learned_psi_at_transpose_equals_autograd(square, dtype):
    torch_ar = load_torch_ar()
    net = conv1d_mlp(dtype, square)
    x = torch.randn(6, 12, dtype=dtype)
    net(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    ar, got = _ar_grads(
        torch_ar, net, x, variant="learned_backward_weights", backward_weight_init="transpose"
    )
    assert set(ar.backward_weights()) == {"0.weight", "2.weight"}
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", PSI_VARIANTS)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_conv1d_equals_the_same_network_with_linear_layers(variant, eta, dtype):
    torch_ar = load_torch_ar()
    net = conv1d_mlp(dtype, square=False)
    linear = as_linear(net)
    x = torch.randn(6, 12, dtype=dtype)
    relax = {"eta": eta, "steps": None if eta == 1.0 else 120}
    ar_lin, lin_grads = _ar_grads(torch_ar, linear, x, variant=variant, **relax)
    ar_c = torch_ar.ARBackward(net, variant=variant, **relax)
    # The Linear network's psi (the operand F.linear reads, W) is the Conv1D
    # psi's transpose: psi is kept as W^T of the Conv1D weight.
    with torch.no_grad():
        for name, psi in ar_c.backward_weights().items():
            psi.copy_(ar_lin.backward_weights()[name].t())
        for key, magnitude in ar_c.backward_weight_magnitude.items():
            magnitude.copy_(ar_lin.backward_weight_magnitude[key].t())
    net.zero_grad(set_to_none=True)
    ar_c(x).pow(2).sum().backward()
    for (name, p), g_lin in zip(net.named_parameters(), lin_grads):
        expected = g_lin.t() if name.endswith("weight") else g_lin
        assert rel_err(p.grad, expected) <= TOL[dtype], name


def test_transformers_conv1d_gets_psi():
    pytorch_utils = pytest.importorskip(
        "transformers.pytorch_utils",
        reason="transformers is an optional test dependency (requirements.txt)",
    )
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    net = nn.Sequential(pytorch_utils.Conv1D(16, 16), nn.ReLU(), pytorch_utils.Conv1D(4, 16))
    net = net.double()
    x = torch.randn(5, 16, dtype=torch.float64)
    net(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    ar, got = _ar_grads(
        torch_ar, net, x, variant="learned_backward_weights", backward_weight_init="transpose"
    )
    assert set(ar.backward_weights()) == {"0.weight", "2.weight"}
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= 1e-12


class FunctionalLinear(nn.Module):
    """A weight read through F.linear by a module that is not nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight_raw = nn.Parameter(torch.randn(6, 8, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_raw)


def _orthogonal_to(w: torch.Tensor) -> torch.Tensor:
    r = torch.randn_like(w)
    return r - (r * w).sum() / (w * w).sum() * w


@pytest.mark.parametrize(
    "case",
    ["mha_packed", "mha_separate", "conv1d", "f_linear", "conv2d"],
)
def test_backward_weight_angles_in_the_layout_the_op_reads(case):
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    extra: tuple[str, ...] = ()
    if case == "mha_packed":
        net = nn.MultiheadAttention(8, 2, dtype=torch.float64)
    elif case == "mha_separate":
        net = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, dtype=torch.float64)
    elif case == "conv1d":
        net = nn.Sequential(Conv1D(6, 8)).double()
    elif case == "f_linear":
        net, extra = FunctionalLinear(), ("weight_raw",)
    else:
        net = nn.Conv2d(3, 4, 3).double()
    ar = torch_ar.ARBackward(net, variant="feedback_alignment", backward_weight_params=extra)
    assert ar.backward_weights()
    with torch.no_grad():
        for name, psi in ar.backward_weights().items():
            psi.copy_(torch_ar.alignment.exact_backward_weight(net, name))
    angles = torch_ar.alignment.backward_weight_angles(ar)
    assert all(abs(a) < 1e-5 for a in angles.values()), angles
    with torch.no_grad():
        for name, psi in ar.backward_weights().items():
            psi.copy_(_orthogonal_to(torch_ar.alignment.exact_backward_weight(net, name)))
    angles = torch_ar.alignment.backward_weight_angles(ar)
    assert all(abs(a - 90.0) < 1e-5 for a in angles.values()), angles


def test_alignment_is_an_attribute_of_the_package():
    torch_ar = load_torch_ar()
    assert callable(torch_ar.alignment.backward_weight_angles)


def _train(optimizer_of, steps: int = 3, accumulate: int = 1) -> list[warnings.WarningMessage]:
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    ar = torch_ar.ARBackward(net, variant="learned_backward_weights")
    opt = optimizer_of(ar, net)
    x = torch.randn(5, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(accumulate):
                ar(x).pow(2).sum().backward()
            opt.step()
    return [w for w in caught if "backward weight" in str(w.message)]


def test_warns_once_when_the_optimizer_leaves_psi_out():
    caught = _train(lambda ar, net: torch.optim.SGD(net.parameters(), lr=0.1))
    assert len(caught) == 1
    assert "ar.parameters()" in str(caught[0].message)
    assert "'0.weight'" in str(caught[0].message)
    # Attributed to the user's line (the training loop here), not torch_ar's.
    assert caught[0].filename == __file__, caught[0].filename


@pytest.mark.parametrize("accumulate", [1, 3])
def test_no_warning_when_psi_is_optimised(accumulate):
    caught = _train(lambda ar, net: torch.optim.SGD(ar.parameters(), lr=0.1), accumulate=accumulate)
    assert caught == []


# ---------------------------------------------------------------- frozen and computed weights


def _mlp(dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", PSI_VARIANTS)
def test_a_frozen_weight_keeps_its_psi(variant, dtype):
    # Before, every psi variant raised "the weight of node 'AddmmBackward0'
    # has none" here, naming neither the parameter nor the freezing.
    torch_ar = load_torch_ar()
    net = _mlp(dtype).to(dtype)
    net[2].weight.requires_grad_(False)
    x = torch.randn(5, 6, dtype=dtype)
    ar = torch_ar.ARBackward(net, variant=variant)
    assert "2.weight" in ar.backward_weights()
    ar(x).pow(2).sum().backward()
    assert net[2].weight.grad is None
    assert not net[2].weight.requires_grad
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_frozen_weight_with_exact_psi_equals_autograd(dtype):
    torch_ar = load_torch_ar()
    net = _mlp(dtype).to(dtype)
    net[2].weight.requires_grad_(False)
    x = torch.randn(5, 6, dtype=dtype)
    net(x).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
    net.zero_grad(set_to_none=True)
    ar = torch_ar.ARBackward(
        net, variant="learned_backward_weights", backward_weight_init="transpose"
    )
    ar(x).pow(2).sum().backward()
    for name, grad in expected.items():
        assert rel_err(net.get_parameter(name).grad, grad) <= TOL[dtype], name
    # Learned psi still moves by its weight's would-be increment.
    assert ar.backward_weights()["2.weight"].grad is not None


def _parametrised(kind: str, dtype) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    net = net.to(dtype)
    P = torch.nn.utils.parametrizations
    for layer in (net[0], net[3]):
        if kind == "weight_norm":
            P.weight_norm(layer)
        elif kind == "spectral_norm":
            P.spectral_norm(layer)
        else:
            P.orthogonal(layer) if layer is net[3] else P.weight_norm(layer)
    return net.eval()  # spectral_norm's power iteration stays put


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrised_weights_with_exact_psi_equal_autograd(kind, dtype):
    torch_ar = load_torch_ar()
    net = _parametrised(kind, dtype)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    net(x).pow(2).sum().backward()
    expected = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    ar = torch_ar.ARBackward(
        net, variant="learned_backward_weights", backward_weight_init="transpose"
    )
    assert len(ar.backward_weights()) == 2
    ar(x).pow(2).sum().backward()
    for name, grad in expected.items():
        assert rel_err(net.get_parameter(name).grad, grad) <= TOL[dtype], name
    angles = torch_ar.alignment.backward_weight_angles(ar)
    assert all(abs(a) < 1e-3 for a in angles.values()), angles


class PsiConvInput(torch.autograd.Function):
    """conv2d whose input-VJP uses psi; the weight's gradient is the conv's own."""

    @staticmethod
    def forward(ctx, x, w, psi):
        ctx.save_for_backward(x, w, psi)
        return F.conv2d(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w, psi = ctx.saved_tensors
        grad_x = torch.nn.grad.conv2d_input(x.shape, psi, g)
        grad_w = torch.nn.grad.conv2d_weight(x, w.shape, g)
        return grad_x, grad_w, None


class StandardisedConv(nn.Conv2d):
    """A weight-standardised conv written by hand (as timm's StdConv2d): the
    op reads (W - mean) / std, computed in the forward."""

    psi: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        standardised = (w - mean) / (std + 1e-5)
        if self.psi is None:
            return F.conv2d(x, standardised)
        return PsiConvInput.apply(x, standardised, self.psi)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_weight_computed_in_the_forward_follows_its_oracle(eta, dtype):
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    net = nn.Sequential(
        StandardisedConv(3, 4, 3, bias=False), nn.Tanh(), StandardisedConv(4, 2, 3, bias=False)
    ).to(dtype)
    x = torch.randn(2, 3, 7, 7, dtype=dtype)
    relax = {"eta": eta, "steps": None if eta == 1.0 else 150}
    ar = torch_ar.ARBackward(net, variant="feedback_alignment", **relax)
    ar(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in net.named_parameters()}
    # The oracle: the same network, its second conv's input-VJP through psi
    # (the first conv's input is the data: no VJP there).
    net.zero_grad(set_to_none=True)
    net[2].psi = ar.backward_weights()["2.weight"].detach()
    net(x).pow(2).sum().backward()
    net[2].psi = None
    for name, p in net.named_parameters():
        assert rel_err(got[name], p.grad) <= TOL[dtype] * (1 if eta == 1.0 else 100), name


def test_a_weight_made_from_two_psi_parameters_is_refused_by_name():
    torch_ar = load_torch_ar()

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
            self.b = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(x @ self.a) @ (self.a + self.b)

    net = Tied()
    ar = torch_ar.ARBackward(net, variant="feedback_alignment", backward_weight_params=["a", "b"])
    with pytest.raises(RuntimeError, match=r"made from 'a', 'b', of which 'a', 'b' have"):
        ar(torch.randn(3, 4, dtype=torch.float64)).sum().backward()

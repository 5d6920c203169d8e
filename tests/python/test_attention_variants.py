"""Backward weights on every weight a linear or convolution op reads:
nn.MultiheadAttention's packed and separate q/k/v projections (every
nn.TransformerEncoderLayer, torchvision's ViT), and any parameter named in
backward_weight_params. The oracle replaces F.linear and F.conv2d by
functions whose input-VJP goes through psi, written without the engine."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zoo import rel_err

_LINEAR = F.linear
_CONV2D = F.conv2d


class PsiLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, psi):
        ctx.save_for_backward(x, w, psi)
        ctx.has_bias = b is not None
        return _LINEAR(x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w, psi = ctx.saved_tensors
        g2 = g.reshape(-1, w.shape[0])
        grad_x = g @ psi.t()  # psi is [in, out]
        grad_w = g2.t() @ x.reshape(-1, w.shape[1])
        return grad_x, grad_w, g2.sum(0) if ctx.has_bias else None, None


class PsiConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, psi, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w, psi)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        return _CONV2D(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, w, psi = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = torch.nn.grad.conv2d_input(x.shape, psi, g, stride, padding, dilation, groups)
        grad_w = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
        grad_b = g.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def oracle_gradients(model, psis: dict[str, torch.Tensor], run, monkeypatch):
    """Gradients of `run(model)` with every psi'd weight's input-VJP through psi."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    by_weight = {id(model.get_parameter(n)): psi for n, psi in psis.items()}

    def linear(x, w, b=None):
        psi = by_weight.get(id(w))
        return _LINEAR(x, w, b) if psi is None else PsiLinear.apply(x, w, b, psi)

    def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        psi = by_weight.get(id(w))
        if psi is None:
            return _CONV2D(x, w, b, stride, padding, dilation, groups)
        return PsiConv2d.apply(x, w, b, psi, stride, padding, dilation, groups)

    with monkeypatch.context() as m:
        m.setattr(F, "linear", linear)
        m.setattr(F, "conv2d", conv2d)
        run(model).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 3)
    )


def vit():
    model = torchvision.models.VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
        dropout=0.0,
        attention_dropout=0.0,
    )
    # torchvision starts the head at zero, which would make every other gradient zero.
    nn.init.normal_(model.heads.head.weight, std=0.3)
    return model


class SeparateProjections(nn.Module):
    """Cross-attention with kdim != embed_dim: separate q/k/v weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, kdim=12, vdim=12, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, q, kv):
        return self.head(self.attn(q, kv, kv, need_weights=False)[0])


MODELS = {
    "transformer_encoder": (encoder, lambda d, t: (torch.randn(3, 5, 16, device=d, dtype=t),)),
    "vit": (vit, lambda d, t: (torch.randn(2, 3, 16, 16, device=d, dtype=t),)),
    "separate_qkv": (
        SeparateProjections,
        lambda d, t: (
            torch.randn(3, 4, 16, device=d, dtype=t),
            torch.randn(3, 6, 12, device=d, dtype=t),
        ),
    ),
}


def loss_of(out):
    return (out.float() if out.dtype == torch.float16 else out).square().mean()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("variant", ["feedback_alignment", "sign_symmetry"])
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="exact_sweep"),
        pytest.param({"eta": 0.5, "steps": 200}, id="closed_form"),
    ],
)
def test_attention_projections_get_backward_weights(
    torch_ar, name, variant, settings, device, monkeypatch
):
    build, inputs = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device=device, dtype=torch.float64)
    args = inputs(device, torch.float64)
    torch.manual_seed(1)
    ar = torch_ar.ARBackward(model, variant=variant, **settings)
    psis = ar.backward_weights()
    attention = [n for n in psis if "proj_weight" in n]
    assert attention, f"no psi for the attention projections of {name}"
    loss_of(ar(*args)).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    used = {n: p.detach().clone() for n, p in psis.items()}
    want = oracle_gradients(model, used, lambda m: loss_of(m(*args)), monkeypatch)
    assert set(got) == set(want)
    scale = torch.cat([w.flatten() for w in want.values()]).norm()
    for n, w in want.items():
        assert (got[n] - w).norm() <= 1e-9 * scale, n
    # Not vacuous: the feedback weights changed the gradients.
    exact = oracle_gradients(model, {}, lambda m: loss_of(m(*args)), monkeypatch)
    assert max(rel_err(got[n], exact[n]) for n in exact) > 1e-3


class RawWeights(nn.Module):
    """Reads its parameters with F.linear and F.conv2d directly (no nn.Linear)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.proj = nn.Parameter(torch.randn(5, 4 * 4 * 4) * 0.2)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x, self.kernel, padding=1))
        return F.linear(F.max_pool2d(h, 2).flatten(1), self.proj)


def test_backward_weight_params_names_any_weight(torch_ar, device, monkeypatch):
    torch.manual_seed(0)
    model = RawWeights().to(device=device, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="backward_weight_params"):
        torch_ar.ARBackward(model, variant="feedback_alignment")(x).square().sum().backward()
    model.zero_grad(set_to_none=True)
    ar = torch_ar.ARBackward(
        model, variant="feedback_alignment", backward_weight_params=["kernel", "proj"]
    )
    psis = ar.backward_weights()
    assert psis["kernel"].shape == (4, 3, 3, 3) and psis["proj"].shape == (64, 5)
    ar(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    want = oracle_gradients(
        model, {n: p.detach() for n, p in psis.items()}, lambda m: m(x).square().sum(), monkeypatch
    )
    for n in want:
        assert rel_err(got[n], want[n]) <= 1e-10, n


def test_backward_weight_params_are_checked(torch_ar):
    model = RawWeights()
    with pytest.raises(ValueError, match="not a parameter"):
        torch_ar.ARBackward(model, variant="feedback_alignment", backward_weight_params=["nope"])
    with pytest.raises(ValueError, match="uses no backward weights"):
        torch_ar.ARBackward(model, backward_weight_params=["proj"])

"""Direct feedback alignment (DFA, Nokland 2016; BioTorch's ``dfa``).

The oracle here shares no code with the engine: the model's own forward with
every ``F.linear`` / ``F.conv2d`` on a weight with a psi replaced by a small
``autograd.Function`` that, as BioTorch's dfa layers do, takes its weight
gradient from the true gradient at its output and sends its input psi^T e
(e, the loss gradient at the model's output, repeated over the op's
positions), whatever arrives from above. One autograd backward of that graph
is DFA's gradient; at eta 1 the engine's sweep must equal it, and the
relaxation at eta < 1 is held to the finite-step oracle in
test_finite_steps_oracle.py (which runs every variant).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn
from zoo import load_torch_ar

DFA = "direct_feedback_alignment"
TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


class _DirectFeedback(torch.autograd.Function):
    """y = op(x, W, b); x hears psi^T e (laid out by `error_at`), W and b the
    true gradient at y."""

    @staticmethod
    def forward(ctx, x, w, b, op, psi, error_at):
        ctx.save_for_backward(x, w)
        ctx.op, ctx.psi, ctx.error_at, ctx.has_bias = op, psi, error_at, b is not None
        return op["forward"](x, w, b)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        e = ctx.error_at(g)
        if ctx.op["kind"] == "linear":
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
            gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
            gx = e @ ctx.psi.t()  # psi: [in, D]
        else:
            stride, padding, dilation, groups = ctx.op["geometry"]
            gw = torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding, dilation, groups)
            gb = g.sum((0, 2, 3)) if ctx.has_bias else None
            # psi [D, C_in, k, k] reads every input channel, grouped op or not.
            gx = torch.nn.grad.conv2d_input(x.shape, ctx.psi, e, stride, padding, dilation)
        return gx, gw, gb, None, None, None


def oracle(net, psis, args, loss_fn, batch_dim_of=None):
    """(parameter gradients, input gradients) of DFA by the hooks above.
    psis: {parameter name: psi}; batch_dim_of(weight name, x): the dimension
    of a linear op's input that holds the samples (default 0)."""
    by_id = {id(p): (n, psis[n]) for n, p in net.named_parameters() if n in psis}
    box: dict[str, torch.Tensor] = {}
    linear, conv2d = F.linear, F.conv2d

    def patched_linear(x, w, b=None):
        if id(w) not in by_id:
            return linear(x, w, b)
        name, psi = by_id[id(w)]
        dim = batch_dim_of(name, x) if batch_dim_of else 0

        def error_at(g):
            e = box["e"]
            shape = [1] * g.dim()
            shape[dim], shape[-1] = e.shape[0], e.shape[1]
            rows = g.shape[:-1]
            if g.dim() == 2 and g.shape[0] != e.shape[0]:  # (T*N) rows, T-major
                return e.repeat(g.shape[0] // e.shape[0], 1)
            return e.view(shape).expand(*rows, e.shape[1])

        op = {"kind": "linear", "forward": linear}
        return _DirectFeedback.apply(x, w, b, op, psi, error_at)

    def patched_conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        if id(w) not in by_id:
            return conv2d(x, w, b, stride, padding, dilation, groups)
        _, psi = by_id[id(w)]

        def error_at(g):
            e = box["e"]
            return e[:, :, None, None].expand(*e.shape, *g.shape[2:])

        op = {
            "kind": "conv",
            "geometry": (stride, padding, dilation, groups),
            "forward": lambda x, w, b: conv2d(x, w, b, stride, padding, dilation, groups),
        }
        return _DirectFeedback.apply(x, w, b, op, psi, error_at)

    F.linear, F.conv2d = patched_linear, patched_conv2d
    try:
        out = net(*args)
        loss = loss_fn(out)
        (e,) = torch.autograd.grad(loss, out, retain_graph=True)
        box["e"] = e.reshape(e.shape[0], -1)
        params = [p for p in net.parameters() if p.requires_grad]
        inputs = [a for a in args if a.requires_grad]
        grads = torch.autograd.grad(
            loss, params + inputs, allow_unused=True, materialize_grads=True
        )
    finally:
        F.linear, F.conv2d = linear, conv2d
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    return dict(zip(names, grads[: len(params)])), list(grads[len(params) :])


# ------------------------------------------------------------------ models


class ResidualCNN(nn.Module):
    """Conv + BatchNorm + ReLU, a residual block, max-pool, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        h = F.relu(h + self.b2(self.c2(h)))
        return self.fc(F.max_pool2d(h, 2).flatten(1))


class Encoder(nn.Module):
    """A pre-norm transformer encoder layer (nn.MultiheadAttention,
    batch_first) on tokens, mean pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _mha_batch_dim(name: str, x: torch.Tensor) -> int:
    # nn.MultiheadAttention projects [tokens, batch, E] (it transposes a
    # batch_first input); every other linear op here reads [batch, tokens, E].
    return 1 if ("self_attn" in name or "attention" in name) and x.dim() == 3 else 0


def _vit() -> nn.Module:
    from torch_ar.experiments.vit import VisionTransformer

    return VisionTransformer(image_size=8, patch_size=4, width=12, depth=2, heads=2)


def _depthwise() -> nn.Module:
    """MobileNet's pattern: a depthwise (grouped) conv between pointwise ones."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 7),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 4))


CASES = {
    # name: (model, input shape, output size, batch dim of linear inputs)
    "mlp": (_mlp, (5, 6), 4, None),
    "residual_cnn": (ResidualCNN, (6, 3, 8, 8), 10, None),
    "depthwise_cnn": (_depthwise, (5, 3, 6, 6), 7, None),
    "encoder": (Encoder, (3, 7, 4), 5, _mha_batch_dim),
    # The experiment zoo's ViT: patch-embedding conv, class token, positions.
    "vit": (_vit, (4, 3, 8, 8), 10, _mha_batch_dim),
}


def _setup(case: str, dtype: torch.dtype):
    make, shape, classes, batch_dim = CASES[case]
    torch.manual_seed(0)
    net = make().to(dtype)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, classes, (shape[0],), generator=torch.Generator().manual_seed(2))
    return net, x, y, batch_dim


def _worst(got: dict, want: dict) -> float:
    # Against the whole gradient's norm: a conv bias before train-mode
    # BatchNorm has a gradient that is zero in exact arithmetic.
    scale = math.sqrt(sum(float(g.norm()) ** 2 for g in want.values()))
    return max(float((got[n] - w).norm()) / scale for n, w in want.items())


def _engine(case, dtype, device="cpu", x_requires_grad=False, **settings):
    torch_ar = load_torch_ar()
    net, x, y, batch_dim = _setup(case, dtype)
    net, x, y = net.to(device), x.to(device), y.to(device)
    reference = copy.deepcopy(net)
    x.requires_grad_(x_requires_grad)
    torch.manual_seed(5)
    ar = torch_ar.ARBackward(net, variant=DFA, **settings)
    F.cross_entropy(ar(x), y).backward()
    got = {n: p.grad for n, p in net.named_parameters()}
    psis = {n: p.detach() for n, p in ar.backward_weights().items()}
    x_ref = x.detach().requires_grad_(x_requires_grad)
    want, want_inputs = oracle(
        reference, psis, (x_ref,), lambda out: F.cross_entropy(out, y), batch_dim
    )
    return ar, got, want, (x.grad, want_inputs[0] if want_inputs else None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("case", list(CASES))
def test_sweep_equals_the_oracle(case, granularity, dtype):
    ar, got, want, _ = _engine(case, dtype, granularity=granularity)
    assert ar.last_stats.evaluation == "exact_sweep"
    assert _worst(got, want) <= TOL[dtype]


@pytest.mark.parametrize("case", list(CASES))
def test_relaxation_converges_to_the_oracle(case):
    """eta < 1: the literal steps and the closed form reach DFA's gradient."""
    for evaluation in ("literal", "closed_form"):
        ar, got, want, _ = _engine(
            case, torch.float64, eta=0.5, steps=80, evaluation=evaluation, init="zero"
        )
        assert ar.last_stats.evaluation == evaluation
        assert _worst(got, want) <= 1e-12, evaluation


def test_it_is_not_backprop():
    """DFA's gradients differ from autograd's below the output layer (so the
    tests above cannot pass by computing backprop), and equal them at the
    output layer, which hears e itself."""
    for case in CASES:
        ar, got, _, _ = _engine(case, torch.float64)
        net, x, y, _ = _setup(case, torch.float64)
        F.cross_entropy(net(x), y).backward()
        exact = {n: p.grad for n, p in net.named_parameters()}
        last = {"mlp": "4.", "depthwise_cnn": "10."}.get(case, "fc.")
        head = [n for n in exact if n.startswith((last, "head."))]
        for n in head:
            assert torch.allclose(got[n], exact[n], rtol=1e-12, atol=1e-14), (case, n)
        cosines = [
            F.cosine_similarity(got[n].flatten(), exact[n].flatten(), 0).item()
            for n in exact
            if n not in head and exact[n].norm() > 1e-8
        ]
        assert min(cosines) < 0.9, (case, cosines)


def test_input_gradient_equals_the_oracle():
    _, _, _, (x_grad, want) = _engine("residual_cnn", torch.float64, x_requires_grad=True)
    assert x_grad is not None
    assert float((x_grad - want).norm() / want.norm()) <= 1e-12


def test_output_dim_makes_psi_at_once_with_biotorchs_initialisation():
    torch_ar = load_torch_ar()
    net, _, _, _ = _setup("residual_cnn", torch.float64)
    ar = torch_ar.ARBackward(net, variant=DFA, output_dim=10, backward_weight_init="xavier")
    psis = ar.backward_weights()
    assert set(psis) == {"c1.weight", "c2.weight", "fc.weight"}
    assert psis["c1.weight"].shape == (10, 3, 3, 3)  # BioTorch's [output_dim, C_in, k, k]
    assert psis["fc.weight"].shape == (128, 10)  # B^T of BioTorch's [output_dim, in]
    for name, psi in psis.items():
        assert not psi.requires_grad
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(psi)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert psi.abs().max() <= bound and psi.abs().max() > 0.8 * bound, name


def test_psi_made_at_the_first_backward_saves_and_loads():
    torch_ar = load_torch_ar()
    net, x, y, _ = _setup("mlp", torch.float64)
    ar = torch_ar.ARBackward(copy.deepcopy(net), variant=DFA)
    assert ar.backward_weights() == {}
    F.cross_entropy(ar(x), y).backward()
    psis = ar.backward_weights()
    assert psis["0.weight"].shape == (6, 4) and psis["4.weight"].shape == (9, 4)
    fresh = torch_ar.ARBackward(copy.deepcopy(net), variant=DFA)
    fresh.load_state_dict(ar.state_dict())
    for name, psi in fresh.backward_weights().items():
        assert torch.equal(psi, psis[name])
    # And it trains on from there with the loaded psi: the same gradients.
    fresh.module.zero_grad()
    ar.module.zero_grad()
    F.cross_entropy(fresh(x), y).backward()
    F.cross_entropy(ar(x), y).backward()
    for (n, a), b in zip(ar.module.named_parameters(), fresh.module.parameters()):
        assert torch.equal(a.grad, b.grad), n
    pickled = copy.deepcopy(ar)
    assert torch.equal(pickled.backward_weights()["0.weight"], psis["0.weight"])


def test_clear_errors():
    torch_ar = load_torch_ar()
    net, x, y, _ = _setup("mlp", torch.float64)
    with pytest.raises(ValueError, match="output_dim"):
        torch_ar.ARBackward(copy.deepcopy(net), variant="feedback_alignment", output_dim=4)
    with pytest.raises(ValueError, match="output_dim"):
        torch_ar.ARBackward(copy.deepcopy(net), variant=DFA, output_dim=0)
    with pytest.raises(ValueError, match="transpose"):
        torch_ar.ARBackward(
            copy.deepcopy(net), variant=DFA, output_dim=4, backward_weight_init="transpose"
        )
    # psi made for another output size.
    ar = torch_ar.ARBackward(copy.deepcopy(net), variant=DFA, output_dim=3)
    with pytest.raises(RuntimeError, match=r"output_dim=4"):
        F.cross_entropy(ar(x), y).backward()

    class TwoOutputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return h, self.b(torch.tanh(h))

    ar = torch_ar.ARBackward(TwoOutputs().double(), variant=DFA)
    h, out = ar(x)
    with pytest.raises(ValueError, match="one output"):
        (h.sum() + out.sum()).backward()

    transposed = nn.Sequential(
        nn.Conv2d(4, 4, 1), nn.ReLU(), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.Linear(144, 3)
    )
    ar = torch_ar.ARBackward(transposed.double(), variant=DFA, backward_weight_params=["2.weight"])
    with pytest.raises(RuntimeError, match="transposed convolution"):
        ar(torch.randn(2, 4, 4, 4, dtype=torch.float64)).sum().backward()

    class Folded(nn.Module):
        """Samples folded into windows (as window attention does)."""

        def __init__(self) -> None:
            super().__init__()
            self.first, self.window, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(24, 3)

        def forward(self, x):
            h = torch.tanh(self.first(x)).reshape(-1, 2, 4)  # [N * 3, 2, 4]
            return self.head(torch.tanh(self.window(h)).reshape(x.shape[0], -1))

    ar = torch_ar.ARBackward(Folded().double(), variant=DFA)
    with pytest.raises(RuntimeError, match="folds the samples into another dimension"):
        ar(torch.randn(4, 6, 4, dtype=torch.float64)).sum().backward()

    # Tokens as many as samples: which dimension holds the samples is unknown.
    encoder = Encoder().double()
    ar = torch_ar.ARBackward(encoder, variant=DFA)
    with pytest.raises(RuntimeError, match="batch size that no other dimension has"):
        ar(torch.randn(3, 3, 4, dtype=torch.float64)).sum().backward()


def test_angles_are_for_psi_that_stand_for_a_weight():
    """backward_weight_angles compares psi with W^T; DFA's psi projects the
    output error and stands for no weight, so it has no angle."""
    torch_ar = load_torch_ar()
    from torch_ar.alignment import backward_weight_angles

    net, _, _, _ = _setup("mlp", torch.float64)
    ar = torch_ar.ARBackward(net, variant=DFA, output_dim=4)
    assert backward_weight_angles(ar) == {}


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_sweep_equals_the_oracle_on_cuda(case):
    for dtype in (torch.float64, torch.float32):
        _, got, want, _ = _engine(case, dtype, device="cuda")
        assert _worst(got, want) <= TOL[dtype]


def test_a_nan_in_psi_is_named():
    """psi made at the first backward is no input of the forward: a NaN put
    in it is still named as where the NaN comes from."""
    torch_ar = load_torch_ar()
    net, x, y, _ = _setup("mlp", torch.float64)
    ar = torch_ar.ARBackward(net, variant=DFA, output_dim=4)
    with torch.no_grad():
        ar.backward_weights()["2.weight"][0, 0] = float("nan")
    with pytest.raises(
        torch_ar.NonFiniteValueError, match=r"backward weight \(psi\) of '2.weight'"
    ):
        F.cross_entropy(ar(x), y).backward()

"""An oracle for the relaxation at eta < 1 that shares no code with the engine.

The literal steps and the closed form were compared with each other and, at
eta < 1, with nothing else beyond the paper MLP. Here each model is also
written as a list of blocks, one per state, in plain PyTorch: the block's
output from its inputs, once with the true ops (forward values, weight
gradients) and once with the variant's ops for the relaxation (psi in place
of W in a linear or conv input-VJP, f' dropped in an activation; for direct
feedback alignment psi^T e in place of the whole input-VJP). The oracle
takes T Jacobi (or reverse-topological sweep) steps with autograd VJPs at the
frozen forward values,

    x_v <- x_v + eta * (sum over consumers c of J_cv^T x_c - x_v),

the output clamped to dL/dout, and reads the weight gradients off the final
states. A CNN with BatchNorm and pooling, a residual network and an attention
block, float64, every variant, both initial states, both schedules: the
engine's literal steps and its closed form must give the oracle's gradients.
The block lists are checked against the engine's own states first, so a
different partition fails loudly instead of comparing other dynamics.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import load_torch_ar

from torch_ar.variants import VARIANTS as ALL_VARIANTS

# Every variant, from the library's one list of them.
VARIANTS = tuple(ALL_VARIANTS)
REL_TOL = 1e-10


class Ops:
    """The ops a block is written with: true ones, the relaxation's (psi,
    every f' dropped), or the weight update's (f' dropped only behind a
    structural op: docs/variants.md, weight_update_derivative)."""

    def __init__(
        self,
        module: nn.Module,
        psi: dict[str, torch.Tensor] | None,
        drop_f: bool,
        behind_structural_only: bool = False,
        error: torch.Tensor | None = None,
    ):
        self.names = {id(m): n for n, m in module.named_modules()}
        self.psi = psi or {}
        self.drop_f = drop_f
        self.behind_structural_only = behind_structural_only
        # Direct feedback: the output error [N, D] that psi projects.
        self.error = error

    def _psi(self, layer: nn.Module) -> torch.Tensor | None:
        return self.psi.get(f"{self.names[id(layer)]}.weight")

    @staticmethod
    def _value_with_grad_of(value: torch.Tensor, through: torch.Tensor) -> torch.Tensor:
        # value's value, through's input-VJP.
        return value.detach() + through - through.detach()

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, layer.weight, layer.bias)
        psi = self._psi(layer)
        if psi is None:
            return y
        if self.error is not None:
            # Rows are samples, or a sample's tokens in a row (the models'
            # own flattening): e repeated over them, projected by psi [in, D].
            e = self.error.repeat_interleave(x.shape[0] // self.error.shape[0], 0)
            return y.detach() + _ConstantVjp.apply(x, e @ psi.t())
        # psi holds W^T's shape: the input-VJP is g @ psi^T.
        return self._value_with_grad_of(y, F.linear(x, psi.t()))

    def conv(self, layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        y = layer(x)
        psi = self._psi(layer)
        if psi is None:
            return y
        if self.error is not None:
            # e at every position of the output, through psi [D, C_in, k, k].
            e = self.error[:, :, None, None].expand(*self.error.shape, *y.shape[2:])
            vjp = torch.nn.grad.conv2d_input(x.shape, psi, e, layer.stride, layer.padding)
            return y.detach() + _ConstantVjp.apply(x, vjp)
        return self._value_with_grad_of(y, F.conv2d(x, psi, None, layer.stride, layer.padding))

    def act(
        self, f: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, behind: bool = False
    ) -> torch.Tensor:
        """f(a); `behind`: a BatchNorm or residual add sits between the
        block's weight op and this activation."""
        y = f(a)
        drop = self.drop_f and (behind or not self.behind_structural_only)
        return self._value_with_grad_of(y, a) if drop else y


class _ConstantVjp(torch.autograd.Function):
    """Zero in the forward; its input-VJP is `vjp` whatever the cotangent
    (direct feedback: an op's input hears the output error, not its output)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, vjp: torch.Tensor) -> torch.Tensor:
        ctx.vjp = vjp
        return torch.zeros((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return ctx.vjp, None


@dataclass
class Block:
    name: str  # the engine's state name without its index: a check of the partition
    inputs: tuple[str, ...]  # earlier blocks, or "x" (the data: no state)
    fn: Callable[..., torch.Tensor]  # fn(ops, *inputs)


# ------------------------------------------------------------------ models


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        return self.fc(torch.flatten(torch.tanh(self.bn2(self.conv2(h))), 1))

    def blocks(self) -> list[Block]:
        return [
            Block(
                "ConvolutionBackward0+NativeBatchNormBackward0+ReluBackward0"
                "+MaxPool2DWithIndicesBackward0",
                ("x",),
                lambda o, x: F.max_pool2d(
                    o.act(torch.relu, self.bn1(o.conv(self.conv1, x)), behind=True), 2
                ),
            ),
            Block(
                "ConvolutionBackward0+NativeBatchNormBackward0+TanhBackward0+ViewBackward0",
                ("b0",),
                lambda o, h: torch.flatten(
                    o.act(torch.tanh, self.bn2(o.conv(self.conv2, h)), behind=True), 1
                ),
            ),
            Block("AddmmBackward0", ("b1",), lambda o, h: o.linear(self.fc, h)),
        ]

    @staticmethod
    def batch() -> torch.Tensor:
        return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = torch.relu(self.b(torch.relu(self.a(h))) + h)
        return self.fc(torch.flatten(F.max_pool2d(y, 2), 1))

    def blocks(self) -> list[Block]:
        return [
            Block(
                "ConvolutionBackward0+ReluBackward0",
                ("x",),
                lambda o, x: o.act(torch.relu, o.conv(self.stem, x)),
            ),
            Block(
                "ConvolutionBackward0+ReluBackward0",
                ("b0",),
                lambda o, h: o.act(torch.relu, o.conv(self.a, h)),
            ),
            # The residual add joins the block of the conv before it; its
            # other input (the stem's state) is an input of the block.
            Block(
                "ConvolutionBackward0+AddBackward0+ReluBackward0+MaxPool2DWithIndicesBackward0"
                "+ViewBackward0",
                ("b1", "b0"),
                lambda o, g, h: torch.flatten(
                    F.max_pool2d(o.act(torch.relu, o.conv(self.b, g) + h, behind=True), 2), 1
                ),
            ),
            Block("AddmmBackward0", ("b2",), lambda o, y: o.linear(self.fc, y)),
        ]

    @staticmethod
    def batch() -> torch.Tensor:
        return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))


class Attention(nn.Module):
    """One head of self-attention with an output projection, a residual to
    the input, mean pooling over tokens and a linear head."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), -1)
        return self.head((torch.tanh(self.o(p @ v)) + x).mean(1))

    def blocks(self) -> list[Block]:
        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B*T, d) -> (B, T, d)
            return t.view(-1, 5, t.shape[-1])

        flat = lambda o, x: x.reshape(-1, x.shape[-1])  # noqa: E731 - a view of the data
        return [
            Block("ViewBackward0", ("x",), flat),
            Block(
                "AddmmBackward0+ViewBackward0+ExpandBackward0+ViewBackward0",
                ("b0",),
                lambda o, x2: tokens(o.linear(self.q, x2)),
            ),
            Block("ViewBackward0", ("x",), flat),
            Block(
                "AddmmBackward0+ViewBackward0+TransposeBackward0+ExpandBackward0"
                "+ReshapeAliasBackward0",
                ("b2",),
                lambda o, x2: tokens(o.linear(self.k, x2)).transpose(1, 2),
            ),
            Block(
                "BmmBackward0+UnsafeViewBackward0+DivBackward0+SoftmaxBackward0"
                "+ExpandBackward0+ViewBackward0",
                ("b1", "b3"),
                lambda o, q, kt: torch.softmax(q @ kt / math.sqrt(q.shape[-1]), -1),
            ),
            Block("ViewBackward0", ("x",), flat),
            Block(
                "AddmmBackward0+ViewBackward0+ExpandBackward0+ViewBackward0",
                ("b5",),
                lambda o, x2: tokens(o.linear(self.v, x2)),
            ),
            Block(
                "BmmBackward0+UnsafeViewBackward0+ViewBackward0",
                ("b4", "b6"),
                lambda o, p, v: (p @ v).reshape(-1, v.shape[-1]),
            ),
            Block(
                "AddmmBackward0+ViewBackward0+TanhBackward0+AddBackward0+MeanBackward1",
                ("b7", "x"),
                lambda o, h, x: (o.act(torch.tanh, tokens(o.linear(self.o, h))) + x).mean(1),
            ),
            Block("AddmmBackward0", ("b8",), lambda o, h: o.linear(self.head, h)),
        ]

    @staticmethod
    def batch() -> torch.Tensor:
        return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(3))


MODELS = {"cnn": CNN, "residual": Residual, "attention": Attention}


# ------------------------------------------------------------------ oracle


def oracle_gradients(
    model: nn.Module,
    x: torch.Tensor,
    target: torch.Tensor,
    psi: dict[str, torch.Tensor],
    variant: str,
    eta: float,
    steps: int,
    init: str,
    schedule: str,
) -> dict[str, torch.Tensor]:
    torch_ar = load_torch_ar()
    spec = torch_ar.VARIANTS[variant]
    blocks = model.blocks()
    names = [f"b{i}" for i in range(len(blocks))]
    true_ops = Ops(model, None, False)
    weight_ops = Ops(model, None, spec.drop_activation_derivative, behind_structural_only=True)
    with torch.no_grad():
        values = {"x": x}
        for name, block in zip(names, blocks):
            values[name] = block.fn(true_ops, *(values[i] for i in block.inputs))
    out = names[-1]
    leaf = values[out].detach().requires_grad_(True)
    (clamped,) = torch.autograd.grad(F.mse_loss(leaf, target), leaf)
    relax_ops = Ops(
        model,
        psi if spec.uses_backward_weights else None,
        spec.drop_activation_derivative,
        error=clamped.reshape(clamped.shape[0], -1) if spec.direct_feedback else None,
    )

    def vjps(states: dict[str, torch.Tensor], consumer: int) -> dict[str, torch.Tensor]:
        block = blocks[consumer]
        if all(i == "x" for i in block.inputs):
            return {}  # reads only the data: feeds no state
        inputs = [values[i].detach().requires_grad_(i != "x") for i in block.inputs]
        with torch.enable_grad():
            y = block.fn(relax_ops, *inputs)
            wanted = [(i, t) for i, t in zip(block.inputs, inputs) if i != "x"]
            grads = torch.autograd.grad(y, [t for _, t in wanted], states[names[consumer]])
        return {i: g for (i, _), g in zip(wanted, grads)}

    states = {
        n: values[n].clone() if init == "forward" else torch.zeros_like(values[n]) for n in names
    }
    states[out] = clamped
    relaxing = names[:-1]
    for _ in range(steps):
        if schedule == "jacobi":
            drive = {n: torch.zeros_like(states[n]) for n in relaxing}
            for c in range(len(blocks)):
                for i, g in vjps(states, c).items():
                    drive[i] = drive[i] + g
            states = {**states, **{n: states[n] + eta * (drive[n] - states[n]) for n in relaxing}}
        else:  # reverse topological: each state reads its consumers' newest values
            for n in reversed(relaxing):
                consumers = [c for c, b in enumerate(blocks) if n in b.inputs]
                drive = sum(vjps(states, c)[n] for c in consumers)
                states[n] = states[n] + eta * (drive - states[n])
    # Weight gradients from the final states, through the weight update's ops.
    params = dict(model.named_parameters())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for name, block in zip(names, blocks):
        inputs = [values[i].detach() for i in block.inputs]
        with torch.enable_grad():
            y = block.fn(weight_ops, *inputs)
            if not y.requires_grad:
                continue  # a view of the data: no parameter
            got = torch.autograd.grad(y, list(params.values()), states[name], allow_unused=True)
        for (n, _), g in zip(params.items(), got):
            if g is not None:
                grads[n] += g
    return grads


def _setup(model_name: str):
    torch.manual_seed(0)
    model = MODELS[model_name]().double()
    x = model.batch().double()
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target


def engine_gradients(model_name: str, variant: str, **settings):
    """(gradients, psi used, stats) of one backward through ARBackward."""
    torch_ar = load_torch_ar()
    model, x, target = _setup(model_name)
    torch.manual_seed(7)
    ar = torch_ar.ARBackward(model, variant=variant, **settings)
    torch.manual_seed(11)  # brSF's draw at the backward
    F.mse_loss(ar(x), target).backward()
    psi = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
    return {n: p.grad for n, p in model.named_parameters()}, psi, ar.last_stats


@pytest.mark.parametrize("model_name", list(MODELS))
def test_oracle_blocks_are_the_engines_states(model_name):
    model, x, target = _setup(model_name)
    _, _, stats = engine_gradients(model_name, "exact", eta=0.5, steps=2)
    blocks = model.blocks()
    engine = sorted(n.split(":", 1)[1] for n in stats.state_names)
    assert engine == sorted(b.name for b in blocks), stats.state_names
    assert stats.num_states == len(blocks)


def _close(got: dict, want: dict, what: str) -> None:
    # Gradients zero in exact arithmetic (a conv bias before train-mode
    # BatchNorm) are held against the whole gradient's norm.
    scale = max(float(g.norm()) for g in want.values())
    for name, g in want.items():
        err = float((got[name] - g).norm()) / max(float(g.norm()), 1e-3 * scale)
        assert err <= REL_TOL, f"{what}: {name} off the oracle by {err:.2e}"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_literal_steps_and_closed_form_equal_the_oracle(model_name, variant):
    settings = [
        (eta, steps, init, schedule)
        for eta, steps in ((0.5, 3), (0.1, 25))
        for init in ("forward", "zero")
        for schedule in ("jacobi", "sweep")
    ]
    for eta, steps, init, schedule in settings:
        common = {"eta": eta, "steps": steps, "init": init, "schedule": schedule}
        what = f"{model_name} {variant} {common}"
        literal, psi, stats = engine_gradients(model_name, variant, evaluation="literal", **common)
        assert stats.evaluation == "literal", what
        closed, psi_closed, stats = engine_gradients(
            model_name, variant, evaluation="closed_form", **common
        )
        assert stats.evaluation == "closed_form", what
        for n in psi:
            assert torch.equal(psi[n], psi_closed[n]), f"{what}: psi of {n} differs"
        model, x, target = _setup(model_name)
        want = oracle_gradients(model, x, target, psi, variant, eta, steps, init, schedule)
        _close(literal, want, f"literal, {what}")
        _close(closed, want, f"closed form, {what}")


def test_the_oracle_is_autograd_where_it_must_be():
    """At eta 1 with D steps the oracle's exact variant is autograd (so the
    oracle's own VJPs and weight read-out are right)."""
    for model_name in MODELS:
        model, x, target = _setup(model_name)
        reference = copy.deepcopy(model)
        F.mse_loss(reference(x), target).backward()
        depth = len(model.blocks())
        want = {n: p.grad for n, p in reference.named_parameters()}
        got = oracle_gradients(model, x, target, {}, "exact", 1.0, depth, "forward", "jacobi")
        _close(got, want, f"oracle at eta 1, {model_name}")

"""Model and graph zoo for the engine specification tests.

Each ``Case`` builds a module, a batch and a loss. ``ar_vs_autograd`` runs the
same batch through an ``ARBackward`` wrapper and through autograd on a deep
copy of the module, and returns the gradient pairs. ``assert_grads_match``
checks them: float64 to a relative error of 1e-10, float32 by cosine
(>= 0.99999), per parameter.

``reference_relaxation`` is a plain-PyTorch transcription of the paper's
relaxation for the paper MLP (one state per layer output, frozen Jacobians),
used to check that the engine runs the literal steps it is asked for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

FORWARD_SEED = 1234
F64_MAX_REL_ERR = 1e-10
F32_MIN_COSINE = 0.99999
# float32 against the reference: relative error per parameter, measured
# against F32_ZERO_FLOOR of the largest gradient's norm where the reference
# is (near) zero.
F32_MAX_REL_ERR = 2e-5
F32_ZERO_FLOOR = 1e-3
TINY = 1e-30


def load_torch_ar():
    """Import the package under test, failing (not skipping) with the reason."""
    try:
        import torch_ar
    except Exception as exc:  # noqa: BLE001 - any import failure is reported as a test failure
        pytest.fail(f"import torch_ar failed: {type(exc).__name__}: {exc}")
    if not hasattr(torch_ar, "ARBackward"):
        pytest.fail("torch_ar.ARBackward is missing (is the extension built?)")
    return torch_ar


# --------------------------------------------------------------------------
# Comparison metrics
# --------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / max(||b||, tiny), in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / max(float(b.norm()), TINY))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    denom = float(a.norm()) * float(b.norm())
    if denom == 0.0:
        return 1.0 if float(a.norm()) == float(b.norm()) else 0.0
    return float(a @ b) / denom


def tree_map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(tree_map_tensors(fn, o) for o in obj)
    if isinstance(obj, list):
        return [tree_map_tensors(fn, o) for o in obj]
    if isinstance(obj, dict):
        return {k: tree_map_tensors(fn, v) for k, v in obj.items()}
    return obj


def tree_tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tree_map_tensors(out.append, obj)
    return out


def move(obj: Any, device: str, dtype: torch.dtype) -> Any:
    """Move tensors to ``device``; floating tensors also take ``dtype``."""

    def one(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    return tree_map_tensors(one, obj)


# --------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------


def paper_mlp() -> nn.Sequential:
    """784-300-300-100-10, ReLU hidden, linear output (Millidge et al. 2020)."""
    return nn.Sequential(
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def small_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


class CatResidual(nn.Module):
    """Two branches joined by torch.cat, then a residual add around a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(12, 8)
        self.right = nn.Linear(12, 8)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.left(x))
        b = torch.tanh(self.right(x))
        c = torch.cat([a, b], dim=1)
        h = torch.relu(self.mix(c)) + c
        return self.head(h)


class SharedWeight(nn.Module):
    """The same Linear applied twice: its gradient sums both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.sigmoid(self.shared(h))
        return self.out(h)


class TwoOutputs(nn.Module):
    """Two outputs; the second is computed from the first and from a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.first = nn.Linear(16, 6)
        self.from_first = nn.Linear(6, 3)
        self.from_body = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.body(x))
        y1 = self.first(h)
        y2 = self.from_first(torch.tanh(y1)) + self.from_body(h)
        return y1, y2


class DictOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.logits = nn.Linear(16, 5)
        self.aux = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.body(x))
        return {"logits": self.logits(h), "aux": self.aux(h)}


class FunctionalAttention(nn.Module):
    """GELU, a product of two activations and a softmax attention block."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        # A key bias only shifts each score row by a constant, which softmax
        # cancels: its gradient is exactly zero, so leave it out.
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        self.scale = 1.0 / math.sqrt(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        o = attn @ v
        h = F.gelu(o) * torch.sigmoid(self.gate(x))
        return self.head(h.mean(dim=1))


class DropoutNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Dropout(0.2),
            nn.Linear(32, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + F.dropout(x[:, :4], p=0.5, training=self.training)


class ControlFlow(nn.Module):
    """Data-dependent branch and a loop whose count is an argument."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.step = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, repeats: int = 1) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for _ in range(repeats):
            h = torch.relu(self.step(h)) + h
        if h.mean() > 0:
            h = h * 2.0
        else:
            h = torch.sigmoid(h)
        return self.out(h)


def batchnorm_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16, bias=False),
        nn.BatchNorm1d(16),
        nn.Tanh(),
        nn.Linear(16, 10),
    )


def pool_activation_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 8, 3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d((3, 3)),
        nn.Flatten(),
        nn.Linear(72, 24),
        nn.Sigmoid(),
        nn.Linear(24, 16),
        nn.SiLU(),
        nn.Linear(16, 10),
    )


def conv1d_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(4, 8, 5, padding=2),
        nn.SiLU(),
        nn.Conv1d(8, 8, 3, stride=2),
        nn.LeakyReLU(0.2),
        nn.AdaptiveAvgPool1d(4),
        nn.Flatten(),
        nn.Linear(32, 6),
    )


class BroadcastParams(nn.Module):
    """Raw parameters that broadcast: their gradients must be summed to their shape."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 16) / 4)
        self.scale = nn.Parameter(torch.rand(16) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 16) / 10)
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.matmul(x, self.weight) * self.scale + self.shift)
        return self.out(h * self.gain)


class EmbeddingBag(nn.Module):
    """Integer inputs: an embedding lookup, then a mean and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(tokens)).mean(dim=1))


class LossInside(nn.Module):
    """The module returns the scalar loss itself (a common training pattern)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), labels)


class SameTensorTwice(nn.Module):
    """The same tensor returned as two outputs, and an output that is a hidden layer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.body(x))
        y = self.head(h)
        return y, y, h


class ScaledSquare(torch.autograd.Function):
    """A custom op the engine cannot know: it must use the op's own backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return 0.5 * x * x + x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x + 1.0)


class CustomFunctionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ScaledSquare.apply(torch.tanh(self.inp(x)))
        h = torch.relu(self.mid(h))
        return self.out(h)


class NaNGrad(torch.autograd.Function):
    """Identity forward whose backward returns NaN: relaxation must refuse it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * float("nan")


class NaNGradNet(nn.Module):
    """NaN from a backward inside the second layer (block): it lands in the
    first layer's relaxing state, which the relaxation must report."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        return self.out(NaNGrad.apply(torch.relu(self.mid(h))))


class Checkpointed(nn.Module):
    """A block under ``torch.utils.checkpoint`` between plain layers (both forms)."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.pre = nn.Linear(10, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.pre(x))
        h = checkpoint(self.block, h, use_reentrant=self.use_reentrant)
        return self.head(torch.tanh(h))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block from ``nn.Linear`` projections (so every
    linear has a backward weight in the psi variants). Masked scores are -inf
    before the softmax: causal, or where ``key_padding`` is True."""

    def __init__(self, width: int, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.norm1 = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        # A key bias shifts each score row by a constant that softmax cancels.
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff1 = nn.Linear(width, 2 * width)
        self.ff2 = nn.Linear(2 * width, width)

    def forward(self, h: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        a = self.norm1(h)
        scores = self.q(a) @ self.k(a).transpose(-2, -1) / math.sqrt(a.shape[-1])
        length = h.shape[1]
        if self.causal:
            future = torch.ones(length, length, dtype=torch.bool, device=h.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        if key_padding is not None:
            scores = scores.masked_fill(key_padding[:, None, :], float("-inf"))
        h = h + self.out(torch.softmax(scores, dim=-1) @ self.v(a))
        return h + self.ff2(F.gelu(self.ff1(self.norm2(h))))


class TinyCausalLM(nn.Module):
    """GPT-like: token and position embeddings, a causal block, an output head
    tied to the token embedding. Data enters only as token ids."""

    def __init__(self, vocab: int = 20, width: int = 8, length: int = 6) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(length, width)
        self.block = AttentionBlock(width, causal=True)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        h = self.tokens(ids) + self.positions(where)
        return self.head(self.norm(self.block(h)))


class TinyEncoder(nn.Module):
    """BERT-like: token, position and segment embeddings, a padded
    bidirectional block, a pooled classification head."""

    def __init__(self, vocab: int = 20, width: int = 8, length: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width, padding_idx=0)
        self.positions = nn.Embedding(length, width)
        self.segments = nn.Embedding(2, width)
        self.norm = nn.LayerNorm(width)
        self.block = AttentionBlock(width, causal=False)
        self.pool = nn.Linear(width, width)
        self.classify = nn.Linear(width, classes)

    def forward(self, ids: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1], device=ids.device)
        h = self.norm(self.tokens(ids) + self.positions(where) + self.segments(segments))
        h = self.block(h, key_padding=ids == 0)
        return self.classify(torch.tanh(self.pool(h[:, 0])))


class Outer(nn.Module):
    """A plain model with an inner block that may be wrapped in ARBackward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.pre = nn.Linear(10, 12)
        self.inner = inner
        self.post = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.tanh(self.inner(torch.tanh(self.pre(x)))))


# --------------------------------------------------------------------------
# Cases: a module, a batch and a loss
# --------------------------------------------------------------------------


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def _ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, target)


def _pair_loss(out: tuple[torch.Tensor, torch.Tensor], target: Any) -> torch.Tensor:
    y1, y2 = out
    return F.cross_entropy(y1, target[0]) + F.mse_loss(y2, target[1])


def _first_only_loss(out: tuple[torch.Tensor, torch.Tensor], target: Any) -> torch.Tensor:
    return F.cross_entropy(out[0], target[0])


def _dict_loss(out: dict[str, torch.Tensor], target: Any) -> torch.Tensor:
    return F.cross_entropy(out["logits"], target[0]) + 0.5 * F.mse_loss(out["aux"], target[1])


def _loss_is_output(out: torch.Tensor, target: Any) -> torch.Tensor:
    return out


def _same_twice_loss(out: tuple[torch.Tensor, ...], target: Any) -> torch.Tensor:
    y1, y2, h = out
    return F.cross_entropy(y1, target) + (y2**2).mean() + 0.1 * h.sum()


@dataclass(frozen=True)
class Case:
    """A module builder, a batch builder and a loss.

    ``batch(gen)`` returns ``(args, kwargs, target)`` on the CPU in float64;
    ``make_batch`` moves them to the device and dtype of the test.
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], tuple[tuple, dict, Any]]
    loss: Callable[[Any, Any], torch.Tensor]
    train: bool = True
    tags: frozenset[str] = field(default_factory=frozenset)


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _labels(gen: torch.Generator, n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen)


def _vector_ce_batch(in_features: int, classes: int, n: int = 8):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, in_features),), {}, _labels(gen, n, classes)

    return batch


def _image_ce_batch(channels: int, size: int, classes: int, n: int = 4):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, channels, size, size),), {}, _labels(gen, n, classes)

    return batch


def _paper_mlp_batch(n: int = 8):
    def batch(gen: torch.Generator):
        x = torch.rand(n, 784, generator=gen, dtype=torch.float64)
        target = F.one_hot(_labels(gen, n, 10), 10).double()
        return (x,), {}, target

    return batch


def _two_target_batch(n: int = 8):
    def batch(gen: torch.Generator):
        x = _randn(gen, n, 10)
        return (x,), {}, (_labels(gen, n, 6), _randn(gen, n, 3))

    return batch


def _dict_batch(n: int = 8):
    def batch(gen: torch.Generator):
        x = _randn(gen, n, 10)
        return (x,), {}, (_labels(gen, n, 5), _randn(gen, n, 2))

    return batch


def _control_flow_batch(n: int = 8):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, 12),), {"repeats": 3}, _labels(gen, n, 4)

    return batch


def _token_batch(n: int = 6):
    def batch(gen: torch.Generator):
        tokens = torch.randint(0, 20, (n, 5), generator=gen)
        return (tokens,), {}, _labels(gen, n, 4)

    return batch


def _language_batch(n: int = 3, vocab: int = 20, length: int = 6):
    def batch(gen: torch.Generator):
        ids = torch.randint(0, vocab, (n, length), generator=gen)
        return (ids,), {}, torch.randint(0, vocab, (n, length), generator=gen)

    return batch


def _encoder_batch(n: int = 4, vocab: int = 20, length: int = 6):
    def batch(gen: torch.Generator):
        ids = torch.randint(1, vocab, (n, length), generator=gen)
        ids[1:, length - 2 :] = 0  # padding at the end of all but the first sequence
        segments = (torch.arange(length) >= length // 2).long().expand(n, -1).clone()
        return (ids, segments), {}, _labels(gen, n, 3)

    return batch


def _token_ce(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.flatten(0, 1), target.flatten())


def _loss_inside_batch(n: int = 8):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, 10), _labels(gen, n, 4)), {}, None

    return batch


def _conv1d_batch(n: int = 4):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, 4, 20),), {}, _labels(gen, n, 6)

    return batch


def _attention_batch(n: int = 4):
    def batch(gen: torch.Generator):
        return (_randn(gen, n, 5, 8),), {}, _labels(gen, n, 3)

    return batch


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "paper_mlp_mse",
            paper_mlp,
            _paper_mlp_batch(),
            _mse,
            tags=frozenset({"core"}),
        ),
        Case("single_linear", lambda: nn.Linear(10, 4), _vector_ce_batch(10, 4), _ce),
        Case(
            "small_cnn",
            small_cnn,
            _image_ce_batch(3, 16, 10),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case(
            "resnet18_train",
            resnet18,
            _image_ce_batch(3, 32, 10, n=4),
            _ce,
            tags=frozenset({"large"}),
        ),
        Case(
            "cat_residual",
            CatResidual,
            _vector_ce_batch(12, 5),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case(
            "shared_weight",
            SharedWeight,
            _vector_ce_batch(10, 4),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case(
            "two_outputs",
            TwoOutputs,
            _two_target_batch(),
            _pair_loss,
            tags=frozenset({"core"}),
        ),
        Case(
            "two_outputs_first_in_loss",
            TwoOutputs,
            _two_target_batch(),
            _first_only_loss,
        ),
        Case("dict_outputs", DictOutputs, _dict_batch(), _dict_loss),
        Case(
            "functional_attention",
            FunctionalAttention,
            _attention_batch(),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case("dropout_seeded", DropoutNet, _vector_ce_batch(10, 4), _ce),
        Case("control_flow", ControlFlow, _control_flow_batch(), _ce),
        Case("batchnorm_train", batchnorm_cnn, _image_ce_batch(3, 8, 10), _ce),
        Case("batchnorm_eval", batchnorm_cnn, _image_ce_batch(3, 8, 10), _ce, train=False),
        Case("pool_activation_cnn", pool_activation_cnn, _image_ce_batch(3, 12, 10), _ce),
        Case("conv1d", conv1d_net, _conv1d_batch(), _ce),
        Case(
            "broadcast_params",
            BroadcastParams,
            _vector_ce_batch(10, 4),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case("embedding", EmbeddingBag, _token_batch(), _ce),
        Case(
            "checkpoint_reentrant",
            lambda: Checkpointed(use_reentrant=True),
            _vector_ce_batch(10, 4),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case(
            "checkpoint_non_reentrant",
            lambda: Checkpointed(use_reentrant=False),
            _vector_ce_batch(10, 4),
            _ce,
            tags=frozenset({"core"}),
        ),
        Case(
            "causal_lm",
            TinyCausalLM,
            _language_batch(),
            _token_ce,
            tags=frozenset({"core", "tokens"}),
        ),
        Case(
            "bert_encoder",
            TinyEncoder,
            _encoder_batch(),
            _ce,
            tags=frozenset({"tokens"}),
        ),
        Case("loss_inside", LossInside, _loss_inside_batch(), _loss_is_output),
        Case(
            "same_tensor_twice",
            SameTensorTwice,
            _vector_ce_batch(10, 3),
            _same_twice_loss,
        ),
        Case(
            "custom_function",
            CustomFunctionNet,
            _vector_ce_batch(10, 4),
            _ce,
            tags=frozenset({"core"}),
        ),
    ]
}

CORE_CASES = [name for name, c in CASES.items() if "core" in c.tags]


def make_model(case: Case, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = case.build().to(device=device, dtype=dtype)
    model.train(case.train)
    return model


def make_batch(case: Case, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    args, kwargs, target = case.batch(gen)
    return (
        move(args, device, dtype),
        move(kwargs, device, dtype),
        move(target, device, dtype),
    )


def seeded_forward(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Run the forward under a fixed seed so dropout masks agree between runs."""
    torch.manual_seed(FORWARD_SEED)
    return module(*args, **kwargs)


# --------------------------------------------------------------------------
# AR against autograd
# --------------------------------------------------------------------------


@dataclass
class Comparison:
    pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor]]
    ar: nn.Module
    ar_out: Any
    ref_out: Any
    ar_loss: torch.Tensor
    ref_loss: torch.Tensor


def _clone_inputs(args: tuple, requires_grad: bool) -> tuple:
    def one(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        if requires_grad and t.is_floating_point():
            t.requires_grad_(True)
        return t

    return tree_map_tensors(one, args)


def ar_vs_autograd(
    case: Case,
    device: str,
    dtype: torch.dtype,
    ar_kwargs: dict | None = None,
    *,
    input_requires_grad: bool = False,
    use_autograd_grad: bool = False,
    seed: int = 0,
) -> Comparison:
    """Gradients of one batch by ARBackward and by autograd on a deep copy."""
    torch_ar = load_torch_ar()
    model = make_model(case, device, dtype, seed)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **(ar_kwargs or {}))
    args, kwargs, target = make_batch(case, device, dtype, seed)

    ar_args = _clone_inputs(args, input_requires_grad)
    ref_args = _clone_inputs(args, input_requires_grad)

    ar_out = seeded_forward(ar, ar_args, kwargs)
    ref_out = seeded_forward(ref, ref_args, kwargs)
    ar_loss = case.loss(ar_out, target)
    ref_loss = case.loss(ref_out, target)

    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    ar_params = dict(model.named_parameters())
    ref_params = dict(ref.named_parameters())
    ar_inputs = [t for t in tree_tensors(ar_args) if t.requires_grad]
    ref_inputs = [t for t in tree_tensors(ref_args) if t.requires_grad]

    if use_autograd_grad:
        ar_grads = torch.autograd.grad(ar_loss, [ar_params[n] for n in names] + ar_inputs)
        ref_grads = torch.autograd.grad(ref_loss, [ref_params[n] for n in names] + ref_inputs)
    else:
        ar_loss.backward()
        ref_loss.backward()
        ar_grads = [ar_params[n].grad for n in names] + [t.grad for t in ar_inputs]
        ref_grads = [ref_params[n].grad for n in names] + [t.grad for t in ref_inputs]

    keys = names + [f"input[{i}]" for i in range(len(ar_inputs))]
    pairs = {}
    for k, a, b in zip(keys, ar_grads, ref_grads):
        if b is None:
            # Autograd gives no gradient (the tensor does not reach the loss);
            # AR may give none or an all-zero one, never a non-zero one.
            assert a is None or not a.any(), f"{k}: AR gradient is non-zero where autograd has none"
            continue
        pairs[k] = (a, b)
    return Comparison(pairs, ar, ar_out, ref_out, ar_loss, ref_loss)


def grad_errors(
    pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor]],
) -> dict[str, float]:
    return {k: (math.inf if a is None else rel_err(a, b)) for k, (a, b) in pairs.items()}


def grad_cosines(
    pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor]],
) -> dict[str, float]:
    return {k: (-math.inf if a is None else cosine(a, b)) for k, (a, b) in pairs.items()}


def f32_errors(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Per-parameter relative error of float32 gradients, against
    F32_ZERO_FLOOR of the largest reference norm where a reference is (near)
    zero in exact arithmetic (a bias before a train-mode norm)."""
    scale = max(float(b.detach().double().norm()) for _, b in pairs.values())
    return {
        k: float((a.detach().double() - b.detach().double()).norm())
        / max(float(b.detach().double().norm()), F32_ZERO_FLOOR * scale, TINY)
        for k, (a, b) in pairs.items()
    }


def assert_grads_match(
    pairs: dict[str, tuple[torch.Tensor | None, torch.Tensor]],
    dtype: torch.dtype,
    *,
    max_rel_err: float = F64_MAX_REL_ERR,
    min_cosine: float = F32_MIN_COSINE,
) -> None:
    """float64: per-tensor relative error; float32: per-tensor relative error
    (floored) and cosine."""
    assert pairs, "no gradients to compare"
    missing = [k for k, (a, _) in pairs.items() if a is None]
    assert not missing, f"ARBackward produced no gradient for {missing}"
    for k, (a, b) in pairs.items():
        assert a.shape == b.shape, f"{k}: AR grad shape {tuple(a.shape)} != {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{k}: AR grad dtype {a.dtype} != {b.dtype}"
        assert a.device == b.device, f"{k}: AR grad device {a.device} != {b.device}"
    if dtype == torch.float64:
        errs = grad_errors(pairs)
        bad = {k: e for k, e in errs.items() if not e <= max_rel_err}
        assert not bad, f"relative error above {max_rel_err}: {bad}"
    else:
        # Relative error, as torch.testing.assert_close holds float32 (a cosine
        # passes a gradient twice too large); against a floor of the largest
        # gradient's norm where one is zero in exact arithmetic.
        errs = f32_errors(pairs)
        bad = {k: e for k, e in errs.items() if not e <= F32_MAX_REL_ERR}
        assert not bad, f"relative error above {F32_MAX_REL_ERR}: {bad}"
        coss = grad_cosines(pairs)
        bad = {k: c for k, c in coss.items() if not c >= min_cosine}
        assert not bad, f"cosine below {min_cosine}: {bad}"


def assert_outputs_equal(a: Any, b: Any) -> None:
    ta, tb = tree_tensors(a), tree_tensors(b)
    assert type(a) is type(b), f"output type {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"output keys {list(a)} != {list(b)}"
    assert len(ta) == len(tb)
    for x, y in zip(ta, tb):
        assert torch.equal(x.detach(), y.detach()), "ARBackward changed the forward output"


# --------------------------------------------------------------------------
# Plain-PyTorch reference relaxation for the paper MLP
# --------------------------------------------------------------------------


def loss_gradient_at_output(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss
) -> torch.Tensor:
    """dL/dy for the MLP output: the value the output state is clamped to."""
    y = model(x).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(y, target), y)
    return g


def reference_relaxation(
    mlp: nn.Sequential,
    x: torch.Tensor,
    g: torch.Tensor,
    *,
    eta: float,
    steps: int,
    init: str = "forward",
    schedule: str = "jacobi",
) -> dict[str, torch.Tensor]:
    """Parameter gradients after ``steps`` relaxation steps on a Linear/ReLU MLP.

    One state per layer output (post-activation), the output clamped to ``g``,
    Jacobians frozen at the forward values:
    ``x_l <- x_l + eta * (W_{l+1}^T (f'(a_{l+1}) * x_{l+1}) - x_l)``.
    Jacobi reads the previous step's states; the sweep updates from the output
    down, each layer reading its consumer's fresh state.
    """
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    with torch.no_grad():
        hs = [x]
        pre = []
        for i, lin in enumerate(linears):
            a = lin(hs[-1])
            pre.append(a)
            hs.append(torch.relu(a) if i < len(linears) - 1 else a)
        n = len(linears)
        # d[l] = f'(a_l): ReLU derivative on hidden layers, 1 on the output.
        deriv = [(a > 0).to(a.dtype) for a in pre[:-1]] + [torch.ones_like(pre[-1])]
        if init == "forward":
            states = [h.clone() for h in hs[1:n]]
        else:
            states = [torch.zeros_like(h) for h in hs[1:n]]
        states.append(g.clone())

        def pulled(layer: int, consumer_state: torch.Tensor) -> torch.Tensor:
            # Input-VJP of layer ``layer + 1`` (0-based linears[layer + 1]).
            return (deriv[layer + 1] * consumer_state) @ linears[layer + 1].weight

        for _ in range(steps):
            if schedule == "jacobi":
                old = [s.clone() for s in states]
                for layer in range(n - 1):
                    states[layer] = old[layer] + eta * (pulled(layer, old[layer + 1]) - old[layer])
            else:
                for layer in reversed(range(n - 1)):
                    states[layer] = states[layer] + eta * (
                        pulled(layer, states[layer + 1]) - states[layer]
                    )

        grads: dict[str, torch.Tensor] = {}
        index = {id(m): str(i) for i, m in enumerate(mlp)}
        for layer, lin in enumerate(linears):
            delta = deriv[layer] * states[layer]
            grads[f"{index[id(lin)]}.weight"] = delta.t() @ hs[layer]
            grads[f"{index[id(lin)]}.bias"] = delta.sum(0)
        return grads

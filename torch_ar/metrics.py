"""Agreement of AR gradients with autograd's: per-parameter cosine and angle,
and the reference gradient they are measured against."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors as flat vectors (1.0 when both are zero)."""
    a = a.detach().flatten().double()
    b = b.detach().flatten().double()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return max(-1.0, min(1.0, (a @ b).item() / (na * nb)))


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors as flat vectors, in degrees, accurate near 0 and 180.

    acos(cosine) loses half the digits near 0 (about 1e-5 degrees between
    equal float64 tensors, from rounding in the cosine); 2 atan2(|u - v|,
    |u + v|) of the unit vectors does not. 0 when both are zero, 90 when one is.
    """
    a = a.detach().flatten().double()
    b = b.detach().flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0 if na == nb else 90.0
    u, v = a / na, b / nb
    return math.degrees(2.0 * math.atan2((u - v).norm().item(), (u + v).norm().item()))


def angle_from_cosine(c: float) -> float:
    """The angle, in degrees, whose cosine is `c` (clamped to [-1, 1]).

    For a cosine known without its tensors (the engine's per-step
    `cosine_trace`): below about 1e-6 degrees it carries only the cosine's
    rounding; `angle_degrees` is accurate there.
    """
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b the reference)."""
    diff = (a.detach().double() - b.detach().double()).norm().item()
    return diff / max(b.detach().double().norm().item(), 1e-300)


def compare_gradients(
    grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> dict[str, dict[str, float]]:
    """Per-parameter cosine, angle and relative error of grads against reference."""
    out = {}
    for name, ref in reference.items():
        g = grads.get(name)
        if g is None:
            continue
        out[name] = {
            "cosine": cosine(g, ref),
            "angle": angle_degrees(g, ref),
            "rel_err": relative_error(g, ref),
        }
    return out


class RandomState:
    """The CPU generator's state, and the CUDA generators' of `devices`, now.

    `replay()` runs a block from this state and leaves the generators outside
    it untouched, so a second pass over the same batch draws the same dropout
    masks as the first.
    """

    def __init__(self, devices: Iterable[torch.device | int | str] = ()) -> None:
        self.cpu = torch.get_rng_state()
        indices = []
        for d in devices:
            d = torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
            if d.type == "cuda":
                indices.append(d.index if d.index is not None else torch.cuda.current_device())
        self.cuda = {i: torch.cuda.get_rng_state(i) for i in dict.fromkeys(indices)}

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=list(self.cuda)):
            torch.set_rng_state(self.cpu)
            for index, state in self.cuda.items():
                torch.cuda.set_rng_state(state, index)
            yield


def gradients_at(
    module: nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    inputs: Sequence[Any],
    params: Sequence[torch.Tensor],
    random_state: RandomState | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of `loss_fn(module(*inputs))` with respect to `params`, by
    `torch.autograd.grad`: autograd's for a plain module, the relaxation's for
    an `ARBackward`.

    The pass replays `random_state` when given (the state captured before the
    step being checked, so that dropout draws the same masks) and leaves the
    module's buffers (BatchNorm's running statistics) as they were, so that
    measuring does not change a training run. `.grad` is not touched; a
    parameter the loss does not reach gets None.
    """
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    replay = random_state.replay() if random_state is not None else contextlib.nullcontext()
    try:
        with replay:
            loss = loss_fn(module(*inputs))
            return torch.autograd.grad(loss, list(params), allow_unused=True)
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(buffers[name])


def ar_vs_autograd(
    ar: nn.Module, loss_fn: Callable[[Any], torch.Tensor], *inputs: Any
) -> dict[str, dict[str, float]]:
    """Cosine/angle/rel-err of ARBackward's gradients to autograd's on one batch.

    Both passes start from the same random state, so dropout masks agree, and
    leave the buffers (BatchNorm's running statistics) as they were.

    Example::

        stats = torch_ar.metrics.ar_vs_autograd(ar, lambda out: F.cross_entropy(out, y), x)
        min(s["cosine"] for s in stats.values())
    """
    named = [(n, p) for n, p in ar.module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    devices = {t.device for t in [*inputs, *params] if isinstance(t, torch.Tensor) and t.is_cuda}
    state = RandomState(devices)
    reference = gradients_at(ar.module, loss_fn, inputs, params, state)
    grads = gradients_at(ar, loss_fn, inputs, params, state)
    return compare_gradients(
        {n: g for (n, _), g in zip(named, grads) if g is not None},
        {n: r for (n, _), r in zip(named, reference) if r is not None},
    )

"""Agreement of AR gradients with autograd's: per-parameter cosine and angle."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
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
    """Angle between two tensors as flat vectors, in degrees."""
    return math.degrees(math.acos(cosine(a, b)))


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


def gradients_of(
    module: nn.Module,
    forward: Callable[[nn.Module], torch.Tensor],
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """{name: d loss / d param} for loss = forward(module), via torch.autograd.grad."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if names is not None:
        keep = set(names)
        named = [(n, p) for n, p in named if n in keep]
    loss = forward(module)
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def ar_vs_autograd(
    ar: nn.Module, loss_fn: Callable[[Any], torch.Tensor], *inputs: Any
) -> dict[str, dict[str, float]]:
    """Cosine/angle/rel-err of ARBackward's gradients to autograd's on one batch.

    The autograd reference runs on a copy of the wrapped module with the same
    random state, so dropout masks agree and BatchNorm buffers are not touched twice.

    Example::

        stats = torch_ar.metrics.ar_vs_autograd(ar, lambda out: F.cross_entropy(out, y), x)
        min(s["cosine"] for s in stats.values())
    """
    module = ar.module
    reference_module = copy.deepcopy(module)
    devices = [t.device for t in inputs if isinstance(t, torch.Tensor) and t.is_cuda]
    with torch.random.fork_rng(devices=devices):
        ref = gradients_of(reference_module, lambda m: loss_fn(m(*inputs)))
    grads = gradients_of(module, lambda m: loss_fn(ar(*inputs)))
    return compare_gradients(grads, ref)

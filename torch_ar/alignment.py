"""How far a variant is from backprop: per-layer alignment metrics for logging.

Two measures, both cheap enough to log every few training steps:

- ``backward_weight_angles``: the angle between each backward weight psi and
  the tensor that would make it exact (W^T for linear layers, W for conv).
- ``variant_gradient_cosines``: the cosine of each parameter's variant
  gradient to the true (autograd) gradient on one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from torch_ar.backward_weights import is_transposed, weight_as_read
from torch_ar.metrics import angle_degrees, ar_vs_autograd


def exact_backward_weight(module: nn.Module, weight_name: str) -> torch.Tensor:
    """The psi that makes the layer's input-VJP exact, in psi's layout: W^T
    for every 2-D weight (nn.Linear, nn.MultiheadAttention's projections,
    Hugging Face's Conv1D, a weight read by F.linear), W for conv.

    Example::

        psi_star = exact_backward_weight(net, "0.weight")   # net[0] is nn.Linear
        psi_star.shape == net[0].weight.t().shape
    """
    with torch.no_grad():
        weight = weight_as_read(module, weight_name).detach()
    return weight.t() if is_transposed(weight) else weight


def backward_weight_angles(ar: nn.Module) -> dict[str, float]:
    """{forward weight name: angle in degrees between psi and its exact value}.

    The exact value is W^T for linear layers and W for convolutions, so 0 means
    the layer propagates exactly as backprop would; independent random
    matrices are close to 90 degrees apart. Empty for variants without
    backward weights and for direct feedback alignment, whose psi projects
    the output error and so stands for no weight.

    Example::

        ar = torch_ar.ARBackward(net, variant="learned_backward_weights")
        ...  # train
        logger.log({f"angle/{k}": v for k, v in backward_weight_angles(ar).items()})
    """
    angles = {}
    if ar.relax_config.variant_spec.direct_feedback:
        return angles  # psi projects the output error: it stands for no weight
    for name, psi in ar.backward_weights().items():
        angles[name] = angle_degrees(psi, exact_backward_weight(ar.module, name))
    return angles


def variant_gradient_cosines(
    ar: nn.Module, loss_fn: Callable[[Any], torch.Tensor], *inputs: Any
) -> dict[str, float]:
    """{parameter name: cosine of the variant's gradient to the autograd gradient}.

    Runs one forward and one relaxation on ``inputs`` with ``loss_fn(output)``
    as the loss, and one autograd backward on a copy of the wrapped module; the
    parameters' ``.grad`` are not touched, so it can be called between
    training steps (BatchNorm in train mode updates its running statistics
    once, as any forward does). 1.0 means the variant follows backprop on
    this batch.

    Example::

        cosines = variant_gradient_cosines(ar, lambda out: F.mse_loss(out, y), x)
        logger.log({f"grad_cosine/{k}": v for k, v in cosines.items()})
    """
    stats = ar_vs_autograd(ar, loss_fn, *inputs)
    return {name: s["cosine"] for name, s in stats.items()}

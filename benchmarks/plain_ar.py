"""Activation Relaxation in plain PyTorch, written from the paper's equations.

The baseline that benchmarks/bench_paper.py compares torch_ar against: what a
researcher writes from Millidge et al. (2020, arXiv 2009.05359), as the
original code does, a Python loop over steps and layers with plain tensor ops.

States. Every hidden layer output x_l (l = 1..L-1) is a neuron state,
initialised to its forward value; the output state x_L is clamped to dL/dout.
Each step updates every state from the previous step's values (Jacobi, the
paper's parallel phase)::

    x_l <- x_l + eta * (-x_l + J_l^T x_{l+1}),   J_l = d x_{l+1} / d x_l

With eta = 1 the states equal backprop's dL/dx_l after L-1 steps. The
gradients are then read off the states at the end of the relaxation::

    dL/dW_l = (f'(a_l) * x_{l+1})^T h_l,   dL/db_l = sum over the batch

(h_l the forward input of layer l, a_l its pre-activation).

Two implementations:

- ``mlp_*``: Linear + ReLU/Tanh/Sigmoid/identity layers with the Jacobians
  written out (``J^T v = (f'(a) * v) @ W``), f' computed once after the
  forward pass;
- ``blocks_*``: any ``nn.Sequential`` split into blocks (a module with
  parameters and the parameter-free modules after it); ``J^T v`` by
  ``torch.autograd.grad(block_out, block_in, v, retain_graph=True)``.

Example::

    from plain_ar import ar_gradients_mlp
    grads = ar_gradients_mlp(model, x, target, F.mse_loss, eta=0.1, steps=100)
    # grads: one tensor per model.parameters(), in that order
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def output_gradient(out: torch.Tensor, target: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    """dL/dout: the clamped output state."""
    with torch.enable_grad():
        leaf = out.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(leaf, target), leaf)
    return grad


# --------------------------------------------------------------------------
# MLP with explicit Jacobians
# --------------------------------------------------------------------------

_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid)


@dataclass
class MLPLayer:
    linear: nn.Linear
    activation: nn.Module | None  # None: identity


def mlp_layers(model: nn.Sequential) -> list[MLPLayer]:
    """The (Linear, activation) layers of a Sequential MLP (a leading Flatten is allowed)."""
    layers: list[MLPLayer] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Flatten) and not layers:
            continue
        if isinstance(m, nn.Linear):
            layers.append(MLPLayer(m, None))
        elif isinstance(m, _ACTIVATIONS) and layers and layers[-1].activation is None:
            layers[-1].activation = m
        else:
            raise TypeError(f"mlp_layers: unsupported module {i}: {type(m).__name__}")
    return layers


def _act(activation: nn.Module | None, a: torch.Tensor) -> torch.Tensor:
    if activation is None:
        return a
    if isinstance(activation, nn.ReLU):
        return torch.relu(a)
    if isinstance(activation, nn.Tanh):
        return torch.tanh(a)
    return torch.sigmoid(a)


def _act_derivative(
    activation: nn.Module | None, a: torch.Tensor, h: torch.Tensor
) -> torch.Tensor | None:
    """f'(a) given a and h = f(a); None for the identity."""
    if activation is None:
        return None
    if isinstance(activation, nn.ReLU):
        return (a > 0).to(a.dtype)
    if isinstance(activation, nn.Tanh):
        return 1 - h * h
    return h * (1 - h)


@dataclass
class MLPForward:
    layers: list[MLPLayer]
    h: list[torch.Tensor]  # h[0] input, h[l+1] output of layer l
    fprime: list[torch.Tensor | None]  # f'(a_l) per layer


@torch.no_grad()
def mlp_forward(layers: list[MLPLayer], x: torch.Tensor) -> MLPForward:
    """Forward pass keeping every activation and f'(a_l)."""
    h = [x.flatten(1)]
    fprime: list[torch.Tensor | None] = []
    for layer in layers:
        a = nn.functional.linear(h[-1], layer.linear.weight, layer.linear.bias)
        out = _act(layer.activation, a)
        fprime.append(_act_derivative(layer.activation, a, out))
        h.append(out)
    return MLPForward(layers, h, fprime)


def _delta(fp: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
    return state if fp is None else fp * state


@torch.no_grad()
def mlp_relax(
    fw: MLPForward,
    grad_out: torch.Tensor,
    eta: float,
    steps: int,
    schedule: str = "jacobi",
) -> list[torch.Tensor]:
    """Relaxed states x_1..x_L (x_L = grad_out, clamped), as a list indexed by layer output."""
    L = len(fw.layers)
    x = [None] + [fw.h[i].clone() for i in range(1, L)] + [grad_out]  # x[0] unused
    # Updating in place in ascending order reads x_{i+1} before it is updated
    # in this step: the Jacobi (parallel) update. Descending order is the
    # Gauss-Seidel sweep from the output down.
    order = range(1, L) if schedule == "jacobi" else range(L - 1, 0, -1)
    for _ in range(steps):
        for i in order:
            W = fw.layers[i].linear.weight
            jt = _delta(fw.fprime[i], x[i + 1]) @ W  # J_l^T x_{i+1}
            x[i] += eta * (jt - x[i])
    return x


@torch.no_grad()
def mlp_weight_grads(fw: MLPForward, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """dL/dW_l and dL/db_l from the relaxed states, in model.parameters() order."""
    grads: list[torch.Tensor] = []
    for i, layer in enumerate(fw.layers):
        delta = _delta(fw.fprime[i], x[i + 1])
        grads.append(delta.t() @ fw.h[i])
        if layer.linear.bias is not None:
            grads.append(delta.sum(0))
    return grads


def ar_gradients_mlp(
    model: nn.Sequential,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn: LossFn,
    eta: float = 0.1,
    steps: int = 100,
    schedule: str = "jacobi",
) -> list[torch.Tensor]:
    """AR gradients of an MLP, one per model.parameters() (explicit Jacobians)."""
    fw = mlp_forward(mlp_layers(model), x)
    states = mlp_relax(fw, output_gradient(fw.h[-1], target, loss_fn), eta, steps, schedule)
    return mlp_weight_grads(fw, states)


# --------------------------------------------------------------------------
# Any Sequential, Jacobians by autograd per block
# --------------------------------------------------------------------------


def split_blocks(model: nn.Sequential) -> list[nn.Sequential]:
    """Blocks of a Sequential: each module with parameters plus the parameter-free ones after it.

    Parameter-free modules before the first parametric one join the first block.
    """
    blocks: list[list[nn.Module]] = [[]]
    seen_params = False
    for m in model:
        has_params = any(True for _ in m.parameters(recurse=True))
        if has_params and seen_params:
            blocks.append([])
        seen_params = seen_params or has_params
        blocks[-1].append(m)
    return [nn.Sequential(*b) for b in blocks]


@dataclass
class BlocksForward:
    blocks: list[nn.Sequential]
    inputs: list[torch.Tensor]  # detached block inputs (requires_grad except the first)
    outputs: list[torch.Tensor]  # block outputs, each with its own small graph


def blocks_forward(blocks: list[nn.Sequential], x: torch.Tensor) -> BlocksForward:
    """Forward pass block by block; each block's graph starts at its own detached input."""
    inputs, outputs = [], []
    h = x
    with torch.enable_grad():
        for k, block in enumerate(blocks):
            inp = h.detach().requires_grad_(k > 0)
            out = block(inp)
            inputs.append(inp)
            outputs.append(out)
            h = out
    return BlocksForward(blocks, inputs, outputs)


def blocks_relax(
    fw: BlocksForward,
    grad_out: torch.Tensor,
    eta: float,
    steps: int,
    schedule: str = "jacobi",
) -> list[torch.Tensor]:
    """Relaxed states: x[k] is the state of block k's output; x[-1] = grad_out (clamped)."""
    n = len(fw.blocks)
    x = [o.detach().clone() for o in fw.outputs[:-1]] + [grad_out]
    # Block k (k >= 1) maps state k-1 to state k; ascending in place = Jacobi.
    order = range(1, n) if schedule == "jacobi" else range(n - 1, 0, -1)
    for _ in range(steps):
        for k in order:
            (jt,) = torch.autograd.grad(fw.outputs[k], fw.inputs[k], x[k], retain_graph=True)
            with torch.no_grad():
                x[k - 1] += eta * (jt - x[k - 1])
    return x


def blocks_weight_grads(fw: BlocksForward, x: list[torch.Tensor]) -> list[torch.Tensor]:
    """Parameter gradients from the relaxed states, in model.parameters() order."""
    grads: list[torch.Tensor] = []
    for k, block in enumerate(fw.blocks):
        params = list(block.parameters())
        if params:
            grads += torch.autograd.grad(fw.outputs[k], params, x[k])
    return grads


def ar_gradients_blocks(
    model: nn.Sequential,
    x: torch.Tensor,
    target: torch.Tensor,
    loss_fn: LossFn,
    eta: float = 0.1,
    steps: int = 100,
    schedule: str = "jacobi",
) -> list[torch.Tensor]:
    """AR gradients of any Sequential, one per model.parameters() (autograd per block)."""
    fw = blocks_forward(split_blocks(model), x)
    states = blocks_relax(
        fw, output_gradient(fw.outputs[-1], target, loss_fn), eta, steps, schedule
    )
    return blocks_weight_grads(fw, states)


def autograd_gradients(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn: LossFn
) -> list[torch.Tensor]:
    """Backprop's gradients, the reference."""
    with torch.enable_grad():
        return list(torch.autograd.grad(loss_fn(model(x), target), list(model.parameters())))

"""Capture: run the wrapped module so that its autograd graph is private.

The module runs on detached copies of the inputs (leaves that require grad, so
the graph shows which nodes depend on data), with its own parameters. The engine
reads that graph from the outputs' grad_fn; the outer autograd graph only sees
one node, the ARBackward function. Walking the autograd graph (rather than
torch.fx) covers functional ops, Python control flow, shared weights and
multiple outputs alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class ForwardValueRecorder(TorchFunctionMode):
    """Keeps the tensors produced during forward, to start states from them.

    Only used when the initial state matters (init="forward" with literal
    steps). A state whose tensor was made inside a composite op and never
    surfaced at the torch level is rebuilt by the engine from the last
    recorded tensor of its block through the view-like ops between them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._record(out)
        return out

    def _record(self, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            if out.grad_fn is not None:
                self.values.append(out)
        elif isinstance(out, (tuple, list)):
            for item in out:
                self._record(item)


def make_input_leaf(t: torch.Tensor) -> torch.Tensor:
    """A private leaf for a floating input: the graph then shows data dependence."""
    if t.is_floating_point():
        return t.detach().requires_grad_(True)
    return t.detach()

"""What the engine knows about each autograd node (its op table, read from C++)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SupportedOp:
    """One row of the engine's op table (`supported_ops()`).

    Attributes:
        node: autograd node name, e.g. `"ReluBackward0"`.
        op: what users call it.
        role: `"structural"` (starts a layer), `"lookup"`, `"elementwise"` or
            `"view"` (joins the layer below).
        specialised: the engine has an input-only VJP of its own (else it calls
            the op's backward with the parameter edges hidden).
        activation: a nonlinearity f: passes states through without f' in the
            variants that drop it.
        backward_weight: takes psi in the variants without weight transport.
        fused_update: its f' is applied by the state update kernel (no VJP
            launch of its own).
    """

    node: str  # autograd node name, e.g. "ReluBackward0"
    op: str  # what users call it
    role: str  # "structural" (starts a layer), "elementwise" or "view" (joins it)
    specialised: bool  # input-only VJP of the engine's own (else the op's backward)
    activation: bool  # a nonlinearity f: passes states through without f'
    backward_weight: bool  # takes psi in the variants without weight transport
    fused_update: bool  # its f' is applied by the state update kernel (no own VJP launch)


def supported_ops() -> list[SupportedOp]:
    """The engine's op table. Every other differentiable op is a generic structural node.

    Example::

        [o.op for o in torch_ar.supported_ops() if o.specialised]
    """
    rows = []
    for line in torch.ops.torch_ar.supported_ops():
        node, op, role, kind, activation, psi, fused = line.split("|")
        rows.append(
            SupportedOp(
                node,
                op,
                role,
                kind == "specialised",
                activation == "activation",
                psi != "",
                fused == "fused",
            )
        )
    return rows


def release_cuda_graph_memory() -> int:
    """Gives back the memory of the CUDA graphs that no relaxation is using.

    With ``cuda_graph=True`` each backward records its steps into a memory pool
    that the next backward reuses, so memory stays flat across batches; the
    pool is kept while the process runs, and ``torch.cuda.empty_cache()``
    alone cannot return it. This releases every idle pool, then empties the
    CUDA cache as ``torch.cuda.empty_cache()`` does (unless a relaxation on
    another thread holds a graph at that moment: its capture must see no
    free, so the released blocks then stay cached until the next call or
    ``torch.cuda.empty_cache()``), and returns the number of pools released
    (0 without CUDA graphs). The next graphed backward makes a new pool.

    Example::

        torch_ar.release_cuda_graph_memory()
        print(torch.cuda.memory_reserved())
    """
    return int(torch.ops.torch_ar.release_cuda_graph_memory())

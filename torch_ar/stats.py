"""RelaxationStats: what a backward's relaxation did, built from what the
engine returns (only when `ARBackward.last_stats` is read)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from torch_ar.config import RelaxConfig


@dataclass
class RelaxationStats:
    """What the last backward's relaxation did (`ARBackward.last_stats`).

    Attributes:
        steps: relaxation steps taken (D for the exact single sweep, which is
            identical to D literal Jacobi steps at eta 1), or evaluated in
            closed form.
        evaluation: how: `"exact_sweep"` (eta 1: each layer once),
            `"closed_form"` (the outcome of `steps` literal steps by Horner's
            rule) or `"literal"`.
        sweeps: passes over the layers that applied the relaxation's linear
            map J: 1 for the exact sweep, at most D - 1 for the closed form,
            one per step for the literal steps.
        depth: D, the longest path in layers from a relaxing state to an
            output.
        converged: tol met, or exact by construction (eta 1 and enough
            steps), or the last update below 1e-6 relative.
        exact_shortcut: the states were computed by one reverse sweep instead
            of simulated steps (eta 1, no trace); the result is the same fixed
            point.
        max_residual: the largest of `residuals`.
        residuals: final relative residual |target - x| / |target| per state:
            of the last step taken (literal), of the returned states (closed
            form: what step steps + 1 would measure), or zero (exact sweep).
        state_names: the states, named by the autograd node and output that
            make them.
        num_states: the states, the outputs (clamped to the loss gradient)
            included.
        nonfinite: a state became NaN/Inf and was let through to the
            gradients (`nonfinite="propagate"`, or `"auto"` under autocast).
        residual_trace: [steps, num_states] residuals per step (`trace=True`).
        cosine_trace: parameter name -> [steps] cosine of its gradient to the
            exact gradient after each step (`trace_cosine=True`).
        graph_steps: steps replayed from a recorded CUDA graph
            (`cuda_graph=True`).
        fused_activations: states whose activation derivative the update
            kernel applied (`fuse_activations=True`, literal steps).
        relaxing_states: states that relax (`num_states` less the outputs).
        params_outside_relaxation: parameters whose gradient depends on no
            relaxing state (the output layer's; every parameter when the model
            has no relaxing state, where AR is backprop).
        inlined_checkpoints: `torch.utils.checkpoint` regions that the forward
            ran as plain code so that their layers could relax (see
            `torch_ar.checkpointing`).
    """

    steps: int
    depth: int
    converged: bool
    exact_shortcut: bool
    max_residual: float
    nonfinite: bool
    state_names: list[str]
    residuals: dict[str, float]
    residual_trace: torch.Tensor | None = None
    cosine_trace: dict[str, torch.Tensor] | None = None
    graph_steps: int = 0
    fused_activations: int = 0
    relaxing_states: int = 0
    params_outside_relaxation: int = 0
    inlined_checkpoints: int = 0
    evaluation: str = "literal"
    sweeps: int = 0
    num_states: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_states = len(self.state_names)


def stats_from_engine(
    config: RelaxConfig,
    leaves: tuple[list[str], int],
    relaxation: Any,
    inlined_checkpoints: int,
) -> RelaxationStats:
    """The stats of one relaxation from the engine object's named stats
    (`torch_ar._C.RelaxStats`), with the leaves' names for the cosine trace."""
    s = relaxation.stats()
    param_names, num_inputs = leaves
    leaf_names = param_names + [f"input{i}" for i in range(num_inputs)]
    names = list(s.state_names)
    cosines = None
    trace = s.cosine_trace
    if config.trace_cosine and trace is not None and trace.numel():
        cosines = {
            name: trace[:, i].clone()
            for i, name in enumerate(leaf_names)
            if not torch.isnan(trace[:, i]).all()
        }
    residuals = s.residuals
    return RelaxationStats(
        steps=s.steps,
        depth=s.depth,
        converged=s.converged,
        exact_shortcut=s.exact_shortcut,
        max_residual=s.max_residual,
        nonfinite=s.nonfinite,
        state_names=names,
        residuals=(
            {n: float(r) for n, r in zip(names, residuals.tolist())}
            if residuals is not None
            else dict.fromkeys(names, 0.0)
        ),
        residual_trace=s.residual_trace if config.trace else None,
        cosine_trace=cosines,
        graph_steps=s.graph_steps,
        fused_activations=s.fused_activations,
        relaxing_states=s.relaxing_states,
        params_outside_relaxation=s.params_outside_relaxation,
        evaluation=s.evaluation,
        sweeps=s.sweeps,
        inlined_checkpoints=inlined_checkpoints,
    )

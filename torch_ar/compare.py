"""Cosine of AR gradients to autograd's as the relaxation proceeds (the paper's figure 1).

For one batch, each step size ``eta`` gets its own ``ARBackward`` with
``trace_cosine=True``; its ``last_stats.cosine_trace`` holds, per parameter,
the cosine after every step of the gradient read off the current states to
the true (autograd) gradient. For the variants the reference is still true
autograd, so the traces show how far each variant's fixed point lies from it.

Example::

    from torch_ar.compare import relaxation_traces
    traces = relaxation_traces(model, loss_fn, x, y, etas=(0.1, 0.5, 1.0), steps=200)
    print(traces.format_table())
    traces.cosine[0.1]["1.weight"][-1]   # cosine after the last step
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torch_ar.metrics import cosine
from torch_ar.training import _replay_rng, _rng_state

# Relaxation steps shown in the printed table (those up to the run's steps, and the last).
TABLE_STEPS = (1, 2, 5, 10, 20, 50, 100, 200)


def _angle(c: float) -> float:
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


@dataclass
class RelaxationTraces:
    """Per-step cosines of the AR gradients to autograd's, for several step sizes.

    ``cosine[eta][name][t]`` is the cosine after step ``t + 1``;
    ``final_cosine[eta][name]`` compares the gradients the backward actually
    returned with autograd's (it equals the last traced step).
    """

    etas: list[float]
    steps: int
    parameters: list[str]
    cosine: dict[float, dict[str, list[float]]]
    final_cosine: dict[float, dict[str, float]]
    depth: int
    settings: dict[str, Any] = field(default_factory=dict)

    def angle(self, eta: float, name: str) -> list[float]:
        """Angle in degrees to the autograd gradient after each step."""
        return [_angle(c) for c in self.cosine[eta][name]]

    def table_steps(self) -> list[int]:
        shown = [s for s in TABLE_STEPS if s <= self.steps]
        return shown if shown and shown[-1] == self.steps else [*shown, self.steps]

    def at_step(self, eta: float, step: int) -> dict[str, float]:
        """min / mean cosine and max / mean angle over the parameters after ``step`` steps."""
        values = [self.cosine[eta][n][step - 1] for n in self.parameters]
        angles = [_angle(c) for c in values]
        return {
            "cosine_min": min(values),
            "cosine_mean": sum(values) / len(values),
            "angle_max": max(angles),
            "angle_mean": sum(angles) / len(angles),
        }

    def format_table(self) -> str:
        """The cosine table (min / mean over parameters), one row per step, one column per eta."""
        width = 17
        head = "  step | " + " | ".join(f"eta {eta:g}".center(width) for eta in self.etas)
        lines = [
            (
                f"cosine of AR gradients to autograd's (min / mean over {len(self.parameters)} "
                f"parameters) after each relaxation step; depth D = {self.depth}"
            ),
            head,
            "-" * len(head),
        ]
        for step in self.table_steps():
            cells = []
            for eta in self.etas:
                s = self.at_step(eta, step)
                cells.append(f"{s['cosine_min']:.4f} / {s['cosine_mean']:.4f}".center(width))
            lines.append(f"{step:6d} | " + " | ".join(cells))
        lines.append(
            "largest angle to autograd after the last step: "
            + ", ".join(
                f"eta {eta:g} {self.at_step(eta, self.steps)['angle_max']:.3g} deg"
                for eta in self.etas
            )
        )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Settings, and per eta the per-parameter cosine and angle at the table's steps."""
        table = {}
        for eta in self.etas:
            rows = {}
            for step in self.table_steps():
                per_param = {
                    n: {
                        "cosine": self.cosine[eta][n][step - 1],
                        "angle_deg": _angle(self.cosine[eta][n][step - 1]),
                    }
                    for n in self.parameters
                }
                rows[str(step)] = {**self.at_step(eta, step), "parameters": per_param}
            table[f"{eta:g}"] = rows
        return {
            "etas": self.etas,
            "steps": self.steps,
            "depth": self.depth,
            "parameters": self.parameters,
            "settings": self.settings,
            "by_step": table,
            "final_gradient_cosine": {f"{eta:g}": self.final_cosine[eta] for eta in self.etas},
        }

    def write_csv(self, path: str | Path) -> None:
        """Every step: one row per (eta, step, parameter) with cosine and angle."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["eta", "step", "parameter", "cosine", "angle_deg"])
            for eta in self.etas:
                for name in self.parameters:
                    for t, c in enumerate(self.cosine[eta][name], start=1):
                        writer.writerow([f"{eta:g}", t, name, f"{c:.7f}", f"{_angle(c):.5f}"])


def relaxation_traces(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    etas: Sequence[float] = (0.1, 0.5, 1.0),
    steps: int = 200,
    **ar_options: Any,
) -> RelaxationTraces:
    """Relax on one batch at each ``eta`` for ``steps`` literal steps and record the cosines.

    ``ar_options`` go to ``ARBackward`` (``init``, ``schedule``, ``granularity``,
    ``variant``, ...). Every wrapper starts from the same random state, so the
    variants' backward weights and any dropout masks agree across etas and with
    the autograd reference. The model's parameters and buffers are left as found.
    """
    from torch_ar import ARBackward  # late: the engine is only needed here

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    device = params[0].device if params else x.device
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def restore_buffers() -> None:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(buffers[n])

    construction = _rng_state(device)
    wrappers = []
    for eta in etas:
        with _replay_rng(construction, device):
            wrappers.append(
                ARBackward(model, eta=eta, steps=steps, trace_cosine=True, **ar_options)
            )
    forward = _rng_state(device)
    with _replay_rng(forward, device):
        reference = torch.autograd.grad(loss_fn(model(x), y), params, allow_unused=True)
    restore_buffers()

    traces: dict[float, dict[str, list[float]]] = {}
    finals: dict[float, dict[str, float]] = {}
    depth = 0
    for eta, ar in zip(etas, wrappers, strict=True):
        with _replay_rng(forward, device):
            grads = torch.autograd.grad(loss_fn(ar(x), y), params, allow_unused=True)
        restore_buffers()
        stats = ar.last_stats
        trace = stats.cosine_trace or {}
        depth = stats.depth
        traces[eta] = {n: trace[n].double().tolist() for n in names if n in trace}
        finals[eta] = {
            n: cosine(g, r)
            for n, g, r in zip(names, grads, reference, strict=True)
            if g is not None and r is not None
        }
    traced = [n for n in names if all(n in traces[eta] for eta in etas)]
    if not traced:
        raise RuntimeError("the relaxation recorded no cosine trace for any parameter")
    return RelaxationTraces(
        etas=list(etas),
        steps=steps,
        parameters=traced,
        cosine={eta: {n: traces[eta][n] for n in traced} for eta in etas},
        final_cosine=finals,
        depth=depth,
        settings=dict(ar_options),
    )

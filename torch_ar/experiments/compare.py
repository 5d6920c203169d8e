"""Cosine of AR gradients to autograd's as the relaxation proceeds (the paper's figure 1).

For one batch, each step size ``eta`` gets its own ``ARBackward`` with
``trace_cosine=True``; its ``last_stats.cosine_trace`` holds, per parameter,
the cosine after every step of the gradient read off the current states to
the true (autograd) gradient. With ``at`` (a list of step counts) each count
is instead evaluated in closed form, one backward per count, which costs the
same whatever the count: the way to look at thousands of steps on a CNN. For
the variants the reference is still true autograd, so the traces show how far
each variant's fixed point lies from it.

``recommend_steps`` finds the smallest step count at which every parameter's
AR gradient matches autograd's on a batch, in direction (cosine) and length
(the closed form makes the search cheap).

Example::

    from torch_ar.experiments.compare import relaxation_traces, recommend_steps
    traces = relaxation_traces(model, loss_fn, x, y, etas=(0.1, 0.5, 1.0), steps=200)
    print(traces.format_table())
    traces.cosine[0.1]["1.weight"][-1]   # cosine after the last step
    steps, cosines = recommend_steps(model, loss_fn, x, y, eta=0.1)
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

from torch_ar.metrics import RandomState, angle_from_cosine, cosine, gradients_at

# Relaxation steps shown in the printed table (those recorded, and the last).
TABLE_STEPS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
# A parameter whose autograd gradient is this small against the largest one
# is zero in exact arithmetic (a key bias before a softmax): its cosine is
# rounding noise, so the step recommendation leaves it out.
NEGLIGIBLE_GRADIENT = 1e-6


def log_steps(last: int, per_decade: int = 8) -> list[int]:
    """About ``per_decade`` step counts per factor of ten from 1 to ``last`` (both
    included), and the counts the table shows."""
    counts = {1, last, *(s for s in TABLE_STEPS if s <= last)}
    k = 0
    while True:
        value = round(10 ** (k / per_decade))
        if value >= last:
            break
        counts.add(value)
        k += 1
    return sorted(counts)


@dataclass
class RelaxationTraces:
    """Per-step cosines of the AR gradients to autograd's, for several step sizes.

    ``cosine[eta][name][i]`` is the cosine after ``recorded[i]`` steps (every
    step 1..steps for the literal traces, the chosen counts for the closed
    form); ``final_cosine[eta][name]`` compares the gradients the backward
    actually returned with autograd's (it equals the last recorded count).
    ``recommended`` holds, per eta, the step count ``recommend_steps`` found
    (None: not asked, or not reached).
    """

    etas: list[float]
    steps: int
    parameters: list[str]
    cosine: dict[float, dict[str, list[float]]]
    final_cosine: dict[float, dict[str, float]]
    depth: int
    settings: dict[str, Any] = field(default_factory=dict)
    recorded: list[int] = field(default_factory=list)
    evaluation: str = "literal"
    recommended: dict[float, int | None] = field(default_factory=dict)
    recommend_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.recorded:
            self.recorded = list(range(1, self.steps + 1))
        self._index = {step: i for i, step in enumerate(self.recorded)}

    def angle(self, eta: float, name: str) -> list[float]:
        """Angle in degrees to the autograd gradient after each step."""
        return [angle_from_cosine(c) for c in self.cosine[eta][name]]

    def table_steps(self) -> list[int]:
        if len(self._index) <= len(TABLE_STEPS):  # a few chosen counts (--at): all of them
            return sorted(self._index)
        shown = [s for s in TABLE_STEPS if s in self._index]
        return shown if shown and shown[-1] == self.steps else [*shown, self.steps]

    def value(self, eta: float, name: str, step: int) -> float:
        """The cosine of one parameter after ``step`` steps (a recorded count)."""
        return self.cosine[eta][name][self._index[step]]

    def at_step(self, eta: float, step: int) -> dict[str, float]:
        """min / mean cosine and max / mean angle over the parameters after ``step`` steps."""
        values = [self.value(eta, n, step) for n in self.parameters]
        angles = [angle_from_cosine(c) for c in values]
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
        if self.recommended:
            lines.append(
                f"recommended steps (every parameter's cosine >= {self.recommend_threshold:g} "
                f"and length within {100 * math.sqrt(2 * (1 - self.recommend_threshold)):.1f}% "
                "of autograd's on this batch): "
                + ", ".join(
                    f"eta {eta:g} {'not reached' if t is None else t}"
                    for eta, t in self.recommended.items()
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
                        "cosine": self.value(eta, n, step),
                        "angle_deg": angle_from_cosine(self.value(eta, n, step)),
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
            "evaluation": self.evaluation,
            "recorded_steps": self.recorded,
            "by_step": table,
            "final_gradient_cosine": {f"{eta:g}": self.final_cosine[eta] for eta in self.etas},
            "recommended_steps": {f"{eta:g}": t for eta, t in self.recommended.items()},
            "recommend_threshold": self.recommend_threshold,
            # what recommend_steps requires besides the cosine (absent: cosine only)
            "recommend_length_tolerance": (
                math.sqrt(2.0 * (1.0 - self.recommend_threshold))
                if self.recommend_threshold is not None
                else None
            ),
        }

    def write_csv(self, path: str | Path) -> None:
        """Every step: one row per (eta, step, parameter) with cosine and angle."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["eta", "step", "parameter", "cosine", "angle_deg"])
            for eta in self.etas:
                for name in self.parameters:
                    for t, c in zip(self.recorded, self.cosine[eta][name], strict=True):
                        writer.writerow(
                            [f"{eta:g}", t, name, f"{c:.7f}", f"{angle_from_cosine(c):.5f}"]
                        )


class _Probe:
    """AR gradients of one batch against autograd's, for any relaxation settings.

    Every wrapper is built from the same random state (the variants' backward
    weights agree) and every forward replays the same random state (dropout
    masks agree); the model's buffers are restored after each forward.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.device = self.params[0].device if self.params else x.device
        self.construction = RandomState([self.device])
        self.forward = RandomState([self.device])
        self.reference = self.gradients(model)

    def wrapper(self, **options: Any) -> nn.Module:
        from torch_ar import ARBackward  # late: the engine is only needed here

        with self.construction.replay():
            return ARBackward(self.model, **options)

    def gradients(self, module: nn.Module) -> tuple[torch.Tensor | None, ...]:
        def loss(out: Any) -> torch.Tensor:
            return self.loss_fn(out, self.y)

        return gradients_at(module, loss, (self.x,), self.params, self.forward)

    def cosines(self, module: nn.Module) -> dict[str, float]:
        return self.compare(module)[0]

    def compare(self, module: nn.Module) -> tuple[dict[str, float], dict[str, float]]:
        """Per parameter: cosine to autograd's gradient, and length relative to it."""
        cos, length = {}, {}
        for n, g, r in zip(self.names, self.gradients(module), self.reference, strict=True):
            if g is not None and r is not None:
                cos[n] = cosine(g, r)
                reference = float(r.double().norm())
                length[n] = float(g.double().norm()) / reference if reference > 0 else math.inf
        return cos, length

    def relevant(self) -> list[str]:
        """Parameters whose autograd gradient is not zero in exact arithmetic."""
        norms = {
            n: float(r.norm())
            for n, r in zip(self.names, self.reference, strict=True)
            if r is not None
        }
        largest = max(norms.values(), default=0.0)
        return [n for n, v in norms.items() if v > NEGLIGIBLE_GRADIENT * largest]


def recommend_steps(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    eta: float = 0.1,
    threshold: float = 0.999,
    max_steps: int = 100_000,
    **ar_options: Any,
) -> tuple[int | None, dict[str, float]]:
    """The smallest step count at which every parameter's AR gradient matches autograd's:
    cosine >= ``threshold`` and length within ``sqrt(2 (1 - threshold))`` of it
    (4.5% at 0.999: the distance cosine 0.999 allows between vectors of equal
    length). The cosine alone is blind to scale: from zero initial states a
    chain's layer k below the output carries exactly P[Binomial(T, eta) >= k+1]
    of its gradient, cosine 1 at any T >= k+1 however small that share.

    On one batch, in closed form: doubling from 1 until both hold, then
    bisection between the last count that missed and the first that met them.
    Parameters whose autograd gradient is zero in exact arithmetic (below 1e-6
    of the largest) are left out. Returns (None, cosines at ``max_steps``) when
    even ``max_steps`` misses it.

    Example::

        steps, cosines = recommend_steps(cnn, F.cross_entropy, x, y, eta=0.1)
    """
    probe = _Probe(model, loss_fn, x, y)
    relevant = probe.relevant()

    length_tolerance = math.sqrt(2.0 * (1.0 - threshold))

    def measure(steps: int) -> tuple[bool, dict[str, float]]:
        ar = probe.wrapper(eta=eta, steps=steps, evaluation="closed_form", **ar_options)
        cos, length = probe.compare(ar)
        ok = all(
            cos[n] >= threshold and abs(length[n] - 1.0) <= length_tolerance
            for n in relevant
            if n in cos
        )
        return ok, cos

    low, high = 0, 1  # low misses (0: none tried), high is the count to try
    while True:
        ok, cos = measure(high)
        if ok:
            break
        if high >= max_steps:
            return None, cos
        low, high = high, min(2 * high, max_steps)
    best = cos
    while high - low > 1:
        mid = (low + high) // 2
        ok, cos = measure(mid)
        if ok:
            high, best = mid, cos
        else:
            low = mid
    return high, best


def relaxation_traces(
    model: nn.Module,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    etas: Sequence[float] = (0.1, 0.5, 1.0),
    steps: int = 200,
    at: Sequence[int] | None = None,
    recommend: float | None = None,
    **ar_options: Any,
) -> RelaxationTraces:
    """Relax on one batch at each ``eta`` and record the cosines to autograd.

    Without ``at``: ``steps`` literal steps, the cosines after every one.
    With ``at``: the closed form at each of those step counts (``steps`` is
    then their largest). ``recommend``: also find, per eta, the smallest
    step count with every parameter's cosine >= that threshold
    (``recommend_steps``). ``ar_options`` go to ``ARBackward`` (``init``,
    ``schedule``, ``granularity``, ``variant``, ...). The model's parameters
    and buffers are left as found.
    """
    if at is not None:
        at = sorted({int(t) for t in at})
        if not at or at[0] < 1:
            raise ValueError(f"step counts must be >= 1, got {at}")
        steps = at[-1]
        return _closed_form_traces(model, loss_fn, x, y, etas, at, recommend, ar_options)
    from torch_ar import ARBackward  # late: the engine is only needed here

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    device = params[0].device if params else x.device
    construction = RandomState([device])
    wrappers = []
    for eta in etas:
        with construction.replay():
            wrappers.append(
                ARBackward(model, eta=eta, steps=steps, trace_cosine=True, **ar_options)
            )
    forward = RandomState([device])

    def loss(out: Any) -> torch.Tensor:
        return loss_fn(out, y)

    reference = gradients_at(model, loss, (x,), params, forward)

    traces: dict[float, dict[str, list[float]]] = {}
    finals: dict[float, dict[str, float]] = {}
    depth = 0
    for eta, ar in zip(etas, wrappers, strict=True):
        grads = gradients_at(ar, loss, (x,), params, forward)
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
    result = RelaxationTraces(
        etas=list(etas),
        steps=steps,
        parameters=traced,
        cosine={eta: {n: traces[eta][n] for n in traced} for eta in etas},
        final_cosine=finals,
        depth=depth,
        settings=dict(ar_options),
    )
    if recommend is not None:
        _add_recommendations(result, model, loss_fn, x, y, recommend, ar_options)
    return result


def _add_recommendations(
    traces: RelaxationTraces,
    model: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    threshold: float,
    ar_options: dict[str, Any],
) -> None:
    traces.recommend_threshold = threshold
    for eta in traces.etas:
        traces.recommended[eta] = recommend_steps(
            model, loss_fn, x, y, eta=eta, threshold=threshold, **ar_options
        )[0]


def _closed_form_traces(
    model: nn.Module,
    loss_fn: Callable,
    x: torch.Tensor,
    y: torch.Tensor,
    etas: Sequence[float],
    at: list[int],
    recommend: float | None,
    ar_options: dict[str, Any],
) -> RelaxationTraces:
    probe = _Probe(model, loss_fn, x, y)
    cosines: dict[float, dict[str, list[float]]] = {}
    depth = 0
    for eta in etas:
        per_step = []
        for steps in at:
            ar = probe.wrapper(eta=eta, steps=steps, evaluation="closed_form", **ar_options)
            per_step.append(probe.cosines(ar))
            depth = ar.last_stats.depth
        cosines[eta] = {n: [c[n] for c in per_step] for n in per_step[0]}
    names = [n for n in probe.names if all(n in cosines[eta] for eta in etas)]
    if not names:
        raise RuntimeError("no parameter got an AR gradient")
    traces = RelaxationTraces(
        etas=list(etas),
        steps=at[-1],
        parameters=names,
        cosine={eta: {n: cosines[eta][n] for n in names} for eta in etas},
        final_cosine={eta: {n: cosines[eta][n][-1] for n in names} for eta in etas},
        depth=depth,
        settings=dict(ar_options),
        recorded=at,
        evaluation="closed_form",
    )
    if recommend is not None:
        _add_recommendations(traces, model, loss_fn, x, y, recommend, ar_options)
    return traces

"""Relaxation settings: the one place that holds their defaults and checks them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from torch_ar.variants import VARIANTS, Variant, get_variant

INIT_MODES = ("forward", "zero")
SCHEDULES = ("jacobi", "sweep")
GRANULARITIES = ("layer", "block", "op")
EVALUATIONS = ("auto", "closed_form", "literal")
BACKWARD_WEIGHT_INITS = ("normal", "matched", "xavier", "transpose")
NONFINITE_MODES = ("auto", "raise", "propagate")


# What a command line accepts for an option beyond its type: one of the
# choices, or a number that is "positive" or "nonnegative" (the CLI makes its
# flags from these; RelaxConfig's own checks name the same sets).
OPTION_CHOICES: dict[str, tuple[str, ...]] = {
    "init": INIT_MODES,
    "schedule": SCHEDULES,
    "granularity": GRANULARITIES,
    "variant": tuple(sorted(VARIANTS)),
    "backward_weight_init": BACKWARD_WEIGHT_INITS,
    "nonfinite": NONFINITE_MODES,
    "evaluation": EVALUATIONS,
}
OPTION_BOUNDS: dict[str, str] = {
    "eta": "positive",
    "steps": "positive",
    "tol": "positive",
    "max_steps": "positive",
    "check_every": "positive",
    "backward_weight_std": "positive",
    "backward_weight_decay": "nonnegative",
}


@dataclass(frozen=True)
class RelaxConfig:
    """How the states relax after the forward pass.

    `ARBackward` takes these as keyword arguments; this dataclass holds their
    defaults and checks them (a `ValueError` naming the option at construction).

    Attributes:
        eta: Euler step size in (0, 1]. With 1 the Jacobi iteration is exact
            after D steps.
        steps: relaxation steps. `None`: D steps at eta 1 (one sweep with
            `schedule="sweep"`), or until `tol` when `tol` is given. eta < 1
            needs `steps` or `tol`.
        tol: stop when every state's relative residual `|x_new - x| / |target|`
            is at most `tol` (capped by `max_steps`).
        init: initial states: `"forward"` (the forward values, as the paper and
            its code) or `"zero"`.
        schedule: `"jacobi"`: every state reads the previous step (the paper's
            parallel phase); `"sweep"`: reverse-topological Gauss-Seidel (what
            the original training loop did).
        granularity: `"block"` (default): a parametrised op (linear, conv or
            embedding lookup) with everything after it up to the next
            parametrised op or branch point (norms, pools, activations, views
            and a residual add, whose other input is then an input of the
            block): the paper's neuron (the MLP keeps its three states), half
            the depth of a ResNet, and a score mask stays inside its block;
            `"layer"`: one state per structural op's output (linear, conv,
            BatchNorm, pooling, an add, ..., with the elementwise and view ops
            after it); `"op"`: one state per op output.
        trace: record every state's residual at every step (forces literal
            steps).
        trace_cosine: record, per step, the cosine of each parameter's current
            gradient to the exact (autograd) gradient (forces literal steps).
        max_steps: cap on the steps when only `tol` is given.
        check_every: on accelerators, read the residuals back (one device
            sync) every this many steps: `tol` and divergence are tested then,
            so a run with `tol` may take up to `check_every - 1` steps more than
            needed. On CPU they are read every step.
        variant: one of `torch_ar.VARIANTS` (default `"exact"`; see the
            Variants page).
        weight_update_derivative: with a variant that drops f' during
            relaxation, still use f' in the weight gradient (the original code
            does).
        backward_weight_init: `"normal"` (N(0, `backward_weight_std`), the
            paper's), `"matched"` (N(0, s) with s the standard deviation of the
            layer's own weight when wrapped: the paper draws psi like W, and a
            CNN's default init gives each layer its own scale), `"xavier"`
            (uniform with bound sqrt(6 / (fan_in + fan_out)) of the layer,
            BioTorch's default) or `"transpose"` (psi = W^T). The sign_symmetry
            variants make psi from W instead.
        backward_weight_std: standard deviation of the `"normal"`
            initialisation.
        backward_weight_decay: Kolen-Pollack decay: adds decay * psi to psi's
            gradient and decay * W to W's, so psi - W^T shrinks; 0 (off) by
            default.
        nonfinite: what a NaN/Inf state does: `"raise"`
            `RelaxationDivergedError` (naming node and step), `"propagate"` it
            into the gradients as autograd would, or `"auto"` (default): raise,
            except when the forward ran under autocast, where a `GradScaler`
            needs the inf gradients to skip the step.
        fuse_activations: the state update kernel also writes `f'(a) * x` for
            states at activation outputs, so the activation runs no VJP of its
            own during relaxation. Same fixed point; `False` gives the unfused
            reference path.
        cuda_graph: on CUDA tensors, record a block of relaxation steps as a
            CUDA graph and replay it for the remaining literal steps (one launch
            per block instead of several per step). Off by default until a GPU
            benchmark has measured it. A graph whose relaxation runs an op's own
            backward (an op not specialised in the op table) relaxes without
            one and warns.
        evaluation: `"auto"` (default): the exact sweep at eta 1 with enough
            steps; with explicit `steps` and no `trace`, `trace_cosine`, `tol` or
            `cuda_graph`, the closed form (the outcome of the `steps` literal
            steps from min(T, D) - 1 input-VJP sweeps, computed without taking
            them; see How it works); otherwise the literal steps.
            `"closed_form"` insists on it (a `ValueError` where only literal
            steps can give what is asked); `"literal"` always steps.
        variant_spec: the parsed `variant` (a `torch_ar.variants.Variant`:
            whether it uses backward weights, drops f', its psi rule); set from
            `variant`, not an argument.
    """

    eta: float = 1.0
    steps: int | None = None
    tol: float | None = None
    init: str = "forward"
    schedule: str = "jacobi"
    granularity: str = "block"
    trace: bool = False
    trace_cosine: bool = False
    max_steps: int = 10_000
    check_every: int = 10
    variant: str = "exact"
    weight_update_derivative: bool = True
    backward_weight_init: str = "normal"
    backward_weight_std: float = 0.05
    backward_weight_decay: float = 0.0
    nonfinite: str = "auto"
    fuse_activations: bool = True
    cuda_graph: bool = False
    evaluation: str = "auto"
    variant_spec: Variant = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(
                f"nonfinite must be 'auto', 'raise' or 'propagate', got {self.nonfinite!r}"
            )
        variant = get_variant(self.variant)
        # The parsed variant, kept (frozen dataclass) so nothing parses it again.
        object.__setattr__(self, "variant_spec", variant)
        if (
            variant.drop_activation_derivative
            and self.weight_update_derivative
            and (self.granularity == "op")
        ):
            raise ValueError(
                f"variant {self.variant!r} with weight_update_derivative=True needs "
                "granularity='block' or 'layer': at op granularity an activation's output is a state "
                "of its own, so the weight update of the layer below cannot see f'. "
                "Use granularity='block' or weight_update_derivative=False."
            )
        if self.backward_weight_init not in BACKWARD_WEIGHT_INITS:
            raise ValueError(
                "backward_weight_init must be 'normal', 'matched', 'xavier' or 'transpose', "
                f"got {self.backward_weight_init!r}"
            )
        if not (
            isinstance(self.backward_weight_std, (int, float)) and self.backward_weight_std > 0
        ):
            raise ValueError(
                f"backward_weight_std must be positive, got {self.backward_weight_std!r}"
            )
        if not (
            isinstance(self.backward_weight_decay, (int, float)) and self.backward_weight_decay >= 0
        ):
            raise ValueError(
                f"backward_weight_decay must be >= 0, got {self.backward_weight_decay!r}"
            )
        if isinstance(self.eta, bool) or not isinstance(self.eta, (int, float)):
            raise ValueError(f"eta must be a number in (0, 1], got {self.eta!r}")  # noqa: TRY004
        if not (math.isfinite(self.eta) and 0.0 < self.eta <= 1.0):
            raise ValueError(f"eta must be in (0, 1], got {self.eta!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"steps must be a positive integer or None, got {self.steps!r}")
        if self.tol is not None and (
            isinstance(self.tol, bool)
            or not isinstance(self.tol, (int, float))
            or not math.isfinite(self.tol)
            or self.tol <= 0
        ):
            raise ValueError(f"tol must be a positive number or None, got {self.tol!r}")
        if self.init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {self.init!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.eta < 1.0 and self.steps is None and self.tol is None:
            raise ValueError(
                f"eta={self.eta} < 1 never reaches the fixed point exactly: give steps "
                "(the paper used 100 at eta 0.1) or tol"
            )
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        for name in ("fuse_activations", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")  # noqa: TRY004
        if self.evaluation not in EVALUATIONS:
            raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {self.evaluation!r}")
        if self.evaluation == "closed_form":
            literal_only = [
                name
                for name, on in (
                    ("trace", self.trace),
                    ("trace_cosine", self.trace_cosine),
                    ("tol", self.tol is not None),
                    ("cuda_graph", self.cuda_graph),
                )
                if on
            ]
            if literal_only:
                raise ValueError(
                    "evaluation='closed_form' gives the outcome of the steps, not each step: "
                    f"{', '.join(literal_only)} needs the literal steps (evaluation='literal' "
                    "or 'auto')"
                )
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be a positive integer, got {self.check_every!r}")


def option_help(name: str) -> str:
    """The description of option ``name`` in RelaxConfig's docstring, on one
    line and as plain text (the CLI's help for its flag: Markdown's code
    marks dropped)."""
    doc = RelaxConfig.__doc__ or ""
    attributes = doc.split("Attributes:", 1)[1]
    match = re.search(rf"^ {{8}}{name}: (.*?)(?=^ {{8}}\w+: |\Z)", attributes, re.M | re.S)
    if match is None:
        raise KeyError(f"RelaxConfig's docstring does not describe {name!r}")
    return re.sub(r"`([^`]*)`", r"\1", " ".join(match.group(1).split()))

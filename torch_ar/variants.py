"""The paper's variants of activation relaxation: the one place that defines them.

Each variant changes the VJPs used during relaxation (and so the fixed point):

- ``exact``: the true Jacobians; the equilibrium is the backprop gradient.
- ``learned_backward_weights``: linear/conv layers propagate through a separate
  backward weight psi instead of W (no weight transport); psi is learned with
  the same increment as W^T (paper section 3).
- ``feedback_alignment``: as above, but psi is random and fixed.
- ``no_nonlinear_derivative``: elementwise activations pass the state through
  unchanged (f' dropped) during relaxation.
- ``combined``: learned backward weights and no nonlinear derivative.
- ``sign_symmetry`` (uSF, Liao, Leibo & Poggio 2016): psi = sign(W) times the
  layer's Xavier standard deviation sqrt(2 / (fan_in + fan_out)), recomputed
  from W at every backward: only the signs of the forward weights travel.
- ``sign_symmetry_fixed_random`` (frSF): psi = |R| * sign(W), R drawn once
  (Xavier uniform) and fixed, the signs from W at every backward.
- ``sign_symmetry_batch_random`` (brSF): psi = |R_t| * sign(W), R_t drawn
  afresh (Xavier uniform) at every backward.
- ``direct_feedback_alignment`` (DFA, Nokland 2016): each linear/conv op
  sends its input psi^T e, a fixed random projection of the output error e
  (repeated over the op's positions), instead of the VJP of the state above;
  f' and every other op's VJP are kept. psi maps the output's size, not the
  layer's outputs (see engine/direct_feedback.h).
The sign rules and their scales are those of BioTorch's usf/frsf/brsf layers,
DFA's those of its dfa layers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """What a variant changes in the relaxation's VJPs.

    Attributes:
        name: the name `ARBackward(variant=...)` takes.
        backward_weights: `"none"`, `"learned"` (psi trained by W's increments)
            or `"fixed"` (psi drawn once, or made from W's signs).
        drop_activation_derivative: activations pass states through without f'.
        summary: one line for tables.
        sign_feedback: psi made from W's signs at every backward
            (`backward_weights="fixed"`): None, `"uniform"` (uSF),
            `"fixed_random"` (frSF) or `"batch_random"` (brSF).
        direct_feedback: psi projects the output error to each linear/conv
            op's input (DFA), instead of the state above it.
    """

    name: str
    backward_weights: str  # "none", "learned" or "fixed"
    drop_activation_derivative: bool
    summary: str
    # psi made from W's signs at every backward (backward_weights "fixed"):
    # None, "uniform" (uSF), "fixed_random" (frSF) or "batch_random" (brSF).
    sign_feedback: str | None = None
    direct_feedback: bool = False

    @property
    def uses_backward_weights(self) -> bool:
        """The variant propagates through psi instead of W."""
        return self.backward_weights != "none"

    def engine_options(self) -> dict[str, bool]:
        """What the variant changes in the engine, by its option names."""
        return {
            "use_backward_weights": self.uses_backward_weights,
            "drop_activation_derivative": self.drop_activation_derivative,
            "direct_feedback": self.direct_feedback,
        }


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("exact", "none", False, "true Jacobians: converges to backprop"),
        Variant(
            "learned_backward_weights",
            "learned",
            False,
            "linear/conv layers propagate through learned psi (no weight transport)",
        ),
        Variant(
            "feedback_alignment",
            "fixed",
            False,
            "linear/conv layers propagate through random fixed psi",
        ),
        Variant(
            "no_nonlinear_derivative",
            "none",
            True,
            "activations pass states through unchanged during relaxation",
        ),
        Variant(
            "combined",
            "learned",
            True,
            "learned psi and no nonlinear derivative",
        ),
        Variant(
            "sign_symmetry",
            "fixed",
            False,
            "psi = sign(W) x the layer's Xavier scale, from W at every backward (uSF)",
            "uniform",
        ),
        Variant(
            "sign_symmetry_fixed_random",
            "fixed",
            False,
            "psi = |R| x sign(W), R random and fixed (frSF)",
            "fixed_random",
        ),
        Variant(
            "sign_symmetry_batch_random",
            "fixed",
            False,
            "psi = |R_t| x sign(W), R_t drawn at every backward (brSF)",
            "batch_random",
        ),
        Variant(
            "direct_feedback_alignment",
            "fixed",
            False,
            "each linear/conv input gets psi^T e, a fixed random projection of the output error (DFA)",
            direct_feedback=True,
        ),
    )
}
"""Every variant by name: `exact` and the paper's and BioTorch's variants without
weight transport or without f' (see the Variants page)."""


def get_variant(name: str) -> Variant:
    """The variant called ``name``; ValueError listing the valid names otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {name!r}") from None

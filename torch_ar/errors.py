"""The engine's error types, raised from C++ (see csrc/python_module.cpp)."""

from __future__ import annotations


class RelaxationDivergedError(RuntimeError):
    """A state became NaN or infinite during relaxation.

    Attributes:
        node: the state's name, as in `RelaxationStats.state_names`.
        step: the relaxation step at which it stopped being finite (for the
            closed form: the Horner stage; for the exact sweep: the state's
            level).
    """

    def __init__(self, message: str, node: str | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.node = node
        self.step = step


class NonFiniteValueError(RelaxationDivergedError):
    """A NaN or infinite value reached the relaxation from outside it: an
    input of the wrapped module, a parameter or backward weight, a module
    output (an overflow in the forward) or the loss gradient. The
    relaxation itself did not diverge. A subclass of
    `RelaxationDivergedError`, so code that catches that still catches it.

    Attributes:
        node: the first non-finite tensor named in the message, as the
            engine names it: `"input 0"`, a parameter's name (its value or
            its psi), `"output 0"` (the forward's output or its loss
            gradient).
        step: 0 (before the first step).
        culprits: every non-finite tensor found, named the same way.
    """

    def __init__(self, message: str, culprits: list[str]) -> None:
        super().__init__(message, culprits[0] if culprits else None, 0)
        self.culprits = culprits


class UnsupportedGraphError(RuntimeError):
    """The wrapped module's forward built a graph that cannot be relaxed as
    it is: it used a tensor that requires grad but is neither a parameter of
    the module nor one of its inputs, or it contains an opaque
    `torch.compile` region. The message says which and what to do.

    Attributes:
        node: the autograd node that cannot be relaxed (`AccumulateGrad` of
            the outside tensor, or the compiled region's node).
    """

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node

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

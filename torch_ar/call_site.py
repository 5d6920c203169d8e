"""Warnings that point at the user's line, not at torch_ar's or torch's.

A warning raised inside the backward reaches Python through
`loss.backward()`, torch's autograd functions and the engine; a fixed
`stacklevel` pointed at `torch/autograd/function.py`. The first frame outside
both packages is the user's.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

_LIBRARY_FOLDERS = tuple(str(Path(m.__file__).resolve().parent) for m in (torch,)) + (
    str(Path(__file__).resolve().parent),
)


def warn_at_call_site(message: str, category: type[Warning] = UserWarning) -> None:
    """`warnings.warn(message, category)` attributed to the innermost frame
    outside torch and torch_ar (the user's call of the module or of backward)."""
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)

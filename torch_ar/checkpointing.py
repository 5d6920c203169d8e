"""Activation checkpointing inside ARBackward: regions run as plain code when relaxing.

``torch.utils.checkpoint`` trades memory for a second forward: the region keeps
no saved tensors and recomputes them when its backward runs. Relaxation calls
every layer's VJP many times (once per literal step, once per closed-form
stage), which neither form of checkpoint survives:

- ``use_reentrant=True`` hides the region behind one autograd node whose
  backward accumulates the region's parameter gradients straight into
  ``.grad`` at every call (so literal steps would count them once per step),
  and variants cannot reach the layers inside it;
- ``use_reentrant=False`` lets each saved tensor be unpacked once per
  backward, so the second relaxation step raises ``CheckpointError``.

Relaxation also needs every layer's Jacobian at once, so recomputing could not
lower its peak memory anyway. While an ``ARBackward`` forward runs with
relaxation steps (anything but the single exact sweep), checkpointed regions
therefore run their function directly: the region's layers become states like
any others and get the gradients the relaxation defines. The exact sweep
evaluates each node once, as autograd does, and keeps checkpointing as it is.

Autograd recomputes a region's saved tensors, so code after the region may
change the region's outputs in place (``checkpoint(...)`` then ``relu_``).
An inlined region cannot recompute (it ran once, as plain code), so it keeps
a private copy of each saved tensor that the graph computed (parameters and
data stay shared): a later in-place op then changes the output, not what
the relaxation reads.

The switch is thread-local: other threads (and code outside ARBackward) see
``torch.utils.checkpoint`` unchanged.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.utils.checkpoint as _checkpoint

_local = threading.local()
_install_lock = threading.Lock()
_installed = False


def _inlining() -> bool:
    return getattr(_local, "depth", 0) > 0


def _count_region() -> None:
    _local.regions = getattr(_local, "regions", 0) + 1


def _private_copy(t: torch.Tensor) -> torch.Tensor:
    # What the graph computed may be changed in place after the region; leaves
    # (parameters, data) change only after the backward, as under autograd.
    return t.clone() if t.grad_fn is not None else t


def _inline_region() -> contextlib.AbstractContextManager:
    """The context an inlined region runs in: its saved tensors kept as copies."""
    return torch.autograd.graph.saved_tensors_hooks(_private_copy, lambda t: t)


class _ReentrantSwitch:
    """Stands in for ``CheckpointFunction``: plain call while inlining, else the original."""

    def __init__(self, original: type) -> None:
        self._original = original

    def apply(self, function, preserve_rng_state, *args):
        if _inlining():
            _count_region()
            with _inline_region():
                return function(*args)
        return self._original.apply(function, preserve_rng_state, *args)

    def __getattr__(self, name: str):
        return getattr(self._original, name)


def _plain_region() -> Iterator[None]:
    # checkpoint() advances the generator once before the function and once after.
    with _inline_region():
        yield


def _make_non_reentrant_switch(original):
    def switch(fn, *args, **kwargs):
        if _inlining():
            _count_region()
            return _plain_region()
        return original(fn, *args, **kwargs)

    switch.__wrapped__ = original
    return switch


def _install() -> bool:
    """Put the switches into torch.utils.checkpoint once; False if its internals moved."""
    global _installed
    with _install_lock:
        if _installed:
            return True
        reentrant = getattr(_checkpoint, "CheckpointFunction", None)
        non_reentrant = getattr(_checkpoint, "_checkpoint_without_reentrant_generator", None)
        if reentrant is None or non_reentrant is None:
            return False
        _checkpoint.CheckpointFunction = _ReentrantSwitch(reentrant)
        _checkpoint._checkpoint_without_reentrant_generator = _make_non_reentrant_switch(
            non_reentrant
        )
        _installed = True
        return True


@contextlib.contextmanager
def inline_checkpoints(enabled: bool) -> Iterator[list[int]]:
    """Run checkpointed regions as plain code in this thread while the block runs.

    Yields a one-element list that holds, after the block, how many regions
    ran inline.
    """
    counted = [0]
    if not enabled or not _install():
        yield counted
        return
    _local.depth = getattr(_local, "depth", 0) + 1
    before = getattr(_local, "regions", 0)
    try:
        yield counted
    finally:
        _local.depth -= 1
        counted[0] = getattr(_local, "regions", 0) - before

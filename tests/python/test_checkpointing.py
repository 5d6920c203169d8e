"""torch.utils.checkpoint regions inside ARBackward (torch_ar/checkpointing.py).

Relaxation evaluates each layer many times. A reentrant region's backward
would add its parameters' gradients to ``.grad`` at every call, and a
non-reentrant region lets each saved tensor be unpacked once per backward; so
while relaxation steps run, ARBackward runs checkpointed regions as plain code
and their layers relax like any others. Every mode must equal autograd
(float64); the exact sweep keeps checkpointing as it is.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointError
from zoo import Checkpointed, load_torch_ar, rel_err

FORMS = [pytest.param(True, id="reentrant"), pytest.param(False, id="non_reentrant")]

MODES = {
    "exact_sweep": ({}, 1e-10),
    "literal_eta1": ({"trace": True}, 1e-10),
    "literal_eta0.5": ({"eta": 0.5, "steps": 200, "evaluation": "literal"}, 1e-9),
    "literal_sweep_eta0.5": (
        {"eta": 0.5, "steps": 200, "schedule": "sweep", "evaluation": "literal"},
        1e-9,
    ),
    "closed_form_eta0.5": ({"eta": 0.5, "steps": 200}, 1e-9),
    "closed_form_sweep_zero_init": (
        {"eta": 0.3, "steps": 300, "schedule": "sweep", "init": "zero"},
        1e-9,
    ),
}


def _problem(use_reentrant: bool, seed: int = 0):
    torch.manual_seed(seed)
    model = Checkpointed(use_reentrant).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(6, 10, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("use_reentrant", FORMS)
@pytest.mark.parametrize("mode", list(MODES))
def test_checkpointed_region_matches_autograd(use_reentrant, mode):
    torch_ar = load_torch_ar()
    kwargs, tol = MODES[mode]
    model, x, y = _problem(use_reentrant)
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    ar = torch_ar.ARBackward(model, **kwargs)
    F.cross_entropy(ar(x), y).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{name}: no gradient"
        assert rel_err(p.grad, q.grad) <= tol, f"{mode}: {name} off by {rel_err(p.grad, q.grad)}"
    stats = ar.last_stats
    inlined = mode != "exact_sweep"
    assert stats.inlined_checkpoints == (1 if inlined else 0)
    if inlined:
        # The region's two layers are states of their own (pre, block[0], block[2]+tanh).
        assert stats.relaxing_states == 3


@pytest.mark.parametrize("use_reentrant", FORMS)
def test_region_is_evaluated_once_per_step_count_independent(use_reentrant):
    """Literal steps must not re-run (or re-accumulate) the region: the gradient of
    1 step and of 50 steps at eta 1 are the same fixed point."""
    torch_ar = load_torch_ar()
    grads = []
    for steps in (3, 50):
        model, x, y = _problem(use_reentrant)
        ar = torch_ar.ARBackward(model, steps=steps, evaluation="literal")
        F.cross_entropy(ar(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-12


def _count_block_calls(model: Checkpointed) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    # On the region's first layer: non-reentrant recomputation runs the
    # region's function without its own module hooks.
    model.block[0].register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("use_reentrant", FORMS)
def test_checkpointing_unchanged_outside_relaxation(use_reentrant):
    """The exact sweep and plain autograd still recompute the region in backward;
    with literal steps the forward runs it once and backward never does."""
    torch_ar = load_torch_ar()
    model, x, y = _problem(use_reentrant)
    calls = _count_block_calls(model)
    F.cross_entropy(torch_ar.ARBackward(model, eta=0.5, steps=20)(x), y).backward()
    assert calls[0] == 1, "inlined region ran again during backward"
    calls[0] = 0
    F.cross_entropy(torch_ar.ARBackward(model)(x), y).backward()
    assert calls[0] == 2, "the exact sweep should keep checkpointing (forward + recompute)"
    calls[0] = 0
    F.cross_entropy(model(x), y).backward()
    assert calls[0] == 2, "plain autograd lost its checkpointing"


def test_inlining_is_thread_local():
    from torch_ar.checkpointing import _inlining, inline_checkpoints

    seen = []
    with inline_checkpoints(True):
        assert _inlining()
        worker = threading.Thread(target=lambda: seen.append(_inlining()))
        worker.start()
        worker.join()
    assert seen == [False]
    assert not _inlining()


@pytest.mark.parametrize("variant", ["feedback_alignment", "no_nonlinear_derivative"])
@pytest.mark.parametrize("use_reentrant", FORMS)
def test_variants_reach_layers_inside_the_region(use_reentrant, variant):
    """A variant acts on the region's layers exactly as on the same model unchecked."""
    torch_ar = load_torch_ar()

    def grads(model, x, y):
        torch.manual_seed(5)  # the same backward weights for both wrappers
        ar = torch_ar.ARBackward(model, variant=variant)
        F.cross_entropy(ar(x), y).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    model, x, y = _problem(use_reentrant)
    plain = copy.deepcopy(model)
    plain.forward = lambda inp: plain.head(torch.tanh(plain.block(torch.relu(plain.pre(inp)))))
    got, expected = grads(model, x, y), grads(plain, x, y)
    for name in expected:
        assert rel_err(got[name], expected[name]) <= 1e-12, name
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    assert rel_err(got["block.0.weight"], ref.block[0].weight.grad) > 1e-3, (
        "the variant did not change the gradient inside the region"
    )


class UnpackOnce(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors that can be read once, as another checkpoint implementation
    (torch.distributed's composable checkpoint, say) may keep them."""

    def __init__(self) -> None:
        def pack(x):
            return [x]

        def unpack(box):
            if not box:
                raise CheckpointError("this saved tensor was already unpacked once")
            return box.pop()

        super().__init__(pack, unpack)


def test_other_checkpoint_implementations_are_refused_clearly():
    """A region that ARBackward cannot run as plain code: a clear error, not a wrong gradient."""
    torch_ar = load_torch_ar()
    model, x, y = _problem(use_reentrant=False)

    def forward(inp):
        h = torch.relu(model.pre(inp))
        with UnpackOnce():
            h = model.block(h)
        return model.head(torch.tanh(h))

    model.forward = forward
    ar = torch_ar.ARBackward(model, eta=0.5, steps=10)
    with pytest.raises(RuntimeError, match="checkpointed region"):
        F.cross_entropy(ar(x), y).backward()


def test_checkpoint_with_a_plain_model_inside_nn_sequential():
    """checkpoint_sequential goes through the same switch."""
    from torch.utils.checkpoint import checkpoint_sequential

    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    seq = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.seq = seq

        def forward(self, x):
            return checkpoint_sequential(self.seq, 2, x, use_reentrant=False)

    model = Wrapped()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 6, dtype=torch.float64)
    ref(x).pow(2).sum().backward()
    ar = torch_ar.ARBackward(model, eta=0.5, steps=200)
    ar(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9
    assert ar.last_stats.inlined_checkpoints >= 1

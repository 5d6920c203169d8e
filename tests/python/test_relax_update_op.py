"""torch.ops.torch_ar.relax_update_ against a plain-PyTorch reference."""

from __future__ import annotations

import pytest
import torch
from conftest import cuda_marks, needs_cuda
from hypothesis import given, settings
from hypothesis import strategies as st

import torch_ar._C  # noqa: F401  (loading the library registers torch.ops.torch_ar)

relax_update_ = torch.ops.torch_ar.relax_update_

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=cuda_marks(),
    ),
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (state/update tolerance, norm tolerance) per dtype. Norms are summed in
# double on both backends, so only the state rounding differs by dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-6),
    torch.float16: (1e-3, 1e-6),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def reference(
    states: list[torch.Tensor],
    targets: list[torch.Tensor],
    eta: float,
    flush_below: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The op's definition in plain PyTorch: new states and the [n, 2] norms."""
    new_states, rows = [], []
    for s, t in zip(states, targets):
        c = compute_dtype(s.dtype)
        d = t.to(c) - s.to(c)
        updated = s.to(c) + eta * d
        updated = torch.where(updated.abs() < flush_below, torch.zeros_like(updated), updated)
        new_states.append(updated.to(s.dtype))
        rows.append(torch.stack([d.double().norm(), t.double().norm()]))
    norms = torch.stack(rows) if rows else torch.empty(0, 2, dtype=torch.float64)
    return new_states, norms


def random_pairs(shapes, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    states = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes]
    targets = [
        torch.randn(s, generator=g, dtype=torch.float64).to(dtype).to(device) for s in shapes
    ]
    return states, targets


def assert_matches_reference(states, targets, eta, flush_below):
    want_states, want_norms = reference(
        [s.clone() for s in states], [t.clone() for t in targets], eta, flush_below
    )
    norms = relax_update_(states, targets, eta, flush_below)
    state_tol, norm_tol = TOLERANCES[states[0].dtype]
    assert norms.dtype == torch.float64
    assert norms.device == states[0].device
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=norm_tol, atol=norm_tol)
    for i, (got, want) in enumerate(zip(states, want_states)):
        torch.testing.assert_close(
            got.double(),
            want.double(),
            rtol=state_tol,
            atol=state_tol,
            msg=lambda m, i=i: f"index {i}: {m}",
        )


SHAPES = [(), (5,), (7, 13), (0, 3), (3, 4, 5), (70001,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eta", [1.0, 0.1])
def test_matches_reference(device, dtype, eta):
    states, targets = random_pairs(SHAPES, dtype, device)
    assert_matches_reference(states, targets, eta, 0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_flush_zeroes_small_values(device, dtype):
    state = torch.zeros(6, dtype=dtype, device=device)
    target = torch.tensor([1e-3, -1e-3, 1e-9, -1e-9, 0.0, 5.0], dtype=dtype, device=device)
    relax_update_([state], [target], 1.0, 1e-6)
    expected = torch.tensor([1e-3, -1e-3, 0.0, 0.0, 0.0, 5.0], dtype=dtype, device=device)
    assert torch.equal(state, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_threshold_keeps_denormals(device):
    tiny = torch.finfo(torch.float32).smallest_normal / 64  # a denormal
    state = torch.zeros(11, device=device)
    target = torch.full((11,), tiny, device=device)
    relax_update_([state], [target], 1.0, 0.0)
    assert torch.equal(state, target)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_states_are_written_back(device):
    base = torch.randn(40, 30, dtype=torch.float64, device=device)
    target = torch.randn(40, 30, dtype=torch.float64, device=device)[:, ::2]
    state = base[:, ::2]
    assert not state.is_contiguous() and not target.is_contiguous()
    assert_matches_reference([state], [target], 0.3, 1e-4)
    # The update reached the storage shared with `base`.
    assert torch.equal(base[:, ::2], state)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_across_pairs(device):
    states = [
        torch.randn(9, device=device),
        torch.randn(4, 4, dtype=torch.float64, device=device),
    ]
    targets = [
        torch.randn(9, device=device),
        torch.randn(4, 4, dtype=torch.float64, device=device),
    ]
    want_states, want_norms = reference([s.clone() for s in states], targets, 0.5, 0.0)
    norms = relax_update_(states, targets, 0.5, 0.0)
    torch.testing.assert_close(norms.cpu(), want_norms, rtol=1e-6, atol=1e-6)
    for got, want in zip(states, want_states):
        torch.testing.assert_close(got, want)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    shapes=st.lists(st.lists(st.integers(0, 40), max_size=3).map(tuple), min_size=1, max_size=5),
    eta=st.floats(0.0, 1.5),
    flush_below=st.sampled_from([0.0, 1e-6, 0.5]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_lists_match_reference_cpu(shapes, eta, flush_below, dtype, seed):
    states, targets = random_pairs(shapes, dtype, "cpu", seed)
    assert_matches_reference(states, targets, eta, flush_below)


@pytest.mark.parametrize(
    ("states", "targets", "message"),
    [
        (
            [torch.zeros(2, 3), torch.zeros(4)],
            [torch.zeros(2, 3), torch.zeros(5)],
            "shape mismatch at index 1",
        ),
        ([torch.zeros(2), torch.zeros(2)], [torch.zeros(2)], "2 states but 1 targets"),
        (
            [torch.zeros(2)],
            [torch.zeros(2, dtype=torch.float64)],
            "dtype mismatch at index 0",
        ),
        (
            [torch.zeros(2, dtype=torch.long)],
            [torch.zeros(2, dtype=torch.long)],
            r"states\[0\] has dtype Long",
        ),
        ([torch.zeros(1).expand(4)], [torch.ones(4)], "share memory"),
    ],
    ids=["shape", "length", "dtype", "integer", "overlap"],
)
def test_bad_arguments_raise(states, targets, message):
    with pytest.raises(RuntimeError, match=message):
        relax_update_(states, targets, 0.5, 0.0)


def test_negative_flush_threshold_raises():
    with pytest.raises(RuntimeError, match="flush_below must be >= 0"):
        relax_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, -1.0)


def test_refuses_tensors_that_require_grad():
    state, target = torch.zeros(3, requires_grad=True), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"not differentiable, but states\[0\] requires grad"):
        relax_update_([state], [target], 0.5, 0.0)
    with pytest.raises(RuntimeError, match=r"not differentiable, but targets\[0\] requires grad"):
        relax_update_([target.clone()], [state], 0.5, 0.0)
    with torch.no_grad():  # allowed, like an optimizer step
        relax_update_([state], [target], 0.5, 0.0)
    assert torch.equal(state.detach(), torch.full((3,), 0.5))


def test_mutation_is_seen_by_autograd():
    weight = torch.randn(3, requires_grad=True)
    state = torch.randn(3)
    version = state._version
    loss = (weight * state).sum()  # saves `state` for backward
    relax_update_([state], [torch.randn(3)], 0.5, 0.0)
    assert state._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_cuda
def test_device_mismatch_raises():
    with pytest.raises(RuntimeError, match="device mismatch at index 0"):
        relax_update_([torch.zeros(2, device="cuda")], [torch.zeros(2)], 0.5, 0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    # Schema (the declared mutation of `states` and nothing else), autograd
    # registration, the fake-tensor kernel (registered for Meta in C++) and
    # functionalisation under AOT dispatch. The inputs do not require grad:
    # the op refuses those by design (see the test above).
    states, targets = random_pairs([(4, 5), (7,)], torch.float32, device)
    torch.library.opcheck(relax_update_.default, (states, targets, 0.5, 1e-6))

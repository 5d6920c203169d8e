"""Bad or unusual input: a table of cases, each with the outcome it must have.

Every case runs a fresh module twice, once plain (autograd) and once wrapped
in ``ARBackward``, through the same three stages: construct, forward,
backward. A case expects either

- ``LikeAutograd``: where autograd fails, AR fails at the same stage with the
  same exception type and message; where autograd succeeds, AR gives the same
  outputs (dtypes, ``requires_grad``) and the same gradients: float64 to a
  relative error of 1e-10 on the finite entries, the NaN/Inf entries in the
  same places; or
- ``Raises``: AR fails at the given stage with a specific, clear error,
  whatever autograd does (autograd accepts complex inputs and lets NaN
  through, for example).

An exception in the middle of the wrapped module's forward is checked
separately: nothing is left behind and the next batch is exact.
"""

from __future__ import annotations

import copy
import gc
import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from conftest import cuda_marks
from torch import nn
from zoo import F64_MAX_REL_ERR, load_torch_ar, rel_err

STAGES = ("construct", "forward", "backward")


@dataclass(frozen=True)
class LikeAutograd:
    """Fail where autograd fails (same stage, type, message); else the same gradients."""

    match: str | None = None  # where autograd must fail: a regex its message matches


@dataclass(frozen=True)
class Raises:
    """AR fails at ``stage`` with ``exc`` whose message matches every regex in ``match``."""

    exc: type[BaseException] | str
    stage: str
    match: tuple[str, ...] = ()


@dataclass(frozen=True)
class BadCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    expect: LikeAutograd | Raises
    loss: Callable[[Any], torch.Tensor] = field(default=lambda out: out.square().mean())
    ar_kwargs: dict = field(default_factory=dict)
    device: str = "cpu"


@dataclass
class Outcome:
    stage: str | None = None  # the stage that raised, None when all passed
    error: BaseException | None = None
    outputs: list[tuple[torch.dtype, bool]] = field(default_factory=list)
    grads: dict[str, torch.Tensor | None] = field(default_factory=dict)


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def run_case(case: BadCase, wrap: bool) -> Outcome:
    """Construct, forward and backward one fresh copy; record where it stopped."""
    torch.manual_seed(0)
    model = case.build()
    inputs = case.inputs()
    result = Outcome()
    stage = "construct"
    try:
        module = load_torch_ar().ARBackward(model, **case.ar_kwargs) if wrap else model
        stage = "forward"
        out = module(*inputs)
        result.outputs = [(t.dtype, t.requires_grad) for t in _tensors(out)]
        stage = "backward"
        case.loss(out).backward()
    except Exception as exc:  # noqa: BLE001 - the outcome is compared below
        result.stage, result.error = stage, exc
        return result
    result.grads = {n: p.grad for n, p in model.named_parameters()}
    for i, t in enumerate(_tensors(inputs)):
        if t.requires_grad:
            result.grads[f"input{i}"] = t.grad
    return result


def assert_same_gradients(ar: dict, ref: dict) -> None:
    assert ar.keys() == ref.keys()
    for k, b in ref.items():
        a = ar[k]
        if b is None:
            assert a is None or not a.any(), f"{k}: AR gradient where autograd has none"
            continue
        assert a is not None, f"{k}: no AR gradient"
        assert a.dtype == b.dtype and a.shape == b.shape
        ok_a, ok_b = torch.isfinite(a), torch.isfinite(b)
        assert torch.equal(ok_a, ok_b), f"{k}: NaN/Inf in different places than autograd"
        assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{k}: NaN placement differs"
        assert torch.equal(a[~ok_a], b[~ok_b]) or torch.isnan(b[~ok_b]).all(), (
            f"{k}: infinite entries differ from autograd's"
        )
        err = rel_err(a[ok_a], b[ok_b])
        assert err <= F64_MAX_REL_ERR, f"{k}: rel err {err:.3e} on the finite entries"


# --------------------------------------------------------------------------
# Modules for the table
# --------------------------------------------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def _x(*shape: int, dtype: torch.dtype = torch.float64) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=dtype),)


def _x_with(value: float) -> Callable[[], tuple]:
    def make() -> tuple:
        (x,) = _x(5, 4)()
        x[1, 2] = value
        return (x,)

    return make


class IntSecondOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.head(torch.tanh(self.body(x)))
        return y, y.argmax(dim=1)


class IntOnlyOutput(IntSecondOutput):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[1]


class ConstantOutput(nn.Module):
    """The output never touches a parameter or a differentiable input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 3, dtype=x.dtype) + 1.0


class Blowup(torch.autograd.Function):
    """Identity forward, backward times 1e300: two in a row overflow float64."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad * 1e300


class Diverging(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.m = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = Blowup.apply(Blowup.apply(torch.relu(self.m(h))))
        return self.b(h)


class RealPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.real if x.is_complex() else x.to_dense())


class SparseOut(RealPart):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.lin(x).to_sparse()


class ComplexOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.view_as_complex(self.lin(x).reshape(x.shape[0], 2, 2))


class MutatesParameter(nn.Module):
    """Changes a weight in place during its own forward, in one of several ways."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "data_before_use":
            self.b.weight.data.mul_(1.5)
        elif self.how == "no_grad_before_use":
            with torch.no_grad():
                self.b.weight.add_(0.1)
        y = self.b(torch.tanh(self.a(x)))
        if self.how == "data_after_use":
            # .data bypasses the version counter: autograd silently uses the new value.
            self.b.weight.data.mul_(1.5)
        elif self.how == "no_grad_after_use":
            # b.weight is saved for the input-VJP of b: autograd must refuse.
            with torch.no_grad():
                self.b.weight.add_(0.1)
        elif self.how == "no_grad_after_use_first_layer":
            # a.weight is only needed for an input gradient nobody asked for.
            with torch.no_grad():
                self.a.weight.add_(0.1)
        return y


def _mutates(how: str) -> Callable[[], nn.Module]:
    return lambda: MutatesParameter(how).double()


def _first(out: Any) -> torch.Tensor:
    return out[0].square().mean()


def _int_loss(out: torch.Tensor) -> torch.Tensor:
    return out.sum()


_INPLACE = r"modified by an inplace operation"
_NO_GRAD = r"does not require grad"
_DIVERGED = ("RelaxationDivergedError", "backward", (r"step \d+", r"node '[^']+'"))
# NaN/Inf brought in from outside the relaxation, named as what it is.
_NONFINITE_INPUT = ("NonFiniteValueError", "backward", (r"from outside it", r"input 0 \(NaN"))
_DIVERGED_CLOSED_FORM = (
    "RelaxationDivergedError",
    "backward",
    (r"closed form of 30 steps", r"node '[^']+'"),
)


CASES = [
    pytest.param(
        BadCase("device_mix", lambda: _mlp().cuda(), _x(5, 4), LikeAutograd(r"device")),
        id="device_mix_cuda_module_cpu_input",
        marks=cuda_marks(),
    ),
    pytest.param(
        BadCase("dtype_mix", _mlp, _x(5, 4, dtype=torch.float32), LikeAutograd(r"dtype")),
        id="dtype_mix_float64_module_float32_input",
    ),
    pytest.param(
        BadCase(
            "int_second_output",
            lambda: IntSecondOutput().double(),
            _x(5, 4),
            LikeAutograd(),
            _first,
        ),
        id="integer_second_output",
    ),
    pytest.param(
        BadCase(
            "int_only_output",
            lambda: IntOnlyOutput().double(),
            _x(5, 4),
            LikeAutograd(_NO_GRAD),
            _int_loss,
        ),
        id="integer_only_output",
    ),
    pytest.param(
        BadCase(
            "constant_output",
            lambda: ConstantOutput().double(),
            _x(5, 4),
            LikeAutograd(_NO_GRAD),
        ),
        id="output_without_grad_path",
    ),
    pytest.param(
        BadCase(
            "nan_input",
            _mlp,
            _x_with(math.nan),
            Raises(*_NONFINITE_INPUT),
        ),
        id="nan_in_input_default_raises",
    ),
    pytest.param(
        BadCase(
            "nan_input_propagate",
            _mlp,
            _x_with(math.nan),
            LikeAutograd(),
            ar_kwargs={"nonfinite": "propagate"},
        ),
        id="nan_in_input_propagate_like_autograd",
    ),
    pytest.param(
        BadCase("inf_input", _mlp, _x_with(math.inf), LikeAutograd()),
        id="inf_in_input_like_autograd",
    ),
    pytest.param(
        BadCase(
            "diverging_exact",
            lambda: Diverging().double(),
            _x(5, 4),
            Raises(*_DIVERGED),
        ),
        id="diverging_relaxation_exact",
    ),
    pytest.param(
        BadCase(
            "diverging_literal",
            lambda: Diverging().double(),
            _x(5, 4),
            Raises(*_DIVERGED),
            ar_kwargs={"eta": 0.5, "steps": 30, "evaluation": "literal"},
        ),
        id="diverging_relaxation_eta0.5",
    ),
    pytest.param(
        BadCase(
            "diverging_closed_form",
            lambda: Diverging().double(),
            _x(5, 4),
            Raises(*_DIVERGED_CLOSED_FORM),
            ar_kwargs={"eta": 0.5, "steps": 30},
        ),
        id="diverging_relaxation_closed_form",
    ),
    pytest.param(
        BadCase(
            "compiled",
            lambda: torch.compile(_mlp(), backend="eager"),
            _x(5, 4),
            Raises(TypeError, "construct", (r"torch\.compile",)),
        ),
        id="torch_compiled_module",
    ),
    pytest.param(
        BadCase(
            "sparse_coo_input",
            RealPart,
            lambda: (torch.randn(5, 4, dtype=torch.float64).to_sparse(),),
            Raises(TypeError, "forward", (r"input 0", r"sparse_coo", r"dense")),
        ),
        id="sparse_coo_input",
    ),
    pytest.param(
        BadCase(
            "sparse_csr_input",
            RealPart,
            lambda: (torch.randn(5, 4, dtype=torch.float64).to_sparse_csr(),),
            Raises(TypeError, "forward", (r"input 0", r"sparse_csr")),
        ),
        id="sparse_csr_input",
        marks=pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    ),
    pytest.param(
        BadCase(
            "complex_input",
            RealPart,
            lambda: (torch.randn(5, 4, dtype=torch.complex128),),
            Raises(TypeError, "forward", (r"input 0", r"complex")),
        ),
        id="complex_input",
    ),
    pytest.param(
        BadCase(
            "sparse_output",
            SparseOut,
            _x(5, 4),
            Raises(TypeError, "forward", (r"output 0", r"sparse")),
        ),
        id="sparse_output",
    ),
    pytest.param(
        BadCase(
            "complex_output",
            ComplexOut,
            _x(5, 4),
            Raises(TypeError, "forward", (r"output 0", r"complex")),
        ),
        id="complex_output",
    ),
    pytest.param(
        BadCase("mutate_data_before", _mutates("data_before_use"), _x(5, 4), LikeAutograd()),
        id="param_data_mul_before_use",
    ),
    pytest.param(
        BadCase(
            "mutate_no_grad_before",
            _mutates("no_grad_before_use"),
            _x(5, 4),
            LikeAutograd(),
        ),
        id="param_no_grad_add_before_use",
    ),
    pytest.param(
        BadCase("mutate_data_after", _mutates("data_after_use"), _x(5, 4), LikeAutograd()),
        id="param_data_mul_after_use",
    ),
    pytest.param(
        BadCase(
            "mutate_no_grad_after",
            _mutates("no_grad_after_use"),
            _x(5, 4),
            LikeAutograd(_INPLACE),
        ),
        id="param_no_grad_add_after_use",
    ),
    pytest.param(
        BadCase(
            "mutate_first_layer_after",
            _mutates("no_grad_after_use_first_layer"),
            _x(5, 4),
            # A documented difference (docs, Limitations): the inputs are
            # private leaves that require grad, so the first layer saves its
            # weight too, and changing it in place before backward is caught
            # by autograd's version check (plain autograd saves nothing here).
            Raises(RuntimeError, "backward", (_INPLACE,)),
        ),
        id="first_layer_param_no_grad_add_after_use",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: BadCase):
    load_torch_ar()
    ar = run_case(case, wrap=True)
    expect = case.expect
    if isinstance(expect, Raises):
        assert ar.error is not None, f"{case.name}: AR did not raise (expected {expect.exc})"
        exc_name = expect.exc if isinstance(expect.exc, str) else expect.exc.__name__
        assert type(ar.error).__name__ == exc_name, (
            f"{case.name}: AR raised {type(ar.error).__name__}: {ar.error}"
        )
        assert ar.stage == expect.stage, f"{case.name}: raised at {ar.stage}, not {expect.stage}"
        for pattern in expect.match:
            assert re.search(pattern, str(ar.error)), (
                f"{case.name}: message {str(ar.error)!r} lacks {pattern!r}"
            )
        return
    ref = run_case(case, wrap=False)
    if expect.match is not None:
        assert ref.error is not None and re.search(expect.match, str(ref.error)), (
            f"{case.name}: the table expects autograd to fail with {expect.match!r}, "
            f"it gave {ref.error!r}"
        )
    if ref.error is not None:
        assert ar.error is not None, (
            f"{case.name}: autograd raised at {ref.stage} ({ref.error}), AR did not"
        )
        assert (ar.stage, type(ar.error)) == (ref.stage, type(ref.error)), (
            f"{case.name}: autograd raised {type(ref.error).__name__} at {ref.stage}, "
            f"AR {type(ar.error).__name__} at {ar.stage}: {ar.error}"
        )
        first_line = str(ref.error).splitlines()[0][:60]
        assert first_line in str(ar.error), (
            f"{case.name}: AR message {str(ar.error)!r} differs from autograd's {first_line!r}"
        )
        return
    assert ar.error is None, (
        f"{case.name}: autograd succeeded, AR raised at {ar.stage}: {ar.error!r}"
    )
    assert ar.outputs == ref.outputs, f"{case.name}: outputs {ar.outputs} != {ref.outputs}"
    assert_same_gradients(ar.grads, ref.grads)


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        {"trace": True},
        {"eta": 0.5, "steps": 60},
        {"eta": 0.5, "steps": 60, "nonfinite": "propagate"},
    ],
    ids=["eta1_traced", "eta0.5", "eta0.5_propagate"],
)
def test_huge_but_finite_states_are_not_divergence(ar_kwargs, torch_ar):
    class Huge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1e200

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 5)
            self.b = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(Huge.apply(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    model = Net().double()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 4, dtype=torch.float64)
    ref(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in ref.parameters())
    torch_ar.ARBackward(model, **ar_kwargs)(x).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max()  # the norms themselves would overflow
        err = rel_err(p.grad / scale, q.grad / scale)
        assert err <= 1e-8, f"{n}: rel err {err:.3e}"


# --------------------------------------------------------------------------
# An exception in the middle of forward
# --------------------------------------------------------------------------


class FailsMidForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)
        self.fail = True
        self.hidden: weakref.ref | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        self.hidden = weakref.ref(h)
        if self.fail:
            raise ValueError("failure in the middle of forward")
        return self.b(h)


@pytest.mark.parametrize(
    "ar_kwargs",
    [{}, {"eta": 0.5, "steps": 60}],
    ids=["exact", "eta0.5_forward_init"],
)
def test_exception_mid_forward_leaves_nothing_behind(ar_kwargs, torch_ar):
    torch.manual_seed(0)
    model = FailsMidForward().double()
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **ar_kwargs)
    x = torch.randn(5, 4, dtype=torch.float64)
    modes_before = torch._C._len_torch_function_stack()
    grad_mode_before = torch.is_grad_enabled()

    def forward_fails() -> str:
        try:
            ar(x)
        except ValueError as exc:
            return str(exc)
        return "no exception"

    assert forward_fails() == "failure in the middle of forward"
    # The forward-value recorder (a TorchFunctionMode) and grad mode are restored,
    # and the partial graph is gone without waiting for the cycle collector.
    assert torch._C._len_torch_function_stack() == modes_before
    assert torch.is_grad_enabled() == grad_mode_before
    assert model.hidden is not None and model.hidden() is None, "partial forward graph kept alive"
    assert ar.last_stats is None
    assert all(p.grad is None for p in model.parameters())
    gc.collect()

    model.fail = ref.fail = False
    ar(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        err = rel_err(p.grad, q.grad)
        assert err <= F64_MAX_REL_ERR, f"{n}: rel err {err:.3e} on the batch after the failure"

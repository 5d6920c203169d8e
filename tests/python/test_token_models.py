"""Models fed by token indices: the embedding lookup is a neuron.

Language models take integer token ids; no floating tensor enters the module.
The output of a lookup by data indices must still get a relaxing state, so
that eta, steps and the variants act on the network above it. A lookup by
constant indices (positions) stays a parameter transform. A model with no
relaxing state at all warns that AR is backprop there.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import (
    CASES,
    F32_MAX_REL_ERR,
    f32_errors,
    load_torch_ar,
    make_batch,
    make_model,
    rel_err,
)

TOKEN_CASES = ["causal_lm", "bert_encoder"]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _run(case_name: str, dtype: torch.dtype, ar_kwargs: dict | None, seed: int = 0):
    """(gradients, wrapper or None) of one batch; ar_kwargs None runs plain autograd."""
    torch_ar = load_torch_ar()
    case = CASES[case_name]
    model = make_model(case, "cpu", dtype, seed)
    args, kwargs, target = make_batch(case, "cpu", dtype, seed)
    ar = None
    if ar_kwargs is not None:
        torch.manual_seed(7)
        ar = torch_ar.ARBackward(model, **ar_kwargs)
        out = ar(*args, **kwargs)
    else:
        out = model(*args, **kwargs)
    case.loss(out, target).backward()
    return _grads(model), ar, model


@pytest.mark.parametrize("case_name", TOKEN_CASES)
@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({"eta": 0.5, "steps": 200, "evaluation": "literal"}, id="literal"),
        pytest.param({"eta": 0.5, "steps": 200}, id="closed_form"),
        pytest.param({"eta": 0.5, "steps": 300, "schedule": "sweep"}, id="closed_form_sweep"),
    ],
)
def test_token_models_relax_and_converge_to_autograd(case_name, ar_kwargs):
    expected, _, _ = _run(case_name, torch.float64, None)
    got, ar, _ = _run(case_name, torch.float64, ar_kwargs)
    stats = ar.last_stats
    assert stats.relaxing_states > 5, f"only {stats.relaxing_states} relaxing states"
    assert set(got) == set(expected)
    bad = {n: rel_err(got[n], expected[n]) for n in expected}
    bad = {n: e for n, e in bad.items() if not e <= 1e-9}
    assert not bad, f"not converged to autograd: {bad}"


@pytest.mark.parametrize("case_name", TOKEN_CASES)
def test_few_steps_differ_from_autograd(case_name):
    """Few steps at eta 0.5 are visibly not the gradient: the relaxation acts."""
    expected, _, _ = _run(case_name, torch.float64, None)
    got, _, _ = _run(case_name, torch.float64, {"eta": 0.5, "steps": 3})
    worst = max(rel_err(got[n], expected[n]) for n in expected)
    assert worst > 1e-2


def test_only_data_lookups_are_states():
    """The token lookup is a state; the position lookup (arange indices) is not."""
    _, ar, _ = _run("causal_lm", torch.float64, {"eta": 0.5, "steps": 5})
    names = ar.last_stats.state_names
    lookups = [n for n in names if "EmbeddingBackward0" in n]
    assert len(lookups) == 1, names


class PsiLinear(torch.autograd.Function):
    """F.linear whose input-VJP goes through psi ([in, out]) instead of W."""

    @staticmethod
    def forward(ctx, h, weight, bias, psi):
        ctx.save_for_backward(h, psi)
        ctx.has_bias = bias is not None
        return F.linear(h, weight, bias)

    @staticmethod
    def backward(ctx, g):
        h, psi = ctx.saved_tensors
        grad_h = g @ psi.t()
        grad_w = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
        grad_b = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_h, grad_w, grad_b, None


def _oracle_grads(case_name: str, dtype: torch.dtype, psis: dict[str, torch.Tensor]):
    """One reverse sweep of autograd with every linear's input-VJP through psi."""
    case = CASES[case_name]
    model = make_model(case, "cpu", dtype)
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            psi = psis[names[id(m.weight)]].detach()
            m.forward = lambda h, m=m, psi=psi: PsiLinear.apply(h, m.weight, m.bias, psi)
    args, kwargs, target = make_batch(case, "cpu", dtype)
    case.loss(model(*args, **kwargs), target).backward()
    return _grads(model)


@pytest.mark.parametrize("case_name", TOKEN_CASES)
@pytest.mark.parametrize("variant", ["feedback_alignment", "learned_backward_weights"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_psi_variants_equal_their_oracle(case_name, variant, dtype):
    got, ar, _ = _run(case_name, dtype, {"variant": variant})
    psis = dict(ar.backward_weights())
    expected = _oracle_grads(case_name, dtype, psis)
    autograd, _, _ = _run(case_name, dtype, None)
    assert set(got) == set(expected)
    if dtype == torch.float64:
        for n in expected:
            assert rel_err(got[n], expected[n]) <= 1e-10, n
    else:
        errors = f32_errors({n: (got[n], expected[n]) for n in expected})
        bad = {n: e for n, e in errors.items() if not e <= F32_MAX_REL_ERR}
        assert not bad, f"float32 relative error above {F32_MAX_REL_ERR}: {bad}"
    # The variant matters: the token embedding's gradient is not backprop's.
    assert rel_err(got["tokens.weight"], autograd["tokens.weight"]) > 1e-2


@pytest.mark.parametrize("case_name", TOKEN_CASES)
def test_psi_variant_relaxation_converges_to_its_oracle(case_name):
    got, ar, _ = _run(
        case_name, torch.float64, {"variant": "feedback_alignment", "eta": 0.5, "steps": 200}
    )
    expected = _oracle_grads(case_name, torch.float64, dict(ar.backward_weights()))
    for n in expected:
        assert rel_err(got[n], expected[n]) <= 1e-9, n


class DerivedIndices(nn.Module):
    """Indices computed from the input (not a view of it): not seen as data."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(torch.remainder(ids + 3, 10))))


def test_no_relaxing_state_warns_once_and_counts_parameters():
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    model = DerivedIndices().double()
    ids = torch.randint(0, 10, (5,))
    ar = torch_ar.ARBackward(model, eta=0.5, steps=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            model.zero_grad()
            ar(ids).sum().backward()
    degenerate = [w for w in caught if "no relaxing state" in str(w.message)]
    assert len(degenerate) == 1
    # Attributed to the user's backward() line, not torch/autograd/function.py.
    assert degenerate[0].filename == __file__, degenerate[0].filename
    stats = ar.last_stats
    assert stats.relaxing_states == 0
    # embed.weight, head.weight and head.bias all reach the loss without a state.
    assert stats.params_outside_relaxation == 3


def test_exact_default_does_not_warn():
    torch_ar = load_torch_ar()
    model = DerivedIndices().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch_ar.ARBackward(model)(torch.randint(0, 10, (5,))).sum().backward()


def test_output_layer_parameters_are_outside_the_relaxation():
    """In the paper MLP only the output layer's weight and bias see no relaxing state."""
    torch_ar = load_torch_ar()
    case = CASES["paper_mlp_mse"]
    model = make_model(case, "cpu", torch.float64)
    args, _, target = make_batch(case, "cpu", torch.float64)
    ar = torch_ar.ARBackward(model, eta=0.5, steps=10)
    case.loss(ar(*args), target).backward()
    assert ar.last_stats.params_outside_relaxation == 2
    assert ar.last_stats.relaxing_states == 3


def test_views_of_the_ids_count_as_data():
    """Shifted ids (a slice, a view of the input) still drive a neuron."""
    torch_ar = load_torch_ar()

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids[:, 1:])))

    model = Shifted().double()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 10, (4, 5))
    ar = torch_ar.ARBackward(model, eta=0.5, steps=100)
    ar(ids).pow(2).sum().backward()
    ref(ids).pow(2).sum().backward()
    assert ar.last_stats.relaxing_states == 1
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9

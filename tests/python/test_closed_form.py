"""The closed form gives the outcome of the literal steps on every zoo graph.

With the Jacobians frozen, T relaxation steps are a polynomial in J of degree
below D (docs, How it works: "Closed form"); the engine evaluates it by Horner's rule.
float64: every parameter within 1e-10 relative of the literal steps, for eta
in {0.05, 0.1, 0.5, 0.9}, T in {1, 2, D-1, D, D+1, 100, 1000}, both schedules,
both inits and every variant; float32 closed form against float64 literal
steps: cosine >= 0.99999.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from conftest import needs_cuda
from zoo import (
    CASES,
    F32_MAX_REL_ERR,
    F32_ZERO_FLOOR,
    F64_MAX_REL_ERR,
    load_torch_ar,
    make_batch,
    make_model,
    rel_err,
)

from torch_ar.variants import VARIANTS as ALL_VARIANTS

ETAS = (0.05, 0.1, 0.5, 0.9)
STEP_COUNTS = ("1", "2", "D-1", "D", "D+1", "100", "1000")
# Every variant, from the library's one list of them.
VARIANTS = tuple(ALL_VARIANTS)
SMALL_CASES = [name for name in CASES if name != "resnet18_train"]


def steps_for(expression: str, depth: int) -> int:
    relative = {"D-1": depth - 1, "D": depth, "D+1": depth + 1}
    return max(1, relative[expression] if expression in relative else int(expression))


# The refusals a zoo graph may meet, by their documented messages: a psi
# variant on a weight that has no backward weight (a raw F.linear weight),
# direct feedback on a module with several outputs in the loss.
# Anything else an evaluation raises fails the test.
DOCUMENTED_REFUSALS = re.compile(
    r"none of which has a backward weight|is made from no parameter"
    r"|projects the loss gradient of the module's one output"
)


def run(case_name: str, dtype: torch.dtype, ar_kwargs: dict):
    """(gradients by name, stats, refusal) of one batch through ARBackward;
    refusal is the first line of a documented refusal, else None."""
    torch_ar = load_torch_ar()
    case = CASES[case_name]
    model = make_model(case, "cpu", dtype)
    args, kwargs, target = make_batch(case, "cpu", dtype)
    torch.manual_seed(7)  # the same backward weights in every run
    try:
        ar = torch_ar.ARBackward(model.double(), **ar_kwargs)
        ar.to(dtype)  # float64 draws, so float32 runs have the same psi
        torch.manual_seed(1234)  # the same dropout masks
        case.loss(ar(*args, **kwargs), target).backward()
    except (RuntimeError, ValueError) as err:
        if not DOCUMENTED_REFUSALS.search(str(err)):
            raise
        return None, None, str(err).split("\n")[0]
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, ar.last_stats, None


def depth_of(case_name: str) -> int:
    _, stats, error = run(case_name, torch.float64, {"eta": 0.5, "steps": 1})
    assert error is None, error
    return stats.depth


def assert_same(literal, closed, what: str) -> None:
    lit_grads, lit_stats, lit_err = literal
    cf_grads, cf_stats, cf_err = closed
    assert (lit_err is None) == (cf_err is None), f"{what}: literal {lit_err!r}, closed {cf_err!r}"
    if lit_err is not None:
        assert lit_err == cf_err, what
        return  # both refuse, alike (a psi variant on a raw F.linear weight, say)
    assert lit_stats.evaluation == "literal", what
    assert cf_stats.evaluation == "closed_form", what
    assert lit_stats.steps == cf_stats.steps, what
    assert set(lit_grads) == set(cf_grads), what
    # Gradients that are zero in exact arithmetic (a bias before a softmax or
    # a train-mode BatchNorm) are measured against a millionth of the whole
    # gradient's size: what is left of them is rounding.
    scale = max(float(g.norm()) for g in lit_grads.values())
    bad = {}
    for name, g in lit_grads.items():
        err = float((cf_grads[name] - g).norm()) / max(float(g.norm()), 1e-6 * scale)
        if not err <= F64_MAX_REL_ERR:
            bad[name] = err
    assert not bad, f"{what}: closed form off the literal steps: {bad}"


@pytest.mark.parametrize("case_name", SMALL_CASES)
def test_every_eta_and_step_count(case_name):
    depth = depth_of(case_name)
    for eta, steps in itertools.product(ETAS, STEP_COUNTS):
        count = steps_for(steps, depth)
        kwargs = {"eta": eta, "steps": count}
        assert_same(
            run(case_name, torch.float64, {**kwargs, "evaluation": "literal"}),
            run(case_name, torch.float64, {**kwargs, "evaluation": "closed_form"}),
            f"{case_name} eta={eta} T={count} (D={depth})",
        )


@pytest.mark.parametrize("case_name", SMALL_CASES)
def test_every_granularity_and_variant(case_name):
    """Op, layer and block granularity, every variant (the sign-symmetry
    ones included): the closed form gives the literal steps' outcome."""
    for granularity in ("op", "layer", "block"):
        depth = run(case_name, torch.float64, {"eta": 0.5, "steps": 1, "granularity": granularity})
        assert depth[2] is None, depth[2]
        for variant in VARIANTS:
            for eta, count in ((0.5, depth[1].depth + 1), (0.1, 100)):
                kwargs = {
                    "eta": eta,
                    "steps": count,
                    "granularity": granularity,
                    "variant": variant,
                }
                if granularity == "op" and variant in ("no_nonlinear_derivative", "combined"):
                    # At op granularity f' cannot reach the weight update (documented).
                    kwargs["weight_update_derivative"] = False
                assert_same(
                    run(case_name, torch.float64, {**kwargs, "evaluation": "literal"}),
                    run(case_name, torch.float64, {**kwargs, "evaluation": "closed_form"}),
                    f"{case_name} {kwargs}",
                )


@pytest.mark.parametrize("case_name", SMALL_CASES)
def test_every_schedule_init_and_variant(case_name):
    depth = depth_of(case_name)
    for schedule, init, variant in itertools.product(
        ("jacobi", "sweep"), ("forward", "zero"), VARIANTS
    ):
        for eta, count in ((0.5, depth + 1), (0.1, 100)):
            kwargs = {
                "eta": eta,
                "steps": count,
                "schedule": schedule,
                "init": init,
                "variant": variant,
            }
            assert_same(
                run(case_name, torch.float64, {**kwargs, "evaluation": "literal"}),
                run(case_name, torch.float64, {**kwargs, "evaluation": "closed_form"}),
                f"{case_name} {kwargs}",
            )


def test_resnet18_closed_form():
    """The largest graph (D = 44 at batch 4): the step counts around D, and the sweep."""
    depth = depth_of("resnet18_train")
    for steps, schedule in (
        ("2", "jacobi"),
        ("D-1", "jacobi"),
        ("D+1", "jacobi"),
        ("D+1", "sweep"),
    ):
        count = steps_for(steps, depth)
        kwargs = {"eta": 0.5, "steps": count, "schedule": schedule}
        assert_same(
            run("resnet18_train", torch.float64, {**kwargs, "evaluation": "literal"}),
            run("resnet18_train", torch.float64, {**kwargs, "evaluation": "closed_form"}),
            f"resnet18 {kwargs} (D={depth})",
        )


@pytest.mark.parametrize(
    "case_name",
    [
        "paper_mlp_mse",
        "small_cnn",
        "causal_lm",
        "batchnorm_train",
        "functional_attention",
        "cat_residual",
    ],
)
@pytest.mark.parametrize("variant", ["exact", "feedback_alignment", "combined"])
def test_float32_closed_form_against_float64_literal(case_name, variant):
    kwargs = {"eta": 0.1, "steps": 100, "variant": variant}
    reference, _, err = run(case_name, torch.float64, {**kwargs, "evaluation": "literal"})
    if err is not None:
        pytest.skip(f"{variant} does not apply to {case_name}: {err}")
    got, stats, err = run(case_name, torch.float32, kwargs)
    assert err is None, err
    assert stats.evaluation == "closed_form"
    # Relative error per parameter, against a floor of the whole gradient's
    # norm where the reference is (near) zero: there float32 rounding of the
    # whole gradient is all there is, a few ulps of its norm (measured: 2.5e-6
    # relative at most, 6e-8 of the norm on a bias before train-mode BatchNorm).
    scale = max(float(g.norm()) for g in reference.values())
    for name, want in reference.items():
        err = float((got[name].double() - want).norm()) / max(
            float(want.norm()), 10 * F32_ZERO_FLOOR * scale
        )
        assert err <= F32_MAX_REL_ERR, f"{name}: float32 closed form off by {err:.2e}"


def test_auto_uses_the_closed_form_only_where_it_gives_the_literal_outcome():
    _, stats, _ = run("paper_mlp_mse", torch.float64, {"eta": 0.1, "steps": 100})
    assert stats.evaluation == "closed_form"
    assert stats.sweeps == 2  # D = 3: J^0, J^1, J^2
    for kwargs in (
        {"eta": 0.1, "steps": 100, "trace": True},
        {"eta": 0.1, "tol": 1e-3},
        {"eta": 0.1, "steps": 100, "trace_cosine": True},
    ):
        _, stats, _ = run("paper_mlp_mse", torch.float64, kwargs)
        assert stats.evaluation == "literal", kwargs
    _, stats, _ = run("paper_mlp_mse", torch.float64, {})
    assert stats.evaluation == "exact_sweep"
    _, stats, _ = run("paper_mlp_mse", torch.float64, {"steps": 2})  # fewer than D at eta 1
    assert stats.evaluation == "closed_form"


@pytest.mark.parametrize(
    "kwargs",
    [{"trace": True}, {"tol": 1e-4}, {"cuda_graph": True}, {"trace_cosine": True}],
)
def test_closed_form_refuses_what_needs_literal_steps(kwargs, torch_ar):
    with pytest.raises(ValueError, match="literal steps"):
        torch_ar.ARBackward(
            torch.nn.Linear(3, 2), eta=0.5, steps=10, evaluation="closed_form", **kwargs
        )


def test_residual_is_the_next_steps_residual():
    """last_stats of the closed form: the residual of x_T, which step T + 1 measures."""
    _, closed, _ = run("small_cnn", torch.float64, {"eta": 0.2, "steps": 30})
    _, literal, _ = run(
        "small_cnn", torch.float64, {"eta": 0.2, "steps": 31, "evaluation": "literal"}
    )
    assert closed.residuals.keys() == literal.residuals.keys()
    for name, r in literal.residuals.items():
        assert math.isclose(closed.residuals[name], r, rel_tol=1e-9, abs_tol=1e-15), name
    assert not closed.converged
    _, converged, _ = run("small_cnn", torch.float64, {"eta": 0.5, "steps": 300})
    assert converged.converged and converged.max_residual <= 1e-6


def test_masked_attention_starts_from_zero_where_the_forward_is_infinite():
    """-inf masked scores: literal steps and the closed form both start them at zero."""
    expected, _, _ = run("causal_lm", torch.float64, {"eta": 0.5, "steps": 200, "init": "zero"})
    for evaluation in ("literal", "closed_form"):
        got, stats, err = run(
            "causal_lm", torch.float64, {"eta": 0.5, "steps": 200, "evaluation": evaluation}
        )
        assert err is None, err
        assert not stats.nonfinite
        for name in expected:
            assert rel_err(got[name], expected[name]) <= 1e-9, (evaluation, name)


@needs_cuda
@pytest.mark.parametrize(
    "case_name", ["paper_mlp_mse", "small_cnn", "cat_residual", "batchnorm_train"]
)
@pytest.mark.parametrize("variant", ["exact", "feedback_alignment"])
def test_closed_form_on_cuda_equals_the_literal_steps(case_name, variant):
    """The CUDA horner_update_ and the per-stage norm reads: the same outcome
    as the literal steps on the GPU, and as the closed form on the CPU."""
    torch_ar = load_torch_ar()
    case = CASES[case_name]
    results = {}
    for device, evaluation in (("cuda", "literal"), ("cuda", "auto"), ("cpu", "auto")):
        model = make_model(case, device, torch.float64)
        args, kwargs, target = make_batch(case, device, torch.float64)
        torch.manual_seed(7)
        ar = torch_ar.ARBackward(model, eta=0.2, steps=25, variant=variant, evaluation=evaluation)
        torch.manual_seed(1234)
        case.loss(ar(*args, **kwargs), target).backward()
        results[device, evaluation] = (
            {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None},
            ar.last_stats,
        )
    literal, lit_stats = results["cuda", "literal"]
    assert lit_stats.evaluation == "literal"
    for key in (("cuda", "auto"), ("cpu", "auto")):
        grads, stats = results[key]
        assert stats.evaluation == "closed_form", key
        scale = max(float(g.norm()) for g in literal.values())
        for name, g in literal.items():
            err = float((grads[name] - g).norm()) / max(float(g.norm()), 1e-9 * scale)
            assert err <= F64_MAX_REL_ERR, (key, name, err)

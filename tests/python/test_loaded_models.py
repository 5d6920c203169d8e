"""The models users load (tests/python/loaded_models.py: transformers from
tiny configs, timm architectures at small inputs), float64, default (block)
granularity and layer granularity:

- exact at eta 1 (the exact sweep) against autograd;
- at eta 0.5 the closed form equals the literal steps (12 steps: the two
  evaluations of one map, converged or not), per parameter from zero initial
  states, over the whole gradient from the forward values (whose transient
  they carry to its rounding);
- every psi variant gives a finite gradient to every parameter autograd
  reaches, and learned psi started at "transpose" (psi equal to the weight as
  the op reads it) gives autograd's gradients;
- the depth and states in the docs' Supported models table
  (benchmarks/supported_models.py writes it) are what the engine measures.

Skipped with the reason when transformers or timm is not installed (both are
pinned test dependencies in requirements.txt).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from loaded_models import (
    AGREE,
    AGREE_FORWARD,
    DFA_REFUSED,
    EXACT,
    PSI_VARIANTS,
    LoadedModel,
    loaded_models,
    measure,
)

TABLE = Path(__file__).resolve().parents[2] / "docs" / "supported-models.md"


def _cases(family: str):
    cases = loaded_models(family)
    if not cases:
        reason = f"{family} is an optional test dependency (requirements.txt)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id=f"no-{family}")]
    return [pytest.param(c, id=c.name) for c in cases]


def _table_row(name: str) -> list[str]:
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0].removesuffix(" *") == f"`{name}`":
            return cells
    raise AssertionError(f"{name} has no row in {TABLE.name}")


@pytest.mark.parametrize("case", _cases("transformers") + _cases("timm"))
def test_loaded_model(case: LoadedModel):
    row = measure(case)
    for granularity in ("block", "layer"):
        err, where = row[f"exact_{granularity}"]
        assert row[f"evaluation_{granularity}"] == "exact_sweep"
        assert err <= case.tolerance(EXACT), (
            f"exact at {granularity} granularity: {where} off by {err:.2e}"
        )
    err, where = row["closed_vs_literal"]
    assert err <= case.tolerance(AGREE), (
        f"closed form vs literal steps from zero: {where} off by {err:.2e}"
    )
    err = row["closed_vs_literal_forward"]
    assert err <= AGREE_FORWARD, f"closed form vs literal steps from the forward values: {err:.2e}"
    assert row["backward_weights"] > 0
    err, where = row["learned_transpose"]
    if case.weights_computed_in_forward:
        assert err > case.tolerance(EXACT), "psi = W is reachable here: say so in the docs"
    else:
        assert err <= case.tolerance(EXACT), f"learned psi at transpose: {where} off by {err:.2e}"
    refused = ["direct_feedback_alignment"] if case.name in DFA_REFUSED else []
    assert row["variants_refused"] == refused
    assert row["variants_finite"] == [v for v in PSI_VARIANTS if v not in refused]
    cells = _table_row(case.name)
    numbers = [int(c) for c in cells[2:6]]
    assert numbers == [
        row["depth_block"],
        row["states_block"],
        row["depth_layer"],
        row["states_layer"],
    ], f"docs/supported-models.md row {cells} is stale: rerun benchmarks/supported_models.py"
    assert re.fullmatch(r"exact", cells[6])

"""The docs' Supported models table: transformers and timm models as users
load them (tests/python/loaded_models.py), each with its depth D and
relaxing states at block and layer granularity and the outcome of each
check (float64): the exact sweep against autograd, the closed form against
the literal steps at eta 0.5, learned psi at "transpose" against autograd,
and the psi variants that give finite gradients everywhere.

    python benchmarks/supported_models.py            # writes docs/supported-models.md

tests/python/test_loaded_models.py runs the same checks and fails when a
row's numbers differ from what the engine measures.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "python"))

from loaded_models import (
    AGREE,
    AGREE_FORWARD,
    EXACT,
    FLOAT32_INSIDE,
    PSI_VARIANTS,
    ZERO_FLOOR,
    loaded_models,
    measure,
)

HEADER = """# Supported models

Models as users load them, built from configurations and without download:
Hugging Face transformers {transformers} from tiny configurations and timm
{timm} architectures at small inputs (`tests/python/loaded_models.py`), in
float64 and train mode with dropout off. Per model: the depth D (layers
between the deepest relaxing state and the output) and the relaxing states
at `granularity="block"` (the default) and `"layer"`, and the checks
`tests/python/test_loaded_models.py` makes on every run of the test suite:

- **exact**: eta 1 (the exact sweep) at both granularities equals autograd
  to a relative error of {exact:g} per parameter (measured against
  {floor:g} of the whole gradient's norm where a parameter's gradient is zero
  in exact arithmetic, and to {inside:g} for a model that computes in float32
  inside, marked *);
- **closed form**: at eta 0.5 and 12 steps the closed form equals the
  literal steps to {agree:g} per parameter from zero initial states, and to
  {agree_forward:g} over the whole gradient from the forward values (whose
  transient, up to 1e8 times the gradients on the deepest models, the two
  carry to its rounding);
- **psi = W**: learned backward weights started at `"transpose"` (psi
  equal to the weight as the op reads it) equal autograd to {exact:g};
- **variants**: {variants} give finite gradients to every parameter that
  autograd reaches, or refuse with a message naming the cause
  (`direct_feedback_alignment` on models that fold the samples into
  windows or patches).

Written by `python benchmarks/supported_models.py`; the test fails when a
row's depth or states differ from what the engine measures.

| model | library | D (block) | states (block) | D (layer) | states (layer) | exact | closed form | psi = W | backward weights | variants |
|---|---|---:|---:|---:|---:|---|---|---|---:|---|
"""


def _check(error: tuple[float, str], bound: float) -> str:
    value, where = error
    return "exact" if value <= bound else f"off by {value:.1e} at `{where}`"


def row_text(case, row: dict) -> str:
    exact = max(row["exact_block"][0], row["exact_layer"][0])
    cells = [
        f"`{row['name']}`" + (" *" if case.float32_inside else ""),
        row["family"],
        str(row["depth_block"]),
        str(row["states_block"]),
        str(row["depth_layer"]),
        str(row["states_layer"]),
        _check((exact, row["exact_block"][1]), case.tolerance(EXACT)),
        _check(row["closed_vs_literal"], case.tolerance(AGREE)).replace("exact", "equal")
        + f" ({row['closed_vs_literal_forward']:.0e} from forward values)",
        "n/a (weights standardised in the forward)"
        if case.weights_computed_in_forward
        else _check(row["learned_transpose"], case.tolerance(EXACT)),
        str(row["backward_weights"]),
        "all"
        if row["variants_finite"] == list(PSI_VARIANTS)
        else ", ".join(f"`{v}`" for v in row["variants_finite"])
        + "".join(f"; `{v}` refused" for v in row["variants_refused"]),
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "supported-models.md")
    args = parser.parse_args(argv)
    cases = loaded_models("transformers") + loaded_models("timm")
    if not cases:
        print("neither transformers nor timm is installed", file=sys.stderr)
        return 1
    lines = [
        HEADER.format(
            transformers=version("transformers"),
            timm=version("timm"),
            exact=EXACT,
            agree=AGREE,
            agree_forward=AGREE_FORWARD,
            floor=ZERO_FLOOR,
            inside=FLOAT32_INSIDE,
            variants=", ".join(f"`{v}`" for v in PSI_VARIANTS),
        ).rstrip("\n")
    ]
    for case in cases:
        row = measure(case)
        lines.append(row_text(case, row))
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The op table: the README lists exactly what the engine's table holds."""

from pathlib import Path

import torch_ar

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_the_engine_op_table() -> None:
    rows = {}
    in_table = False
    for line in README.read_text().splitlines():
        if line.startswith("| autograd node |"):
            in_table = True
            continue
        if in_table:
            if not line.startswith("|"):
                break
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0].startswith("---"):
                continue
            rows[cells[0]] = cells
    table = {o.node: o for o in torch_ar.supported_ops()}
    assert set(rows) == set(table)
    for node, op in table.items():
        _, name, role, vjp = rows[node]
        assert name == op.op
        assert role.split(",")[0] == op.role
        assert ("activation" in role) == op.activation
        assert vjp.startswith("specialised") == op.specialised
        assert ("psi" in vjp) == op.backward_weight
        assert ("fused update" in vjp) == op.fused_update


def test_specialised_ops_cover_the_issue_list() -> None:
    specialised = {o.node for o in torch_ar.supported_ops() if o.specialised}
    for node in (
        "AddmmBackward0",
        "MmBackward0",
        "ConvolutionBackward0",
        "ReluBackward0",
        "LeakyReluBackward0",
        "TanhBackward0",
        "SigmoidBackward0",
        "GeluBackward0",
        "SiluBackward0",
        "MaxPool2DWithIndicesBackward0",
        "AvgPool2DBackward0",
        "AdaptiveAvgPool2DBackward0",
        "NativeBatchNormBackward0",
        "AddBackward0",
        "CatBackward0",
        "ViewBackward0",
    ):
        assert node in specialised

"""torch_ar's feedback alignment, sign-symmetry and direct feedback alignment
variants return BioTorch's own gradients on BioTorch's ResNet-20, given
BioTorch's feedback weights (docs/variants.md): benchmarks/peer_biotorch.py's
check, float64. BioTorch (biotorch==0.0.16) is installed by the test command
without its declared dependencies (scripts/setup.sh); skipped with the reason
when absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("biotorch", reason="biotorch==0.0.16 is installed by scripts/setup.sh")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import peer_biotorch


@pytest.mark.parametrize("mode", sorted(peer_biotorch.MODES))
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="eta1"),
        pytest.param({"eta": 0.5, "steps": 200}, id="closed_form"),
    ],
)
def test_torch_ar_gives_biotorchs_gradients(mode, settings):
    result = peer_biotorch.check(mode, settings, batch_size=4)
    assert result["missing"] == []
    assert result["params"] > 20
    assert result["max_rel_err"] <= 1e-10, result

"""The README's numbers are those of the committed runs they cite: the
ResNet-20 and ViT tables (final test accuracy, cosine to autograd over
training, by layer type on the ViT), the Fashion-MNIST and CIFAR-10 CNN seed
statistics. A rerun or a hand edit that moves one apart fails here."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from torch_ar.experiments import plots

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "results"

# README row label -> the run folders it reports (seed order as written).
RESNET_ROWS = {
    "backprop (seeds 0, 1)": ["cifar10-resnet20-backprop-s0", "cifar10-resnet20-backprop-s1"],
    "AR, exact (eta 1)": ["cifar10-resnet20-ar-eta1-s0"],
    "AR, sign-concordant feedback (uSF; seeds 0, 1)": [
        "cifar10-resnet20-ar-eta1-sign_symmetry-s0",
        "cifar10-resnet20-ar-eta1-sign_symmetry-s1",
    ],
    "AR, sign-concordant feedback, fixed random magnitudes (frSF; seeds 0, 1)": [
        "cifar10-resnet20-ar-eta1-sign_symmetry_fixed_random-s0",
        "cifar10-resnet20-ar-eta1-sign_symmetry_fixed_random-s1",
    ],
    "AR, sign-concordant feedback, batchwise random magnitudes (brSF; seeds 0, 1)": [
        "cifar10-resnet20-ar-eta1-sign_symmetry_batch_random-s0",
        "cifar10-resnet20-ar-eta1-sign_symmetry_batch_random-s1",
    ],
    "AR, learned backward weights (seeds 0, 1)": [
        "cifar10-resnet20-ar-eta1-learned_backward_weights-psi_matched-s0",
        "cifar10-resnet20-ar-eta1-learned_backward_weights-psi_matched-s1",
    ],
    "AR, learned backward weights, Kolen-Pollack decay (seeds 0, 1)": [
        "cifar10-resnet20-ar-eta1-learned_backward_weights-kp-psi_matched-s0",
        "cifar10-resnet20-ar-eta1-learned_backward_weights-kp-psi_matched-s1",
    ],
    "AR, no nonlinear derivative": ["cifar10-resnet20-ar-eta1-no_nonlinear_derivative-s0"],
    "AR, feedback alignment": ["cifar10-resnet20-ar-eta1-feedback_alignment-psi_matched-s0"],
    "AR, direct feedback alignment (at BioTorch's lr for it, 0.001)": [
        "cifar10-resnet20-ar-eta1-direct_feedback_alignment-psi_xavier-lr0.001-s0"
    ],
    "BioTorch's own `fa` ResNet-20, this recipe": ["cifar10-resnet20-biotorch-fa-s0"],
}


VIT_HEADING = "### Beyond CNNs: a Vision Transformer"

# README ViT row label -> (its run folder, epochs run, the ResNet-20 row of the same rule).
VIT_ROWS = {
    "backprop": ("cifar10-vit-backprop-s0", 10, "backprop (seeds 0, 1)"),
    "AR, exact (eta 1), first 2 epochs": ("cifar10-vit-ar-eta1-s0", 2, "AR, exact (eta 1)"),
    "AR, eta 0.1, 499 steps, first 2 epochs": (
        "cifar10-vit-ar-block-eta0.1-steps499-s0",
        2,
        None,
    ),
    "AR, uSF": (
        "cifar10-vit-ar-eta1-sign_symmetry-s0",
        10,
        "AR, sign-concordant feedback (uSF; seeds 0, 1)",
    ),
    "AR, learned backward weights": (
        "cifar10-vit-ar-eta1-learned_backward_weights-psi_matched-s0",
        10,
        "AR, learned backward weights (seeds 0, 1)",
    ),
    "AR, feedback alignment": (
        "cifar10-vit-ar-eta1-feedback_alignment-psi_matched-s0",
        10,
        "AR, feedback alignment",
    ),
    "AR, direct feedback alignment": (
        "cifar10-vit-ar-eta1-direct_feedback_alignment-psi_xavier-s0",
        10,
        "AR, direct feedback alignment (at BioTorch's lr for it, 0.001)",
    ),
    "AR, no nonlinear derivative": (
        "cifar10-vit-ar-eta1-no_nonlinear_derivative-s0",
        10,
        "AR, no nonlinear derivative",
    ),
}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _final_accuracy(folder: str) -> float:
    return 100 * _jsonl(RESULTS / folder / "metrics.jsonl")[-1]["test_acc"]


def _table_rows(part: str = "resnet20") -> dict[str, list[str]]:
    section = README.split("## What it gives\n", 1)[1].split("\n## ", 1)[0]
    resnet20, _, vit = section.partition(VIT_HEADING)
    rows = {}
    section = vit if part == "vit" else resnet20
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("method", "---"):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize(("part", "known"), [("resnet20", RESNET_ROWS), ("vit", VIT_ROWS)])
def test_every_row_is_a_known_run(part, known):
    rows = _table_rows(part)
    assert rows, f"the README's {part} table was not found"
    unknown = sorted(set(rows) - set(known))
    assert not unknown, f"README {part} rows without their run folders here: {unknown}"


@pytest.mark.parametrize("label", list(RESNET_ROWS))
def test_resnet20_row_matches_its_runs(label):
    rows = _table_rows()
    if label not in rows:
        pytest.skip(f"'{label}' is not in the README's table")
    accuracy, cosine, _ = rows[label]
    folders = RESNET_ROWS[label]
    for folder in folders:
        records = _jsonl(RESULTS / folder / "metrics.jsonl")
        assert len(records) == 20, f"{folder}: {len(records)} epochs, the table says 20"
    written = [float(a) for a in re.findall(r"(\d+\.\d+)%", accuracy)]
    assert written == [round(_final_accuracy(f), 2) for f in folders], (label, accuracy)
    if cosine == "—":
        return
    measured = _jsonl(RESULTS / folders[0] / "cosine.jsonl")
    mean = statistics.fmean(r["cosine_mean"] for r in measured)
    shown = re.match(r"(\d\.\d+)", cosine).group(1)
    decimals = len(shown.split(".")[1])
    assert float(shown) == round(mean, decimals), (label, cosine, mean)
    lowest = re.search(r"lowest 1 - (\d\.\d+)e-(\d+)", cosine)
    if lowest:
        gap = 1 - min(r["cosine_min"] for r in measured)
        assert f"{gap:.2e}" == f"{lowest.group(1)}e-{lowest.group(2)}", (label, gap)


@pytest.mark.parametrize("label", list(VIT_ROWS))
def test_vit_row_matches_its_run(label):
    rows = _table_rows("vit")
    if label not in rows:
        pytest.skip(f"'{label}' is not in the README's ViT table")
    accuracy, cosine, on_resnet20 = rows[label]
    folder, epochs, resnet20_label = VIT_ROWS[label]
    records = _jsonl(RESULTS / folder / "metrics.jsonl")
    assert len(records) == epochs, f"{folder}: {len(records)} epochs, the table says {epochs}"
    written = float(re.match(r"(\d+\.\d+)%", accuracy).group(1))
    assert written == round(_final_accuracy(folder), 2), (label, accuracy)
    if resnet20_label is None:
        assert on_resnet20 == "—", label
    else:
        resnet20 = float(re.match(r"(\d+\.\d+)%", on_resnet20).group(1))
        assert resnet20 == round(_final_accuracy(RESNET_ROWS[resnet20_label][0]), 2), label
    if cosine == "—":
        return
    run = plots.load_run(RESULTS / folder)
    mean = statistics.fmean(r["cosine_mean"] for r in run.cosines)
    shown = re.findall(r"(-?\d\.\d+)", cosine)
    decimals = len(shown[0].split(".")[1])
    assert float(shown[0]) == round(mean, decimals), (label, cosine, mean)
    by_type = re.search(r"attention (-?\d\.\d+), MLP (-?\d\.\d+)", cosine)
    if by_type:
        measured = plots.mean_cosine_by_type(run)
        for kind, value in zip(("attention projections", "MLP"), by_type.groups(), strict=True):
            assert float(value) == round(measured[kind], len(value.split(".")[1])), (label, kind)


def _seed_statistic(prefix: str, seeds: range) -> str:
    # As results/summary.md computes it: over the fractions, then in percent.
    accs = [_jsonl(RESULTS / f"{prefix}-s{s}" / "metrics.jsonl")[-1]["test_acc"] for s in seeds]
    return f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}%"


@pytest.mark.parametrize(
    ("claim", "prefix", "seeds"),
    [
        ("AR reaches {}", "fmnist-paper-ar-sweep", range(3)),
        ("against backprop's {}", "fmnist-paper-backprop", range(3)),
        ("252 recommended steps\n  reaches {}", "cifar10-cnn-lr0.01-ar-eta0.1-steps252", range(2)),
        ("against backprop's {}", "cifar10-cnn-lr0.01-backprop", range(2)),
    ],
)
def test_seed_statistics_match_their_runs(claim, prefix, seeds):
    statistic = _seed_statistic(prefix, seeds)
    text = " ".join(README.split())
    assert " ".join(claim.format(statistic).split()) in text, (prefix, statistic)

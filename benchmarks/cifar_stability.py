"""Why the AR variants diverge on the CIFAR-10 CNN: the first batches, measured.

Trains the CIFAR-10 table's setting (small CNN, standardised inputs, random
crop + flip, cross-entropy, SGD with momentum, batch 64, eta 0.1, 252 Jacobi
steps) for the first ``--batches`` batches of epoch 1, through the same
``Trainer`` as ``python -m torch_ar train`` (same initial weights, data order
and augmentation per seed), once per variant x psi initialisation x learning
rate. On every batch it also takes autograd's gradient at the same weights and
records, per parameter, the norm of the variant's gradient over autograd's and
their cosine, plus the training loss and each weight's norm. A run stops at
the first non-finite loss or relaxation state: that batch is reported.

    python benchmarks/cifar_stability.py --out results/cifar_stability.json

runs every variant (psi initialised ``normal`` and ``matched``) at lr 0.05 and
0.01 for 400 batches: ``results/cifar_stability.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_ar.experiments.training import TrainConfig, Trainer, _is_divergence
from torch_ar.metrics import cosine
from torch_ar.variants import VARIANTS

# The CIFAR-10 table's setting (benchmarks/run_experiments.py, "cifar").
TABLE = {
    "dataset": "cifar10",
    "model": "cnn",
    "method": "ar",
    "eta": 0.1,
    "steps": 252,
    "loss": "cross-entropy",
    "optimizer": "sgd",
    "momentum": 0.9,
    "batch_size": 64,
    "augment": True,
    "normalize": "standard",
    "device": "cpu",
    "cosine_every": 0,
}
CURVATURE_EVERY = 10  # batches between measurements of the output layer's curvature
USES_PSI = {name for name, v in VARIANTS.items() if v.uses_backward_weights}


@torch.no_grad()
def output_layer_curvature(
    model: torch.nn.Sequential, x: torch.Tensor, iterations: int = 50
) -> float:
    """Largest eigenvalue of the batch-mean cross-entropy's Hessian in the output layer's [W b].

    With logits z = W h + b and softmax p, the Hessian-vector product for a
    direction [V v] is mean_i ((diag(p_i) - p_i p_i^T)(V h_i + v)) [h_i 1]^T;
    power iteration on it (the Hessian is positive semi-definite).
    """
    features = model[:-1](x).flatten(1)
    h1 = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype)], dim=1)
    weight, bias = model[-1].weight, model[-1].bias
    p = torch.softmax(features @ weight.t() + bias, dim=1)
    direction = torch.randn(
        weight.shape[0], h1.shape[1], dtype=h1.dtype, generator=torch.Generator().manual_seed(0)
    )
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = direction.norm()
        if not norm > 0:  # a saturated softmax: the Hessian vanishes
            return 0.0 if norm == 0 else float("nan")
        direction /= norm
        dz = h1 @ direction.t()
        a = p * dz - p * (p * dz).sum(dim=1, keepdim=True)
        product = a.t() @ h1 / len(h1)
        eigenvalue = (product * direction).sum().item()
        direction = product
    return eigenvalue


def run_setting(
    model: str,
    variant: str,
    psi_init: str | None,
    lr: float,
    batches: int,
    seed: int,
    data_dir: str | None,
) -> dict:
    config = TrainConfig(
        **{**TABLE, "model": model},
        variant=variant,
        backward_weight_init=psi_init,
        lr=lr,
        seed=seed,
        data_dir=data_dir,
        limit_train_batches=batches,
    )
    trainer = Trainer(config)
    names = trainer.param_names
    series: list[dict] = []
    diverged_at, error = None, None
    start = time.perf_counter()
    for index, (x, y) in enumerate(trainer.train_batches):
        trainer.optimizer.zero_grad(set_to_none=True)
        try:
            loss = trainer.loss_fn(trainer.net(x), y)
            loss.backward()
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"training loss became {loss.item()}")
        except (FloatingPointError, RuntimeError) as e:
            if not _is_divergence(e):
                raise
            diverged_at, error = index, str(e).splitlines()[0]
            break
        # The CNN has no dropout or BatchNorm: a second forward sees the same function.
        reference = torch.autograd.grad(trainer.loss_fn(trainer.model(x), y), trainer.params)
        with torch.no_grad():
            series.append(
                {
                    "batch": index,
                    "loss": loss.item(),
                    # Heavy-ball SGD on a quadratic is stable while lr * lambda < 2 (1 + momentum).
                    "output_lr_lambda": (
                        lr * output_layer_curvature(trainer.model, x)
                        if index % CURVATURE_EVERY == 0
                        else None
                    ),
                    "norm_ratio": {
                        n: (p.grad.norm() / r.norm()).item()
                        for n, p, r in zip(names, trainer.params, reference, strict=True)
                    },
                    "cosine": {
                        n: cosine(p.grad, r)
                        for n, p, r in zip(names, trainer.params, reference, strict=True)
                    },
                    "weight_norm": {
                        n: p.norm().item() for n, p in zip(names, trainer.params, strict=True)
                    },
                }
            )
        trainer.optimizer.step()
    weights = [n for n in names if n.endswith("weight")]
    hidden = weights[:-1]  # the output layer's gradient is exact in every variant
    first, last = series[0], series[-1]
    return {
        "model": model,
        "variant": variant,
        "psi_init": psi_init if variant in USES_PSI else None,
        "lr": lr,
        "seed": seed,
        "batches": batches,
        "diverged_batch": diverged_at,
        "error": error,
        "seconds": time.perf_counter() - start,
        "hidden_norm_ratio_at_init": {n: first["norm_ratio"][n] for n in hidden},
        "hidden_cosine_at_init": {n: first["cosine"][n] for n in hidden},
        "max_hidden_norm_ratio": max(s["norm_ratio"][n] for s in series for n in hidden),
        "weight_norm_growth": {
            n: last["weight_norm"][n] / first["weight_norm"][n] for n in weights
        },
        "max_output_lr_lambda": max(
            (
                s["output_lr_lambda"]
                for s in series
                if s["output_lr_lambda"] is not None and math.isfinite(s["output_lr_lambda"])
            ),
            default=float("nan"),
        ),
        "loss_first_10": sum(s["loss"] for s in series[:10]) / len(series[:10]),
        "loss_last_10": sum(s["loss"] for s in series[-10:]) / len(series[-10:]),
        "series": series,
    }


def table(rows: list[dict]) -> str:
    bound = 2 * (1 + TABLE["momentum"])
    header = [
        "model",
        "variant",
        "psi init",
        "lr",
        "hidden-layer gradient norm / autograd's at batch 0 (conv1, conv2, conv3)",
        "their cosines to autograd's",
        "largest norm ratio, any batch",
        "loss, batches 0-9 -> last 10",
        "weight norm growth, conv1 -> output layer",
        f"lr x lambda_max, output layer (stable below {bound:g})",
        "outcome",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        growth = list(r["weight_norm_growth"].values())
        outcome = (
            f"diverged at batch {r['diverged_batch']}"
            if r["diverged_batch"] is not None
            else f"finite for {r['batches']} batches"
        )
        cells = [
            r.get("model", "cnn"),
            r["variant"],
            r["psi_init"] or "-",
            f"{r['lr']:g}",
            ", ".join(f"{v:.2f}" for v in r["hidden_norm_ratio_at_init"].values()),
            ", ".join(f"{v:.2f}" for v in r["hidden_cosine_at_init"].values()),
            f"{r['max_hidden_norm_ratio']:.3g}",
            f"{r['loss_first_10']:.3g} -> {r['loss_last_10']:.3g}",
            f"{growth[0]:.3g}x -> {growth[-1]:.3g}x",
            f"{r['max_output_lr_lambda']:.3g}",
            outcome,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_rows(rows: list[dict], path: Path) -> None:
    """A JSON list with one setting per line (its per-batch series make the file large)."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")


def names(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        type=names,
        default=["cnn"],
        help="comma-separated: cnn (the table's), cnn-tanh (default: cnn)",
    )
    parser.add_argument(
        "--variants",
        type=names,
        default=sorted(VARIANTS),
        help="comma-separated variants (default: all)",
    )
    parser.add_argument(
        "--psi-inits",
        type=names,
        default=["normal", "matched"],
        help="psi initialisations for the variants with psi (default: normal,matched)",
    )
    parser.add_argument(
        "--lrs",
        type=lambda t: [float(v) for v in names(t)],
        default=[0.05, 0.01],
        help="comma-separated learning rates (default: 0.05,0.01: the table's and the lower one)",
    )
    parser.add_argument(
        "--batches", type=int, default=400, help="batches of epoch 1 (default: 400)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", default=None, help="CIFAR-10 folder (default: the usual search)"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="write every setting's rows and series as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    settings = [
        (model, lr, variant, psi_init)
        for model in args.models
        for lr in args.lrs
        for variant in args.variants
        for psi_init in (args.psi_inits if variant in USES_PSI else [None])
    ]
    for model, lr, variant, psi_init in settings:
        row = run_setting(model, variant, psi_init, lr, args.batches, args.seed, args.data_dir)
        rows.append(row)
        print(table([row]).splitlines()[-1], f"({row['seconds']:.0f}s)", flush=True)
        if args.out:
            write_rows(rows, args.out)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A short real job: one epoch of CIFAR-10 on the small CNN and on ResNet-20,
with backprop, exact AR (eta 1) and AR at eta 0.1 with its recommended steps
(block granularity, where the step count is about half that of layer's).

Prints and writes (``--out``: gpu_job.json, gpu_job.md) the images per second
of training, the test accuracy after the epoch and the cosine of the AR
gradients to autograd's, one row per (model, method). Each row is written as
soon as it finishes, so a time limit that stops the job keeps the rows before.

    python benchmarks/gpu_job.py --device cuda --data-dir DIR --out OUT
    python benchmarks/gpu_job.py --device cpu --limit-train-batches 2 ...   # a dry run
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from torch_ar.experiments import compare, training
from torch_ar.experiments.data import load_dataset
from torch_ar.experiments.models import build_model

# The setting of each model (SGD momentum 0.9, cross-entropy, batch 128).
MODELS = {"cnn": {"lr": 0.01}, "resnet20": {"lr": 0.1}}


def recommended_steps(model_name: str, data_dir: str | None, device: str, batch: int) -> int:
    """compare --recommend's step count for eta 0.1 (block granularity) on one training batch."""
    torch.manual_seed(0)
    model = build_model(model_name, "cifar10").to(device)
    data = load_dataset("cifar10", data_dir)
    x = data.train_images[:batch].to(device, torch.float32) / 255.0
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    y = data.train_labels[:batch].to(device)
    steps, _ = compare.recommend_steps(
        model,
        torch.nn.functional.cross_entropy,
        x,
        y,
        eta=0.1,
        max_steps=20_000,
        granularity="block",
    )
    if steps is None:
        raise RuntimeError(f"{model_name}: no step count up to 20000 reaches cosine 0.999")
    return steps


def run_row(model_name: str, method: str, ar: dict, args: argparse.Namespace) -> dict:
    config = training.TrainConfig(
        dataset="cifar10",
        data_dir=args.data_dir,
        model=model_name,
        method="ar" if method != "backprop" else "backprop",
        loss="cross-entropy",
        optimizer="sgd",
        momentum=0.9,
        lr=MODELS[model_name]["lr"],
        batch_size=args.batch_size,
        test_batch_size=1000,
        epochs=1,
        device=args.device,
        seed=0,
        limit_train_batches=args.limit_train_batches,
        limit_test_batches=args.limit_test_batches,
        cosine_every=args.cosine_every,
        **ar,
    )
    log = io.StringIO()
    trainer = training.Trainer(config, stream=log)
    images = len(trainer.train_batches) * args.batch_size
    if torch.device(args.device).type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    record = trainer.fit()[-1]
    seconds = time.perf_counter() - start
    return {
        "model": model_name,
        "method": method,
        **ar,
        "train_images": images,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "test_acc": record["test_acc"],
        "train_loss": record["train_loss"],
        "cosine_mean": record.get("cosine_mean"),
        "cosine_min": record.get("cosine_min"),
        "ar_steps": record.get("ar_steps"),
        "log": log.getvalue().strip().splitlines()[-1],
    }


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"# One epoch of CIFAR-10 on {device}",
        "",
        "SGD momentum 0.9, cross-entropy, batch 128, standardised inputs, random crop + flip; "
        "seed 0; lr 0.01 (cnn), 0.1 (resnet20). Test accuracy after the one epoch.",
        "",
        "| model | method | images/s | test acc | cosine to autograd (mean / min) |",
        "|---|---|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | FAILED: {r['error'][:120]} | | |")
            continue
        cos = "" if r["cosine_mean"] is None else f"{r['cosine_mean']:.6f} / {r['cosine_min']:.6f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['images_per_s']:.0f} | "
            f"{100 * r['test_acc']:.2f}% | {cos} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data-dir", default=None, help="folder or tarball of CIFAR-10 (see data.py)")
    p.add_argument("--out", default=None)
    p.add_argument("--models", default="cnn,resnet20")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--limit-test-batches", type=int, default=None)
    p.add_argument("--cosine-every", type=int, default=50)
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="eta 0.1's step count (default: compare --recommend's, per model)",
    )
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    failed = False
    for model_name in args.models.split(","):
        try:
            steps = args.steps or recommended_steps(
                model_name, args.data_dir, args.device, args.batch_size
            )
        except Exception as exc:  # noqa: BLE001  (reported as the row's failure)
            steps, failed = None, True
            rows.append({"model": model_name, "method": "AR eta 0.1", "error": f"recommend: {exc}"})
        methods = [("backprop", {}), ("AR eta 1", {"eta": 1.0})]
        if steps is not None:
            methods.append(
                (
                    f"AR eta 0.1 / {steps} steps (block)",
                    {"eta": 0.1, "steps": steps, "granularity": "block"},
                )
            )
        for method, ar in methods:
            try:
                row = run_row(model_name, method, ar, args)
            except Exception as exc:  # noqa: BLE001
                failed = True
                row = {
                    "model": model_name,
                    "method": method,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                (out / "gpu_job.json").write_text(
                    json.dumps({"device": args.device, "rows": rows}, indent=1)
                )
                (out / "gpu_job.md").write_text(table(rows, args.device) + "\n")
    print(table(rows, args.device))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

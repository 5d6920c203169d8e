"""Why feedback alignment diverges on the paper's Fashion-MNIST setting.

With the summed MSE loss, SGD on the output layer ``[W b]`` of the paper MLP
is a quadratic step whose curvature on a batch is ``2 [H 1]^T [H 1]`` (H: the
last hidden layer's activations, batch x 100). The step is stable only while
``lr * lambda_max(2 [H 1]^T [H 1]) < 2``. Feedback alignment trains the hidden
layers with fixed random feedback, which does not keep that number small;
backprop and AR do.

For each run folder given, this rebuilds its initial weights (the run's seed)
and loads its checkpoint when it kept one (the end of the last completed
epoch: for a diverged run, the epoch before it diverged), and reports the largest ``lr * lambda_max``
over the training batches (batch size and preprocessing from the run's
config), the output layer's weight norm and the last hidden layer's mean
activation. Writes a JSON file and prints a table.

    python benchmarks/fa_stability.py results/fmnist-paper-ar-feedback_alignment-s1 \\
        results/fmnist-paper-ar-sweep-s1 --out results/fa_stability.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_ar.experiments.data import load_dataset, normalize
from torch_ar.experiments.models import build_model


def last_hidden(net: torch.nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Activations entering the output layer (the net is Flatten, Linear, ReLU, ..., Linear)."""
    return net[:-1](x)


@torch.no_grad()
def stability(
    net: torch.nn.Sequential, images: torch.Tensor, batch: int, lr: float, mean, std
) -> dict[str, float]:
    worst, activation = 0.0, 0.0
    batches = 0
    for start in range(0, len(images) - batch + 1, batch):
        x = normalize(images[start : start + batch], mean, std, dtype=torch.float64)
        h = last_hidden(net, x)
        h1 = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
        # lambda_max(2 H^T H) = 2 sigma_max(H)^2
        sigma = torch.linalg.matrix_norm(h1, ord=2).item()
        worst = max(worst, lr * 2.0 * sigma * sigma)
        activation += h.mean().item()
        batches += 1
    return {
        "lr_times_lambda_max": worst,
        "output_weight_norm": net[-1].weight.norm().item(),
        "last_hidden_mean_activation": activation / batches,
    }


def analyse(folder: Path) -> dict:
    config = json.loads((folder / "config.json").read_text())["config"]
    data = load_dataset(config["dataset"], config["data_dir"])
    # Runs from before --normalize existed standardised their inputs.
    normalize_mode = config.get("normalize") or "standard"
    standard = normalize_mode == "standard"
    mean, std = (data.mean, data.std) if standard else (None, None)
    images = data.train_images
    torch.manual_seed(config["seed"])
    initial = build_model(config["model"], config["dataset"], **config["extra"]).double()
    args = (images, config["batch_size"], config["lr"], mean, std)
    at_checkpoint, checkpoint_epoch = None, None
    if (folder / "checkpoint.pt").is_file():
        checkpoint = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
        trained = build_model(config["model"], config["dataset"], **config["extra"])
        # The checkpoint holds the wrapper's state (module.*, and psi for the variants).
        prefix = "module."
        trained.load_state_dict(
            {k[len(prefix) :]: v for k, v in checkpoint["net"].items() if k.startswith(prefix)}
            or checkpoint["net"]
        )
        at_checkpoint = stability(trained.double(), *args)
        checkpoint_epoch = checkpoint["epoch"]
    records = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    diverged = next((r for r in records if r.get("diverged")), None)
    return {
        "run": folder.name,
        "variant": config["variant"] or config["method"],
        "normalize": normalize_mode,
        "checkpoint_epoch": checkpoint_epoch,
        "diverged_epoch": diverged["epoch"] if diverged else None,
        "at_init": stability(initial, *args),
        "at_checkpoint": at_checkpoint,  # None: the run kept no checkpoint
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders with a checkpoint.pt")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [analyse(folder) for folder in args.runs]
    print(
        "| run | inputs | lr x lambda_max at init | at epoch | lr x lambda_max there "
        "| output weight norm | diverged in epoch |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        there = r["at_checkpoint"] or {}
        print(
            f"| {r['run']} | {r['normalize']} | {r['at_init']['lr_times_lambda_max']:.3f} "
            f"| {r['checkpoint_epoch'] or '-'} "
            f"| {there.get('lr_times_lambda_max', float('nan')):.3f} "
            f"| {there.get('output_weight_norm', float('nan')):.2f} "
            f"| {r['diverged_epoch'] or '-'} |"
        )
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

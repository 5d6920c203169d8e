"""granularity="layer" against "block" on the CIFAR CNN, ResNet-18 and ResNet-20.

Per model and granularity: the depth D, the relaxing states, the step count
`compare --recommend` finds at eta 0.1 (cosine 0.999 and length within 4.5%
for every parameter, on one CIFAR-10 training batch, forward initial states),
and the closed form's input-VJP sweeps at that count. With ``--time``, the
closed form's backward time at that count over autograd's forward + backward
(interleaved, medians; run it with nothing else on the machine).

    python benchmarks/granularity.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_model

import torch_ar
from torch_ar.experiments import compare
from torch_ar.experiments.data import load_dataset, normalize
from torch_ar.experiments.models import build_model


def cifar_batch(size: int, data_dir: str | None):
    data = load_dataset("cifar10", data_dir)
    x = normalize(data.train_images[:size], data.mean, data.std)  # as the trainer does
    return x, data.train_labels[:size].clone()


def seconds(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def row(
    name: str,
    granularity: str,
    x,
    y,
    threshold: float,
    timed: bool,
    repeats: int,
    known: dict | None = None,
) -> dict:
    torch.manual_seed(0)
    model = build_model(name, "cifar10")
    ar = torch_ar.ARBackward(model, granularity=granularity)
    F.cross_entropy(ar(x), y).backward()
    depth, states = ar.last_stats.depth, ar.last_stats.relaxing_states
    if known is not None:  # the recommendation of an earlier run on the same batch
        steps, min_cosine = known["recommended_steps"], known["min_cosine"]
    else:
        steps, cosines = compare.recommend_steps(
            model, F.cross_entropy, x, y, eta=0.1, threshold=threshold, granularity=granularity
        )
        min_cosine = min(cosines.values()) if cosines else None
    result = {
        "model": name,
        "granularity": granularity,
        "depth": depth,
        "states": states,
        "recommended_steps": steps,
        "min_cosine": min_cosine,
    }
    if steps is not None:
        relaxed = torch_ar.ARBackward(model, granularity=granularity, eta=0.1, steps=steps)
        model.zero_grad()
        F.cross_entropy(relaxed(x), y).backward()
        result["closed_form_sweeps"] = relaxed.last_stats.sweeps
        if timed:

            def autograd_step():
                model.zero_grad()
                F.cross_entropy(model(x), y).backward()

            def ar_step():
                model.zero_grad()
                F.cross_entropy(relaxed(x), y).backward()

            a, r = [], []
            for _ in range(repeats):  # interleaved
                a += seconds(autograd_step, 1)
                r += seconds(ar_step, 1)
            result["closed_form_over_autograd"] = statistics.median(r) / statistics.median(a)
    return result


def table(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| model | granularity | D | states | recommended steps (eta 0.1) | closed-form sweeps |"
        " closed form / autograd fwd+bwd |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.get("closed_form_over_autograd")
        lines.append(
            f"| {r['model']} | {r['granularity']} | {r['depth']} | {r['states']} | "
            f"{r['recommended_steps']} | {r.get('closed_form_sweeps', '')} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="cnn,resnet20,resnet18")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.999)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--time", action="store_true")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--reuse",
        default=None,
        help="granularity.json of an earlier run: its recommended steps are reused",
    )
    args = p.parse_args(argv)
    known = {}
    if args.reuse:
        for r in json.loads(Path(args.reuse).read_text())["rows"]:
            known[r["model"], r["granularity"]] = r
    torch.set_num_threads(args.threads)
    x, y = cifar_batch(args.batch_size, args.data_dir)
    rows = []
    for name in args.models.split(","):
        for granularity in ("layer", "block"):
            rows.append(
                row(
                    name,
                    granularity,
                    x,
                    y,
                    args.threshold,
                    args.time,
                    args.repeats,
                    known.get((name, granularity)),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    header = (
        f"# Layer against block granularity ({cpu_model()}, {args.threads} thread(s), "
        f"torch {torch.__version__}; one CIFAR-10 batch of {args.batch_size}, float32)"
    )
    print(table(rows, header))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": f"{cpu_model()}, {platform.machine()}",
            "batch": args.batch_size,
            "threshold": args.threshold,
            "threads": args.threads,
            "timed": args.time,
        }
        (out / "granularity.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        (out / "granularity.md").write_text(table(rows, header) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

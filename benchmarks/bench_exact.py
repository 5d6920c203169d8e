"""Exact-mode AR gradient time against autograd's backward, measured in one run.

For each model: the median over repeats of
  - backward: loss.backward() through ARBackward (eta 1, default steps) vs the
    same loss.backward() on the plain module;
  - step: forward + backward together (ARBackward's forward keeps a private
    graph, so its overhead is counted here);
  - the floor of any such wrapper: the module run inside a bare
    ``autograd.Function`` on a private graph whose backward is
    ``torch.autograd.grad`` (what the Function mechanism alone costs).
Writes a markdown table and raw JSON. Usage:

    python benchmarks/bench_exact.py --device cpu --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's torch_ar

import torch
import torchvision
from machine import machine_name, sync
from torch import nn

import torch_ar
from torch_ar.experiments.models import cifar_cnn, paper_mlp


class PrivateGraph(torch.autograd.Function):
    """The module on a private graph, differentiated by autograd: the wrapper floor."""

    @staticmethod
    def forward(ctx, module: nn.Module, x: torch.Tensor, *params: torch.Tensor):
        with torch.enable_grad():
            out = module(x.detach().requires_grad_(True))
        ctx.out, ctx.params = out, params
        return out.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *torch.autograd.grad(ctx.out, ctx.params, grad))


class FloorWrapper(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return PrivateGraph.apply(self.module, x, *self.module.parameters())


def time_model(model: nn.Module, x: torch.Tensor, repeats: int, device: torch.device) -> dict:
    """Median backward and forward+backward times, autograd vs AR vs the wrapper floor, interleaved."""
    ar = torch_ar.ARBackward(model)
    floor = FloorWrapper(model)
    target = torch.randn_like(model(x))

    def one(m: nn.Module) -> tuple[float, float]:
        sync(device)
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(m(x), target)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        sync(device)
        t2 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        return t2 - t1, t2 - t0

    for _ in range(3):  # warm-up: allocator, kernels, lazy init
        one(model)
        one(ar)
        one(floor)
    plain, relaxed, wrapped = [], [], []
    for _ in range(repeats):
        plain.append(one(model))
        relaxed.append(one(ar))
        wrapped.append(one(floor))
    bw_a = statistics.median(t[0] for t in plain)
    bw_r = statistics.median(t[0] for t in relaxed)
    bw_w = statistics.median(t[0] for t in wrapped)
    st_a = statistics.median(t[1] for t in plain)
    st_r = statistics.median(t[1] for t in relaxed)
    st_w = statistics.median(t[1] for t in wrapped)
    return {
        "autograd_backward_ms": bw_a * 1e3,
        "ar_backward_ms": bw_r * 1e3,
        "backward_ratio": bw_r / bw_a,
        "floor_backward_ratio": bw_w / bw_a,
        "autograd_step_ms": st_a * 1e3,
        "ar_step_ms": st_r * 1e3,
        "step_ratio": st_r / st_a,
        "floor_step_ratio": st_w / st_a,
        "depth": ar.last_stats.depth if ar.last_stats else None,
        "states": ar.last_stats.num_states if ar.last_stats else None,
    }


# A model small enough that the time is the fixed cost of one backward.
TOY = "2-layer toy 8-16-4 (tanh)"


def cases(device: torch.device) -> list[tuple[str, nn.Module, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        (
            TOY,
            nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)),
            torch.randn(4, 8, generator=g),
        ),
        ("paper MLP 784-300-300-100-10", paper_mlp(), torch.randn(64, 784, generator=g)),
        ("CIFAR CNN", cifar_cnn(), torch.randn(64, 3, 32, 32, generator=g)),
        (
            "resnet18 (torchvision, 10 classes)",
            torchvision.models.resnet18(num_classes=10),
            torch.randn(32 if device.type == "cpu" else 128, 3, 32, 32, generator=g),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for name, model, x in cases(device):
        model = model.to(device).train()
        x = x.to(device)
        r = time_model(model, x, args.repeats, device)
        r.update(model=name, batch=x.shape[0])
        rows.append(r)
        print(
            f"{name:38s} batch {x.shape[0]:4d}  backward {r['autograd_backward_ms']:8.2f} ms"
            f" -> AR {r['ar_backward_ms']:8.2f} ms  ({r['backward_ratio']:.2f}x);"
            f"  fwd+bwd {r['step_ratio']:.2f}x"
        )
    machine = machine_name(device)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    meta = {"machine": machine, "torch": torch.__version__, "device": str(device)}
    (args.out / f"exact_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        (
            f"Exact mode (eta 1, default steps) on {machine}, torch {torch.__version__}; "
            f"median of {args.repeats} interleaved repeats."
        ),
        "",
        (
            "| model | batch | states (D) | autograd backward | AR backward | ratio | fwd+bwd ratio "
            "| wrapper floor: backward, fwd+bwd |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['states']} ({r['depth']}) "
            f"| {r['autograd_backward_ms']:.2f} ms | {r['ar_backward_ms']:.2f} ms "
            f"| {r['backward_ratio']:.2f}x | {r['step_ratio']:.2f}x "
            f"| {r['floor_backward_ratio']:.2f}x, {r['floor_step_ratio']:.2f}x |"
        )
    lines += [
        "",
        (
            "Wrapper floor: the module on a private graph inside a bare autograd.Function "
            "whose backward is torch.autograd.grad, what any wrapper of this kind costs."
        ),
    ]
    toy = next(r for r in rows if r["model"] == TOY)
    lines += [
        "",
        f"Fixed cost per backward (the {TOY}, batch {toy['batch']}): AR's backward takes "
        f"{(toy['ar_backward_ms'] - toy['autograd_backward_ms']) * 1e3:.0f} µs more than "
        f"autograd's, forward + backward {(toy['ar_step_ms'] - toy['autograd_step_ms']) * 1e3:.0f}"
        " µs more.",
    ]
    (args.out / f"exact_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

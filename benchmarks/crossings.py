"""How often one training step's Python crosses into torch_ar's C++.

Counts, with `sys.setprofile`, every call from Python into the extension
during one SGD step of the paper MLP (784-300-300-100-10, batch 64): calls
of `torch.ops.torch_ar.*` operators and of `torch_ar._C` functions and
methods (the `Relaxation` engine object and its static `capture`; a type
called from Python would not be seen, so nothing in a step is constructed
that way), split into the forward and the backward. C++ calling C++ (the engine launching its update kernels) is not a
crossing and is not counted. Writes a markdown table and raw JSON:

    python benchmarks/crossings.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's torch_ar

import torch
from torch import nn

import torch_ar
from torch_ar import _C
from torch_ar.experiments.models import paper_mlp

SETTINGS = {
    "exact (eta 1)": {},
    "paper (eta 0.1, 100 steps)": {"eta": 0.1, "steps": 100},
    "literal (eta 0.1, 100 steps, traced)": {"eta": 0.1, "steps": 100, "trace": True},
}


def _engine_call(frame, event: str, arg) -> str | None:
    """The name of the torch_ar C++ entry this profile event enters, if any."""
    if event == "call" and frame.f_code.co_name == "__call__":
        op = frame.f_locals.get("self")
        name = getattr(op, "_qualified_op_name", None) or getattr(op, "_name", None)
        if isinstance(op, torch._ops.OpOverloadPacket) and str(name).startswith("torch_ar::"):
            return str(name)
    if event == "c_call" and getattr(arg, "__module__", None) == "torch_ar._C":
        # pybind11 functions and methods: named by their class where they have one.
        for cls in (_C.Relaxation, _C.EngineConfig, _C.RelaxStats):
            if getattr(cls, arg.__name__, None) is not None:
                return f"_C.{cls.__name__}.{arg.__name__}"
        return f"_C.{arg.__name__}"
    return None


class _Counter:
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, frame, event, arg) -> None:
        name = _engine_call(frame, event, arg)
        if name:
            self.calls[name] += 1


def _count(fn) -> Counter[str]:
    counter = _Counter()
    sys.setprofile(counter)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return counter.calls


def count_step(settings: dict) -> dict:
    """Crossings in the forward and in the backward of one SGD step (after a
    warm-up step), with the names of what was called."""
    torch.manual_seed(0)
    model = torch_ar.ARBackward(paper_mlp(), **settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step() -> tuple[Counter[str], Counter[str]]:
        opt.zero_grad()
        loss = []
        forward = _count(lambda: loss.append(nn.functional.cross_entropy(model(x), y)))
        backward = _count(loss[0].backward)
        opt.step()
        return forward, backward

    step()  # warm-up
    forward, backward = step()
    return {
        "forward": sum(forward.values()),
        "backward": sum(backward.values()),
        "forward_calls": dict(forward),
        "backward_calls": dict(backward),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="crossings.json of an earlier version, shown beside this one",
    )
    parser.add_argument("--baseline-label", default="before", help="what the baseline was")
    args = parser.parse_args()
    rows = {name: count_step(s) for name, s in SETTINGS.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "crossings.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "# Python to C++ crossings per training step",
        "",
        "One SGD step of the paper MLP (784-300-300-100-10, batch 64, cross-entropy), "
        "after a warm-up step; `python benchmarks/crossings.py`. A crossing is a call from "
        "Python into torch_ar's extension (`torch.ops.torch_ar.*` or `torch_ar._C`).",
        "",
        "| setting | forward | backward | what is called |",
        "|---|---:|---:|---|",
    ]
    for name, r in rows.items():
        what = "; ".join(
            f"{phase}: " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in calls.items())
            for phase, calls in (("forward", r["forward_calls"]), ("backward", r["backward_calls"]))
        )
        lines.append(f"| {name} | {r['forward']} | {r['backward']} | {what} |")
    if args.baseline is not None:
        before = json.loads(args.baseline.read_text())
        lines += [
            "",
            f"Beside {args.baseline_label}:",
            "",
            "| setting | before (forward + backward) | now (forward + backward) |",
            "|---|---:|---:|",
        ]
        for name, r in rows.items():
            b = before.get(name)
            then = f"{b['forward']} + {b['backward']}" if b else "-"
            lines.append(f"| {name} | {then} | {r['forward']} + {r['backward']} |")
    (args.out / "crossings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

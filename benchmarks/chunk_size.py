"""The CUDA update kernels' chunk size: relax_update_ and horner_update_ timed
at several chunk sizes (TORCH_AR_CUDA_CHUNK_ELEMENTS, read once per process,
so each size runs in a process of its own), on three state lists: ResNet-20's
states at layer granularity and batch 128, the paper MLP's at batch 64, and
one large state. Median of CUDA-event timings per launch, every size in the
same run; the kernels' default is 4096 elements (16 a thread).

    python benchmarks/chunk_size.py --device cuda --out benchmarks/results

On the CPU (--device cpu, a smoke run) the CPU kernels ignore the variable:
the rows then only show that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch_ar  # noqa: F401  (registers torch.ops.torch_ar)

SIZES = (4096, 16384, 65536)


def workloads(device: str, scale: int) -> dict[str, list[torch.Size]]:
    """State shapes by workload name; `scale` divides the batch (smoke runs)."""
    b = max(128 // scale, 1)
    return {
        "resnet20 layer states, batch 128": [torch.Size([b, 16, 32, 32])] * 7
        + [torch.Size([b, 32, 16, 16])] * 6
        + [torch.Size([b, 64, 8, 8])] * 6,
        "paper MLP states, batch 64": [
            torch.Size([max(64 // scale, 1), n]) for n in (300, 300, 100)
        ],
        "one large state": [torch.Size([b, 64, 32, 32])],
    }


def _timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of `fn` over `repeats` calls after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def measure(device: str, repeats: int, scale: int) -> list[dict]:
    """This process's timings (its chunk size is fixed by the environment)."""
    torch.manual_seed(0)
    rows = []
    for name, shapes in workloads(device, scale).items():
        states = [torch.randn(s, device=device) for s in shapes]
        targets = [torch.randn(s, device=device) for s in shapes]
        initial = [torch.randn(s, device=device) for s in shapes]

        def relax(states=states, targets=targets):
            torch.ops.torch_ar.relax_update_(states, targets, 0.1, 0.0)

        def horner(states=states, initial=initial, targets=targets):
            none = [None] * len(states)
            torch.ops.torch_ar.horner_update_(
                states, initial, targets, targets, none, 0.5, 0.5, 0.0, False
            )

        relax_ms, horner_ms = _timed(relax, device, repeats), _timed(horner, device, repeats)
        elements = sum(s.numel() for s in shapes)
        rows.append(
            {"workload": name, "elements": elements, "relax_ms": relax_ms, "horner_ms": horner_ms}
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--scale", type=int, default=1, help="divide the batches (smoke runs)")
    p.add_argument("--out", default=None)
    p.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.device, args.repeats, args.scale)))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for size in sizes:
        env = {**os.environ, "TORCH_AR_CUDA_CHUNK_ELEMENTS": str(size)}
        command = [sys.executable, __file__, "--measure", "--device", args.device]
        command += ["--repeats", str(args.repeats), "--scale", str(args.scale)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr)
            return done.returncode
        results[size] = json.loads(done.stdout.strip().splitlines()[-1])
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (ignores the size)"
    lines = [
        f"Update kernels by chunk size, {device}, median ms per launch of {args.repeats}:",
        "",
        "| workload | elements | " + " | ".join(f"relax {s} | horner {s}" for s in sizes) + " |",
        "|---|---:|" + "---:|---:|" * len(sizes),
    ]
    for i, row in enumerate(results[sizes[0]]):
        cells = []
        for s in sizes:
            r = results[s][i]
            cells += [f"{r['relax_ms']:.4f}", f"{r['horner_ms']:.4f}"]
        lines.append(f"| {row['workload']} | {row['elements']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = "cuda" if args.device == "cuda" else "cpu"
        payload = {"device": device, "repeats": args.repeats, "sizes": sizes, "rows": results}
        (out / f"chunk_size_{tag}.json").write_text(json.dumps(payload, indent=1) + "\n")
        (out / f"chunk_size_{tag}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

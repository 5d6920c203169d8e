"""Peer check against BioTorch (biotorch==0.0.16, a benchmark-only dependency).

On BioTorch's own ResNet-20 (``biotorch.models.small_resnet``), torch_ar's
feedback alignment, sign-symmetry and direct feedback alignment variants must
return BioTorch's gradients for a batch: BioTorch's ``fa``/``usf``/``frsf``/
``dfa`` models give the reference (their custom autograd functions propagate
through ``weight_backward``; dfa's backward hooks send each layer's input
``weight_backward`` applied to the loss gradient); torch_ar relaxes the plain
model with the same weights and, for feedback alignment, frSF and DFA,
BioTorch's own feedback weights (or magnitudes) as psi. float64, at eta 1 (the exact sweep) and at eta < 1 with
enough steps (closed form and literal steps). With ``--time``: forward + backward of both, float32,
interleaved, medians (run it with nothing else on the machine).

    pip install --no-deps biotorch==0.0.16
    python benchmarks/peer_biotorch.py --out benchmarks/results
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

# torch_ar variant for each BioTorch mode.
MODES = {
    "fa": "feedback_alignment",
    "usf": "sign_symmetry",
    "frsf": "sign_symmetry_fixed_random",
    "dfa": "direct_feedback_alignment",
}
CLASSES = 10


def biotorch_models(mode: str, dtype: torch.dtype, seed: int):
    """(BioTorch's model in `mode`, the plain ResNet-20 with the same weights)."""
    import biotorch.models.dfa as dfa  # type: ignore
    import biotorch.models.fa as fa  # type: ignore
    import biotorch.models.frsf as frsf  # type: ignore
    import biotorch.models.usf as usf  # type: ignore
    from biotorch.models.small_resnet import resnet20  # type: ignore

    torch.manual_seed(seed)
    family = {"fa": fa, "usf": usf, "frsf": frsf, "dfa": dfa}[mode]
    bio = family.resnet20(num_classes=CLASSES).to(dtype)
    plain = resnet20(num_classes=CLASSES).to(dtype)
    state = {k: v for k, v in bio.module.state_dict().items() if "_backward" not in k}
    plain.load_state_dict(state)
    return bio, plain


def give_psi(ar: torch_ar.ARBackward, bio, mode: str) -> None:
    """BioTorch's feedback weights (fa) or their magnitudes (frsf) as torch_ar's."""
    layers = dict(bio.module.named_modules())
    with torch.no_grad():
        for name, psi in ar.backward_weights().items():
            layer = layers[name.rsplit(".", 1)[0]]
            b = layer.weight_backward.detach()
            # torch_ar's linear psi is [in, out] ([in, output_dim] for DFA).
            b = b.t() if b.dim() == 2 else b
            if mode in ("fa", "dfa"):
                psi.copy_(b)
            elif mode == "frsf":
                key = name.replace(".", "__")
                ar.backward_weight_magnitude[key].copy_(b.abs())
    if mode == "frsf":
        ar.refresh_sign_feedback()


def _psi_size(mode: str) -> dict:
    # DFA's psi projects the output error: made at once for its size.
    return {"output_dim": CLASSES} if mode == "dfa" else {}


def gradients(model, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    if getattr(model, "mode", None) == "dfa":
        # BioTorch's dfa model takes the targets and loss to broadcast e.
        out = model(x, targets=y, loss_function=F.cross_entropy)
    else:
        out = model(x)
    F.cross_entropy(out, y).backward()
    return {
        n: p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.grad is not None and "_backward" not in n
    }


def batch(dtype: torch.dtype, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 32, 32, generator=g).to(dtype), torch.randint(
        0, 10, (size,), generator=g
    )


def check(mode: str, settings: dict, batch_size: int) -> dict:
    bio, plain = biotorch_models(mode, torch.float64, seed=0)
    x, y = batch(torch.float64, batch_size, seed=1)
    want = {k.removeprefix("module."): v for k, v in gradients(bio, x, y).items()}
    ar = torch_ar.ARBackward(plain, variant=MODES[mode], **_psi_size(mode), **settings)
    give_psi(ar, bio, mode)
    got = gradients(ar, x, y)
    got = {k.removeprefix("module."): v for k, v in got.items()}
    total = torch.cat([w.flatten() for w in want.values()]).norm().item()
    errors = {
        n: ((got[n] - w).norm() / max(w.norm().item(), 1e-3 * total)).item()
        for n, w in want.items()
    }
    stats = ar.last_stats
    return {
        "mode": mode,
        "variant": MODES[mode],
        **settings,
        "evaluation": stats.evaluation,
        "depth": stats.depth,
        "max_rel_err": max(errors.values()),
        "worst_param": max(errors, key=errors.get),
        "params": len(errors),
        "missing": sorted(set(want) - set(got)),
    }


def timing(mode: str, batch_size: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    bio, plain = biotorch_models(mode, torch.float32, seed=0)
    ar = torch_ar.ARBackward(plain, variant=MODES[mode], **_psi_size(mode))
    give_psi(ar, bio, mode)
    x, y = batch(torch.float32, batch_size, seed=1)
    times = {"biotorch": [], "torch_ar": []}
    for _ in range(repeats + 1):  # the first of each is a warm-up
        for name, model in (("biotorch", bio), ("torch_ar", ar)):
            start = time.perf_counter()
            gradients(model, x, y)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    return {
        "mode": mode,
        "batch": batch_size,
        "threads": 1,
        "repeats": repeats,
        "biotorch_s": med["biotorch"],
        "torch_ar_s": med["torch_ar"],
        "ratio": med["torch_ar"] / med["biotorch"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--time", action="store_true", help="also time both (float32, batch 128)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    rows = []
    for mode in MODES:
        # eta 0.5 / 200 steps: within 1e-13 of the fixed point at ResNet-20's
        # depth 48 (P[Binomial(200, 0.5) < 48]), so the literal steps and the
        # closed form are checked, not only their limit.
        for settings in (
            {},
            {"eta": 0.5, "steps": 200},
            {"eta": 0.5, "steps": 200, "evaluation": "literal"},
        ):
            row = check(mode, settings, args.batch_size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = all(r["max_rel_err"] <= 1e-9 and not r["missing"] for r in rows)
    result = {
        "machine": f"{cpu_model()}, {platform.machine()}",
        "torch": torch.__version__,
        "float64 batch": args.batch_size,
        "gradients": rows,
        "all_equal": ok,
    }
    if args.time:
        result["timing"] = [timing(m, 128, args.repeats) for m in MODES]
        for t in result["timing"]:
            print(json.dumps(t), flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "peer_biotorch.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

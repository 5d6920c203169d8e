"""Paper mode (eta 0.1, 100 steps): torch_ar against plain-PyTorch AR, in one run.

For the paper's MLP (784-300-300-100-10, batch 64) and the CIFAR CNN
(``torch_ar.experiments.models.cifar_cnn()``), with an MSE loss on one-hot targets as the
paper, the median over interleaved repeats (after warm-up; CUDA synchronised
around every timed region) of:

- backward time at the paper's settings: ``loss.backward()`` through
  ``ARBackward(model, eta, steps)`` (the closed form, the default) and with
  ``evaluation="literal"`` (the steps one by one) vs the plain-PyTorch AR of
  ``benchmarks/plain_ar.py`` (a Python loop over steps and layers: explicit
  Jacobians for the MLP, ``torch.autograd.grad`` per layer for any
  Sequential), and autograd's own backward and forward + backward for scale;
  the closed form against the plain loop is the algorithmic gain (the same
  outcome without the steps), the literal steps against it the engine's;
- cost of one relaxation step, ``(T(steps) - T(lo_steps)) / (steps - lo_steps)``
  (fixed costs, such as capture and weight gradients, cancel), against one
  input-only VJP sweep: ``torch.autograd.grad(loss, layer_outputs,
  retain_graph=True)``, the gradients of the layer activations only, no weight
  gradients; that is what one step has to compute, its practical limit;
- on CUDA, peak memory above the model/input baseline
  (``torch.cuda.max_memory_allocated``) of forward + backward for autograd,
  torch_ar exact (eta 1), torch_ar paper mode and plain AR paper mode
  (skipped on CPU);
- a correctness line per model: cosine of each method's gradients to
  autograd's, and plain AR at eta 1 (D steps) against autograd.

Writes ``paper_<device>.md`` and ``paper_<device>.json`` to ``--out``. Usage::

    python benchmarks/bench_paper.py --device cuda --out benchmarks/results
    python benchmarks/bench_paper.py --device cpu --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_HERE = Path(__file__).resolve().parent
# plain_ar beside this file; torch_ar from this checkout (built in place).
for _p in (str(_HERE.parent), str(_HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import plain_ar
from machine import machine_name, sync

import torch_ar

try:
    from torch_ar.experiments.models import cifar_cnn, paper_mlp

    MODELS_FROM = "torch_ar.experiments.models"
except ImportError:  # torch_ar.experiments.models needs torchvision; the two models do not.
    MODELS_FROM = "local copies (torch_ar.experiments.models not importable: torchvision missing?)"

    def paper_mlp() -> nn.Sequential:
        layers: list[nn.Module] = [nn.Flatten()]
        sizes = (784, 300, 300, 100)
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Linear(100, 10))
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.05)
                nn.init.zeros_(m.bias)
        return model

    def cifar_cnn() -> nn.Sequential:
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (32, 64, 128):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(128 * 4 * 4, 10))


Timed = Callable[[], tuple[float, float]]  # one run -> (forward s, backward s)


def flat(grads: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.detach().double().flatten() for g in grads])


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    x, y = flat(a), flat(b)
    return float(x @ y / (x.norm() * y.norm()))


def max_rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(
        float((x.double() - y.double()).norm() / max(float(y.double().norm()), 1e-300))
        for x, y in zip(a, b)
    )


class Case:
    """One model with its input, target and the methods to compare on it."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        x: torch.Tensor,
        device: torch.device,
        eta: float,
        steps: int,
        lo_steps: int,
        sweep_calls: int,
    ) -> None:
        self.name, self.device = name, device
        self.model = model.to(device).train()
        self.x = x.to(device)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            classes = self.model(self.x).shape[1]
        labels = torch.randint(0, classes, (x.shape[0],), generator=g)
        self.target = F.one_hot(labels, classes).to(device=device, dtype=self.x.dtype)
        self.loss_fn = F.mse_loss
        self.eta, self.steps, self.lo_steps = eta, steps, lo_steps
        self.sweep_calls = sweep_calls
        self.params = list(self.model.parameters())
        self.blocks = plain_ar.split_blocks(self.model)
        self.is_mlp = all(
            isinstance(m, (nn.Flatten, nn.Linear, nn.ReLU, nn.Tanh, nn.Sigmoid)) for m in self.model
        )
        self.mlp_layers = plain_ar.mlp_layers(self.model) if self.is_mlp else None
        self.ar_exact = torch_ar.ARBackward(self.model)
        self.ar_closed = torch_ar.ARBackward(self.model, eta=eta, steps=steps)
        literal = {"evaluation": "literal"}
        self.ar_paper = torch_ar.ARBackward(self.model, eta=eta, steps=steps, **literal)
        self.ar_lo = torch_ar.ARBackward(self.model, eta=eta, steps=lo_steps, **literal)
        # The speed features of the literal steps, each against their default
        # path: the activation derivative applied by its own VJP instead of
        # the update kernel, and (CUDA) steps recorded as a CUDA graph.
        self.variants = {
            "unfused": {"fuse_activations": False},
            **({"graph": {"cuda_graph": True}} if device.type == "cuda" else {}),
        }
        self.ar_feature = {
            (name, n): torch_ar.ARBackward(self.model, eta=eta, steps=n, **literal, **kw)
            for name, kw in self.variants.items()
            for n in (steps, lo_steps)
        }
        # The plain AR flavour timed for this model (explicit Jacobians where possible).
        self.plain_kind = "explicit" if self.is_mlp else "autograd.grad"

    # -- one run of each method: (forward seconds, backward seconds) --------

    def _timed(
        self, fwd: Callable[[], object], bwd: Callable[[object], object]
    ) -> tuple[float, float]:
        sync(self.device)
        t0 = time.perf_counter()
        state = fwd()
        sync(self.device)
        t1 = time.perf_counter()
        result = bwd(state)
        sync(self.device)
        t2 = time.perf_counter()
        del result, state
        self.model.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    def run_module(self, module: nn.Module) -> tuple[float, float]:
        return self._timed(
            lambda: self.loss_fn(module(self.x), self.target),
            lambda loss: loss.backward(),
        )

    def run_plain_mlp(self, steps: int) -> tuple[float, float]:
        def bwd(fw: plain_ar.MLPForward) -> list[torch.Tensor]:
            grad_out = plain_ar.output_gradient(fw.h[-1], self.target, self.loss_fn)
            return plain_ar.mlp_weight_grads(fw, plain_ar.mlp_relax(fw, grad_out, self.eta, steps))

        return self._timed(lambda: plain_ar.mlp_forward(self.mlp_layers, self.x), bwd)

    def run_plain_blocks(self, steps: int) -> tuple[float, float]:
        def bwd(fw: plain_ar.BlocksForward) -> list[torch.Tensor]:
            grad_out = plain_ar.output_gradient(fw.outputs[-1], self.target, self.loss_fn)
            states = plain_ar.blocks_relax(fw, grad_out, self.eta, steps)
            return plain_ar.blocks_weight_grads(fw, states)

        return self._timed(lambda: plain_ar.blocks_forward(self.blocks, self.x), bwd)

    def run_plain(self, steps: int) -> tuple[float, float]:
        return self.run_plain_mlp(steps) if self.is_mlp else self.run_plain_blocks(steps)

    def forward_with_activations(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, acts = self.x, []
        for block in self.blocks:
            h = block(h)
            acts.append(h)
        return self.loss_fn(h, self.target), acts[:-1]

    def run_vjp_sweep(self) -> tuple[float, float]:
        """One input-only VJP sweep (averaged over sweep_calls calls on one graph)."""

        def bwd(state: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
            loss, acts = state
            for _ in range(self.sweep_calls):
                torch.autograd.grad(loss, acts, retain_graph=True)

        fwd_s, bwd_s = self._timed(self.forward_with_activations, bwd)
        return fwd_s, bwd_s / self.sweep_calls

    def methods(self) -> dict[str, Timed]:
        m: dict[str, Timed] = {
            "autograd": lambda: self.run_module(self.model),
            "vjp_sweep": self.run_vjp_sweep,
            "ar_exact": lambda: self.run_module(self.ar_exact),
            "ar_closed": lambda: self.run_module(self.ar_closed),
            "ar_paper": lambda: self.run_module(self.ar_paper),
            "ar_lo": lambda: self.run_module(self.ar_lo),
            "plain_paper": lambda: self.run_plain(self.steps),
            "plain_lo": lambda: self.run_plain(self.lo_steps),
        }
        for (name, n), module in self.ar_feature.items():
            tag = "paper" if n == self.steps else "lo"
            m[f"ar_{tag}_{name}"] = lambda module=module: self.run_module(module)
        if self.is_mlp:  # the generic autograd.grad flavour too, for comparison
            m["plain_autograd_paper"] = lambda: self.run_plain_blocks(self.steps)
            m["plain_autograd_lo"] = lambda: self.run_plain_blocks(self.lo_steps)
        return m

    # -- gradients, once ------------------------------------------------------

    def module_grads(self, module: nn.Module) -> list[torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(module(self.x), self.target).backward()
        grads = [p.grad.detach().clone() for p in self.params]
        self.model.zero_grad(set_to_none=True)
        return grads

    def correctness(self) -> dict:
        ref = self.module_grads(self.model)
        ar_paper = self.module_grads(self.ar_paper)
        ar_closed = self.module_grads(self.ar_closed)
        depth = self.ar_paper.last_stats.depth
        states = self.ar_paper.last_stats.num_states
        sweeps = self.ar_closed.last_stats.sweeps
        blocks = plain_ar.ar_gradients_blocks(
            self.model, self.x, self.target, self.loss_fn, self.eta, self.steps
        )
        blocks_exact = plain_ar.ar_gradients_blocks(
            self.model, self.x, self.target, self.loss_fn, 1.0, len(self.blocks) - 1
        )
        out = {
            "torch_ar_depth": depth,
            "torch_ar_states": states,
            "plain_states": len(self.blocks),
            "closed_form_sweeps": sweeps,
            "cos_ar_exact": cosine(self.module_grads(self.ar_exact), ref),
            "cos_ar_paper": cosine(ar_paper, ref),
            "cos_ar_closed": cosine(ar_closed, ref),
            "closed_vs_literal_rel_err": max_rel_err(ar_closed, ar_paper),
            "cos_plain_autograd_paper": cosine(blocks, ref),
            "plain_autograd_eta1_rel_err": max_rel_err(blocks_exact, ref),
        }
        if self.is_mlp:
            mlp = plain_ar.ar_gradients_mlp(
                self.model, self.x, self.target, self.loss_fn, self.eta, self.steps
            )
            mlp_exact = plain_ar.ar_gradients_mlp(
                self.model, self.x, self.target, self.loss_fn, 1.0, len(self.mlp_layers) - 1
            )
            out["cos_plain_explicit_paper"] = cosine(mlp, ref)
            out["plain_explicit_eta1_rel_err"] = max_rel_err(mlp_exact, ref)
            # Same states, same init, same schedule: the two should agree to rounding.
            out["ar_paper_vs_plain_paper_rel_err"] = max_rel_err(ar_paper, mlp)
        return out

    # -- peak memory (CUDA) ----------------------------------------------------

    def peak_memory(self) -> dict[str, float]:
        """Peak MiB allocated during one forward + backward, above what was live before.

        CUDA: torch.cuda.max_memory_allocated. CPU: the running total that
        torch's CPU allocator reports to the profiler (profile_memory=True).
        """

        def full(run: Callable[[], object]) -> float:
            self.model.zero_grad(set_to_none=True)
            gc.collect()
            if self.device.type == "cuda":
                sync(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                result = run()
                sync(self.device)
                peak = torch.cuda.max_memory_allocated(self.device) - base
            else:
                result, peak = cpu_peak_bytes(run)
            del result
            self.model.zero_grad(set_to_none=True)
            return peak / 2**20

        def module(m: nn.Module) -> Callable[[], object]:
            def run() -> None:
                self.loss_fn(m(self.x), self.target).backward()

            return run

        runs = {
            "autograd": module(self.model),
            "ar_exact": module(self.ar_exact),
            "ar_closed": module(self.ar_closed),
            "ar_paper": module(self.ar_paper),
            **(
                {"ar_paper_graph": module(self.ar_feature[("graph", self.steps)])}
                if "graph" in self.variants
                else {}
            ),
            "plain_paper": lambda: (
                plain_ar.ar_gradients_mlp if self.is_mlp else plain_ar.ar_gradients_blocks
            )(self.model, self.x, self.target, self.loss_fn, self.eta, self.steps),
        }
        for run in runs.values():  # warm the caching allocator
            full(run)
        return {name: full(run) for name, run in runs.items()}


def cpu_peak_bytes(run: Callable[[], object]) -> tuple[object, int]:
    """run() under the profiler; the highest 'Total Allocated' of the CPU
    allocator's memory events above the first one."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = run()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [
        e["args"]["Total Allocated"]
        for e in events
        if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {})
    ]
    return result, (max(totals) - totals[0]) if totals else 0


def measure(case: Case, repeats: int, warmup: int) -> dict[str, dict[str, float]]:
    methods = case.methods()
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    for _ in range(repeats):  # interleaved: drifts hit every method alike
        for name, fn in methods.items():
            samples[name].append(fn())
    return {
        name: {
            "forward_ms": statistics.median(s[0] for s in runs) * 1e3,
            "backward_ms": statistics.median(s[1] for s in runs) * 1e3,
            "total_ms": statistics.median(s[0] + s[1] for s in runs) * 1e3,
        }
        for name, runs in samples.items()
    }


def summarise(case: Case, t: dict[str, dict[str, float]]) -> dict:
    span = case.steps - case.lo_steps
    bw = {k: v["backward_ms"] for k, v in t.items()}
    ar_step = (bw["ar_paper"] - bw["ar_lo"]) / span
    plain_step = (bw["plain_paper"] - bw["plain_lo"]) / span
    row = {
        "model": case.name,
        "batch": int(case.x.shape[0]),
        "plain_kind": case.plain_kind,
        "times": t,
        "autograd_backward_ms": bw["autograd"],
        "vjp_sweep_ms": bw["vjp_sweep"],
        "ar_exact_backward_ms": bw["ar_exact"],
        "ar_closed_backward_ms": bw["ar_closed"],
        "autograd_total_ms": t["autograd"]["total_ms"],
        "ar_closed_total_ms": t["ar_closed"]["total_ms"],
        "ar_closed_over_autograd_backward": bw["ar_closed"] / bw["autograd"],
        "ar_closed_over_autograd_total": t["ar_closed"]["total_ms"] / t["autograd"]["total_ms"],
        "plain_over_closed_backward": bw["plain_paper"] / bw["ar_closed"],
        "plain_over_closed_total": t["plain_paper"]["total_ms"] / t["ar_closed"]["total_ms"],
        "literal_over_closed_backward": bw["ar_paper"] / bw["ar_closed"],
        "ar_paper_backward_ms": bw["ar_paper"],
        "plain_paper_backward_ms": bw["plain_paper"],
        "ar_step_ms": ar_step,
        "plain_step_ms": plain_step,
        "plain_over_ar_backward": bw["plain_paper"] / bw["ar_paper"],
        "plain_over_ar_total": t["plain_paper"]["total_ms"] / t["ar_paper"]["total_ms"],
        "ar_paper_over_autograd_backward": bw["ar_paper"] / bw["autograd"],
        "ar_step_over_vjp_sweep": ar_step / bw["vjp_sweep"],
        "plain_step_over_vjp_sweep": plain_step / bw["vjp_sweep"],
    }
    row["features"] = {}
    for name in case.variants:
        paper, lo = bw[f"ar_paper_{name}"], bw[f"ar_lo_{name}"]
        step = (paper - lo) / span
        row["features"][name] = {
            "backward_ms": paper,
            "step_ms": step,
            "default_over_feature_backward": bw["ar_paper"] / paper,
            "plain_over_feature_backward": bw["plain_paper"] / paper,
            "step_over_vjp_sweep": step / bw["vjp_sweep"],
        }
    if "plain_autograd_paper" in bw:
        row["plain_autograd_paper_backward_ms"] = bw["plain_autograd_paper"]
        row["plain_autograd_step_ms"] = (
            bw["plain_autograd_paper"] - bw["plain_autograd_lo"]
        ) / span
        row["plain_autograd_over_ar_backward"] = bw["plain_autograd_paper"] / bw["ar_paper"]
    return row


def fmt(v: float | None, unit: str = "", digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}{unit}"


def fmt_step(v: float, unit: str = " ms", digits: int = 3) -> str:
    """A per-step difference; not positive only when timing noise swamps it."""
    return fmt(v, unit, digits) if v > 0 else "n/a (noise: T(steps) <= T(lo_steps))"


def markdown(meta: dict, rows: list[dict]) -> str:
    a = meta["args"]
    lines = [
        f"# Paper mode (eta {a['eta']}, {a['steps']} steps): torch_ar vs plain-PyTorch AR",
        "",
        (
            f"Device: **{meta['machine']}** ({meta['device']}), torch {meta['torch']}, "
            f"CUDA {meta['cuda'] or 'n/a'}; models from {meta['models_from']}; MSE loss on one-hot "
            f"targets, float32; median of {a['repeats']} interleaved repeats after "
            f"{a['warmup']} warm-up round(s). Per-step cost = (T({a['steps']}) - "
            f"T({a['lo_steps']})) / {a['steps'] - a['lo_steps']} of the literal backward times. "
            "Ratios plain / torch_ar above 1: torch_ar is faster."
        ),
        "",
        "## The closed form (default) at the paper's settings",
        "",
        (
            "The closed form gives the outcome of the literal steps (max. relative difference "
            "below) from a few input-VJP sweeps: against the plain loop, which takes the "
            f"{a['steps']} steps, this is the algorithmic gain."
        ),
        "",
        (
            "| model | batch | autograd bwd | autograd fwd+bwd | closed form bwd (sweeps) "
            "| closed / autograd bwd | closed / autograd fwd+bwd | plain AR paper bwd "
            "| plain / closed (bwd) | plain / closed (fwd+bwd) | literal / closed |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["correctness"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(r['autograd_backward_ms'], ' ms')} "
            f"| {fmt(r['autograd_total_ms'], ' ms')} "
            f"| {fmt(r['ar_closed_backward_ms'], ' ms')} ({c['closed_form_sweeps']}) "
            f"| {fmt(r['ar_closed_over_autograd_backward'], 'x')} "
            f"| {fmt(r['ar_closed_over_autograd_total'], 'x')} "
            f"| {fmt(r['plain_paper_backward_ms'], ' ms')} ({r['plain_kind']}) "
            f"| {fmt(r['plain_over_closed_backward'], 'x', 1)} "
            f"| {fmt(r['plain_over_closed_total'], 'x', 1)} "
            f"| {fmt(r['literal_over_closed_backward'], 'x', 1)} |"
        )
    lines += [
        "",
        "## The literal steps at the paper's settings",
        "",
        (
            "| model | batch | autograd backward | torch_ar (eta 1) | torch_ar literal | plain AR paper "
            "| plain / torch_ar (backward) | plain / torch_ar (fwd+bwd) | torch_ar literal / autograd |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(r['autograd_backward_ms'], ' ms')} "
            f"| {fmt(r['ar_exact_backward_ms'], ' ms')} | {fmt(r['ar_paper_backward_ms'], ' ms')} "
            f"| {fmt(r['plain_paper_backward_ms'], ' ms')} ({r['plain_kind']}) "
            f"| {fmt(r['plain_over_ar_backward'], 'x')} | {fmt(r['plain_over_ar_total'], 'x')} "
            f"| {fmt(r['ar_paper_over_autograd_backward'], 'x', 1)} |"
        )
    for r in rows:
        if "plain_autograd_paper_backward_ms" in r:
            lines.append("")
            lines.append(
                f"{r['model']}, plain AR with J^T by torch.autograd.grad per layer instead of "
                f"explicit formulas: {fmt(r['plain_autograd_paper_backward_ms'], ' ms')} backward, "
                f"{fmt(r['plain_autograd_over_ar_backward'], 'x')} torch_ar's; "
                f"{fmt_step(r['plain_autograd_step_ms'])} per step."
            )
    lines += [
        "",
        "## One relaxation step vs one input-only VJP sweep",
        "",
        (
            "VJP sweep: `torch.autograd.grad(loss, layer_outputs, retain_graph=True)` "
            "(activation gradients only, no weight gradients): what one step must compute."
        ),
        "",
        (
            "| model | batch | VJP sweep | torch_ar step | plain AR step | torch_ar step / sweep "
            "| plain step / sweep |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {fmt(r['vjp_sweep_ms'], ' ms', 3)} "
            f"| {fmt_step(r['ar_step_ms'])} | {fmt_step(r['plain_step_ms'])} "
            f"| {fmt_step(r['ar_step_over_vjp_sweep'], 'x', 2)} "
            f"| {fmt_step(r['plain_step_over_vjp_sweep'], 'x', 2)} |"
        )
    lines += [
        "",
        "## Speed features against the default path",
        "",
        (
            "Default: fused activation update, no CUDA graph. `unfused`: "
            "`fuse_activations=False` (each activation runs its own VJP every step). `graph`: "
            "`cuda_graph=True` (after step 0, blocks of steps recorded once and replayed; CUDA only). "
            "default / feature above 1: the feature is faster than the default."
        ),
        "",
        (
            "| model | batch | feature | backward | default / feature | plain / feature "
            "| step | step / sweep |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for name, f in r.get("features", {}).items():
            lines.append(
                f"| {r['model']} | {r['batch']} | {name} | {fmt(f['backward_ms'], ' ms')} "
                f"| {fmt(f['default_over_feature_backward'], 'x')} "
                f"| {fmt(f['plain_over_feature_backward'], 'x')} "
                f"| {fmt_step(f['step_ms'])} | {fmt_step(f['step_over_vjp_sweep'], 'x', 2)} |"
            )
    lines += ["", "## Peak memory of forward + backward (above model, input and target)", ""]
    if any(r.get("memory_mib") for r in rows):
        lines += [
            (
                "CUDA: `torch.cuda.max_memory_allocated`; CPU: the CPU allocator's running "
                "total as the profiler records it (`profile_memory=True`)."
            ),
            "",
            (
                "| model | batch | autograd | torch_ar eta 1 | torch_ar closed form "
                "| torch_ar literal | torch_ar literal, graph | plain AR paper |"
            ),
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            m = r["memory_mib"]
            base = m["autograd"]
            cells = [
                f"{fmt(m[k], ' MiB', 1)} ({fmt(m[k] / base, 'x')})" if k in m else "n/a"
                for k in ("ar_exact", "ar_closed", "ar_paper", "ar_paper_graph", "plain_paper")
            ]
            lines.append(
                f"| {r['model']} | {r['batch']} | {fmt(base, ' MiB', 1)} | "
                + " | ".join(cells)
                + " |"
            )
    else:
        lines.append("Not measured.")
    lines += [
        "",
        "## Gradients (cosine to autograd's)",
        "",
        (
            "| model | torch_ar states (D) | torch_ar eta 1 | torch_ar paper | plain AR paper "
            "| plain AR eta 1, D steps: max rel. error | torch_ar paper vs plain paper: max rel. error "
            "| closed form vs literal: max rel. error |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        c = r["correctness"]
        plain_cos = c.get("cos_plain_explicit_paper", c["cos_plain_autograd_paper"])
        plain_err = c.get("plain_explicit_eta1_rel_err", c["plain_autograd_eta1_rel_err"])
        agree = c.get("ar_paper_vs_plain_paper_rel_err")
        lines.append(
            f"| {r['model']} | {c['torch_ar_states']} ({c['torch_ar_depth']}) "
            f"| {c['cos_ar_exact']:.6f} | {c['cos_ar_paper']:.6f} | {plain_cos:.6f} "
            f"| {plain_err:.1e} | {'n/a (different states)' if agree is None else f'{agree:.1e}'} "
            f"| {c['closed_vs_literal_rel_err']:.1e} |"
        )
    lines += [
        "",
        (
            "The plain AR relaxes one state per block (a layer with parameters and the "
            "parameter-free modules after it); torch_ar's states are its layers (a pooling "
            "op is a layer of its own), so on the CNN the transients differ and only the "
            "fixed point is shared."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--eta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--lo-steps",
        type=int,
        default=10,
        help="second step count; per-step cost = dT / (steps - lo_steps)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="default: 20 on CUDA, 3 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    parser.add_argument("--mlp-batch", type=int, default=64)
    parser.add_argument(
        "--cnn-batch", type=int, default=None, help="default: 128 on CUDA, 32 on CPU"
    )
    parser.add_argument(
        "--sweep-calls",
        type=int,
        default=10,
        help="VJP sweeps per timed run (their mean is one sample)",
    )
    parser.add_argument("--models", default="mlp,cnn", help="comma list of: mlp, cnn")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if not 0 <= args.lo_steps < args.steps:
        parser.error("need 0 <= --lo-steps < --steps")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.repeats = args.repeats or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.cnn_batch = args.cnn_batch or (128 if cuda else 32)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    specs = {
        "mlp": ("paper MLP 784-300-300-100-10", paper_mlp, (args.mlp_batch, 784)),
        "cnn": ("CIFAR CNN (cifar_cnn())", cifar_cnn, (args.cnn_batch, 3, 32, 32)),
    }
    unknown = set(wanted) - set(specs)
    if unknown:
        parser.error(f"unknown --models {sorted(unknown)}; choose from {sorted(specs)}")

    rows = []
    for key in wanted:
        name, build, shape = specs[key]
        start = time.perf_counter()
        case = Case(
            name,
            build(),
            torch.randn(*shape, generator=g),
            device,
            args.eta,
            args.steps,
            args.lo_steps,
            args.sweep_calls,
        )
        correctness = case.correctness()
        row = summarise(case, measure(case, args.repeats, args.warmup))
        row["correctness"] = correctness
        row["memory_mib"] = case.peak_memory()
        row["wall_s"] = time.perf_counter() - start
        rows.append(row)
        print(
            f"{name} batch {row['batch']}: backward autograd {row['autograd_backward_ms']:.2f} ms | "
            f"closed form {row['ar_closed_backward_ms']:.2f} ms "
            f"(plain / closed {row['plain_over_closed_backward']:.1f}x) | "
            f"torch_ar literal {row['ar_paper_backward_ms']:.2f} ms | plain AR "
            f"{row['plain_paper_backward_ms']:.2f} ms ({row['plain_over_ar_backward']:.2f}x) | "
            f"step {row['ar_step_ms']:.3f} ms vs VJP sweep {row['vjp_sweep_ms']:.3f} ms "
            f"({row['ar_step_over_vjp_sweep']:.2f}x; plain {row['plain_step_over_vjp_sweep']:.2f}x) "
            f"| {row['wall_s']:.1f} s",
            flush=True,
        )

    meta = {
        "machine": machine_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "models_from": MODELS_FROM,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = device.type
    (args.out / f"paper_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    text = markdown(meta, rows)
    (args.out / f"paper_{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""``python -m torch_ar selftest [--device cuda]``: what to run first on a new machine or GPU.

In well under a minute it checks every kernel against a plain-PyTorch
reference (and, on a GPU, against the CPU kernel), the engine against autograd
on a handful of graphs with every evaluation (exact sweep, closed form,
literal steps; fused and unfused; with and without a CUDA graph on a GPU),
each variant against its oracle, and that CUDA random numbers still work
after a recorded relaxation. It prints a table and the versions a bug report
needs, and exits non-zero on any failure.

Example::

    report = torch_ar.selftest("cuda")
    assert report.ok, report.table()
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# float64 throughout: a correct engine matches autograd to rounding, so a
# tight limit separates a wrong gradient from arithmetic.
TOLERANCE = 1e-9


@dataclass
class Check:
    """One selftest check.

    Attributes:
        name: what was checked (kernel, engine path or variant, and dtype).
        ok: it passed.
        error: the largest relative error, where one was measured.
        limit: the error it had to stay within.
        detail: why it failed, or what was measured.
    """

    name: str
    ok: bool
    error: float | None  # the largest relative error, where one was measured
    limit: float | None
    detail: str = ""


@dataclass
class SelftestReport:
    """What `selftest` found on one device.

    Attributes:
        device: the device tested (`"cpu"`, `"cuda"`, `"cuda:1"`, ...).
        versions: torch, CUDA, driver, GPU, compute capability and the
            architectures the build holds: what a bug report needs.
        checks: every `Check`, in the order they ran.
        seconds: wall time of the whole selftest.
    """

    device: str
    versions: dict[str, str]
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every check ran and passed."""
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.ok]

    def table(self) -> str:
        """The report as Markdown: the versions, then one row per check."""
        lines = [
            f"# torch_ar selftest on {self.device}",
            "",
            *(f"- {k}: {v}" for k, v in self.versions.items()),
            "",
            "| check | result | error | limit |",
            "|---|---|---:|---:|",
        ]
        for c in self.checks:
            err = "" if c.error is None else f"{c.error:.1e}"
            lim = "" if c.limit is None else f"{c.limit:.0e}"
            result = "ok" if c.ok else f"FAILED {c.detail}".strip()
            lines.append(f"| {c.name} | {result} | {err} | {lim} |")
        passed = sum(c.ok for c in self.checks)
        lines += [
            "",
            f"{passed} passed, {len(self.checks) - passed} failed in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "device": self.device,
                "ok": self.ok,
                "seconds": self.seconds,
                "versions": self.versions,
                "checks": [asdict(c) for c in self.checks],
            },
            indent=1,
        )


def versions(device: torch.device) -> dict[str, str]:
    """torch, CUDA, driver, GPU and the architectures torch_ar was built for."""
    import torch_ar

    build = dict(row.split("=", 1) for row in torch.ops.torch_ar.build_info())
    info = {
        "torch_ar": torch_ar.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch CUDA": str(torch.version.cuda),
        "torch_ar CUDA kernels": build.get("cuda", "?"),
        "torch_ar build arch list": build.get("arch_list", "?") or "(none)",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["GPU"] = props.name
        info["compute capability"] = f"{props.major}.{props.minor}"
        info["GPU memory"] = f"{props.total_memory / 2**30:.1f} GiB"
        info["driver"] = _driver_version()
    return info


def _driver_version() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi not available)"


def rel_err(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """|got - want| / |want| over the whole tensor (a missing gradient counts as inf)."""
    if got is None or want is None:
        return 0.0 if got is None and want is None else float("inf")
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.norm().item()
    diff = (got - want).norm().item()
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------
# Graphs and references
# --------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm_b = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm_a(self.conv_a(x)))
        return F.relu(x + self.norm_b(self.conv_b(y)))


def _graphs() -> dict[str, Callable[[], tuple[nn.Module, tuple[int, ...]]]]:
    """Small models that together reach every kind of layer the engine plans."""
    return {
        "mlp": lambda: (
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(48, 32),
                nn.ReLU(),
                nn.Linear(32, 32),
                nn.Tanh(),
                nn.Linear(32, 10),
            ),
            (6, 3, 4, 4),
        ),
        "cnn+bn": lambda: (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(8, 8, 3, padding=1),
                nn.Sigmoid(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(8, 10),
            ),
            (4, 3, 8, 8),
        ),
        "residual": lambda: (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.ReLU(),
                ResidualBlock(8),
                ResidualBlock(8),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(8, 10),
            ),
            (4, 3, 8, 8),
        ),
    }


def _problem(make, device, channels_last=False, seed=0):
    torch.manual_seed(seed)
    net, shape = make()
    net = net.to(device=device, dtype=torch.float64)
    x = torch.randn(*shape, device=device, dtype=torch.float64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(shape[0], device=device) % 10
    return net, x, y


def _autograd_grads(net, x, y) -> dict[str, torch.Tensor]:
    net.zero_grad()
    F.cross_entropy(net(x), y).backward()
    return {n: p.grad.clone() for n, p in net.named_parameters()}


def _ar_grads(net, x, y, **kwargs):
    import torch_ar

    ar = torch_ar.ARBackward(net, **kwargs)
    net.zero_grad()
    F.cross_entropy(ar(x), y).backward()
    return {
        n: p.grad.clone() if p.grad is not None else None for n, p in net.named_parameters()
    }, ar


def _worst(got: dict, want: dict) -> float:
    """The largest per-parameter error, each relative to its own gradient's
    norm or, where that is tiny (a conv bias before a train-mode BatchNorm has
    an exact gradient of zero), to a thousandth of the whole gradient's."""
    total = torch.cat([w.double().flatten().cpu() for w in want.values()]).norm().item()
    worst = 0.0
    for n, w in want.items():
        g = got.get(n)
        if g is None:
            return float("inf")
        scale = max(w.double().norm().item(), 1e-3 * total)
        worst = max(worst, (g.double() - w.double()).norm().item() / scale if scale > 0 else 0.0)
    return worst


# --------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------


class _Runner:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.checks: list[Check] = []

    def check(
        self,
        name: str,
        run: Callable[[], float | tuple[float, str]],
        limit: float | None = TOLERANCE,
    ) -> None:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                value = run()
            detail = ""
            if isinstance(value, tuple):
                value, detail = value
            ok = value is not None and (limit is None or value <= limit)
            # A fallback warned about (no graph recorded, say) is a failure of
            # the path under test even when the numbers agree.
            fallbacks = [str(w.message) for w in caught if "torch_ar" in str(w.message)]
            if fallbacks and not detail:
                detail = fallbacks[0][:160]
            self.checks.append(Check(name, ok, value, limit, "" if ok else detail))
        except Exception as exc:  # noqa: BLE001  (a check that raises has failed)
            self.checks.append(
                Check(name, False, None, limit, f"{type(exc).__name__}: {exc}"[:300])
            )


def _kernel_checks(r: _Runner) -> None:
    dev = r.device
    ops = torch.ops.torch_ar

    def relax_update(dtype, fused: bool, channels_last: bool) -> float:
        torch.manual_seed(1)
        shape = (3, 5, 4, 6)
        x = torch.randn(*shape, dtype=dtype)
        t = torch.randn(*shape, dtype=dtype)
        a = torch.randn(*shape, dtype=dtype).relu()
        eta = 0.3
        want_x = x + eta * (t - x)
        want_norms = torch.tensor([[(t - x).double().norm(), t.double().norm()]])
        want_g = torch.where(a <= 0, torch.zeros_like(want_x), want_x)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        xs = x.to(dev).contiguous(memory_format=fmt)
        ts, as_, g = (v.to(dev).contiguous(memory_format=fmt) for v in (t, a, torch.zeros_like(x)))
        if fused:
            norms = ops.relax_update_activation_(
                [xs], [ts], eta, 0.0, [0], [1], [0.0, 0.0], [as_], [g]
            )
        else:
            norms = ops.relax_update_([xs], [ts], eta, 0.0)
        err = max(rel_err(xs, want_x), rel_err(norms, want_norms))
        if fused:
            err = max(err, rel_err(g, want_g))
        if channels_last and not xs.is_contiguous(memory_format=torch.channels_last):
            return float("inf"), "the state lost its channels_last layout"
        if dev.type != "cpu":  # the GPU kernel against the CPU one
            xc = x.contiguous(memory_format=fmt)
            cpu_norms = ops.relax_update_([xc], [t.contiguous(memory_format=fmt)], eta, 0.0)
            if not fused:
                err = max(err, rel_err(xs, xc), rel_err(norms, cpu_norms))
        return err

    for dtype, limit in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        tag = str(dtype).replace("torch.", "")
        for fused in (False, True):
            for cl in (False, True):
                name = (
                    f"kernel relax_update_{'activation_' if fused else ''} {tag}"
                    f"{' channels_last' if cl else ''}"
                )
                r.check(name, lambda d=dtype, f=fused, c=cl: relax_update(d, f, c), limit)

    def horner(dtype, residual: bool, missing: bool) -> float:
        torch.manual_seed(2)
        n = 4097  # two chunks of the kernels
        x0, b, t, res = (torch.randn(n, dtype=dtype) for _ in range(4))
        alpha, beta = 0.25, 0.7
        want = alpha * x0 + beta * b + (0 if missing else t)
        target = b + res
        want_norms = torch.tensor(
            [
                [
                    want.double().norm(),
                    (target - want).double().norm() if residual else 0.0,
                    target.double().norm() if residual else 0.0,
                    0.0,
                ]
            ]
        )
        out = torch.empty(n, dtype=dtype, device=dev)
        norms = ops.horner_update_(
            [out],
            [x0.to(dev)],
            [b.to(dev)],
            [None if missing else t.to(dev)],
            [res.to(dev) if residual else None],
            alpha,
            beta,
            0.0,
            residual,
        )
        return max(rel_err(out, want), rel_err(norms, want_norms))

    for dtype, limit in ((torch.float64, 1e-15), (torch.float32, 1e-6)):
        tag = str(dtype).replace("torch.", "")
        for residual, missing in ((False, False), (True, False), (True, True)):
            name = (
                f"kernel horner_update_ {tag}{' residual' if residual else ''}"
                f"{' missing term' if missing else ''}"
            )
            r.check(name, lambda d=dtype, re=residual, m=missing: horner(d, re, m), limit)


def _engine_checks(r: _Runner, graphs: dict) -> None:
    dev = r.device
    cuda = dev.type == "cuda"
    for name, make in graphs.items():
        for channels_last in (False, True) if name != "mlp" else (False,):
            tag = name + (" channels_last" if channels_last else "")

            def problem(make=make, cl=channels_last):
                return _problem(make, dev, cl)

            def exact(problem=problem) -> float:
                net, x, y = problem()
                got, ar = _ar_grads(net, x, y)
                return _worst(got, _autograd_grads(net, x, y))

            def literal_eta1(problem=problem) -> float:
                net, x, y = problem()
                got, ar = _ar_grads(net, x, y, evaluation="literal", fuse_activations=False)
                return _worst(got, _autograd_grads(net, x, y))

            def closed_vs_literal(problem=problem, fused=True, graph=False) -> float:
                net, x, y = problem()
                settings = {"eta": 0.2, "steps": 12}
                literal, ar = _ar_grads(
                    net,
                    x,
                    y,
                    evaluation="literal",
                    fuse_activations=fused,
                    cuda_graph=graph,
                    **settings,
                )
                if graph and ar.last_stats.graph_steps == 0:
                    return float("inf"), "no step was replayed from a CUDA graph"
                closed, _ = _ar_grads(net, x, y, **settings)
                return _worst(literal, closed)

            r.check(f"engine {tag}: exact sweep = autograd", exact)
            r.check(f"engine {tag}: literal steps eta 1 = autograd", literal_eta1)
            r.check(f"engine {tag}: closed form = literal steps (fused)", closed_vs_literal)
            r.check(
                f"engine {tag}: closed form = literal steps (unfused)",
                lambda p=problem: closed_vs_literal(p, fused=False),
            )
            if cuda:
                r.check(
                    f"engine {tag}: CUDA graph replay = closed form",
                    lambda p=problem: closed_vs_literal(p, graph=True),
                )


def _large_sum_checks(r: _Runner) -> None:
    """A float16 MLP whose states sum past float16's largest finite value
    (65504) while every element is finite: the sums that decide convergence
    and divergence must be taken in float64, in every evaluation."""
    dev = r.device

    def problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 10))
        with torch.no_grad():
            net[0].bias.fill_(8.0)
            net[2].weight.fill_(1.0)
        x = torch.randn(64, 64)
        y = torch.randint(0, 10, (64,))
        return net.half().to(dev), x.half().to(dev), y.to(dev)

    def exact() -> float:
        net, x, y = problem()
        got, _ = _ar_grads(net, x, y)
        return _worst(got, _autograd_grads(net, x, y))

    def closed_vs_literal() -> float:
        net, x, y = problem()
        settings = {"eta": 0.5, "steps": 6}
        literal, _ = _ar_grads(net, x, y, evaluation="literal", **settings)
        closed, _ = _ar_grads(net, x, y, **settings)
        if not all(torch.isfinite(g).all() for g in literal.values()):
            return float("inf"), "non-finite literal-step gradients"
        return _worst(closed, literal)

    r.check("engine float16, sums past 65504: exact sweep = autograd", exact)
    r.check("engine float16, sums past 65504: closed form = literal steps", closed_vs_literal)


def _variant_oracle(
    net: nn.Sequential,
    psis: dict,
    x,
    y,
    backward_weights: bool,
    drop_derivative: bool,
    direct_feedback: bool = False,
) -> dict[str, torch.Tensor]:
    """One reverse sweep of an MLP with the variant's VJPs, written without
    the engine; direct feedback sends each layer's input psi^T e instead."""
    activations = {nn.ReLU: lambda a: (a > 0).to(a.dtype), nn.Tanh: lambda a: 1 - a.tanh() ** 2}
    layers = list(net)
    names = {id(p): n for n, p in net.named_parameters()}
    h = x.flatten(1)
    tape = []  # (linear, input, pre-activation, activation or None)
    i = 1  # layers[0] is the Flatten
    while i < len(layers):
        lin = layers[i]
        act = layers[i + 1] if i + 1 < len(layers) and type(layers[i + 1]) in activations else None
        a = F.linear(h, lin.weight, lin.bias)
        tape.append((lin, h, a, act))
        h = a if act is None else act(a)
        i += 2 if act is not None else 1
    h = h.detach().requires_grad_()
    F.cross_entropy(h, y).backward()
    g = error = h.grad
    grads = {}
    for lin, inp, a, act in reversed(tape):
        fprime = torch.ones_like(a) if act is None else activations[type(act)](a)
        delta = fprime * g  # the weight update keeps f' (weight_update_derivative)
        grads[names[id(lin.weight)]] = delta.t() @ inp
        grads[names[id(lin.bias)]] = delta.sum(0)
        back = g if drop_derivative else delta
        psi = psis.get(names[id(lin.weight)]) if backward_weights else None
        g = (error if direct_feedback else back) @ (lin.weight if psi is None else psi.t())
    return grads


def _variant_checks(r: _Runner) -> None:
    from torch_ar.variants import VARIANTS

    dev = r.device

    def make():
        return (
            nn.Sequential(
                nn.Flatten(),
                nn.Linear(12, 16),
                nn.ReLU(),
                nn.Linear(16, 16),
                nn.Tanh(),
                nn.Linear(16, 5),
            ),
            (7, 12),
        )

    for variant in VARIANTS.values():
        if variant.name == "exact":
            continue
        for evaluation, settings in (
            ("exact sweep", {}),
            ("closed form", {"eta": 0.5, "steps": 200}),
            ("literal", {"eta": 0.5, "steps": 200, "evaluation": "literal"}),
        ):

            def run(variant=variant, settings=settings) -> float:
                import torch_ar

                net, x, y = _problem(make, dev)
                y = y % 5
                torch.manual_seed(3)
                ar = torch_ar.ARBackward(net, variant=variant.name, **settings)
                net.zero_grad()
                F.cross_entropy(ar(x), y).backward()
                got = {n: p.grad.clone() for n, p in net.named_parameters()}
                # The psi the backward used (brSF draws new magnitudes at each one).
                psis = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
                want = _variant_oracle(
                    net,
                    psis,
                    x,
                    y,
                    variant.uses_backward_weights,
                    variant.drop_activation_derivative,
                    variant.direct_feedback,
                )
                return _worst(got, want)

            r.check(f"variant {variant.name}: {evaluation} = oracle", run)


def _cuda_rng_checks(r: _Runner) -> None:
    """CUDA random numbers after a recorded relaxation and after a refused one."""
    dev = r.device

    def after(refuse: bool) -> float:
        import torch_ar

        net = nn.Sequential(
            nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
        ).to(dev)
        x = torch.randn(4, 8, device=dev)
        if refuse:
            torch.ops.torch_ar._refuse_next_cuda_graph_capture()
        ar = torch_ar.ARBackward(net, eta=0.5, steps=8, evaluation="literal", cuda_graph=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the refusal's own warning
            ar(x).sum().backward()
        if (ar.last_stats.graph_steps > 0) == refuse:
            return float("inf"), f"graph_steps={ar.last_stats.graph_steps}"
        a = torch.randn(1000, device=dev)
        b = F.dropout(torch.ones(1000, device=dev), 0.5)
        torch.cuda.synchronize(dev)
        return 0.0 if a.std().item() > 0.5 and 0 < (b == 0).sum().item() < 1000 else float("inf")

    r.check("CUDA RNG after a recorded relaxation", lambda: after(False), 0.0)
    r.check("CUDA RNG after a refused capture", lambda: after(True), 0.0)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    state = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def selftest(device: str | torch.device = "cpu", *, verbose: bool = False) -> SelftestReport:
    """Runs every check on ``device`` and returns the report (``report.ok``, ``report.table()``).

    Example::

        report = torch_ar.selftest("cpu")
        print(report.table())
    """
    import torch_ar  # noqa: F401  (loads the operators)

    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "selftest: device 'cuda' asked for, but torch.cuda.is_available() is False"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    report = SelftestReport(str(dev), versions(dev))
    runner = _Runner(dev)
    with _deterministic():
        _kernel_checks(runner)
        _engine_checks(runner, _graphs())
        _large_sum_checks(runner)
        _variant_checks(runner)
        if dev.type == "cuda":
            _cuda_rng_checks(runner)
    report.checks = runner.checks
    report.seconds = time.perf_counter() - start
    if verbose:
        print(report.table())
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_ar selftest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    report = selftest(args.device)
    print(report.table())
    for failure in report.failures:
        print(
            f"FAILED: {failure.name}: {failure.detail or f'error {failure.error}'}", file=sys.stderr
        )
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.table() + "\n")
    return 0 if report.ok else 1

"""Figures from training runs and relaxation traces (matplotlib, Agg backend).

A training run is a ``python -m torch_ar train --out`` folder: ``config.json``,
``metrics.jsonl`` (one record per epoch) and, for AR runs that measured it,
``cosine.jsonl`` (the cosine to autograd per parameter every few batches).
Runs with the same settings but different seeds share a label and are
averaged.

Example::

    from torch_ar.experiments import plots
    runs = plots.load_runs(["results/fmnist-mlp-backprop-s0", "results/fmnist-mlp-ar-eta1-s0"])
    plots.plot_accuracy_curves(runs, "accuracy.png")
    for row in plots.accuracy_table(runs): print(row["label"], row["test_acc_mean"])
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch_ar.experiments.compare import RelaxationTraces

# Above this many parameters a cosine plot shows only the weights, without a legend entry each.
MAX_LABELLED_LINES = 10


@dataclass
class Run:
    """One training run read back from its ``--out`` folder."""

    path: Path
    config: dict[str, Any]
    resolved: dict[str, Any]
    metrics: list[dict[str, Any]]
    cosines: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def epochs(self) -> list[dict[str, Any]]:
        """The completed epochs (a diverged run's last, partial record excluded)."""
        return [m for m in self.metrics if not m.get("diverged")]

    @property
    def diverged(self) -> dict[str, Any] | None:
        """The record of the partial epoch in which training diverged, if it did."""
        return self.metrics[-1] if self.metrics[-1].get("diverged") else None

    @property
    def final(self) -> dict[str, Any]:
        """The last completed epoch (the diverged record when none completed)."""
        return self.epochs[-1] if self.epochs else self.metrics[-1]

    @property
    def batches_per_epoch(self) -> int:
        first = self.metrics[0]
        return max(int(first.get("epoch_batches") or first.get("train_batches") or 1), 1)

    @property
    def train_seconds(self) -> float:
        return float(sum(m.get("time_s", 0.0) for m in self.metrics))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_label(config: dict[str, Any], resolved: dict[str, Any] | None = None) -> str:
    """A run's label without its seed: ``backprop``, ``AR eta 0.1, 100 steps``, ``AR combined eta 1``."""
    if config.get("method") != "ar":
        model = str(config.get("model") or "")
        if model.startswith("biotorch-"):  # a peer's own network, trained by its own layers
            return f"BioTorch {model.removeprefix('biotorch-')}"
        return str(config.get("method", "?"))
    ar = (resolved or {}).get("ar_config") or {}
    eta = config.get("eta") if config.get("eta") is not None else ar.get("eta", 1.0)
    steps = config.get("steps") if config.get("steps") is not None else ar.get("steps")
    variant = config.get("variant") or ar.get("variant") or "exact"
    label = "AR" if variant == "exact" else f"AR {variant}"
    label += f" eta {eta:g}"
    if steps is not None:
        label += f", {steps} steps"
    tol = config.get("tol")
    if tol is not None:
        label += f", tol {tol:g}"
    for option in ("init", "schedule"):
        if config.get(option) is not None:
            label += f", {option} {config[option]}"
    # The granularity the run had, whether asked for or the default of the
    # day (recorded in ar_config), named unless it is today's default: seeds
    # of one setting share one label.
    from torch_ar.config import RelaxConfig  # the library's default, one source

    granularity = config.get("granularity") or ar.get("granularity")
    if granularity is not None and granularity != RelaxConfig.granularity:
        label += f", granularity {granularity}"
    if config.get("backward_weight_init") is not None:
        label += f", psi {config['backward_weight_init']}"
    if config.get("backward_weight_std") is not None:
        label += f", psi std {config['backward_weight_std']:g}"
    if config.get("backward_weight_decay"):
        label += f", decay {config['backward_weight_decay']:g}"
    return label


def load_run(folder: str | Path) -> Run:
    """Read one ``train --out`` folder; ValueError when it holds no finished epoch."""
    path = Path(folder)
    metrics = _read_jsonl(path / "metrics.jsonl")
    if not metrics:
        raise ValueError(f"{path}: no metrics.jsonl with at least one epoch")
    config_file = path / "config.json"
    raw = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config = raw.get("config", {})
    resolved = raw.get("resolved", {})
    if not config:  # older or foreign folders: the metrics still name the method
        config = {"method": metrics[0].get("method", "?")}
    run = Run(path, config, resolved, metrics, _read_jsonl(path / "cosine.jsonl"))
    run.label = run_label(config, resolved)
    planned = config.get("epochs")
    if isinstance(planned, int) and run.diverged is None and len(metrics) < planned:
        # An interrupted run (not a diverged one, which ended for good) is
        # kept apart from the finished seeds of its method.
        run.label += f" (stopped after epoch {len(metrics)} of {planned})"
    return run


def load_runs(folders: Iterable[str | Path]) -> list[Run]:
    """Runs from folders that are runs, or that hold runs in sub-folders (any depth).

    Labels get a ``model/dataset:`` prefix when the runs span several of them.
    Raises ValueError naming a folder that holds no run.
    """
    runs: list[Run] = []
    for folder in folders:
        path = Path(folder)
        if not path.is_dir():
            raise ValueError(f"{path} is not a folder")
        if (path / "metrics.jsonl").is_file():
            runs.append(load_run(path))
            continue
        found = sorted(p.parent for p in path.rglob("metrics.jsonl"))
        found_runs = []
        for p in found:
            try:
                found_runs.append(load_run(p))
            except ValueError:
                continue  # an unfinished run among finished ones
        if not found_runs:
            raise ValueError(f"{path} holds no training run (no metrics.jsonl with an epoch)")
        runs.extend(found_runs)
    kinds = {(r.config.get("model"), r.config.get("dataset")) for r in runs}
    if len(kinds) > 1:
        for r in runs:
            r.label = f"{r.config.get('model')}/{r.config.get('dataset')}: {r.label}"
    return runs


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by label, in order of first appearance; each group sorted by seed."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.label, []).append(r)
    return {label: sorted(group, key=lambda r: r.seed) for label, group in groups.items()}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


# Epochs averaged in the table's "last epochs" column.
LAST_EPOCHS = 3


def accuracy_table(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per label: final train/test accuracy mean and std over seeds, epochs, time, cosines."""
    rows = []
    for label, group in group_runs(runs).items():
        finished = [r for r in group if r.diverged is None]
        nan = (math.nan, math.nan)
        test_mean, test_std = (
            _mean_std([r.final["test_acc"] for r in finished]) if finished else nan
        )
        train_mean, train_std = (
            _mean_std([r.final["train_acc"] for r in finished]) if finished else nan
        )
        # The last epochs' mean per run: steadier than the final epoch alone
        # where test accuracy swings from epoch to epoch (no LR schedule).
        last = [r for r in finished if len(r.epochs) >= LAST_EPOCHS]
        last_mean, last_std = (
            _mean_std(
                [statistics.fmean(m["test_acc"] for m in r.epochs[-LAST_EPOCHS:]) for r in last]
            )
            if last and len(last) == len(finished)
            else nan
        )
        timed = [r for r in group if r.epochs]
        row: dict[str, Any] = {
            "label": label,
            "runs": len(group),
            "finished": len(finished),
            "seeds": [r.seed for r in group],
            "epochs": sorted({len(r.epochs) for r in finished}),
            "train_batches": sorted({r.batches_per_epoch for r in group}),
            "test_acc_mean": test_mean,
            "test_acc_std": test_std,
            "last_test_acc_mean": last_mean,
            "last_test_acc_std": last_std,
            "train_acc_mean": train_mean,
            "train_acc_std": train_std,
            "time_s_mean": statistics.fmean(r.train_seconds for r in group),
            "epoch_s_mean": statistics.fmean(
                sum(m.get("time_s", 0.0) for m in r.epochs) / len(r.epochs) for r in timed
            )
            if timed
            else math.nan,
            "diverged": [
                {
                    "seed": r.seed,
                    "epoch": r.diverged["epoch"],
                    "batch": r.diverged.get("diverged_batch"),
                    "error": r.diverged.get("error"),
                    # test accuracy after the last epoch it completed
                    "last_test_acc": r.epochs[-1]["test_acc"] if r.epochs else None,
                }
                for r in group
                if r.diverged is not None
            ],
        }
        # Cosines from every measurement, diverged runs' included (cosine.jsonl, else per epoch).
        measured = [m for r in group for m in (r.cosines or r.epochs) if "cosine_mean" in m]
        if measured:
            row["cosine_mean"] = statistics.fmean(m["cosine_mean"] for m in measured)
            row["cosine_min"] = min(m["cosine_min"] for m in measured)
        rows.append(row)
    return rows


# ------------------------------------------------------------------ figures


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_accuracy_curves(runs: Sequence[Run], path: str | Path, title: str | None = None) -> Path:
    """Train and test accuracy against epoch per label: mean over seeds, band of +-1 std."""
    plt = _pyplot()
    groups = group_runs(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    # More labels than tab10 has colours: tab20, and a marker per ten labels,
    # so that no two lines look alike.
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    markers = ("o", "^", "D")
    for index, (label, group) in enumerate(groups.items()):
        finished = [r for r in group if r.diverged is None]
        shown = finished or group  # all diverged: their epochs before the divergence
        epochs = min(len(r.epochs) for r in shown)
        x = list(range(1, epochs + 1))
        # Backprop: grey, dashed, hollow squares, so that exact AR drawn on top of it stays visible.
        backprop = label.endswith("backprop")
        style = (
            {
                "linestyle": "--",
                "color": "0.35",
                "marker": "s",
                "markersize": 8,
                "markerfacecolor": "none",
                "zorder": 3,
            }
            if backprop
            else {
                "marker": markers[index // 10 % len(markers)] if finished else "x",
                "markersize": 4,
                "color": colors[index % len(colors)],
            }
        )
        note = f" (n={len(shown)})" if len(shown) > 1 else ""
        if len(finished) < len(group):
            note += f"; {len(group) - len(finished)}/{len(group)} diverged"
        for ax, key in zip(axes, ("train_acc", "test_acc"), strict=True):
            per_epoch = [[100 * r.epochs[e][key] for r in shown] for e in range(epochs)]
            stats = [_mean_std(v) for v in per_epoch]
            mean = [m for m, _ in stats]
            std = [s for _, s in stats]
            (line,) = ax.plot(x, mean, label=label + note, **style)
            if len(shown) > 1:
                lo = [m - s for m, s in zip(mean, std, strict=True)]
                hi = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    for ax, name in zip(axes, ("train", "test"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "AR vs backprop: accuracy (mean over seeds, band: +-1 std)")
    if len(groups) <= 6:
        axes[1].legend(fontsize=8, loc="lower right")
    else:  # below both panels, where it hides no line
        handles, labels = axes[1].get_legend_handles_labels()
        columns = 2 if len(groups) <= 16 else 3
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=columns)
        rows = math.ceil(len(groups) / columns)
        fig.set_size_inches(12, 4.5 + 0.22 * rows)
        fig.subplots_adjust(bottom=(0.22 * rows + 0.5) / (4.5 + 0.22 * rows), top=0.9)
    return _save(fig, path)


def _cosine_series(run: Run) -> tuple[list[float], dict[str, list[float]], str]:
    """x (epochs, fractional) and per-parameter cosines from cosine.jsonl, else per-epoch means."""
    batches = run.batches_per_epoch
    if run.cosines and "param_cosines" in run.cosines[0]:
        x = [m["epoch"] - 1 + m["batch"] / batches for m in run.cosines]
        names = list(run.cosines[0]["param_cosines"])
        series = {n: [m["param_cosines"].get(n, math.nan) for m in run.cosines] for n in names}
        return x, series, "per parameter"
    if run.cosines:
        x = [m["epoch"] - 1 + m["batch"] / batches for m in run.cosines]
        series = {k: [m[k] for m in run.cosines] for k in ("cosine_mean", "cosine_min")}
        return x, series, "mean / min over parameters"
    epochs = [m for m in run.epochs if "cosine_mean" in m]
    x = [float(m["epoch"]) for m in epochs]
    if epochs and "param_cosine_mean" in epochs[0]:
        names = list(epochs[0]["param_cosine_mean"])
        return x, {n: [m["param_cosine_mean"][n] for m in epochs] for n in names}, "per parameter"
    return x, {k: [m[k] for m in epochs] for k in ("cosine_mean", "cosine_min")}, "mean / min"


def _shown_parameters(names: Sequence[str]) -> list[str]:
    if len(names) <= MAX_LABELLED_LINES or not any(n.endswith("weight") for n in names):
        return list(names)
    return [n for n in names if n.endswith("weight")]


def plot_cosine_over_training(
    runs: Sequence[Run], path: str | Path, title: str | None = None
) -> Path | None:
    """Per AR label (its first seed): cosine of each parameter's AR gradient to autograd's
    against training progress. None when no run measured cosines."""
    measured = {
        label: group[0]
        for label, group in group_runs(runs).items()
        if group[0].cosines or any("cosine_mean" in m for m in group[0].metrics)
    }
    if not measured:
        return None
    plt = _pyplot()
    cols = min(3, len(measured))
    rows = math.ceil(len(measured) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (label, run) in zip(axes.flat, measured.items()):
        x, series, kind = _cosine_series(run)
        shown = _shown_parameters(list(series))
        cmap = plt.get_cmap("viridis")
        for i, name in enumerate(shown):
            color = cmap(i / max(len(shown) - 1, 1))
            ax.plot(
                x,
                series[name],
                color=color,
                linewidth=1.2,
                label=name if len(shown) <= MAX_LABELLED_LINES else None,
            )
        low = min(min(v) for v in series.values())
        ax.set_ylim(min(low - 0.05, 0.9), 1.02)
        state = f", diverged in epoch {run.diverged['epoch']}" if run.diverged else ""
        ax.set_title(f"{label} (seed {run.seed}{state})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"cosine to autograd, {kind}", fontsize=8)
        ax.grid(alpha=0.3)
        if len(shown) <= MAX_LABELLED_LINES:
            ax.legend(fontsize=6, loc="lower left", ncol=2)
        else:
            ax.text(
                0.02,
                0.03,
                f"{len(shown)} weights, colour = depth (viridis)",
                transform=ax.transAxes,
                fontsize=7,
            )
    for ax in list(axes.flat)[len(measured) :]:
        ax.set_visible(False)
    fig.suptitle(title or "cosine of AR gradients to autograd over training, per layer")
    fig.tight_layout()
    return _save(fig, path)


def _psi_angle_series(run: Run) -> tuple[list[float], dict[str, list[float]]]:
    """x (epochs, fractional) and the angle (degrees) between each layer's psi and W^T."""
    batches = run.batches_per_epoch
    measured = [m for m in run.cosines if m.get("psi_angles")]
    if measured:
        x = [m["epoch"] - 1 + m["batch"] / batches for m in measured]
        names = list(measured[0]["psi_angles"])
        return x, {n: [m["psi_angles"].get(n, math.nan) for m in measured] for n in names}
    epochs = [m for m in run.epochs if m.get("psi_angle")]
    names = list(epochs[0]["psi_angle"]) if epochs else []
    x = [float(m["epoch"]) for m in epochs]
    return x, {n: [m["psi_angle"].get(n, math.nan) for m in epochs] for n in names}


def psi_angle_table(runs: Sequence[Run]) -> str | None:
    """Markdown: per label with backward weights psi, the angle between psi and W^T per
    layer after the first and the last completed epoch (mean over seeds). None if none."""
    rows = []
    for label, group in group_runs(runs).items():
        with_angles = [r for r in group if any(m.get("psi_angle") for m in r.epochs)]
        if not with_angles:
            continue
        names = list(next(m for m in with_angles[0].epochs if m.get("psi_angle"))["psi_angle"])
        for which, pick in (("first", 0), ("last", -1)):
            cells = []
            for name in names:
                values = [r.epochs[pick]["psi_angle"][name] for r in with_angles]
                cells.append(f"{statistics.fmean(values):.1f}")
            epochs = sorted({r.epochs[pick]["epoch"] for r in with_angles})
            rows.append((label, f"{which} ({'/'.join(map(str, epochs))})", names, cells))
    if not rows:
        return None
    names = rows[0][2]
    lines = [
        "| run | after epoch | " + " | ".join(f"{n} (°)" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    lines += [f"| {label} | {when} | " + " | ".join(cells) + " |" for label, when, _, cells in rows]
    return "\n".join(lines)


def plot_psi_angles(runs: Sequence[Run], path: str | Path, title: str | None = None) -> Path | None:
    """Per label with backward weights (its first seed): the angle between each layer's psi
    and W^T over training (90 degrees: unrelated; 0: psi = c W^T). None if no run has psi."""
    measured = {}
    for label, group in group_runs(runs).items():
        x, series = _psi_angle_series(group[0])
        if series:
            measured[label] = (group[0], x, series)
    if not measured:
        return None
    plt = _pyplot()
    cols = min(3, len(measured))
    rows = math.ceil(len(measured) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (label, (run, x, series)) in zip(axes.flat, measured.items()):
        cmap = plt.get_cmap("viridis")
        for i, (name, values) in enumerate(series.items()):
            ax.plot(x, values, color=cmap(i / max(len(series) - 1, 1)), linewidth=1.2, label=name)
        state = f", diverged in epoch {run.diverged['epoch']}" if run.diverged else ""
        ax.set_title(f"{label} (seed {run.seed}{state})", fontsize=9)
        ax.set_ylim(0, 95)
        ax.set_xlabel("epoch")
        ax.set_ylabel("angle between psi and W^T (°)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left", ncol=2)
    for ax in list(axes.flat)[len(measured) :]:
        ax.set_visible(False)
    fig.suptitle(title or "angle between the backward weights psi and W^T over training")
    fig.tight_layout()
    return _save(fig, path)


def plot_final_accuracy(runs: Sequence[Run], path: str | Path, title: str | None = None) -> Path:
    """Bar chart: final test accuracy per label, mean +- std over seeds."""
    plt = _pyplot()
    table = accuracy_table(runs)
    labels = [row["label"] for row in table]
    finite = [row for row in table if row["finished"]]
    means = [100 * row["test_acc_mean"] if row["finished"] else 0.0 for row in table]
    stds = [100 * row["test_acc_std"] if row["finished"] else 0.0 for row in table]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 2), 4.8))
    colors = ["0.55" if label.endswith("backprop") else f"C{i}" for i, label in enumerate(labels)]
    bars = ax.bar(range(len(labels)), means, yerr=stds, capsize=4, color=colors)
    top = max((100 * r["test_acc_mean"] + 100 * r["test_acc_std"] for r in finite), default=100.0)
    bottom = min((100 * r["test_acc_mean"] - 100 * r["test_acc_std"] for r in finite), default=0.0)
    low = max(0.0, bottom - 10)
    for bar, mean, std, row in zip(bars, means, stds, table, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        if not row["finished"]:
            ax.text(
                x,
                low + 1,
                f"diverged\n({row['runs']}/{row['runs']} runs)",
                ha="center",
                va="bottom",
                fontsize=7,
                color="C3",
            )
            continue
        text = f"{mean:.2f}\n±{std:.2f} (n={row['finished']})"
        if row["diverged"]:
            text += f"\n{len(row['diverged'])} diverged"
        ax.text(x, mean + std + 0.3, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(
        [label.replace(" eta", "\neta") for label in labels], fontsize=7, rotation=20, ha="right"
    )
    ax.set_ylim(low, min(100.0, top + 6))
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    epochs = sorted({e for row in table for e in row["epochs"]})
    ax.set_title(
        title
        or f"final test accuracy after {'/'.join(map(str, epochs))} epoch(s), "
        "mean ± std over seeds",
        fontsize=10,
    )
    return _save(fig, path)


def plot_relaxation_cosine(
    traces: RelaxationTraces, path: str | Path, title: str | None = None
) -> Path:
    """The paper's figure 1: cosine to autograd against relaxation step.

    First panel: mean over parameters per eta (band: min to max). Then one panel
    per eta with one line per parameter (weights only for large models).
    """
    plt = _pyplot()
    panels = 1 + len(traces.etas)
    fig, axes = plt.subplots(1, panels, figsize=(4.3 * panels, 3.9), sharey=True, squeeze=False)
    axes = axes[0]
    steps = traces.recorded
    for i, eta in enumerate(traces.etas):
        per_step = list(zip(*(traces.cosine[eta][n] for n in traces.parameters), strict=True))
        mean = [sum(v) / len(v) for v in per_step]
        axes[0].plot(steps, mean, color=f"C{i}", label=f"eta {eta:g}")
        axes[0].fill_between(
            steps, [min(v) for v in per_step], [max(v) for v in per_step], color=f"C{i}", alpha=0.15
        )
    axes[0].set_title("mean over parameters (band: min-max)", fontsize=9)
    axes[0].legend(fontsize=8, loc="lower right")
    shown = _shown_parameters(traces.parameters)
    cmap = plt.get_cmap("viridis")
    for ax, eta in zip(axes[1:], traces.etas, strict=True):
        for j, name in enumerate(shown):
            ax.plot(
                steps,
                traces.cosine[eta][name],
                color=cmap(j / max(len(shown) - 1, 1)),
                linewidth=1.1,
                label=name if len(shown) <= MAX_LABELLED_LINES else None,
            )
        ax.set_title(f"eta {eta:g}: per parameter", fontsize=9)
        if len(shown) <= MAX_LABELLED_LINES:
            ax.legend(fontsize=6, loc="lower right", ncol=2)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("relaxation step")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("cosine to autograd gradient")
    s = traces.settings
    extra = ", ".join(f"{k} {v}" for k, v in s.items() if v is not None)
    fig.suptitle(
        title
        or f"AR gradient vs autograd during relaxation (D = {traces.depth}"
        + (f"; {extra}" if extra else "")
        + ")",
        fontsize=10,
    )
    fig.tight_layout()
    return _save(fig, path)


# A transformer's parameters by the part of the network they belong to, in
# the order the cosine-by-type table and figure show them; the first match wins.
LAYER_TYPES = (
    ("attention projections", ("attention.", "attn.", "self_attn.")),
    ("MLP", ("mlp.", "linear1.", "linear2.")),
    ("norms", ("norm",)),
    ("embedding", ("embed", "patch", "position", "cls_token", "class_token")),
    ("head", ("head.",)),
)


def layer_type(name: str) -> str:
    """The part of a transformer that parameter ``name`` belongs to (LAYER_TYPES), or "other"."""
    for kind, marks in LAYER_TYPES:
        if any(mark in name for mark in marks):
            return kind
    return "other"


def _cosines_by_type(run: Run) -> tuple[list[float], dict[str, list[float]]]:
    """x (epochs, fractional) and, per layer type, the mean cosine of its parameters."""
    batches = run.batches_per_epoch
    measured = [m for m in run.cosines if m.get("param_cosines")]
    x = [m["epoch"] - 1 + m["batch"] / batches for m in measured]
    series: dict[str, list[float]] = {}
    for m in measured:
        by_type: dict[str, list[float]] = {}
        for name, value in m["param_cosines"].items():
            by_type.setdefault(layer_type(name), []).append(value)
        for kind in [k for k, _ in LAYER_TYPES] + ["other"]:
            if kind in by_type:
                series.setdefault(kind, []).append(statistics.fmean(by_type[kind]))
    return x, series


def mean_cosine_by_type(run: Run) -> dict[str, float]:
    """Per layer type (LAYER_TYPES), the cosine to autograd of its parameters,
    mean over the type and over training; empty when no per-parameter cosines."""
    _, series = _cosines_by_type(run)
    return {kind: statistics.fmean(values) for kind, values in series.items()}


def cosine_by_type_table(runs: Sequence[Run]) -> str | None:
    """Markdown: per AR label (its first seed), the cosine to autograd of each layer
    type, mean over training (LAYER_TYPES); None when no run measured per-parameter cosines."""
    rows = {}
    for label, group in group_runs(runs).items():
        by_type = mean_cosine_by_type(group[0])
        if by_type:
            rows[label] = by_type
    if not rows:
        return None
    kinds = [
        k for k in [k for k, _ in LAYER_TYPES] + ["other"] if any(k in r for r in rows.values())
    ]
    lines = ["| run | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for label, row in rows.items():
        cells = [f"{row[k]:.3f}" if k in row else "—" for k in kinds]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_cosine_by_type(
    runs: Sequence[Run], path: str | Path, title: str | None = None
) -> Path | None:
    """One panel per layer type: each AR label's mean cosine to autograd over
    training. None when no run measured per-parameter cosines."""
    measured = {}
    for label, group in group_runs(runs).items():
        x, series = _cosines_by_type(group[0])
        if series:
            measured[label] = (x, series)
    if not measured:
        return None
    kinds = [
        k
        for k in [k for k, _ in LAYER_TYPES] + ["other"]
        if any(k in series for _, series in measured.values())
    ]
    plt = _pyplot()
    cols = min(3, len(kinds))
    rows = math.ceil(len(kinds) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, kind in zip(axes.flat, kinds):
        for label, (x, series) in measured.items():
            if kind in series:
                ax.plot(x, series[kind], linewidth=1.2, label=label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cosine to autograd, mean over the type's parameters", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    for ax in list(axes.flat)[len(kinds) :]:
        ax.set_visible(False)
    fig.suptitle(title or "cosine of AR gradients to autograd by layer type")
    fig.tight_layout()
    return _save(fig, path)


def write_training_figures(
    runs: Sequence[Run],
    out: str | Path,
    prefix: str = "",
    title: str | None = None,
    by_layer_type: bool = False,
) -> list[Path]:
    """accuracy.png, cosine_training.png (when measured), psi_angle_training.png (runs with
    backward weights), final_accuracy.png and, with ``by_layer_type`` (transformers),
    cosine_by_type.png in ``out``."""
    out = Path(out)
    suffix = f" — {title}" if title else ""
    # (figure, file name, title): the ones a run cannot make return None.
    figures = [
        (plot_accuracy_curves, "accuracy", f"accuracy, mean over seeds (band: ±1 std){suffix}"),
        (
            plot_cosine_over_training,
            "cosine_training",
            f"cosine of AR gradients to autograd over training{suffix}",
        ),
        (plot_psi_angles, "psi_angle_training", f"angle between psi and W^T over training{suffix}"),
    ]
    if by_layer_type:
        figures.append(
            (
                plot_cosine_by_type,
                "cosine_by_type",
                f"cosine of AR gradients to autograd by layer type{suffix}",
            )
        )
    final_title = f"final test accuracy, mean ± std over seeds{suffix}" if title else None
    figures.append((plot_final_accuracy, "final_accuracy", final_title))
    written = [plot(runs, out / f"{prefix}{name}.png", title=t) for plot, name, t in figures]
    return [path for path in written if path is not None]


def format_accuracy_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`accuracy_table` rows."""
    lines = [
        (
            "| run | seeds | epochs | train batches/epoch | final test acc (%) "
            f"| test acc, mean of the last {LAST_EPOCHS} epochs (%) "
            "| final train acc (%) | cosine to autograd mean (min) | train time / epoch (s) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cos = f"{r['cosine_mean']:.6f} ({r['cosine_min']:.4f})" if "cosine_mean" in r else "—"
        if r["finished"]:
            test = f"{100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f}"
            train = f"{100 * r['train_acc_mean']:.2f} ± {100 * r['train_acc_std']:.2f}"
        else:
            test = train = "—"
        last = (
            f"{100 * r['last_test_acc_mean']:.2f} ± {100 * r['last_test_acc_std']:.2f}"
            if math.isfinite(r["last_test_acc_mean"])
            else "—"
        )
        diverged = ", ".join(
            f"seed {d['seed']} at epoch {d['epoch']} batch {d['batch']}"
            + (
                f", {100 * d['last_test_acc']:.2f}% after epoch {d['epoch'] - 1}"
                if d.get("last_test_acc") is not None
                else ""
            )
            for d in r["diverged"]
        )
        if diverged:
            test += f" (diverged: {diverged})"
        seconds = f"{r['epoch_s_mean']:.1f}" if math.isfinite(r["epoch_s_mean"]) else "—"
        lines.append(
            f"| {r['label']} | {r['runs']} | {'/'.join(map(str, r['epochs'])) or '—'} "
            f"| {'/'.join(map(str, r['train_batches']))} "
            f"| {test} | {last} | {train} | {cos} | {seconds} |"
        )
    return "\n".join(lines)

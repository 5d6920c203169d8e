"""Reproduce the paper's experiments with ``python -m torch_ar train`` and summarise them.

Fashion-MNIST, the paper's setting as its code had it: MLP 784-300-300-100-10,
ReLU, N(0, 0.05) init, summed MSE, SGD lr 5e-4, batch 64, raw [0, 1] pixels
(``--normalize none``), eta 0.1 and 100 steps, 30 epochs, 3 seeds:

- backprop
- AR, sweep schedule (the original training loop relaxes top-down)
- AR, Jacobi schedule (the paper's parallel phase)
- each variant at the same relaxation settings (sweep): learned backward
  weights, feedback alignment, no nonlinear derivative, combined

CIFAR-10, the small CNN with augmentation (random crop and flip), cross-entropy,
SGD lr 0.05 momentum 0.9, batch 64, standardised inputs, full epochs:
backprop (3 seeds); AR eta 1 (exact); AR eta 0.1 with the step count that
``compare --recommend`` finds for the CNN (3 seeds) and with 100 steps; each
variant at eta 0.1 with that step count; learned backward weights with
Kolen-Pollack decay.

Compare figures (cosine to autograd against relaxation step): the paper MLP
on one Fashion-MNIST batch (literal steps, eta 0.1/0.5/1), and the CIFAR CNN
and ResNet-18 on one CIFAR-10 batch (closed form up to 1000 steps, eta
0.1/0.5, forward and zero initial states, with the recommended step counts).

Every run writes ``<results>/<name>/`` (the train ``--out`` folder, its log and
wall time); training runs save a checkpoint after every epoch and are resumed
from it (``train --resume``), so an interrupted invocation loses at most one
epoch; finished runs are skipped. At the end: ``<results>/summary.md`` (mean ±
std over seeds, machine, epochs, wall time) and ``<results>/figures/*.png``.

Usage::

    python benchmarks/run_experiments.py --measure          # one epoch per method: timing
    python benchmarks/run_experiments.py                    # everything, resumable
    python benchmarks/run_experiments.py --only fashion     # one part
    python benchmarks/run_experiments.py --summarize        # summary and figures only
    python benchmarks/run_experiments.py --dry-run          # list the runs
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model

from torch_ar.experiments import plots  # after the path set-up above

VARIANT_NAMES = (
    "learned_backward_weights",
    "feedback_alignment",
    "no_nonlinear_derivative",
    "combined",
)
# The paper's problem: data, preprocessing, model, loss and batch (shared by train and compare).
FASHION_PROBLEM = [
    "--dataset",
    "fashion-mnist",
    "--normalize",
    "none",
    "--model",
    "mlp",
    "--loss",
    "mse",
    "--batch-size",
    "64",
]
FASHION_COMMON = [
    *FASHION_PROBLEM,
    "--optimizer",
    "sgd",
    "--lr",
    "5e-4",
    "--cosine-every",
    "50",
]
PAPER_RELAXATION = ["--eta", "0.1", "--steps", "100"]
# Methods of the Fashion-MNIST table: (name, train arguments, relative cost for scheduling).
FASHION_METHODS = [
    ("backprop", ["--method", "backprop"], 1.0),
    ("ar-sweep", ["--method", "ar", *PAPER_RELAXATION, "--schedule", "sweep"], 2.0),
    ("ar-jacobi", ["--method", "ar", *PAPER_RELAXATION, "--schedule", "jacobi"], 2.0),
] + [
    (f"ar-{v}", ["--method", "ar", *PAPER_RELAXATION, "--schedule", "sweep", "--variant", v], 2.0)
    for v in VARIANT_NAMES
]
CIFAR_PROBLEM = [
    "--dataset",
    "cifar10",
    "--normalize",
    "standard",
    "--loss",
    "cross-entropy",
    "--batch-size",
    "64",
]
CIFAR_COMMON = [
    *CIFAR_PROBLEM,
    "--model",
    "cnn",
    "--augment",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--momentum",
    "0.9",
    "--cosine-every",
    "50",
]
# Kolen-Pollack decay of the CIFAR run with learned backward weights and decay.
KOLEN_POLLACK_DECAY = "5e-3"
# The CIFAR table's learning rate; --cifar-lower-lrs repeats some rows at smaller ones.
CIFAR_LR = 0.05
# Rows repeated at a lower learning rate: the variants that diverge
# at CIFAR_LR, with backprop and exact AR at the same rate as their references.
LOWER_LR_ROWS = (
    "backprop",
    "ar-eta0.1-steps{steps}",
    "ar-feedback_alignment",
    "ar-no_nonlinear_derivative",
    "ar-combined",
)
# At the lower rate only: the random-psi variants with psi drawn at each forward
# weight's own scale, as the paper draws psi like W (docs, Variants).
MATCHED_PSI_ROWS = ("ar-feedback_alignment", "ar-combined")
# Feedback alignment without normalisation at BioTorch's rate for it (its
# LeNet configurations train FA at lr 0.001 against backprop's 0.1), with
# backprop at the same rate as its reference: --cifar-fa-lr, seed 0.
FA_LR_ROWS = ("backprop", "ar-feedback_alignment-psi_matched")


# ResNet-20 on CIFAR-10 at the field's scale (He et al. 2016; BioTorch's table):
# BatchNorm, SGD momentum 0.9, lr 0.1 with a cosine schedule, weight decay
# 5e-4 on the forward weights, batch 128, standard augmentation.
RESNET_COMMON = [
    *CIFAR_PROBLEM[:-1],
    "128",
    "--model",
    "resnet20",
    "--augment",
    "--optimizer",
    "sgd",
    "--lr",
    "0.1",
    "--momentum",
    "0.9",
    "--weight-decay",
    "5e-4",
    "--lr-schedule",
    "cosine",
    "--cosine-every",
    "50",
]
SIGN_VARIANT_NAMES = ("sign_symmetry", "sign_symmetry_fixed_random", "sign_symmetry_batch_random")


def resnet_methods(steps: int) -> list[tuple[str, list[str], float, tuple[int, ...]]]:
    """(name, train arguments, relative cost, seeds) of the ResNet-20 table. The
    variants run at their converged fixed point (eta 1: the relaxation's exact
    limit for that variant)."""
    exact = ["--method", "ar", "--eta", "1"]
    return [
        ("backprop", ["--method", "backprop"], 1.0, (0, 1)),
        ("ar-eta1", exact, 1.2, (0,)),
        (
            f"ar-block-eta0.1-steps{steps}",
            ["--method", "ar", "--granularity", "block", "--eta", "0.1", "--steps", str(steps)],
            6.0,
            (0,),
        ),
        (
            "ar-eta1-feedback_alignment-psi_matched",
            [*exact, "--variant", "feedback_alignment", "--backward-weight-init", "matched"],
            1.3,
            (0,),
        ),
        (
            "ar-eta1-learned_backward_weights-psi_matched",
            [*exact, "--variant", "learned_backward_weights", "--backward-weight-init", "matched"],
            1.3,
            # Seed 1 too: within a point of brSF and frSF (82.48% against 83.02%, 83.12%).
            (0, 1),
        ),
        (
            "ar-eta1-learned_backward_weights-kp-psi_matched",
            [
                *exact,
                "--variant",
                "learned_backward_weights",
                "--backward-weight-init",
                "matched",
                "--backward-weight-decay",
                KOLEN_POLLACK_DECAY,
            ],
            1.3,
            # Seed 1 too: within a point of backprop (85.06% against 85.56%).
            (0, 1),
        ),
        (
            "ar-eta1-no_nonlinear_derivative",
            [*exact, "--variant", "no_nonlinear_derivative"],
            1.2,
            (0,),
        ),
        (
            "ar-eta1-combined-psi_matched",
            [*exact, "--variant", "combined", "--backward-weight-init", "matched"],
            1.3,
            (0,),
        ),
        # Seed 1 too for each: uSF is within a point of Kolen-Pollack (84.21%
        # against 85.06%), frSF and brSF of each other (83.12%, 83.02%).
        *[(f"ar-eta1-{v}", [*exact, "--variant", v], 1.3, (0, 1)) for v in SIGN_VARIANT_NAMES],
        # Direct feedback alignment with BioTorch's dfa initialisation (Xavier
        # uniform for psi's own fans) and its dfa learning rate, 0.001 (its
        # ResNet-20 config; at the table's 0.1 the loss grows without bound
        # within the first batches), the rest of the recipe the table's; beside
        # BioTorch's published DFA. The later --lr overrides the common one.
        (
            "ar-eta1-direct_feedback_alignment-psi_xavier-lr0.001",
            [
                *exact,
                "--variant",
                "direct_feedback_alignment",
                "--backward-weight-init",
                "xavier",
                "--lr",
                "0.001",
            ],
            1.3,
            (0,),
        ),
        # The peer row: BioTorch's own FA ResNet-20 (pip install --no-deps biotorch==0.0.16)
        # under plain backprop, on the same schedule, data order and augmentation.
        ("biotorch-fa", ["--method", "backprop", "--model", "biotorch-fa-resnet20"], 1.2, (0,)),
    ]


# The CIFAR-scale Vision Transformer (torch_ar/experiments/vit.py: patch 4,
# width 96, depth 6, 3 heads) with the small-data recipe: AdamW lr 1e-3,
# weight decay 0.05 on the forward weights, 2 warm-up epochs then cosine,
# label smoothing 0.1, crop and flip, batch 128.
VIT_COMMON = [
    *CIFAR_PROBLEM[:-1],
    "128",
    "--model",
    "vit",
    "--augment",
    "--optimizer",
    "adamw",
    "--lr",
    "1e-3",
    "--weight-decay",
    "0.05",
    "--lr-schedule",
    "cosine",
    "--warmup-epochs",
    "2",
    "--label-smoothing",
    "0.1",
    "--cosine-every",
    "50",
]


# compare --recommend on one training batch of 128 (seed 0), block granularity,
# eta 0.1: the fewest steps with every parameter at cosine >= 0.999 and length
# within 4.5% (benchmarks/gpu_job.py recommended_steps("vit", ...)).
VIT_STEPS = 499


def vit_methods(steps: int, epochs: int) -> list[tuple[str, list[str], float, int]]:
    """(name, train arguments, relative cost, epochs run) of the ViT table, seed
    0: every rule for `epochs`; AR at eta 1 (equal to backprop) and at eta 0.1
    (block granularity, `steps`) for the first 2 of the same `epochs`-epoch
    schedule, as evidence of the relaxation itself."""
    exact = ["--method", "ar", "--eta", "1"]
    return [
        ("backprop", ["--method", "backprop"], 1.0, epochs),
        ("ar-eta1", exact, 1.2, 2),
        (
            f"ar-block-eta0.1-steps{steps}",
            ["--method", "ar", "--granularity", "block", "--eta", "0.1", "--steps", str(steps)],
            14.0,  # D = 50, 49 input-VJP sweeps: 2376 s for its first epoch against 164-178 s
            2,
        ),
        ("ar-eta1-sign_symmetry", [*exact, "--variant", "sign_symmetry"], 1.3, epochs),
        (
            "ar-eta1-feedback_alignment-psi_matched",
            [*exact, "--variant", "feedback_alignment", "--backward-weight-init", "matched"],
            1.3,
            epochs,
        ),
        (
            "ar-eta1-learned_backward_weights-psi_matched",
            [*exact, "--variant", "learned_backward_weights", "--backward-weight-init", "matched"],
            1.3,
            epochs,
        ),
        (
            "ar-eta1-direct_feedback_alignment-psi_xavier",
            [*exact, "--variant", "direct_feedback_alignment", "--backward-weight-init", "xavier"],
            1.3,
            epochs,
        ),
        (
            "ar-eta1-no_nonlinear_derivative",
            [*exact, "--variant", "no_nonlinear_derivative"],
            1.2,
            epochs,
        ),
    ]


def cifar_common(lr: float) -> list[str]:
    """The CIFAR table's shared arguments at learning rate ``lr``."""
    common = list(CIFAR_COMMON)
    common[common.index("--lr") + 1] = f"{lr:g}"
    return common


def cifar_methods(steps: int) -> list[tuple[str, list[str], float, bool]]:
    """(name, train arguments, relative cost, run on every seed) of the CIFAR-10 table."""
    relaxed = ["--method", "ar", "--eta", "0.1", "--steps", str(steps)]
    return [
        ("backprop", ["--method", "backprop"], 1.0, True),
        ("ar-eta1", ["--method", "ar", "--eta", "1"], 1.3, False),
        (f"ar-eta0.1-steps{steps}", relaxed, 2.0, True),
        ("ar-eta0.1-steps100", ["--method", "ar", "--eta", "0.1", "--steps", "100"], 2.0, False),
        *[(f"ar-{v}", [*relaxed, "--variant", v], 2.0, False) for v in VARIANT_NAMES],
        (
            "ar-learned_backward_weights-kp",
            [
                *relaxed,
                "--variant",
                "learned_backward_weights",
                "--backward-weight-decay",
                KOLEN_POLLACK_DECAY,
            ],
            2.0,
            False,
        ),
    ]


@dataclass
class Job:
    """One ``python -m torch_ar`` invocation writing into ``results/<name>``."""

    name: str
    group: str
    command: list[str]
    epochs: int  # expected metrics.jsonl records (0: a compare job)
    cost: float = 1.0
    notes: dict[str, str] = field(default_factory=dict)

    def folder(self, results: Path) -> Path:
        return results / self.name

    def done(self, results: Path) -> bool:
        folder = self.folder(results)
        if self.epochs == 0:
            return (folder / "compare.json").is_file()
        metrics = folder / "metrics.jsonl"
        if not metrics.is_file():
            return False
        records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
        # A run that diverged is finished too: rerunning it would diverge again.
        return len(records) >= self.epochs or any(r.get("diverged") for r in records)


def seeds(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s.strip()]


# The granularity every committed AR row was made with where its method does
# not name one: the library's default until it became "block".
COMMITTED_GRANULARITY = "layer"


def name_granularity(command: list[str]) -> list[str]:
    """``command`` with ``--granularity`` named where it relaxes without one,
    so that each committed row reproduces from its command whatever the
    library's default."""
    method = command[command.index("--method") + 1] if "--method" in command else None
    relaxes = command[0] == "compare" or method == "ar"
    if not relaxes or "--granularity" in command:
        return command
    return [*command, "--granularity", COMMITTED_GRANULARITY]


def plan(args: argparse.Namespace) -> list[Job]:
    jobs = _plan(args)
    for job in jobs:
        job.command = name_granularity(job.command)
    return jobs


def _plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    if "fashion" in args.only:
        for name, method_args, cost in FASHION_METHODS:
            for seed in args.seeds:
                jobs.append(
                    Job(
                        f"fmnist-paper-{name}-s{seed}",
                        "fashion-mnist",
                        [
                            "train",
                            *FASHION_COMMON,
                            *method_args,
                            "--epochs",
                            str(args.epochs),
                            "--seed",
                            str(seed),
                        ],
                        args.epochs,
                        cost * args.epochs,
                    )
                )
    if "cifar" in args.only:
        methods = cifar_methods(args.cifar_steps)
        for name, method_args, cost, every_seed in methods:
            for seed in args.cifar_seeds if every_seed else args.cifar_seeds[:1]:
                jobs.append(_cifar_job(name, method_args, cost, seed, CIFAR_LR, args))
        lower_rows = {row.format(steps=args.cifar_steps) for row in LOWER_LR_ROWS}
        seeds = args.cifar_lower_lr_seeds
        for lr in args.cifar_lower_lrs:
            for name, method_args, cost, every_seed in methods:
                if name in lower_rows:
                    for seed in seeds if every_seed else seeds[:1]:
                        jobs.append(_cifar_job(name, method_args, cost, seed, lr, args))
            for name, method_args, cost, _ in methods:
                if name in MATCHED_PSI_ROWS:
                    matched = [*method_args, "--backward-weight-init", "matched"]
                    jobs.append(
                        _cifar_job(f"{name}-psi_matched", matched, cost, seeds[0], lr, args)
                    )
        for lr in args.cifar_fa_lr:
            for name, method_args, cost, _ in methods:
                if name == "backprop":
                    jobs.append(_cifar_job(name, method_args, cost, seeds[0], lr, args))
                elif f"{name}-psi_matched" in FA_LR_ROWS:
                    matched = [*method_args, "--backward-weight-init", "matched"]
                    jobs.append(
                        _cifar_job(f"{name}-psi_matched", matched, cost, seeds[0], lr, args)
                    )
    if "resnet20" in args.only:
        for name, method_args, cost, run_seeds in resnet_methods(args.resnet_steps):
            for seed in run_seeds:
                command = [
                    "train",
                    *RESNET_COMMON,
                    *method_args,
                    "--epochs",
                    str(args.resnet_epochs),
                    "--seed",
                    str(seed),
                ]
                jobs.append(
                    Job(
                        f"cifar10-resnet20-{name}-s{seed}",
                        "cifar10-resnet20",
                        command,
                        args.resnet_epochs,
                        cost * args.resnet_epochs * 60,
                    )
                )
    if "vit" in args.only:
        for name, method_args, cost, epochs in vit_methods(args.vit_steps, args.vit_epochs):
            # The whole run's schedule, stopped after `epochs` where that is fewer.
            stop = [] if epochs == args.vit_epochs else ["--stop-after-epochs", str(epochs)]
            command = ["train", *VIT_COMMON, *method_args, "--epochs", str(args.vit_epochs)]
            jobs.append(
                Job(
                    f"cifar10-vit-{name}-s0",
                    "cifar10-vit",
                    [*command, *stop, "--seed", "0"],
                    epochs,
                    # A backprop epoch: about 3 minutes on one thread beside a second run.
                    cost * epochs * 3 * 60,
                )
            )
    if "compare" in args.only:
        jobs.append(
            Job(
                "compare-fmnist-mlp",
                "compare",
                [
                    "compare",
                    *FASHION_PROBLEM,
                    "--etas",
                    "0.1,0.5,1",
                    "--steps",
                    "200",
                    "--seed",
                    "0",
                ],
                0,
                1.0,
            )
        )
        for model, batch in (("cnn", "64"), ("resnet18", "32")):
            for init in ("forward", "zero"):
                command = [
                    "compare",
                    *CIFAR_PROBLEM[:-1],
                    batch,
                    "--model",
                    model,
                    "--etas",
                    "0.1,0.5",
                    "--steps",
                    "1000",
                    "--at",
                    "log",
                    "--init",
                    init,
                    "--recommend",
                    "0.999",
                    "--seed",
                    "0",
                ]
                jobs.append(
                    Job(
                        f"compare-cifar10-{model}-{init}",
                        "compare",
                        command,
                        0,
                        5.0 if model == "cnn" else 30.0,
                    )
                )
        # The steps a trained ViT needs (block granularity, eta 0.1), on two ViT
        # rows' checkpoints: AR eta 0.1 after its 2 epochs, backprop after 10.
        for name, run in (
            ("ar-eta0.1-epoch2", f"cifar10-vit-ar-block-eta0.1-steps{args.vit_steps}-s0"),
            ("backprop-epoch10", "cifar10-vit-backprop-s0"),
        ):
            command = [
                "compare",
                *CIFAR_PROBLEM[:-1],
                "128",
                "--model",
                "vit",
                "--granularity",
                "block",
                "--etas",
                "0.1",
                "--steps",
                "2000",
                "--at",
                f"{args.vit_steps},1000,2000",
                "--recommend",
                "0.999",
                "--checkpoint",
                run,
                "--seed",
                "0",
            ]
            jobs.append(Job(f"compare-cifar10-vit-block-{name}", "compare", command, 0, 20.0))
    return jobs


def _cifar_job(
    name: str, method_args: list[str], cost: float, seed: int, lr: float, args: argparse.Namespace
) -> Job:
    group = "cifar10-cnn" if lr == CIFAR_LR else f"cifar10-cnn-lr{lr:g}"
    command = [
        "train",
        *cifar_common(lr),
        *method_args,
        "--epochs",
        str(args.cifar_epochs),
        "--seed",
        str(seed),
    ]
    return Job(
        f"{group}-{name}-s{seed}", group, command, args.cifar_epochs, cost * args.cifar_epochs * 10
    )


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    return env


_print_lock = threading.Lock()


def log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    with _print_lock:
        print(f"[{stamp}] {message}", flush=True)


# A training run's exit status when it stopped with a checkpoint (torch_ar's CLI).
STOPPED_EXIT_CODE = 3


def run_job(
    job: Job, results: Path, threads: int, device: str, deadline: float | None = None
) -> dict | None:
    """Runs ``job``; with a ``deadline`` (time.monotonic()), a training run
    gets the minutes left as its --time-limit and none starts after it."""
    folder = job.folder(results)
    training = job.command[0] == "train"
    left = None if deadline is None else deadline - time.monotonic()
    if left is not None and (left <= 0 or not training):
        log(f"not started (time limit reached or not resumable): {job.name}")
        return None
    if folder.exists() and not training:
        shutil.rmtree(folder)  # an unfinished comparison: start it again
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "torch_ar",
        *job.command,
        "--device",
        device,
        "--out",
        job.name,  # relative to the results folder, so no machine path lands in the outputs
    ]
    if training:
        # Continues from the checkpoint of the last finished epoch, if any.
        command += ["--no-progress", "--resume"]
    if left is not None:
        command += ["--time-limit", f"{left / 60:.3f}"]
    log(f"start {job.name}")
    start = time.perf_counter()
    with open(folder / "run.log", "a" if training else "w") as out:
        status = subprocess.run(
            command,
            cwd=results,
            env=child_env(threads),
            stdout=out,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    wall = time.perf_counter() - start
    previous = folder / "wall.json"
    if training and previous.is_file():  # a resumed run: add the earlier invocations' time
        wall += json.loads(previous.read_text()).get("wall_s", 0.0)
    record = {
        "name": job.name,
        "command": [
            "python",
            "-m",
            "torch_ar",
            *job.command,
            "--device",
            device,
            "--out",
            job.name,
        ],
        "cwd": "the results folder",
        "threads": threads,
        "wall_s": round(wall, 1),
        "returncode": status,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (folder / "wall.json").write_text(json.dumps(record, indent=1) + "\n")
    outcome = {0: "done", STOPPED_EXIT_CODE: "stopped (resumable)"}.get(
        status, f"FAILED (exit {status})"
    )
    log(f"{outcome} {job.name} in {wall:.0f}s")
    return record


def run_all(jobs: list[Job], args: argparse.Namespace) -> list[dict]:
    todo = [j for j in jobs if not j.done(args.results)]
    skipped = len(jobs) - len(todo)
    log(
        f"{len(jobs)} runs, {skipped} already complete, {len(todo)} to run with "
        f"{args.jobs} parallel job(s) of {args.threads} thread(s)"
    )
    todo.sort(key=lambda j: -j.cost)  # longest first keeps the parallel jobs balanced
    deadline = None if args.time_limit is None else time.monotonic() + 60.0 * args.time_limit
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = pool.map(
            lambda j: run_job(j, args.results, args.threads, args.device, deadline), todo
        )
        return [r for r in records if r is not None]


# ----------------------------------------------------------------- summary


def machine() -> dict[str, str]:
    cpu = cpu_model()
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _walls(results: Path, jobs: list[Job]) -> dict[str, dict]:
    out = {}
    for job in jobs:
        f = job.folder(results) / "wall.json"
        if f.is_file():
            out[job.name] = json.loads(f.read_text())
    return out


INPUTS = {"none": "[0, 1] inputs", "standard": "standardised inputs"}


def _stability_text(rows: list[dict]) -> str:
    """Why feedback alignment diverges: benchmarks/fa_stability.py's measurement."""
    lines = [
        (
            "Divergence, measured by `benchmarks/fa_stability.py` (`results/fa_stability.json`): "
            "with the summed MSE loss the output layer's SGD step is stable only while lr x the "
            "largest eigenvalue of 2 [H 1]^T [H 1] (H: the last hidden layer on a training batch) "
            "stays below 2. Largest value over the training batches, at initialisation and at "
            "the last checkpoint (end of the last completed epoch):"
        ),
        "",
        "| run | at init | at epoch | there | output weight norm | diverged in epoch |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        there = r["at_checkpoint"]
        at = (
            f"{r['checkpoint_epoch']} | {there['lr_times_lambda_max']:.3f} "
            f"| {there['output_weight_norm']:.2f}"
            if there
            else "— | — | —"
        )
        lines.append(
            f"| {r['run']} ({INPUTS[r['normalize']]}) | {r['at_init']['lr_times_lambda_max']:.3f} "
            f"| {at} | {r['diverged_epoch'] or '—'} |"
        )
    return "\n".join(lines)


def _cifar_stability_text(rows: list[dict]) -> str:
    """Why variants diverge on the CIFAR CNN: benchmarks/cifar_stability.py's measurement."""
    from cifar_stability import table  # beside this script

    return "\n".join(
        [
            (
                "Divergence, measured by `benchmarks/cifar_stability.py` "
                "(`results/cifar_stability.json`): the first 400 batches of epoch 1 at this "
                "table's settings and at lr 0.01, with autograd's gradient taken at the same weights "
                "on every batch. Psi `normal` is N(0, 0.05) (the "
                "paper's, the default), `matched` draws each psi at its own weight's standard "
                "deviation. The output layer's curvature is lr x the largest eigenvalue of the "
                "cross-entropy's Hessian in its weights, largest over the measured batches (every "
                "10th); heavy-ball SGD is stable on a quadratic while it stays below 2 (1 + "
                "momentum) = 3.8."
            ),
            "",
            table(rows),
        ]
    )


def _compare_table(folder: Path) -> str:
    data = json.loads((folder / "compare.json").read_text())
    etas = list(data["by_step"])
    lines = [
        "| step | " + " | ".join(f"eta {e}: min / mean cosine" for e in etas) + " |",
        "|---|" + "---|" * len(etas),
    ]
    for step in data["by_step"][etas[0]]:
        cells = [
            f"{data['by_step'][e][step]['cosine_min']:.4f} / "
            f"{data['by_step'][e][step]['cosine_mean']:.4f}"
            for e in etas
        ]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    last = str(data["steps"])
    angles = ", ".join(f"eta {e}: {data['by_step'][e][last]['angle_max']:.2g}°" for e in etas)
    lines.append("")
    lines.append(
        f"Largest angle to autograd after {last} steps: {angles}. Depth D = "
        f"{data['depth']} relaxing layers (exact after D steps at eta 1)."
    )
    recommended = data.get("recommended_steps") or {}
    if recommended:
        threshold = data.get("recommend_threshold")
        found = ", ".join(
            f"eta {e}: {t if t is not None else f'more than {last}'}"
            for e, t in recommended.items()
        )
        tolerance = data.get("recommend_length_tolerance")
        criterion = (
            f"cosine >= {threshold:g} and length within {100 * tolerance:.1f}% of autograd's"
            if tolerance is not None
            else f"cosine >= {threshold:g} (an earlier run: cosine only, no length check)"
        )
        lines.append(
            f"Smallest step count with every parameter's {criterion} (`--recommend`): {found}."
        )
    return "\n".join(lines)


def summarize(jobs: list[Job], args: argparse.Namespace) -> Path:
    results: Path = args.results
    figures = results / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    walls = _walls(results, jobs)
    info = machine()
    lines = [
        (
            "# Activation Relaxation: the paper on Fashion-MNIST, CIFAR-10 on the CPU, "
            "gradient quality against relaxation steps"
        ),
        "",
        (
            "Written by `python benchmarks/run_experiments.py` "
            f"({datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}); every run is a "
            "`python -m torch_ar train` whose command, log (`run.log`), per-epoch metrics "
            "(`metrics.jsonl`) and cosine measurements (`cosine.jsonl`) are in `results/<run>/`."
        ),
        "",
        "## Machine",
        "",
        (
            f"- CPU: {info['cpu']}, {info['cores']} cores, no GPU (`--device {args.device}`); "
            f"each run used {args.threads} torch thread(s), {args.jobs} runs at a time, on a "
            "machine shared with other work (times are indicative, not a clean benchmark)"
        ),
        f"- torch {info['torch']}, Python {info['python']}",
    ]
    total = sum(w["wall_s"] for w in walls.values())
    lines.append(
        f"- wall time of all runs added up: {total / 60:.1f} min "
        f"(process time; about {total / 60 / max(args.jobs, 1):.0f} min of elapsed time "
        f"at {args.jobs} in parallel)"
    )
    notes_file = results / "notes.json"
    if args.notes:
        notes_file.write_text(json.dumps(args.notes, indent=1) + "\n")
    elif notes_file.is_file():
        args.notes = json.loads(notes_file.read_text())
    if args.notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {note}" for note in args.notes]

    timing = results / "timing.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        lines += [
            "",
            "## Cost of one Fashion-MNIST epoch per method (measured first)",
            "",
            f"{t['description']}",
            "",
            "| method | train time for 1 epoch (s) | process wall incl. start-up and test (s) |",
            "|---|---|---|",
        ]
        for row in t["rows"]:
            d = row.get("diverged")
            note = f" (diverged at batch {d['diverged_batch']}: time until then)" if d else ""
            lines.append(f"| {row['label']}{note} | {row['train_s']:.1f} | {row['wall_s']:.1f} |")

    groups: dict[str, list[Job]] = {}
    for job in jobs:
        groups.setdefault(job.group, []).append(job)
    headings = {
        "fashion-mnist": "## Fashion-MNIST, paper MLP 784-300-300-100-10 (the paper's setting)",
        "cifar10-cnn": "## CIFAR-10, small CNN with augmentation, trained on the CPU",
    }
    for lr in args.cifar_lower_lrs:
        headings[f"cifar10-cnn-lr{lr:g}"] = (
            f"## CIFAR-10, small CNN at lr {lr:g}: the variants that diverge at lr "
            f"{CIFAR_LR:g}, with backprop and AR at the same rate"
        )
    for lr in args.cifar_fa_lr:
        headings[f"cifar10-cnn-lr{lr:g}"] = (
            f"## CIFAR-10, small CNN at lr {lr:g}: feedback alignment at BioTorch's rate for "
            "it without normalisation, with backprop at the same rate"
        )
    headings["cifar10-vit"] = (
        f"## CIFAR-10, a Vision Transformer (beyond CNNs), {args.vit_epochs} epochs"
    )
    headings["cifar10-resnet20"] = (
        f"## CIFAR-10, ResNet-20 with BatchNorm (the field's setting), {args.resnet_epochs} epochs"
    )
    for group, group_jobs in groups.items():
        if group == "compare":
            continue
        runs = []
        for job in group_jobs:
            try:
                runs.append(plots.load_run(job.folder(results)))
            except (ValueError, FileNotFoundError):
                continue
        lines += ["", headings.get(group, f"## {group}"), ""]
        if not runs:
            lines.append("(no finished runs yet)")
            continue
        missing = [j.name for j in group_jobs if not j.done(results)]
        cmd = group_jobs[0].command
        lines.append(
            f"Settings: `python -m torch_ar {' '.join(cmd)}` (per method: `--method`, "
            "`--eta`, `--steps`, `--variant`; per seed: `--seed`)."
        )
        if group == "fashion-mnist":
            lines.append(
                "Raw [0, 1] pixels (`--normalize none`, as the original code), N(0, 0.05) "
                "weights and zero biases, summed MSE on one-hot targets, plain SGD lr 5e-4, "
                "batches of 64 reshuffled every epoch (the same order for every method of a "
                "seed), full 60,000/10,000 split. Every AR row relaxes with the paper's "
                "settings: eta 0.1, 100 steps from the forward values, the `sweep` schedule "
                "(top-down, as the original training loop) unless the row says `jacobi`, "
                "evaluated in closed form (the literal steps' values; docs, How it works). "
                "The cosine column compares each AR gradient with autograd's every 50 "
                "batches (for a variant: how far its relaxed gradient is from backprop's)."
            )
        elif group == "cifar10-resnet20":
            lines.append(
                "The CIFAR ResNet-20 of He et al. (2016), option-A shortcuts, BatchNorm "
                "(269,722 parameters); CIFAR-10 standardised per channel, random crop "
                "(padding 4) and horizontal flip, cross-entropy, SGD lr 0.1 momentum 0.9 "
                "with a cosine schedule, weight decay 5e-4 on the forward weights, batches "
                "of 128 (the same order and augmentation for every method of a seed), full "
                "50,000/10,000 split, on the CPU with one thread per run. The variants "
                "relax at eta 1, their relaxation's exact fixed point. BioTorch's published "
                "table on this network is after 250 epochs, not these."
            )
        elif group == "cifar10-vit":
            lines.append(
                "The CIFAR-scale Vision Transformer of torch_ar/experiments/vit.py (patch 4, "
                "class token, width 96, depth 6, 3 heads, MLP 192; 0.46M parameters); "
                "CIFAR-10 standardised per channel, random crop (padding 4) and horizontal "
                "flip, cross-entropy with label smoothing 0.1, AdamW lr 1e-3, weight decay "
                "0.05 on the forward weights, 2 warm-up epochs then cosine, batches of 128 "
                "(the same order and augmentation for every method), full 50,000/10,000 "
                "split, on the CPU with one thread per run, seed 0. The rules relax at eta "
                "1, their exact fixed point; AR at eta 1 and 0.1 run 2 epochs."
            )
        else:
            lr = cmd[cmd.index("--lr") + 1]
            lines.append(
                "CIFAR-10 standardised per channel (`--normalize standard`), random crop "
                f"(padding 4) and horizontal flip, cross-entropy, SGD lr {lr} momentum 0.9, "
                "batches of 64 (the same order and augmentation for every method of a "
                "seed), full 50,000/10,000 split, on the CPU with one thread per run. The "
                "variants relax at the eta and steps of the AR eta 0.1 row."
            )

        # A row that sets its own learning rate (its last --lr wins) says so.
        def last_lr(command: list[str]) -> str | None:
            rates = [command[i + 1] for i, a in enumerate(command[:-1]) if a == "--lr"]
            return rates[-1] if rates else None

        own_rates = [
            f"{j.name} at lr {last_lr(j.command)}"
            for j in group_jobs
            if last_lr(j.command) != last_lr(cmd)
        ]
        if own_rates:
            lines.append(
                f"Rows at a learning rate of their own (the rest at {last_lr(cmd)}): "
                + ", ".join(own_rates)
                + "."
            )
        if missing:
            lines.append(f"Not finished yet: {', '.join(missing)}.")
        lines += ["", plots.format_accuracy_table(plots.accuracy_table(runs))]
        angles = plots.psi_angle_table(runs)
        if angles:
            lines += [
                "",
                (
                    "Angle between the backward weights psi and W^T (90°: unrelated, 0°: aligned), "
                    "per layer, mean over seeds:"
                ),
                "",
                angles,
            ]
        cifar_stability = results / "cifar_stability.json"
        if group == "cifar10-cnn" and cifar_stability.is_file():
            lines += ["", _cifar_stability_text(json.loads(cifar_stability.read_text()))]
        stability = results / "fa_stability.json"
        if group == "fashion-mnist" and stability.is_file():
            lines += ["", _stability_text(json.loads(stability.read_text()))]
        if group == "fashion-mnist":
            lines += [
                "",
                (
                    "Test accuracy (%) per epoch, mean over the seeds that completed the epoch "
                    "(a diverged run counts until its last completed epoch):"
                ),
                "",
            ]
            table = plots.group_runs(runs)
            epochs = max(len(r.epochs) for g in table.values() for r in g)
            lines.append("| run | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " |")
            lines.append("|---|" + "---|" * epochs)
            for label, group_runs in table.items():
                cells = []
                for e in range(epochs):
                    vals = [r.epochs[e]["test_acc"] for r in group_runs if len(r.epochs) > e]
                    cells.append(f"{100 * sum(vals) / len(vals):.2f}" if vals else "—")
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        prefix = {"fashion-mnist": "fashion_mnist_"}.get(group, group.replace("-", "_") + "_")
        title = {
            "fashion-mnist": "Fashion-MNIST, paper MLP",
            "cifar10-resnet20": "CIFAR-10 ResNet-20 with BatchNorm",
            "cifar10-vit": "CIFAR-10 Vision Transformer",
        }.get(
            group, "CIFAR-10 small CNN" + group.removeprefix("cifar10-cnn").replace("-lr", ", lr ")
        )
        if group == "cifar10-vit":
            by_type = plots.cosine_by_type_table(runs)
            if by_type:
                lines += [
                    "",
                    "Cosine to autograd by layer type, mean over the type's parameters and "
                    "over training (seed 0):",
                    "",
                    by_type,
                ]
        written = plots.write_training_figures(
            runs, figures, prefix=prefix, title=title, by_layer_type=group == "cifar10-vit"
        )
        lines += ["", "Figures: " + ", ".join(f"[{p.name}](figures/{p.name})" for p in written)]
        per_run = [
            f"{j.name} {walls[j.name]['wall_s']:.0f}s" for j in group_jobs if j.name in walls
        ]
        if per_run:
            lines += ["", "Process wall time per run: " + ", ".join(per_run) + "."]

    compare_jobs = [j for j in jobs if j.group == "compare" and j.done(results)]
    if compare_jobs:
        lines += ["", "## Cosine to autograd against relaxation step (paper figure 1)"]
    for job in compare_jobs:
        folder = job.folder(results)
        figure = f"{job.name}.png"
        shutil.copyfile(folder / "compare.png", figures / figure)
        cmd = job.command
        model = cmd[cmd.index("--model") + 1]
        init = cmd[cmd.index("--init") + 1] if "--init" in cmd else "forward"
        what = {
            "mlp": "paper MLP, one Fashion-MNIST batch of 64 ([0, 1] inputs)",
            "cnn": "small CIFAR-10 CNN (3 conv-ReLU-maxpool stages, 1 linear layer), one standardised batch",
            "resnet18": "ResNet-18 for CIFAR-10 (train-mode BatchNorm), one standardised batch",
            "vit": "CIFAR-10 ViT at block granularity, one standardised batch of 128",
        }.get(model, model)
        heading, weights = f"{init} initial states", "at initialisation"
        if "--checkpoint" in cmd:
            settings = json.loads((folder / "compare.json").read_text())["settings"]
            heading += ", trained weights"
            weights = (
                f"on the weights of `{cmd[cmd.index('--checkpoint') + 1]}` after epoch "
                f"{settings['checkpoint_epoch']}"
            )
        lines += [
            "",
            f"### {what}: {heading}",
            "",
            (
                f"`python -m torch_ar {' '.join(cmd)}`: {weights}, Jacobi schedule, "
                f"closed-form evaluation at each step shown. Per-step values for every "
                f"parameter: `results/{job.name}/compare.csv`."
            ),
            "",
            _compare_table(folder),
            "",
            f"Figure: [{figure}](figures/{figure})",
        ]
    summary = results / "summary.md"
    summary.write_text("\n".join(lines) + "\n")
    log(f"wrote {summary.name} and {figures.name}/ in the results folder")
    return summary


# ------------------------------------------------------------------ timing


def measure(args: argparse.Namespace) -> None:
    """One full Fashion-MNIST epoch per method (seed 0), run as the real runs are."""
    timing_args = argparse.Namespace(
        **{**vars(args), "epochs": 1, "seeds": [0], "variant_seeds": [0], "only": ["fashion"]}
    )
    jobs = plan(timing_args)
    for job in jobs:
        job.name = job.name.replace("fmnist-", "timing/fmnist-")
    run_all(jobs, timing_args)
    rows = []
    for job in jobs:
        run = plots.load_run(job.folder(args.results))
        wall = json.loads((job.folder(args.results) / "wall.json").read_text())["wall_s"]
        rows.append(
            {
                "name": job.name,
                "label": run.label,
                "train_s": run.train_seconds,
                "wall_s": wall,
                "diverged": run.diverged,
            }
        )
    description = (
        f"One epoch (938 batches of 64) per method, seed 0, {args.threads} thread(s) "
        f"per run, {args.jobs} runs at a time on a shared machine; train time "
        "includes the test pass and the cosine measurements (every 50 batches)."
    )
    (args.results / "timing.json").write_text(
        json.dumps({"description": description, "rows": rows, "machine": machine()}, indent=1)
        + "\n"
    )
    full = plan(args)
    # A run costs its start-up (imports, data) once and its train time once per epoch.
    cost = {
        r["label"]: (r["train_s"], r["wall_s"] - r["train_s"]) for r in rows if not r["diverged"]
    }
    estimate = 0.0
    for job in full:
        if job.group == "fashion-mnist":
            label = plots.run_label(_config_of(job.command))
            train_s, startup_s = cost.get(label, cost.get("AR eta 1", max(cost.values())))
            estimate += train_s * job.epochs + startup_s
    print("\nmeasured (one epoch, process wall seconds):")
    for r in rows:
        d = f"  (diverged at batch {r['diverged']['diverged_batch']})" if r["diverged"] else ""
        print(f"  {r['label']:<45} train {r['train_s']:7.1f}s   process {r['wall_s']:7.1f}s{d}")
    print(
        f"\nFashion-MNIST plan: {len([j for j in full if j.group == 'fashion-mnist'])} runs x "
        f"{args.epochs} epochs = about {estimate / 60:.1f} process-minutes, "
        f"{estimate / 60 / args.jobs:.1f} min elapsed at {args.jobs} in parallel"
    )


def _config_of(command: list[str]) -> dict:
    config: dict = {"method": "backprop"}
    for flag, key, kind in (
        ("--method", "method", str),
        ("--eta", "eta", float),
        ("--steps", "steps", int),
        ("--variant", "variant", str),
        ("--schedule", "schedule", str),
        ("--backward-weight-init", "backward_weight_init", str),
        ("--backward-weight-decay", "backward_weight_decay", float),
    ):
        if flag in command:
            config[key] = kind(command[command.index(flag) + 1])
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        type=Path,
        default=ROOT / "results",
        help="output folder (default: results/ in the repository)",
    )
    parser.add_argument(
        "--epochs", type=int, default=30, help="Fashion-MNIST epochs (default: 30, the paper's)"
    )
    parser.add_argument(
        "--seeds", type=seeds, default=[0, 1, 2], help="Fashion-MNIST seeds (default: 0,1,2)"
    )
    parser.add_argument(
        "--cifar-epochs", type=int, default=10, help="CIFAR-10 epochs (default: 10)"
    )
    parser.add_argument(
        "--cifar-seeds",
        type=seeds,
        default=[0, 1, 2],
        help="CIFAR-10 seeds of backprop and AR eta 0.1 (the other rows: the first) "
        "(default: 0,1,2)",
    )
    parser.add_argument(
        "--cifar-steps",
        type=int,
        default=252,
        help="relaxation steps of the CIFAR-10 AR eta 0.1 rows: what `compare --recommend` "
        "finds for the CNN (default: 252)",
    )
    parser.add_argument(
        "--cifar-lower-lrs",
        type=lambda t: [float(v) for v in t.split(",") if v.strip()],
        default=[0.01],
        help=f"learning rates at which the CIFAR-10 variants that diverge at {CIFAR_LR:g} run "
        "again, with backprop and AR eta 0.1 as references and with psi drawn at each "
        "weight's scale (default: 0.01)",
    )
    parser.add_argument(
        "--cifar-fa-lr",
        type=lambda t: [float(v) for v in t.split(",") if v.strip()],
        default=[0.001],
        help="learning rates of one more feedback-alignment row (psi at each weight's scale) "
        "with backprop beside it, seed 0 (default: 0.001, BioTorch's rate for FA without "
        "normalisation)",
    )
    parser.add_argument(
        "--cifar-lower-lr-seeds",
        type=seeds,
        default=[0, 1],
        help="seeds of backprop and AR eta 0.1 at the lower learning rates (the variants: "
        "the first) (default: 0,1)",
    )
    parser.add_argument(
        "--resnet-epochs", type=int, default=20, help="ResNet-20 epochs (default: 20)"
    )
    parser.add_argument(
        "--resnet-steps",
        type=int,
        default=392,
        help="relaxation steps of the ResNet-20 AR eta 0.1 row (block granularity): what "
        "benchmarks/granularity.py's recommendation finds (default: 392)",
    )
    parser.add_argument(
        "--vit-epochs", type=int, default=10, help="ViT epochs of every rule (default: 10)"
    )
    parser.add_argument(
        "--vit-steps",
        type=int,
        default=VIT_STEPS,
        help="relaxation steps of the ViT AR eta 0.1 row (block granularity): compare "
        f"--recommend's count on one training batch of 128 (default: {VIT_STEPS})",
    )
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=["fashion", "cifar", "compare"],
        help="comma-separated parts: fashion, cifar, resnet20, vit, compare (default: "
        "fashion, cifar, compare)",
    )
    parser.add_argument(
        "--names",
        type=lambda s: [n for n in s.split(",") if n],
        default=None,
        help="comma-separated shell patterns: only the runs whose names match "
        "(e.g. 'cifar10-resnet20-backprop-*')",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2)")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop every training run at the next batch after this many minutes (each leaves a "
        "checkpoint that the next invocation resumes) and start none after them",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--note",
        dest="notes",
        action="append",
        default=[],
        help="a line for the notes of summary.md (why the plan was cut, findings); repeatable; "
        "kept in notes.json for later --summarize runs (given again, they replace it)",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="time one Fashion-MNIST epoch per method, print the plan's cost",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only write summary.md and the figures from finished runs",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    args = parser.parse_args(argv)
    args.results = args.results.resolve()
    args.results.mkdir(parents=True, exist_ok=True)
    jobs = plan(args)
    if args.names:
        jobs = [j for j in jobs if any(fnmatch.fnmatch(j.name, n) for n in args.names)]
    if args.dry_run:
        for job in jobs:
            state = "done" if job.done(args.results) else "todo"
            print(f"{state}  {job.name:<50} python -m torch_ar {' '.join(job.command)}")
        return 0
    if args.measure:
        measure(args)
        return 0
    start = time.perf_counter()
    if not args.summarize:
        records = run_all(jobs, args)
        failed = [r["name"] for r in records if r["returncode"] not in (0, STOPPED_EXIT_CODE)]
        if failed:
            log(f"failed runs (see their run.log): {', '.join(failed)}")
    summarize(jobs, args)
    log(f"finished in {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

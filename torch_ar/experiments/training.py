"""Training loop comparing backprop with Activation Relaxation on image classification.

Example::

    from torch_ar.experiments.training import TrainConfig, train
    history = train(TrainConfig(dataset="fashion-mnist", model="mlp", method="ar",
                                epochs=1, limit_train_batches=300))
    print(history[-1]["test_acc"], history[-1]["cosine_mean"])
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from torch_ar.config import RelaxConfig
from torch_ar.experiments import data as data_lib
from torch_ar.experiments.models import build_model
from torch_ar.metrics import RandomState, cosine, gradients_at

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, not a dependency of the loop
    tqdm = None

METHODS = ("backprop", "ar")
LOSSES = ("mse", "cross-entropy")
# Input preprocessing: raw [0, 1] pixels (the paper's code: ToTensor only) or
# per-channel standardisation with the training set's mean and std.
NORMALIZATIONS = ("none", "standard")
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step", "none")
# SGD on the summed MSE uses the paper's lr; the others are common choices.
# Each reaches >75% on Fashion-MNIST with the paper MLP within 300 batches.
DEFAULT_LR = {("sgd", "mse"): 5e-4, ("sgd", "cross-entropy"): 0.05, ("adam", "mse"): 1e-3}
DEFAULT_LR[("adam", "cross-entropy")] = 1e-3
DEFAULT_LR[("adamw", "mse")] = DEFAULT_LR[("adamw", "cross-entropy")] = 1e-3
# Losses summed over the batch: reported per example by dividing by the batch size.
SUMMED_LOSSES = ("mse",)
# Seed of the fixed test sample drawn for limit_test_batches (independent of the run's seed).
TEST_SAMPLE_SEED = 0
# Seed of the validation sample held out of the training set (val_split).
VAL_SAMPLE_SEED = 1


class ConfigError(ValueError):
    """A training configuration that cannot run (bad value, unknown name, missing engine)."""


class TrainingStopped(Exception):
    """A stop was asked for (time limit, SIGTERM, SIGUSR1) and the run left a
    checkpoint inside epoch ``epoch``, before batch ``next_batch``."""

    def __init__(self, reason: str, epoch: int, next_batch: int) -> None:
        super().__init__(f"stopped ({reason}) in epoch {epoch} before batch {next_batch}")
        self.reason, self.epoch, self.next_batch = reason, epoch, next_batch


# The signals that ask a run to stop with a checkpoint: what SLURM sends before
# a job's time limit (SIGTERM, or SIGUSR1 with --signal) and what a scheduler
# sends to preempt it.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class TrainingDiverged(FloatingPointError):
    """The loss or a relaxation state became NaN/Inf; ``record`` says where (and is logged)."""

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def _is_divergence(error: BaseException) -> bool:
    if isinstance(error, FloatingPointError):
        return True
    try:
        from torch_ar.errors import RelaxationDivergedError
    except ImportError:
        return False
    return isinstance(error, RelaxationDivergedError)


@dataclass
class TrainConfig:
    """Everything a training run depends on; ``None`` AR options take the library's defaults."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    model: str = "mlp"
    method: str = "backprop"
    eta: float | None = None
    steps: int | None = None
    tol: float | None = None
    init: str | None = None
    schedule: str | None = None
    granularity: str | None = None
    variant: str | None = None
    cuda_graph: bool | None = None
    backward_weight_init: str | None = None
    backward_weight_std: float | None = None
    backward_weight_decay: float | None = None
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float = 0.0
    # L2 decay of the model's own parameters; backward weights (psi) decay
    # only with weight_decay_backward_weights (their Kolen-Pollack decay is
    # backward_weight_decay, an AR option).
    weight_decay: float = 0.0
    weight_decay_backward_weights: bool | None = None
    nesterov: bool | None = None
    # Learning rate over training: None (constant), "cosine" (to 0 at the last
    # batch) or "step" (x lr_gamma at each of lr_milestones, in epochs; default
    # half and three quarters of the run), after warmup_epochs of linear warm-up
    # from 0, all per batch.
    lr_schedule: str | None = None
    warmup_epochs: float | None = None
    lr_milestones: tuple[int, ...] | None = None
    lr_gamma: float | None = None
    # Training examples held out (a fixed random sample, the same for every
    # seed) and evaluated each epoch as val_loss / val_acc.
    val_split: int | None = None
    batch_size: int = 64
    test_batch_size: int = 1000
    epochs: int = 1
    limit_train_batches: int | None = None
    limit_test_batches: int | None = None
    loss: str = "mse"
    # Cross-entropy's label smoothing (0: none).
    label_smoothing: float = 0.0
    augment: bool | None = None
    normalize: str = "standard"
    device: str = "auto"
    seed: int = 0
    out: str | None = None
    cosine_every: int = 50
    # Folder for a TensorBoard event file of the run's metrics (None: none).
    tensorboard: str | None = None
    progress: bool = False
    # Continue an interrupted run from the checkpoint in ``out`` (saved after
    # every epoch, and inside an epoch when a run is stopped): the same
    # trajectory as one uninterrupted run.
    resume: bool = False
    # Minutes of training, after which the run stops at the next batch with a
    # checkpoint to resume from (as on SIGTERM or SIGUSR1, which SLURM sends
    # before it ends a job). None: no limit.
    time_limit: float | None = None
    # Stop after this epoch of the `epochs` planned (the schedule is the whole
    # run's), with a checkpoint, as a time limit stops: a few epochs of a run
    # that another, full run is compared with. None: run them all.
    stop_after_epochs: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def ar_options(self) -> dict[str, Any]:
        """The AR options set explicitly (the rest keep ``ARBackward``'s defaults)."""
        return {k: getattr(self, k) for k in AR_OPTIONS if getattr(self, k) is not None}

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[(self.optimizer, self.loss)]

    def lr_at(self, batch: int, batches_per_epoch: int) -> float:
        """The learning rate of global batch ``batch`` (0-based) under the schedule."""
        base, total = self.resolved_lr(), self.epochs * batches_per_epoch
        warmup = round((self.warmup_epochs or 0.0) * batches_per_epoch)
        if batch < warmup:
            return base * (batch + 1) / warmup
        if self.lr_schedule == "cosine":
            progress = (batch - warmup) / max(total - warmup, 1)
            return base * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.lr_schedule == "step":
            milestones = self.lr_milestones or (self.epochs // 2, (3 * self.epochs) // 4)
            passed = sum(batch >= m * batches_per_epoch for m in milestones)
            return base * (self.lr_gamma if self.lr_gamma is not None else 0.1) ** passed
        return base


# ------------------------------------------------------------------ losses


# TrainConfig's fields that are RelaxConfig options (the ARBackward settings a
# run may set; None keeps the library's default).
AR_OPTIONS = tuple(
    f.name for f in fields(TrainConfig) if f.name in RelaxConfig.__dataclass_fields__
)


def make_loss(
    name: str, num_classes: int, label_smoothing: float = 0.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training criterion by name.

    ``"mse"`` is the paper's loss: the squared error to the one-hot target, summed
    over classes *and over the batch* (so its gradients, and the paper's learning
    rate, are per batch). ``"cross-entropy"`` is the usual batch mean, with
    ``label_smoothing`` as ``F.cross_entropy`` takes it.
    """
    if label_smoothing and name != "cross-entropy":
        raise ConfigError(f"label_smoothing applies to the cross-entropy loss, not {name!r}")
    if name == "mse":

        def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            one_hot = F.one_hot(target, num_classes).to(out.dtype)
            return (out - one_hot).pow(2).sum()

        return mse
    if name == "cross-entropy":
        if label_smoothing:
            return functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
        return F.cross_entropy
    raise ConfigError(f"unknown loss {name!r}; choose from {LOSSES}")


# ---------------------------------------------------------------- cosines


def parameter_cosines(
    grads: Sequence[torch.Tensor | None], reference: Sequence[torch.Tensor | None]
) -> list[float]:
    """Cosine of each gradient to its reference (pairs with a ``None`` are skipped)."""
    pairs = zip(grads, reference, strict=True)
    return [cosine(g, r) for g, r in pairs if g is not None and r is not None]


def _generator_states(device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The generators' states as a checkpoint keeps them: (CPU, [CUDA device's])."""
    cuda = [torch.cuda.get_rng_state(device)] if device.type == "cuda" else []
    return torch.get_rng_state(), cuda


# ----------------------------------------------------------------- trainer


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"bad device {name!r}: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this PyTorch sees no CUDA device")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(
                f"device {name!r} asked for, but this PyTorch sees {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
    return device


def wrap_with_ar(model: nn.Module, options: dict[str, Any]) -> nn.Module:
    """``torch_ar.ARBackward(model, **options)``, with a clear error when it cannot be built."""
    try:
        # Late import: the engine is only needed for --method ar.
        from torch_ar import ARBackward
    except ImportError as e:
        raise ConfigError(
            f"--method ar needs torch_ar.ARBackward, which could not be imported: {e}"
        ) from e
    try:
        return ARBackward(model, **options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad AR options {options}: {e}") from e


class Trainer:
    """Sets up data, model, optimizer and (for AR) the wrapper; :meth:`fit` trains.

    Setup problems raise :class:`ConfigError` or ``FileNotFoundError`` from the
    constructor, before any training starts.
    """

    def __init__(self, config: TrainConfig, stream: TextIO | None = None) -> None:
        self.config = c = config
        self.stream = stream if stream is not None else sys.stdout
        self.board = None  # a TensorBoardLog while fit() runs with config.tensorboard
        self._check(c)
        self.device = resolve_device(c.device)
        torch.manual_seed(c.seed)
        try:
            self.model = build_model(c.model, c.dataset, **c.extra).to(self.device)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.net = wrap_with_ar(self.model, c.ar_options()) if c.method == "ar" else self.model
        self.optimizer = self._make_optimizer()
        self.dataset = data_lib.load_dataset(c.dataset, c.data_dir)
        self.loss_fn = make_loss(c.loss, self.dataset.num_classes, c.label_smoothing)
        self.summed_loss = c.loss in SUMMED_LOSSES
        self.augment = c.augment if c.augment is not None else c.dataset == "cifar10"
        self.augment_generator = torch.Generator().manual_seed(c.seed + 1)
        train_images, train_labels = self.dataset.train_images, self.dataset.train_labels
        self.val_batches = None
        if c.val_split:
            if c.val_split >= len(train_labels):
                raise ConfigError(
                    f"val_split {c.val_split} leaves no training examples of {len(train_labels)}"
                )
            # A fixed random sample (the folders are sorted by class), the
            # same for every seed and method.
            order = torch.randperm(
                len(train_labels), generator=torch.Generator().manual_seed(VAL_SAMPLE_SEED)
            )
            held, kept = order[: c.val_split].sort().values, order[c.val_split :].sort().values
            self.val_batches = data_lib.TensorBatches(
                train_images[held],
                train_labels[held],
                c.test_batch_size,
                device=self.device,
                transform=self._test_transform,
            )
            train_images, train_labels = train_images[kept], train_labels[kept]
        self.train_batches = data_lib.TensorBatches(
            train_images,
            train_labels,
            c.batch_size,
            shuffle=True,
            seed=c.seed,
            limit=c.limit_train_batches,
            device=self.device,
            transform=self._train_transform if self.augment else self._test_transform,
        )
        test_images, test_labels = self._test_sample(c)
        self.test_batches = data_lib.TensorBatches(
            test_images,
            test_labels,
            c.test_batch_size,
            limit=c.limit_test_batches,
            device=self.device,
            transform=self._test_transform,
        )
        self.out = Path(c.out) if c.out else None
        # Why the run should stop at the next batch (None: it should not), and
        # the epoch resumed inside, if any (from the checkpoint).
        self.stop_reason: str | None = None
        self._deadline: float | None = None
        self._partial: dict[str, Any] | None = None
        self.stopped: TrainingStopped | None = None

    def _test_sample(self, c: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """The test set, or with ``limit_test_batches`` a fixed random sample of it.

        Test sets can be sorted by class (the CIFAR-10 JPEG folders are), so a
        prefix could hold one class only. The sample is the same for every run.
        """
        images, labels = self.dataset.test_images, self.dataset.test_labels
        if c.limit_test_batches is None or c.limit_test_batches * c.test_batch_size >= len(labels):
            return images, labels
        generator = torch.Generator().manual_seed(TEST_SAMPLE_SEED)
        keep = torch.randperm(len(labels), generator=generator)
        keep = keep[: c.limit_test_batches * c.test_batch_size].sort().values
        return images[keep], labels[keep]

    @staticmethod
    def _check(c: TrainConfig) -> None:
        if c.method not in METHODS:
            raise ConfigError(f"unknown method {c.method!r}; choose from {METHODS}")
        if c.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {c.optimizer!r}; choose from {OPTIMIZERS}")
        if c.loss not in LOSSES:
            raise ConfigError(f"unknown loss {c.loss!r}; choose from {LOSSES}")
        if c.dataset not in data_lib.DATASETS:
            raise ConfigError(f"unknown data set {c.dataset!r}; choose from {data_lib.DATASETS}")
        positive = {
            "batch_size": c.batch_size,
            "test_batch_size": c.test_batch_size,
            "epochs": c.epochs,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if c.lr is not None and not c.lr > 0:
            raise ConfigError(f"lr must be > 0, got {c.lr}")
        if not 0.0 <= c.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {c.label_smoothing}")
        if c.cosine_every < 0:
            raise ConfigError(f"cosine_every must be >= 0, got {c.cosine_every}")
        if c.normalize not in NORMALIZATIONS:
            raise ConfigError(f"unknown normalize {c.normalize!r}; choose from {NORMALIZATIONS}")
        if c.lr_schedule is not None and c.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {c.lr_schedule!r}; choose from {LR_SCHEDULES}")
        if c.warmup_epochs is not None and not 0 <= c.warmup_epochs < c.epochs:
            raise ConfigError(f"warmup_epochs must be in [0, epochs), got {c.warmup_epochs}")
        if c.val_split is not None and c.val_split < 0:
            raise ConfigError(f"val_split must be >= 0, got {c.val_split}")
        if c.nesterov and (c.optimizer != "sgd" or not c.momentum > 0):
            raise ConfigError("nesterov needs the sgd optimizer with momentum > 0")
        if c.resume and not c.out:
            raise ConfigError("resume needs out: the folder whose checkpoint to continue")
        if c.time_limit is not None and not c.time_limit > 0:
            raise ConfigError(f"time_limit must be > 0 minutes, got {c.time_limit}")
        if c.stop_after_epochs is not None and not 1 <= c.stop_after_epochs <= c.epochs:
            raise ConfigError(
                f"stop_after_epochs must be from 1 to epochs ({c.epochs}), got {c.stop_after_epochs}"
            )

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c, lr = self.config, self.config.resolved_lr()
        # The wrapper's parameters: the model's plus any it owns (e.g. learned
        # backward weights), which take weight decay only when asked.
        own = {id(p) for p in self.model.parameters()}
        forward = [p for p in self.net.parameters() if p.requires_grad and id(p) in own]
        backward = [p for p in self.net.parameters() if p.requires_grad and id(p) not in own]
        groups = [{"params": forward, "weight_decay": c.weight_decay}]
        if backward:
            decay = c.weight_decay if c.weight_decay_backward_weights else 0.0
            groups.append({"params": backward, "weight_decay": decay})
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=c.momentum, nesterov=bool(c.nesterov))
        if c.optimizer == "adamw":  # decoupled decay, per group as above
            return torch.optim.AdamW(groups, lr=lr)
        return torch.optim.Adam(groups, lr=lr)

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.normalize == "none":
            return data_lib.normalize(x)  # [0, 1] pixels, as the paper's code
        return data_lib.normalize(x, self.dataset.mean, self.dataset.std)

    def _test_transform(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(x)

    def _train_transform(self, x: torch.Tensor) -> torch.Tensor:
        return self._scale(
            data_lib.random_crop_flip(x, padding=4, generator=self.augment_generator)
        )

    def _progress(self, batches: Iterable[Any], desc: str, total: int) -> Any:
        if tqdm is None or not self.config.progress:
            return batches
        return tqdm(batches, desc=desc, total=total, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------- loop

    def fit(self) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs; returns one metrics dict per epoch.

        A NaN/Inf loss or relaxation state raises :class:`TrainingDiverged`; the
        partial epoch is still written to ``metrics.jsonl`` with ``"diverged": true``.
        """
        c = self.config
        history = self._resume() if c.resume else []
        files = self._open_outputs(append=bool(history) or self._partial is not None)
        deadline = None if c.time_limit is None else time.monotonic() + 60.0 * c.time_limit
        self._deadline = deadline
        previous_handlers = self._catch_stop_signals()
        if c.tensorboard:
            from torch_ar.experiments.tensorboard import TensorBoardLog

            self.board = TensorBoardLog(c.tensorboard)
        try:
            self._print(
                f"{c.method} | {c.model} on {c.dataset} | {len(self.train_batches)} train "
                f"batches of {c.batch_size}, {c.optimizer} lr {c.resolved_lr():g}, "
                f"{c.loss} loss, {c.normalize} inputs | device {self.device}"
                + self._resumed_at(history)
            )
            for epoch in range(len(history) + 1, c.epochs + 1):
                try:
                    record = self._train_epoch(epoch, files.get("cosine"))
                except TrainingStopped as e:
                    self.stopped = e
                    self._print(
                        f"{e}; its checkpoint is in {self.out}: continue with --resume"
                        if self.out
                        else str(e)
                    )
                    break
                except TrainingDiverged as e:
                    # Kept in metrics.jsonl (a partial epoch marked "diverged"), then raised.
                    e.record["time_s"] = round(time.perf_counter() - e.record.pop("_start"), 3)
                    self._print(str(e))
                    if "metrics" in files:
                        files["metrics"].write(json.dumps(e.record) + "\n")
                    raise
                record.update(self.evaluate())
                record["time_s"] = round(time.perf_counter() - record.pop("_start"), 3)
                history.append(record)
                self._print(self._epoch_line(record))
                if self.board is not None:
                    self.board.epoch(record)
                if "metrics" in files:
                    files["metrics"].write(json.dumps(record) + "\n")
                    files["metrics"].flush()
                    for f in files.values():
                        f.flush()
                    self._save_checkpoint(epoch)
                if c.stop_after_epochs is not None and epoch >= c.stop_after_epochs:
                    self.stop_reason = self.stop_reason or (
                        f"asked to stop after epoch {c.stop_after_epochs}"
                    )
                reason = self._should_stop()
                if reason is not None and epoch < c.epochs:
                    self.stopped = TrainingStopped(reason, epoch + 1, 0)
                    self._print(f"{self.stopped}; continue with --resume")
                    break
        finally:
            self._restore_signals(previous_handlers)
            for f in files.values():
                f.close()
            if self.board is not None:
                self.board.close()
                self.board = None
        return history

    def request_stop(self, reason: str) -> None:
        """Stop at the next batch, leaving a checkpoint (a signal handler's job)."""
        self.stop_reason = reason

    def _catch_stop_signals(self) -> dict[int, Any]:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        handlers = {}
        for name in STOP_SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                handlers[number] = signal.signal(
                    number, lambda signum, _frame: self.request_stop(signal.Signals(signum).name)
                )
        return handlers

    @staticmethod
    def _restore_signals(handlers: dict[int, Any]) -> None:
        import signal

        for number, handler in handlers.items():
            signal.signal(number, handler)

    def _should_stop(self) -> str | None:
        if (
            self.stop_reason is None
            and self._deadline is not None
            and time.monotonic() >= self._deadline
        ):
            self.stop_reason = f"time limit of {self.config.time_limit:g} min"
        return self.stop_reason

    def _resumed_at(self, history: list[dict[str, Any]]) -> str:
        """Where a resumed run goes on, for its log: after an epoch, or inside one."""
        if self._partial is not None:
            return (
                f" | resumed in epoch {self._partial['epoch']} at batch "
                f"{self._partial['next_batch']}"
            )
        return f" | resumed after epoch {len(history)}" if history else ""

    def _train_epoch(self, epoch: int, cosine_file: TextIO | None) -> dict[str, Any]:
        c = self.config
        start = time.perf_counter()
        self.model.train()
        total_loss, correct, seen = 0.0, 0, 0
        measurements: list[dict[str, Any]] = []
        first = 0
        partial, self._partial = self._partial, None
        if partial is not None:  # resumed inside this epoch
            first = partial["next_batch"]
            total_loss, correct, seen = partial["total_loss"], partial["correct"], partial["seen"]
            measurements = partial["measurements"]
            start -= partial["elapsed"]
        # The batch order's state before this epoch's draw, for a checkpoint
        # inside it (the resumed run draws the same order).
        order_state = self.train_batches.generator.get_state()
        batches = len(self.train_batches)
        bar = self._progress(
            self.train_batches.batches_from(first), f"epoch {epoch}/{c.epochs}", batches - first
        )
        for index, (x, y) in enumerate(bar, start=first):
            lr = c.lr_at((epoch - 1) * batches + index, batches)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            measure = c.method == "ar" and c.cosine_every > 0 and index % c.cosine_every == 0
            try:
                loss, out, m = self._train_step(x, y, measure)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss}")
            except (FloatingPointError, RuntimeError) as e:
                if not _is_divergence(e):
                    raise
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch}, batch {index}: {e}",
                    {
                        "epoch": epoch,
                        "method": c.method,
                        "diverged": True,
                        "diverged_batch": index,
                        "error": str(e),
                        "train_batches": index,
                        "epoch_batches": len(self.train_batches),
                        "train_loss": total_loss / max(seen, 1),
                        "train_acc": correct / max(seen, 1),
                        "_start": start,
                    },
                ) from e
            total_loss += loss if self.summed_loss else loss * len(y)
            correct += int((out.argmax(dim=1) == y).sum())
            seen += len(y)
            if m is not None:
                m.update(epoch=epoch, batch=index)
                measurements.append(m)
                if cosine_file is not None:
                    cosine_file.write(json.dumps(m) + "\n")
                if self.board is not None:
                    self.board.measurement((epoch - 1) * batches + index, m)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
            reason = self._should_stop()
            if reason is not None and index + 1 < batches:
                if cosine_file is not None:
                    cosine_file.flush()
                self._save_checkpoint(
                    epoch - 1,
                    partial={
                        "epoch": epoch,
                        "next_batch": index + 1,
                        "total_loss": total_loss,
                        "correct": correct,
                        "seen": seen,
                        "measurements": measurements,
                        "elapsed": time.perf_counter() - start,
                    },
                    batch_order=order_state,
                )
                raise TrainingStopped(reason, epoch, index + 1)
        record: dict[str, Any] = {
            "epoch": epoch,
            "method": c.method,
            "lr_last": lr if batches else None,
            "train_batches": len(self.train_batches),
            "train_loss": total_loss / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "_start": start,
        }
        if measurements:
            record["cosine_mean"] = sum(m["cosine_mean"] for m in measurements) / len(measurements)
            record["cosine_min"] = min(m["cosine_min"] for m in measurements)
            per_param = [m["param_cosines"] for m in measurements]
            record["param_cosine_mean"] = {
                n: sum(p[n] for p in per_param) / len(per_param) for n in per_param[0]
            }
            record["param_cosine_min"] = {n: min(p[n] for p in per_param) for n in per_param[0]}
            residuals = [m["max_residual"] for m in measurements if m["max_residual"] is not None]
            record["max_residual"] = max(residuals) if residuals else None
            record["ar_steps"] = measurements[-1]["steps"]
            record["cosine_measurements"] = len(measurements)
            if measurements[-1]["psi_angles"]:
                # Angle between each backward weight and W^T (W for conv), degrees.
                record["psi_angle"] = measurements[-1]["psi_angles"]
        return record

    def _train_step(
        self, x: torch.Tensor, y: torch.Tensor, measure: bool
    ) -> tuple[float, torch.Tensor, dict[str, Any] | None]:
        rng = RandomState([self.device]) if measure else None
        self.optimizer.zero_grad(set_to_none=True)
        out = self.net(x)
        loss = self.loss_fn(out, y)
        loss.backward()
        measurement = self._measure(x, y, rng) if rng is not None else None
        self.optimizer.step()
        return loss.item(), out.detach(), measurement

    def _measure(self, x: torch.Tensor, y: torch.Tensor, rng: RandomState) -> dict[str, Any]:
        """Compare the AR gradients now in ``.grad`` with autograd's on the same batch.

        The reference pass replays the training step's RNG (same dropout masks)
        and restores the buffers (BatchNorm running stats), so measuring does
        not change the training trajectory.
        """
        stats = getattr(self.net, "last_stats", None)
        ar_grads = [p.grad for p in self.params]
        reference = gradients_at(
            self.model, lambda out: self.loss_fn(out, y), (x,), self.params, rng
        )
        per_param = {
            name: cosine(g, r)
            for name, g, r in zip(self.param_names, ar_grads, reference, strict=True)
            if g is not None and r is not None
        }
        cosines = list(per_param.values())
        angles = {}
        if hasattr(self.net, "backward_weights") and self.net.backward_weights():
            from torch_ar.alignment import backward_weight_angles

            angles = backward_weight_angles(self.net)
        return {
            "cosine_mean": sum(cosines) / len(cosines) if cosines else float("nan"),
            "cosine_min": min(cosines) if cosines else float("nan"),
            "param_cosines": per_param,
            "psi_angles": angles,
            "max_residual": _as_float(getattr(stats, "max_residual", None)),
            "steps": _as_int(getattr(stats, "steps", None)),
            "converged": getattr(stats, "converged", None),
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Test (and validation) loss and accuracy of the plain model in eval
        mode (BatchNorm's running statistics; no AR needed for a forward pass)."""
        result = self._evaluate(self.test_batches, "test")
        if self.val_batches is not None:
            result.update(self._evaluate(self.val_batches, "val"))
        return result

    @torch.no_grad()
    def _evaluate(self, batches: Any, split: str) -> dict[str, float]:
        self.model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        bar = self._progress(batches, split, len(batches))
        for x, y in bar:
            out = self.model(x)
            loss = self.loss_fn(out, y).item()
            total_loss += loss if self.summed_loss else loss * len(y)
            correct += int((out.argmax(dim=1) == y).sum())
            seen += len(y)
        self.model.train()
        return {f"{split}_loss": total_loss / max(seen, 1), f"{split}_acc": correct / max(seen, 1)}

    # ---------------------------------------------------------- output

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _epoch_line(self, r: dict[str, Any]) -> str:
        line = (
            f"epoch {r['epoch']}/{self.config.epochs} | train loss {r['train_loss']:.4f} "
            f"acc {100 * r['train_acc']:.2f}% | test loss {r['test_loss']:.4f} "
            f"acc {100 * r['test_acc']:.2f}%"
        )
        if "val_acc" in r:
            line += f" | val acc {100 * r['val_acc']:.2f}%"
        if "cosine_mean" in r:
            line += f" | cosine to autograd mean {r['cosine_mean']:.6f} min {r['cosine_min']:.6f}"
            if r.get("max_residual") is not None:
                line += f" | residual {r['max_residual']:.2e}"
            if r.get("ar_steps") is not None:
                line += f" | {r['ar_steps']} steps"
        return line + f" | {r['time_s']:.1f}s"

    # ------------------------------------------------------ checkpoints

    CHECKPOINT = "checkpoint.pt"

    def _state(self) -> dict[str, Any]:
        """Everything the next epoch depends on: weights (and backward weights),
        optimizer, data order, augmentation and global random state."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batch_order": self.train_batches.generator.get_state(),
            "augment": self.augment_generator.get_state(),
            "rng": _generator_states(self.device),
        }

    def _save_checkpoint(
        self,
        epoch: int,
        partial: dict[str, Any] | None = None,
        batch_order: torch.Tensor | None = None,
    ) -> None:
        """After each epoch (``epoch``, the last one finished), and inside an
        epoch when a run is stopped (``partial``: where, and the epoch's sums
        so far; ``batch_order``: the order's state before the epoch's draw),
        atomically: an interrupted run resumes from here."""
        if self.out is None:
            return
        state = self._state()
        if batch_order is not None:
            state["batch_order"] = batch_order
        tmp = self.out / (self.CHECKPOINT + ".tmp")
        torch.save(
            {
                "epoch": epoch,
                "config": asdict(self.config),
                "library_granularity": RelaxConfig.granularity,
                "partial": partial,
                **state,
            },
            tmp,
        )
        tmp.replace(self.out / self.CHECKPOINT)

    def load_forward_weights(self, source: str | Path) -> int:
        """Put the forward weights of a ``train --out`` folder (or its checkpoint
        file) into this trainer's model, whichever method made them (an AR run
        saves its wrapper, whose backward weights are left out); returns the
        epoch the checkpoint was made after. ``compare --checkpoint`` relaxes on
        a trained network with it."""
        path = Path(source)
        if path.is_dir():
            path = path / self.CHECKPOINT
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = torch.load(path, map_location=self.device, weights_only=False)
        weights = state["net"]
        if state["config"].get("method") == "ar":  # ARBackward's: the network is its "module"
            weights = {
                k.removeprefix("module."): v for k, v in weights.items() if k.startswith("module.")
            }
        try:
            self.model.load_state_dict(weights)
        except RuntimeError as e:
            raise ConfigError(
                f"the checkpoint {path} does not fit --model {self.config.model}: {e}"
            ) from None
        return int(state["epoch"])

    def _resume(self) -> list[dict[str, Any]]:
        """Load the checkpoint in ``out``; returns the epochs' metrics recorded so far."""
        assert self.out is not None
        path = self.out / self.CHECKPOINT
        metrics = self.out / "metrics.jsonl"
        if not path.is_file() or not metrics.is_file():
            return []  # nothing to resume: start from scratch
        state = torch.load(path, map_location=self.device, weights_only=False)
        # Settings that do not change the trajectory may differ on resuming.
        free = ("resume", "progress", "epochs", "tensorboard", "time_limit", "stop_after_epochs")
        saved = {k: v for k, v in state["config"].items() if k not in free}
        now = {k: v for k, v in asdict(self.config).items() if k not in free}
        if self.config.method == "ar":
            # granularity None is the library's default of the day: "layer"
            # until checkpoints began to record it.
            saved["granularity"] = saved.get("granularity") or state.get(
                "library_granularity", "layer"
            )
            now["granularity"] = now.get("granularity") or RelaxConfig.granularity
        # A setting added since the checkpoint was made is absent there: it
        # ran at that setting's default (label_smoothing 0, say).
        for f in fields(TrainConfig):
            if f.name in now and f.name not in saved and f.default is not MISSING:
                saved[f.name] = f.default
        changed = sorted(k for k in now.keys() | saved.keys() if saved.get(k) != now.get(k))
        if (
            self.config.lr_schedule not in (None, "none")
            and state["config"].get("epochs") != self.config.epochs
        ):
            changed.append("epochs (the learning-rate schedule spans them)")
        if changed:
            raise ConfigError(
                f"cannot resume {self.out}: its checkpoint was made with other settings ({changed})"
            )
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        history = [r for r in history if r.get("epoch", 0) <= state["epoch"]]
        partial = state.get("partial")
        if any(r.get("diverged") for r in history):
            raise ConfigError(f"cannot resume {self.out}: the run diverged")
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_batches.generator.set_state(state["batch_order"])
        self.augment_generator.set_state(state["augment"])
        torch.set_rng_state(state["rng"][0])
        if state["rng"][1] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"][1][0], self.device)
        # Drop the lines of an epoch that was interrupted after its checkpoint.
        metrics.write_text("".join(json.dumps(r) + "\n" for r in history))
        cosines = self.out / "cosine.jsonl"
        if cosines.is_file():

            def done(m: dict[str, Any]) -> bool:
                if m.get("epoch", 0) <= state["epoch"]:
                    return True
                return bool(partial) and (m["epoch"], m["batch"]) < (
                    partial["epoch"],
                    partial["next_batch"],
                )

            kept = [
                line
                for line in cosines.read_text().splitlines()
                if line.strip() and done(json.loads(line))
            ]
            cosines.write_text("".join(line + "\n" for line in kept))
        self._partial = partial
        return history

    def _open_outputs(self, append: bool = False) -> dict[str, TextIO]:
        if self.out is None:
            return {}
        self.out.mkdir(parents=True, exist_ok=True)
        config = {
            "config": asdict(self.config),
            "resolved": {
                "device": str(self.device),
                "lr": self.config.resolved_lr(),
                "ar_config": _ar_config(self.net) if self.config.method == "ar" else None,
                "augment": self.augment,
                "normalize": self.config.normalize,
                "parameters": sum(p.numel() for p in self.params),
                "train_examples": len(self.dataset.train_labels) - (self.config.val_split or 0),
                "val_examples": self.config.val_split or 0,
                "test_examples": len(self.dataset.test_labels),
            },
            "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        mode = "a" if append else "w"
        files = {"metrics": open(self.out / "metrics.jsonl", mode)}  # noqa: SIM115 - closed in fit()
        if self.config.method == "ar" and self.config.cosine_every > 0:
            files["cosine"] = open(self.out / "cosine.jsonl", mode)  # noqa: SIM115
        return files


def _ar_config(net: nn.Module) -> dict[str, Any] | None:
    """The wrapper's effective relaxation settings, defaults included."""
    config = getattr(net, "relax_config", None)
    return asdict(config) if is_dataclass(config) and not isinstance(config, type) else None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _as_int(value: Any) -> int | None:
    if value is None:
        return None
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def train(config: TrainConfig, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Set up and run one training run; returns the per-epoch metrics."""
    return Trainer(config, stream).fit()

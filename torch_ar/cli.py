"""Command line: ``python -m torch_ar train ...``.

Example::

    python -m torch_ar train --dataset fashion-mnist --model mlp --method ar \\
        --epochs 1 --limit-train-batches 300
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch_ar import data as data_lib
from torch_ar import training
from torch_ar.config import GRANULARITIES, INIT_MODES, SCHEDULES, RelaxConfig
from torch_ar.models import MODEL_NAMES
from torch_ar.variants import VARIANTS


def _number(kind: Callable[[str], float], low: float, strict: bool) -> Callable[[str], float]:
    bound = f"> {low:g}" if strict else f">= {low:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not (value > low if strict else value >= low):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_float = _number(float, 0.0, strict=True)
nonnegative_float = _number(float, 0.0, strict=False)
positive_int = _number(int, 1, strict=False)
nonnegative_int = _number(int, 0, strict=False)


def existing_dir(text: str) -> str:
    if not Path(text).expanduser().exists():
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The ``torch_ar`` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(
        prog="python -m torch_ar", description="Activation Relaxation for PyTorch: tools."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = commands.add_parser(
        "train",
        help="train a classifier with backprop or AR gradients",
        description="Train on Fashion-MNIST or CIFAR-10 with backprop or Activation Relaxation "
        "gradients, and (for AR) measure the cosine of the AR gradients to autograd's.",
    )
    d = training.TrainConfig()
    ar = RelaxConfig  # the library's defaults, shown in the help
    default = " (default: %(default)s)"

    g = t.add_argument_group("data")
    g.add_argument("--dataset", choices=data_lib.DATASETS, default=d.dataset, help=default[1:])
    g.add_argument(
        "--data-dir",
        type=existing_dir,
        default=None,
        help=f"folder with the data files (default: search ${data_lib.ENV_DATA}, "
        f"{data_lib.FASHION_MNIST_SYSTEM_DIR} for Fashion-MNIST, ../shared/data)",
    )
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=default[1:])
    g.add_argument(
        "--test-batch-size", type=positive_int, default=d.test_batch_size, help=default[1:]
    )
    g.add_argument(
        "--limit-train-batches",
        type=positive_int,
        default=None,
        help="train batches per epoch (default: all)",
    )
    g.add_argument(
        "--limit-test-batches",
        type=positive_int,
        default=None,
        help="test batches (of --test-batch-size) to evaluate (default: all)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (4px padding) + horizontal flip (default: on for cifar10 only)",
    )

    g = t.add_argument_group("model and loss")
    g.add_argument(
        "--model",
        default=d.model,
        help=f"one of {', '.join(MODEL_NAMES)}, or a torchvision.models constructor name" + default,
    )
    g.add_argument(
        "--loss",
        choices=training.LOSSES,
        default=d.loss,
        help="mse: the paper's, squared error to the one-hot target summed over classes and "
        "batch; cross-entropy: batch mean" + default,
    )

    g = t.add_argument_group("gradients")
    g.add_argument("--method", choices=training.METHODS, default=d.method, help=default[1:])
    g.add_argument(
        "--eta",
        type=positive_float,
        default=None,
        help=f"relaxation step size in (0, 1] (default: {ar.eta:g}; the paper used 0.1 "
        "with 100 steps)",
    )
    g.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        help="relaxation steps (default: the graph's depth, exact at eta 1; needed for eta < 1 "
        "unless --tol is given)",
    )
    g.add_argument(
        "--tol", type=positive_float, default=None, help="stop relaxing below this residual"
    )
    g.add_argument(
        "--init",
        choices=INIT_MODES,
        default=None,
        help=f"initial states: forward values (the paper's) or zero (default: {ar.init})",
    )
    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help="jacobi: the paper's parallel phase; sweep: reverse-topological Gauss-Seidel "
        f"(default: {ar.schedule})",
    )
    g.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=None,
        help="one relaxing state per layer (the paper's neurons) or per op "
        f"(default: {ar.granularity})",
    )
    g.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default=None,
        help="exact, or one of the paper's variants without weight transport or "
        "nonlinear derivatives (default: exact)",
    )
    g.add_argument(
        "--cosine-every",
        type=nonnegative_int,
        default=d.cosine_every,
        help="every N train batches compare the AR gradients with autograd's on that batch "
        "(0: never)" + default,
    )

    g = t.add_argument_group("optimisation")
    g.add_argument(
        "--optimizer", choices=training.OPTIMIZERS, default=d.optimizer, help=default[1:]
    )
    lrs = ", ".join(f"{opt} + {loss} {lr:g}" for (opt, loss), lr in training.DEFAULT_LR.items())
    g.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default: {lrs}; 5e-4 with SGD on the summed MSE is the paper's)",
    )
    g.add_argument(
        "--momentum", type=nonnegative_float, default=d.momentum, help="SGD momentum" + default
    )
    g.add_argument(
        "--weight-decay", type=nonnegative_float, default=d.weight_decay, help=default[1:]
    )
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help=default[1:])

    g = t.add_argument_group("run")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ..." + default)
    g.add_argument("--seed", type=int, default=d.seed, help=default[1:])
    g.add_argument(
        "--out", default=None, help="folder for config.json, metrics.jsonl and cosine.jsonl"
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal)",
    )
    t.set_defaults(handler=_train, subparser=t)
    return parser


def _train(args: argparse.Namespace) -> int:
    fields = set(training.TrainConfig.__dataclass_fields__) - {"extra", "progress"}
    config = training.TrainConfig(
        **{k: getattr(args, k) for k in fields},
        progress=args.progress if args.progress is not None else sys.stderr.isatty(),
    )
    try:
        trainer = training.Trainer(config)
    except (training.ConfigError, FileNotFoundError) as e:
        args.subparser.error(str(e))
    history = trainer.fit()
    if trainer.out is not None:
        print(f"wrote {trainer.out / 'metrics.jsonl'}")
    last = history[-1]
    print(f"final test accuracy {100 * last['test_acc']:.2f}%")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)

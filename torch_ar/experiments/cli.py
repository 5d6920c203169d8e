"""Command line: ``torch-ar {train,compare,plot} ...`` (or ``python -m torch_ar``).

Example::

    python -m torch_ar train --dataset fashion-mnist --model mlp --method ar \\
        --epochs 1 --limit-train-batches 300 --out runs/ar
    python -m torch_ar compare --model mlp --etas 0.1,0.5,1 --steps 200 --out runs/compare
    python -m torch_ar plot runs/ --out runs/figures
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from torch_ar.config import OPTION_BOUNDS, OPTION_CHOICES, RelaxConfig, option_help
from torch_ar.experiments import data as data_lib
from torch_ar.experiments import training
from torch_ar.experiments.models import MODEL_NAMES


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


DEFAULT_HELP = " (default: %(default)s)"
# The RelaxConfig options `compare` takes (its own --etas and --steps set the rest).
COMPARE_AR_OPTIONS = ("init", "schedule", "granularity", "variant")


def step_counts(text: str) -> list[int] | str:
    """``log`` or ``1,10,100`` -> [1, 10, 100] (positive, any order)."""
    if text.strip() == "log":
        return "log"
    counts = []
    for part in text.split(","):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected 'log' or comma-separated integers, got {part!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"step counts must be >= 1, got {value}")
        counts.append(value)
    return counts


def eta_list(text: str) -> list[float]:
    """``0.1,0.5,1`` -> [0.1, 0.5, 1.0]; each in (0, 1], no repeats."""
    etas = []
    for part in text.split(","):
        part = part.strip()
        try:
            eta = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {part!r} in {text!r}"
            ) from None
        if not 0.0 < eta <= 1.0:
            raise argparse.ArgumentTypeError(f"each eta must be in (0, 1], got {part}")
        if eta in etas:
            raise argparse.ArgumentTypeError(f"eta {part} is listed twice")
        etas.append(eta)
    return etas


def _data_arguments(g: argparse._ArgumentGroup, d: training.TrainConfig) -> None:
    g.add_argument("--dataset", choices=data_lib.DATASETS, default=d.dataset, help=DEFAULT_HELP[1:])
    g.add_argument(
        "--data-dir",
        type=existing_dir,
        default=None,
        help=f"folder with the data files (default: search ${data_lib.ENV_DATA}, "
        f"{data_lib.FASHION_MNIST_SYSTEM_DIR} for Fashion-MNIST, ../shared/data)",
    )
    g.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=DEFAULT_HELP[1:])
    g.add_argument(
        "--normalize",
        choices=training.NORMALIZATIONS,
        default=d.normalize,
        help="input pixels: none (raw [0, 1], as the paper's code) or standard (per-channel "
        "mean and std of the training set)" + DEFAULT_HELP,
    )


def _model_arguments(g: argparse._ArgumentGroup, d: training.TrainConfig) -> None:
    g.add_argument(
        "--model",
        default=d.model,
        help=f"one of {', '.join(MODEL_NAMES)}, or a torchvision.models constructor name"
        + DEFAULT_HELP,
    )
    g.add_argument(
        "--loss",
        choices=training.LOSSES,
        default=d.loss,
        help="mse: the paper's, squared error to the one-hot target summed over classes and "
        "batch; cross-entropy: batch mean" + DEFAULT_HELP,
    )


def _relax_config_arguments(g: argparse._ArgumentGroup, names: Sequence[str]) -> None:
    """One flag per RelaxConfig option in ``names`` (``--backward-weight-init``
    for backward_weight_init), made from the dataclass: its type, choices or
    bound and default, and its docstring's description as the help. Each
    defaults to None: the library's default."""
    for name in names:
        f = RelaxConfig.__dataclass_fields__[name]
        flag = "--" + name.replace("_", "-")
        text = option_help(name).replace("%", "%%")
        if not text.rstrip(".").endswith("by default"):
            text += f" (default: {f.default})"
        choices, bound = OPTION_CHOICES.get(name), OPTION_BOUNDS.get(name)
        if f.type == "bool":
            g.add_argument(flag, action="store_true", default=None, help=text)
        elif choices:
            g.add_argument(flag, choices=choices, default=None, help=text)
        else:
            kind = int if f.type.startswith("int") else float
            low = {"positive": (int(kind is int), kind is float), "nonnegative": (0, False)}
            bounded = _number(kind, *low[bound]) if bound else kind
            g.add_argument(flag, type=bounded, default=None, help=text)


def _run_arguments(g: argparse._ArgumentGroup, d: training.TrainConfig) -> None:
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1, ..." + DEFAULT_HELP)
    g.add_argument("--seed", type=int, default=d.seed, help=DEFAULT_HELP[1:])


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors come first: the message and where the
    options are, not the whole usage (a train command's is 32 lines)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``torch_ar`` argument parser (one sub-command per task; the
    sub-commands' parsers are of the same class)."""
    invoked_as = Path(sys.argv[0]).name
    parser = _Parser(
        prog="torch-ar" if invoked_as == "torch-ar" else "python -m torch_ar",
        description="Activation Relaxation for PyTorch: train, compare and plot.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_compare(commands)
    _add_plot(commands)
    _add_selftest(commands)
    return parser


def _add_selftest(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser(
        "selftest",
        help="check the kernels and the engine on this machine (run this first on a new GPU)",
        description="Checks every kernel against a plain-PyTorch reference (and the CPU kernel), "
        "the engine against autograd with every evaluation, and each variant against its "
        "oracle; prints a table and the versions, exits 1 on any failure.",
    )
    s.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    s.add_argument("--json", default=None, help="also write the report as JSON to this file")
    s.add_argument("--markdown", default=None, help="also write the table to this file")
    s.set_defaults(handler=_run_selftest)


def _run_selftest(args: argparse.Namespace) -> int:
    from torch_ar import diagnostics

    argv = ["--device", args.device]
    if args.json:
        argv += ["--json", args.json]
    if args.markdown:
        argv += ["--markdown", args.markdown]
    return diagnostics.main(argv)


def _add_train(commands: argparse._SubParsersAction) -> None:
    t = commands.add_parser(
        "train",
        help="train a classifier with backprop or AR gradients",
        description="Train on Fashion-MNIST or CIFAR-10 with backprop or Activation Relaxation "
        "gradients, and (for AR) measure the cosine of the AR gradients to autograd's.",
    )
    d = training.TrainConfig()
    default = DEFAULT_HELP

    g = t.add_argument_group("data")
    _data_arguments(g, d)
    g.add_argument(
        "--test-batch-size", type=positive_int, default=d.test_batch_size, help=default[1:]
    )
    g.add_argument(
        "--val-split",
        type=nonnegative_int,
        default=None,
        help="hold this many training examples out (a fixed sample) and report val_acc each "
        "epoch, e.g. 5000 for CIFAR-10's 45k/5k (default: none)",
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
        help="test batches (of --test-batch-size) to evaluate, drawn as a fixed random sample "
        "of the test set, the same for every run (default: all)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop (4px padding) + horizontal flip (default: on for cifar10 only)",
    )

    g = t.add_argument_group("model and loss")
    _model_arguments(g, d)

    g = t.add_argument_group("gradients")
    g.add_argument("--method", choices=training.METHODS, default=d.method, help=default[1:])
    _relax_config_arguments(g, training.AR_OPTIONS)
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
        "--weight-decay",
        type=nonnegative_float,
        default=d.weight_decay,
        help="L2 decay of the model's parameters (not of backward weights, see the next flag)"
        + default,
    )
    g.add_argument(
        "--weight-decay-backward-weights",
        action="store_true",
        default=None,
        help="apply --weight-decay to learned backward weights (psi) too",
    )
    g.add_argument(
        "--label-smoothing",
        type=nonnegative_float,
        default=d.label_smoothing,
        help="label smoothing of the cross-entropy loss, in [0, 1)" + default,
    )
    g.add_argument("--nesterov", action="store_true", default=None, help="Nesterov momentum (SGD)")
    g.add_argument(
        "--lr-schedule",
        choices=training.LR_SCHEDULES,
        default=None,
        help="cosine: to 0 at the last batch; step: x --lr-gamma at --lr-milestones "
        "(default: none, a constant rate)",
    )
    g.add_argument(
        "--warmup-epochs",
        type=nonnegative_float,
        default=None,
        help="linear warm-up from 0 over this many epochs (default: 0)",
    )
    g.add_argument(
        "--lr-milestones",
        type=lambda t: tuple(int(v) for v in t.split(",")),
        default=None,
        help="epochs of the step schedule, e.g. 100,150 (default: half and three quarters)",
    )
    g.add_argument(
        "--lr-gamma",
        type=positive_float,
        default=None,
        help="factor of the step schedule (default: 0.1)",
    )
    g.add_argument("--epochs", type=positive_int, default=d.epochs, help=default[1:])

    g = t.add_argument_group("run")
    _run_arguments(g, d)
    g.add_argument(
        "--out", default=None, help="folder for config.json, metrics.jsonl and cosine.jsonl"
    )
    g.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write the run's metrics (loss, accuracy, per-parameter cosine to "
        "autograd, psi angles, residuals) as a TensorBoard event file in DIR",
    )
    g.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tqdm progress bars (default: when stderr is a terminal)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (saved there after every epoch, "
        "and where a run was stopped inside one); starts afresh when there is none",
    )
    g.add_argument(
        "--time-limit",
        type=positive_float,
        default=None,
        metavar="MINUTES",
        help="stop at the next batch after this many minutes of training, or on SIGTERM / "
        "SIGUSR1 (what SLURM sends before a job's limit), leaving a checkpoint in --out that "
        "--resume continues exactly (default: no limit; the signals stop a run always)",
    )
    g.add_argument(
        "--stop-after-epochs",
        type=positive_int,
        default=None,
        metavar="K",
        help="stop after epoch K of --epochs, with the whole run's schedule and a checkpoint "
        "that --resume continues (default: run every epoch)",
    )
    t.set_defaults(handler=_train, subparser=t)


def _add_compare(commands: argparse._SubParsersAction) -> None:
    c = commands.add_parser(
        "compare",
        help="cosine of AR gradients to autograd's against relaxation step, for several eta",
        description="On one batch of real data (the first training batch of --seed), relax "
        "for --steps literal steps at each eta and record, after every step, the cosine and "
        "angle of each parameter's AR gradient to the autograd gradient (for the variants "
        "too: the reference is always true autograd). Prints a table; with --out writes "
        "compare.png (the paper's figure 1), compare.csv (every step) and compare.json.",
    )
    d = training.TrainConfig()
    g = c.add_argument_group("data")
    _data_arguments(g, d)
    g = c.add_argument_group("model and loss")
    _model_arguments(g, d)
    g = c.add_argument_group("relaxation")
    g.add_argument(
        "--etas",
        type=eta_list,
        default=[0.1, 0.5, 1.0],
        help="comma-separated step sizes in (0, 1] (default: 0.1,0.5,1)",
    )
    g.add_argument(
        "--steps", type=positive_int, default=200, help="relaxation steps per eta" + DEFAULT_HELP
    )
    g.add_argument(
        "--at",
        type=step_counts,
        default=None,
        help="instead of the literal steps 1..--steps, evaluate these step counts in closed "
        "form (one backward each, whatever the count): comma-separated, or 'log' for about "
        "eight counts per factor of ten up to --steps",
    )
    g.add_argument(
        "--recommend",
        type=positive_float,
        nargs="?",
        const=0.999,
        default=None,
        metavar="COSINE",
        help="also find, per eta, the smallest step count at which every parameter's AR "
        "gradient has cosine >= COSINE to autograd's on this batch and a length within "
        "sqrt(2 (1 - COSINE)) of it (4.5%% at the default when given: 0.999)",
    )
    _relax_config_arguments(g, COMPARE_AR_OPTIONS)
    g = c.add_argument_group("run")
    _run_arguments(g, d)
    g.add_argument(
        "--checkpoint",
        default=None,
        metavar="RUN_DIR",
        help="relax on the forward weights of a train --out folder (or its checkpoint.pt) "
        "instead of the initialisation: the step count a trained network needs",
    )
    g.add_argument("--out", default=None, help="folder for compare.png, compare.csv, compare.json")
    c.set_defaults(handler=_compare, subparser=c)


def _add_plot(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plot",
        help="figures from train --out folders: accuracy curves, cosines, final accuracy",
        description="Read one or more 'train --out' folders (or folders holding them) and write "
        "accuracy.png (train/test accuracy against epoch, per method/variant/eta, mean over "
        "seeds), cosine_training.png (cosine of AR gradients to autograd's over training, per "
        "parameter, when measured) and final_accuracy.png (final test accuracy, mean ± std over "
        "seeds). Prints the table of final accuracies.",
    )
    p.add_argument(
        "runs",
        nargs="+",
        type=existing_dir,
        metavar="RUN_DIR",
        help="train --out folders, or folders that hold them",
    )
    p.add_argument("--out", required=True, help="folder for the figures")
    p.add_argument("--prefix", default="", help="prefix for the figure file names")
    p.add_argument("--title", default=None, help="added to the figure titles")
    p.set_defaults(handler=_plot, subparser=p)


# The exit status of a training run stopped with a checkpoint (time limit or
# signal) before its last epoch: not a failure, not finished either.
STOPPED_EXIT_CODE = 3


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
    try:
        history = trainer.fit()
    except training.TrainingDiverged as e:
        # Printed by the trainer and kept in metrics.jsonl; a failed run, not a usage error.
        print(f"error: {e}", file=sys.stderr)
        return 1
    if trainer.out is not None:
        print(f"wrote {trainer.out / 'metrics.jsonl'}")
    if trainer.stopped is not None:
        # Not finished: the caller (a job script, run_experiments.py) resumes it.
        return STOPPED_EXIT_CODE
    last = history[-1]
    print(f"final test accuracy {100 * last['test_acc']:.2f}%")
    return 0


def _compare(args: argparse.Namespace) -> int:
    import torch

    from torch_ar.experiments import compare, plots

    config = training.TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        model=args.model,
        batch_size=args.batch_size,
        loss=args.loss,
        normalize=args.normalize,
        device=args.device,
        seed=args.seed,
        limit_train_batches=1,
        limit_test_batches=1,
        cosine_every=0,
    )
    try:
        trainer = training.Trainer(config)
        trained_epochs = (
            None if args.checkpoint is None else trainer.load_forward_weights(args.checkpoint)
        )
    except (training.ConfigError, FileNotFoundError) as e:
        args.subparser.error(str(e))
    x, y = next(iter(trainer.train_batches))
    options = {
        k: getattr(args, k)
        for k in ("init", "schedule", "granularity", "variant")
        if getattr(args, k) is not None
    }
    at = compare.log_steps(args.steps) if args.at == "log" else args.at
    try:
        traces = compare.relaxation_traces(
            trainer.model,
            trainer.loss_fn,
            x,
            y,
            etas=args.etas,
            steps=args.steps,
            at=at,
            recommend=args.recommend,
            **options,
        )
    except ValueError as e:  # options the engine refuses
        args.subparser.error(str(e))
    traces.settings = {
        "model": args.model,
        "dataset": args.dataset,
        "batch": len(y),
        "loss": args.loss,
        "normalize": args.normalize,
        "seed": args.seed,
        **({} if args.checkpoint is None else {"checkpoint_epoch": trained_epochs}),
        **options,
    }
    print(
        " | ".join(
            [
                f"{args.model} on {args.dataset}",
                f"one batch of {len(y)}",
                f"{args.loss} loss",
                f"device {trainer.device}",
                *([] if args.checkpoint is None else [f"weights after epoch {trained_epochs}"]),
                *(f"{k} {v}" for k, v in options.items()),
            ]
        )
    )
    print(traces.format_table())
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary = traces.to_json()
        summary["versions"] = {"torch": torch.__version__}
        (out / "compare.json").write_text(json.dumps(summary, indent=1) + "\n")
        traces.write_csv(out / "compare.csv")
        plots.plot_relaxation_cosine(traces, out / "compare.png")
        print(f"wrote {out / 'compare.png'}, {out / 'compare.csv'}, {out / 'compare.json'}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from torch_ar.experiments import plots

    try:
        runs = plots.load_runs(args.runs)
    except (ValueError, json.JSONDecodeError, KeyError) as e:
        args.subparser.error(f"cannot read the runs: {e}")
    written = plots.write_training_figures(runs, args.out, prefix=args.prefix, title=args.title)
    print(plots.format_accuracy_table(plots.accuracy_table(runs)))
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.handler(args)

"""``python -m torch_ar train`` end to end on small slices, and its argument errors.

The runs use Fashion-MNIST from the Debian package (skipped, with the reason,
where it is absent) and a tiny CIFAR-style folder written here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cuda_marks, needs_cuda

import torch_ar
from torch_ar.experiments import cli, data, training

FASHION_AVAILABLE = data.FASHION_MNIST_SYSTEM_DIR.is_dir()
needs_fashion = pytest.mark.skipif(
    not FASHION_AVAILABLE,
    reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
EPOCH_LINE = re.compile(
    r"epoch 1/1 \| train loss [\d.]+ acc [\d.]+% \| test loss ([\d.]+) acc ([\d.]+)%"
)
COSINE = re.compile(r"cosine to autograd mean ([\d.]+) min ([\d.]+)")
SMALL = [
    "--limit-train-batches",
    "20",
    "--limit-test-batches",
    "2",
    "--cosine-every",
    "5",
]


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m torch_ar`` in a fresh interpreter on the package under test."""
    package_root = str(Path(torch_ar.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "torch_ar", *args],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------ end to end


@needs_fashion
@pytest.mark.parametrize("method", ["backprop", "ar"])
def test_train_end_to_end(tmp_path: Path, method: str) -> None:
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "mlp",
        "--method",
        method,
        *SMALL,
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    match = EPOCH_LINE.search(result.stdout)
    assert match, result.stdout
    printed_acc = float(match.group(2)) / 100
    assert printed_acc > 0.4  # 20 batches of SGD already beat chance (10%) by far
    assert "final test accuracy" in result.stdout

    (record,) = read_metrics(out)
    assert record["method"] == method and record["train_batches"] == 20
    assert record["test_acc"] == pytest.approx(printed_acc, abs=1e-4)
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["method"] == method
    assert config["config"]["limit_train_batches"] == 20
    assert config["resolved"]["test_examples"] == 10000
    assert config["resolved"]["device"] == "cpu" or torch.cuda.is_available()

    if method == "ar":
        cosine = COSINE.search(result.stdout)
        assert cosine, result.stdout
        assert float(cosine.group(2)) > 0.9999  # eta 1: exact
        assert record["cosine_min"] > 0.9999 and record["cosine_measurements"] == 4
        assert config["resolved"]["ar_config"]["eta"] == 1.0
        lines = (out / "cosine.jsonl").read_text().splitlines()
        assert [json.loads(line)["batch"] for line in lines] == [0, 5, 10, 15]
    else:
        assert "cosine" not in result.stdout and "cosine_mean" not in record
        assert not (out / "cosine.jsonl").exists()


def small_config(**overrides: object) -> training.TrainConfig:
    base: dict = {"limit_train_batches": 10, "limit_test_batches": 1, "device": "cpu"}
    base.update(overrides)
    return training.TrainConfig(**base)


@needs_fashion
def test_ar_at_eta_1_follows_the_backprop_trajectory() -> None:
    backprop = training.train(small_config(method="backprop"))[-1]
    ar = training.train(small_config(method="ar", cosine_every=3))[-1]
    assert ar["cosine_min"] > 0.9999
    assert ar["test_loss"] == pytest.approx(backprop["test_loss"], rel=1e-4)
    assert ar["train_loss"] == pytest.approx(backprop["train_loss"], rel=1e-4)


@needs_fashion
def test_ar_paper_settings_approach_autograd() -> None:
    """eta 0.1, 100 steps (the paper's settings): cosine close to 1, residual small."""
    record = training.train(small_config(method="ar", eta=0.1, steps=100, cosine_every=4))[-1]
    assert record["cosine_mean"] > 0.99
    assert record["ar_steps"] == 100
    assert math.isfinite(record["test_loss"])


@needs_fashion
@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=cuda_marks(),
        ),
    ],
)
def test_cuda_graph_option_reaches_the_engine(device: str) -> None:
    """--cuda-graph: the same training as without it (on a CPU it records nothing)."""
    settings = {"method": "ar", "eta": 0.1, "steps": 20, "limit_train_batches": 3, "device": device}
    plain = training.train(small_config(**settings))[-1]
    graphed = training.train(small_config(cuda_graph=True, **settings))[-1]
    assert training.TrainConfig(cuda_graph=True).ar_options() == {"cuda_graph": True}
    assert graphed["test_loss"] == pytest.approx(plain["test_loss"], rel=1e-5)
    assert cli.build_parser().parse_args(["train", "--cuda-graph"]).cuda_graph is True


@needs_fashion
def test_training_is_deterministic_for_a_seed() -> None:
    def run(seed: int) -> list[dict]:
        history = training.train(small_config(seed=seed, epochs=2, limit_train_batches=5))
        for record in history:
            record.pop("time_s")
        return history

    assert run(3) == run(3)
    assert run(3) != run(4)


@needs_fashion
def test_progress_bars_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    training.train(small_config(progress=True, limit_train_batches=2))
    captured = capsys.readouterr()
    # tqdm's bar (cleared on close, so its last count depends on timing)
    assert "epoch 1/1" in captured.err and "/2 [" in captured.err
    assert "\r" not in captured.out and "/2 [" not in captured.out


def write_tiny_cifar10(root: Path) -> None:
    """A CIFAR-10 JPEG folder with 4 flat images per class and split, sorted by class."""
    from PIL import Image

    for split in ("train", "test"):
        for label, name in enumerate(data.CIFAR10_CLASSES):
            folder = root / data.CIFAR10_JPEG_DIR / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = torch.full((32, 32, 3), 25 * label, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.jpg")


def test_cifar10_cnn_on_a_small_folder(tmp_path: Path) -> None:
    write_tiny_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    env = {data.ENV_CACHE: str(tmp_path / "cache")}
    args = [
        "train",
        "--dataset",
        "cifar10",
        "--data-dir",
        str(tmp_path / "data"),
        "--model",
        "cnn",
        "--method",
        "ar",
        "--batch-size",
        "8",
        "--cosine-every",
        "1",
        "--loss",
        "cross-entropy",
        "--optimizer",
        "adam",
        "--out",
        str(out),
    ]
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        assert cli.main(args) == 0
    (record,) = read_metrics(out)
    assert record["train_batches"] == 5 and record["cosine_measurements"] == 5
    assert record["cosine_min"] > 0.9999
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["augment"] is True  # on by default for CIFAR-10
    assert config["resolved"]["lr"] == training.DEFAULT_LR[("adam", "cross-entropy")]


# ------------------------------------------------------------ bad arguments


def expect_usage_error(capsys: pytest.CaptureFixture[str], args: list[str], *needles: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    # The message comes first, then where the options are; not the usage text
    # (32 lines for train, before the message).
    assert err.splitlines()[0].startswith(f"python -m torch_ar {args[0]}: error: "), err
    assert "usage:" not in err and len(err.splitlines()) <= 8, err
    assert "--help" in err.splitlines()[-1], err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize("command", ["train", "compare", "plot", "selftest"])
def test_help_is_plain_text_from_the_docstrings(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The help is plain text: the flags' is RelaxConfig's docstring without
    Markdown's code marks (it showed `None`, `"forward"`)."""
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "`" not in out
    if command == "train":
        assert "relaxation steps. None: D steps at eta 1" in " ".join(out.split())


BAD_ARGUMENTS = [
    (["--eta", "-1"], ["argument --eta", "must be > 0"]),
    (["--eta", "0"], ["argument --eta", "must be > 0"]),
    (["--steps", "0"], ["argument --steps", "must be >= 1"]),
    (["--batch-size", "abc"], ["argument --batch-size", "expected int"]),
    (["--lr", "-0.1"], ["argument --lr", "must be > 0"]),
    (["--epochs", "0"], ["argument --epochs", "must be >= 1"]),
    (["--cosine-every", "-1"], ["argument --cosine-every", "must be >= 0"]),
    (["--dataset", "mnist"], ["argument --dataset", "invalid choice"]),
    (["--schedule", "random"], ["argument --schedule", "invalid choice"]),
    (
        ["--data-dir", "no/such/folder"],
        ["argument --data-dir", "no/such/folder does not exist"],
    ),
]


@pytest.mark.parametrize(
    ("args", "needles"),
    BAD_ARGUMENTS,
    ids=[" ".join(args) for args, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    expect_usage_error(capsys, ["train", *args], *needles)


def test_engine_rejected_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Checked by the library (one source of truth), reported by the CLI.
    expect_usage_error(capsys, ["train", "--method", "ar", "--eta", "1.5"], "eta must be in (0, 1]")
    expect_usage_error(capsys, ["train", "--method", "ar", "--eta", "0.5"], "give steps")


def test_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    expect_usage_error(capsys, ["train", "--model", "nonsense"], "unknown model 'nonsense'")


def test_missing_data_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    expect_usage_error(
        capsys,
        ["train", "--data-dir", str(tmp_path)],
        "Fashion-MNIST",
        "not found",
        str(tmp_path),
        "apt-get install dataset-fashion-mnist",
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    expect_usage_error(capsys, ["train", "--device", "cuda"], "sees no CUDA device")


@needs_cuda
def test_a_cuda_device_beyond_the_count_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The GPU machine's counterpart of the test above: there --device cuda is
    valid, and a device index past the last GPU is the usage error."""
    count = torch.cuda.device_count()
    expect_usage_error(
        capsys, ["train", "--device", f"cuda:{count}"], f"sees {count} CUDA device(s)"
    )


def test_no_command_and_bad_args_exit_non_zero_in_a_real_process(
    tmp_path: Path,
) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "required: COMMAND" in result.stderr
    result = run_cli("train", "--eta", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --eta: must be > 0, got -1" in result.stderr
    assert result.stdout == ""


# ------------------------------------------------------------ compare


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TABLE_ROW = re.compile(r"^\s+(\d+) \|", re.MULTILINE)


@needs_fashion
def test_compare_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    result = run_cli(
        "compare",
        "--batch-size",
        "16",
        "--etas",
        "0.2,1",
        "--steps",
        "30",
        "--device",
        "cpu",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "depth D = 3" in result.stdout
    assert [int(s) for s in TABLE_ROW.findall(result.stdout)] == [1, 2, 5, 10, 20, 30]
    for name in ("compare.png", "compare.csv", "compare.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC

    summary = json.loads((out / "compare.json").read_text())
    assert summary["etas"] == [0.2, 1.0] and summary["steps"] == 30 and summary["depth"] == 3
    names = summary["parameters"]
    assert names == [
        "1.weight",
        "1.bias",
        "3.weight",
        "3.bias",
        "5.weight",
        "5.bias",
        "7.weight",
        "7.bias",
    ]
    exact = summary["by_step"]["1"]
    assert exact["30"]["cosine_min"] > 0.9999  # eta 1: exact after D = 3 steps
    assert exact["1"]["cosine_min"] < 0.9  # forward-value initial states are far from it
    slow = summary["by_step"]["0.2"]
    assert slow["30"]["cosine_mean"] > slow["1"]["cosine_mean"]
    first = slow["1"]["parameters"]["1.weight"]
    assert first["angle_deg"] == pytest.approx(math.degrees(math.acos(first["cosine"])))
    # The gradients the backward returned are the last traced step.
    for eta in ("0.2", "1"):
        for name in names:
            assert summary["final_gradient_cosine"][eta][name] == pytest.approx(
                summary["by_step"][eta]["30"]["parameters"][name]["cosine"], abs=1e-5
            )
    rows = (out / "compare.csv").read_text().splitlines()
    assert rows[0] == "eta,step,parameter,cosine,angle_deg"
    assert len(rows) == 1 + 2 * 30 * len(names)


@needs_fashion
def test_compare_variant_is_measured_against_autograd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "fa"
    args = [
        "compare",
        "--batch-size",
        "8",
        "--etas",
        "1",
        "--steps",
        "4",
        "--device",
        "cpu",
        "--variant",
        "feedback_alignment",
        "--out",
        str(out),
    ]
    assert cli.main(args) == 0
    assert "variant feedback_alignment" in capsys.readouterr().out
    summary = json.loads((out / "compare.json").read_text())
    assert summary["settings"]["variant"] == "feedback_alignment"
    last = summary["by_step"]["1"]["4"]["parameters"]
    assert last["7.weight"]["cosine"] > 0.9999  # output layer: the loss gradient itself
    assert last["1.weight"]["cosine"] < 0.9  # random feedback: far from the true gradient


BAD_COMPARE_ARGUMENTS = [
    (["--etas", "0,1"], ["argument --etas", "each eta must be in (0, 1], got 0"]),
    (["--etas", "0.5,1.5"], ["argument --etas", "each eta must be in (0, 1], got 1.5"]),
    (["--etas", "0.1,x"], ["argument --etas", "expected comma-separated numbers, got 'x'"]),
    (["--etas", "0.5,0.5"], ["argument --etas", "eta 0.5 is listed twice"]),
    (["--steps", "0"], ["argument --steps", "must be >= 1"]),
    (["--variant", "nope"], ["argument --variant", "invalid choice"]),
    (["--init", "random"], ["argument --init", "invalid choice"]),
    (["--model", "nonsense"], ["unknown model 'nonsense'"]),
]


@pytest.mark.parametrize(
    ("args", "needles"),
    BAD_COMPARE_ARGUMENTS,
    ids=[" ".join(args) for args, _ in BAD_COMPARE_ARGUMENTS],
)
def test_bad_compare_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    expect_usage_error(capsys, ["compare", *args], *needles)


# ------------------------------------------------------------ plot


def tiny_runs(root: Path) -> dict[str, Path]:
    """Backprop (seed 0) and exact AR (seeds 0, 1): 2 epochs of 6 batches each."""
    runs = {}
    for name, method, seed in (("bp-s0", "backprop", 0), ("ar-s0", "ar", 0), ("ar-s1", "ar", 1)):
        runs[name] = root / name
        config = small_config(
            method=method,
            seed=seed,
            epochs=2,
            limit_train_batches=6,
            cosine_every=2,
            out=str(runs[name]),
        )
        with open(os.devnull, "w") as quiet:
            training.train(config, stream=quiet)
    return runs


@needs_fashion
def test_training_logs_per_parameter_cosines(tmp_path: Path) -> None:
    out = tmp_path / "ar"
    training.train(small_config(method="ar", limit_train_batches=4, cosine_every=2, out=str(out)))
    (record,) = read_metrics(out)
    names = ["1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias", "7.weight", "7.bias"]
    assert list(record["param_cosine_mean"]) == names
    assert min(record["param_cosine_min"].values()) == pytest.approx(record["cosine_min"])
    lines = [json.loads(line) for line in (out / "cosine.jsonl").read_text().splitlines()]
    assert [m["batch"] for m in lines] == [0, 2]
    assert all(list(m["param_cosines"]) == names for m in lines)
    assert all(c > 0.9999 for m in lines for c in m["param_cosines"].values())


@needs_fashion
def test_plot_end_to_end(tmp_path: Path) -> None:
    tiny_runs(tmp_path / "runs")
    figures = tmp_path / "figures"
    result = run_cli(
        "plot", str(tmp_path / "runs"), "--out", str(figures), "--prefix", "t_", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    for name in ("t_accuracy.png", "t_cosine_training.png", "t_final_accuracy.png"):
        assert (figures / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"wrote {figures / name}" in result.stdout
    rows = {
        line.split("|")[1].strip(): line
        for line in result.stdout.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert set(rows) == {"run", "backprop", "AR eta 1"}
    assert rows["AR eta 1"].split("|")[2].strip() == "2"  # two seeds in one row
    assert rows["backprop"].split("|")[3].strip() == "2"  # epochs


@needs_fashion
def test_plot_tables_group_seeds(tmp_path: Path) -> None:
    from torch_ar.experiments import plots

    runs = plots.load_runs(tiny_runs(tmp_path).values())
    table = {row["label"]: row for row in plots.accuracy_table(runs)}
    assert table["AR eta 1"]["seeds"] == [0, 1] and table["backprop"]["seeds"] == [0]
    ar = [r for r in runs if r.label == "AR eta 1"]
    accs = [r.final["test_acc"] for r in ar]
    assert table["AR eta 1"]["test_acc_mean"] == pytest.approx(sum(accs) / 2)
    assert table["AR eta 1"]["cosine_min"] > 0.9999
    # Same seed, exact AR: the backprop trajectory.
    bp = next(r for r in runs if r.label == "backprop")
    assert ar[0].final["test_acc"] == pytest.approx(bp.final["test_acc"], abs=1e-3)


@needs_fashion
def test_diverged_training_is_logged_and_plotted(tmp_path: Path) -> None:
    out = tmp_path / "diverged"
    result = run_cli(
        "train",
        "--method",
        "ar",
        "--lr",
        "1",
        "--limit-train-batches",
        "30",
        "--limit-test-batches",
        "1",
        "--cosine-every",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged at epoch 1, batch" in result.stderr
    (record,) = read_metrics(out)
    assert record["diverged"] is True and record["epoch"] == 1
    assert 0 < record["diverged_batch"] < 30 and record["epoch_batches"] == 30

    result = run_cli("plot", str(out), "--out", str(tmp_path / "figures"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "diverged: seed 0 at epoch 1 batch" in result.stdout
    assert (tmp_path / "figures" / "final_accuracy.png").is_file()


BAD_PLOT_ARGUMENTS = [
    ([], ["the following arguments are required: RUN_DIR"]),
    (["no/such/run", "--out", "figs"], ["argument RUN_DIR", "no/such/run does not exist"]),
]


@pytest.mark.parametrize(
    ("args", "needles"),
    BAD_PLOT_ARGUMENTS,
    ids=[" ".join(args) or "no runs" for args, _ in BAD_PLOT_ARGUMENTS],
)
def test_bad_plot_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    expect_usage_error(capsys, ["plot", *args], *needles)


def test_plot_needs_out_and_runs_in_the_folders(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    expect_usage_error(
        capsys, ["plot", str(tmp_path)], "the following arguments are required: --out"
    )
    (tmp_path / "empty").mkdir()
    expect_usage_error(
        capsys,
        ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "figs")],
        "cannot read the runs",
        "holds no training run",
    )
    assert not (tmp_path / "figs").exists()


def test_limited_test_batches_sample_every_class(tmp_path: Path) -> None:
    """A class-sorted test set: the limited test set is a random sample, not the first class."""
    write_tiny_cifar10(tmp_path / "data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.ENV_CACHE, str(tmp_path / "cache"))
        trainer = training.Trainer(
            training.TrainConfig(
                dataset="cifar10",
                data_dir=str(tmp_path / "data"),
                model="cnn",
                device="cpu",
                test_batch_size=10,
                limit_test_batches=2,
            )
        )
        again = training.Trainer(
            training.TrainConfig(
                dataset="cifar10",
                data_dir=str(tmp_path / "data"),
                model="cnn",
                device="cpu",
                test_batch_size=10,
                limit_test_batches=2,
                seed=5,
            )
        )
    labels = torch.cat([y for _, y in trainer.test_batches])
    assert len(labels) == 20 and len(set(labels.tolist())) > 3
    assert torch.equal(labels, torch.cat([y for _, y in again.test_batches]))  # any seed


@needs_fashion
def test_tensorboard_event_file_holds_the_recorded_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, board = tmp_path / "run", tmp_path / "board"
    result = run_cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "mlp",
        "--method",
        "ar",
        "--variant",
        "feedback_alignment",
        "--epochs",
        "2",
        "--limit-train-batches",
        "4",
        "--limit-test-batches",
        "1",
        "--cosine-every",
        "2",
        "--out",
        str(out),
        "--tensorboard",
        str(board),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(board))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> list[tuple[int, float]]:
        return [(e.step, e.value) for e in events.Scalars(tag)]

    records = read_metrics(out)
    for key, tag in (("train_loss", "train/loss"), ("test_acc", "test/accuracy")):
        expected = [(r["epoch"], r[key]) for r in records]
        assert [s for s, _ in series(tag)] == [1, 2]
        assert [v for _, v in series(tag)] == pytest.approx([v for _, v in expected], rel=1e-6)
    measurements = [json.loads(line) for line in (out / "cosine.jsonl").read_text().splitlines()]
    steps = [(m["epoch"] - 1) * 4 + m["batch"] for m in measurements]
    assert steps == [0, 2, 4, 6]
    assert [s for s, _ in series("cosine/mean")] == steps
    assert [v for _, v in series("cosine/mean")] == pytest.approx(
        [m["cosine_mean"] for m in measurements], rel=1e-6
    )
    for name in measurements[0]["param_cosines"]:
        assert f"cosine/{name}" in tags
    angles = measurements[-1]["psi_angles"]
    assert angles, "feedback alignment has backward weights"
    for name, value in angles.items():
        assert series(f"psi_angle/{name}")[-1] == (6, pytest.approx(value, rel=1e-6))
    assert "relaxation/steps" in tags and "lr" in tags

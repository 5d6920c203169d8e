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

import torch_ar
from torch_ar import cli, data, training

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


def test_cifar10_cnn_on_a_small_folder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for label, name in enumerate(data.CIFAR10_CLASSES):
            folder = tmp_path / "data" / data.CIFAR10_JPEG_DIR / split / name
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = torch.full((32, 32, 3), 25 * label, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i:04d}.jpg")
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
    assert "usage:" in err
    for needle in needles:
        assert needle in err, err


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


def test_no_command_and_bad_args_exit_non_zero_in_a_real_process(
    tmp_path: Path,
) -> None:
    result = run_cli(cwd=tmp_path)
    assert result.returncode == 2 and "required: COMMAND" in result.stderr
    result = run_cli("train", "--eta", "-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "argument --eta: must be > 0, got -1" in result.stderr
    assert result.stdout == ""

"""The experiment harness: input preprocessing, resumable runs, step recommendation,
closed-form comparisons and backward-weight angles, on real data where it matters.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_cli import needs_fashion, read_metrics, run_cli
from zoo import paper_mlp

import torch_ar
from torch_ar.experiments import compare, plots, training
from torch_ar.experiments.compare import log_steps, recommend_steps, relaxation_traces
from torch_ar.metrics import cosine

TINY = ["--limit-train-batches", "6", "--limit-test-batches", "1", "--cosine-every", "2"]


@needs_fashion
@pytest.mark.parametrize("normalize", ["none", "standard"])
def test_normalize_changes_the_inputs_as_documented(normalize: str) -> None:
    trainer = training.Trainer(
        training.TrainConfig(
            dataset="fashion-mnist", normalize=normalize, limit_train_batches=40, batch_size=256
        )
    )
    x = torch.cat([xb for xb, _ in trainer.train_batches])
    if normalize == "none":  # raw [0, 1] pixels, as the paper's code
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert abs(float(x.mean()) - 0.286) < 0.01
        assert abs(float(x.std()) - 0.353) < 0.01
    else:  # the training set's mean and std
        assert abs(float(x.mean())) < 0.02
        assert abs(float(x.std()) - 1.0) < 0.02


def test_normalize_is_checked() -> None:
    with pytest.raises(training.ConfigError, match="normalize"):
        training.Trainer(training.TrainConfig(normalize="unit"))


@needs_fashion
def test_resumed_run_continues_the_same_trajectory(tmp_path: Path) -> None:
    """Two epochs in one go, and one epoch then a resumed second: the same metrics."""
    common = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--normalize",
        "none",
        "--model",
        "mlp",
        "--method",
        "ar",
        "--eta",
        "0.1",
        "--steps",
        "50",
        "--schedule",
        "sweep",
        "--variant",
        "learned_backward_weights",
        *TINY,
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*common, "--epochs", "2", "--out", str(straight), cwd=tmp_path).returncode == 0
    assert run_cli(*common, "--epochs", "1", "--out", str(split), cwd=tmp_path).returncode == 0
    resumed = run_cli(*common, "--epochs", "2", "--resume", "--out", str(split), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after epoch 1" in resumed.stdout
    a, b = read_metrics(straight), read_metrics(split)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train_loss", "test_loss", "cosine_mean"):
            assert ra[key] == rb[key], key
        assert ra["psi_angle"] == rb["psi_angle"]
    cosine_lines = (split / "cosine.jsonl").read_text().splitlines()
    assert len(cosine_lines) == len((straight / "cosine.jsonl").read_text().splitlines())
    # Other settings refuse to resume this run.
    changed = [("60" if a == "50" else a) for a in common]  # --steps 60
    other = run_cli(*changed, "--epochs", "3", "--resume", "--out", str(split), cwd=tmp_path)
    assert other.returncode != 0 and "other settings" in other.stderr


@needs_fashion
def test_psi_angles_and_decay_are_logged(tmp_path: Path) -> None:
    out = tmp_path / "kp"
    result = run_cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--normalize",
        "none",
        "--model",
        "mlp",
        "--method",
        "ar",
        "--eta",
        "0.1",
        "--steps",
        "100",
        "--schedule",
        "sweep",
        "--variant",
        "learned_backward_weights",
        "--backward-weight-decay",
        "0.01",
        *TINY,
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["ar_config"]["backward_weight_decay"] == 0.01
    assert config["resolved"]["normalize"] == "none"
    assert config["resolved"]["ar_config"]["schedule"] == "sweep"
    angles = read_metrics(out)[0]["psi_angle"]
    assert set(angles) == {"1.weight", "3.weight", "5.weight", "7.weight"}
    assert all(60.0 < a < 120.0 for a in angles.values())  # random psi, nearly orthogonal

    # The summary's angle table and figure read them back.
    run = plots.load_run(out)
    table = plots.psi_angle_table([run])
    assert table is not None and run.label in table
    assert f"{angles['7.weight']:.1f}" in table
    figure = plots.plot_psi_angles([run], tmp_path / "angles.png")
    assert figure is not None and figure.stat().st_size > 0


@needs_fashion
def test_backward_weight_init_is_a_recorded_choice(tmp_path: Path) -> None:
    out = tmp_path / "fa"
    result = run_cli(
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "cnn",
        "--method",
        "ar",
        "--eta",
        "0.1",
        "--steps",
        "30",
        "--variant",
        "feedback_alignment",
        "--backward-weight-init",
        "matched",
        *TINY,
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    assert config["config"]["backward_weight_init"] == "matched"
    assert config["resolved"]["ar_config"]["backward_weight_init"] == "matched"
    assert "psi matched" in plots.load_run(out).label
    bad = run_cli("train", "--backward-weight-init", "kaiming", cwd=tmp_path)
    assert bad.returncode == 2 and "--backward-weight-init" in bad.stderr


@needs_fashion
def test_resume_accepts_a_checkpoint_from_before_a_new_setting(tmp_path: Path) -> None:
    """A setting added later is absent from older checkpoints; at its default it still resumes."""
    common = [
        "train",
        "--dataset",
        "fashion-mnist",
        "--model",
        "mlp",
        "--method",
        "ar",
        "--variant",
        "feedback_alignment",
        *TINY,
        "--out",
        str(tmp_path / "run"),
    ]
    assert run_cli(*common, "--epochs", "1", cwd=tmp_path).returncode == 0
    checkpoint = tmp_path / "run" / training.Trainer.CHECKPOINT
    state = torch.load(checkpoint, weights_only=False)
    for key in ("backward_weight_init", "backward_weight_std"):
        del state["config"][key]
    torch.save(state, checkpoint)
    resumed = run_cli(*common, "--epochs", "2", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after epoch 1" in resumed.stdout
    other = run_cli(
        *common, "--epochs", "3", "--resume", "--backward-weight-init", "matched", cwd=tmp_path
    )
    assert other.returncode != 0 and "backward_weight_init" in other.stderr


def test_diverged_run_reports_its_epoch_and_last_accuracy(tmp_path: Path) -> None:
    folder = tmp_path / "fa"
    folder.mkdir()
    config = {"method": "ar", "eta": 0.1, "steps": 100, "variant": "feedback_alignment", "seed": 3}
    (folder / "config.json").write_text(json.dumps({"config": config, "resolved": {}}))
    records = [
        {"epoch": 1, "train_batches": 10, "train_acc": 0.7, "test_acc": 0.7612, "time_s": 1.0},
        {"epoch": 2, "train_batches": 10, "train_acc": 0.8, "test_acc": 0.8034, "time_s": 1.0},
        {
            "epoch": 3,
            "diverged": True,
            "diverged_batch": 7,
            "error": "training loss became inf",
            "train_batches": 7,
            "epoch_batches": 10,
            "train_acc": 0.5,
            "time_s": 0.5,
        },
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run = plots.load_run(folder)
    assert plots.psi_angle_table([run]) is None  # no angles logged
    table = plots.format_accuracy_table(plots.accuracy_table([run]))
    assert "diverged: seed 3 at epoch 3 batch 7, 80.34% after epoch 2" in table


def _write_run(folder: Path, seed: int, test_accs: list[float]) -> None:
    folder.mkdir()
    config = {"method": "backprop", "seed": seed}
    (folder / "config.json").write_text(json.dumps({"config": config, "resolved": {}}))
    records = [
        {"epoch": e + 1, "train_batches": 10, "train_acc": 0.5, "test_acc": acc, "time_s": 1.0}
        for e, acc in enumerate(test_accs)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_accuracy_table_averages_the_last_epochs_per_run_then_over_seeds(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", 0, [0.1, 0.5, 0.6, 0.7, 0.5])  # last 3: 0.6
    _write_run(tmp_path / "b", 1, [0.1, 0.2, 0.8, 0.8, 0.8])  # last 3: 0.8
    runs = [plots.load_run(tmp_path / "a"), plots.load_run(tmp_path / "b")]
    (row,) = plots.accuracy_table(runs)
    assert row["test_acc_mean"] == pytest.approx(0.65)  # final epochs 0.5 and 0.8
    assert row["last_test_acc_mean"] == pytest.approx(0.7)
    assert row["last_test_acc_std"] == pytest.approx(0.1 * 2**0.5)
    assert "| 65.00 ± 21.21 | 70.00 ± 14.14 |" in plots.format_accuracy_table([row])


def test_accuracy_table_leaves_the_last_epochs_blank_for_short_runs(tmp_path: Path) -> None:
    _write_run(tmp_path / "a", 0, [0.4, 0.5])
    (row,) = plots.accuracy_table([plots.load_run(tmp_path / "a")])
    assert math.isnan(row["last_test_acc_mean"])
    assert "| 50.00 ± 0.00 | — |" in plots.format_accuracy_table([row])


def _mlp_problem():
    torch.manual_seed(0)
    model = paper_mlp().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(16, 784, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (16,), generator=gen)
    loss = training.make_loss("mse", 10)
    return model, loss, x, y


def test_recommended_steps_is_the_first_count_meeting_the_threshold() -> None:
    model, loss, x, y = _mlp_problem()
    steps, cosines = recommend_steps(model, loss, x, y, eta=0.5, threshold=0.9999)
    assert steps is not None and steps > 3
    assert min(cosines.values()) >= 0.9999
    # One step fewer misses it (the search bisects down to the first count).
    before = relaxation_traces(model, loss, x, y, etas=[0.5], at=[steps - 1, steps])
    assert min(before.value(0.5, n, steps - 1) for n in before.parameters) < 0.9999
    assert min(before.value(0.5, n, steps) for n in before.parameters) >= 0.9999
    # At eta 1 the Jacobi relaxation is exact after D = 3 steps.
    exact, _ = recommend_steps(model, loss, x, y, eta=1.0, threshold=0.999999)
    assert exact is not None and exact <= 3


def test_recommendation_not_reached_within_max_steps() -> None:
    model, loss, x, y = _mlp_problem()
    steps, cosines = recommend_steps(model, loss, x, y, eta=0.01, threshold=0.9999, max_steps=8)
    assert steps is None and min(cosines.values()) < 0.9999


def test_closed_form_traces_equal_literal_traces() -> None:
    """compare --at (closed form per count) gives the literal trace's values."""
    model, loss, x, y = _mlp_problem()
    literal = relaxation_traces(model, loss, x, y, etas=[0.3], steps=40)
    closed = relaxation_traces(model, loss, x, y, etas=[0.3], at=[1, 2, 5, 17, 40])
    assert closed.evaluation == "closed_form" and closed.recorded == [1, 2, 5, 17, 40]
    for name in literal.parameters:
        for step in closed.recorded:
            assert abs(closed.value(0.3, name, step) - literal.value(0.3, name, step)) < 1e-9


def test_log_steps_grid() -> None:
    grid = log_steps(1000)
    assert grid[0] == 1 and grid[-1] == 1000
    assert {2, 5, 10, 20, 50, 100, 200, 500} <= set(grid)
    assert grid == sorted(set(grid)) and 20 <= len(grid) <= 40


@needs_fashion
def test_compare_closed_form_and_recommend_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    result = run_cli(
        "compare",
        "--dataset",
        "fashion-mnist",
        "--normalize",
        "none",
        "--model",
        "mlp",
        "--etas",
        "0.1,0.5",
        "--steps",
        "300",
        "--at",
        "log",
        "--init",
        "zero",
        "--recommend",
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "recommended steps" in result.stdout
    summary = json.loads((out / "compare.json").read_text())
    assert summary["evaluation"] == "closed_form"
    assert summary["recorded_steps"] == compare.log_steps(300)
    assert summary["settings"]["normalize"] == "none" and summary["settings"]["init"] == "zero"
    recommended = summary["recommended_steps"]
    assert recommended["0.5"] is not None and recommended["0.5"] <= recommended["0.1"]
    assert (out / "compare.png").stat().st_size > 0


def test_experiment_plan_matches_the_paper_settings() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import run_experiments

    jobs = run_experiments.plan(_plan_args())
    fashion = [j for j in jobs if j.group == "fashion-mnist"]
    assert len(fashion) == 7 * 3
    for job in fashion:
        cmd = job.command
        assert cmd[cmd.index("--normalize") + 1] == "none"
        assert cmd[cmd.index("--epochs") + 1] == "30"
        if cmd[cmd.index("--method") + 1] == "ar":
            assert cmd[cmd.index("--eta") + 1] == "0.1" and cmd[cmd.index("--steps") + 1] == "100"
            expected = "jacobi" if "ar-jacobi" in job.name else "sweep"
            assert cmd[cmd.index("--schedule") + 1] == expected
    cifar = [j for j in jobs if j.group == "cifar10-cnn"]
    assert {j.name for j in cifar} >= {
        "cifar10-cnn-backprop-s2",
        "cifar10-cnn-ar-eta0.1-steps252-s2",
        "cifar10-cnn-ar-learned_backward_weights-kp-s0",
    }
    assert all("--augment" in j.command for j in cifar)
    assert all(j.command[j.command.index("--lr") + 1] == "0.05" for j in cifar)
    # The rows that diverge at lr 0.05 again at 0.01, with their references at 0.01 too.
    lower = {j.name: j for j in jobs if j.group == "cifar10-cnn-lr0.01"}
    rows = (
        "backprop",
        "ar-eta0.1-steps252",
        "ar-feedback_alignment",
        "ar-no_nonlinear_derivative",
        "ar-combined",
    )
    matched = ("ar-feedback_alignment-psi_matched", "ar-combined-psi_matched")
    assert set(lower) == {f"cifar10-cnn-lr0.01-{row}-s0" for row in (*rows, *matched)} | {
        "cifar10-cnn-lr0.01-backprop-s1",
        "cifar10-cnn-lr0.01-ar-eta0.1-steps252-s1",
    }
    for job in lower.values():
        cmd = job.command
        assert cmd[cmd.index("--lr") + 1] == "0.01"
        name = job.name.replace("-lr0.01", "").replace("-psi_matched", "")
        same = next(j for j in cifar if j.name == name)
        if "psi_matched" in job.name:
            at = cmd.index("--backward-weight-init")
            assert cmd[at + 1] == "matched"
            cmd = cmd[:at] + cmd[at + 2 :]
        # Otherwise the very command of the lr 0.05 row.
        assert [a for a in cmd if a != "0.01"] == [a for a in same.command if a != "0.05"]
    # Feedback alignment at BioTorch's rate for it, with backprop beside it.
    fa_rate = {j.name: j for j in jobs if j.group == "cifar10-cnn-lr0.001"}
    assert set(fa_rate) == {
        "cifar10-cnn-lr0.001-backprop-s0",
        "cifar10-cnn-lr0.001-ar-feedback_alignment-psi_matched-s0",
    }
    for job in fa_rate.values():
        cmd = job.command
        assert cmd[cmd.index("--lr") + 1] == "0.001"
        same = lower[job.name.replace("-lr0.001", "-lr0.01")]
        assert [a for a in cmd if a != "0.001"] == [a for a in same.command if a != "0.01"]


def _plan_args():
    import argparse

    return argparse.Namespace(
        only=["fashion", "cifar", "compare"],
        seeds=[0, 1, 2],
        epochs=30,
        cifar_epochs=10,
        cifar_seeds=[0, 1, 2],
        cifar_steps=252,
        cifar_lower_lrs=[0.01],
        cifar_lower_lr_seeds=[0, 1],
        cifar_fa_lr=[0.001],
        vit_steps=499,
    )


def test_recommendation_with_a_mean_loss_and_zero_init() -> None:
    """The options reach the relaxation: zero initial states, a batch-mean loss. From
    zero states a chain's layers get scaled copies of their gradients (cosine 1 from
    step D on), so the recommendation waits until their lengths match as well."""
    model, _, x, y = _mlp_problem()
    steps, _ = recommend_steps(model, F.cross_entropy, x, y, eta=0.5, threshold=0.999, init="zero")
    assert steps is not None
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))

    def gradients(t: int) -> tuple[torch.Tensor, ...]:
        ar = torch_ar.ARBackward(model, eta=0.5, steps=t, init="zero")
        return torch.autograd.grad(F.cross_entropy(ar(x), y), list(model.parameters()))

    def matches(t: int) -> tuple[bool, bool]:
        got = gradients(t)
        direction = all(cosine(g, r) >= 0.999 for g, r in zip(got, reference, strict=True))
        length = all(
            abs(g.norm() / r.norm() - 1) <= math.sqrt(2 * 0.001)
            for g, r in zip(got, reference, strict=True)
        )
        return direction, length

    assert matches(steps) == (True, True)
    assert matches(steps - 1) != (True, True)
    # The cosine alone is satisfied long before: after D = 3 steps.
    assert matches(3)[0] and not matches(3)[1]
    assert steps > 3


def test_cifar_stability_curvature_is_the_output_layers_hessian_eigenvalue() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import cifar_stability

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 4)
    ).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (9,))
    w, b = net[-1].weight.detach(), net[-1].bias.detach()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        logits = net[:-1](x) @ flat[:28].view(4, 7).t() + flat[28:]
        return F.cross_entropy(logits, y)

    hessian = torch.autograd.functional.hessian(loss, torch.cat([w.flatten(), b]))
    expected = torch.linalg.eigvalsh(hessian).max().item()
    got = cifar_stability.output_layer_curvature(net, x, iterations=300)
    assert got == pytest.approx(expected, rel=1e-8)
    # A saturated softmax has no curvature left.
    with torch.no_grad():
        net[-1].weight.mul_(1e6)
    assert cifar_stability.output_layer_curvature(net, x) == pytest.approx(0.0, abs=1e-12)


def test_fa_stability_is_the_output_layers_largest_curvature_times_lr() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import fa_stability

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    ).double()
    images = torch.randint(0, 256, (8, 1, 2, 2), dtype=torch.uint8)
    got = fa_stability.stability(net, images, batch=4, lr=0.1, mean=None, std=None)
    expected = 0.0
    for start in (0, 4):
        h = net[:-1](images[start : start + 4].double() / 255.0)
        h1 = torch.cat([h, torch.ones(4, 1, dtype=h.dtype)], dim=1)
        expected = max(expected, 0.1 * torch.linalg.eigvalsh(2 * h1.T @ h1).max().item())
    assert got["lr_times_lambda_max"] == pytest.approx(expected, rel=1e-10)
    assert got["output_weight_norm"] == pytest.approx(net[-1].weight.norm().item())


def test_every_vit_parameter_has_a_layer_type() -> None:
    """The ViT table's cosines by layer type cover every parameter of the zoo's ViT."""
    from torch_ar.experiments.models import build_model

    vit = build_model("vit", "cifar10")
    kinds = {n: plots.layer_type(n) for n, _ in vit.named_parameters()}
    assert "other" not in kinds.values(), [n for n, k in kinds.items() if k == "other"]
    assert kinds["blocks.0.attention.in_proj_weight"] == "attention projections"
    assert kinds["blocks.0.attention.out_proj.weight"] == "attention projections"
    assert kinds["blocks.0.mlp.0.weight"] == "MLP"
    assert kinds["head.weight"] == "head"


def test_cosines_by_layer_type_are_the_means_of_their_parameters(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    config = {"method": "ar", "eta": 1.0, "variant": "sign_symmetry", "seed": 0, "epochs": 1}
    (folder / "config.json").write_text(json.dumps(config))
    epoch = {"epoch": 1, "test_acc": 0.5, "train_acc": 0.5, "train_loss": 1.0, "time_s": 1.0}
    (folder / "metrics.jsonl").write_text(json.dumps({**epoch, "train_batches": 4}) + "\n")
    cosines = [
        {"epoch": 1, "batch": b, "cosine_mean": 0.5, "cosine_min": 0.1, "param_cosines": p}
        for b, p in (
            (0, {"a.attention.w": 0.2, "a.attention.v": 0.4, "a.mlp.0.w": 0.9, "head.w": 1.0}),
            (2, {"a.attention.w": 0.4, "a.attention.v": 0.6, "a.mlp.0.w": 0.7, "head.w": 1.0}),
        )
    ]
    (folder / "cosine.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cosines))
    run = plots.load_run(folder)
    table = plots.cosine_by_type_table([run])
    assert table is not None
    row = table.splitlines()[-1]
    assert row.endswith("| 0.400 | 0.800 | 1.000 |"), table  # attention, MLP, head
    figure = plots.plot_cosine_by_type([run], tmp_path / "by_type.png")
    assert figure is not None and figure.stat().st_size > 0


@needs_fashion
@pytest.mark.parametrize("method", [{"method": "backprop"}, {"method": "ar", "eta": 1.0}])
def test_compare_relaxes_on_a_checkpoints_weights(tmp_path: Path, method: dict) -> None:
    # A trained network's weights, from a backprop run and from an AR run
    # (whose checkpoint holds the wrapper, "module." before every name).
    small = {"dataset": "fashion-mnist", "model": "mlp", "batch_size": 32, "device": "cpu"}
    run = tmp_path / "run"
    trained = training.Trainer(
        training.TrainConfig(
            **small,
            **method,
            epochs=1,
            limit_train_batches=20,
            limit_test_batches=1,
            cosine_every=0,
            seed=1,
            out=str(run),
        )
    )
    trained.fit()
    fresh = training.Trainer(training.TrainConfig(**small, seed=2))
    before = [p.detach().clone() for p in fresh.model.parameters()]
    assert fresh.load_forward_weights(run) == 1
    for got, want, init in zip(
        fresh.model.parameters(), trained.model.parameters(), before, strict=True
    ):
        assert torch.equal(got, want) and not torch.equal(got, init)

    result = run_cli(
        "compare", "--dataset", "fashion-mnist", "--model", "mlp", "--etas", "0.5",
        "--steps", "40", "--at", "10,40", "--checkpoint", str(run), "--out", str(tmp_path / "c"),
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "weights after epoch 1" in result.stdout
    summary = json.loads((tmp_path / "c" / "compare.json").read_text())
    assert summary["settings"]["checkpoint_epoch"] == 1

    with pytest.raises(training.ConfigError, match="does not fit --model cnn"):
        training.Trainer(training.TrainConfig(**{**small, "model": "cnn"})).load_forward_weights(
            run
        )
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fresh.load_forward_weights(tmp_path / "nowhere")

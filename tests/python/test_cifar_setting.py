"""The CIFAR-10 setting of the field: the CIFAR ResNets, the learning-rate
schedules, weight decay that spares the backward weights, Nesterov momentum
and the validation split."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torch_ar.experiments import data, models, training

FASHION = pytest.mark.skipif(
    not data.FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed in {data.FASHION_MNIST_SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)


# --------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name, parameters",
    [
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet44", 658_586),
        ("resnet56", 853_018),
    ],
)
def test_cifar_resnet_parameter_counts(name: str, parameters: int) -> None:
    """He et al. (2016) table 6: 0.27M, 0.46M, 0.66M, 0.85M."""
    model = models.build_model(name, "cifar10")
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_resnet20_structure() -> None:
    model = models.build_model("resnet20", "cifar10")
    blocks = list(model.layers)
    assert len(blocks) == 9
    assert [b.conv1.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.conv1.stride[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 and all(c.bias is None for c in convs)  # + 1 linear = 20 layers
    shortcuts = [b.shortcut for b in blocks if not isinstance(b.shortcut, nn.Identity)]
    assert len(shortcuts) == 2 and all(isinstance(s, models.ZeroPadShortcut) for s in shortcuts)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    # Option A: the strided input, zero in the new channels.
    s = shortcuts[0]
    y = s(torch.ones(1, 16, 8, 8))
    assert y.shape == (1, 32, 4, 4)
    assert y[:, 8:24].eq(1).all() and y[:, :8].eq(0).all() and y[:, 24:].eq(0).all()


def test_option_b_shortcuts() -> None:
    model = models.build_model("resnet20", "cifar10", shortcut="B")
    # Two 1x1 convolutions with their BatchNorm: 16*32 + 64 + 32*64 + 128.
    assert sum(p.numel() for p in model.parameters()) == 269_722 + 512 + 64 + 2048 + 128
    with pytest.raises(ValueError, match="6n \\+ 2"):
        models.CifarResNet(depth=21)


@pytest.mark.skipif(
    importlib.util.find_spec("biotorch") is None,
    reason="biotorch not installed (pip install biotorch==0.0.16, a benchmark-only peer)",
)
def test_resnet20_matches_biotorch() -> None:
    from biotorch.models.small_resnet import resnet20 as biotorch_resnet20  # type: ignore

    ours = models.build_model("resnet20", "cifar10")
    theirs = biotorch_resnet20(num_classes=10)
    shapes = lambda m: [tuple(p.shape) for p in m.parameters()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)


@pytest.mark.skipif(
    importlib.util.find_spec("biotorch") is None,
    reason="biotorch not installed (pip install biotorch==0.0.16, a benchmark-only peer)",
)
def test_biotorch_models_train_under_the_trainer() -> None:
    model = models.build_model("biotorch-fa-resnet20", "cifar10")
    x = torch.randn(2, 3, 32, 32)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    convs = [m for m in model.modules() if hasattr(m, "weight_backward")]
    assert len(convs) == 20  # every conv and the linear layer feed back through their own B


def test_biotorch_model_names_are_checked() -> None:
    with pytest.raises(ValueError, match="biotorch-<mode>-<arch>"):
        models.build_model("biotorch-xx-resnet20", "cifar10")


def test_exact_ar_equals_autograd_on_resnet20(torch_ar) -> None:
    torch.manual_seed(0)
    model = models.build_model("resnet20", "cifar10").double()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 3, 5, 9])
    F.cross_entropy(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ar = torch_ar.ARBackward(model)
    F.cross_entropy(ar(x), y).backward()
    scale = torch.cat([w.flatten() for w in want]).norm()
    for p, w in zip(model.parameters(), want):
        assert (p.grad - w).norm() <= 1e-10 * scale


# ------------------------------------------------------------- schedule


def config(**kw) -> training.TrainConfig:
    base = {"dataset": "cifar10", "loss": "cross-entropy", "lr": 0.1, "epochs": 10}
    base.update(kw)
    return training.TrainConfig(**base)


def test_constant_rate_without_a_schedule() -> None:
    c = config()
    assert {c.lr_at(b, 100) for b in range(1000)} == {0.1}


def test_cosine_schedule_with_warmup() -> None:
    c = config(lr_schedule="cosine", warmup_epochs=1)
    rates = [c.lr_at(b, 100) for b in range(1000)]
    assert rates[0] == pytest.approx(0.001) and rates[99] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(rates[:99], rates[1:100]))  # linear warm-up
    assert rates[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(rates[100:], rates[101:]))  # then down
    mid = 100 + 450
    assert rates[mid] == pytest.approx(0.05)
    assert rates[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 899 / 900)))


def test_step_schedule() -> None:
    c = config(lr_schedule="step")  # milestones 5 and 7 of 10 epochs
    assert c.lr_at(499, 100) == pytest.approx(0.1)
    assert c.lr_at(500, 100) == pytest.approx(0.01)
    assert c.lr_at(700, 100) == pytest.approx(0.001)
    c = config(lr_schedule="step", lr_milestones=(2,), lr_gamma=0.5)
    assert c.lr_at(199, 100) == 0.1 and c.lr_at(200, 100) == 0.05


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"warmup_epochs": 10}, "warmup_epochs"),
        ({"nesterov": True}, "nesterov"),
        ({"val_split": -1}, "val_split"),
    ],
)
def test_bad_settings_are_refused(bad, match) -> None:
    with pytest.raises(training.ConfigError, match=match):
        training.Trainer._check(config(**bad))


# ------------------------------------------- optimizer and validation split


@FASHION
@pytest.mark.parametrize("decay_psi", [False, True])
def test_weight_decay_spares_backward_weights(decay_psi: bool) -> None:
    c = training.TrainConfig(
        dataset="fashion-mnist",
        model="mlp",
        method="ar",
        variant="learned_backward_weights",
        weight_decay=0.1,
        weight_decay_backward_weights=decay_psi or None,
        momentum=0.9,
        nesterov=True,
        limit_train_batches=1,
        limit_test_batches=1,
        cosine_every=0,
    )
    trainer = training.Trainer(c)
    groups = trainer.optimizer.param_groups
    model_params = {id(p) for p in trainer.model.parameters()}
    forward, backward = groups
    assert {id(p) for p in forward["params"]} == model_params
    assert backward["params"] and not any(id(p) in model_params for p in backward["params"])
    assert forward["weight_decay"] == 0.1
    assert backward["weight_decay"] == (0.1 if decay_psi else 0.0)
    assert all(g["nesterov"] for g in groups)


@FASHION
def test_validation_split_is_held_out_of_training() -> None:
    base = {
        "dataset": "fashion-mnist",
        "model": "mlp",
        "val_split": 5000,
        "test_batch_size": 1000,
        "limit_test_batches": 1,
        "cosine_every": 0,
    }
    a = training.Trainer(training.TrainConfig(seed=0, **base))
    b = training.Trainer(training.TrainConfig(seed=1, **base))
    n = len(a.dataset.train_labels)
    assert len(a.train_batches.images) == n - 5000 and len(a.val_batches.images) == 5000
    # The same sample for every seed, and no training image in it.
    assert torch.equal(a.val_batches.images, b.val_batches.images)
    train = {bytes(img.numpy()) for img in a.train_batches.images[:20000]}
    assert not any(bytes(img.numpy()) in train for img in a.val_batches.images[:500])
    result = a.evaluate()
    assert set(result) == {"test_loss", "test_acc", "val_loss", "val_acc"}


@FASHION
def test_evaluation_uses_running_batch_norm_statistics() -> None:
    """eval mode: the test batch's own statistics must not enter the prediction."""
    c = training.TrainConfig(
        dataset="fashion-mnist",
        model="mlp",
        limit_test_batches=1,
        test_batch_size=10,
        cosine_every=0,
    )
    trainer = training.Trainer(c)
    trainer.model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.BatchNorm1d(10))
    seen = []
    trainer.model[2].register_forward_hook(lambda m, i, o: seen.append(m.training))
    trainer.evaluate()
    assert seen == [False] and trainer.model.training

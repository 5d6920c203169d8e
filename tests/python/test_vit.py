"""The experiment zoo's Vision Transformer (torch_ar/experiments/vit.py) and
the trainer's AdamW and label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo import load_torch_ar, rel_err

from torch_ar.experiments.models import build_model
from torch_ar.experiments.training import ConfigError, TrainConfig, Trainer, make_loss


@pytest.mark.parametrize("name", ["vit", "vit-mean"])
def test_vit_shapes_and_size(name):
    torch.manual_seed(0)
    vit = build_model(name, "cifar10")
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # patch 4, width 96, depth 6, MLP 192: 0.46M parameters (the class token adds 96).
    expected = 460906 if name == "vit" else 460906 - 96 - 96
    assert sum(p.numel() for p in vit.parameters()) == expected


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="exact"),
        pytest.param({"eta": 0.5, "steps": 150}, id="closed_form"),
    ],
)
def test_ar_on_the_vit_equals_autograd(settings, dtype):
    torch_ar = load_torch_ar()
    torch.manual_seed(0)
    vit = build_model("vit", "cifar10", width=32, depth=2, heads=2).to(dtype)
    x, y = torch.randn(4, 3, 32, 32, dtype=dtype), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(vit(x), y).backward()
    expected = {n: p.grad.clone() for n, p in vit.named_parameters()}
    vit.zero_grad(set_to_none=True)
    F.cross_entropy(torch_ar.ARBackward(vit, **settings)(x), y).backward()
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    total = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, want in expected.items():
        err = float((vit.get_parameter(name).grad - want).norm()) / max(
            float(want.norm()), 1e-8 * float(total)
        )
        assert err <= tol, (name, err)


def test_every_vit_projection_gets_a_backward_weight():
    torch_ar = load_torch_ar()
    vit = build_model("vit", "cifar10", width=32, depth=2, heads=2)
    ar = torch_ar.ARBackward(vit, variant="feedback_alignment")
    names = set(ar.backward_weights())
    for block in range(2):
        assert f"blocks.{block}.attention.in_proj_weight" in names
        assert f"blocks.{block}.attention.out_proj.weight" in names
        assert f"blocks.{block}.mlp.0.weight" in names
    assert {"patch_embedding.weight", "head.weight"} <= names


def test_label_smoothing_is_cross_entropys():
    out, y = torch.randn(5, 10), torch.randint(0, 10, (5,))
    loss = make_loss("cross-entropy", 10, label_smoothing=0.1)
    assert rel_err(loss(out, y), F.cross_entropy(out, y, label_smoothing=0.1)) == 0.0
    with pytest.raises(ConfigError, match="cross-entropy"):
        make_loss("mse", 10, label_smoothing=0.1)


def test_adamw_decays_forward_weights_only():
    config = TrainConfig(
        dataset="fashion-mnist",
        model="mlp",
        method="ar",
        variant="learned_backward_weights",
        optimizer="adamw",
        weight_decay=0.05,
        epochs=1,
        limit_train_batches=1,
        limit_test_batches=1,
        device="cpu",
    )
    opt = Trainer(config).optimizer
    assert isinstance(opt, torch.optim.AdamW)
    decays = [g["weight_decay"] for g in opt.param_groups]
    assert decays == [0.05, 0.0]

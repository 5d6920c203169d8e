"""The wrapper copies, pickles and saves whole like any nn.Module: a copy has
its own psi and its own engine settings, trains, and gives the original's
gradients on the same batch. Before, copy.deepcopy, pickle, torch.save and
AveragedModel raised "cannot pickle 'torch_ar._C.EngineConfig' object"."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from zoo import load_torch_ar

SETTINGS = [
    pytest.param({}, id="exact"),
    pytest.param({"eta": 0.5, "steps": 40}, id="closed_form"),
    pytest.param({"variant": "feedback_alignment"}, id="feedback_alignment"),
    pytest.param({"variant": "learned_backward_weights"}, id="learned_backward_weights"),
]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    ).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0])


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    x, y = _batch()
    nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _round_trips(ar: nn.Module) -> dict[str, nn.Module]:
    buffer = io.BytesIO()
    torch.save(ar, buffer)
    buffer.seek(0)
    return {
        "deepcopy": copy.deepcopy(ar),
        "pickle": pickle.loads(pickle.dumps(ar)),
        "torch.save": torch.load(buffer, weights_only=False),
        "inside a module": copy.deepcopy(nn.Sequential(ar))[0],
    }


@pytest.mark.parametrize("settings", SETTINGS)
def test_copies_give_the_same_gradients_and_are_independent(settings):
    torch_ar = load_torch_ar()
    ar = torch_ar.ARBackward(_net(), **settings)
    _grads(ar)  # a backward first: the copy must not carry its engine object
    expected = _grads(ar)
    for how, twin in _round_trips(ar).items():
        assert isinstance(twin, torch_ar.ARBackward), how
        got = _grads(twin)
        assert got.keys() == expected.keys(), how
        for name in expected:
            assert torch.equal(got[name], expected[name]), (how, name)
        for name, psi in twin.backward_weights().items():
            original = ar.backward_weights()[name]
            assert psi.data_ptr() != original.data_ptr(), (how, name)
            assert torch.equal(psi, original), (how, name)
        assert twin.last_stats is not None
        # The copy trains on its own.
        before = {n: p.detach().clone() for n, p in ar.named_parameters()}
        opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        _grads(twin)
        opt.step()
        for n, p in ar.named_parameters():
            assert torch.equal(p, before[n]), (how, n)


def test_averaged_model_averages_psi_too():
    torch_ar = load_torch_ar()
    ar = torch_ar.ARBackward(_net(), variant="learned_backward_weights")
    ema = AveragedModel(ar, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    swa = AveragedModel(ar)
    opt = torch.optim.SGD(ar.parameters(), lr=0.1)
    psi_before = {n: p.detach().clone() for n, p in ar.backward_weights().items()}
    _grads(ar)
    opt.step()
    ema.update_parameters(ar)
    swa.update_parameters(ar)
    for name, psi in ar.backward_weights().items():
        assert not torch.equal(psi, psi_before[name]), name
        averaged = ema.module.backward_weights()[name]
        # The first update copies; a second one averages with decay 0.5.
        assert torch.equal(averaged, psi.detach())
    _grads(ar)
    opt.step()
    ema.update_parameters(ar)
    swa.update_parameters(ar)
    for name in ar.backward_weights():
        first = swa.module.backward_weights()[name]
        assert torch.allclose(ema.module.backward_weights()[name], first)
    # The averaged wrapper relaxes and gives finite gradients.
    assert all(torch.isfinite(g).all() for g in _grads(ema.module).values())


def _train_in_child(rank: int, ar: nn.Module, out: str) -> None:
    grads = _grads(ar)
    torch.save(grads, out)


def test_spawned_process_receives_a_wrapped_model(tmp_path):
    torch_ar = load_torch_ar()
    ar = torch_ar.ARBackward(_net(), variant="feedback_alignment")
    expected = _grads(ar)
    out = tmp_path / "grads.pt"
    mp.spawn(_train_in_child, args=(ar, str(out)), nprocs=1, join=True)
    got = torch.load(out)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


PSI_VARIANTS = [
    "learned_backward_weights",
    "feedback_alignment",
    "combined",
    "sign_symmetry",
    "sign_symmetry_fixed_random",
    "sign_symmetry_batch_random",
]


@pytest.mark.parametrize("variant", PSI_VARIANTS)
def test_state_dict_reload_restores_every_variants_backward_weights(variant):
    """A wrapper made afresh (another seed, so other draws) and loaded from a
    trained wrapper's state_dict holds the same psi (fixed FA psi, frSF's
    magnitudes, learned psi after a step) and gives the same gradients."""
    torch_ar = load_torch_ar()
    ar = torch_ar.ARBackward(_net(), variant=variant, backward_weight_init="normal")
    opt = torch.optim.SGD(ar.parameters(), lr=0.1)
    torch.manual_seed(3)
    _grads(ar)
    opt.step()
    state = copy.deepcopy(ar.state_dict())
    assert any(k.startswith("backward_weight_store.") for k in state)
    if variant == "sign_symmetry_fixed_random":
        assert any(k.startswith("backward_weight_magnitude.") for k in state)
    net = _net()
    torch.manual_seed(99)  # other draws of psi (and of frSF's magnitudes)
    fresh = torch_ar.ARBackward(net, variant=variant, backward_weight_init="normal")
    drawn = [k for k in state if k.startswith("backward_weight_")]
    if variant in ("sign_symmetry", "sign_symmetry_batch_random"):
        drawn = []  # psi is remade from W (and, for brSF, a fresh draw) at every backward
    for key in drawn:
        assert not torch.equal(fresh.state_dict()[key], state[key]), f"{key} drawn alike"
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    torch.manual_seed(5)  # brSF's per-backward draw
    want = _grads(ar)
    torch.manual_seed(5)
    got = _grads(fresh)
    assert want.keys() == got.keys()
    for name, g in want.items():
        assert torch.equal(got[name], g), name

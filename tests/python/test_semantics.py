"""ARBackward behaves like autograd everywhere outside the gradient values.

Accumulation into ``.grad``, ``retain_graph``, ``zero_grad``, frozen
parameters, ``no_grad`` inference, optimizer steps, unchanged forward outputs
and determinism.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn
from zoo import (
    CASES,
    Case,
    assert_grads_match,
    assert_outputs_equal,
    make_batch,
    make_model,
    rel_err,
    seeded_forward,
)


@dataclass
class Setup:
    """A zoo case wrapped in ARBackward, its autograd twin and one batch."""

    case: Case
    model: nn.Module
    ref: nn.Module
    ar: nn.Module
    args: tuple
    kwargs: dict
    target: Any

    def loss(self, module: nn.Module) -> torch.Tensor:
        """The case's loss of ``module`` on the batch, under the fixed forward seed."""
        return self.case.loss(seeded_forward(module, self.args, self.kwargs), self.target)

    def grad_pairs(self) -> dict:
        return _grad_pairs(self.model, self.ref)


def _wrapped_and_reference(case_name, device, dtype, torch_ar, **ar_kwargs) -> Setup:
    case = CASES[case_name]
    model = make_model(case, device, dtype)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **ar_kwargs)
    args, kwargs, target = make_batch(case, device, dtype)
    return Setup(case, model, ref, ar, args, kwargs, target)


def _grad_pairs(model, ref):
    return {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    return [t for o in obj for t in _tensors(o)]


@pytest.mark.parametrize("case_name", ["paper_mlp_mse", "small_cnn", "shared_weight"])
def test_grad_accumulates_over_two_backwards(case_name, device, dtype, torch_ar):
    s = _wrapped_and_reference(case_name, device, dtype, torch_ar)
    for _ in range(2):
        s.loss(s.ar).backward()
    s.loss(s.ref).backward()
    pairs = {n: (a, 2 * b) for n, (a, b) in s.grad_pairs().items()}
    assert_grads_match(pairs, dtype)


def test_accumulates_onto_existing_grad(device, torch_ar):
    """A .grad that is already there (from anywhere) is added to, not replaced."""
    s = _wrapped_and_reference("cat_residual", device, torch.float64, torch_ar)
    for p in s.model.parameters():
        p.grad = torch.full_like(p, 0.25)
    s.loss(s.ar).backward()
    s.loss(s.ref).backward()
    pairs = {n: (a - 0.25, b) for n, (a, b) in s.grad_pairs().items()}
    assert_grads_match(pairs, torch.float64)


@pytest.mark.parametrize("eta_steps", [{}, {"eta": 0.5, "steps": 60}], ids=["exact", "eta0.5"])
def test_retain_graph_allows_second_backward(device, dtype, torch_ar, eta_steps):
    s = _wrapped_and_reference("paper_mlp_mse", device, dtype, torch_ar, **eta_steps)
    loss = s.loss(s.ar)
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in s.model.named_parameters()}
    s.ar.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    for n, p in s.model.named_parameters():
        assert torch.equal(p.grad, first[n]), f"{n}: second backward differs"
    loss.backward()
    for n, p in s.model.named_parameters():
        assert rel_err(p.grad, 2 * first[n]) <= (1e-12 if dtype == torch.float64 else 1e-6)


def test_zero_grad_set_to_none(device, dtype, torch_ar):
    s = _wrapped_and_reference("small_cnn", device, dtype, torch_ar)
    s.loss(s.ar).backward()
    assert all(p.grad is not None for p in s.model.parameters())
    s.ar.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in s.model.parameters())
    s.loss(s.ar).backward()
    s.loss(s.ref).backward()
    assert_grads_match(s.grad_pairs(), dtype)


def test_zero_grad_to_zeros_then_accumulate(device, torch_ar):
    s = _wrapped_and_reference("paper_mlp_mse", device, torch.float64, torch_ar)
    s.loss(s.ar).backward()
    s.ar.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in s.model.parameters())
    s.loss(s.ar).backward()
    s.loss(s.ref).backward()
    assert_grads_match(s.grad_pairs(), torch.float64)


@pytest.mark.parametrize("case_name", ["paper_mlp_mse", "cat_residual", "small_cnn"])
def test_frozen_parameters_get_no_grad(case_name, device, dtype, torch_ar):
    case = CASES[case_name]
    model = make_model(case, device, dtype)
    first = next(model.parameters())
    first.requires_grad_(False)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    args, _, target = make_batch(case, device, dtype)
    case.loss(ar(*args), target).backward()
    case.loss(ref(*args), target).backward()
    assert first.grad is None
    pairs = {n: v for n, v in _grad_pairs(model, ref).items() if v[1] is not None}
    assert len(pairs) == sum(1 for p in model.parameters() if p.requires_grad)
    assert_grads_match(pairs, dtype)


def test_frozen_middle_layer_still_passes_gradient(device, torch_ar):
    """A frozen layer has no .grad but the layers under it still learn correctly."""
    case = CASES["paper_mlp_mse"]
    model = make_model(case, device, torch.float64)
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, eta=0.5, steps=80)
    args, _, target = make_batch(case, device, torch.float64)
    case.loss(ar(*args), target).backward()
    case.loss(ref(*args), target).backward()
    assert model[2].weight.grad is None and model[2].bias.grad is None
    assert model[0].weight.grad is not None
    assert rel_err(model[0].weight.grad, ref[0].weight.grad) <= 1e-6


@pytest.mark.parametrize(
    "case_name", ["paper_mlp_mse", "two_outputs", "dict_outputs", "batchnorm_eval"]
)
def test_no_grad_inference_same_output(case_name, device, dtype, torch_ar):
    s = _wrapped_and_reference(case_name, device, dtype, torch_ar)
    with torch.no_grad():
        out = s.ar(*s.args, **s.kwargs)
        expected = s.ref(*s.args, **s.kwargs)
    assert_outputs_equal(out, expected)
    assert all(not t.requires_grad for t in _tensors(out))


def test_inference_mode_same_output(device, torch_ar):
    s = _wrapped_and_reference("small_cnn", device, torch.float32, torch_ar)
    with torch.inference_mode():
        assert_outputs_equal(s.ar(*s.args), s.ref(*s.args))


@pytest.mark.parametrize(
    "case_name",
    [
        "paper_mlp_mse",
        "small_cnn",
        "two_outputs",
        "dict_outputs",
        "functional_attention",
        "control_flow",
    ],
)
def test_forward_output_is_bit_identical(case_name, device, dtype, torch_ar):
    s = _wrapped_and_reference(case_name, device, dtype, torch_ar)
    assert_outputs_equal(s.ar(*s.args, **s.kwargs), s.ref(*s.args, **s.kwargs))


@pytest.mark.parametrize("case_name", ["paper_mlp_mse", "batchnorm_train"])
def test_optimizer_step_equals_autograd_step(case_name, device, torch_ar):
    s = _wrapped_and_reference(case_name, device, torch.float64, torch_ar)
    opt_ar = torch.optim.SGD(s.ar.parameters(), lr=0.05, momentum=0.9)
    opt_ref = torch.optim.SGD(s.ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        args, _, target = make_batch(s.case, device, torch.float64, seed=step)
        for module, opt in [(s.ar, opt_ar), (s.ref, opt_ref)]:
            opt.zero_grad(set_to_none=True)
            s.case.loss(module(*args), target).backward()
            opt.step()
    for (n, p), q in zip(s.model.named_parameters(), s.ref.parameters()):
        assert rel_err(p, q) <= 1e-10, f"{n} diverged from the autograd-trained copy"


def test_adam_and_clip_grad_norm_work(device, torch_ar):
    """AR grads are ordinary .grad tensors: clipping and Adam see them unchanged."""
    s = _wrapped_and_reference("small_cnn", device, torch.float64, torch_ar)
    opt_ar = torch.optim.Adam(s.ar.parameters(), 1e-3)
    opt_ref = torch.optim.Adam(s.ref.parameters(), 1e-3)
    for module, opt in [(s.ar, opt_ar), (s.ref, opt_ref)]:
        s.loss(module).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        opt.step()
    for p, q in zip(s.model.parameters(), s.ref.parameters()):
        assert rel_err(p, q) <= 1e-10


@pytest.mark.parametrize(
    ("case_name", "ar_kwargs"),
    [
        ("paper_mlp_mse", {}),
        ("paper_mlp_mse", {"eta": 0.1, "steps": 50}),
        ("small_cnn", {"eta": 0.5, "steps": 20, "schedule": "sweep"}),
        ("dropout_seeded", {}),
    ],
)
def test_deterministic_gradients(case_name, ar_kwargs, device, dtype, torch_ar, monkeypatch):
    if device == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    runs = []
    for _ in range(2):
        s = _wrapped_and_reference(case_name, device, dtype, torch_ar, **ar_kwargs)
        s.loss(s.ar).backward()
        runs.append([p.grad.clone() for p in s.model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two identical runs gave different gradients"


def test_stats_refresh_on_each_backward(device, torch_ar):
    s = _wrapped_and_reference("paper_mlp_mse", device, torch.float64, torch_ar, eta=0.5, steps=7)
    s.loss(s.ar).backward()
    first = s.ar.last_stats
    assert first.steps == 7
    (2.0 * s.loss(s.ar)).backward()
    assert s.ar.last_stats is not first
    assert s.ar.last_stats.steps == 7


def test_module_state_dict_round_trip(torch_ar):
    """Wrapping adds no parameters or buffers of its own beyond the module's."""
    case = CASES["batchnorm_train"]
    model = make_model(case, "cpu", torch.float32)
    ar = torch_ar.ARBackward(model)
    assert {k.removeprefix("module.") for k in ar.state_dict()} == set(model.state_dict())
    ar.module.load_state_dict(copy.deepcopy(model.state_dict()))


@needs_cuda
def test_cuda_and_cpu_agree():
    from zoo import ar_vs_autograd

    cpu = ar_vs_autograd(CASES["small_cnn"], "cpu", torch.float64)
    gpu = ar_vs_autograd(CASES["small_cnn"], "cuda", torch.float64)
    for k in cpu.pairs:
        assert rel_err(gpu.pairs[k][0].cpu(), cpu.pairs[k][0]) <= 1e-9


def test_loss_with_mixed_dtypes_cast_like_autograd(device, torch_ar):
    """The output is float32, the loss is computed in float64: grads come back float32."""
    case = CASES["paper_mlp_mse"]
    model = make_model(case, device, torch.float32)
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model)
    (x,), _, target = make_batch(case, device, torch.float32)
    F.mse_loss(ar(x).double(), target.double()).backward()
    F.mse_loss(ref(x).double(), target.double()).backward()
    pairs = {n: (p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref.parameters())}
    assert_grads_match(pairs, torch.float32)

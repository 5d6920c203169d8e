"""torch_ar.metrics: the angle is accurate where acos(cosine) is not, a
random state replays dropout without disturbing the generators, and the
reference gradient leaves buffers and .grad alone; ar_vs_autograd is built
on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ar
from torch_ar.metrics import (
    RandomState,
    angle_degrees,
    angle_from_cosine,
    ar_vs_autograd,
    gradients_at,
)


def test_angle_is_accurate_near_zero_and_half_turn() -> None:
    torch.manual_seed(0)
    a = torch.randn(10_000, dtype=torch.float64)
    assert angle_degrees(a, a.clone()) == 0.0
    assert angle_degrees(a, -a) == 180.0
    # Rotate a by theta within the plane of a and an orthogonal direction.
    u = a / a.norm()
    w = torch.randn_like(a)
    w = w - (w @ u) * u
    w = w / w.norm()
    for theta in (1e-9, 1e-6, 1e-3, 0.5, 2.0):
        b = math.cos(theta) * u + math.sin(theta) * w
        assert angle_degrees(a, 3.0 * b) == pytest.approx(math.degrees(theta), rel=1e-6)
    # acos of the cosine is blind below about 1e-6 degrees: the angle is not.
    tiny = math.cos(1e-9) * u + math.sin(1e-9) * w
    assert angle_from_cosine(torch_ar.metrics.cosine(a, tiny)) < 1e-5
    assert angle_degrees(a, tiny) == pytest.approx(math.degrees(1e-9), rel=1e-6)
    zero = torch.zeros(3)
    assert angle_degrees(zero, zero) == 0.0
    assert angle_degrees(zero, torch.ones(3)) == 90.0
    assert angle_from_cosine(0.5) == pytest.approx(60.0)


def test_random_state_replays_dropout_and_leaves_the_generator_alone() -> None:
    torch.manual_seed(0)
    x = torch.ones(1000)
    state = RandomState()
    first = F.dropout(x, 0.5)
    after_first = torch.get_rng_state()
    with state.replay():
        again = F.dropout(x, 0.5)
    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), after_first)


class DropoutBatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(torch.relu(self.bn(self.conv(x))), 0.3, self.training)
        return self.head(h.flatten(1))


def _problem(dtype: torch.dtype = torch.float64):
    torch.manual_seed(0)
    net = DropoutBatchNormNet().to(dtype)
    x = torch.randn(8, 3, 6, 6, dtype=dtype)
    y = torch.randint(0, 5, (8,))
    return net, x, y


def test_gradients_at_replays_the_step_and_restores_buffers(
    device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bitwise equality of two conv backwards needs cuDNN's deterministic algorithms.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    net, x, y = _problem()
    net, x, y = net.to(device), x.to(device), y.to(device)
    params = list(net.parameters())
    state = RandomState([device])
    expected = torch.autograd.grad(F.cross_entropy(net(x), y), params)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    got = gradients_at(net, lambda out: F.cross_entropy(out, y), (x,), params, state)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)  # the same dropout mask, the same arithmetic
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(p.grad is None for p in params)
    # Without the state the mask differs, and so does the gradient.
    other = gradients_at(net, lambda out: F.cross_entropy(out, y), (x,), params)
    assert not torch.equal(other[0], expected[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_ar_vs_autograd_is_exact_at_eta_1_and_leaves_buffers(dtype: torch.dtype) -> None:
    net, x, y = _problem(dtype)
    ar = torch_ar.ARBackward(net)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    report = ar_vs_autograd(ar, lambda out: F.cross_entropy(out, y), x)
    assert set(report) == {n for n, _ in net.named_parameters()}
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    # The conv bias before train-mode BatchNorm has a zero exact gradient:
    # every other parameter is compared by its own relative error.
    for name, r in report.items():
        if name != "conv.bias":
            assert r["rel_err"] < tol, (name, r)
            assert r["angle"] < (1e-6 if dtype == torch.float64 else 0.05), (name, r)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    # A variant is measured against true autograd: far from it at random psi.
    fa = torch_ar.ARBackward(net, variant="feedback_alignment")
    fa_report = ar_vs_autograd(fa, lambda out: F.cross_entropy(out, y), x)
    assert fa_report["conv.weight"]["cosine"] < 0.9
    assert fa_report["head.weight"]["rel_err"] < tol  # the output layer's is exact

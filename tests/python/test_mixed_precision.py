"""ARBackward under CPU autocast (bfloat16) and with a GradScaler.

- Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` the exact AR
  gradients stay within a cosine of 0.999 per parameter of autograd's under
  the same autocast (the engine replays the same bfloat16 ops, so in practice
  they agree far more closely), and AR training on a small MLP and CNN lowers
  the loss. The literal steps at eta 0.1 are held to the same bound: the
  states of bfloat16 activations relax in float32.
- GradScaler: an overflow (the loss times inf) must make ``scaler.step`` skip
  the update and ``scaler.update`` back off the scale, exactly as with
  autograd. A relaxation that raised ``RelaxationDivergedError`` on the inf
  state would abort that flow instead, so under autocast the default
  (``nonfinite="auto"``) lets NaN/Inf through to the gradients;
  ``nonfinite="raise"`` keeps the exception, and the test shows it escaping
  ``backward`` where the scaler never gets to see the gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_cuda
from torch import nn
from zoo import cosine

import torch_ar

BF16_MIN_COSINE = 0.999

pytestmark = pytest.mark.skipif(
    not hasattr(torch.amp, "GradScaler"),
    reason="torch.amp.GradScaler is missing in this torch build",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: threads only add OpenMP start-up, and on a loaded machine
    spinning threads make every op many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 5)
    )


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (_mlp, (32, 20)),
    "cnn": (_cnn, (16, 3, 8, 8)),
}


def _data(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen)
    y = torch.randint(0, 5, (shape[0],), generator=gen)
    return x, y


def _autocast_loss(module: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
        loss = F.cross_entropy(out, y) * scale
    return out, loss


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({}, id="exact"),
        # The states of bfloat16 activations relax in float32 (a bfloat16
        # state would round small increments away and stall).
        pytest.param({"eta": 0.1, "steps": 500}, id="eta0.1_steps500"),
    ],
)
@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_gradients_match_autograd_under_autocast(name, ar_kwargs, torch_ar):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **ar_kwargs)
    x, y = _data(shape)
    ar_out, ar_loss = _autocast_loss(ar, x, y)
    ref_out, ref_loss = _autocast_loss(ref, x, y)
    assert ar_out.dtype == ref_out.dtype == torch.bfloat16
    assert torch.equal(ar_out, ref_out), "autocast forward output changed by ARBackward"
    ar_loss.backward()
    ref_loss.backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{n}: no AR gradient"
        assert p.grad.dtype == q.grad.dtype == torch.float32, (
            f"{n}: gradient dtype {p.grad.dtype}, autograd {q.grad.dtype}"
        )
        assert torch.isfinite(p.grad).all(), f"{n}: non-finite AR gradient"
        if not ar_kwargs:
            # The exact sweep runs autograd's own VJPs on the same bfloat16
            # values: bit for bit, not merely close.
            assert torch.equal(p.grad, q.grad), f"{n}: exact sweep under autocast"
            continue
        c = cosine(p.grad, q.grad)
        assert c >= BF16_MIN_COSINE, f"{n}: cosine {c:.6f} to autograd under autocast"


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_control_for_the_literal_steps(name, torch_ar):
    """The same eta 0.1 / 500 steps without autocast: converged, so the bfloat16 gap
    above is precision, not too few steps."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, eta=0.1, steps=500)
    x, y = _data(shape)
    F.cross_entropy(ar(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        c = cosine(p.grad, q.grad)
        assert c >= 0.99999, f"{n}: float32 cosine {c:.6f} after 500 steps"


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_training_lowers_the_loss(name, torch_ar):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    ar = torch_ar.ARBackward(build())
    opt = torch.optim.SGD(ar.parameters(), lr=0.1, momentum=0.9)
    x, y = _data(shape)
    losses = []
    for _ in range(20):
        opt.zero_grad(set_to_none=True)
        _, loss = _autocast_loss(ar, x, y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall enough: {losses}"


# --------------------------------------------------------------------------
# GradScaler: an overflow skips the step, as with autograd
# --------------------------------------------------------------------------


def _scaled_steps(module, params, x, y, scales, ar_kwargs=None):
    """One optimizer step per loss multiplier; returns params and scale after each."""
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    history = []
    for scale in scales:
        opt.zero_grad(set_to_none=True)
        _, loss = _autocast_loss(module, x, y, scale)
        scaler.scale(loss).backward()
        grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None)
        scaler.step(opt)
        scaler.update()
        history.append(
            (
                [p.detach().clone() for p in params],
                scaler.get_scale(),
                grads_finite,
            )
        )
    return history


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({}, id="exact_default"),
        pytest.param({"schedule": "sweep"}, id="sweep"),
        pytest.param({"eta": 0.5, "steps": 20}, id="eta0.5_steps20"),
    ],
)
def test_grad_scaler_skips_overflow_step_like_autograd(ar_kwargs, torch_ar):
    torch.manual_seed(0)
    model = _mlp()
    ref = copy.deepcopy(model)
    ar = torch_ar.ARBackward(model, **ar_kwargs)
    x, y = _data((32, 20))
    start = [p.detach().clone() for p in model.parameters()]
    # Step 1 overflows (the loss times inf); step 2 is finite.
    scales = [math.inf, 1.0]
    ar_hist = _scaled_steps(ar, list(model.parameters()), x, y, scales)
    ref_hist = _scaled_steps(ref, list(ref.parameters()), x, y, scales)

    (ar_p1, ar_s1, ar_finite1), (ar_p2, ar_s2, ar_finite2) = ar_hist
    (_, ref_s1, ref_finite1), (ref_p2, ref_s2, _) = ref_hist
    assert not ref_finite1, "autograd should give non-finite gradients for loss * inf"
    assert not ar_finite1, (
        "AR gave finite gradients for an infinite loss: the step would not be skipped"
    )
    assert all(torch.equal(a, b) for a, b in zip(ar_p1, start)), (
        "the overflow step was not skipped: parameters changed"
    )
    assert ar_s1 == ref_s1 == 2.0**7, f"scale after overflow: AR {ar_s1}, autograd {ref_s1}"
    # The next, finite step runs normally and matches autograd's.
    assert ar_finite2
    assert ar_s2 == ref_s2
    for i, (a, b, s) in enumerate(zip(ar_p2, ref_p2, start)):
        assert not torch.equal(a, s), f"parameter {i} did not move on the finite step"
        c = cosine(a - s, b - s)
        assert c >= BF16_MIN_COSINE, f"parameter {i}: update cosine {c:.6f} to autograd's"


def test_grad_scaler_overflow_without_autocast_with_propagate(torch_ar):
    """Outside autocast the default raises; nonfinite="propagate" gives the scaler its inf."""
    torch.manual_seed(0)
    model = _mlp()
    ar = torch_ar.ARBackward(model, nonfinite="propagate")
    x, y = _data((32, 20))
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    loss = F.cross_entropy(ar(x), y) * math.inf
    scaler.scale(loss).backward()
    assert any(not torch.isfinite(p.grad).all() for p in model.parameters())
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), start))
    assert scaler.get_scale() == 2.0**7


@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no_autocast"])
def test_raise_mode_aborts_the_scaler_flow(autocast, torch_ar):
    """With nonfinite="raise" (the default outside autocast) the overflow is an exception
    out of backward: the scaler never sees the gradients and the step is not taken."""
    torch.manual_seed(0)
    model = _mlp()
    kwargs = {"nonfinite": "raise"} if autocast else {}
    ar = torch_ar.ARBackward(model, **kwargs)
    x, y = _data((32, 20))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(ar(x), y) * math.inf
    with pytest.raises(torch_ar.NonFiniteValueError, match=r"loss gradient of output 0") as info:
        scaler.scale(loss).backward()
    assert info.value.node == "output 0" and info.value.step == 0
    assert all(p.grad is None for p in model.parameters()), "half-done gradients written"


@pytest.mark.parametrize(
    "ar_kwargs",
    [
        pytest.param({}, id="exact_default"),
        pytest.param({"schedule": "sweep"}, id="sweep"),
        pytest.param({"eta": 0.5, "steps": 20}, id="eta0.5_steps20"),
    ],
)
def test_propagated_overflow_is_reported_in_stats(ar_kwargs, torch_ar):
    torch.manual_seed(0)
    ar = torch_ar.ARBackward(_mlp(), nonfinite="propagate", **ar_kwargs)
    x, y = _data((32, 20))
    (F.cross_entropy(ar(x), y) * math.inf).backward()
    assert any(not torch.isfinite(p.grad).all() for p in ar.parameters())
    assert ar.last_stats.nonfinite, "NaN/Inf reached the gradients but stats say finite"


# --------------------------------------------------------------------------
# CUDA: float16/bfloat16 autocast with a GradScaler (run by gpu_check.sh)
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "ar_kwargs", [{}, {"eta": 0.5, "steps": 60}], ids=["exact", "eta0.5_steps60"]
)
def test_cuda_autocast_gradscaler_matches_autograd_and_skips_overflow(dtype, ar_kwargs, torch_ar):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    ).cuda()
    ref = copy.deepcopy(net)
    x = torch.randn(16, 3, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    ar = torch_ar.ARBackward(net, **ar_kwargs)
    scalers = []
    for model in (ar, ref):
        scaler = torch.amp.GradScaler("cuda")
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scalers.append(scaler)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.isfinite(p.grad).all()
        assert cosine(p.grad, q.grad) >= 0.999

    # An overflow: the scaler must skip the step (parameters untouched) and
    # back off its scale, as with autograd.
    scaler = scalers[0]
    opt = torch.optim.SGD(ar.parameters(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in net.parameters()]
    scale_before = scaler.get_scale()
    with torch.autocast("cuda", dtype=dtype):
        loss = F.cross_entropy(ar(x), y) * math.inf
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert scaler.get_scale() < scale_before


@pytest.mark.parametrize(
    "variant",
    [v for v, spec in torch_ar.VARIANTS.items() if spec.uses_backward_weights],
)
def test_every_psi_variant_runs_under_cpu_autocast(variant):
    """Under autocast a linear/conv op reads a bfloat16 copy of W, so its VJP
    meets psi (float32) in bfloat16: psi is cast to match (before, every psi
    variant failed with 'expected m1 and m2 to have the same dtype'), and
    the gradients are the float32 ones to bfloat16's precision."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.Tanh(),
        nn.Linear(16, 5),
    )
    x, y = torch.randn(6, 3, 6, 6), torch.randint(0, 5, (6,))
    size = {"output_dim": 5} if torch_ar.VARIANTS[variant].direct_feedback else {}
    grads = {}
    for autocast in (False, True):
        model = copy.deepcopy(net)
        torch.manual_seed(1)
        ar = torch_ar.ARBackward(model, variant=variant, **size)
        torch.manual_seed(2)  # brSF's draw at the backward
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(ar(x), y)
        loss.backward()
        grads[autocast] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert grads[True].dtype == torch.float32
    assert cosine(grads[True], grads[False]) > BF16_MIN_COSINE, variant

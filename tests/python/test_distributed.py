"""ARBackward under DistributedDataParallel (gloo, two CPU processes).

Two layouts are checked, each in the same two spawned ranks:

- ``DDP(ARBackward(model))``: the wrapper is the module DDP replicates;
- ``DDP(Outer(ARBackward(block)))``: an ARBackward block inside a plain
  model, so DDP's hooks see parameters with autograd and AR gradients mixed.

DDP needs no extra flag for the custom ``autograd.Function`` behind
ARBackward: with ``find_unused_parameters=False`` (the default) and without
``static_graph`` the reducer's hooks sit on each parameter's AccumulateGrad
node, and the wrapper returns every parameter's gradient through autograd, so
the hooks fire and the all-reduce runs as for any module.

DDP averages gradients over ranks, so each rank uses a mean-reduced loss over
its half of the batch; one step must then equal a single process using the
mean over the concatenated batch (float64, relative error <= 1e-10). After a
few SGD steps the parameters must be bit-identical on both ranks.

Networking: the rendezvous and gloo both stay on 127.0.0.1.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from zoo import F64_MAX_REL_ERR, Outer, load_torch_ar, rel_err

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build",
)

WORLD_SIZE = 2
PER_RANK = 4
STEPS = 3
LR = 0.1
LAYOUTS = ("wrapped", "inner_block")


# Every psi variant under DDP on the wrapped MLP: psi, its gradient and the
# trained weights must agree on every rank and with one process.
DDP_VARIANTS = (
    "feedback_alignment",
    "learned_backward_weights",
    "sign_symmetry",
    "sign_symmetry_fixed_random",
    "sign_symmetry_batch_random",
    "no_nonlinear_derivative",
)


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


def _inner_block() -> nn.Sequential:
    # Outer feeds 12 features in and reads 5 out.
    return nn.Sequential(nn.Linear(12, 12), nn.SiLU(), nn.Linear(12, 5))


def build_model(layout: str, torch_ar) -> tuple[nn.Module, nn.Module]:
    """(model to train, the plain module whose parameters it holds), float64, seeded."""
    torch.manual_seed(0)
    if layout == "wrapped":
        plain = _mlp().double()
        return torch_ar.ARBackward(plain), plain
    plain = Outer(_inner_block()).double()
    model = copy.deepcopy(plain)
    model.inner = torch_ar.ARBackward(model.inner)
    return model, plain


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The full batch of one step (both ranks' shards, concatenated)."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(WORLD_SIZE * PER_RANK, 10, generator=gen, dtype=torch.float64)
    y = torch.randn(WORLD_SIZE * PER_RANK, 3, generator=gen, dtype=torch.float64)
    return x, y


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def build_variant(variant: str, torch_ar) -> nn.Module:
    torch.manual_seed(0)
    return torch_ar.ARBackward(_mlp().double(), variant=variant)


def _train_variant(model: nn.Module, ddp: nn.Module | None, rank: int | None) -> dict:
    """STEPS SGD steps on the full batches (rank None) or on rank's shard;
    psi after each backward, the first step's gradients of every parameter."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    run = ddp if ddp is not None else model
    psi_seen, first_grads = [], None
    for step in range(STEPS):
        x, y = batches(step)
        if rank is not None:
            x, y = (
                x[rank * PER_RANK : (rank + 1) * PER_RANK],
                y[rank * PER_RANK : (rank + 1) * PER_RANK],
            )
        opt.zero_grad(set_to_none=True)
        F.mse_loss(run(x), y).backward()
        psi_seen.append({n: p.detach().clone() for n, p in model.backward_weights().items()})
        if step == 0:
            first_grads = {
                n: p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        opt.step()
    return {
        "psi": psi_seen,
        "first_grads": first_grads,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    # Keep gloo's data connections on the loopback interface.
    if Path("/sys/class/net/lo").exists():
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    torch_ar = load_torch_ar()
    from torch.nn.parallel import DistributedDataParallel as DDP

    # A file store: no port to pick and free before the ranks bind it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {}
        for layout in LAYOUTS:
            model, _ = build_model(layout, torch_ar)
            ddp = DDP(model, find_unused_parameters=False)
            opt = torch.optim.SGD(ddp.parameters(), lr=LR)
            first_grads = None
            for step in range(STEPS):
                x, y = batches(step)
                shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
                opt.zero_grad(set_to_none=True)
                F.mse_loss(ddp(x[shard]), y[shard]).backward()
                if step == 0:
                    first_grads = [p.grad.detach().clone() for p in model.parameters()]
                opt.step()
            flat = _flat_params(model)
            gathered = [torch.empty_like(flat) for _ in range(WORLD_SIZE)]
            dist.all_gather(gathered, flat)
            results[layout] = {
                "first_grads": first_grads,
                "params": [p.detach().clone() for p in model.parameters()],
                "all_ranks_params": gathered,
            }
            del ddp, opt
        for variant in DDP_VARIANTS:
            model = build_variant(variant, torch_ar)
            ddp = DDP(model, find_unused_parameters=False)
            results[variant] = _train_variant(model, ddp, rank)
            del ddp
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        # Leave together: a rank that tears gloo down while its peer still
        # has a collective in flight can abort the peer at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    load_torch_ar()
    out_dir = tmp_path_factory.mktemp("ddp")
    store = out_dir / "store"
    mp.spawn(_worker, args=(str(store), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _single_process(layout: str, use_ar: bool) -> tuple[list, list]:
    """First-step gradients and final parameters on the concatenated batches."""
    torch_ar = load_torch_ar()
    model, plain = build_model(layout, torch_ar)
    if not use_ar:
        model = plain
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first_grads = None
    for step in range(STEPS):
        x, y = batches(step)
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        if step == 0:
            first_grads = [p.grad.detach().clone() for p in model.parameters()]
        opt.step()
    return first_grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_hold_identical_parameters(ddp_results, layout):
    for rank, res in enumerate(ddp_results):
        views = res[layout]["all_ranks_params"]
        assert len(views) == WORLD_SIZE
        for other, v in enumerate(views[1:], start=1):
            assert torch.equal(views[0], v), (
                f"{layout}: after {STEPS} DDP steps rank 0 and rank {other} differ "
                f"(seen from rank {rank}); max diff {float((views[0] - v).abs().max())}"
            )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ranks_received_the_same_all_reduced_gradient(ddp_results, layout):
    g0 = ddp_results[0][layout]["first_grads"]
    g1 = ddp_results[1][layout]["first_grads"]
    assert all(torch.equal(a, b) for a, b in zip(g0, g1)), (
        f"{layout}: the two ranks ended the first backward with different gradients"
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reference", ["autograd", "ar"])
def test_ddp_step_equals_single_process_on_full_batch(ddp_results, layout, reference):
    ref_grads, ref_params = _single_process(layout, use_ar=reference == "ar")
    ddp = ddp_results[0][layout]
    assert len(ddp["first_grads"]) == len(ref_grads)
    for i, (a, b) in enumerate(zip(ddp["first_grads"], ref_grads)):
        assert a.dtype == torch.float64
        err = rel_err(a, b)
        assert err <= F64_MAX_REL_ERR, (
            f"{layout}: parameter {i} gradient of one DDP step vs a single process "
            f"({reference}) on the concatenated batch: rel err {err:.3e}"
        )
    for i, (a, b) in enumerate(zip(ddp["params"], ref_params)):
        err = rel_err(a, b)
        assert err <= F64_MAX_REL_ERR, (
            f"{layout}: parameter {i} after {STEPS} steps vs single process "
            f"({reference}): rel err {err:.3e}"
        )


def test_ddp_gradient_is_not_the_local_gradient(ddp_results):
    """The all-reduce really ran: rank 0's gradient differs from its shard-only gradient."""
    torch_ar = load_torch_ar()
    model, _ = build_model("wrapped", torch_ar)
    x, y = batches(0)
    F.mse_loss(model(x[:PER_RANK]), y[:PER_RANK]).backward()
    local = [p.grad for p in model.parameters()]
    reduced = ddp_results[0]["wrapped"]["first_grads"]
    assert any(rel_err(a, b) > 1e-3 for a, b in zip(reduced, local))


@pytest.mark.parametrize("variant", DDP_VARIANTS)
def test_every_variant_agrees_across_ranks_and_with_one_process(ddp_results, variant):
    """psi is the same on every rank after every backward (drawn, made from
    W's signs, drawn per batch for brSF, or learned); learned psi's gradient
    is all-reduced like any parameter's; the DDP run equals one process on
    the concatenated batches."""
    rank0, rank1 = ddp_results[0][variant], ddp_results[1][variant]
    for step, (a, b) in enumerate(zip(rank0["psi"], rank1["psi"])):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{variant}: psi of {name} differs at step {step}"
    assert rank0["first_grads"].keys() == rank1["first_grads"].keys()
    for name, g in rank0["first_grads"].items():
        assert torch.equal(g, rank1["first_grads"][name]), f"{variant}: {name} gradient differs"
    if variant == "learned_backward_weights":
        assert any(n.startswith("backward_weight_store.") for n in rank0["first_grads"]), (
            "learned psi received no gradient"
        )
    single = _train_variant(build_variant(variant, load_torch_ar()), None, None)
    for step, psi in enumerate(single["psi"]):
        for name, value in psi.items():
            torch.testing.assert_close(rank0["psi"][step][name], value, rtol=1e-10, atol=1e-12)
    for name, g in single["first_grads"].items():
        err = rel_err(rank0["first_grads"][name], g)
        assert err <= F64_MAX_REL_ERR, f"{variant}: {name} gradient vs one process: {err:.3e}"
    for name, p in single["params"].items():
        err = rel_err(rank0["params"][name], p)
        assert err <= F64_MAX_REL_ERR, f"{variant}: {name} after {STEPS} steps: {err:.3e}"

"""torch.library.opcheck on every registered torch_ar operator that takes
tensors: the declared schema (what each op mutates), the autograd
registration, the fake-tensor (Meta) kernel and functionalisation under AOT
dispatch. The ops without tensors (tables, build info, CUDA graph memory) are
listed so that a new operator cannot go unchecked."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE_PARAMS

import torch_ar._C  # noqa: F401  (registers torch.ops.torch_ar)

ops = torch.ops.torch_ar
WITHOUT_TENSORS = {
    "supported_ops",
    "build_info",
    "release_cuda_graph_memory",
    "_refuse_next_cuda_graph_capture",
}


def _samples(device: str) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    a = t(4, 5).relu()
    return {
        "relax_update_": ([t(4, 5), t(7)], [t(4, 5), t(7)], 0.5, 1e-6),
        "relax_update_activation_": (
            [t(4, 5), t(7)],
            [t(4, 5), t(7)],
            0.5,
            0.0,
            [0],
            [1],
            [0.0, 0.0],
            [a],
            [torch.empty_like(a)],
        ),
        "horner_update_": (
            [torch.empty(4, 5, device=device), torch.empty(7, device=device)],
            [t(4, 5), None],
            [t(4, 5), t(7)],
            [t(4, 5), t(7)],
            [t(4, 5), t(7)],
            0.3,
            0.9,
            0.0,
            True,
        ),
    }


def test_every_registered_op_is_checked():
    registered = {
        name.split("::", 1)[1]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("torch_ar::")
    }
    assert registered == WITHOUT_TENSORS | set(_samples("cpu"))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("name", sorted(_samples("cpu")))
def test_opcheck(name: str, device: str):
    torch.library.opcheck(getattr(ops, name).default, _samples(device)[name])

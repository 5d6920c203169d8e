"""Backward weights (psi) of the variants without weight transport: which
weights get one, how psi starts, how the sign-concordant variants remake it
from W, and psi's own gradient. ARBackward holds the tensors (in its
state_dict) and calls these."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from torch_ar.config import RelaxConfig

# Modules whose weight gets a psi (with nn.MultiheadAttention's projections).
PSI_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MULTIHEAD_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_hugging_face_conv1d(layer: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 and its family): a linear layer whose
    (in, out) weight is read untransposed, by ``addmm(bias, x, W)``. Told by
    its name and its ``nf`` attribute, so transformers need not be imported."""
    weight = getattr(layer, "weight", None)
    return (
        type(layer).__name__ == "Conv1D"
        and hasattr(layer, "nf")
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
    )


def _parameter_behind_weight(layer: nn.Module) -> nn.Parameter | None:
    """The parameter a layer's weight is: itself, or for a parametrised
    weight (weight_norm, spectral_norm, orthogonal, ...) the one original of
    the weight's shape that it is computed from."""
    if not parametrize.is_parametrized(layer, "weight"):
        return layer.weight
    shape = layer.weight.shape
    originals = [p for p in layer.parametrizations.weight.parameters() if p.shape == shape]
    return originals[0] if len(originals) == 1 else None


def weight_as_read(module: nn.Module, name: str) -> torch.Tensor:
    """The weight that the op reads for the psi of parameter ``name``: the
    parameter, or the weight computed from it when it is the original of a
    parametrisation (``...parametrizations.weight.original``)."""
    parts = name.split(".")
    if "parametrizations" in parts:
        at = len(parts) - 1 - parts[::-1].index("parametrizations")
        owner = module.get_submodule(".".join(parts[:at]))
        return getattr(owner, parts[at + 1])
    return module.get_parameter(name)


def weights_read_by_linear_or_conv(
    module: nn.Module, extra_names: Sequence[str] = ()
) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every parameter that gets a psi, once each: the
    weights of nn.Linear, nn.Conv1d/2d/3d and Hugging Face Conv1D modules
    (for a parametrised weight: its original of the weight's shape),
    nn.MultiheadAttention's
    input projections (packed or separate q/k/v), and the parameters named in
    `extra_names` (ARBackward's backward_weight_params)."""
    names = {id(p): n for n, p in module.named_parameters()}
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()

    def add(w: nn.Parameter | None) -> None:
        if w is not None and id(w) in names and id(w) not in seen:
            seen.add(id(w))
            found.append((names[id(w)], w))

    for layer in module.modules():
        if isinstance(layer, PSI_LAYERS) or is_hugging_face_conv1d(layer):
            add(_parameter_behind_weight(layer))
        elif isinstance(layer, nn.MultiheadAttention):
            for attr in MULTIHEAD_PROJECTIONS:
                add(getattr(layer, attr, None))
    params = dict(module.named_parameters())
    for name in extra_names:
        if name not in params:
            raise ValueError(
                f"ARBackward: backward_weight_params names {name!r}, which is not a "
                f"parameter of the module (it has {sorted(params)[:8]}...)"
            )
        if params[name].dim() < 2:
            raise ValueError(
                f"ARBackward: backward_weight_params names {name!r} of shape "
                f"{tuple(params[name].shape)}; a backward weight replaces the weight of a "
                "linear (2-D) or convolution (3-D and more) op"
            )
        add(params[name])
    return found


def matched_std(name: str, weight: torch.Tensor) -> float:
    """The spread of ``weight`` for a psi drawn at the forward weight's own scale."""
    std = weight.detach().double().std().item() if weight.numel() > 1 else 0.0
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(
            f"ARBackward: backward_weight_init='matched' draws psi at the standard deviation "
            f"of its forward weight, but '{name}' (shape {tuple(weight.shape)}) has std {std}; "
            "initialise the weight first or use backward_weight_init='normal'"
        )
    return std


def xavier_std(weight: torch.Tensor) -> float:
    """sqrt(2 / (fan_in + fan_out)) of a linear or conv weight."""
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    return math.sqrt(2.0 / float(fan_in + fan_out))


def xavier_uniform(
    weight: torch.Tensor, shape: torch.Size, on_cpu_generator: bool = False
) -> torch.Tensor:
    """A tensor of ``shape`` drawn as Xavier-uniform for ``weight``'s fans;
    ``on_cpu_generator``: drawn on the CPU and moved, so that the draw is the
    same whatever the device."""
    bound = math.sqrt(3.0) * xavier_std(weight)
    device = "cpu" if on_cpu_generator else weight.device
    draw = torch.empty(shape, dtype=weight.dtype, device=device).uniform_(-bound, bound)
    return draw.to(weight.device)


def owner_of(module: nn.Module, name: str) -> nn.Module:
    """The submodule that holds parameter ``name`` (through a parametrisation)."""
    parts = name.split(".")
    at = (
        len(parts) - 1 - parts[::-1].index("parametrizations")
        if "parametrizations" in parts
        else len(parts) - 1
    )
    return module.get_submodule(".".join(parts[:at]))


def reads_weight_untransposed(module: nn.Module, name: str) -> bool:
    """Whether the op reads the 2-D weight ``name`` as W itself (Hugging
    Face's Conv1D: ``addmm(b, x, W)``) rather than W^T (``F.linear``)."""
    return is_hugging_face_conv1d(owner_of(module, name))


def direct_feedback_shape(
    weight: torch.Tensor, output_dim: int, untransposed: bool, groups: int = 1
) -> torch.Size:
    """The shape of direct feedback alignment's psi for ``weight``: the
    operand the op reads, with the output's size in place of the op's outputs:
    [in, output_dim] for a 2-D weight (B^T, where BioTorch's dfa layers keep
    B as [output_dim, in]), [output_dim, C_in, *kernel] for a convolution
    kernel (BioTorch's own layout; a grouped convolution's psi reads all
    C_in = groups x weight.shape[1] input channels)."""
    if weight.dim() == 2:
        fan = weight.shape[0] if untransposed else weight.shape[1]
        return torch.Size([fan, output_dim])
    return torch.Size([output_dim, weight.shape[1] * groups, *weight.shape[2:]])


def initial_direct_feedback_weight(
    name: str, weight: torch.Tensor, shape: torch.Size, config: RelaxConfig
) -> torch.Tensor:
    """Direct feedback's psi at the start, by `config.backward_weight_init`:
    "xavier" is BioTorch's dfa initialisation (Xavier uniform for psi's own
    fans); "transpose" has no meaning for a projection of the output error."""
    if config.backward_weight_init == "transpose":
        raise ValueError(
            "ARBackward: variant 'direct_feedback_alignment' projects the output error, which no "
            "forward weight does, so backward_weight_init='transpose' has no meaning; use "
            "'xavier' (BioTorch's), 'matched' or 'normal'"
        )
    if config.backward_weight_init == "xavier":
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(torch.empty(shape, device="meta"))
        bound = math.sqrt(3.0) * math.sqrt(2.0 / float(fan_in + fan_out))
        draw = torch.empty(shape, dtype=weight.dtype).uniform_(-bound, bound)
    else:
        std = config.backward_weight_std
        if config.backward_weight_init == "matched":
            std = matched_std(name, weight)
        draw = torch.randn(shape, dtype=weight.dtype) * std
    # On the CPU generator, as every psi: the same draw on every device.
    return draw.to(weight.device)


def is_transposed(weight: torch.Tensor) -> bool:
    """A 2-D weight's psi is kept as W^T (the operand F.linear reads; the
    engine transposes it for an op that reads W itself, as addmm(b, x, W)
    does); conv weights keep their shape."""
    return weight.dim() == 2


def initial_backward_weight(name: str, weight: torch.Tensor, config: RelaxConfig) -> torch.Tensor:
    """psi at the start, by `config.backward_weight_init`."""
    shape = weight.t().shape if is_transposed(weight) else weight.shape
    if config.backward_weight_init == "transpose":
        w = weight.detach()
        return (w.t() if is_transposed(weight) else w).clone().contiguous()
    # Drawn on the CPU generator and moved: a model gets the same psi on every
    # device (a CUDA run reproduces a CPU one, and the tests compare them).
    if config.backward_weight_init == "xavier":
        return xavier_uniform(weight, shape, on_cpu_generator=True)
    std = config.backward_weight_std
    if config.backward_weight_init == "matched":
        std = matched_std(name, weight)
    return (torch.randn(shape, dtype=weight.dtype) * std).to(weight.device)


@torch.no_grad()
def remake_from_signs(
    psi: torch.Tensor, weight: torch.Tensor, rule: str, magnitude: torch.Tensor | None
) -> None:
    """psi = sign(W) (transposed for linear) times a magnitude, in place: the
    layer's Xavier std (uSF, `rule="uniform"`), the fixed |R| (frSF,
    `"fixed_random"`) or a fresh Xavier-uniform |R_t| (brSF, `"batch_random"`)."""
    w = weight.detach()
    signs = torch.sign(w.t() if is_transposed(w) else w)
    if rule == "uniform":
        psi.copy_(signs * xavier_std(w))
    elif rule == "fixed_random":
        psi.copy_(signs * magnitude)
    else:  # batch_random
        psi.copy_(signs * xavier_uniform(w, psi.shape).abs())


def backward_weight_gradient(
    weight_grad: torch.Tensor, psi: torch.Tensor, transposed: bool, decay: float
) -> torch.Tensor:
    """psi's gradient: the paper's rule, psi moves by W's increment
    (transposed for linear), plus Kolen-Pollack decay * psi."""
    grad = (weight_grad.t() if transposed else weight_grad).contiguous()
    return grad + decay * psi.detach() if decay else grad

"""Models for the training examples: the paper's MLP, a small CNN, CIFAR ResNet-18.

Example::

    from torch_ar.experiments.models import build_model
    model = build_model("mlp", "fashion-mnist")      # 784-300-300-100-10
    model = build_model("resnet18", "cifar10")
    model = build_model("mobilenet_v3_small", "cifar10")  # any torchvision.models constructor
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from torch_ar.experiments.vit import VisionTransformer

# (channels, height, width, classes) of each supported data set.
DATASET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "fashion-mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def paper_mlp(
    in_features: int = 784,
    num_classes: int = 10,
    hidden: tuple[int, ...] = (300, 300, 100),
    activation: str = "relu",
    init: str = "paper",
) -> nn.Sequential:
    """The MLP of Millidge et al. (2020): 784-300-300-100-10, ReLU hidden, linear output.

    ``init="paper"`` draws every weight from N(0, 0.05^2) and zeroes biases, as the
    paper; ``init="default"`` keeps PyTorch's default ``nn.Linear`` init.
    """
    if init not in ("paper", "default"):
        raise ValueError(f"init must be 'paper' or 'default', got {init!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    sizes = (in_features, *hidden)
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [nn.Linear(fan_in, fan_out), _activation(activation)]
    layers.append(nn.Linear(sizes[-1], num_classes))
    model = nn.Sequential(*layers)
    if init == "paper":
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.05)
                nn.init.zeros_(m.bias)
    return model


def cifar_cnn(
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    channels: tuple[int, ...] = (32, 64, 128),
    activation: str = "relu",
) -> nn.Sequential:
    """A small CNN: (conv3x3-activation-maxpool2) per entry of ``channels``, then one linear layer.

    ``activation="tanh"`` gives the kind of network of the follow-up paper
    (Millidge et al., arXiv 2010.06219) on CIFAR-10.
    """
    layers: list[nn.Module] = []
    size, c_in = image_size, in_channels
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
        size, c_in = size // 2, c_out
    if size < 1:
        raise ValueError(f"{len(channels)} pooling stages shrink a {image_size}px image to nothing")
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, num_classes)]
    return nn.Sequential(*layers)


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> torchvision.models.ResNet:
    """torchvision ResNet-18 for 32x32 inputs: 3x3 stride-1 stem conv and no max-pool."""
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016): the strided identity, with the new
    channels zero (parameter-free, as in the paper's CIFAR-10 networks)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR-10 ResNet of He et al. (2016), section 4.2: a 3x3 conv to 16
    channels, three stages of ``n`` basic blocks at 16/32/64 channels (the
    last two starting with stride 2), global average pooling and one linear
    layer; depth 6n + 2 (ResNet-20: n = 3, 0.27M parameters). Kaiming-normal
    init of convolution and linear weights, as BioTorch's ``small_resnet``.
    """

    def __init__(
        self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
        if shortcut not in ("A", "B"):
            raise ValueError(
                f"shortcut must be 'A' (zero padding) or 'B' (1x1 conv), got {shortcut!r}"
            )
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                blocks.append(CifarBasicBlock(c_in, c_out, stride, shortcut))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet44": 44, "resnet56": 56, "resnet110": 110}


class RepeatChannels(nn.Module):
    """Repeat a 1-channel image to ``channels`` channels (grey images into RGB models)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, self.channels, -1, -1)


def _torchvision_model(name: str, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    builder = getattr(torchvision.models, name, None)
    if builder is None or not callable(builder) or name.startswith("_") or name[0].isupper():
        raise ValueError(
            f"unknown model {name!r}: use one of {sorted(MODEL_NAMES)} "
            "or a constructor name from torchvision.models (e.g. resnet18, mobilenet_v3_small)"
        )
    model = builder(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        model = nn.Sequential(RepeatChannels(3), model)
    return model


# The CIFAR-scale Vision Transformer (experiments/vit.py) by its pooling.
VIT_POOLS = {"vit": "cls", "vit-mean": "mean"}

MODEL_NAMES = (
    "mlp",
    "mlp-default-init",
    "cnn",
    "cnn-tanh",
    "resnet18",
    *RESNET_DEPTHS,
    *VIT_POOLS,
)


BIOTORCH_MODES = ("fa", "usf", "frsf", "brsf", "dfa")


def biotorch_model(mode: str, arch: str, num_classes: int) -> nn.Module:
    """A BioTorch model (``biotorch.models.<mode>.<arch>``), trained by its own
    feedback rules under plain ``loss.backward()``: the peer rows of the
    experiments. BioTorch is an optional benchmark dependency
    (``pip install --no-deps biotorch==0.0.16``), never one of torch_ar's."""
    try:
        import importlib

        module = importlib.import_module(f"biotorch.models.{mode}")
    except ImportError as e:
        raise ValueError(
            f"model 'biotorch-{mode}-{arch}' needs BioTorch (pip install --no-deps "
            f"biotorch==0.0.16): {e}"
        ) from e
    builder = getattr(module, arch, None)
    if builder is None:
        raise ValueError(f"BioTorch has no {mode} model {arch!r}")
    return builder(num_classes=num_classes)


def build_model(name: str, dataset: str, **kwargs: Any) -> nn.Module:
    """Build a model by name for a data set (``"fashion-mnist"`` or ``"cifar10"``).

    Names: ``mlp`` (paper MLP, paper init), ``mlp-default-init``, ``cnn``,
    ``cnn-tanh``, ``resnet18`` (CIFAR stem), ``resnet20``/``32``/``44``/``56``/``110``
    (the CIFAR ResNets; ``shortcut="B"`` for 1x1-conv shortcuts), ``vit`` and
    ``vit-mean`` (the Vision Transformer of experiments/vit.py, patch 4,
    width 96, depth 6, 3 heads, with a class token or mean pooling),
    ``biotorch-<mode>-<arch>`` (a BioTorch model, e.g. ``biotorch-fa-resnet20``,
    when BioTorch is installed), or any ``torchvision.models``
    constructor (built with ``weights=None``; 1-channel images are repeated to
    3 channels). Extra keyword arguments go to the constructor.
    """
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"unknown data set {dataset!r}; choose from {sorted(DATASET_SHAPES)}")
    c, h, w, classes = DATASET_SHAPES[dataset]
    if name == "mlp":
        return paper_mlp(c * h * w, classes, **kwargs)
    if name == "mlp-default-init":
        return paper_mlp(c * h * w, classes, init="default", **kwargs)
    if name == "cnn":
        return cifar_cnn(c, classes, h, **kwargs)
    if name == "cnn-tanh":
        return cifar_cnn(c, classes, h, activation="tanh", **kwargs)
    if name == "resnet18":
        return resnet18_cifar(classes, c)
    if name in RESNET_DEPTHS:
        return CifarResNet(RESNET_DEPTHS[name], classes, c, **kwargs)
    if name in VIT_POOLS:
        return VisionTransformer(
            h, in_channels=c, num_classes=classes, pool=VIT_POOLS[name], **kwargs
        )
    if name.startswith("biotorch-"):
        _, mode, arch = (name.split("-", 2) + ["", ""])[:3]
        if mode not in BIOTORCH_MODES or not arch:
            raise ValueError(
                f"unknown model {name!r}: BioTorch models are biotorch-<mode>-<arch>, mode one "
                f"of {BIOTORCH_MODES}, e.g. biotorch-fa-resnet20"
            )
        return biotorch_model(mode, arch, classes)
    return _torchvision_model(name, c, classes, **kwargs)

"""A Vision Transformer at CIFAR scale (Dosovitskiy et al. 2021): patch
embedding by a strided convolution, a class token or mean pooling, learned
positions, pre-norm blocks of nn.MultiheadAttention and a GELU MLP, a final
LayerNorm and a linear head.

Example::

    from torch_ar.experiments.vit import VisionTransformer
    vit = VisionTransformer(image_size=32, patch_size=4, width=96, depth=6, heads=3)
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_width),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_width, width),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT for small images. ``pool="cls"`` classifies from a class token,
    ``"mean"`` from the mean of the patch tokens. Weights: truncated normal
    (std 0.02) for linear layers, positions and the class token, as the
    reference implementations; LayerNorm at ones and zeros."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 96,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 2.0,
        pool: str = "cls",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide image_size {image_size}")
        if width % heads:
            raise ValueError(f"heads {heads} does not divide width {width}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.patch_embedding = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        tokens = (image_size // patch_size) ** 2 + (pool == "cls")
        self.class_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.positions = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.Sequential(
            *[EncoderBlock(width, heads, round(width * mlp_ratio), dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.positions, std=0.02)
        if self.class_token is not None:
            nn.init.trunc_normal_(self.class_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        if self.class_token is not None:
            tokens = torch.cat([self.class_token.expand(len(x), -1, -1), tokens], dim=1)
        h = self.norm(self.blocks(tokens + self.positions))
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))

"""Vision-language connectors: patch grid [B, N, Dv] -> [B, num_tokens, D_llm].

All three MM1-ablated variants share one interface (a `ConnectorParts` spec; model/builder.py
picks one). The paper's lesson is that the token count matters and the connector type barely
does, so they are interchangeable.
Connectors are small (<2% of parameters) and stay replicated across TP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map (eps: `connector.norm_eps`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(scale))))


class BottleneckBlock(nn.Module):
    """RegNet-style residual block (Honeybee's C-Abstractor): 1x1 -> depthwise 3x3 -> SE -> 1x1."""

    def __init__(self, in_channels: int, out_channels: int, eps: float, se_ratio: float = 0.25):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm_in = LayerNorm2d(out_channels, eps=eps)
        self.conv_mid = nn.Conv2d(out_channels, out_channels, 3, padding=1, groups=out_channels,
                                  bias=False)
        self.norm_mid = LayerNorm2d(out_channels, eps=eps)
        self.se = SqueezeExcite(out_channels, max(1, round(in_channels * se_ratio)))
        self.conv_out = nn.Conv2d(out_channels, out_channels, 1, bias=False)
        self.norm_out = LayerNorm2d(out_channels, eps=eps)
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                       LayerNorm2d(out_channels, eps=eps)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.norm_in(self.conv_in(x)))
        y = F.silu(self.norm_mid(self.conv_mid(y)))
        y = self.norm_out(self.conv_out(self.se(y)))
        return F.silu(y + self.shortcut(x))


def _readout(in_features: int, out_features: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


def _to_grid(patches: torch.Tensor) -> torch.Tensor:
    b, n, d = patches.shape
    side = int(n**0.5)
    return patches.transpose(1, 2).reshape(b, d, side, side)


class CAbstractor(nn.Module):
    """Conv blocks -> AdaptiveAvgPool2d to n x n -> conv blocks -> MLP readout (Honeybee)."""

    def __init__(self, vision_hidden: int, num_patches: int, llm_hidden: int, channels: int,
                 depth: int, mlp_depth: int, grid: int, pos_emb: bool, norm_eps: float):
        super().__init__()
        self.pos_emb = None
        if pos_emb:  # Honeybee: timm trunc_normal_(std=.02), cut at +-2 (absolute)
            self.pos_emb = nn.Parameter(torch.empty(1, num_patches, vision_hidden))
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.stage_in = nn.Sequential(*[BottleneckBlock(vision_hidden if i == 0 else channels,
                                                        channels, norm_eps)
                                        for i in range(depth)])
        # 27x27 does not divide into 12x12, so pooling is adaptive (not pixel shuffle).
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.stage_out = nn.Sequential(*[BottleneckBlock(channels, channels, norm_eps)
                                         for _ in range(depth)])
        self.readout = _readout(channels, llm_hidden, mlp_depth)

    def resize_position_grid(self, grid: int) -> None:
        """Interpolate the patch-grid position embedding for another input resolution."""
        if self.pos_emb is not None:
            from mm1_megatron.model.vision import interpolate_position_grid

            table = interpolate_position_grid(self.pos_emb.data[0], 0, grid)
            self.pos_emb = nn.Parameter(table.unsqueeze(0))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        if self.pos_emb is not None:
            patches = patches + self.pos_emb
        x = self.stage_out(self.pool(self.stage_in(_to_grid(patches))))
        return self.readout(x.flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    """n x n average pooling of the patch grid, then a linear projection."""

    def __init__(self, vision_hidden: int, llm_hidden: int, grid: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(_to_grid(patches)).flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    """k learnable queries cross-attending to the patch tokens, then a projection."""

    def __init__(self, vision_hidden: int, llm_hidden: int, num_queries: int, num_heads: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, num_queries, vision_hidden) * 0.02)
        self.attn = nn.MultiheadAttention(vision_hidden, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(vision_hidden)
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        queries = self.queries.expand(patches.shape[0], -1, -1)
        pooled, _ = self.attn(queries, patches, patches, need_weights=False)
        return self.proj(self.norm(pooled))


@dataclass(frozen=True)
class ConnectorParts:
    """What the connector is built from, as LLaVAModel takes its vision projection: a spec
    (one of the classes above and its arguments) and the tokens it makes per image."""

    spec: ModuleSpec
    num_tokens: int

    def build(self) -> nn.Module:
        return build_module(self.spec)

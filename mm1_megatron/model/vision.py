"""CLIP-style ViT image encoder on Megatron-Core's CLIPViTModel (TP-sharded like the decoder),
built from an injected TransformerConfig and layer spec (model/builder.py makes them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's and DFN5B's activation (open_clip
    `ViT-H-14-378-quickgelu`). The same formula as `megatron.core.activations.quick_gelu`,
    kept eager: that one is wrapped in torch.compile (`jit_fuser`), which cannot trace the
    meta device (the device audit) and compiles again in every CPU process."""
    return x * torch.sigmoid(1.702 * x)


# gelu is the exact erf form.
VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass(frozen=True)
class VisionParts:
    """What the encoder is built from, as LLaVAModel takes its vision model's: a
    TransformerConfig and layer spec, and the CLIP geometry."""

    config: TransformerConfig
    layer_spec: ModuleSpec
    image_size: int
    patch_size: int
    class_token: bool
    # ln_pre / ln_post; None: CLIPViTModel's default (TENorm). specs.vision_norm chooses.
    norm: Optional[type] = None

    def build(self) -> CLIPViTModel:
        extra = {} if self.norm is None else dict(ln_pre_impl=self.norm, ln_post_impl=self.norm)
        return CLIPViTModel(
            transformer_config=self.config,
            transformer_layer_spec=self.layer_spec,
            add_class_token=self.class_token,
            class_token_len=1,
            patch_dim=self.patch_size,
            img_h=self.image_size,
            img_w=self.image_size,
            model_subtype="clip",
            **extra,
        )


def interpolate_position_grid(table: torch.Tensor, prefix_tokens: int,
                              new_grid: int) -> torch.Tensor:
    """[prefix + g*g, d] learned positions -> [prefix + new_grid**2, d], bicubic on the grid.

    The prefix (class token) rows are kept as they are. Used for higher resolutions (SFT at
    672 px) and by checkpoint import when the source was trained at another size.
    """
    prefix, grid_rows = table[:prefix_tokens], table[prefix_tokens:]
    old_grid = math.isqrt(grid_rows.shape[0])
    if old_grid == new_grid:
        return table.clone()
    dim = grid_rows.shape[1]
    grid = grid_rows.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, dim).to(table.dtype)
    return torch.cat([prefix, grid])


def resize_vision_encoder(encoder: CLIPViTModel, image_size: int) -> None:
    """Let a built encoder take `image_size` inputs by interpolating its position table."""
    if image_size % encoder.patch_dim:
        raise ValueError(f"image size {image_size} is not a multiple of the patch size "
                         f"{encoder.patch_dim}")
    prefix = encoder.class_token_len if encoder.add_class_token else 0
    grid = image_size // encoder.patch_dim
    old = encoder.position_embeddings.weight
    table = interpolate_position_grid(old.detach(), prefix, grid)
    encoder.position_embeddings = torch.nn.Embedding(table.shape[0], table.shape[1],
                                                     dtype=old.dtype, device=old.device)
    with torch.no_grad():
        encoder.position_embeddings.weight.copy_(table)
    encoder.img_h = encoder.img_w = image_size
    encoder.num_patches_per_dim_h = encoder.num_patches_per_dim_w = grid
    encoder.num_patches = grid * grid
    encoder.seq_length = encoder.num_patches + prefix
    encoder.position_ids = torch.arange(encoder.seq_length, device=old.device).expand(1, -1)

"""CLIP-style ViT image encoder on Megatron-Core's CLIPViTModel (TP-sharded like the decoder)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config import Config
from mm1_megatron.model.language import parallel_kwargs, precision_kwargs, recompute_kwargs
from mm1_megatron.model.specs import vision_layer_spec


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): OpenAI CLIP's and DFN5B's activation (open_clip
    `ViT-H-14-378-quickgelu`). The same formula as `megatron.core.activations.quick_gelu`,
    kept eager: that one is wrapped in torch.compile (`jit_fuser`), which cannot trace the
    meta device (the device audit) and compiles again in every CPU process."""
    return x * torch.sigmoid(1.702 * x)


# gelu is the exact erf form.
VISION_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def vision_transformer_config(cfg: Config) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.layers_built,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_eps,
        add_bias_linear=True,
        activation_func=VISION_ACTIVATIONS[v.activation],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The encoder lives whole on the first pipeline stage.
        **parallel_kwargs(cfg, decoder=False),
        # Never FP8 (train.fp8 is the decoder's): its GEMMs see 730 x images rows, which TE's
        # FP8 refuses unless the image count is a multiple of 4, and the encoder is ~10% of
        # the FLOPs. Megatron-Bridge keeps vision backbones out of FP8 by default too.
        **precision_kwargs(cfg, fp8=False),
        **recompute_kwargs(v.recompute, v.recompute_layers),
    )


def build_vision_encoder(cfg: Config, use_te: bool) -> CLIPViTModel:
    v = cfg.vision
    norm = None if use_te else WrappedTorchNorm  # TE: Megatron's default (TENorm)
    extra = {} if norm is None else dict(ln_pre_impl=norm, ln_post_impl=norm)
    return CLIPViTModel(
        transformer_config=vision_transformer_config(cfg),
        transformer_layer_spec=vision_layer_spec(use_te),
        add_class_token=v.class_token,
        class_token_len=1,
        patch_dim=v.patch_size,
        img_h=v.image_size,
        img_w=v.image_size,
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

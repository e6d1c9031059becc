"""CLIP-style ViT image encoder on Megatron-Core's CLIPViTModel (shards with TP like the decoder)."""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mm1_megatron.config import Config
from mm1_megatron.model.language import parallel_kwargs, precision_kwargs, recompute_kwargs
from mm1_megatron.model.specs import vision_layer_spec


def vision_transformer_config(cfg: Config) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        normalization="LayerNorm",
        layernorm_epsilon=v.layernorm_eps,
        add_bias_linear=True,
        activation_func=F.gelu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # The encoder lives whole on the first pipeline stage.
        **parallel_kwargs(cfg, decoder=False),
        **precision_kwargs(cfg),
        **recompute_kwargs(v.recompute),
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

"""MM1 for `transformers`: CLIP-style ViT -> connector -> Llama-style decoder (dense or MoE).

Shipped into every exported directory and loaded with `trust_remote_code=True`; it depends on
torch and transformers only. The ViT layers are transformers' `CLIPEncoder` (pre-LN, the
activation named by `vision_config.hidden_act`: quick_gelu for MM1's DFN5B encoder), the decoder is transformers'
`LlamaModel` whose MLP is swapped for `MM1SparseMoeBlock` on the MoE layers, and the three
connectors are re-implemented here with the parameter names of `mm1_megatron.model.connector`.

Images are spliced like the Megatron model does: each image is `num_image_tokens` placeholder
ids (`config.image_token_id`) in `input_ids`; the connector outputs replace their embeddings
in order (row by row, image by image).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.clip.modeling_clip import CLIPEncoder
from transformers.models.llama.modeling_llama import LlamaModel

try:  # loaded as a remote-code module (package-relative) or straight from the folder
    from .compat_mm1 import CACHE_FIELD
    from .configuration_mm1 import MM1Config
    from .processing_mm1 import images_per_row
except ImportError:  # pragma: no cover
    from compat_mm1 import CACHE_FIELD
    from configuration_mm1 import MM1Config
    from processing_mm1 import images_per_row


# ----------------------------------------------------------------------------- vision tower


class MM1VisionEmbeddings(nn.Module):
    """CLIP embeddings (same names as transformers' `CLIPVisionEmbeddings`); the class token is
    optional, as in Megatron's `CLIPViTModel`."""

    def __init__(self, config, class_token: bool = True):
        super().__init__()
        self.embed_dim, self.patch_size = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.zeros(self.embed_dim)) if class_token else None
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim,
                                         kernel_size=self.patch_size, stride=self.patch_size,
                                         bias=False)
        self.num_positions = (self.image_size // self.patch_size) ** 2 + int(class_token)
        self.position_embedding = nn.Embedding(self.num_positions, self.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
        if x.shape[1] != self.num_positions:
            raise ValueError(f"images of {pixel_values.shape[-2]}x{pixel_values.shape[-1]} px "
                             f"do not match the model's {self.image_size} px")
        return x + self.position_embedding.weight.unsqueeze(0)


class MM1VisionTower(nn.Module):
    """Embeddings -> pre-LN (`pre_layrnorm`, CLIP's spelling) -> transformers' CLIPEncoder.
    No post-LN: the connector reads the last built layer's output, as Megatron's does."""

    def __init__(self, config, class_token: bool = True):
        super().__init__()
        self.embeddings = MM1VisionEmbeddings(config, class_token)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.class_token = class_token

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        out = self.encoder(inputs_embeds=hidden, attention_mask=None)
        hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
        return hidden[:, 1:] if self.class_token else hidden


# ----------------------------------------------------------------------------- connectors


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class BottleneckBlock(nn.Module):
    def __init__(self, cin: int, cout: int, eps: float, se_ratio: float = 0.25):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, cout, 1, bias=False)
        self.norm_in = LayerNorm2d(cout, eps=eps)
        self.conv_mid = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.norm_mid = LayerNorm2d(cout, eps=eps)
        self.se = SqueezeExcite(cout, max(1, round(cin * se_ratio)))
        self.conv_out = nn.Conv2d(cout, cout, 1, bias=False)
        self.norm_out = LayerNorm2d(cout, eps=eps)
        self.shortcut = (nn.Identity() if cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False),
                                       LayerNorm2d(cout, eps=eps)))

    def forward(self, x):
        y = F.silu(self.norm_in(self.conv_in(x)))
        y = F.silu(self.norm_mid(self.conv_mid(y)))
        y = self.norm_out(self.conv_out(self.se(y)))
        return F.silu(y + self.shortcut(x))


def _readout(cin: int, cout: int, depth: int) -> nn.Sequential:
    layers = [nn.Linear(cin, cout)]
    for _ in range(depth - 1):
        layers += [nn.SiLU(), nn.Linear(cout, cout)]
    return nn.Sequential(*layers)


def _to_grid(patches: torch.Tensor) -> torch.Tensor:
    b, n, d = patches.shape
    side = math.isqrt(n)
    return patches.transpose(1, 2).reshape(b, d, side, side)


class CAbstractor(nn.Module):
    def __init__(self, vision_hidden, num_patches, llm_hidden, channels, depth, mlp_depth, grid,
                 pos_emb, norm_eps):
        super().__init__()
        self.pos_emb = nn.Parameter(torch.zeros(1, num_patches, vision_hidden)) if pos_emb else None
        self.stage_in = nn.Sequential(*[BottleneckBlock(vision_hidden if i == 0 else channels,
                                                        channels, norm_eps)
                                        for i in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.stage_out = nn.Sequential(*[BottleneckBlock(channels, channels, norm_eps)
                                         for _ in range(depth)])
        self.readout = _readout(channels, llm_hidden, mlp_depth)

    def forward(self, patches):
        if self.pos_emb is not None:
            patches = patches + self.pos_emb
        x = self.stage_out(self.pool(self.stage_in(_to_grid(patches))))
        return self.readout(x.flatten(2).transpose(1, 2))


class AvgPoolConnector(nn.Module):
    def __init__(self, vision_hidden, llm_hidden, grid):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, patches):
        return self.proj(self.pool(_to_grid(patches)).flatten(2).transpose(1, 2))


class AttnPoolConnector(nn.Module):
    def __init__(self, vision_hidden, llm_hidden, num_queries, num_heads):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(1, num_queries, vision_hidden))
        self.attn = nn.MultiheadAttention(vision_hidden, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(vision_hidden)
        self.proj = nn.Linear(vision_hidden, llm_hidden)

    def forward(self, patches):
        queries = self.queries.expand(patches.shape[0], -1, -1)
        pooled, _ = self.attn(queries, patches, patches, need_weights=False)
        return self.proj(self.norm(pooled))


def build_connector(config: MM1Config) -> nn.Module:
    c, v = config.connector, config.vision_config
    llm_hidden = config.text_config.hidden_size
    grid = math.isqrt(int(c["num_tokens"]))
    if c["type"] == "c_abstractor":
        num_patches = (v.image_size // v.patch_size) ** 2
        return CAbstractor(v.hidden_size, num_patches, llm_hidden, c["hidden_size"], c["depth"],
                           c["mlp_depth"], grid, c["pos_emb"],
                           c.get("norm_eps", 1e-5))  # exports before norm_eps: nn's default
    if c["type"] == "avg_pool":
        return AvgPoolConnector(v.hidden_size, llm_hidden, grid)
    if c["type"] == "attn_pool":
        return AttnPoolConnector(v.hidden_size, llm_hidden, int(c["num_tokens"]),
                                 c.get("num_heads", v.num_attention_heads))
    raise ValueError(f"unknown connector type {c['type']!r}")


# ----------------------------------------------------------------------------- MoE


class MM1Expert(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MM1SparseMoeBlock(nn.Module):
    """Megatron-Core's default top-k router: top-k over the router logits, softmax over the k
    chosen (= softmax over all experts renormalised over the top k); dropless; the expert
    outputs are weighted by those probabilities and summed."""

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int,
                 router_fp32: bool = False):
        super().__init__()
        self.top_k, self.router_fp32 = top_k, router_fp32
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList([MM1Expert(hidden, ffn) for _ in range(num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        logits = (F.linear(flat.float(), self.gate.weight.float()) if self.router_fp32
                  else self.gate(flat))
        top_logits, top_idx = torch.topk(logits, self.top_k, dim=-1)
        probs = torch.softmax(top_logits, dim=-1, dtype=torch.float32).to(flat.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(top_idx == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * probs[rows, slot, None])
        return out.reshape(shape)


# ----------------------------------------------------------------------------- full model


class MM1PreTrainedModel(PreTrainedModel):
    config_class = MM1Config
    config: MM1Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        std = getattr(self.config.text_config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MM1ForConditionalGeneration(MM1PreTrainedModel, GenerationMixin):
    def __init__(self, config: MM1Config):
        super().__init__(config)
        for sub in (config.vision_config, config.text_config):
            if getattr(sub, "_attn_implementation", None) is None:
                sub._attn_implementation = config._attn_implementation or "sdpa"
        self.vision_tower = MM1VisionTower(config.vision_config, config.vision_class_token)
        self.connector = build_connector(config)
        text = config.text_config
        self.language_model = LlamaModel(text)
        ffn = config.moe_ffn_hidden_size or text.intermediate_size
        for i, layer in enumerate(self.language_model.layers):
            if config.is_moe_layer(i):
                layer.mlp = MM1SparseMoeBlock(text.hidden_size, ffn, config.moe_num_experts,
                                              config.moe_top_k,
                                              getattr(config, "moe_router_fp32", False))
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.embed_tokens

    def set_input_embeddings(self, value):
        self.language_model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] -> [n, num_image_tokens, hidden]."""
        return self.connector(self.vision_tower(pixel_values))

    def _flat_images(self, input_ids, pixel_values, image_counts=None):
        """Images in placeholder order, [n, 3, H, W]: `pixel_values` either already so, or per
        row [rows, slots, 3, H, W] with `image_counts` [rows] (else counted from the
        placeholders) saying how many slots of each row hold an image."""
        if pixel_values is None or pixel_values.dim() == 4:
            return pixel_values
        if image_counts is None:
            image_counts = (input_ids == self.config.image_token_id).sum(1) \
                // self.config.num_image_tokens
        return torch.cat([pixel_values[row, :int(n)] for row, n in enumerate(image_counts)])

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
              image_counts: Optional[torch.Tensor] = None):
        """Token embeddings with the images' connector outputs over their placeholders."""
        embeds = self.language_model.embed_tokens(input_ids)
        pixel_values = self._flat_images(input_ids, pixel_values, image_counts)
        if pixel_values is None or pixel_values.shape[0] == 0:
            return embeds
        slots = input_ids == self.config.image_token_id
        expected = pixel_values.shape[0] * self.config.num_image_tokens
        if int(slots.sum()) != expected:
            raise ValueError(f"input_ids hold {int(slots.sum())} image placeholder tokens (id "
                             f"{self.config.image_token_id}) but {pixel_values.shape[0]} "
                             f"images need {expected}")
        image_tokens = self.encode_images(pixel_values).to(embeds.dtype)
        return embeds.masked_scatter(slots.unsqueeze(-1), image_tokens)

    def forward(self, input_ids=None, pixel_values=None, image_counts=None, attention_mask=None,
                position_ids=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_counts)
        # the cache (under the release's name, CACHE_FIELD) and what else the release's
        # generate passes (cache_position before 5.x's removal) go on to the decoder
        outputs = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """The release's own, with the images kept to the step that reads the prompt: newer
        releases drop `pixel_values` once the cache holds it, older ones (5.0, 4.57) pass them
        to every step, whose input ids hold no placeholder."""
        inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds,
                                                       **kwargs)
        cache = inputs.get(CACHE_FIELD)
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            inputs.pop("pixel_values", None)
            inputs.pop("image_counts", None)
        return inputs

    def generate(self, inputs=None, *args, pixel_values=None, image_counts=None, **kwargs):
        """`GenerationMixin.generate`, with images regrouped per row first: beam search and
        `num_return_sequences` repeat each row's inputs, which pairs a flat [n, 3, H, W] image
        list with the wrong rows as soon as a row holds two images."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if pixel_values is not None and pixel_values.dim() == 4 and ids is not None:
            image_counts = (ids == self.config.image_token_id).sum(1) \
                // self.config.num_image_tokens
            pixel_values = images_per_row(pixel_values, image_counts.tolist())
        if pixel_values is not None:
            kwargs.update(pixel_values=pixel_values, image_counts=image_counts)
        return super().generate(inputs, *args, **kwargs)


__all__ = ["MM1ForConditionalGeneration", "MM1PreTrainedModel"]

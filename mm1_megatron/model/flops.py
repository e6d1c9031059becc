"""Model FLOPs per training sequence (forward + backward = 3 x forward), for MFU.

Convention (PaLM / Megatron-LM MFU): a multiply-add is 2 FLOPs; only matmuls and attention
score/context products count; attention counts the full s x s product (no causal or
document-mask discount), so MFU compares directly with published Megatron figures. Images are
counted at `data.max_images_per_sequence`, the recipe's upper bound.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from mm1_megatron.config import Config, ConnectorConfig, LLMConfig, VisionConfig
from mm1_megatron.model.params import attention_params, swiglu_params

TRAIN_FACTOR = 3  # backward costs twice the forward (all parts are trained)


def llm_forward_flops(llm: LLMConfig, seq: int) -> int:
    q_width = llm.num_attention_heads * llm.head_dim
    per_layer_attn = 2 * seq * attention_params(llm) + 4 * seq * seq * q_width
    flops = 0
    for layer in range(llm.num_layers):
        if llm.is_moe_layer(layer):
            mlp = (llm.moe.num_experts * llm.hidden_size
                   + llm.moe.top_k * swiglu_params(llm.hidden_size, llm.expert_ffn_hidden_size))
        else:
            mlp = swiglu_params(llm.hidden_size, llm.ffn_hidden_size)
        flops += per_layer_attn + 2 * seq * mlp
    return flops + 2 * seq * llm.vocab_size * llm.hidden_size  # output layer


def vision_forward_flops(v: VisionConfig) -> int:
    """One image."""
    n, h, f = v.num_patches + int(v.class_token), v.hidden_size, v.ffn_hidden_size
    patch_embed = 2 * v.num_patches * 3 * v.patch_size**2 * h
    per_layer = 2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h
    return patch_embed + v.layers_built * per_layer


def bottleneck_forward_flops(c_in: int, c_out: int, positions: int) -> int:
    """One C-Abstractor block over `positions` grid cells; SE acts on one pooled vector."""
    se = max(1, round(c_in * 0.25))
    convs = c_in * c_out + 9 * c_out + c_out * c_out + (0 if c_in == c_out else c_in * c_out)
    return 2 * positions * convs + 2 * 2 * c_out * se


def connector_forward_flops(c: ConnectorConfig, v: VisionConfig, llm_hidden: int) -> int:
    """One image."""
    hv, patches, k = v.hidden_size, v.num_patches, c.num_tokens
    if c.type == "c_abstractor":
        ch = c.hidden_size
        stage_in = sum(bottleneck_forward_flops(hv if i == 0 else ch, ch, patches)
                       for i in range(c.depth))
        stage_out = c.depth * bottleneck_forward_flops(ch, ch, k)
        readout = 2 * k * (ch * llm_hidden + (c.mlp_depth - 1) * llm_hidden * llm_hidden)
        return stage_in + stage_out + readout
    if c.type == "avg_pool":
        return 2 * k * hv * llm_hidden
    if c.type == "attn_pool":
        projections = 2 * (k * hv * hv + 2 * patches * hv * hv + k * hv * hv)
        return projections + 4 * k * patches * hv + 2 * k * hv * llm_hidden
    raise ValueError(f"connector.type: unknown connector {c.type!r}")


@dataclass(frozen=True)
class SequenceFlops:
    """Training FLOPs of one packed sequence, by component."""

    llm: int
    vision: int
    connector: int

    @property
    def total(self) -> int:
        return self.llm + self.vision + self.connector

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def training_flops_per_sequence(cfg: Config, images: Optional[int] = None) -> SequenceFlops:
    """`images`: encoder inputs per sequence; default the recipe's bound,
    `data.max_images_per_sequence` images of `vision.sub_images` each."""
    images = cfg.data.max_images_per_sequence * cfg.vision.sub_images if images is None \
        else images
    return SequenceFlops(
        llm=TRAIN_FACTOR * llm_forward_flops(cfg.llm, cfg.data.seq_length),
        vision=TRAIN_FACTOR * images * vision_forward_flops(cfg.vision),
        connector=TRAIN_FACTOR * images * connector_forward_flops(cfg.connector, cfg.vision,
                                                                  cfg.llm.hidden_size),
    )

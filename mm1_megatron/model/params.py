"""Analytic parameter counts per component, matching the Megatron-Core modules we build.

tests/model/test_params.py checks every formula against modules built on the meta device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mm1_megatron.config import Config, ConnectorConfig, LLMConfig, VisionConfig


def attention_params(llm: LLMConfig) -> int:
    q = llm.num_attention_heads * llm.head_dim
    kv = llm.query_groups * llm.head_dim
    return llm.hidden_size * (q + 2 * kv) + q * llm.hidden_size  # fused QKV + output proj


def swiglu_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # gate+up (fused fc1) and down (fc2), no biases


def expert_params(llm: LLMConfig) -> int:
    return swiglu_params(llm.hidden_size, llm.expert_ffn_hidden_size)


def decoder_layer_params(llm: LLMConfig, layer: int) -> int:
    norms = 2 * llm.hidden_size  # RMSNorm before attention and before the MLP
    if llm.is_moe_layer(layer):
        e = llm.moe.num_experts
        mlp = e * llm.hidden_size + e * expert_params(llm)  # router + experts
    else:
        mlp = swiglu_params(llm.hidden_size, llm.ffn_hidden_size)
    return norms + attention_params(llm) + mlp


def embedding_params(llm: LLMConfig) -> int:
    """Input embedding plus the output layer when it is not tied."""
    return llm.vocab_size * llm.hidden_size * (1 if llm.tie_embeddings else 2)


def llm_params(llm: LLMConfig) -> int:
    layers = sum(decoder_layer_params(llm, i) for i in range(llm.num_layers))
    return embedding_params(llm) + layers + llm.hidden_size  # + final RMSNorm


def llm_inactive_params(llm: LLMConfig) -> int:
    """Expert parameters a token does not visit (all but top_k experts per MoE layer)."""
    idle = max(llm.moe.num_experts - llm.moe.top_k, 0)
    return llm.num_moe_layers * idle * expert_params(llm)


def vision_layer_params(v: VisionConfig) -> int:
    h, f = v.hidden_size, v.ffn_hidden_size
    norms = 2 * 2 * h  # two LayerNorms with bias
    return norms + (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h)


def vision_params(v: VisionConfig) -> int:
    h, cls = v.hidden_size, int(v.class_token)
    patch_embed = 3 * v.patch_size**2 * h  # conv, no bias (CLIP)
    positions = (v.num_patches + cls) * h
    return patch_embed + positions + cls * h + 2 * h + v.layers_built * vision_layer_params(v)


def bottleneck_params(c_in: int, c_out: int) -> int:
    se = max(1, round(c_in * 0.25))
    convs = c_in * c_out + 9 * c_out + c_out * c_out
    squeeze = (c_out * se + se) + (se * c_out + c_out)
    shortcut = 0 if c_in == c_out else c_in * c_out + 2 * c_out
    return convs + 3 * 2 * c_out + squeeze + shortcut


def connector_params(c: ConnectorConfig, v: VisionConfig, llm_hidden: int) -> int:
    hv = v.hidden_size
    if c.type == "c_abstractor":
        blocks = sum(bottleneck_params(hv if i == 0 else c.hidden_size, c.hidden_size)
                     for i in range(c.depth))
        blocks += c.depth * bottleneck_params(c.hidden_size, c.hidden_size)
        readout = (c.hidden_size * llm_hidden + llm_hidden
                   + (c.mlp_depth - 1) * (llm_hidden * llm_hidden + llm_hidden))
        return (v.num_patches * hv if c.pos_emb else 0) + blocks + readout
    if c.type == "avg_pool":
        return hv * llm_hidden + llm_hidden
    if c.type == "attn_pool":
        attention = 4 * hv * hv + 4 * hv
        return c.num_tokens * hv + attention + 2 * hv + hv * llm_hidden + llm_hidden
    raise ValueError(f"connector.type: unknown connector {c.type!r}")


@dataclass(frozen=True)
class ParamCounts:
    vision: int
    connector: int
    llm: int
    llm_embedding: int
    llm_inactive: int

    @property
    def total(self) -> int:
        return self.vision + self.connector + self.llm

    @property
    def active(self) -> int:
        """Parameters one token touches (MoE: top_k experts per MoE layer)."""
        return self.total - self.llm_inactive

    @property
    def non_embedding(self) -> int:
        """LLM parameters without input embedding and output layer: the paper's N for the LR."""
        return self.llm - self.llm_embedding

    @property
    def non_embedding_active(self) -> int:
        """Non-embedding LLM parameters one token touches; the LR rule's N (= N when dense)."""
        return self.non_embedding - self.llm_inactive

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "active": self.active,
                "non_embedding": self.non_embedding,
                "non_embedding_active": self.non_embedding_active}


def count_params(cfg: Config) -> ParamCounts:
    return ParamCounts(
        vision=vision_params(cfg.vision),
        connector=connector_params(cfg.connector, cfg.vision, cfg.llm.hidden_size),
        llm=llm_params(cfg.llm),
        llm_embedding=embedding_params(cfg.llm),
        llm_inactive=llm_inactive_params(cfg.llm),
    )

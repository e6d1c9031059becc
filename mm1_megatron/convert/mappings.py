"""Megatron <-> HuggingFace name mappings: one declarative table per component.

A `Rule` maps one Megatron dist-checkpoint tensor (its global ShardedTensor key, templated by
layer `{i}` and expert `{e}`) to one or more HF tensors (relative to the component's HF
prefix) with a `kind` of transform:

  copy         the same tensor
  qkv          Megatron's fused QKV, interleaved per query group [q heads of g, k_g, v_g]
               <-> q_proj, k_proj, v_proj
  glu          Megatron's gated fc1 [gate; up] <-> gate_proj, up_proj
  class_token  [1, 1, h] <-> [h]

Megatron keys can be stored per layer (`layers.3.x`) or stacked along a leading layer / expert
axis (`layers.x` [L, ...], `experts.experts.x` [E, ...]); `expand()` turns the tables into
concrete `Item`s and `resolve()` finds which form a checkpoint holds.

`OPEN_CLIP_VISION*` name open_clip's vision tower in HF CLIP terms: the importer reads an
open_clip checkpoint through them, then takes the HF path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mm1_megatron.config import Config


class ConvertError(RuntimeError):
    """A conversion problem with one clear, one-line reason."""


@dataclass(frozen=True)
class Rule:
    megatron: str
    hf: tuple[str, ...]
    kind: str = "copy"


def R(megatron: str, *hf: str, kind: str = "copy") -> Rule:
    return Rule(megatron, tuple(hf), kind)


# ---------------------------------------------------------------------------- the tables

VISION = [
    R("vision.class_token", "embeddings.class_embedding", kind="class_token"),
    R("vision.conv1.weight", "embeddings.patch_embedding.weight"),
    R("vision.position_embeddings.weight", "embeddings.position_embedding.weight"),
    R("vision.ln_pre.weight", "pre_layrnorm.weight"),
    R("vision.ln_pre.bias", "pre_layrnorm.bias"),
]
_VL = "vision.decoder.layers.{i}."
_HL = "encoder.layers.{i}."
VISION_LAYER = [
    R(_VL + "input_layernorm.weight", _HL + "layer_norm1.weight"),
    R(_VL + "input_layernorm.bias", _HL + "layer_norm1.bias"),
    R(_VL + "self_attention.linear_qkv.weight", *(_HL + f"self_attn.{p}_proj.weight"
                                                  for p in "qkv"), kind="qkv"),
    R(_VL + "self_attention.linear_qkv.bias", *(_HL + f"self_attn.{p}_proj.bias"
                                                for p in "qkv"), kind="qkv"),
    R(_VL + "self_attention.linear_proj.weight", _HL + "self_attn.out_proj.weight"),
    R(_VL + "self_attention.linear_proj.bias", _HL + "self_attn.out_proj.bias"),
    R(_VL + "pre_mlp_layernorm.weight", _HL + "layer_norm2.weight"),
    R(_VL + "pre_mlp_layernorm.bias", _HL + "layer_norm2.bias"),
    R(_VL + "mlp.linear_fc1.weight", _HL + "mlp.fc1.weight"),
    R(_VL + "mlp.linear_fc1.bias", _HL + "mlp.fc1.bias"),
    R(_VL + "mlp.linear_fc2.weight", _HL + "mlp.fc2.weight"),
    R(_VL + "mlp.linear_fc2.bias", _HL + "mlp.fc2.bias"),
]
# The connector is the same torch module on both sides: names map one to one (see `expand`).

# open_clip's vision tower (`visual.*`, DFN5B's `open_clip_pytorch_model.bin`) under HF
# CLIPVisionModel names (relative to `vision_model.`), so one path (checks, QKV fusion,
# interpolation) serves both: (HF name, open_clip name, row third of open_clip's stacked
# nn.MultiheadAttention in_proj [q; k; v] or None for the whole tensor).
OPEN_CLIP_VISION = [
    ("embeddings.class_embedding", "visual.class_embedding", None),
    ("embeddings.patch_embedding.weight", "visual.conv1.weight", None),
    ("embeddings.position_embedding.weight", "visual.positional_embedding", None),
    ("pre_layrnorm.weight", "visual.ln_pre.weight", None),
    ("pre_layrnorm.bias", "visual.ln_pre.bias", None),
    ("post_layernorm.weight", "visual.ln_post.weight", None),  # after our features: unused
    ("post_layernorm.bias", "visual.ln_post.bias", None),
]
_OL = "visual.transformer.resblocks.{i}."
OPEN_CLIP_VISION_LAYER = [
    (_HL + "layer_norm1.weight", _OL + "ln_1.weight", None),
    (_HL + "layer_norm1.bias", _OL + "ln_1.bias", None),
    *((_HL + f"self_attn.{p}_proj.{w}", _OL + f"attn.in_proj_{w}", j)
      for w in ("weight", "bias") for j, p in enumerate("qkv")),
    (_HL + "self_attn.out_proj.weight", _OL + "attn.out_proj.weight", None),
    (_HL + "self_attn.out_proj.bias", _OL + "attn.out_proj.bias", None),
    (_HL + "layer_norm2.weight", _OL + "ln_2.weight", None),
    (_HL + "layer_norm2.bias", _OL + "ln_2.bias", None),
    (_HL + "mlp.fc1.weight", _OL + "mlp.c_fc.weight", None),
    (_HL + "mlp.fc1.bias", _OL + "mlp.c_fc.bias", None),
    (_HL + "mlp.fc2.weight", _OL + "mlp.c_proj.weight", None),
    (_HL + "mlp.fc2.bias", _OL + "mlp.c_proj.bias", None),
]

LLM = [
    R("language_model.embedding.word_embeddings.weight", "embed_tokens.weight"),
    R("language_model.decoder.final_layernorm.weight", "norm.weight"),
]
HEAD = [R("language_model.output_layer.weight", "lm_head.weight")]
_LL = "language_model.decoder.layers.{i}."
_TL = "layers.{i}."
LLM_LAYER = [
    R(_LL + "self_attention.linear_qkv.layer_norm_weight", _TL + "input_layernorm.weight"),
    R(_LL + "self_attention.linear_qkv.weight", *(_TL + f"self_attn.{p}_proj.weight"
                                                  for p in "qkv"), kind="qkv"),
    R(_LL + "self_attention.linear_proj.weight", _TL + "self_attn.o_proj.weight"),
    R(_LL + "mlp.linear_fc1.layer_norm_weight", _TL + "post_attention_layernorm.weight"),
]
DENSE_MLP = [
    R(_LL + "mlp.linear_fc1.weight", _TL + "mlp.gate_proj.weight", _TL + "mlp.up_proj.weight",
      kind="glu"),
    R(_LL + "mlp.linear_fc2.weight", _TL + "mlp.down_proj.weight"),
]
_EX = _LL + "mlp.experts.experts."
_HX = _TL + "mlp.experts.{e}."
MOE_MLP = [
    R(_LL + "mlp.router.weight", _TL + "mlp.gate.weight"),
]
MOE_EXPERT = [
    R(_EX + "linear_fc1.weight", _HX + "gate_proj.weight", _HX + "up_proj.weight", kind="glu"),
    R(_EX + "linear_fc2.weight", _HX + "down_proj.weight"),
]

# Other spellings of the same tensor in other Megatron-Core versions / layer specs.
ALIASES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}

# HF prefixes per target.
MM1_PREFIXES = {"vision": "vision_tower.", "connector": "connector.", "llm": "language_model.",
                "head": ""}
LLAMA_PREFIXES = {"llm": "model.", "head": ""}


def open_clip_names(layers: int) -> dict[str, tuple[str, Optional[int]]]:
    """HF CLIPVisionModel name (relative to `vision_model.`) -> (open_clip name, in_proj third)
    for a vision tower of `layers` resblocks."""
    out = {hf: (oc, part) for hf, oc, part in OPEN_CLIP_VISION}
    for i in range(layers):
        out.update({hf.format(i=i): (oc.format(i=i), part)
                    for hf, oc, part in OPEN_CLIP_VISION_LAYER})
    return out


# ---------------------------------------------------------------------------- expansion


@dataclass
class Item:
    """One Megatron source tensor (template) and the HF tensors it becomes."""

    megatron: str  # concrete key, per-layer / per-expert form
    hf: tuple[str, ...]
    kind: str
    layer: Optional[int] = None  # for stacked-key fallback
    expert: Optional[int] = None
    heads: int = 0  # for qkv
    groups: int = 0
    # Resolved against the checkpoint: key in the checkpoint and index along leading axes.
    key: str = ""
    index: tuple[int, ...] = field(default_factory=tuple)


def expand(cfg: Config, prefixes: dict[str, str],
           connector_keys: Sequence[str] = ()) -> list[Item]:
    """The concrete items of `cfg` for the components in `prefixes` (in HF order). The
    connector has no table: it is the same torch module on both sides, so its names
    (`connector_keys`, from the HF model) map one to one."""
    items: list[Item] = []
    v, llm = cfg.vision, cfg.llm

    def add(rules, prefix, i=None, e=None, heads=0, groups=0):
        for r in rules:
            fmt = dict(i=i, e=e)
            hf = tuple(prefix + h.format(**fmt) for h in r.hf)
            items.append(Item(r.megatron.format(**fmt), hf, r.kind, i, e, heads, groups))

    if "vision" in prefixes:
        p = prefixes["vision"]
        add([r for r in VISION if r.kind != "class_token" or v.class_token], p)
        for i in range(v.layers_built):
            add(VISION_LAYER, p, i, heads=v.num_attention_heads, groups=v.num_attention_heads)
    if "connector" in prefixes:
        p = prefixes["connector"]
        for key in connector_keys:
            items.append(Item(key, (p + key[len("connector."):],), "copy"))
    if "llm" in prefixes:
        p = prefixes["llm"]
        add(LLM[:1], p)
        for i in range(llm.num_layers):
            add(LLM_LAYER, p, i, heads=llm.num_attention_heads, groups=llm.query_groups)
            if llm.is_moe_layer(i):
                add(MOE_MLP, p, i)
                for e in range(llm.moe.num_experts):
                    add(MOE_EXPERT, p, i, e)
            else:
                add(DENSE_MLP, p, i)
        add(LLM[1:], p)
    if "head" in prefixes:
        head = HEAD if not cfg.llm.tie_embeddings else \
            [R(LLM[0].megatron, HEAD[0].hf[0])]  # tied: the head is the input embedding
        add(head, prefixes["head"])
    return items


def candidates(item: Item) -> list[tuple[str, tuple[int, ...]]]:
    """(checkpoint key, leading index) forms this item may be stored under, best first."""
    keys = [item.megatron]
    for new, old in ALIASES.items():
        if new in item.megatron:
            keys.append(item.megatron.replace(new, old))
    out: list[tuple[str, tuple[int, ...]]] = []
    for key in keys:
        if item.expert is not None:
            local = key.replace(".experts.experts.", f".experts.local_experts.{item.expert}.")
            out += [(key, (item.expert,)), (local, ())]
            stacked_layers = local.replace(f"layers.{item.layer}.", "layers.")
            out.append((key.replace(f"layers.{item.layer}.", "layers."),
                        (item.layer, item.expert)))
            out.append((stacked_layers, (item.layer,)))
        else:
            out.append((key, ()))
            if item.layer is not None:
                out.append((key.replace(f"layers.{item.layer}.", "layers."), (item.layer,)))
    return out


# ---------------------------------------------------------------------------- transforms


def to_hf(item: Item, t: torch.Tensor) -> list[torch.Tensor]:
    if item.kind == "copy":
        return [t]
    if item.kind == "class_token":
        return [t.reshape(t.shape[-1])]
    if item.kind == "glu":
        gate, up = torch.chunk(t, 2, dim=0)
        return [gate.contiguous(), up.contiguous()]
    if item.kind == "qkv":
        per_group = item.heads // item.groups
        d = t.shape[0] // (item.groups * (per_group + 2))
        x = t.reshape(item.groups, per_group + 2, d, *t.shape[1:])
        q = x[:, :per_group].reshape(item.heads * d, *t.shape[1:])
        k = x[:, per_group].reshape(item.groups * d, *t.shape[1:])
        v = x[:, per_group + 1].reshape(item.groups * d, *t.shape[1:])
        return [q.contiguous(), k.contiguous(), v.contiguous()]
    raise ValueError(item.kind)


def from_hf(item: Item, ts: Sequence[torch.Tensor]) -> torch.Tensor:
    if item.kind == "copy":
        return ts[0]
    if item.kind == "class_token":
        return ts[0].reshape(1, 1, -1)
    if item.kind == "glu":
        return torch.cat(list(ts), dim=0)
    if item.kind == "qkv":
        q, k, v = ts
        g = item.groups
        d = k.shape[0] // g
        rest = q.shape[1:]
        x = torch.cat([q.reshape(g, (item.heads // g) * d, *rest), k.reshape(g, d, *rest),
                       v.reshape(g, d, *rest)], dim=1)
        return x.reshape(-1, *rest).contiguous()
    raise ValueError(item.kind)


def megatron_shape(item: Item, hf_shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """The Megatron tensor shape that yields these HF shapes."""
    metas = [torch.empty(s, device="meta") for s in hf_shapes]
    return tuple(from_hf(item, metas).shape)


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)

"""What the import checks of its sources before a model is built: a CLIP's or a Llama's
config and tensor shapes against the MM1 config (`check_clip`, `check_llama`, refusing a
mismatch rather than guessing), the vision tensors MM1's ViT cannot hold
(`stray_vision_tensors`), and the one-line summary of the source tensors left unused
(`unused_summary`, with `is_text_tower` to count a CLIP's text tower as one part).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Callable, Iterable, Optional, Sequence

from mm1_megatron.config import Config
from mm1_megatron.convert.mappings import ConvertError
from mm1_megatron.convert.source_weights import HFWeights


def clip_vision_prefix(w) -> str:
    """Where a CLIP source's vision tensors start: `vision_model.` (CLIPModel) or nothing."""
    for p in ("vision_model.", ""):
        if p + "embeddings.patch_embedding.weight" in w:
            return p
    raise ConvertError(f"{w.path}: not a CLIP vision model (no embeddings.patch_embedding)")


def _check_fields(what: str, src: dict, expect: dict, names: Optional[dict] = None) -> None:
    for key, (field, value) in expect.items():
        got = src.get(key)
        if got is not None and got != value:
            raise ConvertError(f"config mismatch: {what} has {(names or {}).get(key, key)}="
                               f"{got}, {field}={value}")


def check_clip(cfg: Config, w, prefix: str) -> int:
    """Refuse a CLIP of another shape or activation; returns the source's image size (from
    its position table, which is what the weights were trained at)."""
    if not w.config:
        raise ConvertError(f"{w.config_file}: missing; the CLIP's config is needed "
                           "(hidden_act, shapes)")
    src = w.config.get("vision_config", w.config)
    v = cfg.vision
    names = getattr(w, "field_names", None)
    _check_fields(f"{w.config_file}", src, {
        "hidden_size": ("vision.hidden_size", v.hidden_size),
        "intermediate_size": ("vision.ffn_hidden_size", v.ffn_hidden_size),
        "num_attention_heads": ("vision.num_attention_heads", v.num_attention_heads),
        "patch_size": ("vision.patch_size", v.patch_size),
        "layer_norm_eps": ("vision.layernorm_eps", v.layernorm_eps)}, names)
    if src.get("num_hidden_layers", v.layers_built) < v.layers_built:
        raise ConvertError(f"config mismatch: {w.config_file} has {src['num_hidden_layers']} "
                           f"layers, vision.feature_layer needs {v.layers_built}")
    # Never guessed: transformers defaults a missing hidden_act to quick_gelu, older
    # exporters meant gelu, and the two give different features.
    act = src.get("hidden_act")
    if act is None:
        raise ConvertError(f"{w.config_file}: no hidden_act in the vision config; "
                           "add it (DFN5B / OpenAI CLIP: quick_gelu)")
    if act != v.activation:
        said = f"quick_gelu={act == 'quick_gelu'} ({act})" if names else f"hidden_act={act!r}"
        raise ConvertError(f"config mismatch: {w.config_file} has {said}, "
                           f"vision.activation={v.activation!r}")
    rows = w.get(prefix + "embeddings.position_embedding.weight").shape[0]
    patch = w.get(prefix + "embeddings.patch_embedding.weight").shape[-1]
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise ConvertError(f"{w.path / w.source}: position table of {rows} rows is not a "
                           "class token + a square grid")
    size = grid * patch
    if src.get("image_size", size) != size:
        key = (names or {}).get("image_size", "image_size")
        raise ConvertError(f"config mismatch: {w.config_file} has {key}={src['image_size']}, "
                           f"its position table is for {size} px ({grid}x{grid} patches)")
    return size


def is_text_tower(name: str) -> bool:
    """CLIP text-tower tensors: HF `text_model.*`; open_clip's top-level text names."""
    return name.startswith("text_model.") or not (
        name.startswith(("vision_model.", "visual.", "visual_projection", "text_projection",
                         "logit_", "embeddings.", "encoder.", "pre_layrnorm.",
                         "post_layernorm.")))


_LAYER = re.compile(r"^(.*?(?:layers|resblocks)\.)(\d+)\.(.+)$")


def _braced(stem: str, leaves: Sequence[str]) -> str:
    leaves = sorted(set(leaves))
    return stem + (leaves[0] if len(leaves) == 1 else "{" + ",".join(leaves) + "}")


def unused_summary(names: Iterable[str], text_tower: Callable[[str], bool] = lambda n: False,
                   max_parts: int = 10) -> str:
    """One short line for many tensor names: the text tower as a count, layer ranges as
    `prefix{a-b}.leaf`, siblings as `stem.{weight,bias}`."""
    names = sorted(names)
    if not names:
        return "none"
    parts: list[str] = []
    text = [n for n in names if text_tower(n)]
    if text:
        heads: dict[str, list[str]] = defaultdict(list)
        for n in text:
            heads[n.split(".")[0]].append(n)
        shown = [h + ".*" if len(ns) > 1 else ns[0]
                 for h, ns in sorted(heads.items(), key=lambda kv: -len(kv[1]))]
        parts.append(f"{len(text)} text tower ({', '.join(shown)})")
    layers: dict[str, list[tuple[int, str]]] = defaultdict(list)
    stems: dict[str, list[str]] = defaultdict(list)
    for n in names:
        if text_tower(n):
            continue
        m = _LAYER.match(n)
        if m:
            layers[m.group(1)].append((int(m.group(2)), m.group(3)))
        elif "." in n:
            stem, _, leaf = n.rpartition(".")
            stems[stem + "."].append(leaf)
        else:
            stems[n].append("")  # a top-level name (logit_scale) stands alone
    for prefix, found in layers.items():
        idx = sorted({i for i, _ in found})
        span = str(idx[0]) if len(idx) == 1 else "{%d-%d}" % (idx[0], idx[-1]) \
            if idx == list(range(idx[0], idx[-1] + 1)) else "{" + ",".join(map(str, idx)) + "}"
        leaves = sorted({leaf for _, leaf in found})
        tail = _braced("", leaves) if len(leaves) <= 4 else "*"
        parts.append(f"{len(found)} in {prefix}{span}.{tail}")
    parts += sorted(_braced(stem, leaves) for stem, leaves in stems.items())
    if len(parts) > max_parts:
        parts = parts[:max_parts] + [f"+{len(parts) - max_parts} more"]
    return ", ".join(parts)


def check_llama(cfg: Config, w: HFWeights) -> dict:
    src, llm = w.config, cfg.llm
    _check_fields(f"{w.path}", src, {
        "hidden_size": ("llm.hidden_size", llm.hidden_size),
        "intermediate_size": ("llm.ffn_hidden_size", llm.ffn_hidden_size),
        "num_hidden_layers": ("llm.num_layers", llm.num_layers),
        "num_attention_heads": ("llm.num_attention_heads", llm.num_attention_heads),
        "num_key_value_heads": ("llm.num_query_groups", llm.query_groups),
        "vocab_size": ("llm.vocab_size", llm.vocab_size),
        "rms_norm_eps": ("llm.norm_eps", llm.norm_eps)})
    theta = (src.get("rope_parameters") or {}).get("rope_theta", src.get("rope_theta"))
    if theta is not None and float(theta) != float(llm.rope_theta):
        raise ConvertError(f"config mismatch: {w.path} has rope_theta={theta}, "
                           f"llm.rope_theta={llm.rope_theta}")
    if llm.moe.num_experts:
        raise ConvertError("--llama: llm.moe.num_experts > 0; a dense Llama cannot fill the "
                           "experts (import it into the dense preset, or use --mm1)")
    return src


def stray_vision_tensors(unused: Iterable[str], layers_built: int) -> list[str]:
    """Unused tensors inside the layers we build: an architecture MM1's ViT cannot express
    (layer scale, q/k norms, ...), which a silent import would drop."""
    out = []
    for n in sorted(unused):
        m = _LAYER.match(n)
        if m and not is_text_tower(n) and int(m.group(2)) < layers_built:
            out.append(n)
    return out

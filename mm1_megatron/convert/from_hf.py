"""Import HuggingFace / open_clip weights into a Megatron MM1 checkpoint (pre-training init).

    mm1-import-hf OUT --preset NAME [key=value ...] --clip DIR --llama DIR   # paper's init
    mm1-import-hf OUT --preset NAME [key=value ...] --mm1 DIR               # an exported MM1

Formats (found from the files in DIR):
  --clip   the ViT, as `vision.*`, in every format DFN5B-CLIP-ViT-H-14-378 ships:
           - transformers CLIPModel / CLIPVisionModel: config.json + model.safetensors,
             sharded model.safetensors.index.json, pytorch_model.bin or sharded
             pytorch_model.bin.index.json;
           - open_clip: open_clip_pytorch_model.bin (or open_clip_model.safetensors), `visual.*`
             names, + its model config open_clip_config.json ({"model_cfg": {...}} or the bare
             model config, e.g. ViT-H-14-378-quickgelu.json).
           A DIR holding both is read as HF (the log says which was used). The activation must
           be stated (HF `hidden_act`, open_clip `quick_gelu`) and match vision.activation.
           The position table is interpolated when the source's image size differs from
           vision.image_size; the parity check then runs at the source's size.
  --llama  a Llama-style LlamaForCausalLM directory matching `llm.*` (safetensors or .bin).
  --mm1    a directory written by mm1-convert-hf.
`.bin` files are read with torch.load(weights_only=True): tensors only, never arbitrary pickle.
Parts not given (the connector always, with --clip/--llama) keep Megatron's fresh
initialisation (`train.seed`). The checkpoint is written like the trainer's
(`OUT/checkpoints/step_00000000/` + `latest`, model only) and checked on the Megatron model
loaded back from it: CLIP features and Llama / MM1 logits against the source (fp32, max |diff|
<= 1e-3; for CLIP features at most 1e-5 of their largest value when that is larger). One line
names the source tensors not used (text tower, projections, post-layernorm, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from mm1_megatron.checkpoint.directory import complete_checkpoints, write_latest
from mm1_megatron.config import Config, ConfigError, load_config
from mm1_megatron.convert.mappings import (LLAMA_PREFIXES, MM1_PREFIXES, ConvertError, Item,
                                           candidates, expand, from_hf, open_clip_names)
from mm1_megatron.convert.verify import (LOGIT_TOL, megatron_logits, megatron_model,
                                         open_clip_vision_features, probe, reference_config)


# ---------------------------------------------------------------------------- source side

HF_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors",
                   "pytorch_model.bin.index.json", "pytorch_model.bin")  # preference order
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"


def _first_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConvertError(f"{path}: not readable JSON ({_first_line(err)})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return data


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict through torch.load(weights_only=True): tensors and plain containers
    only, never arbitrary pickle. Memory-mapped where the file allows (zip format), so a 4 GB
    checkpoint is read tensor by tensor."""
    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy format
    except Exception as err:  # noqa: BLE001 - the refusal (or corruption) in one line
        # torch's refusal opens with advice to unpickle anyway; the line naming what the
        # file wants to run is the one worth showing.
        why = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln), None)
        raise ConvertError(f"{path}: torch.load(weights_only=True) cannot read it "
                           f"({why or _first_line(err)}); not loaded as plain pickle") from None
    # open_clip training checkpoints wrap the weights: {"state_dict": {"module.visual...": }}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k[len("module."):] if k.startswith("module.") else k: v
               for k, v in (obj.items() if isinstance(obj, dict) else ())
               if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConvertError(f"{path}: holds no state dict of tensors")
    return tensors


class _TensorFile:
    """One weights file read lazily: safetensors through safe_open, `.bin` through
    `_torch_load`."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ConvertError(f"{path}: shard file is missing")
        if path.name.endswith(".safetensors"):
            from safetensors import safe_open

            try:
                self._st = safe_open(str(path), "pt")
            except Exception as err:  # noqa: BLE001
                raise ConvertError(f"{path}: not a readable safetensors file "
                                   f"({_first_line(err)})") from None
            self.keys = list(self._st.keys())
        else:
            self._sd = _torch_load(path)
            self.keys = list(self._sd)

    def get(self, name: str) -> torch.Tensor:
        return self._st.get_tensor(name) if hasattr(self, "_st") else self._sd[name]


class HFWeights:
    """A HF directory's weights, by the first of `HF_WEIGHT_FILES` present (safetensors or
    pytorch_model.bin, single file or sharded with an index), and its config.json."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        found = [f for f in HF_WEIGHT_FILES if (self.path / f).is_file()]
        if not found:
            raise ConvertError(f"{self.path}: no weights found (none of "
                               f"{', '.join(HF_WEIGHT_FILES)})")
        self.source = found[0]
        self._files: dict[str, _TensorFile] = {}
        if self.source.endswith(".index.json"):
            weight_map = _read_json(self.path / self.source).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{self.path / self.source}: no weight_map")
            self.weight_map: dict[str, str] = weight_map
        else:
            f = self._file(self.source)
            self.weight_map = {k: self.source for k in f.keys}
        self.config_file = self.path / "config.json"
        self.config = _read_json(self.config_file) if self.config_file.is_file() else {}
        self.used: set[str] = set()
        self.also: Optional[str] = None  # an open_clip file beside it, left unread

    def _file(self, name: str) -> _TensorFile:
        if name not in self._files:
            self._files[name] = _TensorFile(self.path / name)
        return self._files[name]

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConvertError(f"{self.path}: has no tensor {name}")
        self.used.add(name)
        return self._file(self.weight_map[name]).get(name)

    def label(self, name: str) -> str:
        return name

    def describe(self) -> str:
        kind = "CLIPModel" if "vision_config" in self.config else \
            (self.config.get("architectures") or ["HF model"])[0]
        return f"{kind} ({self.source})"


# open_clip vision_cfg fields that change the architecture away from MM1's plain pre-LN CLIP
# ViT, with the value that keeps it (refused otherwise: no tensor of ours could express them).
_OPEN_CLIP_PLAIN = {"ls_init_value": None, "no_ln_pre": False, "attentional_pool": False,
                    "pos_embed_type": "learnable", "timm_model_name": None, "qk_norm": False,
                    "scaled_cosine_attn": False, "scale_heads": False,
                    "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
                    "input_patchnorm": False, "act_kwargs": None}


def _open_clip_config_file(d: Path, weights: str) -> Path:
    if (d / OPEN_CLIP_CONFIG).is_file():
        return d / OPEN_CLIP_CONFIG
    found = []
    for f in sorted(d.glob("*.json")):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            continue
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "vision_cfg" in (data.get("model_cfg") or data):
            found.append(f)
    if len(found) == 1:
        return found[0]
    if found:
        raise ConvertError(f"{d}: several open_clip model configs ("
                           f"{', '.join(f.name for f in found)}); keep the one of {weights}")
    raise ConvertError(f"{d}: {weights} needs its open_clip model config beside it "
                       f"({OPEN_CLIP_CONFIG}, or the model's JSON with a vision_cfg)")


def _open_clip_vision_config(file: Path) -> tuple[dict, dict]:
    """open_clip model config -> (HF-style vision config, HF key -> open_clip field name)."""
    data = _read_json(file)
    model = data.get("model_cfg", data)
    vc = model.get("vision_cfg") if isinstance(model, dict) else None
    if not isinstance(vc, dict):
        raise ConvertError(f"{file}: no vision_cfg (neither model_cfg.vision_cfg nor "
                           "vision_cfg): not an open_clip model config")
    # Never guessed: open_clip's default without the flag is exact GELU, but DFN5B (like
    # OpenAI's CLIP) was trained with quick_gelu; the two give different features.
    if "quick_gelu" not in model:
        raise ConvertError(f'{file}: no "quick_gelu" in the model config; add '
                           '"quick_gelu": true|false (DFN5B ViT-H-14-378-quickgelu: true)')
    for key, plain in _OPEN_CLIP_PLAIN.items():
        if vc.get(key, plain) not in (plain, None, False, {}):
            raise ConvertError(f"{file}: vision_cfg.{key}={vc[key]!r} is not supported "
                               "(MM1's ViT is a plain pre-LN CLIP ViT)")
    for key in ("layers", "width", "patch_size", "image_size"):
        if not isinstance(vc.get(key), int):
            raise ConvertError(f"{file}: vision_cfg.{key} must be one integer, got "
                               f"{vc.get(key)!r}")
    width, head_width = vc["width"], vc.get("head_width", 64)  # open_clip's defaults
    if width % head_width:
        raise ConvertError(f"{file}: vision_cfg.width={width} is not a multiple of "
                           f"head_width={head_width}")
    src = {"hidden_size": width,
           "intermediate_size": int(width * vc.get("mlp_ratio", 4.0)),
           "num_attention_heads": width // head_width,
           "num_hidden_layers": vc["layers"],
           "patch_size": vc["patch_size"],
           "image_size": vc["image_size"],
           "layer_norm_eps": (vc.get("norm_kwargs") or {}).get("eps", 1e-5),  # nn.LayerNorm
           "hidden_act": "quick_gelu" if model["quick_gelu"] else "gelu"}
    names = {"hidden_size": "vision_cfg.width", "intermediate_size": "vision_cfg.mlp_ratio*width",
             "num_attention_heads": "vision_cfg.width/head_width",
             "num_hidden_layers": "vision_cfg.layers", "patch_size": "vision_cfg.patch_size",
             "image_size": "vision_cfg.image_size", "layer_norm_eps": "norm_kwargs.eps",
             "hidden_act": "quick_gelu"}
    return src, names


class OpenClipWeights:
    """An open_clip checkpoint seen under HF CLIPVisionModel names (`vision_model.*`, see
    mappings.OPEN_CLIP_VISION), its model config as a HF vision config: the HF path (checks,
    QKV fusion, interpolation) then serves both. `used` holds open_clip names."""

    def __init__(self, path: str | Path, weights: str):
        self.path = Path(path)
        self.source = weights
        self.config_file = _open_clip_config_file(self.path, weights)
        self.config, self.field_names = _open_clip_vision_config(self.config_file)
        self._file = _TensorFile(self.path / weights)
        have = set(self._file.keys)
        blocks = {int(m.group(1)) for k in have
                  if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))}
        if "visual.conv1.weight" not in have:
            raise ConvertError(f"{self.path / weights}: no visual.conv1.weight: not an "
                               "open_clip ViT checkpoint")
        if len(blocks) != self.config["num_hidden_layers"]:
            raise ConvertError(f"config mismatch: {self.path / weights} has {len(blocks)} "
                               f"visual resblocks, {self.config_file.name} vision_cfg.layers="
                               f"{self.config['num_hidden_layers']}")
        self._map = {"vision_model." + hf: src for hf, src in open_clip_names(len(blocks)).items()
                     if src[0] in have}
        self.used: set[str] = set()

    def names(self) -> list[str]:
        return list(self._file.keys)

    def __contains__(self, name: str) -> bool:
        return name in self._map

    def raw(self, name: str) -> torch.Tensor:
        """A tensor by its open_clip name."""
        return self._file.get(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._map:
            raise ConvertError(f"{self.path / self.source}: has no tensor for {name}")
        oc, part = self._map[name]
        self.used.add(oc)
        t = self._file.get(oc)
        if part is not None:  # nn.MultiheadAttention's in_proj stacks [q; k; v] on rows
            if t.shape[0] % 3:
                raise ConvertError(f"{self.path / self.source}: {oc} has {t.shape[0]} rows, "
                                   "not 3 x width")
            t = t.chunk(3, dim=0)[part]
        return t

    def label(self, name: str) -> str:
        """The open_clip name behind a HF name."""
        return self._map[name][0] if name in self._map else name

    def describe(self) -> str:
        return f"open_clip ({self.source} + {self.config_file.name})"


def clip_weights(path: str | Path) -> HFWeights | OpenClipWeights:
    """The CLIP source in `path`, by the files present: HF first, then open_clip."""
    d = Path(path)
    if not d.is_dir():
        raise ConvertError(f"--clip {d}: not a directory")
    hf = [f for f in HF_WEIGHT_FILES if (d / f).is_file()]
    oc = [f for f in OPEN_CLIP_WEIGHT_FILES if (d / f).is_file()]
    if hf:
        w = HFWeights(d)
        w.also = oc[0] if oc else None
        return w
    if oc:
        return OpenClipWeights(d, oc[0])
    raise ConvertError(f"{d}: no CLIP weights (none of "
                       f"{', '.join(HF_WEIGHT_FILES + OPEN_CLIP_WEIGHT_FILES)})")


def _clip_prefix(w) -> str:
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


def _check_clip(cfg: Config, w, prefix: str) -> int:
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


def _is_text_tower(name: str) -> bool:
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


def _check_llama(cfg: Config, w: HFWeights) -> dict:
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


# ---------------------------------------------------------------------------- Megatron side


def _local_name(item: Item, local: dict) -> str:
    for key, index in candidates(item):
        if not index and key in local:
            return key
    raise ConvertError(f"internal: no local parameter for {item.megatron}")


def _assign(items: list[Item], hf, prefix_swap: tuple[str, str], local: dict,
            adapt=None) -> int:
    n = 0
    for it in items:
        names = [prefix_swap[1] + h[len(prefix_swap[0]):] for h in it.hf]
        if names == ["lm_head.weight"] and names[0] not in hf and "model.embed_tokens.weight" in hf:
            names = ["model.embed_tokens.weight"]  # a source with tied embeddings
        tensors = [hf.get(name) for name in names]
        if adapt is not None:
            tensors = adapt(it, tensors)
        value = from_hf(it, tensors)
        name = _local_name(it, local)
        if tuple(value.shape) != tuple(local[name].shape):
            raise ConvertError(f"config mismatch: {hf.path} tensor {hf.label(names[0])} gives "
                               f"{tuple(value.shape)} for {name}, the config expects "
                               f"{tuple(local[name].shape)}")
        local[name] = value.to(local[name].dtype)
        n += 1
    return n


def _stray_vision_tensors(unused: Iterable[str], layers_built: int) -> list[str]:
    """Unused tensors inside the layers we build: an architecture MM1's ViT cannot express
    (layer scale, q/k norms, ...), which a silent import would drop."""
    out = []
    for n in sorted(unused):
        m = _LAYER.match(n)
        if m and not _is_text_tower(n) and int(m.group(2)) < layers_built:
            out.append(n)
    return out


def import_hf(out: str | Path, cfg: Config, *, clip: Optional[str] = None,
              llama: Optional[str] = None, mm1: Optional[str] = None, verify: bool = True,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    from megatron.core import dist_checkpointing

    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.model.mm1 import MM1Model
    from mm1_megatron.model.vision import interpolate_position_grid
    from mm1_megatron.runtime import init_distributed
    from mm1_megatron.checkpoint import model_sharded_state
    from megatron.core import parallel_state as ps

    if not (clip or llama or mm1):
        raise ConvertError("nothing to import: give --clip and/or --llama, or --mm1")
    if mm1 and (clip or llama):
        raise ConvertError("--mm1 imports a whole model; do not combine it with --clip/--llama")
    out = Path(out)
    report: dict = {"output": str(out), "imported": {}, "unused": {}}
    # Sources first: a wrong file, flag or shape fails before a model is built.
    sources: dict = {}
    if mm1:
        sources["mm1"] = HFWeights(mm1)
    if clip:
        w = sources["clip"] = clip_weights(clip)
        clip_prefix = _clip_prefix(w)
        clip_size = _check_clip(cfg, w, clip_prefix)
        also = getattr(w, "also", None)
        report["clip_source"] = {"format": w.describe(), "image_size": clip_size}
        log(f"--clip {w.path}: {w.describe()}, {clip_size} px"
            + (f" (HF files preferred: {also} not read)" if also else ""))
    if llama:
        sources["llama"] = HFWeights(llama)
        _check_llama(cfg, sources["llama"])

    c = reference_config(cfg)
    ensure_process_group()
    if not ps.model_parallel_is_initialized():
        init_distributed(c.parallel, seed=c.train.seed, environ={})
    torch.manual_seed(c.train.seed)
    model = MM1Model(c, use_te=False)
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    if mm1:
        conn = [k for k in local if k.startswith("connector.")]
        items = expand(cfg, MM1_PREFIXES, conn)
        report["imported"]["mm1"] = _assign(items, sources["mm1"], ("", ""), local)
    if clip:
        items = expand(cfg, {"vision": "vision_tower."})
        grid = cfg.vision.grid_size

        def adapt(it: Item, ts):
            if it.hf[0].endswith("position_embedding.weight") and ts[0].shape[0] != grid**2 + 1:
                old = math.isqrt(ts[0].shape[0] - 1)
                report["clip_source"]["position_table"] = f"{old}x{old} -> {grid}x{grid}"
                ts = [interpolate_position_grid(ts[0], 1, grid)]
            return ts

        w = sources["clip"]
        report["imported"]["clip"] = _assign(items, w, ("vision_tower.", clip_prefix), local,
                                             adapt)
        unused = set(w.names()) - w.used
        stray = _stray_vision_tensors(unused, cfg.vision.layers_built)
        if stray:
            more = f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""
            raise ConvertError(f"{w.path / w.source}: {stray[0]}{more} has no place in MM1's "
                               "ViT (layer scale, q/k norm, ...?): refused rather than dropped")
    if llama:
        items = expand(cfg, LLAMA_PREFIXES)
        report["imported"]["llama"] = _assign(items, sources["llama"], ("", ""), local)
    for part, w in sources.items():
        summary = unused_summary(set(w.names()) - w.used,
                                 _is_text_tower if part == "clip" else lambda n: False)
        report["unused"][part] = summary
        log(f"--{part}: unused source tensors: {summary}")

    missing = model.load_state_dict(local, strict=False)
    if [k for k in missing.missing_keys if not k.endswith("_extra_state")]:
        raise ConvertError(f"internal: parameters not set: {missing.missing_keys[:3]}")

    root = out / "checkpoints"
    final = root / "step_00000000"
    existing = complete_checkpoints(out)
    if existing and not overwrite:  # latest would point back at step 0 over a run's saves
        raise ConvertError(f"{out} already holds checkpoints (newest {existing[-1].name}); "
                           "import into a new run directory, or pass --overwrite to replace "
                           "step_00000000 and point latest at it")
    partial = root / "step_00000000.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        dist_checkpointing.save({"model": model_sharded_state([model]), "step": 0,
                                 "extra": {"imported_from": {k: str(v) for k, v in
                                                             dict(clip=clip, llama=llama,
                                                                  mm1=mm1).items() if v}}},
                                str(partial))
        del model, local
        if verify:
            report["parity"] = verify_import(partial, cfg, clip=sources.get("clip"),
                                             llama=llama, mm1=mm1)
            _log_parity(report["parity"], log)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_latest(root, final.name)
    report["checkpoint"] = str(final)
    return report


def _log_parity(p: dict, log) -> None:
    if "vision_max_abs_diff" in p:
        size = p["vision_check_image_size"]
        how = "" if "position_table_max_abs_diff" not in p else \
            (f"; the checkpoint's position table (interpolated to {p['vision_image_size']} px) "
             f"is the source's interpolated, max |diff| {p['position_table_max_abs_diff']:.1e}")
        log(f"clip parity: max |feature diff| {p['vision_max_abs_diff']:.3e} at the source's "
            f"{size} px against {p['vision_reference']}{how}")
    if "text_max_abs_logit_diff" in p:
        log(f"llama parity: max |logit diff| {p['text_max_abs_logit_diff']:.3e}")
    if "max_abs_logit_diff" in p:
        log(f"mm1 parity: max |logit diff| {p['max_abs_logit_diff']:.3e}")


@torch.no_grad()
def verify_import(ckpt: Path, cfg: Config, *, clip=None, llama=None, mm1=None) -> dict:
    """Each imported part against its source model, on the Megatron model loaded back.
    `clip`: the source's weights (`clip_weights`)."""
    import transformers

    ref = megatron_model(ckpt, cfg)
    out: dict = {}
    if llama:
        hf = transformers.LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32,
                                                           local_files_only=True).eval()
        ids, _ = probe(cfg, images=False)
        diff = float((megatron_logits(ref, ids, None) - hf(input_ids=ids).logits).abs().max())
        out["text_max_abs_logit_diff"] = diff
        if not diff <= LOGIT_TOL:
            raise ConvertError(f"import parity (Llama logits): max |diff| {diff:.3e}")
    if mm1:
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            mm1, trust_remote_code=True, dtype=torch.float32, local_files_only=True).eval()
        ids, pixels = probe(cfg)
        diff = float((megatron_logits(ref, ids, pixels)
                      - hf(input_ids=ids, pixel_values=pixels).logits).abs().max())
        out["max_abs_logit_diff"] = diff
        if not diff <= LOGIT_TOL:
            raise ConvertError(f"import parity (MM1 logits): max |diff| {diff:.3e}")
    if clip is not None:  # last: it may resize `ref`'s encoder to the source's image size
        out.update(_verify_clip(ref, cfg, clip))
    return out


def _verify_clip(ref, cfg: Config, w) -> dict:
    """The imported ViT's features against the source's, at the source's image size: a
    table interpolated to another size gives features nothing can be compared with, so the
    check puts the source's table back (after checking the checkpoint holds its
    interpolation) and runs both at the size the source was trained at."""
    import transformers

    from mm1_megatron.model.vision import interpolate_position_grid, resize_vision_encoder

    prefix = _clip_prefix(w)
    raw = w.get(prefix + "embeddings.position_embedding.weight")
    table = raw.float()
    size = math.isqrt(table.shape[0] - 1) * cfg.vision.patch_size
    layer = cfg.vision.layers_built
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out: dict = {"vision_check_image_size": size, "vision_image_size": cfg.vision.image_size}
    if isinstance(w, OpenClipWeights):
        src = w.config
        want = open_clip_vision_features(
            w.raw, pixels, layers=layer, heads=src["num_attention_heads"],
            eps=src["layer_norm_eps"], quick_gelu=src["hidden_act"] == "quick_gelu")
        out["vision_reference"] = f"open_clip's forward on {w.source}"
    else:
        # Its load report would list the text tower again, which the unused line summed up.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            hf = transformers.CLIPVisionModel.from_pretrained(
                str(w.path), dtype=torch.float32, local_files_only=True).eval()
        finally:
            transformers.logging.set_verbosity(verbosity)
        want = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        out["vision_reference"] = f"transformers CLIPVisionModel from {w.source}"
        del hf
    if size != cfg.vision.image_size:
        expect = interpolate_position_grid(raw, 1, cfg.vision.grid_size).float()  # as imported
        got = ref.vision.position_embeddings.weight.float()
        d = float((got - expect).abs().max())
        out["position_table_max_abs_diff"] = d
        if not d <= 1e-6:
            raise ConvertError(f"import parity (CLIP position table): the checkpoint's is not "
                               f"the source's interpolated (max |diff| {d:.3e})")
        resize_vision_encoder(ref.vision, size)
        ref.vision.position_embeddings.weight.copy_(table)
    diff = float((ref.vision(pixels) - want).abs().max())
    scale = float(want.abs().max())
    # fp32 rounding grows with the features: a large ViT's high-norm tokens reach hundreds,
    # where 1e-3 is a few ulps; a wrong mapping is off by the features' own size.
    tol = max(LOGIT_TOL, 1e-5 * scale)
    out.update(vision_max_abs_diff=diff, vision_feature_scale=scale, vision_tolerance=tol)
    if not diff <= tol:
        raise ConvertError(f"import parity (CLIP features at {size} px): max |diff| {diff:.3e} "
                           f"> {tol:.1e} (features up to {scale:.3g})")
    return out


def build_parser() -> argparse.ArgumentParser:
    head, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(prog="mm1-import-hf", description=head, epilog=rest,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="run dir to write checkpoints/step_00000000 into")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--config", help="YAML config file applied before the overrides")
    ap.add_argument("--clip", metavar="DIR",
                    help="CLIP ViT: transformers CLIPModel/CLIPVisionModel (model.safetensors"
                         "[.index.json] or pytorch_model.bin[.index.json], config.json) or "
                         "open_clip (open_clip_pytorch_model.bin + open_clip_config.json)")
    ap.add_argument("--llama", metavar="DIR",
                    help="transformers LlamaForCausalLM directory")
    ap.add_argument("--mm1", metavar="DIR", help="an exported MM1 HuggingFace directory")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--overwrite", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        cfg = load_config(args.preset, list(args.overrides), args.config, this_machine=False)
        report = import_hf(args.output, cfg, clip=args.clip, llama=args.llama, mm1=args.mm1,
                           verify=not args.no_verify, overwrite=args.overwrite)
    except (ConvertError, ConfigError) as err:
        print(f"mm1-import-hf: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

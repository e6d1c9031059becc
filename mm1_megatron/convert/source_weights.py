"""The import's sources, read lazily: `HFWeights` (a transformers directory's safetensors or
pytorch_model.bin, single or sharded, and its config.json), `OpenClipWeights` (an open_clip
checkpoint and model config, seen under HF CLIPVisionModel names so one path serves both) and
`clip_weights`, which picks between them by the files present; `.bin` files go through
torch.load(weights_only=True), never arbitrary pickle.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from mm1_megatron.convert.mappings import ConvertError, open_clip_names

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

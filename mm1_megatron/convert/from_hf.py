"""Import HuggingFace weights into a Megatron MM1 checkpoint (pre-training initialisation).

    mm1-import-hf OUT --preset NAME [key=value ...] --clip DIR --llama DIR   # paper's init
    mm1-import-hf OUT --preset NAME [key=value ...] --mm1 DIR               # an exported MM1

`--clip`: a transformers `CLIPVisionModel` (or `CLIPModel`) directory, ViT layout as
`vision.*` (exact GELU; its position table is interpolated when its image size differs);
`--llama`: a Llama-style `LlamaForCausalLM` directory matching `llm.*`. Parts not given (the
connector always, with --clip/--llama) keep Megatron's fresh initialisation (`train.seed`).
The checkpoint is written like the trainer's (`OUT/checkpoints/step_00000000/` + `latest`,
model only) and checked: CLIP patch features and Llama text logits against the Megatron
model loaded back from it (max |diff| <= 1e-3, fp32).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from mm1_megatron.checkpoint.directory import complete_checkpoints, write_latest
from mm1_megatron.config import Config, ConfigError, load_config
from mm1_megatron.convert.mappings import (LLAMA_PREFIXES, MM1_PREFIXES, ConvertError, Item,
                                           candidates, expand, from_hf)
from mm1_megatron.convert.verify import (LOGIT_TOL, megatron_logits, megatron_model, probe,
                                         reference_config)


# ---------------------------------------------------------------------------- HF side


class HFWeights:
    """Lazy access to a HF directory's safetensors (single file or sharded with an index)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / "model.safetensors").is_file():
            with safe_open(str(self.path / "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ConvertError(f"{self.path}: no model.safetensors(.index.json) found")
        self.weight_map = weight_map
        self._open: dict[str, object] = {}
        self.config = json.loads((self.path / "config.json").read_text()) \
            if (self.path / "config.json").is_file() else {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ConvertError(f"{self.path}: has no tensor {name}")
        file = self.weight_map[name]
        if file not in self._open:
            if not (self.path / file).is_file():
                raise ConvertError(f"{self.path}: shard file {file} is missing")
            self._open[file] = safe_open(str(self.path / file), "pt")
        return self._open[file].get_tensor(name)


def _clip_prefix(w: HFWeights) -> str:
    for p in ("vision_model.", ""):
        if p + "embeddings.patch_embedding.weight" in w:
            return p
    raise ConvertError(f"{w.path}: not a CLIP vision model (no embeddings.patch_embedding)")


def _check_fields(what: str, src: dict, expect: dict) -> None:
    for key, (field, value) in expect.items():
        got = src.get(key)
        if got is not None and got != value:
            raise ConvertError(f"config mismatch: {what} has {key}={got}, {field}={value}")


def _check_clip(cfg: Config, w: HFWeights) -> dict:
    src = w.config.get("vision_config", w.config)
    v = cfg.vision
    _check_fields(f"{w.path}", src, {
        "hidden_size": ("vision.hidden_size", v.hidden_size),
        "intermediate_size": ("vision.ffn_hidden_size", v.ffn_hidden_size),
        "num_attention_heads": ("vision.num_attention_heads", v.num_attention_heads),
        "patch_size": ("vision.patch_size", v.patch_size),
        "layer_norm_eps": ("vision.layernorm_eps", v.layernorm_eps)})
    if src.get("num_hidden_layers", v.layers_built) < v.layers_built:
        raise ConvertError(f"config mismatch: {w.path} has {src['num_hidden_layers']} layers, "
                           f"vision.feature_layer needs {v.layers_built}")
    # Never guessed: transformers defaults a missing hidden_act to quick_gelu, older
    # exporters meant gelu, and the two give different features.
    act = src.get("hidden_act")
    if act is None:
        raise ConvertError(f"{w.path / 'config.json'}: no hidden_act in the vision config; "
                           "add it (DFN5B / OpenAI CLIP: quick_gelu)")
    if act != v.activation:
        raise ConvertError(f"config mismatch: {w.path} has hidden_act={act!r}, "
                           f"vision.activation={v.activation!r}")
    return src


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


def _assign(items: list[Item], hf: HFWeights, prefix_swap: tuple[str, str], local: dict,
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
            raise ConvertError(f"config mismatch: {hf.path} tensor {names[0]} gives "
                               f"{tuple(value.shape)} for {name}, the config expects "
                               f"{tuple(local[name].shape)}")
        local[name] = value.to(local[name].dtype)
        n += 1
    return n


def import_hf(out: str | Path, cfg: Config, *, clip: Optional[str] = None,
              llama: Optional[str] = None, mm1: Optional[str] = None, verify: bool = True,
              overwrite: bool = False) -> dict:
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
    c = reference_config(cfg)
    ensure_process_group()
    if not ps.model_parallel_is_initialized():
        init_distributed(c.parallel, seed=c.train.seed, environ={})
    torch.manual_seed(c.train.seed)
    model = MM1Model(c, use_te=False)
    local = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    report: dict = {"output": str(out), "imported": {}}

    if mm1:
        w = HFWeights(mm1)
        conn = [k for k in local if k.startswith("connector.")]
        items = expand(cfg, MM1_PREFIXES, conn)
        report["imported"]["mm1"] = _assign(items, w, ("", ""), local)
    if clip:
        w = HFWeights(clip)
        _check_clip(cfg, w)  # raises on a CLIP of another shape
        prefix = _clip_prefix(w)
        items = expand(cfg, {"vision": "vision_tower."})

        def adapt(it: Item, ts):
            if it.hf[0].endswith("position_embedding.weight"):
                grid = cfg.vision.grid_size
                if ts[0].shape[0] != grid * grid + 1:
                    ts = [interpolate_position_grid(ts[0], 1, grid)]
            return ts

        report["imported"]["clip"] = _assign(items, w, ("vision_tower.", prefix), local, adapt)
    if llama:
        w = HFWeights(llama)
        _check_llama(cfg, w)
        items = expand(cfg, LLAMA_PREFIXES)
        report["imported"]["llama"] = _assign(items, w, ("", ""), local)

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
        if verify:
            report["parity"] = verify_import(partial, cfg, clip=clip, llama=llama, mm1=mm1)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    write_latest(root, final.name)
    report["checkpoint"] = str(final)
    return report


@torch.no_grad()
def verify_import(ckpt: Path, cfg: Config, *, clip=None, llama=None, mm1=None) -> dict:
    """Each imported part against its source model, on the Megatron model loaded back."""
    import transformers

    ref = megatron_model(ckpt, cfg)
    out: dict = {}
    if clip:
        hf = transformers.CLIPVisionModel.from_pretrained(clip, dtype=torch.float32,
                                                          local_files_only=True).eval()
        g = torch.Generator().manual_seed(0)
        size = hf.config.image_size
        pixels = torch.randn(2, 3, size, size, generator=g)
        layer = cfg.vision.layers_built
        got = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
        if size != cfg.vision.image_size:
            out["vision_note"] = "position table interpolated: features not comparable"
        else:
            mine = ref.vision(pixels)
            diff = float((mine - got).abs().max())
            out["vision_max_abs_diff"] = diff
            if not diff <= LOGIT_TOL:
                raise ConvertError(f"import parity (CLIP features): max |diff| {diff:.3e}")
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
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mm1-import-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("output", help="run dir to write checkpoints/step_00000000 into")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    ap.add_argument("--preset", required=True)
    ap.add_argument("--config", help="YAML config file applied before the overrides")
    ap.add_argument("--clip", help="transformers CLIPVisionModel directory")
    ap.add_argument("--llama", help="transformers LlamaForCausalLM directory")
    ap.add_argument("--mm1", help="an exported MM1 HuggingFace directory")
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

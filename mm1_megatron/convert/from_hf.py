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
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from mm1_megatron.checkpoint.directory import complete_checkpoints, write_latest
from mm1_megatron.config import Config, ConfigError, load_config
from mm1_megatron.convert.mappings import (LLAMA_PREFIXES, MM1_PREFIXES, ConvertError, Item,
                                           candidates, expand, from_hf)
from mm1_megatron.convert.source_checks import (check_clip, check_llama, clip_vision_prefix,
                                                is_text_tower, stray_vision_tensors,
                                                unused_summary)
from mm1_megatron.convert.source_weights import HFWeights, OpenClipWeights, clip_weights
from mm1_megatron.convert.verify import (LOGIT_TOL, megatron_logits, megatron_model,
                                         open_clip_vision_features, probe, reference_config)


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


def import_hf(out: str | Path, cfg: Config, *, clip: Optional[str] = None,
              llama: Optional[str] = None, mm1: Optional[str] = None, verify: bool = True,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    from megatron.core import dist_checkpointing

    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.model.builder import build_mm1_model
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
        clip_prefix = clip_vision_prefix(w)
        clip_size = check_clip(cfg, w, clip_prefix)
        also = getattr(w, "also", None)
        report["clip_source"] = {"format": w.describe(), "image_size": clip_size}
        log(f"--clip {w.path}: {w.describe()}, {clip_size} px"
            + (f" (HF files preferred: {also} not read)" if also else ""))
    if llama:
        sources["llama"] = HFWeights(llama)
        check_llama(cfg, sources["llama"])

    c = reference_config(cfg)
    ensure_process_group()
    if not ps.model_parallel_is_initialized():
        init_distributed(c.parallel, seed=c.train.seed, environ={})
    torch.manual_seed(c.train.seed)
    model = build_mm1_model(c, use_te=False)
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
        stray = stray_vision_tensors(unused, cfg.vision.layers_built)
        if stray:
            more = f" (+{len(stray) - 1} more)" if len(stray) > 1 else ""
            raise ConvertError(f"{w.path / w.source}: {stray[0]}{more} has no place in MM1's "
                               "ViT (layer scale, q/k norm, ...?): refused rather than dropped")
    if llama:
        items = expand(cfg, LLAMA_PREFIXES)
        report["imported"]["llama"] = _assign(items, sources["llama"], ("", ""), local)
    for part, w in sources.items():
        summary = unused_summary(set(w.names()) - w.used,
                                 is_text_tower if part == "clip" else lambda n: False)
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

    prefix = clip_vision_prefix(w)
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

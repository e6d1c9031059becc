"""Export a Megatron MM1 checkpoint (any TP/PP/EP/DP layout) to a HuggingFace directory.

    mm1-convert-hf CKPT OUT --preset NAME [key=value ...] [--decoder-only OUT2] [--no-verify]

CKPT is a checkpoint directory (`run_dir/checkpoints/step_N`), a run dir or a checkpoints dir
(its `latest` is used). The model config is `--preset` + overrides as trained (without
--preset: the config the run stored, if any). Every checkpoint tensor is checked against it
(missing, extra, or differently shaped tensors are refused by name). The output is written to
`OUT.incomplete/` and renamed to OUT only after every file is written and (by default) the
parity gate passed; on any error the partial directory is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from mm1_megatron.config import Config, ConfigError, load_config
from mm1_megatron.convert.hf_config import (llama_config, mm1_config, model_card,
                                            write_side_files)
from mm1_megatron.convert.mappings import (LLAMA_PREFIXES, MM1_PREFIXES, ConvertError, Item,
                                           candidates, expand, megatron_shape, numel, to_hf)
from mm1_megatron.convert.reader import CheckpointReader

DEFAULT_SHARD_BYTES = 2 * 1024**3
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- planning


def meta_state_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the HF model, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def resolve(items: list[Item], reader: CheckpointReader, hf_shapes: dict[str, tuple[int, ...]],
            components: Sequence[str]) -> None:
    """Find each item's tensor in the checkpoint and check its shape against the config.
    Refuses missing tensors, shape mismatches, and model tensors the config does not use."""
    produced = [h for it in items for h in it.hf]
    if set(produced) != set(hf_shapes) or len(produced) != len(hf_shapes):
        missing = sorted(set(hf_shapes) - set(produced))[:3]
        extra = sorted(set(produced) - set(hf_shapes))[:3]
        raise ConvertError(f"internal: mapping tables and HF model disagree (unmapped {missing}, "
                           f"unknown {extra})")
    used: dict[str, set] = {}
    for it in items:
        expected = megatron_shape(it, [hf_shapes[h] for h in it.hf])
        found = None
        for key, index in candidates(it):
            shape = reader.shape(key)
            if shape is not None and len(shape) >= len(index) and \
                    all(i < n for i, n in zip(index, shape)):
                found = key, index, shape
                break
        if found is None:
            raise ConvertError(f"{reader.path}: the checkpoint has no tensor {it.megatron} that "
                               "the config needs (a checkpoint of another model, or a config "
                               "with more layers/experts than it was trained with?)")
        key, index, shape = found
        if tuple(shape[len(index):]) != tuple(expected):
            raise ConvertError(f"config mismatch: checkpoint tensor {key} has shape "
                               f"{tuple(shape[len(index):])}, the config expects {expected}")
        it.key, it.index = key, index
        used.setdefault(key, set()).add(index)
    prefixes = {"vision": ("vision.",), "connector": ("connector.",),
                "llm": ("language_model.embedding", "language_model.decoder"),
                "head": ("language_model.output_layer",)}
    mine = tuple(p for c in components for p in prefixes[c])
    for key, t in reader.meta.items():
        if not key.startswith(mine):
            continue
        if key not in used:
            raise ConvertError(f"config mismatch: checkpoint tensor {key} {tuple(t.global_shape)} "
                               "is not part of the configured model (fewer layers/experts, "
                               "another connector?)")
        depth = len(next(iter(used[key])))
        if depth and len(used[key]) != numel(t.global_shape[:depth]):
            raise ConvertError(f"config mismatch: checkpoint tensor {key} stacks "
                               f"{tuple(t.global_shape[:depth])} layers/experts, the config "
                               f"uses {len(used[key])}")


@dataclass
class Shard:
    items: list[Item] = field(default_factory=list)
    nbytes: int = 0


def plan_shards(items: list[Item], hf_shapes: dict, itemsize: int, max_bytes: int) -> list[Shard]:
    shards = [Shard()]
    for it in items:
        size = sum(numel(hf_shapes[h]) for h in it.hf) * itemsize
        if shards[-1].items and shards[-1].nbytes + size > max_bytes:
            shards.append(Shard())
        shards[-1].items.append(it)
        shards[-1].nbytes += size
    return shards


# ---------------------------------------------------------------------------- writing


def write_shards(reader: CheckpointReader, items: list[Item], hf_shapes: dict, out: Path,
                 dtype: Optional[torch.dtype], max_bytes: int, progress: bool,
                 desc: str) -> dict:
    """Stream: load one shard's tensors, split, write, free. Returns the index dict."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    itemsize = (dtype or reader.dtype(items[0].key)).itemsize if items else 4
    shards = plan_shards(items, hf_shapes, itemsize, max_bytes)
    total = sum(s.nbytes for s in shards)
    weight_map: dict[str, str] = {}
    n = len(shards)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress,
               file=sys.stderr)
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        loaded = reader.load([(it.key, it.index) for it in shard.items])
        tensors: dict[str, torch.Tensor] = {}
        for j, it in enumerate(shard.items):
            # Each source is dropped once split: peak ~ one shard plus one tensor.
            t, loaded[j] = loaded[j], None
            for h, piece in zip(it.hf, to_hf(it, t)):
                piece = piece.to(dtype) if dtype is not None else piece
                tensors[h] = piece.contiguous()
                weight_map[h] = name
            del t
        del loaded
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        bar.update(shard.nbytes)
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    if n > 1:
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def _fresh_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")
    tmp = out.parent / (out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _readable(folder: Path) -> None:
    """Files 0666 and folders 0777 minus the umask (0644 / 0755 usually): safetensors'
    `save_file` writes 0600, which nobody else on a shared cluster could read."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _finish(tmp: Path, out: Path) -> None:
    _readable(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def connector_names(hf_shapes: dict) -> list[str]:
    return ["connector." + k[len(MM1_PREFIXES["connector"]):] for k in hf_shapes
            if k.startswith(MM1_PREFIXES["connector"])]


def export(ckpt: str | Path, out: str | Path, cfg: Config, *,
           decoder_only: Optional[str | Path] = None, verify: bool = True,
           dtype: Optional[str] = None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
           overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Export; returns a report (paths, bytes, seconds, parity figures)."""
    from mm1_megatron.convert.hf_modeling.modeling_mm1 import MM1ForConditionalGeneration

    if decoder_only is not None and cfg.llm.moe.num_experts > 0:  # before reading anything
        raise ConvertError("--decoder-only: no stock transformers architecture matches an "
                           "every-N-layer MoE decoder; export without --decoder-only (the full "
                           "model loads with trust_remote_code=True), or use --decoder-only "
                           "on a dense run (LlamaForCausalLM)")
    start = time.perf_counter()
    reader = CheckpointReader(ckpt)
    out = Path(out)
    report: dict = {"checkpoint": str(reader.path), "output": str(out)}
    torch_dtype = _DTYPES[dtype] if dtype else None

    config = mm1_config(cfg)
    hf_shapes = meta_state_shapes(MM1ForConditionalGeneration, config)
    items = expand(cfg, MM1_PREFIXES, connector_names(hf_shapes))
    resolve(items, reader, hf_shapes, ["vision", "connector", "llm", "head"])

    llama_items = None
    if decoder_only is not None:
        from transformers import LlamaForCausalLM

        lconfig = llama_config(cfg)
        llama_shapes = meta_state_shapes(LlamaForCausalLM, lconfig)
        llama_items = expand(cfg, LLAMA_PREFIXES)
        resolve(llama_items, reader, llama_shapes, ["llm", "head"])

    tmp = _fresh_dir(out, overwrite)
    try:
        if torch_dtype is not None:
            config.dtype = torch_dtype
        else:
            config.dtype = reader.dtype(items[0].key)
        config.save_pretrained(tmp)
        write_shards(reader, items, hf_shapes, tmp, torch_dtype, max_shard_bytes, progress,
                     "export")
        report["notes"] = write_side_files(tmp, cfg, True, cfg.data.tokenizer_model or None)
        report["bytes"] = sum(p.stat().st_size for p in tmp.iterdir())
        if verify:
            from mm1_megatron.convert.verify import verify_export

            report["parity"] = verify_export(reader.path, tmp, cfg, torch_dtype)
            log(f"parity: max |logit diff| {report['parity']['max_abs_logit_diff']:.3e}, "
                f"greedy {report['parity']['greedy_tokens']} tokens equal")
        (tmp / "README.md").write_text(model_card(cfg, report))
        _finish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if llama_items is not None:
        dout = Path(decoder_only)
        dtmp = _fresh_dir(dout, overwrite)
        try:
            lconfig.dtype = torch_dtype or reader.dtype(llama_items[0].key)
            lconfig.save_pretrained(dtmp)
            write_shards(reader, llama_items, llama_shapes, dtmp, torch_dtype, max_shard_bytes,
                         progress, "export decoder")
            write_side_files(dtmp, cfg, False, cfg.data.tokenizer_model or None)
            if verify:
                from mm1_megatron.convert.verify import verify_llama

                report["llama_parity"] = verify_llama(reader.path, dtmp, cfg, torch_dtype)
                log(f"llama parity: max |logit diff| "
                    f"{report['llama_parity']['max_abs_logit_diff']:.3e}")
            _finish(dtmp, dout)
        except BaseException:
            shutil.rmtree(dtmp, ignore_errors=True)
            raise
        report["decoder_only"] = str(dout)
    report["seconds"] = time.perf_counter() - start
    return report


# ---------------------------------------------------------------------------- CLI


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]
    return out


def config_from_dict(data: dict, overrides: Sequence[str] = ()) -> Config:
    """A resolved config as saved by a run ({"preset": ..., sections...}), plus overrides."""
    from mm1_megatron.config import get_preset, parse_override, set_field, validate

    data = dict(data.get("config", data))
    cfg = get_preset(data.pop("preset", None) or "tiny")
    for key, value in _flatten(data):
        set_field(cfg, key, value)
    for text in overrides:
        set_field(cfg, *parse_override(text))
    return validate(cfg, fp8_ok=True)


def run_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The run's own config when it stored one: the checkpoint's common state (`config`, or
    `extra.config`), else `RUN_DIR/config.yaml`. Refuses when there is none."""
    import yaml

    from mm1_megatron.convert.reader import resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    common = CheckpointReader(ckpt).common_state()
    stored = common.get("config") or (common.get("extra") or {}).get("config")
    if isinstance(stored, dict):
        return config_from_dict(stored, overrides)
    for path in (ckpt.parent.parent / "config.yaml", Path(checkpoint) / "config.yaml"):
        if path.is_file():
            return config_from_dict(yaml.safe_load(path.read_text()) or {}, overrides)
    raise ConvertError(f"{ckpt}: the run stored no config (checkpoint common state, "
                       "RUN_DIR/config.yaml); pass --preset NAME [key=value ...] as trained")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mm1-convert-hf", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="checkpoint dir, or a run dir / checkpoints dir (latest)")
    ap.add_argument("output", help="HuggingFace directory to write")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    ap.add_argument("--preset", help="the preset the run was trained with (default: the "
                    "config the run stored, if any)")
    ap.add_argument("--config", help="YAML config file applied before the overrides")
    ap.add_argument("--decoder-only", metavar="DIR",
                    help="also export the (dense) decoder alone as a stock LlamaForCausalLM")
    ap.add_argument("--no-verify", action="store_true", help="skip the logit-parity gate")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), help="cast weights (default: as stored)")
    ap.add_argument("--max-shard-size", type=float, default=2.0, help="GB per safetensors file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.preset:
            cfg = load_config(args.preset, list(args.overrides), args.config,
                              this_machine=False)
        else:
            cfg = run_config(args.checkpoint, args.overrides)
        report = export(args.checkpoint, args.output, cfg, decoder_only=args.decoder_only,
                        verify=not args.no_verify, dtype=args.dtype,
                        max_shard_bytes=int(args.max_shard_size * 1024**3),
                        overwrite=args.overwrite, progress=not args.no_progress)
    except (ConvertError, ConfigError) as err:
        print(f"mm1-convert-hf: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "notes"}))
    for note in report.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Validation: every check names one field; runs before any process group starts. Also the
world-size helpers (`launcher_world_size`, `resolve_world_size`, `data_parallel_size`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Optional

from mm1_megatron.config.blend import KINDS, data_sources
from mm1_megatron.config.schema import Config, ConfigError

# --------------------------------------------------------------------------------------------
# Validation: every check names one field. Runs before any process group starts.
# --------------------------------------------------------------------------------------------


def _require(ok: bool, field_name: str, reason: str) -> None:
    if not ok:
        raise ConfigError(field_name, reason)


def launcher_world_size(environ: Optional[dict[str, str]] = None) -> Optional[int]:
    """World size announced by torchrun or Slurm, if any (None for a plain `python` call)."""
    env = os.environ if environ is None else environ
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if env.get(var):
            return int(env[var])
    return None


def resolve_world_size(cfg: Config, environ: Optional[dict[str, str]] = None) -> int:
    p = cfg.parallel
    if p.world_size is not None:
        return p.world_size
    launched = launcher_world_size(environ)
    if launched is not None:
        return launched
    if p.planned_nodes is not None and p.dp is None:
        return p.planned_nodes * (p.gpus_per_node or 8)
    return p.model_parallel_size * (p.dp or 1)


def data_parallel_size(cfg: Config, environ: Optional[dict[str, str]] = None) -> int:
    return resolve_world_size(cfg, environ) // cfg.parallel.model_parallel_size


# Every int field of every section (nested ones such as llm.moe included) must be >= 1 when set
# (None stays allowed for Optional fields); these may also be 0, and `_SIGNED` has its own rule.
_MAY_BE_ZERO = {"train.warmup_steps", "data.prefetch", "eval.seed", "train.seed",
                "llm.moe.num_experts"}
_SIGNED = {"vision.feature_layer"}  # checked by its own rule
# Every float field must be finite and >= 0 when set; these must be > 0. Fields with an upper
# bound as well (train.min_lr_ratio, the Adam betas) are checked in `_validate_train`.
_POSITIVE_FLOATS = {"vision.layernorm_eps", "llm.norm_eps", "llm.rope_theta", "train.lr",
                    "train.adam_eps"}


# The dataset kinds in mixture order, one data.weight_* each (config.blend.KINDS).
SOURCES = KINDS
FREEZABLE = ("vision", "connector", "llm")  # train.freeze: MM1Model's parts
# The special pieces and the ids every tokenizer must give them (mm1_megatron.data.tokenizer
# .SPECIAL_TOKENS, which the loader checks; tests/test_config.py keeps the two equal).
TOKENIZER_SPECIALS = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<eoc>": 4, "<unk>": 5}


def _declared(annotation: Any) -> Any:
    """int for `int` and `Optional[int]`, float for `float` and `Optional[float]`, ..."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return inner[0] if len(inner) == 1 else annotation
    return annotation


def _scalar_fields(obj: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """(dotted name, declared type, value) of every field of every section, recursively."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, name = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _scalar_fields(value, name + ".")
        else:
            yield name, _declared(hints[f.name]), value


def _validate_positive(cfg: Config) -> None:
    for name, kind, value in _scalar_fields(cfg, ""):
        if value is None or isinstance(value, bool) or name in _SIGNED:
            continue
        if kind is int and isinstance(value, int):
            floor = 0 if name in _MAY_BE_ZERO else 1
            _require(value >= floor, name, f"must be >= {floor}, got {value}")
        elif kind is float and isinstance(value, (int, float)):
            _require(math.isfinite(value), name, f"must be a finite number, got {value}")
            if name in _POSITIVE_FLOATS:
                _require(value > 0, name, f"must be > 0, got {value}")
            else:
                _require(value >= 0, name, f"must be >= 0, got {value}")


def _validate_model(cfg: Config) -> None:
    v, c, llm, moe = cfg.vision, cfg.connector, cfg.llm, cfg.llm.moe
    _require(v.image_size % v.patch_size == 0, "vision.image_size",
             f"{v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    _require(v.hidden_size % v.num_attention_heads == 0, "vision.num_attention_heads",
             f"{v.num_attention_heads} does not divide vision.hidden_size={v.hidden_size}")
    _require(1 <= v.layers_built <= v.num_layers, "vision.feature_layer",
             f"{v.feature_layer} is not a layer of the {v.num_layers}-layer encoder")
    _require(1 <= v.tile_grid <= 4, "vision.tile_grid", f"{v.tile_grid}: give 1 to 4 (tiles "
             "per side of the high-resolution image)")
    _require(cfg.connector.num_tokens * v.sub_images <= cfg.data.seq_length, "vision.tiling",
             f"one image ({v.sub_images} sub-images x {cfg.connector.num_tokens} tokens) does "
             f"not fit data.seq_length={cfg.data.seq_length}")
    if c.type in ("c_abstractor", "avg_pool"):
        _require(c.grid_size**2 == c.num_tokens, "connector.num_tokens",
                 f"{c.num_tokens} is not a square; {c.type} pools the patch grid to n x n")
        _require(c.grid_size <= v.grid_size, "connector.num_tokens",
                 f"a {c.grid_size}x{c.grid_size} grid exceeds the {v.grid_size}x{v.grid_size} "
                 "patch grid")
    if c.type == "attn_pool":
        _require(v.hidden_size % v.num_attention_heads == 0, "vision.num_attention_heads",
                 "attn_pool uses the vision heads")
    _require(llm.hidden_size % llm.num_attention_heads == 0, "llm.num_attention_heads",
             f"{llm.num_attention_heads} does not divide llm.hidden_size={llm.hidden_size}")
    _require(llm.num_attention_heads % llm.query_groups == 0, "llm.num_query_groups",
             f"{llm.query_groups} does not divide llm.num_attention_heads="
             f"{llm.num_attention_heads}")
    if moe.num_experts > 0:
        _require(moe.layer_freq <= llm.num_layers and llm.num_layers % moe.layer_freq == 0,
                 "llm.moe.layer_freq",
                 f"{moe.layer_freq} does not divide llm.num_layers={llm.num_layers}, so the "
                 "MoE layers would not repeat evenly")
        _require(1 <= moe.top_k <= moe.num_experts, "llm.moe.top_k",
                 f"{moe.top_k} must be between 1 and llm.moe.num_experts={moe.num_experts}")
    _require(0 <= llm.image_token_id < llm.vocab_size, "llm.image_token_id",
             f"{llm.image_token_id} is outside the vocabulary (llm.vocab_size={llm.vocab_size})")
    _require(cfg.parallel.cp == 1, "parallel.cp",
             "context parallelism is not wired into the MM1 model yet; use cp=1")
    # One image must fit a sequence with room for at least one text token.
    _require(cfg.data.seq_length > c.num_tokens, "data.seq_length",
             f"{cfg.data.seq_length} is too short for one image's {c.num_tokens} tokens")


def _validate_parallel(cfg: Config, environ: Optional[dict[str, str]]) -> None:
    p, llm, moe, v = cfg.parallel, cfg.llm, cfg.llm.moe, cfg.vision
    _require(llm.num_attention_heads % p.tp == 0, "parallel.tp",
             f"{p.tp} does not divide llm.num_attention_heads={llm.num_attention_heads}")
    _require(llm.query_groups % p.tp == 0, "parallel.tp",
             f"{p.tp} does not divide the {llm.query_groups} query groups (llm.num_query_groups)")
    _require(v.num_attention_heads % p.tp == 0, "parallel.tp",
             f"{p.tp} does not divide vision.num_attention_heads={v.num_attention_heads}")
    _require(llm.vocab_size % p.tp == 0, "parallel.tp",
             f"{p.tp} does not divide llm.vocab_size={llm.vocab_size}")
    if p.gpus_per_node is not None:
        _require(p.gpus_per_node % p.tp == 0, "parallel.tp",
                 f"{p.tp} does not divide parallel.gpus_per_node={p.gpus_per_node}: a TP group "
                 "must stay inside one node's NVLink domain")
    if moe.num_experts > 0 and p.tp > 1:
        _require(p.sequence_parallel, "parallel.sequence_parallel",
                 "must be true for MoE with tp>1 (Megatron-Core requirement)")
    if p.overlap_param_gather:
        _require(p.distributed_optimizer, "parallel.overlap_param_gather",
                 "needs parallel.distributed_optimizer=true")
    if p.tp_comm_overlap and p.tp > 1:
        _require(p.sequence_parallel, "parallel.tp_comm_overlap",
                 "needs parallel.sequence_parallel=true (TE overlaps its SP all-gathers)")

    if p.first_stage_layers is not None:
        _require(p.pp > 1 and p.first_stage_layers < llm.num_layers,
                 "parallel.first_stage_layers",
                 f"{p.first_stage_layers} needs parallel.pp>1 and fewer than "
                 f"llm.num_layers={llm.num_layers}")
        rest = llm.num_layers - p.first_stage_layers
        _require(rest % (p.pp - 1) == 0, "parallel.first_stage_layers",
                 f"the remaining {rest} layers do not split evenly over {p.pp - 1} stages")
    else:
        _require(llm.num_layers % p.pp == 0, "parallel.pp",
                 f"{p.pp} does not divide llm.num_layers={llm.num_layers}; "
                 "set parallel.first_stage_layers for an uneven split")
    if p.virtual_stages is not None:
        # With pp=2 a rank's next and previous stage are one peer, and their forward and
        # backward messages can cross (Megatron-LM's own rule; seen wrong on gloo here).
        _require(p.pp > 2 and p.first_stage_layers is None, "parallel.virtual_stages",
                 "interleaving needs parallel.pp>2 and an even split (no first_stage_layers)")
        _require(llm.num_layers % (p.pp * p.virtual_stages) == 0, "parallel.virtual_stages",
                 f"pp*virtual_stages={p.pp * p.virtual_stages} does not divide "
                 f"llm.num_layers={llm.num_layers}")

    world = resolve_world_size(cfg, environ)
    _require(world % p.model_parallel_size == 0, "parallel.world_size",
             f"world size {world} is not divisible by tp*pp*cp={p.model_parallel_size}")
    dp = world // p.model_parallel_size
    if p.dp is not None:
        _require(p.dp == dp, "parallel.dp",
                 f"world size {world} != tp*pp*cp*dp = {p.tp}*{p.pp}*{p.cp}*{p.dp}")

    if moe.num_experts > 0:
        _require(moe.num_experts % p.ep == 0, "parallel.ep",
                 f"{p.ep} does not divide llm.moe.num_experts={moe.num_experts}")
        expert_tp = p.expert_tp or p.tp
        _require((p.tp * p.cp * dp) % (p.ep * expert_tp) == 0, "parallel.ep",
                 f"ep*expert_tp={p.ep * expert_tp} must divide tp*cp*dp={p.tp * p.cp * dp}")
    else:
        _require(p.ep == 1, "parallel.ep", f"{p.ep} > 1 needs experts (llm.moe.num_experts>0)")

    t = cfg.train
    per_step = t.micro_batch_size * dp
    _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
             f"{t.global_batch_size} is not a multiple of micro_batch_size*dp = "
             f"{t.micro_batch_size}*{dp}")
    if p.virtual_stages is not None:
        micro = t.global_batch_size // per_step
        _require(micro % p.pp == 0, "parallel.virtual_stages",
                 f"the interleaved schedule runs micro-batches in groups of pp={p.pp}; "
                 f"{micro} micro-batches per step is not a multiple")


def _validate_train(cfg: Config, fp8_ok: bool) -> None:
    t = cfg.train
    if t.fp8 is not None:
        _require(fp8_ok, "train.fp8",
                 f"{t.fp8!r} needs Transformer Engine and an FP8 GPU (Hopper); not found here")
        _require(t.precision == "bf16", "train.fp8", "FP8 training runs with train.precision=bf16")
    _require(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must lie in [0, 1]")
    parts = [p.strip() for p in t.freeze.split(",") if p.strip()]
    unknown = [p for p in parts if p not in FREEZABLE]
    _require(not unknown, "train.freeze", f"{', '.join(unknown)} is not one of "
             f"{', '.join(FREEZABLE)} (comma-separated)")
    _require(len(set(parts)) < len(FREEZABLE), "train.freeze",
             "freezes every part: nothing would train")
    for beta in ("adam_beta1", "adam_beta2"):  # torch.optim.Adam's rule: 0 <= beta < 1
        value = getattr(t, beta)
        _require(0.0 <= value < 1.0, f"train.{beta}", f"must lie in [0, 1), got {value}")
    _require(t.warmup_steps < t.train_steps, "train.warmup_steps",
             f"{t.warmup_steps} is not below train.train_steps={t.train_steps}")
    for shots in filter(None, (k.strip() for k in cfg.eval.shots.split(","))):
        _require(shots.isdigit(), "eval.shots", f"{shots!r} is not a number of examples")
    _require(not cfg.eval.chat or cfg.eval.shots.replace(" ", "") == "0", "eval.shots",
             f"{cfg.eval.shots!r}: eval.chat scores zero-shot; give eval.shots=0")
    d = cfg.data
    _require(not (d.path and d.blend), "data.blend",
             f"{d.blend} and data.path={d.path} both name the data; give one")
    # Each weight is finite and >= 0 (`_validate_positive` names the one that is not).
    _require(sum(getattr(d, f"weight_{source}") for source in SOURCES) > 0,
             "data.weight_interleaved", "data.weight_interleaved, data.weight_caption, "
             "data.weight_text and data.weight_sft are all zero: the mixture would draw "
             "nothing")


def _validate_data_files(cfg: Config) -> None:
    """The dataset and tokenizer a run on this machine reads (not for dry runs / plans: the
    files may live on the cluster only)."""
    d, llm = cfg.data, cfg.llm
    field = "data.blend" if d.blend else "data.path"
    if d.blend:
        _require(Path(d.blend).is_file(), field, f"{d.blend}: no such file")
        sources = data_sources(d)  # reads the blend file
        folders = [s.folder for s in sources]
        for folder in folders:
            _require((folder / "manifest.json").is_file(), field,
                     f"{d.blend} names {folder}, which holds no manifest.json (prepare it "
                     "with mm1-prepare-data)")
        found = sorted({s.kind for s in sources}, key=SOURCES.index)
    else:
        _require(bool(d.path), field, "not set; give the folder holding the dataset folders "
                 f"({', '.join(SOURCES)}), e.g. data.path=demo_data, or data.blend=FILE")
        root = Path(d.path)
        _require(root.is_dir(), field,
                 f"{d.path}: {'not a directory' if root.exists() else 'no such directory'}")
        found = [s for s in SOURCES if (root / s / "manifest.json").is_file()]
        _require(bool(found), field, f"{d.path} holds no dataset folder "
                 f"({', '.join(SOURCES)}) with a manifest.json (prepare one with "
                 "mm1-prepare-data)")
        folders = [root / s for s in found]
    _require(any(getattr(d, f"weight_{s}") > 0 for s in found), field,
             f"{d.blend or d.path} holds only {', '.join(found)}, whose mixture weight is "
             f"zero ({', '.join(f'data.weight_{s}' for s in found)})")

    _require(bool(d.tokenizer_model), "data.tokenizer_model",
             "not set; give the sentencepiece .model (e.g. DATA/tokenizer.model)")
    path = Path(d.tokenizer_model)
    _require(path.is_file(), "data.tokenizer_model",
             f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        proto = path.read_bytes()
    except OSError as e:
        raise ConfigError("data.tokenizer_model", f"{path}: cannot read ({e.strerror})") from None
    import sentencepiece as spm  # here: dry runs and plans never load a tokenizer

    try:
        sp = spm.SentencePieceProcessor(model_proto=proto) if proto else None
    except RuntimeError:
        sp = None
    _require(sp is not None, "data.tokenizer_model", f"{path}: not a sentencepiece model")
    size = sp.get_piece_size()
    for piece, want in TOKENIZER_SPECIALS.items():
        _require(want < size and sp.id_to_piece(want) == piece, "data.tokenizer_model",
                 f"{path}: special token {piece!r} must have id {want} (train the model with "
                 "tools/train_tokenizer.py)")
    _require(size <= llm.vocab_size, "llm.vocab_size",
             f"{llm.vocab_size} is smaller than the tokenizer's vocabulary of {size} pieces "
             f"({path}): its ids would overflow the embedding")
    # The loader plans rows from each dataset's token index, made with this tokenizer (the
    # loader checks it too; here it is refused before any process group starts).
    sha = hashlib.sha256(proto).hexdigest()
    for folder in folders:
        manifest_path = folder / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(field, f"{manifest_path}: cannot read ({e})") from None
        indexed = (manifest.get("tokenizer") or {}) if "segments" in manifest.get("index", {}) \
            else {}
        fix = f"run: python tools/index_tokens.py {folder} --tokenizer {path}"
        _require(bool(indexed), field, f"{folder}: no token index (prepared "
                 f"without --tokenizer); {fix}")
        _require(indexed.get("sha256") == sha, "data.tokenizer_model",
                 f"{path} (sha256 {sha[:12]}) is not the tokenizer {folder} was indexed "
                 f"with ({indexed.get('path')}, sha256 {str(indexed.get('sha256'))[:12]}); {fix}")
        _check_source_shards(field, folder, manifest)
    # The model reads every id equal to llm.image_token_id as an image slot: it must be the
    # tokenizer's <image> or an id the tokenizer never produces.
    image = TOKENIZER_SPECIALS["<image>"]
    if llm.image_token_id != image and llm.image_token_id < size:
        raise ConfigError("llm.image_token_id", f"{llm.image_token_id} is the tokenizer's "
                          f"piece {sp.id_to_piece(llm.image_token_id)!r}, so text would be "
                          f"read as image slots; use the tokenizer's <image> id {image}")


def _check_source_shards(field: str, folder: Path, manifest: dict) -> None:
    """A dataset indexed in place (manifest "source") reads the source's own tars: each must
    still have the size and mtime it was indexed with (a stat per tar, no hashing), or the
    run is refused here, before any process group starts, naming the first that changed."""
    source = manifest.get("source")
    if not source:
        return
    root = Path(source["root"])
    for shard in manifest.get("shards", []):
        tar = root / shard["name"]
        try:
            st = tar.stat()
        except OSError as e:
            raise ConfigError(field, f"{tar}: {e.strerror} (indexed in place into {folder}; "
                              "restore it or re-run mm1-prepare-data)") from None
        _require(st.st_size == shard["bytes"] and st.st_mtime_ns == shard.get(
            "mtime_ns", st.st_mtime_ns), field, f"{tar}: changed since it was indexed into "
                 f"{folder} ({st.st_size} bytes now, {shard['bytes']} then; or its mtime); "
                 "re-run mm1-prepare-data")


def fp8_available() -> bool:
    """Transformer Engine importable and an FP8-capable GPU (Ada/Hopper or newer)."""
    from mm1_megatron.runtime.backends import detect_backends

    return detect_backends().fp8_available


def validate(cfg: Config, environ: Optional[dict[str, str]] = None,
             fp8_ok: Optional[bool] = None, data_files: bool = False) -> Config:
    """Refuse an inconsistent config; raises ConfigError naming the field. `data_files`: also
    check the dataset folder and tokenizer a run on this machine reads."""
    _validate_positive(cfg)
    _validate_model(cfg)
    _validate_parallel(cfg, environ)
    transformer_engine = True  # dry runs and cluster plans: the GPU nodes have TE
    if fp8_ok is None:  # checked against this machine (not for dry runs / cluster plans)
        from mm1_megatron.runtime.backends import detect_backends

        fp8_ok = cfg.train.fp8 is None or fp8_available()
        transformer_engine = detect_backends().layer_spec == "transformer_engine"
        if cfg.parallel.tp_comm_overlap and cfg.parallel.tp > 1:
            _require(transformer_engine, "parallel.tp_comm_overlap", "needs Transformer Engine "
                     "on GPUs; not found here (set parallel.tp_comm_overlap=false)")
    if transformer_engine:
        # Packed rows run as one THD sequence of micro_batch x seq tokens under TE; pipeline
        # stages exchange [seq, micro_batch, hidden] tensors, which only agree at one row.
        _require(cfg.train.micro_batch_size == 1 or cfg.parallel.pp == 1,
                 "train.micro_batch_size", f"{cfg.train.micro_batch_size} rows per micro-batch "
                 "with parallel.pp > 1: packed rows run as THD sequences under Transformer "
                 "Engine, one row per micro-batch with pipeline parallelism")
    _validate_train(cfg, fp8_ok)
    if data_files:
        _validate_data_files(cfg)
    return cfg

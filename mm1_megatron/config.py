"""Typed run configuration: dataclasses, the preset registry, overrides and validation.

A run is fully described by one `Config`. Presets build it in code (`PRESETS`), a YAML file
and `key.sub=value` overrides adjust it, and `validate()` refuses anything inconsistent
before a process group starts, naming the field and the reason in one line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import yaml

ConnectorType = Literal["c_abstractor", "avg_pool", "attn_pool"]
Dispatcher = Literal["alltoall", "allgather"]
Precision = Literal["bf16", "fp16", "fp32"]
Fp8Format = Literal["hybrid", "e4m3"]
Fp8Recipe = Literal["delayed", "tensorwise"]
Recompute = Literal["none", "selective", "full"]


class ConfigError(ValueError):
    """A configuration problem, always attributed to one dotted field."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field_name = field_name
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class VisionConfig:
    """CLIP-style ViT (pre-LN, learned position embeddings, class token)."""

    image_size: int = 378
    patch_size: int = 14
    hidden_size: int = 1280
    num_layers: int = 32
    num_attention_heads: int = 16
    ffn_hidden_size: int = 5120
    class_token: bool = True
    layernorm_eps: float = 1e-5
    # Which layer's output feeds the connector: -1 the last, -2 the penultimate, or 1..N.
    # Layers after it are not built.
    feature_layer: int = -1
    recompute: Recompute = "none"
    recompute_layers: int = 1  # full recompute: layers per checkpointed group

    @property
    def layers_built(self) -> int:
        return self.feature_layer if self.feature_layer > 0 else \
            self.num_layers + 1 + self.feature_layer

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class ConnectorConfig:
    """Vision-language connector; every type maps the patch grid to `num_tokens` LLM tokens."""

    type: ConnectorType = "c_abstractor"
    num_tokens: int = 144  # 12x12 for the grid-based connectors
    hidden_size: int = 1024  # conv channels of the C-Abstractor
    depth: int = 3  # ResNet blocks before and after the adaptive pooling
    mlp_depth: int = 2  # readout MLP layers
    pos_emb: bool = True  # learned position embedding on the patch grid (Honeybee)

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.num_tokens)


@dataclass
class MoEConfig:
    """Mixture of experts in the decoder; `num_experts=0` means dense."""

    num_experts: int = 0
    layer_freq: int = 1  # every Nth decoder layer is an MoE layer (layer 0, N, 2N, ...)
    top_k: int = 2
    aux_loss_coeff: float = 0.01  # GShard load-balancing loss
    z_loss_coeff: float = 0.001  # ST-MoE router z-loss
    dispatcher: Dispatcher = "alltoall"
    expert_ffn_hidden_size: Optional[int] = None  # None: same as llm.ffn_hidden_size
    grouped_gemm: bool = False


@dataclass
class LLMConfig:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, no biases."""

    num_layers: int = 32
    hidden_size: int = 2560
    num_attention_heads: int = 32
    num_query_groups: Optional[int] = None  # None: multi-head attention; else GQA
    ffn_hidden_size: int = 6912
    vocab_size: int = 32000
    image_token_id: int = 3  # placeholder id; each image occupies connector.num_tokens of them
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    recompute: Recompute = "none"
    recompute_layers: int = 1  # full recompute: layers per checkpointed group
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe.expert_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.num_experts > 0 and layer % self.moe.layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))


@dataclass
class DataConfig:
    seq_length: int = 4096
    max_images_per_sequence: int = 16
    # Mixture weights (MM1: 45% interleaved, 45% caption pairs, 10% text-only).
    weight_interleaved: float = 0.45
    weight_caption: float = 0.45
    weight_text: float = 0.10
    path: str = ""  # root folder holding the three shard sets
    tokenizer_model: str = ""  # sentencepiece .model
    num_workers: int = 2  # DALI decoding threads
    prefetch: int = 2  # micro-batches prepared ahead in a background thread (0: inline)


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor parallel
    pp: int = 1  # pipeline parallel
    cp: int = 1  # context parallel
    ep: int = 1  # expert parallel
    expert_tp: Optional[int] = None  # tensor parallel inside experts; None: same as tp
    dp: Optional[int] = None  # None: derived as world_size / (tp * pp * cp)
    sequence_parallel: bool = False
    first_stage_layers: Optional[int] = None  # decoder layers on pipeline stage 0 (uneven PP)
    # Model chunks per pipeline rank: Megatron-Core's interleaved 1F1B schedule, which cuts
    # the pipeline bubble by this factor at the cost of more point-to-point traffic.
    virtual_stages: Optional[int] = None
    world_size: Optional[int] = None  # None: from the launcher's environment at run time
    gpus_per_node: Optional[int] = None  # set for GPU clusters: TP must stay inside a node
    # Nodes the layout was planned for (tools/plan.py); the world size of a dry run or plan
    # when neither parallel.world_size nor a launcher (torchrun/Slurm) gives one.
    planned_nodes: Optional[int] = None
    distributed_optimizer: bool = True
    # Megatron-Core communication overlaps (on in the GPU presets).
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # Transformer Engine userbuffers: the decoder's TP all-gathers / reduce-scatters overlap
    # its GEMMs (needs TE on GPUs, tp>1 with sequence parallelism; ignored at tp=1).
    tp_comm_overlap: bool = False

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


@dataclass
class TrainConfig:
    global_batch_size: int = 512
    micro_batch_size: int = 1
    train_steps: int = 200_000
    lr: Optional[float] = None  # None: the paper's rule over non-embedding LLM parameters
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay_ratio: float = 0.1  # decoupled weight decay = ratio * peak lr
    warmup_steps: int = 2000
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    precision: Precision = "bf16"
    fp8: Optional[Fp8Format] = None  # needs Transformer Engine on Hopper
    fp8_recipe: Fp8Recipe = "delayed"
    seed: int = 1234
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf steps before the run saves and stops


@dataclass
class CheckpointConfig:
    save_interval: int = 1000
    keep_last: int = 3
    resume: bool = True  # resume from the latest checkpoint in run_dir when there is one
    # A new run (nothing to resume) starts from these model weights: a checkpoint directory
    # of any layout, e.g. one written by mm1-import-hf from CLIP + Llama weights.
    init_from: Optional[str] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard: bool = True
    # Write run_dir/samples/dp_rank_N.jsonl: the global sample ids each step trained on (for
    # auditing data order and exact resume).
    sample_ids: bool = False


@dataclass
class EvalConfig:
    """In-training few-shot evaluation (mm1_megatron/evaluation): off while `tasks` is empty."""

    tasks: str = ""  # comma-separated JSONL task files (format: mm1_megatron/evaluation/tasks.py)
    interval: int = 1000  # steps between evaluations
    shots: str = "0,4"  # comma-separated in-context example counts
    limit: Optional[int] = 64  # examples per task (None: all)
    batch_size: int = 8
    seed: int = 0  # draws the in-context examples
    max_new_tokens: Optional[int] = None  # None: 20 for captioning, 10 for VQA


@dataclass
class Config:
    preset: str = ""
    run_dir: str = "runs/default"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Presets: one registry. Shapes and their parameter counts are tabulated in README.md and
# checked against the built Megatron-Core modules in tests/test_presets.py.
# --------------------------------------------------------------------------------------------

# Full-scale runs: bf16 on 8-GPU H100 nodes, the paper's batch and sequence. Each MM1 preset's
# layout is the one `tools/plan.py --search` picked for its node count (`planned_nodes`) with
# >= 15% memory margin; dp follows from the launcher's world size.
_GPU_RUN = dict(gpus_per_node=8, sequence_parallel=True, overlap_grad_reduce=True,
                overlap_param_gather=True)


def _tiny() -> Config:
    """Seconds-fast model for tests: 84 px images (6x6 patches) -> 9 tokens."""
    return Config(
        preset="tiny",
        run_dir="runs/tiny",
        vision=VisionConfig(image_size=84, hidden_size=32, num_layers=2, num_attention_heads=2,
                            ffn_hidden_size=64),
        connector=ConnectorConfig(num_tokens=9, hidden_size=32, depth=1),
        llm=LLMConfig(num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                      vocab_size=512),
        data=DataConfig(seq_length=128, max_images_per_sequence=4),
        train=TrainConfig(global_batch_size=4, micro_batch_size=2, train_steps=20, lr=1e-3,
                          warmup_steps=2, precision="fp32"),
        checkpoint=CheckpointConfig(save_interval=10),
        logging=LoggingConfig(log_interval=1),
    )


def _demo() -> Config:
    """The README's CPU demo: ViT + C-Abstractor + a small MoE decoder, minutes on 2 cores."""
    return Config(
        preset="demo",
        run_dir="runs/demo",
        vision=VisionConfig(image_size=112, hidden_size=128, num_layers=4, num_attention_heads=4,
                            ffn_hidden_size=512),
        connector=ConnectorConfig(num_tokens=16, hidden_size=128, depth=2),
        llm=LLMConfig(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                      vocab_size=2048, moe=MoEConfig(num_experts=4, layer_freq=2)),
        # 256 tokens with up to 8 images packs the demo data at ~90% (512 / 4 images: ~50%).
        data=DataConfig(seq_length=256, max_images_per_sequence=8, path="demo_data",
                        tokenizer_model="demo_data/tokenizer.model"),
        train=TrainConfig(global_batch_size=8, micro_batch_size=2, train_steps=100, lr=1e-3,
                          warmup_steps=10, precision="fp32"),
        checkpoint=CheckpointConfig(save_interval=50),
        logging=LoggingConfig(log_interval=10),
    )


def _mm1(name: str, llm: LLMConfig, nodes: int, micro_batch: int = 1,
         vision_recompute: Recompute = "none", fp8: Optional[Fp8Format] = None,
         **parallel: Any) -> Config:
    return Config(preset=name, run_dir=f"runs/{name}", llm=llm,
                  vision=VisionConfig(recompute=vision_recompute),
                  parallel=ParallelConfig(**_GPU_RUN, planned_nodes=nodes,
                                          tp_comm_overlap=parallel.get("tp", 1) > 1, **parallel),
                  train=TrainConfig(micro_batch_size=micro_batch, fp8=fp8))


# Llama-style decoders; vocabulary 32k (our sentencepiece model), untied embeddings.
_LLM_3B = LLMConfig(num_layers=32, hidden_size=2560, num_attention_heads=32,
                    ffn_hidden_size=7680)
_LLM_7B = LLMConfig(num_layers=32, hidden_size=4096, num_attention_heads=32,
                    ffn_hidden_size=12800)
_LLM_30B = LLMConfig(num_layers=52, hidden_size=7168, num_attention_heads=56,
                     num_query_groups=8, ffn_hidden_size=20480)


def _with_moe(llm: LLMConfig, num_experts: int, layer_freq: int) -> LLMConfig:
    return dataclasses.replace(llm, moe=MoEConfig(num_experts=num_experts, layer_freq=layer_freq))


PRESETS: dict[str, Callable[[], Config]] = {
    "tiny": _tiny,
    "demo": _demo,
    # 8 nodes: pure DP (dp=64).
    "mm1-3b": lambda: _mm1("mm1-3b", _LLM_3B, nodes=8),
    # 16 nodes: tp=2, dp=64.
    "mm1-7b": lambda: _mm1("mm1-7b", _LLM_7B, nodes=16, tp=2),
    # 32 nodes x 8 H100, FP8: tp=2, pp=4 with 7 decoder layers next to the ViT on stage 0 (15
    # on the others), dp=32, ViT fully recomputed.
    "mm1-30b": lambda: _mm1("mm1-30b", _LLM_30B, nodes=32, fp8="hybrid", vision_recompute="full",
                            tp=2, pp=4, first_stage_layers=7),
    # 16 nodes: ep=64 (one expert per GPU), dp=128.
    "mm1-3b-moe64": lambda: _mm1("mm1-3b-moe64", _with_moe(_LLM_3B, 64, 2), nodes=16, ep=64),
    # 16 nodes: tp=2, ep=32 (expert_tp = tp), dp=64.
    "mm1-7b-moe32": lambda: _mm1("mm1-7b-moe32", _with_moe(_LLM_7B, 32, 4), nodes=16, tp=2,
                                 ep=32),
}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name]())  # presets share section objects; never alias them


# --------------------------------------------------------------------------------------------
# Overrides: `key.sub=value` strings and nested YAML mappings, type-checked per field.
# --------------------------------------------------------------------------------------------


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Convert a parsed YAML scalar to the field's declared type, or refuse it."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"{value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"expected true/false, got {value!r}")
    if annotation in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads `3e-4` (no dot) as a string
            value = float(value)
        except ValueError:
            kind = "an integer" if annotation is int else "a number"
            raise ConfigError(path, f"expected {kind}, got {value!r}") from None
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"expected a number, got {value!r}")
    if annotation is str:
        return str(value)
    raise ConfigError(path, f"cannot set a field of type {annotation}")


# Megatron-LM / torchtitan spellings users type from habit.
_ALIASES = {
    "tensor_model_parallel_size": "tp", "tensor_parallel": "tp", "tensor_parallel_degree": "tp",
    "pipeline_model_parallel_size": "pp", "pipeline_parallel": "pp",
    "pipeline_parallel_degree": "pp", "context_parallel_size": "cp",
    "expert_model_parallel_size": "ep", "expert_parallel_degree": "ep",
    "data_parallel_size": "dp", "num_moe_experts": "num_experts",
    "moe_layer_freq": "layer_freq", "moe_router_topk": "top_k",
}


def _unknown_key(path: str, key: str, known: list[str]) -> ConfigError:
    if _ALIASES.get(key) in known:
        return ConfigError(path, f"unknown key; this project calls it {_ALIASES[key]!r}")
    near = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(known)}"
    return ConfigError(path, f"unknown key{hint}")


def set_field(cfg: Config, dotted: str, value: Any) -> None:
    """Set one dotted field, e.g. `parallel.tp`, with type checking."""
    obj: Any = cfg
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        path = ".".join(parts[: depth + 1])
        hints = _field_types(obj)
        if part not in hints:
            raise _unknown_key(path, part, sorted(hints))
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(path, "is a section; set one of its fields (section.field=value)")
            setattr(obj, part, _coerce(path, value, hints[part]))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(path, "is not a section")


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, dotted + ".")
        else:
            items.append((dotted, value))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def single_process_config(cfg: Config) -> Config:
    """The same model in one process: no model parallelism, one model chunk (evaluation,
    conversion). Only `parallel` changes."""
    out = copy.deepcopy(cfg)
    out.parallel = ParallelConfig(world_size=1)
    return out


RUN_CONFIG = "config.yaml"  # the resolved config a run started with, in its run_dir


def save_run_config(cfg: Config) -> Path:
    """Write the resolved config to run_dir/config.yaml (what mm1-eval and the converters
    read when no --preset is given)."""
    path = Path(cfg.run_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def load_run_config(run_dir: str | Path, overrides: list[str] = (),
                    this_machine: bool = False) -> Config:
    """The config a run trained with (run_dir/config.yaml), plus overrides."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(str(path), "no such file: the run's config is written by mm1-train "
                          "at start; give --preset (and the run's overrides) instead")
    data = yaml.safe_load(path.read_text()) or {}
    return load_config(data.get("preset", ""), list(overrides), str(path), this_machine)


def load_config(preset: str, overrides: list[str] = (), yaml_file: Optional[str] = None,
                this_machine: bool = True) -> Config:
    """Preset -> YAML file (optional) -> command-line overrides, then validation. With
    `this_machine` off (dry runs, plans for a cluster) FP8 is not checked against the local
    hardware."""
    cfg = get_preset(preset)
    if yaml_file:
        with open(yaml_file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(yaml_file, "a config file must hold a mapping of sections")
        data.pop("preset", None)
        for key, value in _flatten(data):
            set_field(cfg, key, value)
    for text in overrides:
        set_field(cfg, *parse_override(text))
    validate(cfg, fp8_ok=None if this_machine else True)
    return cfg


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


_MAY_BE_ZERO = {"train.warmup_steps", "data.prefetch", "eval.seed"}
_SIGNED = {"vision.feature_layer"}  # checked by its own rule


def _validate_positive(cfg: Config) -> None:
    for section in ("vision", "connector", "llm", "data", "parallel", "train", "eval"):
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value, name = getattr(obj, f.name), f"{section}.{f.name}"
            if isinstance(value, int) and not isinstance(value, bool) and name not in _SIGNED:
                floor = 0 if name in _MAY_BE_ZERO else 1
                _require(value >= floor, name, f"must be >= {floor}, got {value}")


def _validate_model(cfg: Config) -> None:
    v, c, llm, moe = cfg.vision, cfg.connector, cfg.llm, cfg.llm.moe
    _require(v.image_size % v.patch_size == 0, "vision.image_size",
             f"{v.image_size} is not a multiple of vision.patch_size={v.patch_size}")
    _require(v.hidden_size % v.num_attention_heads == 0, "vision.num_attention_heads",
             f"{v.num_attention_heads} does not divide vision.hidden_size={v.hidden_size}")
    _require(1 <= v.layers_built <= v.num_layers, "vision.feature_layer",
             f"{v.feature_layer} is not a layer of the {v.num_layers}-layer encoder")
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
    _require(t.warmup_steps < t.train_steps, "train.warmup_steps",
             f"{t.warmup_steps} is not below train.train_steps={t.train_steps}")
    for shots in filter(None, (k.strip() for k in cfg.eval.shots.split(","))):
        _require(shots.isdigit(), "eval.shots", f"{shots!r} is not a number of examples")
    d = cfg.data
    weights = (d.weight_interleaved, d.weight_caption, d.weight_text)
    _require(all(w >= 0 for w in weights) and sum(weights) > 0, "data.weight_interleaved",
             "mixture weights must be non-negative and not all zero")


def fp8_available() -> bool:
    """Transformer Engine importable and an FP8-capable GPU (Ada/Hopper or newer)."""
    from mm1_megatron.runtime.backends import detect_backends

    return detect_backends().fp8_available


def validate(cfg: Config, environ: Optional[dict[str, str]] = None,
             fp8_ok: Optional[bool] = None) -> Config:
    """Refuse an inconsistent config; raises ConfigError naming the field."""
    _validate_positive(cfg)
    _validate_model(cfg)
    _validate_parallel(cfg, environ)
    if fp8_ok is None:  # checked against this machine (not for dry runs / cluster plans)
        fp8_ok = cfg.train.fp8 is None or fp8_available()
        if cfg.parallel.tp_comm_overlap and cfg.parallel.tp > 1:
            from mm1_megatron.runtime.backends import detect_backends

            _require(detect_backends().layer_spec == "transformer_engine",
                     "parallel.tp_comm_overlap", "needs Transformer Engine on GPUs; not found "
                     "here (set parallel.tp_comm_overlap=false)")
    _validate_train(cfg, fp8_ok)
    return cfg

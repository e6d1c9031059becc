"""Overrides and loading: `key.sub=value` strings and YAML mappings, type-checked per field;
`load_config` (preset -> YAML -> overrides -> validation) and the run's saved config.yaml."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from mm1_megatron.config.presets import get_preset
from mm1_megatron.config.schema import Config, ConfigError, ParallelConfig
from mm1_megatron.config.validate import validate
from mm1_megatron.config.yaml_file import read_yaml_file


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
        if isinstance(value, list):  # train.freeze=[vision, connector]
            return ",".join(str(v) for v in value)
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


# --------------------------------------------------------------------------------------------
# Loading and saving: preset -> YAML file -> overrides -> validation; the run's config.yaml.
# --------------------------------------------------------------------------------------------


def single_process_config(cfg: Config) -> Config:
    """The same model in one process: no model parallelism, one model chunk (evaluation,
    conversion). Only `parallel` changes."""
    out = copy.deepcopy(cfg)
    out.parallel = ParallelConfig(world_size=1)
    return out


def evaluation_config(cfg: Config, world_size: int, tp: int = 1, ep: int = 1) -> Config:
    """The same model for evaluation on `world_size` ranks: tensor parallel `tp`, expert
    parallel `ep` (inside the data-parallel ranks, as in training), the rest data parallel;
    no pipeline stages. Sequence parallelism only where Megatron-Core's MoE layers need it
    (experts with tp>1; generation switches it off). Bf16, not FP8: scores are read from
    greedy tokens, and FP8 GEMMs want token counts in multiples of 16. Validated like a
    training layout, so a bad one is refused (ConfigError) before any process group starts."""
    out = copy.deepcopy(cfg)
    out.parallel = ParallelConfig(world_size=world_size, tp=tp, ep=ep,
                                  sequence_parallel=tp > 1 and cfg.llm.moe.num_experts > 0,
                                  distributed_optimizer=False)
    out.train.fp8 = None
    out.train.micro_batch_size = 1
    out.train.global_batch_size = max(1, world_size // tp)
    return validate(out, environ={}, fp8_ok=True)


RUN_CONFIG = "config.yaml"  # the resolved config a run started with, in its run_dir


def save_run_config(cfg: Config) -> Path:
    """Write the resolved config to run_dir/config.yaml (what mm1-eval and the converters
    read when no --preset is given)."""
    path = Path(cfg.run_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")  # atomic: readers never see half a file
    tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def load_run_config(run_dir: str | Path, overrides: list[str] = (),
                    this_machine: Optional[bool] = False, check: bool = True) -> Config:
    """The config a run trained with (run_dir/config.yaml), plus overrides."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(str(path), "no such file: the run's config is written by mm1-train "
                          "at start; give --preset (and the run's overrides) instead")
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a config file must hold a mapping of sections")
    return load_config(data.get("preset", ""), list(overrides), str(path), this_machine, check)


def load_config(preset: str, overrides: list[str] = (), yaml_file: Optional[str] = None,
                this_machine: Optional[bool] = None, check: bool = True) -> Config:
    """Preset -> YAML file (optional) -> command-line overrides, then validation.

    `this_machine`:
      True   a run starts here (mm1-train): FP8 / Transformer Engine are checked against the
             local hardware, and the data this run reads must be here: data.path holds a
             dataset folder, data.tokenizer_model is a sentencepiece model whose vocabulary
             fits llm.vocab_size.
      None   (default; building models in tests, tools) the local hardware is checked, the
             data files are not looked at.
      False  dry runs and plans for a cluster: neither.
    `check=False` leaves validation to the caller, which validates what it derives (mm1-eval:
    `evaluation_config` replaces the training layout, which is irrelevant to it).
    """
    cfg = get_preset(preset)
    given = []  # fields the file and the overrides set
    if yaml_file:
        data = read_yaml_file(yaml_file) or {}
        if not isinstance(data, dict):
            raise ConfigError(yaml_file, "a config file must hold a mapping of sections")
        data.pop("preset", None)
        for key, value in _flatten(data):
            set_field(cfg, key, value)
            given.append(key)
    for text in overrides:
        key, value = parse_override(text)
        set_field(cfg, key, value)
        given.append(key)
    if "data.blend" in given and "data.path" not in given:
        cfg.data.path = ""  # a blend replaces the preset's / file's one folder per kind
    if check:
        validate(cfg, fp8_ok=None if this_machine is not False else True,
                 data_files=this_machine is True)
    return cfg

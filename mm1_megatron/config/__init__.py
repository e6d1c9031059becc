"""Typed run configuration: dataclasses, the preset registry, overrides and validation.

A run is fully described by one `Config`. Presets build it in code (`PRESETS`), a YAML file
and `key.sub=value` overrides adjust it, and `validate()` refuses anything inconsistent
before a process group starts, naming the field and the reason in one line.

What lives where (import from this package; the modules import each other directly):
  schema.py     ConfigError, the section dataclasses and `Config`, Literal aliases (Recompute...)
  presets.py    the one preset registry: PRESETS, get_preset
  overrides.py  `key.sub=value` / YAML overrides (set_field, parse_override) and loading:
                load_config, save_run_config, load_run_config, RUN_CONFIG, single_process_config,
                evaluation_config
  validate.py   validate, launcher_world_size, resolve_world_size, data_parallel_size,
                fp8_available
  reference.py  docs/configuration.md from the schema's field comments (--write / --check)
  blend.py      data.blend's file and the run's datasets per kind (data_sources)
  yaml_file.py  read_yaml_file: a YAML file of ours, errors naming FILE:LINE
Dependencies point one way: schema <- presets, validate <- overrides.
"""

from mm1_megatron.config.overrides import (RUN_CONFIG, evaluation_config, load_config,
                                           load_run_config, parse_override, save_run_config,
                                           set_field, single_process_config)
from mm1_megatron.config.presets import PRESETS, get_preset
from mm1_megatron.config.schema import (CheckpointConfig, Config, ConfigError, ConnectorConfig,
                                        ConnectorType, DataConfig, Dispatcher, EvalConfig,
                                        Fp8Format, Fp8Recipe, ImageResize, LLMConfig,
                                        LoggingConfig, LrParams, MixtureUnit, MoEConfig,
                                        ParallelConfig, Precision, Recompute, RouterDtype,
                                        TrainConfig, VisionActivation, VisionConfig)
from mm1_megatron.config.validate import (data_parallel_size, fp8_available, launcher_world_size,
                                          resolve_world_size, validate)

__all__ = [
    # schema
    "CheckpointConfig", "Config", "ConfigError", "ConnectorConfig", "ConnectorType", "DataConfig",
    "Dispatcher", "EvalConfig", "Fp8Format", "Fp8Recipe", "LLMConfig", "LoggingConfig",
    "MoEConfig", "ParallelConfig", "Precision", "Recompute", "TrainConfig", "VisionConfig",
    "ImageResize", "LrParams", "MixtureUnit", "RouterDtype", "VisionActivation",
    # presets
    "PRESETS", "get_preset",
    # overrides and loading
    "RUN_CONFIG", "evaluation_config", "load_config", "load_run_config", "parse_override",
    "save_run_config", "set_field", "single_process_config",
    # validation
    "data_parallel_size", "fp8_available", "launcher_world_size", "resolve_world_size",
    "validate",
]

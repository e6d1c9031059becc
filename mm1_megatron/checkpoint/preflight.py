"""Checks of a run directory before a run starts (before any process group): what would lose
work is refused in one line naming the field (a ConfigError, as `mm1-train` prints it).

- starting over on a run's checkpoints without `checkpoint.overwrite`;
- resuming when every checkpoint is damaged or missing, or was written by a later
  Megatron-Core release than the installed one;
- resuming with another model shape (the load would fail after config.yaml was replaced);
- resuming on another dataset than the checkpoint's loader position refers to, without
  `data.allow_change`.
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from mm1_megatron.checkpoint.directory import (CheckpointFormatError, check_readable,
                                               complete_checkpoints, resume_point)
from mm1_megatron.config import RUN_CONFIG, Config, ConfigError
from mm1_megatron.config.yaml_file import read_yaml_file
from mm1_megatron.data.loader import dataset_fingerprint

# Fields of the model sections a run may change between restarts (how it computes, not what).
_NOT_MODEL_SHAPE = {"recompute", "recompute_layers", "dispatcher", "grouped_gemm",
                    "aux_loss_coeff", "z_loss_coeff"}


def _model_fields(sections: dict) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{prefix}.{key}")
        elif prefix.rsplit(".", 1)[-1] not in _NOT_MODEL_SHAPE:
            out[prefix] = value

    for section in ("vision", "connector", "llm"):
        walk(sections.get(section, {}), section)
    return out


def check_run_dir(cfg: Config) -> None:
    """Refuse, before any process group starts, a start that would lose work in run_dir:
    starting over on its checkpoints without checkpoint.overwrite, or resuming them with
    another model shape (which would fail in the load, after config.yaml was replaced)."""
    if cfg.checkpoint.resume:
        try:
            resume_from, _ = resume_point(cfg.run_dir)  # all damaged or missing: say so now
            if resume_from is not None:
                check_readable(resume_from)
        except (FileNotFoundError, CheckpointFormatError) as err:
            raise ConfigError("run_dir", str(err)) from None
        if resume_from is not None and not cfg.data.allow_change:
            _check_same_dataset(cfg, resume_from)
    existing = complete_checkpoints(cfg.run_dir)
    if not existing:
        return
    if not cfg.checkpoint.resume:
        if not cfg.checkpoint.overwrite:
            raise ConfigError("checkpoint.resume", f"false, but {cfg.run_dir} holds checkpoints "
                              f"(newest {existing[-1].name}) this run would overwrite; use a new "
                              "run_dir, or checkpoint.overwrite=true to delete them")
        return
    saved = Path(cfg.run_dir) / RUN_CONFIG
    if saved.is_file():
        before, now = _model_fields(read_yaml_file(saved) or {}), _model_fields(cfg.to_dict())
        changed = [f"{k} {before.get(k)!r} -> {now.get(k)!r}"
                   for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
        if changed:
            raise ConfigError("run_dir", f"{cfg.run_dir} holds checkpoints of another model "
                              f"({'; '.join(changed)}); resume with the run's config, or use a "
                              "new run_dir (checkpoint.init_from starts from other weights)")


def _check_same_dataset(cfg: Config, checkpoint: Path) -> None:
    """The loader position in `checkpoint` refers to the dataset it was saved with."""
    saved = (dist_checkpointing.load_common_state_dict(str(checkpoint)) or {}).get(
        "extra", {}).get("dataset")
    now = dataset_fingerprint(cfg.data)
    if saved is not None and saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        field = "data.blend" if cfg.data.blend else "data.path"
        raise ConfigError(field, f"{cfg.data.blend or cfg.data.path} is not the data "
                          f"{checkpoint.name} was "
                          f"trained on ({', '.join(changed)} changed); its loader position "
                          "would be applied to other samples: set data.allow_change=true to "
                          "continue on this data anyway")

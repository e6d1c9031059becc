"""Checkpoint I/O, below training, evaluation and conversion: dist_checkpointing save and
resume (`state`), the run directory's `checkpoints/` with `latest` and retention
(`directory`), and loading model weights alone into any layout."""

from mm1_megatron.checkpoint.directory import (checkpoint_root, latest_checkpoint,
                                               resolve_checkpoint)
from mm1_megatron.checkpoint.state import (AsyncCheckpointer, CheckpointSaveError, FinishedSave,
                                           load_checkpoint, load_model_state,
                                           load_model_weights, model_sharded_state,
                                           save_checkpoint)

__all__ = ["AsyncCheckpointer", "CheckpointSaveError", "FinishedSave", "checkpoint_root",
           "latest_checkpoint", "resolve_checkpoint", "load_checkpoint", "load_model_state", "load_model_weights", "model_sharded_state",
           "save_checkpoint"]

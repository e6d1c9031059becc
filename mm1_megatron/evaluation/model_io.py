"""A one-process MM1Model for evaluation (one per rank under a data-parallel launch), loaded
from a Megatron checkpoint of any layout.

dist_checkpointing matches tensors by their global keys (layer numbers include pipeline and
model-chunk offsets; TP/EP shards carry their global offsets), so requesting only the model
part (`checkpoint.load_model_weights`) from a checkpoint saved at any
TP/PP/EP/DP layout (and any number of model chunks) assembles the full tensors here. The
optimizer, scheduler and RNG states in the checkpoint are not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

from mm1_megatron.config import Config


def resolve_checkpoint(run_dir: Optional[Union[str, Path]] = None,
                       checkpoint: Optional[Union[str, Path]] = None) -> Path:
    """`checkpoint` (a step directory) if given, else the latest complete one in `run_dir`."""
    from mm1_megatron.checkpoint import resolve_checkpoint as resolve

    if checkpoint is None and run_dir is None:
        raise ValueError("give a run directory or a checkpoint directory")
    return resolve(checkpoint if checkpoint is not None else run_dir)


def build_eval_model(cfg: Config, seed: Optional[int] = None,
                     environ: Optional[Mapping[str, str]] = None):
    """Start a one-process world (if none is up; with `environ`, the launch's world, every
    rank a whole model: data parallel) and build the MM1Model in eval mode."""
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.specs import use_transformer_engine
    from mm1_megatron.runtime import init_distributed, training_device

    init_distributed(cfg.parallel, seed=cfg.train.seed if seed is None else seed,
                     environ={} if environ is None else environ)
    model = build_mm1_model(cfg, use_transformer_engine())
    model.to(training_device())
    model.eval()
    return model


def load_model_weights(model, path: Union[str, Path]) -> int:
    """Load the model part of a checkpoint into a one-process MM1Model; returns its step."""
    from megatron.core import dist_checkpointing

    from mm1_megatron import checkpoint

    checkpoint.load_model_weights(path, [model])
    return int(dist_checkpointing.load_common_state_dict(str(path)).get("step", -1))

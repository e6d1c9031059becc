"""A tiny MM1 checkpoint for the conversion tests: `save_single` builds the tiny model in this
process, perturbs its weights (so a wrong mapping shows) and saves it like the trainer does,
under RUN_DIR/checkpoints/step_00000001 with `latest` pointing at it.
"""

from __future__ import annotations

from pathlib import Path


def save_single(run_dir: str, overrides: list[str]) -> None:
    """The tiny model in this process, weights perturbed, saved like the trainer does."""
    import torch
    from megatron.core import dist_checkpointing

    from mm1_megatron.config import load_config
    from mm1_megatron.convert.verify import reference_config
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.checkpoint import model_sharded_state

    cfg = reference_config(load_config("tiny", overrides))
    model = build_mm1_model(cfg, use_te=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = Path(run_dir) / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save({"model": model_sharded_state([model]), "step": 1}, str(ckpt))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")

"""`torchrun --nproc_per_node N _save_worker.py RUN_DIR key=value... [:: RUN_DIR key=value...]`

Several jobs (`::`-separated) share one process group, so they need the same layout.

Builds the tiny MM1 model under the layout in the overrides, perturbs every weight (seeded per
rank, so norms, zero-initialised position tables and biases are not trivial) and saves the
model the way the trainer does (state key "model" -> {"chunk0": ...}) plus a `latest` marker.
"""

import sys
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
import torch.distributed as dist

from mm1_megatron.config import load_config
from mm1_megatron.runtime import init_distributed, shutdown_distributed
from mm1_megatron.checkpoint import model_sharded_state
from mm1_megatron.train.step import build_model


def main() -> None:
    jobs, job = [], []
    for arg in sys.argv[1:] + ["::"]:
        if arg == "::":
            jobs.append(job)
            job = []
        else:
            job.append(arg)
    for n, (run_dir, *overrides) in enumerate(jobs):
        cfg = load_config("tiny", overrides)
        if n == 0:
            init_distributed(cfg.parallel, seed=cfg.train.seed)
        save(cfg, run_dir)
    shutdown_distributed()


def save(cfg, run_dir: str) -> None:
    model = build_model(cfg, use_te=False)
    g = torch.Generator().manual_seed(77 + dist.get_rank())
    with torch.no_grad():
        for p in model[0].module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ckpt = Path(run_dir) / "checkpoints" / "step_00000001"
    if dist.get_rank() == 0:
        ckpt.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model_sharded_state(model), "step": 1}, str(ckpt))
    dist.barrier()
    if dist.get_rank() == 0:
        (ckpt.parent / "latest").write_text(ckpt.name + "\n")


if __name__ == "__main__":
    main()

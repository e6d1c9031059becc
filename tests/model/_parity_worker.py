"""Run as `torchrun --nproc_per_node N _parity_worker.py OUT.json CKPT [--save-init] key=value...`.

Builds the tiny MM1 model under the layout in the overrides, loads the initial weights from a
dist_checkpointing checkpoint (or, with --save-init, writes them: the single-process reference
does that), trains a few optimizer steps on a fixed synthetic global batch and writes per-step
loss and grad norm to OUT.json (from the last pipeline stage's first rank), and each MoE
router's gradient norm (the gradient the balancing and z-losses act on; layouts without PP).
"""

import os
import sys

from megatron.core import dist_checkpointing

from mm1_megatron.config import load_config
from mm1_megatron.runtime import init_distributed, shutdown_distributed
from mm1_megatron.checkpoint import load_model_state, model_sharded_state
from mm1_megatron.train.step import build_model, build_optimizer, train_step
from tests._helpers.parity import BASE, microbatches, synthetic_rows, write_report

STEPS = 3


def router_grad_norms(model) -> list[float]:
    """Each router weight's gradient norm this step. Router weights are replicated over TP
    (their SP partial gradients are summed by finalize_model_grads), so any rank holds them."""
    return [param.main_grad.float().norm().item()
            for chunk in model for name, param in chunk.named_parameters()
            if name.endswith("router.weight")]


def main() -> None:
    out_path, ckpt_dir, *rest = sys.argv[1:]
    save_init = "--save-init" in rest
    overrides = BASE + [a for a in rest if a != "--save-init"]
    cfg = load_config("tiny", overrides)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = build_model(cfg, use_te=False)
    state = model_sharded_state(model)
    if save_init:
        os.makedirs(ckpt_dir, exist_ok=True)
        dist_checkpointing.save(state, ckpt_dir)
    else:
        load_model_state(model, dist_checkpointing.load(state, ckpt_dir))
    optimizer, scheduler = build_optimizer(cfg, model)
    history = []
    for step in range(STEPS):
        rows = synthetic_rows(cfg, step, cfg.train.global_batch_size)
        result = train_step(cfg, model, optimizer, scheduler, microbatches(cfg, rows))
        history.append(dict(loss=result.loss, grad_norm=result.grad_norm,
                            skipped=result.skipped, router_grads=router_grad_norms(model)))
    write_report(out_path, history)
    shutdown_distributed()


if __name__ == "__main__":
    main()

"""`torchrun ... _ckpt_worker.py save|resume OUT.json RUN_DIR key=value...`

save: 2 optimizer steps, checkpoint at step 2, then step 2 again as the reference.
resume: build from a different seed, load the latest checkpoint (any layout), run step 2.
Both write step 2's loss and grad norm (and what was restored) to OUT.json.
"""

import sys


from mm1_megatron.config import load_config
from mm1_megatron.runtime import init_distributed, shutdown_distributed
from mm1_megatron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mm1_megatron.train.step import build_model, build_optimizer, train_step
from tests.model._parity_worker import BASE, microbatches, synthetic_rows, write_report


def main() -> None:
    mode, out_path, run_dir, *overrides = sys.argv[1:]
    cfg = load_config("tiny", BASE + list(overrides))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = build_model(cfg, use_te=False)
    optimizer, scheduler = build_optimizer(cfg, model)
    report: dict = {}
    rows = lambda step: microbatches(cfg, synthetic_rows(cfg, step, cfg.train.global_batch_size))
    if mode == "save":
        for step in range(2):
            train_step(cfg, model, optimizer, scheduler, rows(step))
        save_checkpoint(run_dir, 2, model, optimizer, scheduler,
                        extra={"loader": {"rows": 8}}, keep_last=2)
    else:
        restored = load_checkpoint(latest_checkpoint(run_dir), model, optimizer, scheduler)
        report.update(step=restored["step"], extra=restored["extra"],
                      rng_restored=restored["rng_restored"])
    result = train_step(cfg, model, optimizer, scheduler, rows(2))
    report.update(loss=result.loss, grad_norm=result.grad_norm, lr=result.lr)
    write_report(out_path, report)
    shutdown_distributed()


if __name__ == "__main__":
    main()

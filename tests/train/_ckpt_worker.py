"""`torchrun ... _ckpt_worker.py save|resume OUT.json RUN_DIR key=value...`

save: 2 optimizer steps, checkpoint at step 2, then steps 3 and 4 as the reference.
resume: build from a different seed, load the latest checkpoint (any layout), run steps 3, 4.
init: build from a different seed, load only the model weights, run steps 3, 4.
crash: as save, then step 3 and a save of it during which rank 0 is SIGKILLed as soon as the
       first checkpoint file is on disk (no report: the process dies).
save-async: as save, but the checkpoint of step 2 is written in the background
       (AsyncCheckpointer) while steps 3 and 4 train; finished after them.
Both write the loss and grad norm of the next two steps (and what was restored) to OUT.json:
the first checks the weights, the second the optimizer state (Adam moments, step, LR).
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

from mm1_megatron.config import load_config
from mm1_megatron.runtime import init_distributed, shutdown_distributed
from mm1_megatron.checkpoint import (AsyncCheckpointer, latest_checkpoint, load_checkpoint,
                                           load_model_weights, save_checkpoint)
from mm1_megatron.train.step import build_model, build_optimizer, train_step
from tests._helpers.parity import BASE, microbatches, synthetic_rows, write_report


def main() -> None:
    mode, out_path, run_dir, *overrides = sys.argv[1:]
    cfg = load_config("tiny", BASE + list(overrides))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = build_model(cfg, use_te=False)
    optimizer, scheduler = build_optimizer(cfg, model)
    report: dict = {}
    rows = lambda step: microbatches(cfg, synthetic_rows(cfg, step, cfg.train.global_batch_size))
    if mode in ("save", "crash", "save-async"):
        for step in range(2):
            train_step(cfg, model, optimizer, scheduler, rows(step))
    if mode in ("save", "crash"):
        save_checkpoint(run_dir, 2, model, optimizer, scheduler,
                        extra={"loader": {"rows": 8}}, keep_last=2,
                        fully_parallel=cfg.checkpoint.fully_parallel_save)
    if mode == "save-async":
        writer = AsyncCheckpointer()
        writer.start(run_dir, 2, model, optimizer, scheduler, extra={"loader": {"rows": 8}},
                     keep_last=2, fully_parallel=cfg.checkpoint.fully_parallel_save)
        report["machinery"] = writer.machinery
        report["writer_per_save"] = not writer._queue.persistent
        report["in_flight_after_start"] = writer.finish(blocking=False) is None
    if mode == "crash":
        train_step(cfg, model, optimizer, scheduler, rows(2))
        if int(os.environ["RANK"]) == 0:
            threading.Thread(target=kill_when_written, daemon=True,
                             args=(Path(run_dir) / "checkpoints" / "step_00000003.partial",)
                             ).start()
        save_checkpoint(run_dir, 3, model, optimizer, scheduler,
                        extra={"loader": {"rows": 12}}, keep_last=2)
        raise AssertionError("the save of step 3 finished before the injected crash")
    if mode == "init":  # checkpoint.init_from: the weights only, a fresh optimizer
        load_model_weights(latest_checkpoint(run_dir), model,
                           fully_parallel=cfg.checkpoint.fully_parallel_load)
    if mode == "resume":
        restored = load_checkpoint(latest_checkpoint(run_dir), model, optimizer, scheduler,
                                   fully_parallel=cfg.checkpoint.fully_parallel_load)
        report.update(step=restored["step"], extra=restored["extra"],
                      rng_restored=restored["rng_restored"],
                      schedule_changes=restored["schedule_changes"])
    result = train_step(cfg, model, optimizer, scheduler, rows(2))
    report.update(loss=result.loss, grad_norm=result.grad_norm, lr=result.lr)
    after = train_step(cfg, model, optimizer, scheduler, rows(3))
    report.update(next_loss=after.loss, next_grad_norm=after.grad_norm)
    if mode == "save-async":
        report["latest_while_writing"] = str(latest_checkpoint(run_dir))
        finished = writer.finish(blocking=True)
        report["finished_step"] = finished.step
    write_report(out_path, report)
    shutdown_distributed()


def kill_when_written(partial: Path) -> None:
    """SIGKILL this process once the partial checkpoint holds a file: a crash mid-save."""
    while not (partial.is_dir() and any(p.is_file() for p in partial.rglob("*"))):
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()

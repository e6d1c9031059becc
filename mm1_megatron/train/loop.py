"""The training loop: runtime -> model -> optimizer -> data -> steps, with callbacks."""

from __future__ import annotations

import contextlib
import itertools
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mm1_megatron.checkpoint import (AsyncCheckpointer, CheckpointSaveError, checkpoint_root,
                                     load_checkpoint, load_model_weights, save_checkpoint)
from mm1_megatron.checkpoint.directory import complete_checkpoints, resume_point
from mm1_megatron.checkpoint.run_lock import RunDirLocked, RunLock
from mm1_megatron.config import Config, save_run_config
from mm1_megatron.data.loader import MultimodalLoader, Prefetcher, dataset_fingerprint
from mm1_megatron.data.mixture import LoaderState
from mm1_megatron.model.flops import training_flops_per_sequence
from mm1_megatron.model.specs import use_transformer_engine
from mm1_megatron.runtime import (comm_device, describe_backends, init_distributed,
                                  shutdown_distributed)
from mm1_megatron.runtime.faults import hang_before_step
from mm1_megatron.runtime.watchdog import (HangWatchdog, collective_timeout,
                                           enable_flight_recorder)
from mm1_megatron.train.callbacks import (EXIT_PREEMPTED, EXIT_SAVE_FAILED, Callback,
                                          StepMetrics, Timer, default_callbacks,
                                          device_peak_tflops, peak_memory_gb)
from mm1_megatron.train.moe_metrics import MoEMetrics
from mm1_megatron.train.step import (build_model, build_optimizer, num_microbatches, reads_data,
                                     share_batches, train_step)


class Trainer:
    def __init__(self, cfg: Config, callbacks: Optional[list[Callback]] = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.callbacks = default_callbacks(cfg) if callbacks is None else callbacks
        self.stop_reason: Optional[str] = None
        self.exit_code = 0
        self.step = 0
        self.last_saved_step: Optional[int] = None
        self.save_failed = False
        self.checkpointer: Optional[AsyncCheckpointer] = None
        self.checkpoint_times: dict[str, float] = {}  # for the next step's metrics
        self.lock: Optional[RunLock] = None
        self.watchdog: Optional[HangWatchdog] = None
        self.skipped_total = 0
        self.sample_ids: list[list[int]] = []  # global sample ids of the last step's rows

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        for cb in self.callbacks:
            cb.on_setup(self)
        t = cfg.train
        if t.hang_timeout_s > 0:
            enable_flight_recorder()  # the hang report names the collective each rank waits in
        self.env = init_distributed(cfg.parallel, seed=t.seed, timeout=collective_timeout(
            t.hang_timeout_s, t.hang_timeout_slow_s))
        self.is_logging_rank = dist.get_rank() == 0
        # A hung collective exits 75 (requeue) like a preemption: the job resumes from the
        # last checkpoint instead of holding 256 GPUs until the time limit.
        self.watchdog = HangWatchdog(self.run_dir / "hang", dist.get_rank(), t.hang_timeout_s,
                                     t.hang_timeout_slow_s, exit_code=EXIT_PREEMPTED)
        self.watchdog.start("start-up (model build, checkpoint load)")
        if cfg.checkpoint.async_save:
            self.checkpointer = AsyncCheckpointer()
            if self.is_logging_rank:
                print(f"checkpoints: written in the background ({self.checkpointer.machinery})",
                      flush=True)
        self._lock_run_dir()  # before anything is written there
        latest, warning = self._resume_point() if cfg.checkpoint.resume else (None, None)
        if self.is_logging_rank:
            if not cfg.checkpoint.resume and cfg.checkpoint.overwrite:
                for old in complete_checkpoints(self.run_dir):  # asked for (cli checked)
                    shutil.rmtree(old)
                (checkpoint_root(self.run_dir) / "latest").unlink(missing_ok=True)
            if warning:
                print(f"mm1-train: warning: {warning}", file=sys.stderr, flush=True)
            if latest is None:  # a resumed run rewrites it once its checkpoint has loaded
                save_run_config(cfg)  # mm1-eval / the converters read it back
            print(describe_backends(cfg.train.precision, cfg.train.fp8), flush=True)
        dist.barrier()
        # Model FLOPs of one row (decoder) and one image (encoder + connector), for TFLOP/s.
        self.flops_per_row_and_image = training_flops_per_sequence(cfg, images=1)
        self.model = build_model(cfg, use_transformer_engine())
        self.moe_metrics = MoEMetrics(cfg, self.model) if cfg.llm.moe.num_experts else None
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        loader_state = None
        if latest is not None:
            restored = load_checkpoint(latest, self.model, self.optimizer, self.scheduler,
                                       fully_parallel=cfg.checkpoint.fully_parallel_load)
            self.step = self.last_saved_step = restored["step"]
            loader_state = LoaderState.from_dict(restored["extra"]["loader"])
            self.skipped_total = restored["extra"].get("skipped_steps", 0)
            if self.is_logging_rank:
                save_run_config(cfg)
                print(f"resumed from {latest} at step {self.step}", flush=True)
                if restored["schedule_changes"]:
                    print("resume: the config's LR / WD schedule replaces the checkpoint's: "
                          + ", ".join(restored["schedule_changes"]), flush=True)
        elif cfg.checkpoint.init_from:
            # Another image size (SFT at 672 px from a 378 px run): positions interpolated.
            load_model_weights(cfg.checkpoint.init_from, self.model, adapt_positions=True,
                               log=print if self.is_logging_rank else None,
                               fully_parallel=cfg.checkpoint.fully_parallel_load)
            if self.is_logging_rank:
                print(f"initialised model weights from {cfg.checkpoint.init_from}", flush=True)
        # One rank per tensor x pipeline group reads, tokenizes and decodes (the first stage's
        # TP rank 0, where the encoder runs); its peers plan the same rows from the index but
        # build nothing and receive the micro-batches (train.step.share_batches/share_images).
        reader = reads_data()
        self.loader = MultimodalLoader(cfg, ps.get_data_parallel_rank(),
                                       ps.get_data_parallel_world_size(), loader_state,
                                       log=print if self.is_logging_rank else None,
                                       decode_images=reader, build_rows=reader)
        self.loader_state = self.loader.state
        self.dataset = dataset_fingerprint(cfg.data.path)  # checked on resume (mm1-train)
        self.batches = Prefetcher(iter(self.loader), depth=cfg.data.prefetch) \
            if cfg.data.prefetch > 0 else iter(self.loader)

    def _resume_point(self) -> tuple[Optional[Path], Optional[str]]:
        """Rank 0 checks the checkpoint files once (files.json) and tells every rank which
        checkpoint to load; every rank reading them would multiply the I/O by the world."""
        choice: list = [None]
        if self.is_logging_rank:
            try:
                choice = [resume_point(self.run_dir)]
            except FileNotFoundError as err:  # all damaged since mm1-train checked them
                choice = [str(err)]
        dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], str):
            raise FileNotFoundError(choice[0])
        return choice[0]

    def _lock_run_dir(self) -> None:
        """Rank 0 holds run_dir/.lock for the whole run; every rank learns whether it did."""
        refused = ""
        if self.is_logging_rank:
            self.lock = RunLock(self.run_dir)
            try:
                self.lock.acquire()
            except RunDirLocked as err:
                refused = str(err)
        flag = torch.tensor([1.0 if refused else 0.0], device=comm_device())
        dist.broadcast(flag, src=0)
        if flag.item():
            raise RunDirLocked(refused or f"run_dir {self.run_dir} is in use by another run")

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.lock is not None:
            self.lock.release()

    @property
    def saving_step(self) -> Optional[int]:
        """The step of the async save in flight, if any."""
        pending = self.checkpointer.pending if self.checkpointer is not None else None
        return pending.step if pending is not None else None

    def slow_phase(self, what: str):
        """Context for a phase that may outlast a step (saves, evaluation): the hang
        watchdog's slow allowance while it runs."""
        return self.watchdog.allow(what) if self.watchdog is not None else \
            contextlib.nullcontext()

    def save(self) -> None:
        """Collective. Synchronous, or (checkpoint.async_save) started in the background after
        a save still in flight has finished: at most one is written at a time."""
        step = self.step
        if self.save_failed or step in (self.last_saved_step, self.saving_step):
            return  # a failure is said once (the run is stopping); a step is saved once
        if self.checkpointer is not None:
            in_flight = self.saving_step
            waited = self.finish_saves(blocking=True)
            if in_flight is not None and self.is_logging_rank:
                print(f"checkpoint: the save of step {step} waited {waited:.2f} s for the save "
                      f"of step {in_flight} to finish", flush=True)
            if self.save_failed:
                return
        extra = {"loader": self.loader_state.to_dict(), "skipped_steps": self.skipped_total,
                 "dataset": self.dataset}
        start = time.perf_counter()
        try:
            with self.slow_phase(f"the checkpoint save of step {step}"):
                how = dict(extra=extra, keep_last=self.cfg.checkpoint.keep_last,
                           fully_parallel=self.cfg.checkpoint.fully_parallel_save)
                if self.checkpointer is None:
                    save_checkpoint(self.run_dir, step, self.model, self.optimizer,
                                    self.scheduler, **how)
                else:
                    self.checkpointer.start(self.run_dir, step, self.model, self.optimizer,
                                            self.scheduler, **how)
        except CheckpointSaveError as err:  # raised on every rank alike
            self._save_failed(step, err)
            return
        blocked = time.perf_counter() - start
        self._add_time("checkpoint_blocking_s", blocked)
        if self.checkpointer is None:
            self._saved(step, write_s=blocked)
        elif self.is_logging_rank:
            print(f"checkpoint: step {step} is being written in the background "
                  f"({blocked:.2f} s blocking)", flush=True)

    def finish_saves(self, blocking: bool) -> float:
        """Collective. Completes the async save in flight if its files are written (blocking:
        waits for them); returns the seconds the step loop waited."""
        step, start = self.saving_step, time.perf_counter()
        if step is None:
            return 0.0
        try:
            with self.slow_phase(f"the background save of step {step}") if blocking else \
                    contextlib.nullcontext():
                done = self.checkpointer.finish(blocking)
        except CheckpointSaveError as err:  # the checkpointer dropped it
            self._save_failed(step, err)
            return time.perf_counter() - start
        waited = time.perf_counter() - start
        if blocking:
            self._add_time("checkpoint_blocking_s", waited)
        if done is not None:
            self._saved(done.step, write_s=done.write_s)
        return waited

    def _add_time(self, name: str, seconds: float) -> None:
        self.checkpoint_times[name] = self.checkpoint_times.get(name, 0.0) + seconds

    def _saved(self, step: int, write_s: float) -> None:
        self.last_saved_step = step
        self._add_time("checkpoint_write_s", write_s)
        if self.is_logging_rank:
            print(f"saved checkpoint at step {step}", flush=True)

    def _save_failed(self, step: int, err: CheckpointSaveError) -> None:
        self.save_failed = True
        reason = f"step {step} not saved: {err}; the last complete checkpoint is kept"
        if self.stop_reason is not None and self.exit_code != EXIT_SAVE_FAILED:
            # e.g. a preemption's final save: exit 75 would claim a checkpoint written
            self.stop_reason, self.exit_code = None, 0
        self.request_stop(reason, EXIT_SAVE_FAILED)

    def request_stop(self, reason: str, exit_code: int) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.exit_code = reason, exit_code

    def _agree_on_stop(self) -> None:
        """Every rank stops together (a signal may reach only some ranks)."""
        flag = torch.tensor([float(self.exit_code)], device=comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.stop_reason is None:
            self.stop_reason, self.exit_code = "another rank asked to stop", int(flag.item())

    # -- one step ------------------------------------------------------------------------
    def _metrics(self, result, seconds: float, images: int) -> StepMetrics:
        cfg = self.cfg
        world = dist.get_world_size()
        counts = torch.tensor([float(images)], device=comm_device())  # summed over DP ranks
        dist.all_reduce(counts, group=ps.get_data_parallel_group())
        images_global = counts.item()
        rows = cfg.train.global_batch_size
        unit = self.flops_per_row_and_image
        flops = rows * unit.llm + images_global * (unit.vision + unit.connector)
        tflops = flops / seconds / world / 1e12
        peak = device_peak_tflops(cfg.train.precision, cfg.train.fp8)
        return StepMetrics(
            step=self.step, loss=result.loss, grad_norm=result.grad_norm, lr=result.lr,
            skipped=result.skipped, skipped_total=self.skipped_total, step_time=seconds,
            tokens_per_s=rows * cfg.data.seq_length / seconds,
            images_per_s=images_global / seconds, tflops_per_device=tflops,
            mfu=None if peak is None else tflops / peak, memory_gb=peak_memory_gb(),
            source_losses=result.source_losses,
            moe=self.moe_metrics.collect(num_microbatches(cfg)) if self.moe_metrics else {},
            data_counters=self.loader_state.counters,  # of the batches consumed
            checkpoint=self._take_checkpoint_times())

    def _take_checkpoint_times(self) -> dict[str, float]:
        times, self.checkpoint_times = self.checkpoint_times, {}
        return times

    def run_step(self) -> StepMetrics:
        """One iteration of `train`: the step's micro-batches from `self.batches`, the
        optimizer step, metrics, callbacks, agreeing on a stop (benchmarks time it alone)."""
        micro = num_microbatches(self.cfg)
        self.finish_saves(blocking=False)  # a background save whose files are written
        hang_before_step(dist.get_rank(), self.step + 1)  # tests' fault injection only
        with Timer() as timer:
            pairs = list(itertools.islice(self.batches, micro))
            batches = share_batches([batch for batch, _ in pairs])
            self.loader_state = pairs[-1][1]  # consumed, not prefetched
            images = sum(int(b["image_ok"].numel()) for b in batches)
            self.sample_ids = [row for b in batches for row in b["sample_ids"]]
            result = train_step(self.cfg, self.model, self.optimizer, self.scheduler, batches)
        self.step += 1
        self.skipped_total += int(result.skipped)
        metrics = self._metrics(result, timer.seconds, images)
        for cb in self.callbacks:
            cb.on_step(self, metrics)
        self._agree_on_stop()
        if self.watchdog is not None:
            self.watchdog.step_done(self.step)
        return metrics

    def train(self) -> int:
        for cb in self.callbacks:
            cb.on_train_start(self)
        if self.watchdog is not None:
            self.watchdog.first_step(self.step)
        while self.step < self.cfg.train.train_steps and self.stop_reason is None:
            self.run_step()
        for cb in self.callbacks:
            cb.on_train_end(self)
        # Also on SIGTERM / USR1: exit (75) only once the last checkpoint is complete.
        self.finish_saves(blocking=True)
        if self.stop_reason and self.is_logging_rank:
            print(f"mm1-train: stopped at step {self.step}: {self.stop_reason}",
                  file=sys.stderr, flush=True)
        return self.exit_code


def train(cfg: Config, callbacks: Optional[list[Callback]] = None) -> int:
    """Set up, train, shut the process groups down. `callbacks`: default_callbacks(cfg) when
    not given (the entry point adds its own, e.g. few-shot evaluation)."""
    trainer = Trainer(cfg, callbacks)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.close()
        shutdown_distributed()

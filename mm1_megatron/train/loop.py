"""The training loop: runtime -> model -> optimizer -> data -> steps, with callbacks.

Checkpoints are the `CheckpointManager`'s (checkpoint.manager): the loop registers what a
checkpoint carries besides the model and optimizer, and asks it to save and finish saves.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from mm1_megatron.checkpoint.manager import EXIT_SAVE_FAILED, CheckpointManager, StatePart
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
from mm1_megatron.train.callbacks import (EXIT_PREEMPTED, Callback, StepMetrics, Timer,
                                          default_callbacks, device_peak_tflops, peak_memory_gb)
from mm1_megatron.train.moe_metrics import MoEMetrics
from mm1_megatron.train.step import (build_model, build_optimizer, num_microbatches, reads_data,
                                     share_batches, train_step)


class Trainer:
    def __init__(self, cfg: Config, callbacks: Optional[list[Callback]] = None):
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        given = default_callbacks(cfg) if callbacks is None else callbacks
        self.callbacks = sorted(given, key=lambda cb: -cb.priority)  # stable: ties keep order
        self.stop_reason: Optional[str] = None
        self.exit_code = 0
        self.is_logging_rank = False  # until the process group says (hooks may run before)
        self.step = 0
        self.watchdog: Optional[HangWatchdog] = None
        self.checkpoints: Optional[CheckpointManager] = None
        self.skipped_total = 0
        self.loader_state: Optional[LoaderState] = None  # the position of the batches consumed
        self.sample_ids: list[list[int]] = []  # global sample ids of the last step's rows

    def _each(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # -- lifecycle -----------------------------------------------------------------------
    def setup(self) -> None:
        try:
            self._setup()
        except BaseException as err:
            self._on_error(err)
            raise

    def _setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self._each("on_setup")
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
        self.checkpoints = CheckpointManager(
            cfg, on_failure=self._save_failed, slow_phase=self.slow_phase,
            on_published=lambda step, path: self._each("on_checkpoint", step, path))
        resume_from = self.checkpoints.open()  # locks run_dir before anything is written
        if self.is_logging_rank:
            if resume_from is None:  # a resumed run rewrites it once its checkpoint has loaded
                save_run_config(cfg)  # mm1-eval / the converters read it back
            print(describe_backends(cfg.train.precision, cfg.train.fp8), flush=True)
        dist.barrier()
        # Model FLOPs of one row (decoder) and one image (encoder + connector), for TFLOP/s.
        self.flops_per_row_and_image = training_flops_per_sequence(cfg, images=1)
        self.model = build_model(cfg, use_transformer_engine())
        self.moe_metrics = MoEMetrics(cfg, self.model) if cfg.llm.moe.num_experts else None
        self.optimizer, self.scheduler = build_optimizer(cfg, self.model)
        self.checkpoints.attach(self.model, self.optimizer, self.scheduler)
        self._register_checkpoint_parts()
        self.step = self.checkpoints.load(resume_from)
        if resume_from is not None and self.is_logging_rank:
            save_run_config(cfg)
        # One rank per tensor x pipeline group reads, tokenizes and decodes (the first stage's
        # TP rank 0, where the encoder runs); its peers plan the same rows from the index but
        # build nothing and receive the micro-batches (train.step.share_batches/share_images).
        reader = reads_data()
        self.loader = MultimodalLoader(cfg, ps.get_data_parallel_rank(),
                                       ps.get_data_parallel_world_size(), self.loader_state,
                                       log=print if self.is_logging_rank else None,
                                       decode_images=reader, build_rows=reader)
        self.loader_state = self.loader.state
        self.batches = Prefetcher(iter(self.loader), depth=cfg.data.prefetch) \
            if cfg.data.prefetch > 0 else iter(self.loader)

    def _register_checkpoint_parts(self) -> None:
        """What a checkpoint carries besides model, optimizer and scheduler (under these
        names in its common state): where the data stands, the skipped steps, the dataset's
        identity (checked on resume by mm1-train), and the callbacks' counters."""
        parts = self.checkpoints
        parts.register("loader", StatePart(lambda: self.loader_state.to_dict(), lambda state:
                                           setattr(self, "loader_state",
                                                   LoaderState.from_dict(state))),
                       required=True)
        parts.register("skipped_steps", StatePart(lambda: self.skipped_total, lambda n:
                                                  setattr(self, "skipped_total", n)))
        dataset = dataset_fingerprint(self.cfg.data)
        parts.register("dataset", StatePart(lambda: dataset, lambda saved: None))
        for cb in self.callbacks:
            if cb.has_state():
                parts.register(f"callback/{type(cb).__name__}",
                               StatePart(cb.state_dict, cb.load_state_dict))

    def close(self) -> None:
        """The watchdog stopped (a slow close is no hang), every callback's `close` (each
        one, whatever the others do), then run_dir's lock."""
        if self.watchdog is not None:
            self.watchdog.stop()
        for cb in self.callbacks:
            try:
                cb.close(self)
            except Exception as err:  # noqa: BLE001 - the others still close
                print(f"mm1-train: {type(cb).__name__}.close failed: {err!r}",
                      file=sys.stderr, flush=True)
        if self.checkpoints is not None:
            self.checkpoints.close()

    def _on_error(self, error: BaseException) -> None:
        for cb in self.callbacks:
            try:
                cb.on_error(self, error)
            except Exception as err:  # noqa: BLE001 - the first error is the one raised
                print(f"mm1-train: {type(cb).__name__}.on_error failed: {err!r}",
                      file=sys.stderr, flush=True)

    def slow_phase(self, what: str):
        """Context for a phase that may outlast a step (saves, evaluation): the hang
        watchdog's slow allowance while it runs."""
        return self.watchdog.allow(what) if self.watchdog is not None else \
            contextlib.nullcontext()

    def _save_failed(self, reason: str) -> None:
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
            checkpoint=self.checkpoints.take_times())

    def run_step(self) -> StepMetrics:
        """One iteration of `train`: the step's micro-batches from `self.batches`, the
        optimizer step, metrics, callbacks, agreeing on a stop (benchmarks time it alone)."""
        micro = num_microbatches(self.cfg)
        self.checkpoints.finish(blocking=False)  # a background save whose files are written
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
        self._each("on_step", metrics)
        self._agree_on_stop()
        if self.watchdog is not None:
            self.watchdog.step_done(self.step)
        return metrics

    def train(self) -> int:
        try:
            self._each("on_train_start")
            if self.watchdog is not None:
                self.watchdog.first_step(self.step)
            while self.step < self.cfg.train.train_steps and self.stop_reason is None:
                self.run_step()
            self._each("on_train_end")
            # Also on SIGTERM / USR1: exit (75) only once the last checkpoint is complete.
            self.checkpoints.finish(blocking=True)
        except BaseException as err:
            self._on_error(err)
            raise
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

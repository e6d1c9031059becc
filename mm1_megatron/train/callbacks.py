"""Training callbacks: console line, TensorBoard, sample ids, checkpoints, NaN guard,
preemption signals.

The contract (`Callback`): hooks run in descending `priority` (ties keep the order given);
`on_error` runs when setup or a step raises and `close` always runs, from the loop's
`finally`, so files and signal handlers are released whatever happened. Callbacks may ask the
run to stop (`trainer.request_stop(reason, exit_code)`); the loop agrees on that across ranks
before acting, so no rank leaves a collective behind. A callback with counters to keep over a
restart overrides `state_dict` / `load_state_dict`: the checkpoint carries them.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from mm1_megatron.config import Config
from mm1_megatron.data.mixture import SOURCES

# The run's exit statuses besides 0 and a crash's 1; EXIT_SAVE_FAILED (4) is the checkpoint
# manager's: a checkpoint could not be written (e.g. disk full), the previous one kept.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint written, requeue me (the Slurm scripts use it)
EXIT_NON_FINITE = 3  # too many NaN/Inf steps in a row: checkpoint written, needs a human


@dataclass
class StepMetrics:
    """What one optimizer step measured, reduced over ranks (what callbacks log)."""

    step: int
    loss: Optional[float]
    grad_norm: Optional[float]
    lr: float
    skipped: bool
    skipped_total: int
    step_time: float
    tokens_per_s: float
    images_per_s: float
    tflops_per_device: float
    mfu: Optional[float]
    memory_gb: float
    source_losses: dict[int, float] = field(default_factory=dict)
    moe: dict[str, float] = field(default_factory=dict)
    data_counters: dict[str, int] = field(default_factory=dict)
    # checkpoint_blocking_s (the step loop waited for a save) / checkpoint_write_s (a save's
    # start to its checkpoint complete), of the saves since the previous step's metrics.
    checkpoint: dict[str, float] = field(default_factory=dict)


class Callback:
    """Hooks of the run; a callback subclasses this (the trainer calls every hook and reads
    `priority`). `trainer` is the `train.loop.Trainer` (not imported here: the loop imports
    this module): cfg, run_dir, step, model, is_logging_rank, checkpoints (the
    `CheckpointManager`), request_stop(), slow_phase().

    `priority`: higher runs first (the defaults: 90 signals, 80 NaN guard, 70-50 logging, 20
    checkpointing, 10 evaluation; 0 for a callback that does not say)."""

    priority: int = 0

    def on_setup(self, trainer) -> None: ...  # before anything is built or loaded
    def on_train_start(self, trainer) -> None: ...
    def on_step(self, trainer, metrics: StepMetrics) -> None: ...
    # After checkpoint `path` of `step` is complete and `latest` names it (every rank).
    def on_checkpoint(self, trainer, step: int, path: Path) -> None: ...
    def on_train_end(self, trainer) -> None: ...  # the last step done (not after an error)
    def on_error(self, trainer, error: BaseException) -> None: ...  # setup or a step raised
    def close(self, trainer) -> None: ...  # always, last: release what the callback holds

    # Counters to carry over a restart: plain Python values, the same on every rank.
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...

    def has_state(self) -> bool:
        return type(self).state_dict is not Callback.state_dict


class ConsoleLog(Callback):
    """One concise line every `logging.log_interval` steps (rank 0)."""

    priority = 70

    def on_step(self, trainer, m) -> None:
        if trainer.is_logging_rank and m.step % trainer.cfg.logging.log_interval == 0:
            loss = f"{m.loss:.4f}" + (" (update skipped)" if m.skipped else "")
            grad = "-" if m.grad_norm is None else f"{m.grad_norm:.3f}"
            print(f"step {m.step:>6}/{trainer.cfg.train.train_steps} | loss {loss} | "
                  f"lr {m.lr:.2e} | grad {grad} | {m.step_time:.2f}s | "
                  f"{m.tokens_per_s:,.0f} tok/s | {m.images_per_s:.1f} img/s | "
                  f"{m.tflops_per_device:.3f} TFLOP/s/dev"
                  + (f" | MFU {m.mfu:.1%}" if m.mfu is not None else ""), flush=True)


class TensorBoard(Callback):
    """Scalars under run_dir/tensorboard (rank 0 writes; values are already reduced)."""

    priority = 60

    def __init__(self) -> None:
        self.writer = None

    def on_train_start(self, trainer) -> None:
        if trainer.is_logging_rank:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"))

    def on_step(self, trainer, m) -> None:
        if self.writer is None:
            return
        w, step = self.writer, m.step
        scalars = {"loss/lm": m.loss, "optim/lr": m.lr, "optim/grad_norm": m.grad_norm,
                   "optim/skipped_steps": m.skipped_total, "perf/step_time_s": m.step_time,
                   "perf/tokens_per_s": m.tokens_per_s, "perf/images_per_s": m.images_per_s,
                   "perf/tflops_per_device": m.tflops_per_device, "perf/mfu": m.mfu,
                   MEMORY_TAG: m.memory_gb}
        scalars.update({f"loss/{SOURCES[s]}": v for s, v in m.source_losses.items()})
        scalars.update({f"moe/{k}": v for k, v in m.moe.items()})
        scalars.update({f"data/{k}": v for k, v in m.data_counters.items()})
        scalars.update({f"perf/{k}": v for k, v in m.checkpoint.items()})
        for name, value in scalars.items():
            if value is not None:
                w.add_scalar(name, value, step)
        w.flush()

    def close(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class SampleLog(Callback):
    """`logging.sample_ids`: run_dir/samples/dp_rank_N.jsonl, one line per step with the
    global sample ids of each row this data-parallel rank trained on."""

    priority = 50

    def __init__(self) -> None:
        self.file = None

    def on_train_start(self, trainer) -> None:
        from megatron.core import parallel_state as ps

        if ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0:
            path = trainer.run_dir / "samples" / f"dp_rank_{ps.get_data_parallel_rank()}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = path.open("a")

    def on_step(self, trainer, m) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": m.step, "rows": trainer.sample_ids}) + "\n")
            self.file.flush()

    def close(self, trainer) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Checkpointing(Callback):
    """Every `checkpoint.save_interval` steps, when the run is asked to stop, and at the end."""

    priority = 20  # after what may ask to stop or log the step

    def on_step(self, trainer, m) -> None:
        # Never conditioned on a local stop request: saving is collective, and a signal may
        # have reached only this rank (the loop agrees on stopping after the callbacks).
        if m.step % trainer.cfg.checkpoint.save_interval == 0:
            trainer.checkpoints.save(trainer.step)

    def on_train_end(self, trainer) -> None:
        if trainer.checkpoints.last_saved_step != trainer.step:
            trainer.checkpoints.save(trainer.step)


class NonFiniteGuard(Callback):
    """Skipped (NaN/Inf) steps are counted; after `train.max_nonfinite_steps` in a row the run
    saves and stops. A resumed run counts afresh (a human may have changed train.lr)."""

    priority = 80

    def __init__(self) -> None:
        self.in_a_row = 0

    def on_step(self, trainer, m) -> None:
        self.in_a_row = self.in_a_row + 1 if m.skipped else 0
        limit = trainer.cfg.train.max_nonfinite_steps
        if self.in_a_row >= limit:
            trainer.request_stop(f"{limit} steps in a row had a NaN/Inf loss or gradient "
                                 f"(last at step {m.step}); lower train.lr or check the data",
                                 EXIT_NON_FINITE)


class PreemptionSignals(Callback):
    """SIGTERM / SIGUSR1 (Slurm's warning before the time limit): checkpoint, exit 75."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
    priority = 90

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_setup(self, trainer) -> None:
        # At once: a signal during model build or checkpoint load must not kill the rank.
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handler)

    def on_step(self, trainer, m) -> None:
        if self.received is not None:
            trainer.request_stop(f"received {signal.Signals(self.received).name}; checkpoint "
                                 "written, exit for requeue", EXIT_PREEMPTED)

    def close(self, trainer) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


@dataclass
class Timer:
    start: float = 0.0

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def default_callbacks(cfg: Config) -> list[Callback]:
    """What every run has; the entry point adds others (e.g. few-shot evaluation). The
    trainer orders them by priority."""
    callbacks: list[Callback] = [PreemptionSignals(), NonFiniteGuard(), ConsoleLog()]
    if cfg.logging.tensorboard:
        callbacks.append(TensorBoard())
    if cfg.logging.sample_ids:
        callbacks.append(SampleLog())
    return callbacks + [Checkpointing()]


# Peak device memory on GPUs (what limits a layout); peak host RSS on CPU runs.
MEMORY_TAG = "memory/max_allocated_gb" if torch.cuda.is_available() else "memory/max_rss_gb"


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_tflops(precision: str, fp8: Optional[str]) -> Optional[float]:
    """Dense peak of the device for MFU; None where no figure applies (CPU runs)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        return 1979.0 if fp8 else 989.0
    return None

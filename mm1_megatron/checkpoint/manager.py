"""A run's checkpoints as one object the training loop asks: `CheckpointManager`.

It owns everything between "save step N" and a published `step_N/`: the run directory's lock,
which checkpoint a run resumes from (or which weights it starts from), synchronous and
background saves (at most one in flight), publishing, and a failed save turned into the run's
exit status. What a checkpoint holds besides model, optimizer and scheduler comes from
registered stateful parts (`register(name, part)`): the loader's position, the skipped-step
count, the dataset's identity, a callback's counters. Each part's `state_dict()` is saved
under its name in the checkpoint's common state (`extra[name]`, the format older
checkpoints have) and handed back to its `load_state_dict()` on resume.

Every method marked collective is called by every rank at the same point.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Protocol

import torch
import torch.distributed as dist

from mm1_megatron.checkpoint.directory import (checkpoint_root, complete_checkpoints,
                                               resume_point, step_dir_name)
from mm1_megatron.checkpoint.run_lock import RunDirLocked, RunLock
from mm1_megatron.checkpoint.state import (AsyncCheckpointer, CheckpointSaveError,
                                           load_checkpoint, load_model_weights,
                                           save_checkpoint)
from mm1_megatron.config import Config
from mm1_megatron.runtime import comm_device

EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (e.g. disk full): the previous one kept


class Stateful(Protocol):
    """A part of the run whose state a checkpoint carries. `state_dict()` returns plain
    Python values, the same on every rank (rank 0's copy is the one saved)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class StatePart:
    """A stateful part given as two functions (for state that lives in plain attributes)."""

    def __init__(self, get: Callable[[], Any], put: Callable[[Any], None]):
        self.state_dict, self.load_state_dict = get, put


class CheckpointManager:
    """`open()` before anything is written to run_dir, `attach(model, optimizer, scheduler)`
    once they are built, `register` the stateful parts, then `load(...)`, `save(step)`,
    `finish(blocking)` from the loop, and `close()` at the end.

    `on_failure(reason)`: told once when a save cannot complete; the run is expected to stop
    with EXIT_SAVE_FAILED (the previous complete checkpoint stays). `on_published(step,
    path)`: after each checkpoint is complete and `latest` names it. `slow_phase(what)`: a
    context for phases that may outlast a step (the hang watchdog's slow allowance)."""

    def __init__(self, cfg: Config, on_failure: Callable[[str], None],
                 on_published: Callable[[int, Path], None] = lambda step, path: None,
                 slow_phase: Callable[[str], ContextManager] = lambda what:
                 contextlib.nullcontext()):
        self.cfg = cfg.checkpoint
        self.run_dir = Path(cfg.run_dir)
        self.on_failure, self.on_published, self.slow_phase = on_failure, on_published, \
            slow_phase
        self.parts: dict[str, tuple[Stateful, bool]] = {}
        self.checkpointer = AsyncCheckpointer() if self.cfg.async_save else None
        self.last_saved_step: Optional[int] = None
        self.failed = False
        self.times: dict[str, float] = {}  # since the last take_times(), for step metrics
        self.lock: Optional[RunLock] = None
        self.model = self.optimizer = self.scheduler = None

    @property
    def is_logging_rank(self) -> bool:
        return dist.get_rank() == 0

    def _log(self, text: str) -> None:
        if self.is_logging_rank:
            print(text, flush=True)

    # -- start ---------------------------------------------------------------------------
    def open(self) -> Optional[Path]:
        """Collective. Locks run_dir, returns the checkpoint to resume from (None: a new
        run), and on `resume=false` + `overwrite` deletes the old checkpoints."""
        if self.checkpointer is not None:
            self._log(f"checkpoints: written in the background ({self.checkpointer.machinery})")
        self._lock_run_dir()
        latest, warning = self._resume_point() if self.cfg.resume else (None, None)
        if self.is_logging_rank:
            if not self.cfg.resume and self.cfg.overwrite:
                for old in complete_checkpoints(self.run_dir):  # asked for (cli checked)
                    shutil.rmtree(old)
                (checkpoint_root(self.run_dir) / "latest").unlink(missing_ok=True)
            if warning:
                print(f"mm1-train: warning: {warning}", file=sys.stderr, flush=True)
        return latest

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

    def attach(self, model, optimizer, scheduler) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def register(self, name: str, part: Stateful, required: bool = False) -> None:
        """`required`: a checkpoint without this part is refused on resume (rather than the
        part silently starting over)."""
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} is registered twice")
        self.parts[name] = (part, required)

    def load(self, checkpoint: Optional[Path]) -> int:
        """Collective. Resumes from `checkpoint` (model, optimizer, scheduler, RNG and every
        registered part) and returns its step; without one, loads `checkpoint.init_from`'s
        model weights if set (any layout or image size) and returns 0."""
        if checkpoint is None:
            if self.cfg.init_from:
                load_model_weights(self.cfg.init_from, self.model, adapt_positions=True,
                                   log=print if self.is_logging_rank else None,
                                   fully_parallel=self.cfg.fully_parallel_load)
                self._log(f"initialised model weights from {self.cfg.init_from}")
            return 0
        restored = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler,
                                   fully_parallel=self.cfg.fully_parallel_load)
        saved = restored["extra"]
        for name, (part, required) in self.parts.items():
            if name in saved:
                part.load_state_dict(saved[name])
            elif required:
                raise KeyError(f"{checkpoint}: holds no {name!r} state; it cannot be resumed "
                               "from (checkpoint.init_from takes its model weights)")
        self.last_saved_step = restored["step"]
        self._log(f"resumed from {checkpoint} at step {restored['step']}")
        if restored["schedule_changes"]:
            self._log("resume: the config's LR / WD schedule replaces the checkpoint's: "
                      + ", ".join(restored["schedule_changes"]))
        return restored["step"]

    # -- saving --------------------------------------------------------------------------
    @property
    def saving_step(self) -> Optional[int]:
        """The step of the background save in flight, if any."""
        pending = self.checkpointer.pending if self.checkpointer is not None else None
        return pending.step if pending is not None else None

    def save(self, step: int) -> None:
        """Collective. Synchronous, or (checkpoint.async_save) started in the background after
        a save still in flight has finished: at most one is written at a time."""
        if self.failed or step in (self.last_saved_step, self.saving_step):
            return  # a failure is said once (the run is stopping); a step is saved once
        if self.checkpointer is not None:
            in_flight = self.saving_step
            waited = self.finish(blocking=True)
            if in_flight is not None:
                self._log(f"checkpoint: the save of step {step} waited {waited:.2f} s for the "
                          f"save of step {in_flight} to finish")
            if self.failed:
                return
        extra = {name: part.state_dict() for name, (part, _) in self.parts.items()}
        start = time.perf_counter()
        try:
            with self.slow_phase(f"the checkpoint save of step {step}"):
                how = dict(extra=extra, keep_last=self.cfg.keep_last,
                           fully_parallel=self.cfg.fully_parallel_save)
                write = save_checkpoint if self.checkpointer is None else self.checkpointer.start
                write(self.run_dir, step, self.model, self.optimizer, self.scheduler, **how)
        except CheckpointSaveError as err:  # raised on every rank alike
            self._failed(step, err)
            return
        blocked = time.perf_counter() - start
        self._add_time("checkpoint_blocking_s", blocked)
        if self.checkpointer is None:
            self._published(step, write_s=blocked)
        else:
            self._log(f"checkpoint: step {step} is being written in the background "
                      f"({blocked:.2f} s blocking)")

    def finish(self, blocking: bool) -> float:
        """Collective. Completes the background save in flight if its files are written
        (blocking: waits for them); returns the seconds the caller waited."""
        step, start = self.saving_step, time.perf_counter()
        if step is None:
            return 0.0
        try:
            with self.slow_phase(f"the background save of step {step}") if blocking else \
                    contextlib.nullcontext():
                done = self.checkpointer.finish(blocking)
        except CheckpointSaveError as err:  # the checkpointer dropped it
            self._failed(step, err)
            return time.perf_counter() - start
        waited = time.perf_counter() - start
        if blocking:
            self._add_time("checkpoint_blocking_s", waited)
        if done is not None:
            self._published(done.step, write_s=done.write_s)
        return waited

    def take_times(self) -> dict[str, float]:
        """checkpoint_blocking_s (the loop waited for saves) and checkpoint_write_s (a save's
        start to its checkpoint complete) since the last call."""
        times, self.times = self.times, {}
        return times

    def _add_time(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds

    def _published(self, step: int, write_s: float) -> None:
        self.last_saved_step = step
        self._add_time("checkpoint_write_s", write_s)
        self._log(f"saved checkpoint at step {step}")
        self.on_published(step, checkpoint_root(self.run_dir) / step_dir_name(step))

    def _failed(self, step: int, err: CheckpointSaveError) -> None:
        self.failed = True
        self.on_failure(f"step {step} not saved: {err}; the last complete checkpoint is kept")

    def close(self) -> None:
        """Releases run_dir's lock. A background save still in flight (the run raised before
        finishing it) is never published: its writer dies with this process, and the next
        run resumes from the last complete checkpoint (`latest`), never a `.partial`."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

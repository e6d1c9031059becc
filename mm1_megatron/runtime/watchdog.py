"""A hang watchdog: a step that never completes becomes stacks on disk and a requeue.

A hung collective (a dead link, a stuck or lost rank) blocks every rank of a job inside NCCL /
gloo until Slurm's time limit; nothing in the step loop can notice, because the loop is the
thing that is stuck. So a thread on every rank watches a deadline that the loop moves forward
each time a step completes. When it passes, the thread writes every thread's Python stack
(`faulthandler`) and the last completed step to `run_dir/hang/rank_N.txt`, prints one line
naming the rank and the step, and ends the process with the requeue status (the collective
never returns, so only `os._exit` can end it). Megatron-LM delegates this to
nvidia-resiliency-ext's heartbeats; torchtitan sets collective timeouts and dumps flight
recorder traces. The process-group timeout (`collective_timeout`) is set just above the
largest allowance, so a collective can never outlive the watchdog.

Allowances: `timeout_s` per step; `slow_timeout_s` for the first step (start-up, compilation,
first collectives) and for what the loop marks slow (`allow(...)`: checkpoint saves / loads,
evaluation).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional

# Above the slow allowance: the watchdog, which writes stacks and exits for a requeue, fires
# before a collective's own timeout, which would only raise (or abort, under NCCL).
_COLLECTIVE_MARGIN_S = 60.0
_DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def slow_allowance(timeout_s: float, slow_timeout_s: float) -> float:
    """The first step's and slow phases' allowance: `slow_timeout_s`, or 5 x the step's."""
    return slow_timeout_s if slow_timeout_s > 0 else 5.0 * timeout_s


def collective_timeout(timeout_s: float, slow_timeout_s: float) -> timedelta:
    """The NCCL / gloo process-group timeout for a run whose watchdog has these allowances
    (torch's 10 minutes when the watchdog is off, and never below it)."""
    if timeout_s <= 0:
        return _DEFAULT_COLLECTIVE_TIMEOUT
    seconds = slow_allowance(timeout_s, slow_timeout_s) + _COLLECTIVE_MARGIN_S
    return max(_DEFAULT_COLLECTIVE_TIMEOUT, timedelta(seconds=seconds))


class HangWatchdog:
    """`start("start-up")` after the process groups exist, `first_step(step)` before the
    loop, `step_done(step)` after each step, `with allow("checkpoint save"):` around slow
    phases, `stop()` at the end. Off when
    `timeout_s <= 0` (every method is then a no-op)."""

    def __init__(self, folder: str | Path, rank: int, timeout_s: float, slow_timeout_s: float,
                 exit_code: int, poll_s: Optional[float] = None):
        self.folder = Path(folder)
        self.rank = rank
        self.timeout_s = timeout_s
        self.slow_s = slow_allowance(timeout_s, slow_timeout_s)
        self.exit_code = exit_code
        self.poll_s = poll_s if poll_s is not None else min(1.0, max(0.05, timeout_s / 20))
        self.enabled = timeout_s > 0
        self.last_step: Optional[int] = None
        self.waiting_for = "the first step"
        self._deadline = float("inf")
        self._allowed = 0.0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def report_path(self) -> Path:
        return self.folder / f"rank_{self.rank}.txt"

    def _arm(self, seconds: float, waiting_for: str) -> None:
        with self._lock:
            self._deadline = time.monotonic() + seconds
            self._allowed = seconds
            self.waiting_for = waiting_for

    def start(self, waiting_for: str) -> None:
        """Start watching, with the slow allowance for `waiting_for` (start-up)."""
        if not self.enabled or self._thread is not None:
            return
        self._arm(self.slow_s, waiting_for)
        self._thread = threading.Thread(target=self._watch, name="mm1-hang-watchdog",
                                        daemon=True)
        self._thread.start()

    def first_step(self, step: int) -> None:
        """The slow allowance for this process's first step (step + 1)."""
        if self.enabled:
            self.last_step = step
            self._arm(self.slow_s, f"step {step + 1} (the first of this process)")

    def step_done(self, step: int) -> None:
        if self.enabled:
            self.last_step = step
            self._arm(self.timeout_s, f"step {step + 1}")

    @contextmanager
    def allow(self, what: str) -> Iterator[None]:
        """A phase that may take longer than a step (saves, loads, evaluation): the slow
        allowance while it runs, then the step's allowance again from its end."""
        if not self.enabled:
            yield
            return
        before = self.waiting_for
        self._arm(self.slow_s, f"{what} after step {self.last_step}")
        try:
            yield
        finally:
            self._arm(self.timeout_s, before)

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _watch(self) -> None:
        while not self._stopped.wait(self.poll_s):
            with self._lock:
                late = time.monotonic() > self._deadline
                allowed, waiting_for = self._allowed, self.waiting_for
            if late:
                self._fire(allowed, waiting_for)

    def _fire(self, allowed: float, waiting_for: str) -> None:
        """Stacks to disk, one line, exit. Runs on the watchdog thread while the main thread
        is blocked (in a collective, I/O or a stuck data reader)."""
        line = (f"mm1-train: rank {self.rank}: hang: {waiting_for} did not complete within "
                f"{allowed:.0f} s (last completed step {self.last_step}); stacks in "
                f"{self.report_path}; exiting {self.exit_code} for a requeue")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.report_path, "w") as report:
                report.write(f"rank {self.rank}, pid {os.getpid()}\n"
                             f"last completed step: {self.last_step}\n"
                             f"waiting for: {waiting_for} (allowed {allowed:.0f} s)\n"
                             f"at: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n\n")
                report.flush()
                faulthandler.dump_traceback(report, all_threads=True)
        except OSError as err:  # a dead filesystem may be the hang itself: the line still goes
            line += f" (could not write the stacks: {err})"
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(self.exit_code)

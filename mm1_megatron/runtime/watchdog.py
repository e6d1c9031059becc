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

torch's flight recorder (the last collectives of every process group; NCCL, and gloo in recent
torch) is switched on with the watchdog (`enable_flight_recorder`), so the report and the line
also say which collective the rank waits in: in a 256-rank job the ranks "in no collective" are
the ones the others wait for.

Allowances: `timeout_s` per step; `slow_timeout_s` for the first step (start-up, compilation,
first collectives) and for what the loop marks slow (`allow(...)`: checkpoint saves / loads,
evaluation).
"""

from __future__ import annotations

import faulthandler
import json
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


# Entries of torch's flight-recorder ring buffer per process group (torchtitan keeps 20000 by
# default; a hang needs only the last step's).
FLIGHT_RECORDER_ENTRIES = 2000
_FLIGHT_RECORDER_VARS = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")  # new, old name
_DUMP_WAIT_S = 5.0  # a flight-recorder dump that blocks must not stop the exit for a requeue
# After its report, a rank waits this long (at most half its step allowance) before exiting:
# its peers armed the same deadline at the same step end and fire within a poll or two, and
# each should write its own stacks. Exiting at once lets gloo tell a peer still waiting in
# a collective "connection closed" and crash it with a traceback instead of a report.
_EXIT_GRACE_S = 5.0


def enable_flight_recorder(entries: int = FLIGHT_RECORDER_ENTRIES) -> None:
    """Before the process groups are made (torch reads it then); a setting of either name in
    the environment wins, 0 included."""
    if not any(name in os.environ for name in _FLIGHT_RECORDER_VARS):
        for name in _FLIGHT_RECORDER_VARS:
            os.environ[name] = str(entries)


def collectives_in_flight() -> tuple[str, list[str]]:
    """From torch's flight recorder: (the phrase for the hang line, e.g. "waiting in
    gloo:all_reduce #12 on default_pg" or "in no collective"; "" when nothing was recorded) and
    the lines for the report."""
    from torch._C import _distributed_c10d as c10d

    dump = getattr(c10d, "_dump_fr_trace_json", None) or \
        getattr(c10d, "_dump_nccl_trace_json", None)  # torch before the rename
    if dump is None:
        return "", ["flight recorder: not in this torch"]
    trace = json.loads(dump(includeCollectives=True, onlyActive=False))
    entries = trace.get("entries") or []
    if not entries:
        return "", [f"flight recorder: nothing recorded ({_FLIGHT_RECORDER_VARS[0]}="
                    f"{os.environ.get(_FLIGHT_RECORDER_VARS[0], 'unset')})"]
    # An entry's process group: (name, description); Megatron-Core describes its groups
    # (DATA_PARALLEL_GROUP, ...), torch says "undefined" for the others.
    names = {str(name): desc if desc not in ("", "undefined") else f"group {name}"
             for name, desc in (e["process_group"] for e in entries)}

    def described(e: dict) -> str:
        return (f"{e['profiling_name']} #{e['collective_seq_id']} on "
                f"{names[str(e['process_group'][0])]}")

    waiting = [e for e in entries if not e.get("retired")]  # retired: its work completed
    lines = ["collectives (torch flight recorder):"]
    lines += [f"  in flight: {described(e)}, sizes {e.get('input_sizes')} "
              f"{e.get('input_dtypes')}" for e in waiting]
    for key, status in sorted((trace.get("pg_status") or {}).items()):
        lines.append(f"  {names.get(str(key), f'group {key}')}: last enqueued "
                     f"#{status.get('last_enqueued_collective')}, last completed "
                     f"#{status.get('last_completed_collective')}")
    if not waiting:
        return "in no collective", lines
    more = f" (+{len(waiting) - 1} more)" if len(waiting) > 1 else ""
    return f"waiting in {described(waiting[0])}{more}", lines


def _bounded(fn, seconds: float):
    """fn()'s result, or an exception naming why there is none (raised, or still running after
    `seconds`)."""
    out: list = [TimeoutError(f"no answer within {seconds:.0f} s")]

    def run() -> None:
        try:
            out[0] = fn()
        except Exception as err:  # noqa: BLE001 - reported, never raised into the exit path
            out[0] = err

    thread = threading.Thread(target=run, name="mm1-hang-flight-recorder", daemon=True)
    thread.start()
    thread.join(seconds)
    return out[0]


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
        found = _bounded(collectives_in_flight, _DUMP_WAIT_S)
        if isinstance(found, Exception):
            phrase, collectives = "", [f"flight recorder: unavailable "
                                       f"({type(found).__name__}: {found})"]
        else:
            phrase, collectives = found
        line = (f"mm1-train: rank {self.rank}: hang: {waiting_for} did not complete within "
                f"{allowed:.0f} s (last completed step {self.last_step})"
                f"{'; ' + phrase if phrase else ''}; stacks in {self.report_path}; exiting "
                f"{self.exit_code} for a requeue")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(self.report_path, "w") as report:
                report.write(f"rank {self.rank}, pid {os.getpid()}\n"
                             f"last completed step: {self.last_step}\n"
                             f"waiting for: {waiting_for} (allowed {allowed:.0f} s)\n"
                             f"at: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
                report.write("\n".join(collectives) + "\n\n")
                report.flush()
                faulthandler.dump_traceback(report, all_threads=True)
        except OSError as err:  # a dead filesystem may be the hang itself: the line still goes
            line += f" (could not write the stacks: {err})"
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        time.sleep(min(_EXIT_GRACE_S, self.timeout_s / 2))
        os._exit(self.exit_code)

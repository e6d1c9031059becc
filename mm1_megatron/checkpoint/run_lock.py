"""One run per run directory: `run_dir/.lock`, held with `flock` by rank 0 for the whole run.

A second `mm1-train` on the same `run_dir` would resume the first one's step and both would
write the same checkpoints, sample logs and event files; it is refused in one line naming the
holder (host, pid, Slurm job). The kernel drops a flock when its holder dies, so a killed run
never blocks the next one; where a network filesystem keeps a dead holder's lock, the lock is
taken over when the holder is this host's dead pid or this very Slurm job (a requeue).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional


class RunDirLocked(RuntimeError):
    """Another live run holds the run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self.file = None

    def _me(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.time()}

    def _try(self) -> bool:
        file = self.path.open("a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.close()
            return False
        file.seek(0)
        file.truncate()
        file.write(json.dumps(self._me()) + "\n")
        file.flush()
        self.file = file
        return True

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def _stale(self, holder: Optional[dict]) -> bool:
        if holder is None:
            return False
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:
            return True  # this job, requeued: its earlier incarnation is gone
        return holder.get("host") == socket.gethostname() and not _alive(int(holder["pid"]))

    def acquire(self) -> None:
        """Hold the lock, or raise RunDirLocked with one line naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._try():
            return
        holder = self.holder()
        if self._stale(holder):
            self.path.unlink(missing_ok=True)  # a new file: the stale lock stays on the old one
            if self._try():
                return
        who = "another run" if holder is None else (
            f"pid {holder['pid']} on {holder['host']}"
            + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else ""))
        raise RunDirLocked(f"run_dir {self.path.parent} is in use by {who}; wait for it to "
                           "finish or choose another run_dir")

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None

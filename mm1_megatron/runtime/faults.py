"""Fault injection for the test suite: environment variables that make a real failure happen
where it would happen in production (a rank that stops before a collective, a checkpoint
write that crawls). Unset, as outside tests, each costs one dictionary lookup."""

from __future__ import annotations

import os
import time
from pathlib import Path

# "RANK:STEP[:ONCE_FILE]": that rank stops before step STEP's first collective and never
# comes back (its peers then wait in that collective). With ONCE_FILE, only while that file
# does not exist (the fault creates it), so a requeued run gets past the step.
HANG = "MM1_FAULT_HANG"
# "SECONDS[:FROM_STEP]": the background checkpoint write sleeps this long before it starts
# writing (holds an async save in flight, for kills and signals to land during it); with
# FROM_STEP, only the saves of that step and later.
SLOW_SAVE = "MM1_FAULT_SLOW_SAVE_S"


def hang_before_step(rank: int, step: int) -> None:
    spec = os.environ.get(HANG)
    if not spec:
        return
    want_rank, want_step, *once = spec.split(":", 2)
    if (int(want_rank), int(want_step)) != (rank, step):
        return
    if once:
        marker = Path(once[0])
        if marker.exists():
            return
        marker.write_text(f"rank {rank} hung before step {step}\n")
    while True:  # what a lost peer looks like to the others: it never arrives
        time.sleep(3600)


def slow_save_seconds(step: int) -> float:
    seconds, _, from_step = (os.environ.get(SLOW_SAVE) or "0").partition(":")
    return float(seconds) if step >= int(from_step or 0) else 0.0

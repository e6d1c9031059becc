"""Reading back what a run wrote to TensorBoard: `scalars`, every (step, value) of one tag
over all of a run directory's event files, in step order."""

from __future__ import annotations

from pathlib import Path


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars(tag)]
    return sorted(values)

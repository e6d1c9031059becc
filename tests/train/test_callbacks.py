"""The callback contract, on a real Trainer (tiny model, demo data, one process): hooks run
by priority, `on_checkpoint` follows each published checkpoint with the callbacks' state in
it, and when setup or a step raises every callback's `on_error` and `close` run (files,
signal handlers and run_dir's lock released)."""

import pytest

from tests._procs import run_ranks

pytestmark = pytest.mark.slow  # a tiny training run with a checkpoint per step: ~10 s


def run_that_raises_at_step_2(data: str, run_dir: str) -> dict:
    import fcntl
    import signal
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import latest_checkpoint
    from mm1_megatron.config import load_config
    from mm1_megatron.train.callbacks import Callback, default_callbacks
    from mm1_megatron.train.loop import train

    cfg = load_config("tiny", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               "llm.vocab_size=2048", f"run_dir={run_dir}", "train.train_steps=3",
                               "train.warmup_steps=1", "checkpoint.save_interval=1",
                               "data.prefetch=0", "logging.sample_ids=true"])
    events: list = []

    class Recorder(Callback):
        def __init__(self, priority: int) -> None:
            self.priority = priority

        def on_step(self, trainer, m) -> None:
            events.append(["step", self.priority, m.step])
            if self.priority == 0 and m.step == 2:
                raise RuntimeError("boom at step 2")

        def on_checkpoint(self, trainer, step, path) -> None:
            complete = Path(path).is_dir() and latest_checkpoint(trainer.run_dir) == path
            common = dist_checkpointing.load_common_state_dict(str(path))
            events.append(["checkpoint", self.priority, step, complete,
                           sorted(common["extra"])])

        def on_train_end(self, trainer) -> None:
            events.append(["train_end", self.priority])

        def on_error(self, trainer, error) -> None:
            events.append(["error", self.priority, str(error)])

        def close(self, trainer) -> None:
            events.append(["close", self.priority])

    class Steps(Callback):  # a callback with state: the checkpoint carries it
        def __init__(self) -> None:
            self.seen = 0

        def on_step(self, trainer, m) -> None:
            self.seen += 1

        def state_dict(self) -> dict:
            return {"seen": self.seen}

        def load_state_dict(self, state: dict) -> None:
            self.seen = state["seen"]

    handler_before = signal.getsignal(signal.SIGTERM)
    defaults = default_callbacks(cfg)
    raised = None
    try:
        train(cfg, defaults + [Recorder(5), Recorder(0), Recorder(100), Steps()])
    except RuntimeError as err:
        raised = str(err)

    class FailsAtSetup(Recorder):
        def on_setup(self, trainer) -> None:
            raise ValueError("no setup")

    try:  # before any process group or checkpoint manager exists
        train(cfg, [FailsAtSetup(7)])
    except ValueError as err:
        events.append(["setup raised", str(err)])
    samples = next(cb for cb in defaults if type(cb).__name__ == "SampleLog")
    lock = (Path(run_dir) / ".lock").open("a")
    try:  # free again: the run released it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock_free = True
    except BlockingIOError:
        lock_free = False
    return {"raised": raised, "events": events, "samples_closed": samples.file is None,
            "sigterm_restored": signal.getsignal(signal.SIGTERM) == handler_before,
            "lock_free": lock_free}


def test_callbacks_run_by_priority_and_close_when_a_step_raises(demo_data, tmp_path):
    result = run_ranks(__file__, "run_that_raises_at_step_2", timeout=300,
                       kwargs={"data": str(demo_data), "run_dir": str(tmp_path / "run")})[0]
    assert result["raised"] == "boom at step 2"
    events = result["events"]
    steps = [e[1:] for e in events if e[0] == "step"]
    # Higher priority first; the checkpoint (Checkpointing, priority 20) published before
    # the priority-5 callback's step hook ran.
    assert steps == [[100, 1], [5, 1], [0, 1], [100, 2], [5, 2], [0, 2]]
    first = events.index(["step", 5, 1])
    published = [e for e in events[:first] if e[0] == "checkpoint"]
    parts = ["callback/Steps", "dataset", "loader", "skipped_steps"]
    assert published == [["checkpoint", p, 1, True, parts] for p in (100, 5, 0)]
    # Step 2 raised in the priority-0 callback: no end of training, every on_error and
    # close ran, each once, by priority; the defaults released what they held.
    assert not any(e[0] == "train_end" for e in events)
    tail = [e for e in events if e[0] in ("error", "close", "setup raised")]
    assert tail == [["error", p, "boom at step 2"] for p in (100, 5, 0)] + \
        [["close", p] for p in (100, 5, 0)] + \
        [["error", 7, "no setup"], ["close", 7], ["setup raised", "no setup"]]
    assert result["samples_closed"] and result["sigterm_restored"] and result["lock_free"]

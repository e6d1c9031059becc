"""Trainer overhead: median step time of the full mm1-train step (loader with DALI, callbacks,
metrics, NaN guard) against a bare Megatron-Core forward/backward/optimizer loop over the same
model with pre-built batches, in the same process, after warm-up.

    python benchmarks/trainer_overhead.py [--steps 12 --warmup 3]

Builds the demo data in a temporary folder; the last line is JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm1_megatron.config import load_config  # noqa: E402
from mm1_megatron.data.loader import MultimodalLoader  # noqa: E402
from mm1_megatron.train.callbacks import Callback, default_callbacks  # noqa: E402
from mm1_megatron.train.loop import Trainer  # noqa: E402
from mm1_megatron.train.step import num_microbatches, train_step  # noqa: E402


class StepClock(Callback):
    """Wall time from one step's end to the next: the whole loop iteration, callbacks included."""

    def __init__(self) -> None:
        self.last = None
        self.times: list[float] = []

    def on_step(self, trainer, metrics) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        self.last = now


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                        str(data)], check=True, capture_output=True)
        total = args.warmup + args.steps
        cfg = load_config("demo", [f"data.path={data}",
                                   f"data.tokenizer_model={data}/tokenizer.model",
                                   f"run_dir={tmp}/run", f"train.train_steps={total + 1}",
                                   "train.warmup_steps=1", f"checkpoint.save_interval={10**6}",
                                   f"logging.log_interval={10**6}"])
        clock = StepClock()
        trainer = Trainer(cfg, callbacks=default_callbacks(cfg) + [clock])
        trainer.setup()

        # Bare loop first: the same model/optimizer and the very same batches (a fresh loader
        # with the same config replays the trainer's sequence), all built beforehand.
        micro = num_microbatches(cfg)
        replay = iter(MultimodalLoader(cfg, 0, 1, log=None))
        steps = [[batch for batch, _ in itertools.islice(replay, micro)] for _ in range(total)]
        bare = []
        for step, batches in enumerate(steps):
            start = time.perf_counter()
            train_step(cfg, trainer.model, trainer.optimizer, trainer.scheduler, batches)
            if step >= args.warmup:
                bare.append(time.perf_counter() - start)
        del steps, replay

        # Then the full mm1-train loop over the same sequence of batches.
        trainer.train()
        full = clock.times[args.warmup:]
        from mm1_megatron.runtime import shutdown_distributed

        shutdown_distributed()
    result = {"benchmark": "trainer_overhead", "preset": "demo",
              "full_step_median_s": round(statistics.median(full), 4),
              "bare_step_median_s": round(statistics.median(bare), 4),
              "ratio": round(statistics.median(full) / statistics.median(bare), 3),
              "steps": args.steps, "warmup": args.warmup,
              "baseline": "get_forward_backward_func + optimizer.step on the same batches, pre-built"}
    print(f"full mm1-train step {result['full_step_median_s']:.3f}s vs bare Megatron-Core "
          f"step {result['bare_step_median_s']:.3f}s -> {result['ratio']:.2f}x")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""Trainer overhead: the mm1-train step against the bare Megatron-Core step it wraps.

    python benchmarks/trainer_overhead.py [--repeats 7 --warmup 2] [--quick]

One process, one model, one optimizer, the demo preset (`--quick`: a smaller demo model).
The loader runs with `data.prefetch=0` (no background thread exists at any time) and builds
every round's micro-batches before timing starts, so neither side reads, tokenizes or decodes
while timed (data_pipeline.py and data_at_scale.py measure that). Each round then runs, in this
order, on that round's same micro-batches:

  full  (candidate): `Trainer.run_step` - micro-batches pulled from the trainer's batch
        iterator, share_batches, loader state and sample ids, `train_step`, the step metrics
        (image count all-reduce, FLOPs, peak memory, MoE router statistics), every default
        callback (console, TensorBoard, NaN guard, preemption, checkpoint test) and the
        all-reduce agreeing on a stop;
  noop  (self-check): the same `Trainer.run_step` with the callbacks replaced by none;
  bare  (baseline): `train_step(cfg, model, optimizer, scheduler, batches)` - zero the grads,
        Megatron-Core's forward/backward schedule, the NaN check, optimizer and LR step.

So bare is a strict subset of noop, itself a subset of full; torch's thread count is checked
to be the same for every step, and no prefetch thread to be alive. Self-check: noop vs bare
must be within the run's own spread of 1.0 (and full never faster than bare beyond it), else
"valid" is false.

Why an earlier version measured the full step faster than the bare one (ratio 0.69-0.94): it
timed all bare steps first and then all full steps, two blocks of ~30-45 s each, on 2 cores
shared with other processes whose load changes on that time scale (a probe of that design saw
the bare step go from 1.07 s to 1.45 s mid-block with no change in the work), so whichever
block met more load looked slower; the full steps also came from a Prefetcher thread decoding
with DALI beside the step. Interleaving puts any drift on all sides alike, and with pre-built
batches and no prefetch thread the sides differ only by what the trainer adds.
The last line is JSON (benchmarks/measure.py: ratio = full / bare in wall-clock seconds, with
spread and interval; `cpu_time`: the same in CPU seconds of the process).
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import (compare, describe, emit, interleave,  # noqa: E402
                                load_average, timed, within_spread)

QUICK = ["llm.num_layers=2", "llm.hidden_size=128", "llm.ffn_hidden_size=256",
         "vision.num_layers=2", "vision.hidden_size=64", "vision.ffn_hidden_size=256",
         "connector.hidden_size=64", "data.seq_length=128", "train.global_batch_size=4"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run and dropped")
    parser.add_argument("--quick", action="store_true", help="smaller model, 5 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 5, 1
    warnings.filterwarnings("ignore")
    import torch

    from mm1_megatron.config import load_config
    from mm1_megatron.runtime import shutdown_distributed
    from mm1_megatron.train.callbacks import Checkpointing, default_callbacks
    from mm1_megatron.train.loop import Trainer
    from mm1_megatron.train.step import num_microbatches, train_step

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                        str(data)], check=True, capture_output=True)
        rounds = args.warmup + args.repeats
        cfg = load_config("demo", [f"data.path={data}",
                                   f"data.tokenizer_model={data}/tokenizer.model",
                                   f"run_dir={tmp}/run", "data.prefetch=0",
                                   f"train.train_steps={10 * rounds}", "train.warmup_steps=1",
                                   f"checkpoint.save_interval={10**6}",
                                   f"logging.log_interval={10**6}",
                                   *(QUICK if args.quick else [])])
        callbacks = default_callbacks(cfg)
        trainer = Trainer(cfg, callbacks=callbacks)
        trainer.setup()
        micro = num_microbatches(cfg)
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        prebuilt = [list(itertools.islice(trainer.batches, micro)) for _ in range(rounds)]
        loader_s = (time.perf_counter() - t0) / rounds
        torch.set_num_threads(threads)  # whatever building the batches did (DALI), undone
        ordered = trainer.callbacks  # by priority, as train() runs them
        for cb in ordered:
            cb.on_train_start(trainer)
        calls = {"full": 0, "noop": 0, "bare": 0}
        cpu: dict[str, list[float]] = {kind: [] for kind in calls}
        seen_threads: set[int] = set()

        def side(kind: str) -> Callable[[], float]:
            def run() -> float:
                pairs = prebuilt[calls[kind]]  # this round's (batch, loader state) pairs
                calls[kind] += 1
                seen_threads.add(torch.get_num_threads())
                if kind == "bare":
                    batches = [batch for batch, _ in pairs]
                    return timed(lambda: train_step(cfg, trainer.model, trainer.optimizer,
                                                    trainer.scheduler, batches), cpu[kind])
                trainer.batches = iter(pairs)
                trainer.callbacks = ordered if kind == "full" else []
                return timed(trainer.run_step, cpu[kind])
            return run

        prefetching = any(t.name == "mm1-data-prefetch" for t in threading.enumerate())
        full_t, noop_t, bare_t = interleave([side("full"), side("noop"), side("bare")],
                                            repeats=args.repeats, warmup=args.warmup)
        trainer.callbacks = ordered
        for cb in ordered:
            if not isinstance(cb, Checkpointing):  # no final save: nothing to keep
                cb.on_train_end(trainer)
        trainer.close()  # the callbacks' close too
        shutdown_distributed()
    result = compare(bare_t, full_t, unit="s")
    noop = compare(bare_t, noop_t, unit="s")
    cpu_result = compare(cpu["bare"][args.warmup:], cpu["full"][args.warmup:], unit="CPU-s")
    checks = {"noop_within_spread": within_spread(noop),
              "full_not_faster_than_bare": result["ratio"] >= 2.0 - result["spread"],
              "same_threads": len(seen_threads) == 1, "no_prefetch_thread": not prefetching}
    print(describe("trainer_overhead full vs bare", result))
    print(describe("trainer_overhead noop vs bare (self-check)", noop))
    return emit("trainer_overhead", result, valid=all(checks.values()), load_before=load_before,
                checks=checks, self_check=noop, cpu_time=cpu_result,
                preset="demo" + (" (quick)" if args.quick else ""),
                torch_threads=threads, loader_s_per_step=round(loader_s, 4),
                baseline_is="train_step on pre-built batches (bare Megatron-Core step)",
                candidate_is="Trainer.run_step with the default callbacks, same batches")


if __name__ == "__main__":
    main()

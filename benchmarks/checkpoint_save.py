"""Checkpoint saves: steps/s of the demo with a save every 2 steps, synchronous vs asynchronous.

    python benchmarks/checkpoint_save.py [--repeats 7 --warmup 2 --saves 3] [--quick]

One process, one Trainer on the demo preset (`--quick`: a smaller demo model, 1 save per
round and no warm-up round: a check that the comparison runs, not a figure to quote). Both sides run the real `Trainer.run_step` and `CheckpointManager.save` on the same trainer; they
differ only in the checkpointer: `sync` writes in `save_checkpoint`, `async` starts Megatron-Core's
async dist_checkpointing save (`checkpoint.async_save=true`, checkpoint.state.AsyncCheckpointer)
and the loop goes on while a background process writes it. A round of either side is
`--saves` x (2 steps, then a save) and ends once its last save is complete on disk (the
async side waits for it: timed), so both sides do the same work per round: 2 x saves steps and
`saves` complete, published checkpoints. That last wait is the async side's one write that
overlaps no step; in a long run every save overlaps the steps after it, so the ratio here is a
lower bound of the steady state's. Rounds alternate sync, async, sync, ... (measure.py), so the
machine's drift reaches both. Micro-batches are built before timing (data.prefetch=0, no
loader thread), as in trainer_overhead.py.

Figures: `ratio` = async / sync steps per second (higher is better); `blocking`: seconds the
step loop stood still per save (sync: the whole save; async: capturing the state, plus any
wait for the previous save still being written); `async_start_to_published_s`: per async save,
from its start to its checkpoint being published (noticed at a step boundary). On these 2 CPU
cores the background writer competes with the step for the same cores; on a GPU node the step
runs on the GPU and the writer on otherwise idle host cores. The blocking part that is left is
Megatron-Core's: the distributed optimizer's `fully_reshardable` state (gathered to DP rank 0,
with a gc.collect) and the save plan's collectives, which the sync side pays as well.
Checks ("valid"): every save of both sides became a complete checkpoint (`latest` names the
round's last step, its manifest checks out), the async side blocked the loop less per save
than the sync side, and torch's thread count stayed the same.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
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

from benchmarks.measure import compare, describe, emit, interleave, load_average  # noqa: E402
from benchmarks.trainer_overhead import QUICK  # noqa: E402

STEPS_PER_SAVE = 2  # the "a save every 2 steps"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="rounds run and dropped")
    parser.add_argument("--saves", type=int, default=3, help="saves per round")
    parser.add_argument("--quick", action="store_true", help="smaller model, 5 rounds of 1 save")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup, args.saves = 5, 0, 1
    warnings.filterwarnings("ignore")
    import torch

    from mm1_megatron.checkpoint import AsyncCheckpointer, checkpoint_root, latest_checkpoint
    from mm1_megatron.checkpoint.directory import damage, step_dir_name
    from mm1_megatron.config import load_config
    from mm1_megatron.runtime import shutdown_distributed
    from mm1_megatron.train.loop import Trainer
    from mm1_megatron.train.step import num_microbatches

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                        str(data)], check=True, capture_output=True)
        rounds = args.warmup + args.repeats
        steps_per_round = STEPS_PER_SAVE * args.saves
        total_steps = 2 * rounds * steps_per_round
        cfg = load_config("demo", [f"data.path={data}",
                                   f"data.tokenizer_model={data}/tokenizer.model",
                                   f"run_dir={tmp}/run", "data.prefetch=0",
                                   f"train.train_steps={total_steps}", "train.warmup_steps=1",
                                   "checkpoint.keep_last=2", "checkpoint.async_save=true",
                                   *(QUICK if args.quick else [])])
        trainer = Trainer(cfg, callbacks=[])  # saves are called by the rounds themselves
        trainer.setup()
        async_checkpointer = trainer.checkpoints.checkpointer
        assert isinstance(async_checkpointer, AsyncCheckpointer)
        micro = num_microbatches(cfg)
        threads = torch.get_num_threads()
        prebuilt = [list(itertools.islice(trainer.batches, micro)) for _ in range(total_steps)]
        torch.set_num_threads(threads)  # whatever building the batches did (DALI), undone
        blocking: dict[str, list[float]] = {"sync": [], "async": []}
        write_s: list[float] = []
        drain_s: list[float] = []
        complete: list[bool] = []
        seen_threads: set[int] = set()
        used = itertools.count()

        def side(kind: str) -> Callable[[], float]:
            def run() -> float:
                trainer.checkpoints.checkpointer = async_checkpointer if kind == "async" else None
                seen_threads.add(torch.get_num_threads())
                written: list[float] = []  # the saves completed, as the trainer timed them
                start = time.perf_counter()
                for _ in range(args.saves):
                    for _ in range(STEPS_PER_SAVE):
                        trainer.batches = iter(prebuilt[next(used)])
                        metrics = trainer.run_step()
                        written.append(metrics.checkpoint.get("checkpoint_write_s", 0.0))
                    t0 = time.perf_counter()
                    trainer.checkpoints.save(trainer.step)
                    blocking[kind].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                trainer.checkpoints.finish(blocking=True)  # the round's last save, on disk
                if kind == "async":
                    drain_s.append(time.perf_counter() - t0)
                seconds = time.perf_counter() - start
                written.append(trainer.checkpoints.times.pop("checkpoint_write_s", 0.0))
                trainer.checkpoints.times.clear()  # the round's metrics are its own
                if kind == "async":
                    write_s.append(sum(written) / args.saves)
                latest = latest_checkpoint(trainer.run_dir)
                complete.append(trainer.checkpoints.last_saved_step == trainer.step and latest is not None
                                and latest == checkpoint_root(trainer.run_dir)
                                / step_dir_name(trainer.step) and damage(latest) is None)
                return steps_per_round / seconds
            return run

        sync_rate, async_rate = interleave([side("sync"), side("async")],
                                           repeats=args.repeats, warmup=args.warmup)
        prefetching = any(t.name == "mm1-data-prefetch" for t in threading.enumerate())
        machinery = async_checkpointer.machinery
        trainer.close()
        shutdown_distributed()
    skip = args.warmup * args.saves  # the warm-up rounds' saves
    blocking_result = compare(blocking["sync"][skip:], blocking["async"][skip:], unit="s")
    result = compare(sync_rate, async_rate, unit="steps/s")
    checks = {"every_save_complete": all(complete) and len(complete) == 2 * rounds,
              "async_blocks_less_than_sync": blocking_result["ratio"] < 1.0,
              "same_threads": len(seen_threads) == 1, "no_prefetch_thread": not prefetching}
    print(describe("checkpoint_save async vs sync", result))
    print(describe("checkpoint_save blocking per save, async vs sync", blocking_result))
    return emit("checkpoint_save", result, valid=all(checks.values()), load_before=load_before,
                checks=checks, blocking=blocking_result,
                async_start_to_published_s=statistics.median(write_s[args.warmup:]),
                async_final_wait_s=statistics.median(drain_s[args.warmup:]),
                saves_per_round=args.saves, steps_per_save=STEPS_PER_SAVE,
                machinery=machinery, preset="demo" + (" (quick)" if args.quick else ""),
                torch_threads=threads,
                baseline_is="synchronous save_checkpoint every 2 steps",
                candidate_is="checkpoint.async_save (Megatron-Core async dist_checkpointing) "
                             "every 2 steps, the round's last save waited for")


if __name__ == "__main__":
    main()

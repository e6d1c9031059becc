"""`mm1-prepare-data` on sources indexed in place, as a DataTrove pipeline: on one machine
(`--tasks N --workers W`, DataTrove's local executor) or as Slurm jobs (`--slurm`: stage 1 an
array job, stage 2 a job depending on it).

    stage 1  N tasks. Task r indexes a fixed, contiguous slice of the source's tars (the plan
             lists them once, in dataset order) into OUT.incomplete/parts/NNNNN/ (its own
             index/ and part.json): written as parts/NNNNN.tmp-PID, renamed when whole, so a
             killed task leaves nothing a merge could take for finished.
    stage 2  one task merges the parts, in task order, into index/ and manifest.json
             (`merge_parts`), then OUT.incomplete/ is swapped in as OUT (`prepare.finish`):
             in this process, or under Slurm a plain job depending on the array (not a
             DataTrove stage: its completion marker would be written into the folder the swap
             has just moved).

The merge writes one global index rather than leaving an index of parts for the reader: a
sample is then one point read at a fixed offset (`shard_reader.IndexFile`), as in every other
dataset, and the index is byte-identical whatever N and W (parts are contiguous slices, merged
in order; the numbers that depend on position, a row's shard and first image and its token
segments, are rebased). The copy costs one sequential pass over the index (~100 bytes a
sample), small beside the scan of the tars it summarises; it streams through memory maps.

Restartable: DataTrove marks each finished task in OUT.incomplete/logs/index/completions/;
running the same command again runs only the tasks without a marker, then the merge. The plan
(OUT.incomplete/plan.json) fixes the task count: a rerun with another --tasks is refused in
one line, as DataTrove's slicing by rank would otherwise mix two plans. DataTrove's per-task
logs and stats stay in OUT/logs/. `MM1_FAULT_PREPARE_TASK=K` makes task K fail (tests).

Local runs keep going when a task fails (DataTrove's pool stops every task at the first
failure, so a rerun would redo tasks that were fine) and then stop naming the failed tasks.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor
from datatrove.utils.stats import PipelineStats

from mm1_megatron.data.shard_index import (InPlaceSource, index_shards, tokenizer_record,
                                           write_manifest)
from mm1_megatron.data.shard_schema import (BAD_REASONS, FORMAT, IMAGE_DTYPE, IMAGE_EXTS,
                                            SAMPLE_DTYPE, SOURCE_GAPS, DatasetError)

PLAN = "plan.json"
PARTS = "parts"
LOGS = "logs"
FAULT = "MM1_FAULT_PREPARE_TASK"  # "K": task K raises before indexing anything
SUMMARY = "summary.json"  # in OUT/logs/: the JSON line of the merge
_CHUNK = 1 << 20  # rows copied at a time by the merge: memory stays flat at any size


class TaskFailure(RuntimeError):
    """Stage-1 tasks that did not finish (exit 1: rerun the same command)."""


@dataclass
class Plan:
    """What every task and the merge agree on, written once to OUT.incomplete/plan.json."""

    format: str
    kind: str
    tasks: int
    root: str
    shards: list[str]  # relative to root, in dataset order
    text: dict
    parts: Optional[list[str]] = None
    tokenizer: Optional[str] = None  # sentencepiece model path
    sources: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, source: InPlaceSource, kind: str, tasks: int, tokenizer: Optional[str],
             sources: list[Path]) -> "Plan":
        return cls(source.format, kind, tasks, str(source.root),
                   [str(s.relative_to(source.root)) for s in source.shards], source.text,
                   source.parts, tokenizer, [os.path.realpath(s) for s in sources])

    def source(self) -> InPlaceSource:
        root = Path(self.root)
        return InPlaceSource(self.format, root, [root / s for s in self.shards], self.text,
                             self.parts)

    def slice(self, rank: int) -> tuple[int, int]:
        """Task `rank`'s shards: [start, end) of the plan's list (contiguous, so parts merge in
        order into the one-task index)."""
        n = len(self.shards)
        return rank * n // self.tasks, (rank + 1) * n // self.tasks

    def same_work(self, other: "Plan") -> bool:
        return {**asdict(self), "tasks": 0} == {**asdict(other), "tasks": 0}


def format_module(name: str):
    """The module of an in-place format (`plan`, `lister`, `shard_gaps`, `series_gaps`)."""
    return importlib.import_module(f"mm1_megatron.data.sources.{name}")


def read_plan(tmp: Path) -> Optional[Plan]:
    try:
        return Plan(**json.loads((tmp / PLAN).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as e:
        raise DatasetError(f"{tmp / PLAN}: unreadable ({e}); remove {tmp} to start over") \
            from None


def write_plan(tmp: Path, plan: Plan) -> None:
    scratch = tmp / (PLAN + ".tmp")
    scratch.write_text(json.dumps(asdict(plan), indent=1) + "\n")
    scratch.replace(tmp / PLAN)


# ---- stage 1: one slice of the tars -> parts/NNNNN/ -------------------------------------------

@dataclass
class IndexSlice:
    """DataTrove pipeline step (called as step(data, rank, world_size)): index task `rank`'s
    slice of the plan into parts/NNNNN/. Holds only paths: it is pickled to the workers and,
    under Slurm, to the array job."""

    tmp: str
    progress: bool = False

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        tmp = Path(self.tmp)
        plan = read_plan(tmp)
        if plan is None or plan.tasks != world_size:
            raise DatasetError(f"{tmp / PLAN}: missing or planned for another task count")
        if os.environ.get(FAULT, "") == str(rank):
            raise RuntimeError(f"{FAULT}={rank}: task {rank} fails (fault injection)")
        start, end = plan.slice(rank)
        part = tmp / PARTS / f"{rank:05d}"
        scratch = part.with_name(f"{part.name}.tmp-{os.getpid()}")
        for stale in part.parent.glob(f"{part.name}.tmp-*"):  # a killed attempt's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(part, ignore_errors=True)
        scratch.mkdir(parents=True)
        tokenizer = None
        if plan.tokenizer:
            from mm1_megatron.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(plan.tokenizer)
        source = plan.source()
        module = format_module(plan.format)
        shards = source.shards[start:end]
        with module.lister(source) as list_members:
            manifest = index_shards(shards, plan.kind, scratch, root=source.root,
                                    text=source.text, tokenizer=tokenizer,
                                    progress=self.progress, list_members=list_members,
                                    first_shard=start)
        manifest["bad"] = dict(collections.Counter(manifest["bad"]) +
                               module.shard_gaps(shards))
        (scratch / "part.json").write_text(json.dumps(manifest) + "\n")
        os.replace(scratch, part)
        return data


# ---- stage 2: parts -> index/ + manifest.json, then the swap ----------------------------------

def _copy_rows(target: np.ndarray, offset: int, rows: np.ndarray,
               rebase: Optional[Callable[[np.ndarray], None]] = None) -> int:
    for at in range(0, len(rows), _CHUNK):
        chunk = np.array(rows[at:at + _CHUNK])
        if rebase is not None:
            rebase(chunk)
        target[offset + at:offset + at + len(chunk)] = chunk
    return offset + len(rows)


def _new_array(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    """A .npy file of `length` records to fill in place (the header np.save writes)."""
    if length == 0:  # nothing to map (a text dataset's images)
        np.save(path, np.empty(0, dtype))
        return np.empty(0, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))


def merge_parts(tmp: Path, plan: Plan) -> dict:
    """parts/ -> tmp/index/ and the manifest (written); the parts are then removed. Run again
    after a kill: from the parts, or once they are gone, the manifest written before."""
    if not (tmp / PARTS).exists() and (tmp / "manifest.json").is_file():
        return json.loads((tmp / "manifest.json").read_text())
    parts = [json.loads((tmp / PARTS / f"{r:05d}" / "part.json").read_text())
             for r in range(plan.tasks)]
    tokens = plan.tokenizer is not None
    index = tmp / "index"
    index.mkdir(exist_ok=True)
    arrays = {"samples": SAMPLE_DTYPE, "images": IMAGE_DTYPE}
    if tokens:
        arrays.update(segments=np.dtype("<i4"), segment_offsets=np.dtype("<i8"))
    loaded = [{name: np.load(tmp / PARTS / f"{r:05d}" / "index" / f"{name}.npy",
                             mmap_mode="r") for name in arrays} for r in range(plan.tasks)]
    totals = {name: sum(len(p[name]) for p in loaded) for name in arrays}
    if tokens:
        totals["segment_offsets"] = totals["samples"] + 1
    out = {name: _new_array(index / f"{name}.npy", dtype, totals[name])
           for name, dtype in arrays.items()}
    at = dict.fromkeys(arrays, 0)
    for part in loaded:
        images_before, segments_before = at["images"], at.get("segments", 0)

        def shift_images(rows: np.ndarray, by: int = images_before) -> None:
            rows["image_start"] += by

        def shift_segments(rows: np.ndarray, by: int = segments_before) -> None:
            rows += by

        at["samples"] = _copy_rows(out["samples"], at["samples"], part["samples"],
                                   shift_images)
        at["images"] = _copy_rows(out["images"], at["images"], part["images"])
        if tokens:
            at["segments"] = _copy_rows(out["segments"], at["segments"], part["segments"])
            at["segment_offsets"] = _copy_rows(out["segment_offsets"], at["segment_offsets"],
                                               part["segment_offsets"][:-1], shift_segments)
    if tokens:
        out["segment_offsets"][-1] = at["segments"]
    for array in out.values():
        if isinstance(array, np.memmap):
            array.flush()
    del out, loaded
    bad: collections.Counter = collections.Counter()
    for part in parts:
        bad.update(part["bad"])
    source = plan.source()
    bad.update(format_module(plan.format).series_gaps(source.shards))
    text_tokens = sum(p["text_tokens"] or 0 for p in parts) if tokens else None
    tokenizer = None
    if tokens:
        from mm1_megatron.data.tokenizer import Tokenizer

        tokenizer = tokenizer_record(Tokenizer.load(plan.tokenizer))
    shards = [entry for p in parts for entry in p["shards"]]
    manifest = {
        "format": FORMAT, "kind": plan.kind, "shards": shards,
        "samples": totals["samples"], "bytes": sum(s["bytes"] for s in shards),
        "images": totals["images"], "bad": dict(sorted(bad.items())),
        "text_chars": sum(p["text_chars"] for p in parts), "text_tokens": text_tokens,
        "tokenizer": tokenizer,
        "index": {"samples": "index/samples.npy", "images": "index/images.npy",
                  **({"segments": "index/segments.npy",
                      "segment_offsets": "index/segment_offsets.npy"} if tokens else {})},
        "image_exts": list(IMAGE_EXTS), "bad_reasons": list(BAD_REASONS),
        "source": {"format": plan.format, "root": plan.root, "text": plan.text},
    }
    write_manifest(tmp, manifest)
    shutil.rmtree(tmp / PARTS)
    return manifest


# ---- running the stages -----------------------------------------------------------------------

class KeepGoingExecutor(LocalPipelineExecutor):
    """DataTrove's local executor, except that a failed task does not stop the others (its
    failure is in its task log, and it gets no completion marker)."""

    def _launch_run_for_rank(self, rank, ranks_q, completed=None, completed_lock=None):
        try:
            return super()._launch_run_for_rank(rank, ranks_q, completed, completed_lock)
        except Exception:  # noqa: BLE001 - reported by its missing completion marker
            return PipelineStats()


class ArrayExecutor(SlurmPipelineExecutor):
    """DataTrove's Slurm executor without its stats-merging job: our merge job follows the
    array instead (a second job waiting on a failed array would stay queued for ever; the
    per-task stats stay in logs/index/stats/)."""

    def launch_merge_stats(self) -> None:
        pass


def run_local(tmp: Path, plan: Plan, workers: int, progress: bool) -> None:
    """Stage 1 on this machine. Raises TaskFailure naming the tasks that did not finish (the
    rerun runs only those)."""
    executor = KeepGoingExecutor(
        pipeline=[IndexSlice(str(tmp), progress=progress and plan.tasks == 1)],
        tasks=plan.tasks, workers=max(1, min(workers, plan.tasks)),
        logging_dir=str(tmp / LOGS / "index"), start_method="spawn")
    executor.run()
    failed = executor.get_incomplete_ranks()
    if failed:
        raise TaskFailure(_failure_line(tmp, failed, plan.tasks))


def _failure_line(tmp: Path, failed: list[int], tasks: int) -> str:
    shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
    logs = tmp / LOGS / "index" / "logs"
    return (f"task{'s' * (len(failed) > 1)} {shown} of {tasks} failed (logs: "
            f"{logs}/task_{failed[0]:05d}.log); run the same command again to run "
            f"{'them' if len(failed) > 1 else 'it'} and the merge")


@dataclass
class SlurmOptions:
    partition: str
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    tasks_per_job: int = 1
    job_name: str = "mm1-prepare-data"


def submit_slurm(tmp: Path, plan: Plan, options: SlurmOptions, merge_command: list[str]
                 ) -> dict:
    """Stage 1 as a DataTrove array job of the tasks without a completion marker; the merge
    (`merge_command`) as a plain job depending on it (afterok; Slurm cancels it if a task
    fails, so a rerun's merge is the only one left). Returns the job ids; runs nothing here."""
    import shlex
    import subprocess

    stage1 = ArrayExecutor(
        pipeline=[IndexSlice(str(tmp))], tasks=plan.tasks, job_name=options.job_name,
        logging_dir=str(tmp / LOGS / "index"), tasks_per_job=options.tasks_per_job,
        partition=options.partition, time=options.time, cpus_per_task=options.cpus_per_task,
        mem_per_cpu_gb=options.mem_per_cpu_gb, qos="", mail_type="NONE", requeue=False,
        env_command=f"export PATH={Path(sys.executable).parent}:$PATH")
    stage1.run()  # submits (or, all tasks done already, sets job_id -1)
    after = [f"--dependency=afterok:{stage1.job_id}", "--kill-on-invalid-dep=yes"] \
        if stage1.job_id not in (None, -1) else []
    merge = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={options.job_name}-merge",
         f"--partition={options.partition}", f"--time={options.time}", "--ntasks=1",
         "--cpus-per-task=1", f"--mem-per-cpu={options.mem_per_cpu_gb}G",
         f"--output={tmp / LOGS / 'merge-%j.out'}", *after],
        input=f"#!/bin/bash\nexec {shlex.join(merge_command)}\n", capture_output=True,
        text=True, check=True)
    return {"index_job": None if stage1.job_id == -1 else str(stage1.job_id),
            "merge_job": merge.stdout.strip().split(";")[0]}

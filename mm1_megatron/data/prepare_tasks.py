"""`mm1-prepare-data` as a DataTrove pipeline: on one machine (`--tasks N --workers W`,
DataTrove's local executor) or as Slurm jobs (`--slurm`: stage 1 an array job, stage 2 a job
depending on it).

    stage 1  N tasks, task r over a fixed, contiguous slice of the plan's work items, into
             OUT.incomplete/parts/NNNNN/ (written as parts/NNNNN.tmp-PID, renamed when whole,
             so a killed task leaves nothing a merge could take for finished):
               in place (webdataset, MINT, energon): the items are the source's tars; the part
                 is their index (`IndexSlice`);
               converted (jsonl, mmc4, parquet): the items are units, runs of consecutive
                 source files of about --shard-size-mb of source bytes; each unit is written
                 into its own shards (keys prefixed with the unit's number) with its index
                 (`ConvertSlice`). Units, not tasks, cut the shards: the output does not
                 depend on N.
    stage 2  one merge of the parts, in order, into index/ and manifest.json (a converted
             unit's shards renamed into the folder's one series; `merge_parts`), then
             OUT.incomplete/ is swapped in as OUT (`prepare.finish`): in this process, or
             under Slurm a plain job depending on the array (not a DataTrove stage: its
             completion marker would be written into the folder the swap has just moved).

The merge writes one global index rather than leaving an index of parts for the reader: a
sample is then one point read at a fixed offset (`shard_reader.IndexFile`), as in every other
dataset, and the index is byte-identical whatever N and W (parts are contiguous slices, merged
in order; what depends on position, a row's shard and first image and its token segments, is
rebased). The copy costs one sequential pass over the index (~100 bytes a sample), small
beside reading the data it summarises; it streams through memory maps.

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
import contextlib
import importlib
import itertools
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
from datatrove.executor import LocalPipelineExecutor, SlurmPipelineExecutor

from mm1_megatron.data.shard_index import (InPlaceSource, index_shards, tokenizer_record,
                                           write_manifest)
from mm1_megatron.data.shard_schema import (BAD_REASONS, FORMAT, IMAGE_DTYPE, IMAGE_EXTS,
                                            SAMPLE_DTYPE, BadSample, DatasetError)
from mm1_megatron.data.shard_writer import write_dataset
from mm1_megatron.data.sources import FORMATS
from mm1_megatron.data.sources.urls import SourcePath, resolved, source_path

PLAN = "plan.json"
PARTS = "parts"
LOGS = "logs"
FAULT = "MM1_FAULT_PREPARE_TASK"  # "K": task K raises before doing anything
SUMMARY = "summary.json"  # in OUT/logs/: the summary line of the merge
SKIPPED = "skipped.json"  # in OUT/logs/: converted records skipped, and the first listed
UNREADABLE = "unreadable_file"  # a source file the format cannot read at all: skipped whole
MAX_LISTED = 10  # skipped records listed (FILE:LINE) per preparation; the rest only counted
_CHUNK = 1 << 20  # rows copied at a time by the merge: memory stays flat at any size


class TaskFailure(RuntimeError):
    """Stage-1 tasks that did not finish (exit 1: rerun the same command)."""


@dataclass
class Plan:
    """What every task and the merge agree on, written once to OUT.incomplete/plan.json."""

    format: str
    kind: str
    tasks: int
    root: str  # in place: the folder `shards` are relative to; converted: ""
    shards: list[str]  # in place: the tars; converted: the source files (absolute); in order
    text: Optional[dict] = None  # in place: how a sample's text member reads
    parts: Optional[list[str]] = None  # in place: the members to index (None: all)
    tokenizer: Optional[str] = None  # sentencepiece model path
    sources: list[str] = field(default_factory=list)  # SOURCE as given, resolved
    # Converted: [start, end) of `shards` per unit, and what the format's reader needs.
    units: Optional[list[list[int]]] = None
    images_root: str = "."
    fields: dict = field(default_factory=dict)
    shard_size_mb: float = 64.0

    @classmethod
    def in_place(cls, source: InPlaceSource, kind: str, tasks: int, tokenizer: Optional[str],
                 sources: list[Path]) -> "Plan":
        return cls(source.format, kind, tasks, str(source.root),
                   [str(s.relative_to(source.root)) for s in source.shards], source.text,
                   source.parts, tokenizer and os.path.realpath(tokenizer),
                   [resolved(s) for s in sources])

    @classmethod
    def converted(cls, fmt: str, kind: str, tasks: int, files: list[SourcePath],
                  tokenizer: Optional[str], sources: list[SourcePath],
                  images_root: SourcePath, fields: dict, shard_size_mb: float) -> "Plan":
        return cls(fmt, kind, tasks, "", [resolved(f) for f in files],
                   tokenizer=tokenizer and os.path.realpath(tokenizer),
                   sources=[resolved(s) for s in sources],
                   units=units_of(files, int(shard_size_mb * 2**20)),
                   images_root=resolved(images_root), fields=fields,
                   shard_size_mb=shard_size_mb)

    def source(self) -> InPlaceSource:
        root = Path(self.root)
        return InPlaceSource(self.format, root, [root / s for s in self.shards], self.text,
                             self.parts)

    def slice(self, rank: int) -> tuple[int, int]:
        """Task `rank`'s work items: [start, end) of the tars or units (contiguous, so the
        parts merge in order into the one-task result)."""
        n = len(self.shards) if self.units is None else len(self.units)
        return rank * n // self.tasks, (rank + 1) * n // self.tasks

    def same_work(self, other: "Plan") -> bool:
        return {**asdict(self), "tasks": 0} == {**asdict(other), "tasks": 0}


def units_of(files: list[SourcePath], target_bytes: int) -> list[list[int]]:
    """Consecutive files grouped until each group holds `target_bytes` of source (a file
    larger than that is a unit of its own): fixed by the files alone, whatever the tasks."""
    units: list[list[int]] = []
    start, size = 0, 0
    for n, f in enumerate(files):
        try:
            size += f.stat().st_size
        except OSError:
            pass  # read (and reported) by the task
        if size >= target_bytes:
            units.append([start, n + 1])
            start, size = n + 1, 0
    if start < len(files):
        units.append([start, len(files)])
    return units


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


def skip_line(item: BadSample) -> str:
    """How a skipped record is listed: FILE:LINE: skipped: reason: detail."""
    return f"{item.shard}:{item.member.split()[-1]}: skipped: {item.reason}: {item.detail}"


# ---- stage 1: one slice of the work -> parts/NNNNN/ -------------------------------------------

def _fail_if_injected(rank: int) -> None:
    if os.environ.get(FAULT, "") == str(rank):
        raise RuntimeError(f"{FAULT}={rank}: task {rank} fails (fault injection)")


def _scratch_part(parts: Path, rank: int) -> tuple[Path, Path]:
    """(parts/NNNNN, an empty parts/NNNNN.tmp-PID to write it in, then rename): a killed
    attempt's leftovers and a finished part of an earlier attempt removed."""
    part = parts / f"{rank:05d}"
    for stale in parts.glob(f"{part.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(part, ignore_errors=True)
    scratch = part.with_name(f"{part.name}.tmp-{os.getpid()}")
    scratch.mkdir(parents=True)
    return part, scratch


@dataclass
class _Task:
    """A DataTrove pipeline step (called as step(data, rank, world_size)) doing task `rank`'s
    slice of the plan into parts/NNNNN/. Holds only paths: it is pickled to the workers and,
    under Slurm, to the array job."""

    tmp: str
    progress: bool = False

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        tmp = Path(self.tmp)
        plan = read_plan(tmp)
        if plan is None or plan.tasks != world_size:
            raise DatasetError(f"{tmp / PLAN}: missing or planned for another task count")
        _fail_if_injected(rank)
        part, scratch = _scratch_part(tmp / PARTS, rank)
        tokenizer = None
        if plan.tokenizer:
            from mm1_megatron.data.tokenizer import Tokenizer

            tokenizer = Tokenizer.load(plan.tokenizer)
        record = self.run(plan, *plan.slice(rank), scratch, tokenizer)
        (scratch / "part.json").write_text(json.dumps(record) + "\n")
        os.replace(scratch, part)
        return data

    def run(self, plan: Plan, start: int, end: int, scratch: Path, tokenizer) -> dict:
        raise NotImplementedError


class IndexSlice(_Task):
    """In place: tars [start, end) indexed into the part (its shard numbers from 0)."""

    def run(self, plan: Plan, start: int, end: int, scratch: Path, tokenizer) -> dict:
        source = plan.source()
        module = format_module(plan.format)
        shards = source.shards[start:end]
        with module.lister(source) as list_members:
            manifest = index_shards(shards, plan.kind, scratch, root=source.root,
                                    text=source.text, tokenizer=tokenizer,
                                    progress=self.progress, list_members=list_members)
        manifest["bad"] = dict(collections.Counter(manifest["bad"]) +
                               module.shard_gaps(shards))
        return {"pieces": [{"dir": ".", "manifest": manifest}], "skipped": {}, "listed": []}


class ConvertSlice(_Task):
    """Converted: units [start, end) each written into units/UUUUUU/ (its shards, index,
    manifest); skipped records counted, the first MAX_LISTED kept for the merge to list. A
    file the format cannot read at all (a broken JSON array, a corrupt parquet footer) is
    skipped whole and counted as `unreadable_file`, as a corrupt shard would be."""

    def run(self, plan: Plan, start: int, end: int, scratch: Path, tokenizer) -> dict:
        source = FORMATS[plan.format]
        skipped: collections.Counter = collections.Counter()
        listed: list[str] = []

        def usable(files: list[SourcePath]) -> Iterator:
            for path in files:  # one at a time: a file that cannot be read is skipped whole
                try:
                    for item in source.samples([path], plan.kind,
                                               images_root=source_path(plan.images_root),
                                               **plan.fields):
                        if isinstance(item, BadSample):
                            skipped[item.reason] += 1
                            if len(listed) < MAX_LISTED:
                                listed.append(skip_line(item))
                        else:
                            yield item
                except (ValueError, OSError) as e:
                    skipped[UNREADABLE] += 1
                    if len(listed) < MAX_LISTED:
                        listed.append(f"{path}: skipped: {UNREADABLE}: {e}")

        pieces = []
        for unit in range(start, end):
            a, b = plan.units[unit]
            files = [source_path(f) for f in plan.shards[a:b]]
            stream = usable(files)
            first = next(stream, None)
            if first is None:
                continue  # no usable record in the unit: no shard
            folder = f"units/{unit:06d}"
            manifest = write_dataset(itertools.chain([first], stream), scratch / folder,
                                     plan.kind, shard_size_mb=plan.shard_size_mb,
                                     tokenizer=tokenizer, progress=self.progress,
                                     total=source.count(files) if self.progress else None,
                                     key_prefix=f"{unit:06d}")
            pieces.append({"dir": folder, "manifest": manifest})
        return {"pieces": pieces, "skipped": dict(skipped), "listed": listed}


# ---- stage 2: parts -> index/ + manifest.json ---------------------------------------------------

def _copy_rows(target: np.ndarray, offset: int, rows: np.ndarray,
               rebase: Optional[Callable[[np.ndarray], None]] = None) -> int:
    for at in range(0, len(rows), _CHUNK):
        chunk = np.array(rows[at:at + _CHUNK])
        if rebase is not None:
            rebase(chunk)
        target[offset + at:offset + at + len(chunk)] = chunk
    return offset + len(rows)


def _copy_segments(segments: np.ndarray, offsets: np.ndarray, at: int, row: int,
                   part_segments: np.ndarray, part_offsets: np.ndarray) -> int:
    """A part's token index appended: its segments at `at`, its offsets (but the last) at
    sample `row`, rebased by `at`. Returns the segments written so far; the caller writes
    the final offset."""
    def rebase(rows: np.ndarray) -> None:
        rows += at

    _copy_rows(offsets, row, part_offsets[:-1], rebase)
    return _copy_rows(segments, at, part_segments)


def _new_array(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    """A .npy file of `length` records to fill in place (the header np.save writes)."""
    if length == 0:  # nothing to map (a text dataset's images)
        np.save(path, np.empty(0, dtype))
        return np.empty(0, dtype)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(length,))


def merge_parts(tmp: Path, plan: Plan) -> tuple[dict, collections.Counter, list[str]]:
    """parts/ -> tmp/index/, the converted shards renamed into tmp/, and the manifest
    (written); the parts are then removed. Returns (manifest, records skipped before any
    index: converted records never written, counted per reason; the first of them listed).
    Run again after a kill: from the parts, or once they are gone, from what it wrote."""
    done = tmp / LOGS / SKIPPED
    if not (tmp / PARTS).exists() and (tmp / "manifest.json").is_file() and done.is_file():
        record = json.loads(done.read_text())
        return (json.loads((tmp / "manifest.json").read_text()),
                collections.Counter(record["skipped"]), record["listed"])
    records = [json.loads((tmp / PARTS / f"{r:05d}" / "part.json").read_text())
               for r in range(plan.tasks)]
    pieces = [(tmp / PARTS / f"{r:05d}" / piece["dir"], piece["manifest"])
              for r, record in enumerate(records) for piece in record["pieces"]]
    tokens = plan.tokenizer is not None
    index = tmp / "index"
    index.mkdir(exist_ok=True)
    arrays = {"samples": SAMPLE_DTYPE, "images": IMAGE_DTYPE}
    if tokens:
        arrays.update(segments=np.dtype("<i4"), segment_offsets=np.dtype("<i8"))
    loaded = [{name: np.load(folder / "index" / f"{name}.npy", mmap_mode="r")
               for name in arrays} for folder, _ in pieces]
    totals = {name: sum(len(p[name]) for p in loaded) for name in arrays}
    if tokens:
        totals["segment_offsets"] = totals["samples"] + 1
    out = {name: _new_array(index / f"{name}.npy", dtype, totals[name])
           for name, dtype in arrays.items()}
    at = dict.fromkeys(("samples", "images", "segments"), 0)
    shards: list[dict] = []
    for (folder, manifest), piece in zip(pieces, loaded):
        shard_base, image_base, row = len(shards), at["images"], at["samples"]

        def rebase_rows(rows: np.ndarray, shard: int = shard_base,
                        image: int = image_base) -> None:
            rows["shard"] += shard
            rows["image_start"] += image

        at["samples"] = _copy_rows(out["samples"], row, piece["samples"], rebase_rows)
        at["images"] = _copy_rows(out["images"], at["images"], piece["images"])
        if tokens:
            at["segments"] = _copy_segments(out["segments"], out["segment_offsets"],
                                            at["segments"], row, piece["segments"],
                                            piece["segment_offsets"])
        for entry in manifest["shards"]:
            if plan.units is not None:  # a converted unit's shard joins the one series
                name = f"shard-{len(shards):06d}.tar"
                os.replace(folder / entry["name"], tmp / name)
                entry = {**entry, "name": name}
            shards.append(entry)
    if tokens:
        out["segment_offsets"][-1] = at["segments"]
    for array in out.values():
        if isinstance(array, np.memmap):
            array.flush()
    del out, loaded
    bad: collections.Counter = collections.Counter()
    skipped: collections.Counter = collections.Counter()
    for _, manifest in pieces:
        bad.update(manifest["bad"])
    for record in records:
        skipped.update(record["skipped"])
    listed = [line for record in records for line in record["listed"]][:MAX_LISTED]
    manifest = {
        "format": FORMAT, "kind": plan.kind, "shards": shards,
        "samples": totals["samples"], "bytes": sum(s["bytes"] for s in shards),
        "images": totals["images"], "bad": {},
        "text_chars": sum(m["text_chars"] for _, m in pieces),
        "text_tokens": sum(m["text_tokens"] or 0 for _, m in pieces) if tokens else None,
        "tokenizer": None,
        "index": {"samples": "index/samples.npy", "images": "index/images.npy",
                  **({"segments": "index/segments.npy",
                      "segment_offsets": "index/segment_offsets.npy"} if tokens else {})},
        "image_exts": list(IMAGE_EXTS), "bad_reasons": list(BAD_REASONS),
    }
    if tokens:
        from mm1_megatron.data.tokenizer import Tokenizer

        manifest["tokenizer"] = tokenizer_record(Tokenizer.load(plan.tokenizer))
    if plan.units is None:
        bad.update(format_module(plan.format).series_gaps(plan.source().shards))
        manifest["source"] = {"format": plan.format, "root": plan.root, "text": plan.text}
    manifest["bad"] = dict(sorted(bad.items()))
    (tmp / LOGS).mkdir(exist_ok=True)
    done.write_text(json.dumps({"skipped": skipped, "listed": listed}) + "\n")
    write_manifest(tmp, manifest)
    shutil.rmtree(tmp / PARTS)
    return manifest, skipped, listed


# ---- the token index of a prepared dataset (tools/index_tokens.py) --------------------------------

TOKENS = "token-index"  # DIR/logs/token-index/: that job's plan, parts and task logs


@dataclass
class TokenSlice:
    """DataTrove pipeline step: task `rank`'s slice of the dataset's shards tokenized into
    DIR/logs/token-index/parts/NNNNN/ (each sample's segment runs, `shard_index.segment_runs`,
    and its text tokens; -1 for a bad sample)."""

    folder: str

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from mm1_megatron.data.shard_index import save_token_index, segment_runs
        from mm1_megatron.data.shard_reader import reopen_dataset
        from mm1_megatron.data.tokenizer import Tokenizer

        state = Path(self.folder) / LOGS / TOKENS
        plan = json.loads((state / PLAN).read_text())
        if plan["tasks"] != world_size:
            raise DatasetError(f"{state / PLAN}: planned for another task count")
        _fail_if_injected(rank)
        tokenizer = Tokenizer.load(plan["tokenizer"])
        ds = reopen_dataset(Path(self.folder))
        counts = [s["samples"] for s in ds.manifest["shards"]]
        first, last = (r * len(counts) // world_size for r in (rank, rank + 1))
        start = sum(counts[:first])
        runs, tokens = [], []
        for i in range(start, start + sum(counts[first:last])):
            try:
                layout = segment_runs(ds.read(i, images=False).segments, tokenizer)
            except BadSample:
                layout = []
                tokens.append(-1)
            else:
                tokens.append(sum(n for n in layout if n >= 0))
            runs.append(layout)
        ds.close()
        part, scratch = _scratch_part(state / PARTS, rank)
        (scratch / "index").mkdir()
        save_token_index(scratch, runs)
        np.save(scratch / "tokens.npy", np.array(tokens, dtype=np.int64))
        os.replace(scratch, part)
        return data


def _token_plan(folder: Path, tokenizer_path: str, tasks: int) -> dict:
    """DIR/logs/token-index/plan.json: the one a previous run of the same call left (its
    finished tasks kept), or a new one; another task count or tokenizer is refused."""
    state = folder / LOGS / TOKENS
    plan = {"tasks": tasks, "tokenizer": os.path.realpath(tokenizer_path)}
    if (state / PLAN).is_file():
        found = json.loads((state / PLAN).read_text())
        if found != plan:
            raise DatasetError(f"{state} holds a half-done token index ({found['tasks']} "
                               f"tasks, tokenizer {found['tokenizer']}); rerun with those or "
                               "remove the folder")
        return found
    state.mkdir(parents=True, exist_ok=True)
    (state / PLAN).write_text(json.dumps(plan) + "\n")
    return plan


def merge_token_parts(folder: Path) -> dict:
    """The parts -> index/segments.npy, segment_offsets.npy, samples.npy's text_tokens and
    the manifest (each file replaced whole, the manifest last). Returns the manifest."""
    from mm1_megatron.data.shard_reader import open_dataset
    from mm1_megatron.data.tokenizer import Tokenizer

    state = folder / LOGS / TOKENS
    plan = json.loads((state / PLAN).read_text())
    parts = [state / PARTS / f"{r:05d}" for r in range(plan["tasks"])]
    loaded = [{"segments": np.load(p / "index" / "segments.npy", mmap_mode="r"),
               "segment_offsets": np.load(p / "index" / "segment_offsets.npy", mmap_mode="r"),
               "tokens": np.load(p / "tokens.npy", mmap_mode="r")} for p in parts]
    ds = open_dataset(folder)
    samples_in = np.load(folder / "index" / "samples.npy", mmap_mode="r")
    n = len(samples_in)
    if sum(len(p["tokens"]) for p in loaded) != n:
        raise DatasetError(f"{state}: parts do not cover the dataset's {n} samples; remove "
                           "the folder and run again")
    index = folder / "index"
    total = sum(len(p["segments"]) for p in loaded)
    segments = _new_array(index / "segments.npy.tmp", np.dtype("<i4"), total)
    offsets = _new_array(index / "segment_offsets.npy.tmp", np.dtype("<i8"), n + 1)
    samples = _new_array(index / "samples.npy.tmp", SAMPLE_DTYPE, n)
    seg_at = row = 0
    text_tokens = 0
    for p in loaded:
        seg_at = _copy_segments(segments, offsets, seg_at, row, p["segments"],
                                p["segment_offsets"])
        for at in range(0, len(p["tokens"]), _CHUNK):
            counts = np.array(p["tokens"][at:at + _CHUNK])
            chunk = np.array(samples_in[row + at:row + at + len(counts)])
            chunk["text_tokens"] = np.where(chunk["bad"] == 0, counts, -1)
            text_tokens += int(chunk["text_tokens"][chunk["bad"] == 0].sum())
            samples[row + at:row + at + len(chunk)] = chunk
        row += len(p["tokens"])
    offsets[-1] = seg_at
    for array in (segments, offsets, samples):
        if isinstance(array, np.memmap):
            array.flush()
    del segments, offsets, samples, samples_in, loaded
    for name in ("segments", "segment_offsets", "samples"):
        os.replace(index / f"{name}.npy.tmp", index / f"{name}.npy")
    manifest = dict(ds.manifest)
    ds.close()
    manifest["text_tokens"] = text_tokens
    manifest["tokenizer"] = tokenizer_record(Tokenizer.load(plan["tokenizer"]))
    manifest["index"] = {**manifest.get("index", {}), "segments": "index/segments.npy",
                         "segment_offsets": "index/segment_offsets.npy"}
    write_manifest(folder, manifest)
    # The job is done: its plan, parts and completion markers go (a later job for another
    # tokenizer starts afresh); its logs stay.
    shutil.rmtree(state / PARTS)
    shutil.rmtree(state / LOGS / "index" / "completions", ignore_errors=True)
    (state / PLAN).unlink()
    return manifest


def add_token_index(folder: Path, tokenizer_path: str, *, tasks: int = 1, workers: int = 1,
                    progress: bool = False, slurm: Optional["SlurmOptions"] = None):
    """Write the packer's token index for `tokenizer_path` into a prepared dataset as
    DataTrove tasks over its shards, then merge: on this machine (returns the manifest;
    TaskFailure leaves it resumable) or with `slurm` (returns the job ids)."""
    folder = Path(folder)
    _token_plan(folder, tokenizer_path, tasks)
    state = folder / LOGS / TOKENS
    step = TokenSlice(str(folder))
    if slurm is not None:
        return submit_slurm(state, tasks, step, slurm, [sys.executable, "-m",
                            "mm1_megatron.data.prepare_tasks", "token-merge", str(folder)])
    _run_tasks(state, tasks, step, workers, progress)
    return merge_token_parts(folder)


# ---- running the stages -----------------------------------------------------------------------

def task_step(plan: Plan, tmp: Path, progress: bool = False) -> _Task:
    return (IndexSlice if plan.units is None else ConvertSlice)(str(tmp), progress)


class KeepGoingExecutor(LocalPipelineExecutor):
    """DataTrove's local executor, run our way: a failed task does not stop the others (it
    gets no completion marker; its error goes to logs/index/errors/NNNNN for the summary),
    one worker runs the tasks in this process, several run in a plain process pool (no
    multiprocessing manager: a killed command would leave its server process behind), and
    with `quiet` a task's log lines reach the terminal only as errors (DataTrove sends them
    to stderr for local rank 0; they all stay in the task logs)."""

    def __init__(self, *args, quiet: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.quiet = quiet

    def run(self) -> None:
        ranks = self.get_incomplete_ranks(range(self.tasks))
        if not ranks:
            return
        self._launched = True
        self.save_executor_as_json()
        if self.workers == 1:
            for rank in ranks:
                self._run_one(rank)
            return
        import multiprocess

        with multiprocess.get_context(self.start_method).Pool(self.workers) as pool:
            for _ in pool.imap_unordered(self._run_one, ranks):
                pass

    def _run_one(self, rank: int) -> None:
        try:
            self._run_for_rank(rank, 1 if self.quiet else 0)
        except Exception as e:  # noqa: BLE001 - reported by its missing completion marker
            with self.logging_dir.open(f"errors/{rank:05d}", "w") as f:
                f.write(str(e) if str(e).startswith(FAULT) else f"{type(e).__name__}: {e}")


@contextlib.contextmanager
def _executor_log(path: Path, quiet: bool) -> Iterator[None]:
    """With `quiet`, what DataTrove logs in this process (its executor's lines, and the
    stderr sink it re-adds after each task) goes to `path` instead of the terminal: the
    command's stderr keeps to its own lines (one line for an error)."""
    if not quiet:
        yield
        return
    from loguru import logger

    saved = sys.stderr
    with open(path, "a") as log:
        sys.stderr = log
        logger.remove()
        logger.add(log)
        try:
            yield
        finally:
            logger.remove()
            sys.stderr = saved
            logger.add(sys.stderr)  # loguru's default sink, as DataTrove leaves it


def run_local(tmp: Path, plan: Plan, workers: int, progress: bool) -> None:
    """Stage 1 of a preparation on this machine. Raises TaskFailure naming the tasks that did
    not finish (the rerun runs only those)."""
    _run_tasks(tmp, plan.tasks, task_step(plan, tmp, progress=progress and plan.tasks == 1),
               workers, progress)


def _run_tasks(state: Path, tasks: int, step, workers: int, progress: bool) -> None:
    executor = KeepGoingExecutor(
        pipeline=[step], tasks=tasks, workers=max(1, min(workers, tasks)),
        logging_dir=str(state / LOGS / "index"), start_method="spawn", quiet=not progress)
    (state / LOGS).mkdir(parents=True, exist_ok=True)
    with _executor_log(state / LOGS / "executor.log", quiet=not progress):
        executor.run()
    failed = executor.get_incomplete_ranks()
    if failed:
        raise TaskFailure(_failure_line(state, failed, tasks))


def _failure_line(tmp: Path, failed: list[int], tasks: int) -> str:
    shown = ", ".join(map(str, failed[:10])) + (", ..." if len(failed) > 10 else "")
    logs = tmp / LOGS / "index"
    try:
        why = ": " + (logs / "errors" / f"{failed[0]:05d}").read_text().strip().splitlines()[0]
    except (OSError, IndexError):
        why = ""
    return (f"task{'s' * (len(failed) > 1)} {shown} of {tasks} failed{why} (log: "
            f"{logs}/logs/task_{failed[0]:05d}.log); run the same command again to run "
            f"{'them' if len(failed) > 1 else 'it'} and the merge")


@dataclass
class SlurmOptions:
    partition: str
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    tasks_per_job: int = 1
    job_name: str = "mm1-prepare-data"


class ArrayExecutor(SlurmPipelineExecutor):
    """DataTrove's Slurm executor without its stats-merging job: our merge job follows the
    array instead (a second job waiting on a failed array would stay queued for ever; the
    per-task stats stay in logs/index/stats/)."""

    def launch_merge_stats(self) -> None:
        pass


def submit_slurm(tmp: Path, tasks: int, step, options: SlurmOptions, merge_command: list[str]
                 ) -> dict:
    """Stage 1 as a DataTrove array job of the tasks without a completion marker; the merge
    (`merge_command`) as a plain job depending on it (afterok; Slurm cancels it if a task
    fails, so a rerun's merge is the only one left). Returns the job ids; runs nothing here."""
    import shlex
    import subprocess

    stage1 = ArrayExecutor(
        pipeline=[step], tasks=tasks, job_name=options.job_name,
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


if __name__ == "__main__":  # the Slurm merge job of tools/index_tokens.py --slurm
    if sys.argv[1:2] != ["token-merge"] or len(sys.argv) != 3:
        sys.exit("usage: python -m mm1_megatron.data.prepare_tasks token-merge DIR")
    merged = merge_token_parts(Path(sys.argv[2]))
    print(json.dumps({"folder": sys.argv[2], "samples": merged["samples"],
                      "text_tokens": merged["text_tokens"]}), flush=True)

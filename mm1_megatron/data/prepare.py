"""`mm1-prepare-data`: a dataset folder (shards or an in-place index, manifest.json, index/)
from data as users hold it.

    mm1-prepare-data SOURCE [SOURCE ...] --kind {caption,interleaved,text,sft} --output OUT
        [--format auto|jsonl|mmc4|webdataset|energon|parquet] [--images-root DIR]
        [--tokenizer tok.model]
        [--caption-field F] [--text-field F] [--shard-size-mb N] [--no-progress]
        [--tasks N] [--workers W] [--slurm --partition P [--time T] [--cpus-per-task C]
         [--mem-per-cpu-gb G] [--tasks-per-job K]]

SOURCE: files, folders or globs (expanded here, so a quoted glob works too). --format auto
detects it (`sources/__init__.py`), each format documented in its module under sources/:
  jsonl       .jsonl / .json files (also .gz, .zst): records converted into our shards
  mmc4        MMC4's docs_shard_N_v2.jsonl + its image folder: converted
  webdataset  .tar files or a folder of them (img2dataset): indexed in place, never copied
  energon     a folder `energon prepare` indexed: indexed in place from its .nv-meta
  parquet     OBELICS interleaved documents or FineWeb-style text: converted
This module holds what does not depend on the format. Every preparation runs as N DataTrove
tasks and a merge (`prepare_tasks`): on this machine, W at a time, or with --slurm as an
array job and a dependent merge job; the output does not depend on N or W.

The dataset is written to OUT.incomplete/ (next to OUT) and swapped in only at the end (OUT
renamed to OUT.prepare_data-old, the new one renamed to OUT, the old one deleted): until then
an existing OUT is untouched and usable, whatever happens (bad input, an error, Ctrl-C, a
killed process). A failed task (exit 1 names it), Ctrl-C or a kill leave OUT.incomplete/ with
the finished tasks' work: the same command again runs only the rest, then the merge (another
command on it is refused in one line); the next run also finishes an interrupted swap. If no
record is usable, nothing is written: exit status 2 and one line saying why.
--output must be a new folder or one this tool wrote (no other files in it), never inside a
SOURCE folder (nor a SOURCE inside it); SOURCE is only read, so it may be read-only.

Records that cannot be used are skipped and counted per reason, the first ten listed as
FILE:LINE on stderr, with progress and a readable summary. The last line on stdout is one JSON
object: {"samples": usable samples, "bad": {reason: n}, "images", "text_tokens" (null without
--tokenizer), "seconds", "output", "format", "kind", "shards", "bytes"}.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from mm1_megatron.data.prepare_tasks import (LOGS, PLAN, SKIPPED, SUMMARY, Plan,
                                             SlurmOptions, TaskFailure, format_module,
                                             merge_parts, read_plan, run_local, submit_slurm,
                                             task_step, write_plan)
from mm1_megatron.data.shard_schema import KINDS, SOURCE_GAPS, DatasetError
from mm1_megatron.data.sources import FORMATS, PrepareError, Source, detect_format
from mm1_megatron.data.sources.urls import SourcePath, UrlPath, expand_url, is_url, source_path

__all__ = ["PrepareError", "expand_sources", "main", "prepare", "resolve_format", "summary",
           "usable"]

TOOL = "mm1-prepare-data"
MERGE_JOB = "--merge-job"  # main's first argument in the Slurm merge job (`submit`)
# What a dataset folder written by this tool holds; anything else in OUT is not ours to delete.
_DATASET_ENTRIES = ("manifest.json", "manifest.json.tmp", "index", PLAN, LOGS)
# Where OUT waits during the swap. The name tools/prepare_data.py used: a run repairs a swap
# that an older version left half done.
_ASIDE = ".prepare_data-old"
PathLike = Union[str, Path]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- SOURCE arguments ------------------------------------------------------------------------

def expand_sources(patterns: Sequence[PathLike]) -> list[SourcePath]:
    """SOURCE arguments -> paths: an existing path as it is, else a glob (sorted matches;
    `**` crosses folders); an fsspec URL likewise (`sources/urls.py`). Raises PrepareError
    for one that names nothing."""
    found: list[SourcePath] = []
    for pattern in map(str, patterns):
        if is_url(pattern):
            try:
                urls = expand_url(pattern)
            except (ImportError, ValueError, OSError) as e:  # no such protocol / its package
                raise PrepareError(f"SOURCE {pattern}: cannot be read through fsspec "
                                   f"({type(e).__name__}: {e})") from None
            if not urls:
                raise PrepareError(f"SOURCE {pattern}: no file or folder matches")
            found += [u for u in urls if u not in found]
            continue
        if os.path.exists(pattern):  # a file whose name holds "[" or "*" is still that file
            hits = [pattern]
        elif any(c in pattern for c in "*?["):
            hits = sorted(glob.glob(pattern, recursive=True))
            if not hits:
                raise PrepareError(f"SOURCE {pattern}: no file or folder matches")
        else:
            raise PrepareError(f"SOURCE {pattern}: no such file or folder")
        found += [Path(h) for h in hits if Path(h) not in found]
    return found


def resolve_format(sources: Sequence[Path], fmt: str = "auto") -> str:
    """--format as given, or the one detected ("auto"); a PrepareError names what is wrong."""
    if fmt == "auto":
        return detect_format(sources)
    if fmt not in FORMATS:
        raise PrepareError(f"--format {fmt}: not one of auto, {', '.join(FORMATS)}")
    return fmt


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_apart(sources: Sequence[Path], output: PathLike, outs: Sequence[Path]) -> None:
    """OUT (and its .incomplete / aside siblings) never inside a SOURCE folder: a later run
    over that folder would read our output as input; no SOURCE inside them: the swap would
    delete it."""
    for src in sources:
        if isinstance(src, UrlPath):
            continue  # --output is local, never under a URL
        real = Path(os.path.realpath(src))
        if real.is_dir() and any(_inside(o, real) for o in outs):
            raise PrepareError(f"--output {output} is inside SOURCE {src}; choose an --output "
                               "outside the source folders")
        if any(_inside(real, o) for o in outs):
            raise PrepareError(f"SOURCE {src} is inside --output {output}, which this run "
                               "replaces; choose another --output")


# ---- output folder: written as OUT.incomplete/, swapped in at the end -----------------------

def _foreign(folder: Path) -> list[str]:
    """Entries of `folder` that a dataset written by this tool does not hold."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name not in _DATASET_ENTRIES and
                  not (p.name.startswith("shard-") and p.name.endswith(".tar")))


def _check_replaceable(folder: Path, shown: str) -> None:
    if not folder.is_dir():
        raise PrepareError(f"{shown} exists and is not a folder")
    extra = _foreign(folder)
    if extra:
        raise PrepareError(f"{shown} holds files {TOOL} did not write "
                           f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
                           "refusing to replace it: choose another --output or remove them")


def _output_paths(output: PathLike) -> tuple[Path, Path, Path]:
    """(OUT, OUT.incomplete, OUT.prepare_data-old), absolute; nothing touched yet."""
    out = Path(os.path.realpath(output))
    if not out.name or out == out.parent:
        raise PrepareError(f"--output {output}: not a usable dataset folder name")
    return out, out.with_name(out.name + ".incomplete"), out.with_name(out.name + _ASIDE)


def _repair(output: PathLike, out: Path, tmp: Path, old: Path) -> None:
    """Undo what a killed run left behind; refuse an OUT this tool did not write. An
    OUT.incomplete/ holding a task plan is left for the tasks to finish."""
    if old.exists() or old.is_symlink():
        _check_replaceable(old, str(old))
        if out.exists():
            shutil.rmtree(old)  # killed after the swap, before deleting the old dataset
        else:
            os.replace(old, out)  # killed between the two renames: put the old dataset back
    if out.exists():
        _check_replaceable(out, f"--output {output}")
    if tmp.is_dir() and not tmp.is_symlink():
        if (tmp / PLAN).is_file():
            return  # a preparation in tasks, half done: `_resume_or_plan` decides
        shutil.rmtree(tmp)  # a stale partial dataset from a crashed run
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()


def _swap_in(tmp: Path, out: Path, old: Path) -> None:
    had_old = out.exists()
    if had_old:
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if had_old:
            os.replace(old, out)
        raise
    if had_old:
        shutil.rmtree(old)


def _no_samples(sources: Sequence[PathLike], source: Source, root: str, kind: str,
                counts: Mapping[str, int], had_old: bool) -> str:
    where = ", ".join(str(p) for p in sources)
    total, unit = sum(counts.values()), source.record
    if total:
        parts = ", ".join(
            f"{n} {source.reason_text.get(r, r).format(kind=kind, root=root)}"
            for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        why = f"{total} {unit}{'s' * (total != 1)}: {parts}"
    else:
        why = f"no non-blank {unit}s" if unit == "line" else f"no {unit}s"
    kept = "; nothing written, the existing dataset is unchanged" if had_old else \
        "; nothing written"
    return f"no usable samples in {where} ({why}){kept}"


# ---- the formats' two ways in ----------------------------------------------------------------

def prepare(kind: str, sources: Sequence[PathLike], images_root: PathLike, output: PathLike,
            shard_size_mb: float = 64.0, tokenizer=None, progress: bool = True,
            log: Callable[[str], None] = _stderr, *, format: str = "auto",
            caption_field: Optional[str] = None, text_field: Optional[str] = None,
            tasks: int = 1, workers: int = 1) -> tuple[dict, collections.Counter]:
    """Returns (manifest, skipped): every input record that is not a usable sample, per
    reason (records never written, samples the index flags bad, gaps in a source indexed in
    place). Runs as `tasks` DataTrove tasks, `workers` at a time, then the merge
    (`prepare_tasks`). Raises PrepareError when no record is usable (nothing written),
    TaskFailure when a task failed (the rerun of the same call runs only the unfinished
    ones); whatever happens, an existing dataset at `output` is left as it was until the
    new one is complete."""
    started = time.time()
    tmp, out, old, plan = _resume_or_plan(kind, sources, images_root, output, tokenizer,
                                          format, caption_field, text_field, tasks,
                                          shard_size_mb)
    run_local(tmp, plan, workers, progress)
    finish(tmp, out, old, started, log)
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = json.loads((out / LOGS / SKIPPED).read_text())["skipped"]
    return manifest, collections.Counter(skipped) + collections.Counter(manifest["bad"])


def submit(kind: str, sources: Sequence[PathLike], output: PathLike, slurm: SlurmOptions,
           tokenizer=None, *, images_root: PathLike = ".", format: str = "auto",
           caption_field: Optional[str] = None, text_field: Optional[str] = None,
           tasks: int = 1, shard_size_mb: float = 64.0) -> dict:
    """`prepare` as Slurm jobs: the tasks without a completion marker as an array job, the
    merge as a job depending on it. Returns the job ids."""
    started = time.time()
    tmp, out, old, plan = _resume_or_plan(kind, sources, images_root, output, tokenizer,
                                          format, caption_field, text_field, tasks,
                                          shard_size_mb)
    return submit_slurm(tmp, plan.tasks, task_step(plan, tmp), slurm,
                        [sys.executable, "-m", "mm1_megatron.data.prepare", MERGE_JOB,
                         str(tmp), str(out), str(old), str(started)])


def finish(tmp: Path, out: Path, old: Path, started: float,
           log: Callable[[str], None] = _stderr) -> dict:
    """After the tasks: merge their parts (`prepare_tasks.merge_parts`), check something is
    usable, list the first skipped records, swap OUT in; returns the summary (also in
    OUT/logs/summary.json). Raises PrepareError (OUT.incomplete removed: nothing written) when
    no sample is usable. A merge killed before the swap is simply run again."""
    plan = read_plan(tmp)
    manifest, skipped, listed = merge_parts(tmp, plan)
    source = FORMATS[plan.format]
    if usable(manifest) <= 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise PrepareError(_no_samples(
            plan.sources, source, plan.images_root, plan.kind,
            skipped + collections.Counter(manifest["bad"]), out.exists()))
    for line in listed:
        log(line)
    hidden = sum(skipped.values()) - len(listed)
    if hidden > 0:
        log(f"... and {hidden} more skipped {source.record}{'s' * (hidden != 1)} "
            "(not listed)")
    result = summary(manifest, skipped + collections.Counter(manifest["bad"]), plan.format,
                     out, time.time() - started)
    result["tasks"] = plan.tasks
    (tmp / LOGS / SUMMARY).write_text(json.dumps(result) + "\n")
    _swap_in(tmp, out, old)
    return result


def _resume_or_plan(kind: str, sources: Sequence[PathLike], images_root: PathLike,
                    output: PathLike, tokenizer, format: str, caption_field: Optional[str],
                    text_field: Optional[str], tasks: int, shard_size_mb: float
                    ) -> tuple[Path, Path, Path, Plan]:
    """OUT.incomplete/ with its task plan: the one a previous run of the same call left (its
    finished tasks are kept), or a new one. Refuses, in one line and changing nothing, a
    half-done preparation planned with another --tasks or of other sources or options."""
    if kind not in KINDS:
        raise PrepareError(f"--kind {kind!r} is not one of {KINDS}")
    if tasks < 1:
        raise PrepareError(f"--tasks {tasks}: must be at least 1")
    paths = [source_path(p) for p in sources]
    name = resolve_format(paths, format)
    source = FORMATS[name]
    url = next((p for p in paths if isinstance(p, UrlPath)), None)
    if url is not None and source.in_place:
        raise PrepareError(f"SOURCE {url}: {name} data is indexed in place and the training "
                           "loader reads it where it lies, from local files: mount the "
                           "bucket (s3fs, rclone, a Lustre path) and give the mount's path")
    out, tmp, old = _output_paths(output)
    _check_apart(paths, output, (out, tmp, old))
    _repair(output, out, tmp, old)
    tokenizer_path = None if tokenizer is None else str(tokenizer.path)
    if source.in_place:
        try:
            planned = format_module(name).plan(paths, kind, caption_field, text_field)
        except DatasetError as e:
            raise PrepareError(str(e)) from None
        plan = Plan.in_place(planned, kind, tasks, tokenizer_path, paths)
    else:
        # Field defaults are the jsonl schema's: {"image", "text"} and {"text"}.
        fields = dict(caption_field=caption_field or "text", text_field=text_field or "text")
        files = source.files(paths)
        source.check(files, kind)  # what would fail every task, refused before any starts
        try:
            root = source_path(images_root)
        except (ImportError, ValueError) as e:
            raise PrepareError(f"--images-root {images_root}: cannot be read through fsspec "
                               f"({type(e).__name__}: {e})") from None
        plan = Plan.converted(name, kind, tasks, files, tokenizer_path, paths, root, fields,
                              shard_size_mb)
    found = read_plan(tmp) if tmp.is_dir() else None
    if found is not None:
        if not found.same_work(plan):
            raise PrepareError(f"{tmp} holds a half-done preparation of other sources or "
                               f"options ({', '.join(found.sources)} --kind {found.kind}); "
                               "run that command again to finish it, or remove the folder")
        if found.tasks != plan.tasks:
            raise PrepareError(f"--tasks {tasks}: {tmp} holds a half-done preparation in "
                               f"{found.tasks} tasks; rerun with --tasks {found.tasks} (its "
                               "finished tasks are kept), or remove the folder to start over")
        return tmp, out, old, found
    tmp.mkdir(parents=True)
    write_plan(tmp, plan)
    return tmp, out, old, plan


def usable(manifest: dict) -> int:
    """Samples in the index not flagged bad (a source gap has no index row to subtract)."""
    return manifest["samples"] - sum(n for reason, n in manifest.get("bad", {}).items()
                                     if reason not in SOURCE_GAPS)


def summary(manifest: dict, skipped: Mapping[str, int], fmt: str, output: PathLike,
            seconds: float) -> dict:
    """The JSON line `main` ends with: usable samples, and every skip per reason."""
    return {"samples": usable(manifest), "bad": dict(sorted(skipped.items())),
            "images": manifest["images"],
            "text_tokens": manifest.get("text_tokens"), "seconds": round(seconds, 3),
            "output": os.path.realpath(output), "format": fmt, "kind": manifest["kind"],
            "shards": len(manifest["shards"]), "bytes": manifest["bytes"],
            "samples_per_s": round(manifest["samples"] / max(seconds, 1e-9), 1)}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=TOOL, description="Prepare a dataset folder from "
                                "JSONL + images (converted) or webdataset tars (indexed "
                                "in place).")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="files, folders or globs (quoted globs are expanded here)")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--output", required=True, help="dataset folder to (re)write")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS))
    p.add_argument("--images-root", default=".", help="jsonl: image paths are relative to this")
    p.add_argument("--tokenizer", help="sentencepiece model: store text token counts")
    p.add_argument("--caption-field", help="--kind caption: the field holding the caption "
                   "(jsonl: 'text')")
    p.add_argument("--text-field", help="--kind text: the field holding the text "
                   "(jsonl: 'text')")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--no-progress", action="store_true")
    run = p.add_argument_group("tasks (DataTrove): on this machine, or Slurm jobs")
    run.add_argument("--tasks", type=int, default=1, help="split the work (the source's tars, "
                     "or its files in units of --shard-size-mb) into this many tasks (fixed "
                     "for a preparation: a rerun runs the unfinished ones)")
    run.add_argument("--workers", type=int, default=1, help="tasks at a time on this machine")
    run.add_argument("--slurm", action="store_true", help="submit the tasks as a Slurm array "
                     "job and the merge as a job depending on it, then return")
    run.add_argument("--partition", help="--slurm: the partition (required)")
    run.add_argument("--time", default="04:00:00", help="--slurm: a task's time limit")
    run.add_argument("--cpus-per-task", type=int, default=1, help="--slurm")
    run.add_argument("--mem-per-cpu-gb", type=int, default=2, help="--slurm")
    run.add_argument("--tasks-per-job", type=int, default=1, help="--slurm: tasks run one "
                     "after another in each array element")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [MERGE_JOB]:
        return _merge_job(argv[1:])
    args = _parser().parse_args(argv)
    from mm1_megatron.data.tokenizer import load_tokenizer

    start = time.monotonic()
    try:
        for flag, value, wanted in (("--caption-field", args.caption_field, "caption"),
                                    ("--text-field", args.text_field, "text")):
            if value is not None and args.kind != wanted:
                raise PrepareError(f"{flag} is for --kind {wanted}, not --kind {args.kind}")
        if args.slurm and not args.partition:
            raise PrepareError("--slurm needs --partition")
        sources = expand_sources(args.sources)
        fmt = resolve_format(sources, args.format)
        tok = load_tokenizer(args.tokenizer)
        fields = dict(format=fmt, caption_field=args.caption_field, text_field=args.text_field,
                      tasks=args.tasks)
        if args.slurm:
            jobs = submit(args.kind, sources, args.output, SlurmOptions(
                args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb,
                args.tasks_per_job), tok, images_root=args.images_root,
                shard_size_mb=args.shard_size_mb, **fields)
            _stderr(f"{args.output}: submitted {args.tasks} task(s) as job "
                    f"{jobs['index_job'] or '(none left)'} and the merge as job "
                    f"{jobs['merge_job']}; its log ends with the summary line")
            print(json.dumps({"submitted": jobs, "tasks": args.tasks,
                              "output": os.path.realpath(args.output)}), flush=True)
            return 0
        manifest, skipped = prepare(args.kind, sources, args.images_root, args.output,
                                    args.shard_size_mb, tok, progress=not args.no_progress,
                                    workers=args.workers, **fields)
    except PrepareError as e:
        _stderr(f"{TOOL}: {e}")
        return 2
    except TaskFailure as e:
        _stderr(f"{TOOL}: {e}")
        return 1
    except (ValueError, OSError, DatasetError) as e:
        _stderr(f"{TOOL}: error: {e}")
        return 2
    except KeyboardInterrupt:
        _stderr(f"\n{TOOL}: interrupted; the existing dataset is unchanged (run the same "
                "command again to go on from the finished tasks)")
        return 130
    result = summary(manifest, skipped, fmt, args.output, time.monotonic() - start)
    result["tasks"] = args.tasks
    source = FORMATS[fmt]
    where = "source shards indexed in place" if source.in_place else "shards"
    _stderr(f"{args.output}: {result['samples']} samples in {result['shards']} {where} "
            f"({fmt}), {result['images']} images, {result['bytes'] / 2**20:.1f} MiB; "
            f"skipped input {source.record}s: {dict(skipped) or 0}")
    print(json.dumps(result), flush=True)
    return 0


def _merge_job(argv: list[str]) -> int:
    """The Slurm merge job (`submit`): `python -m mm1_megatron.data.prepare --merge-job TMP
    OUT OLD STARTED`. Its last stdout line is the summary; exit 2 and one line when nothing is
    usable."""
    tmp, out, old, started = argv
    try:
        result = finish(Path(tmp), Path(out), Path(old), float(started))
    except PrepareError as e:
        _stderr(f"{TOOL}: {e}")
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

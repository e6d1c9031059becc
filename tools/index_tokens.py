"""Add the packer's token index to prepared datasets (made without --tokenizer, or with another).

    python tools/index_tokens.py DIR [DIR ...] --tokenizer tok.model [--tasks N] [--workers 8]
        [--slurm --partition P [--time T] [--cpus-per-task C] [--mem-per-cpu-gb G]]

DIR is one prepared dataset folder (e.g. data/caption) or a data root holding interleaved/,
caption/ and text/. Per sample it stores the text token count of each segment and where the
images are (index/segments.npy, index/segment_offsets.npy), the text token counts, and the
tokenizer (path, sha256, vocabulary size) in manifest.json: the loader plans rows from these
alone and refuses a dataset indexed with another tokenizer. It runs as mm1-prepare-data does
(`mm1_megatron/data/prepare_tasks.py`): --tasks DataTrove tasks over slices of the shards,
--workers at a time here, or with --slurm an array job and a merge job; a failed task (exit 1
names it) leaves the others' work in DIR/logs/token-index/ and the same command again runs
only the rest. Exit 2 with one line on a bad folder or tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mm1_megatron.data.prepare_tasks import SlurmOptions, TaskFailure, add_token_index
from mm1_megatron.data.shard_schema import KINDS, DatasetError


def _datasets(paths: list[str]) -> list[Path]:
    out = []
    for text in paths:
        path = Path(text)
        if (path / "manifest.json").is_file():
            out.append(path)
            continue
        found = [path / kind for kind in KINDS if (path / kind / "manifest.json").is_file()]
        if not found:
            raise DatasetError(f"{path}: no manifest.json, and no {'/'.join(KINDS)} dataset "
                               "folder with one")
        out += found
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="DIR")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    parser.add_argument("--tasks", type=int, default=None,
                        help="tasks per dataset (default: --workers)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--slurm", action="store_true", help="submit array + merge jobs")
    parser.add_argument("--partition")
    parser.add_argument("--time", default="04:00:00")
    parser.add_argument("--cpus-per-task", type=int, default=1)
    parser.add_argument("--mem-per-cpu-gb", type=int, default=2)
    args = parser.parse_args(argv)
    if args.slurm and not args.partition:
        parser.error("--slurm needs --partition")
    from mm1_megatron.data.tokenizer import Tokenizer

    try:
        Tokenizer.load(args.tokenizer)  # refuse a bad model before any task
        folders = _datasets(args.paths)
    except (ValueError, DatasetError) as e:
        print(f"index_tokens: {e}", file=sys.stderr)
        return 2
    slurm = SlurmOptions(args.partition, args.time, args.cpus_per_task, args.mem_per_cpu_gb,
                         job_name="mm1-index-tokens") if args.slurm else None
    for folder in folders:
        start = time.perf_counter()
        try:
            done = add_token_index(folder, args.tokenizer, tasks=args.tasks or args.workers,
                                   workers=args.workers, progress=not args.no_progress,
                                   slurm=slurm)
        except DatasetError as e:
            print(f"index_tokens: {e}", file=sys.stderr)
            return 2
        except TaskFailure as e:
            print(f"index_tokens: {folder}: {e}", file=sys.stderr)
            return 1
        if slurm is not None:
            print(f"{folder}: submitted the tasks as job {done['index_job']} and the merge as "
                  f"job {done['merge_job']}")
            continue
        print(f"{folder}: {done['samples']} samples, {done['text_tokens']} text tokens "
              f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Indexing a dataset folder: scanning its tars (ours, or webdataset shards written by other
tools that follow `shard_schema`) into index/samples.npy + images.npy and manifest.json
(`index_dataset`), with each sample's validation and bad reason; the token index for the
packer (`segment_runs`, index/segments.npy + segment_offsets.npy), written while indexing (or
added later to a prepared dataset: `prepare_tasks.add_token_index`); and the progress bar the
writer shares.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from mm1_megatron.data.prompt_format import Answer
from mm1_megatron.data.shard_reader import file_sha256, read_at
from mm1_megatron.data.shard_schema import (BAD_REASONS, FORMAT, IMAGE_DTYPE, IMAGE_EXTS,
                                            KEY_BYTES, SAMPLE_DTYPE, DatasetError,
                                            normalize_ext, parse_text_member)


@dataclass
class InPlaceSource:
    """A source indexed in place as its format module plans it (`plan`): its tars in dataset
    order, the folder their manifest names are relative to, how a sample's text member reads
    (`parse_text_member`), and the members to index (None: all; energon: its field_map's)."""

    format: str
    root: Path
    shards: list[Path]
    text: dict
    parts: Optional[list[str]] = None


def progress_bar(enabled: bool, total: Optional[int], desc: str):
    """A tqdm bar counting samples, or one that shows nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample")

    class _Null:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...
    return _Null()


def scan_tar(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], Optional[str]]:
    """Members grouped by key in tar order; plus the key cut by truncation, if any."""
    file_size = path.stat().st_size
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    cut: Optional[str] = None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, _, suffix = base.partition(".")
                key = info.name[: len(info.name) - len(base)] + key
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][suffix] = (info.offset_data, info.size)
                if info.offset_data + info.size > file_size:
                    cut = key  # tarfile lists a header whose data the file no longer holds
                    break
    except (tarfile.ReadError, EOFError, OSError) as e:
        if not groups:
            raise DatasetError(f"{path}: cannot read as a tar file ({e})") from None
        cut = groups[-1][0]  # the sample being read when the archive broke
    return groups, cut


def tokenizer_record(tokenizer) -> dict:
    """How a manifest names the tokenizer its token counts come from."""
    return {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size,
            "sha256": hashlib.sha256(tokenizer.__getstate__()["proto"]).hexdigest()}


def segment_runs(segments: list[Union[str, int]], tokenizer) -> list[int]:
    """A document's layout for the packer: text token count per text segment, -1 per image
    (an `Answer` counts its closing `</s>` too)."""
    return [-1 if isinstance(s, int) else tokenizer.count(s) + isinstance(s, Answer)
            for s in segments]


def save_token_index(folder: Path, runs: list[list[int]]) -> None:
    offsets = np.zeros(len(runs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in runs])
    flat = np.fromiter((n for r in runs for n in r), dtype=np.int32, count=int(offsets[-1]))
    np.save(folder / "index" / "segments.npy", flat)
    np.save(folder / "index" / "segment_offsets.npy", offsets)


def index_dataset(folder: Union[str, Path], kind: str, *, tokenizer=None,
                  progress: bool = False) -> dict:
    """Scan DIR/*.tar (name order) and write index/ and manifest.json; returns the manifest."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise DatasetError(f"{folder}: no .tar shards")
    manifest = index_shards(shards, kind, folder, tokenizer=tokenizer, progress=progress)
    write_manifest(folder, manifest)
    return manifest


def index_shards(shards: list[Path], kind: str, out: Path, *, root: Optional[Path] = None,
                 text: Optional[dict] = None, tokenizer=None, progress: bool = False,
                 list_members: Optional[Callable[[Path], tuple[list, Optional[str]]]] = None
                 ) -> dict:
    """Scan `shards` in the given order into out/index/ and return the manifest (not yet
    written). `root` None: the shards are out's own (named by file name, with sha256); else
    a source indexed in place, the shards named relative to `root` with size and mtime (a
    change is caught at start-up without hashing the source). `text`: how a sample's text
    member reads (`parse_text_member`); None for our schema's json. `list_members(path)`: a
    shard's samples as `scan_tar` gives them ((key, {suffix: (offset, size)}) in order, and
    the key a truncation cut), from an index the source already has; default: `scan_tar`."""
    rows, images, runs = [], [], []
    shard_entries, bad = [], collections.Counter()
    text_chars = text_tokens = 0
    bar = progress_bar(progress, None, f"indexing {out.name}")
    for shard_no, path in enumerate(shards):
        groups, cut = (list_members or scan_tar)(path)
        with open(path, "rb") as f:
            for key, members in groups:
                if len(key.encode()) > KEY_BYTES:
                    raise DatasetError(f"{path}: key {key!r} is longer than {KEY_BYTES} bytes")
                row = dict(shard=shard_no, key=key.encode(), json_offset=-1,
                           json_size=0, image_start=len(images), num_images=0, text_chars=0,
                           text_tokens=-1 if tokenizer is None else 0, bad=0, bad_member=-1)
                reason, member, layout = _index_sample(kind, key, members, f, cut == key, row,
                                                       images, tokenizer, text)
                runs.append([] if reason else layout)
                if reason:
                    row["bad"], row["bad_member"] = BAD_REASONS.index(reason) + 1, member
                    bad[reason] += 1
                else:
                    text_chars += row["text_chars"]
                    text_tokens += max(row["text_tokens"], 0)
                rows.append(tuple(row[name] for name in SAMPLE_DTYPE.names))
                bar.update(1)
        stat = path.stat()
        entry = {"name": path.name, "samples": len(groups), "bytes": stat.st_size}
        if root is None:
            entry["sha256"] = file_sha256(path)
        else:
            entry.update(name=str(path.relative_to(root)), sha256=None,
                         mtime_ns=stat.st_mtime_ns)
        shard_entries.append(entry)
    bar.close()
    (out / "index").mkdir(exist_ok=True)
    np.save(out / "index" / "samples.npy", np.array(rows, dtype=SAMPLE_DTYPE))
    np.save(out / "index" / "images.npy", np.array(images, dtype=IMAGE_DTYPE))
    index = {"samples": "index/samples.npy", "images": "index/images.npy"}
    for stale in ("segments.npy", "segment_offsets.npy"):
        (out / "index" / stale).unlink(missing_ok=True)
    if tokenizer is not None:
        save_token_index(out, runs)
        index.update(segments="index/segments.npy", segment_offsets="index/segment_offsets.npy")
    return {
        "format": FORMAT, "kind": kind, "shards": shard_entries,
        "samples": len(rows), "bytes": sum(s["bytes"] for s in shard_entries),
        "images": len(images), "bad": dict(sorted(bad.items())),
        "text_chars": text_chars, "text_tokens": None if tokenizer is None else text_tokens,
        "tokenizer": None if tokenizer is None else tokenizer_record(tokenizer),
        "index": index,
        "image_exts": list(IMAGE_EXTS), "bad_reasons": list(BAD_REASONS),
    }


def write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / "manifest.json")  # atomic: a reader never sees half a manifest


def _index_sample(kind: str, key: str, members: dict, f, truncated: bool, row: dict,
                  images: list, tokenizer, text: Optional[dict]
                  ) -> tuple[Optional[str], int, list[int]]:
    """(bad reason or None, bad member, the packer's layout: `segment_runs`)."""
    suffix = "json" if text is None else text["member"]
    if suffix not in members:
        return ("truncated", -1, []) if truncated else \
            ("bad_json" if text is None else "missing_text", -1, [])
    row["json_offset"], row["json_size"] = members[suffix]
    if truncated and row["json_offset"] + row["json_size"] > _file_size(f):
        return "truncated", -1, []
    try:
        segments, names = parse_text_member(kind, read_at(f, *members[suffix]), text)
    except ValueError as e:
        return e.args[0], -1, []
    if kind == "caption":
        found = [s for s in members if s in IMAGE_EXTS or normalize_ext(s) in IMAGE_EXTS
                 and "." not in s]
        if not found:
            images.append((-1, 0, 0, 0))
            row["num_images"] = 1
            return "missing_image", 0, []
        names = found[:1]
    texts = [s for s in segments if isinstance(s, str)]
    row["text_chars"] = sum(len(t) for t in texts)
    layout = []
    if tokenizer is not None:
        layout = segment_runs(segments, tokenizer)
        row["text_tokens"] = sum(n for n in layout if n >= 0)
    row["num_images"] = len(names)
    problem: tuple[Optional[str], int] = (None, -1)
    for j, (name, frame) in enumerate(_image_members(names, members)):
        offset, size = members.get(name, (-1, 0))
        ext = normalize_ext(name) if name else "jpg"
        images.append((offset, size, IMAGE_EXTS.index(ext) if ext in IMAGE_EXTS else 0, frame))
        if problem[0]:
            continue
        if offset < 0:
            problem = ("truncated" if truncated else "missing_image", j)
        elif offset + size > _file_size(f):
            problem = ("truncated", j)
        elif size == 0:
            problem = ("zero_byte_image", j)
    if problem[0] is None and truncated:
        problem = ("truncated", -1)
    return problem[0], problem[1], layout


def _image_members(names: list[str], members: dict) -> list[tuple[str, int]]:
    """Each image name of a sample -> (the member holding it, its frame there); "" where none.

    A name with an image extension is a member's suffix (KEY.<name>: our img<j>.<ext>,
    Energon's interleaved layout's "2345ew.jpg"). A name without one (MINT-1T's
    "page_0_image_85") is the next frame of
    the sample's one multi-page TIFF: MINT-1T's PDF documents hold their images, in document
    order, as the pages of KEY.tiff (NeMo Curator's interleaved reader resolves them the same
    way)."""
    stacks = [s for s in members if normalize_ext(s) == "tiff"]
    stack = stacks[0] if len(stacks) == 1 else ""
    pages = 0
    out = []
    for name in names:
        if normalize_ext(name) in IMAGE_EXTS:
            out.append((name if name in members else "", 0))
        else:
            out.append((stack, pages))
            pages += bool(stack)
    return out


def _file_size(f) -> int:
    return os.fstat(f.fileno()).st_size

"""Webdataset shards for the three sample kinds: schema, writer, index, random-access reader.

Schema (one dataset folder per kind; members of a sample share KEY, the text before the first
dot, as webdataset groups them; KEY holds no dot)::

    caption      KEY.json  {"text": "a caption"}            KEY.<ext>  the image
    interleaved  KEY.json  {"segments": [{"text": "..."}, {"image": "img0.jpg"},
                                         {"text": "..."}, {"image": "img1.png"}, ...]}
                 KEY.img0.jpg, KEY.img1.png, ...  (image j is named img<j>.<ext>, j = 0, 1, ...
                 in document order; the json names it, the tar holds it)
    text         KEY.json  {"text": "a document"}
    sft          KEY.json  {"turns": [{"role": "system" | "user" | "assistant",
                                       "segments": [{"text": "..."}, {"image": "img0.jpg"}]}]}
                 KEY.img0.jpg, ...  (as interleaved; images only in user turns; turns: an
                 optional system turn, then user / assistant alternating, ending with the
                 assistant). Read back as the chat format's segments (`prompt_format`).

<ext> is one of jpg, png, webp, bmp, gif, tiff (lower case). The json may carry an "id" (the
source record's id) that readers ignore. Our writer uses KEY = 9-digit global sample index.

Folder layout::

    DIR/shard-000000.tar, shard-000001.tar, ...
    DIR/manifest.json   {"format": 1, "kind", "shards": [{"name", "samples", "bytes",
                         "sha256"}], "samples", "bytes", "images", "bad": {reason: n},
                         "text_chars", "text_tokens" (null without tokenizer),
                         "tokenizer": {"path", "sha256", "vocab_size"} | null}
    DIR/index/samples.npy   one row per sample, numpy structured array (SAMPLE_DTYPE), mmap-able
    DIR/index/images.npy    one row per image (IMAGE_DTYPE); samples[i] owns
                            images[image_start : image_start + num_images]
    DIR/index/segments.npy         (with a tokenizer) int32 per segment in document order: its
    DIR/index/segment_offsets.npy  text token count, or -1 for an image; sample i's segments are
                                   segments[segment_offsets[i] : segment_offsets[i + 1]]
                                   (none for a bad sample). The packer plans rows from these
                                   alone (`ShardDataset.layout`); tools/index_tokens.py adds them
                                   to a dataset prepared without a tokenizer.

Sample i is the i-th sample of the shards in name order. The index holds, per sample: shard
number, key, the byte offset and size of its json and of each image member inside the tar
(TarInfo.offset_data / size), the number of images, text length in characters, text tokens
(-1 without a tokenizer) and `bad`: 0, or the BAD_REASONS code found while indexing (then
`bad_member` is -1 for the json or the image number). A packer plans rows from the index alone;
a reader seeks straight to the members of the samples it owns.

Bad samples are kept in the index (so sample numbering never depends on validation) and
`read(i)` raises `BadSample(shard, member, reason)`; callers skip and count them
(`SkipCounter`). A shard missing, unreadable, or whose size (always) or sha256 (`verify=True`)
differs from the manifest fails `open_dataset` with an error naming it.
"""

from __future__ import annotations

import array
import collections
import hashlib
import json
import os
import struct
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np

from mm1_megatron.data.prompt_format import Answer, Turn, chat_segments

KINDS = ("caption", "interleaved", "text", "sft")
IMAGE_EXTS = ("jpg", "png", "webp", "bmp", "gif", "tiff")
_EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}
# Reason codes; 0 is "good". "undecodable_image" is raised by the image decoder (images.py),
# listed here so every skip is counted under one vocabulary.
BAD_REASONS = ("truncated", "bad_json", "missing_image", "zero_byte_image", "empty_text",
               "images_only", "undecodable_image")
FORMAT = 1
KEY_BYTES = 48

SAMPLE_DTYPE = np.dtype([
    ("shard", "<i4"), ("key", f"S{KEY_BYTES}"), ("json_offset", "<i8"), ("json_size", "<i8"),
    ("image_start", "<i8"), ("num_images", "<i4"), ("text_chars", "<i8"),
    ("text_tokens", "<i8"), ("bad", "u1"), ("bad_member", "<i4"),
])
_BAD_OFFSET = SAMPLE_DTYPE.fields["bad"][1]
_NATIVE_INT32 = array.array("i").itemsize == 4 and sys.byteorder == "little"  # = "<i4"
# offset -1: the json names the image but the tar lacks the member.
IMAGE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("ext", "u1")])


class BadSample(Exception):
    """One sample that cannot be used; skip it and count `reason`."""

    def __init__(self, shard: str, member: str, reason: str, detail: str = "") -> None:
        self.shard, self.member, self.reason, self.detail = shard, member, reason, detail
        super().__init__(f"{shard}: {member}: {reason}" + (f" ({detail})" if detail else ""))


class DatasetError(Exception):
    """A dataset that cannot be used at all (missing/unreadable shard, manifest mismatch)."""


@dataclass
class Sample:
    key: str
    kind: str
    # In order: a str is a text segment, an int j is image j. Caption pairs: [0, text].
    segments: list[Union[str, int]]
    images: list[bytes]  # raw encoded bytes, in order; empty when read with images=False
    image_exts: list[str]
    index: int = -1  # global sample number

    @property
    def texts(self) -> list[str]:
        return [s for s in self.segments if isinstance(s, str)]

    @property
    def num_images(self) -> int:
        return len(self.image_exts)


_COUNTER_LOCK = threading.Lock()


@dataclass
class SkipCounter:
    """Per-reason counts of skipped samples; logs each (shard, member) once, the first
    `max_listed` of them: later epochs meet the same bad samples again, and remembering every
    one would grow with the dataset (1% bad of 2B captions: 20M entries)."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    log: Optional[Callable[[str], None]] = print
    max_listed: int = 1000
    _seen: set = field(default_factory=set)

    def add(self, err: BadSample) -> None:
        with _COUNTER_LOCK:  # the loader may count from a prefetch thread
            self.counts[err.reason] += 1
            key = (err.shard, err.member)
            first = key not in self._seen and len(self._seen) < self.max_listed
            if first:
                self._seen.add(key)
        if first and self.log is not None:
            self.log(f"skipping bad sample: {err}" + (
                f" (the first {self.max_listed} are listed; the rest only counted)"
                if len(self._seen) == self.max_listed else ""))

    def snapshot(self) -> dict[str, int]:
        with _COUNTER_LOCK:
            return dict(self.counts)


def normalize_ext(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower()
    return _EXT_ALIASES.get(ext, ext)


# ------------------------------------------------------------------------------------------
# Validation of one sample's json (shared by the writer, the indexer and the reader)
# ------------------------------------------------------------------------------------------


def parse_sample_json(kind: str, raw: bytes) -> tuple[list[Union[str, int]], list[str]]:
    """json bytes -> (segments, image names relative to KEY). Raises ValueError(reason, detail)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("bad_json", str(e).split(":")[0]) from None
    if not isinstance(obj, dict):
        raise ValueError("bad_json", "not an object")
    if kind == "sft":
        return _parse_turns(obj)
    if kind in ("caption", "text"):
        text = obj.get("text")
        if not isinstance(text, str):
            raise ValueError("bad_json", "field 'text' missing or not a string")
        if not text.strip():
            raise ValueError("empty_text", "field 'text'")
        return ([0, text] if kind == "caption" else [text]), []
    segs = obj.get("segments")
    if not isinstance(segs, list) or not segs:
        raise ValueError("bad_json", "field 'segments' missing or not a non-empty list")
    out: list[Union[str, int]] = []
    names: list[str] = []
    for n, seg in enumerate(segs):
        if isinstance(seg, dict) and len(seg) == 1 and isinstance(seg.get("text"), str):
            if not seg["text"].strip():
                raise ValueError("empty_text", f"segments[{n}]")
            out.append(seg["text"])
        elif _is_image_segment(seg):
            out.append(_image_number(seg["image"], names, f"segments[{n}]"))
        else:
            raise ValueError("bad_json", f"segments[{n}] is not {{'text': str}} or "
                             "{'image': str}")
    if not any(isinstance(s, str) for s in out):
        raise ValueError("images_only", "no text segment")
    return out, names


def _is_image_segment(seg: object) -> bool:
    return isinstance(seg, dict) and len(seg) == 1 and isinstance(seg.get("image"), str)


def _image_number(name: str, names: list[str], where: str) -> int:
    """The next image of a sample, which must be named img<j>.<ext> in order; appended."""
    j = len(names)
    if name.lower() != f"img{j}.{normalize_ext(name)}" or normalize_ext(name) not in IMAGE_EXTS:
        raise ValueError("bad_json", f"{where}: image {name!r} must be named "
                         f"img{j}.<{'|'.join(IMAGE_EXTS)}>")
    names.append(name)
    return j


def _parse_turns(obj: dict) -> tuple[list[Union[str, int]], list[str]]:
    """An sft sample's turns -> (chat segments, image names)."""
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError("bad_json", "field 'turns' missing or not a non-empty list")
    parsed, names = [], []
    for n, turn in enumerate(turns):
        role = turn.get("role") if isinstance(turn, dict) else None
        segs = turn.get("segments") if isinstance(turn, dict) else None
        if role not in ("system", "user", "assistant") or not isinstance(segs, list) or not segs:
            raise ValueError("bad_json", f"turns[{n}] is not {{'role': system|user|assistant, "
                             "'segments': [...]}")
        content: list[Union[str, int]] = []
        for seg in segs:
            if isinstance(seg, dict) and len(seg) == 1 and isinstance(seg.get("text"), str):
                content.append(seg["text"])
            elif role == "user" and _is_image_segment(seg):
                content.append(_image_number(seg["image"], names, f"turns[{n}]"))
            else:
                raise ValueError("bad_json", f"turns[{n}]: a segment is not {{'text': str}}"
                                 + (" or {'image': str}" if role == "user" else ""))
        if role != "user" and not "".join(content).strip():
            raise ValueError("empty_text", f"turns[{n}]")
        parsed.append(Turn(role, tuple(content)))
    roles = [t.role for t in parsed]
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body != ["user", "assistant"] * (len(body) // 2) or len(body) % 2:
        raise ValueError("bad_json", "turns must be [system], then user / assistant "
                         "alternating, ending with an assistant turn")
    return chat_segments(parsed), names


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """Input to `write_dataset`: segments as in `Sample` plus (ext, bytes) per image."""

    segments: list[Union[str, int]]
    images: list[tuple[str, bytes]] = field(default_factory=list)
    source_id: Optional[str] = None
    turns: Optional[list[Turn]] = None  # kind sft: the conversation (ints: image numbers)


def _members(kind: str, key: str, s: RawSample) -> dict[str, bytes]:
    """Schema encoding of one sample: {suffix: bytes} (webdataset: member = KEY.suffix)."""
    if kind == "caption":
        if len(s.images) != 1 or len(s.segments) != 2 or s.segments[0] != 0:
            raise ValueError(f"{key}: a caption pair is [image 0, text]")
        ext, data = s.images[0]
        obj: dict = {"text": s.segments[1]}
        members = {ext: data}
    elif kind == "text":
        obj, members = {"text": s.segments[0]}, {}
    elif kind == "sft":
        obj, members = {"turns": []}, {}
        for turn in s.turns or []:
            segs = []
            for item in turn.content:
                if isinstance(item, str):
                    segs.append({"text": item})
                else:
                    ext, data = s.images[item]
                    name = f"img{len(members)}.{ext}"
                    segs.append({"image": name})
                    members[name] = data
            obj["turns"].append({"role": turn.role, "segments": segs})
    else:
        obj, members = {"segments": []}, {}
        for seg in s.segments:
            if isinstance(seg, str):
                obj["segments"].append({"text": seg})
            else:
                ext, data = s.images[seg]
                name = f"img{len(members)}.{ext}"
                obj["segments"].append({"image": name})
                members[name] = data
    if s.source_id is not None:
        obj["id"] = s.source_id
    members["json"] = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return members


def write_dataset(samples: Iterable[RawSample], output: Union[str, Path], kind: str, *,
                  shard_size_mb: float = 64.0, tokenizer=None, progress: bool = False,
                  total: Optional[int] = None) -> dict:
    """Write samples into size-targeted shards, then manifest and index. Returns the manifest.

    A shard is closed before the sample that would take it past the target (a sample larger
    than the target gets a shard of its own). Deterministic: fixed mtime/owner in the tar.
    """
    import webdataset as wds

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()  # a re-run must not leave stale shards behind
    target = int(shard_size_mb * 2**20)
    writer, written, shard_no, n = None, 0, -1, 0
    bar = _progress(progress, total, f"writing {kind}")
    try:
        for s in samples:
            key = f"{n:09d}"
            members = _members(kind, key, s)
            size = sum(512 + (len(v) + 511) // 512 * 512 for v in members.values())
            if writer is None or (written and written + size > target):
                if writer is not None:
                    writer.close()
                shard_no += 1
                writer = wds.TarWriter(str(out / f"shard-{shard_no:06d}.tar"), encoder=False,
                                       mtime=0, user="mm1", group="mm1")
                written = 0
            writer.write({"__key__": key, **members})
            written += size
            n += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return index_dataset(out, kind, tokenizer=tokenizer, progress=progress)


def _progress(enabled: bool, total: Optional[int], desc: str):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="sample")

    class _Null:
        def update(self, n: int) -> None: ...
        def close(self) -> None: ...
    return _Null()


# ------------------------------------------------------------------------------------------
# Indexing (also works on webdataset shards written by other tools, if they follow the schema)
# ------------------------------------------------------------------------------------------


def _scan_tar(path: Path) -> tuple[list[tuple[str, dict[str, tuple[int, int]]]], Optional[str]]:
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


def _read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def tokenizer_record(tokenizer) -> dict:
    """How a manifest names the tokenizer its token counts come from."""
    return {"path": str(tokenizer.path), "vocab_size": tokenizer.vocab_size,
            "sha256": hashlib.sha256(tokenizer.__getstate__()["proto"]).hexdigest()}


def segment_runs(segments: list[Union[str, int]], tokenizer) -> list[int]:
    """A document's layout for the packer: text token count per text segment, -1 per image
    (an `Answer` counts its closing `</s>` too)."""
    return [-1 if isinstance(s, int) else tokenizer.count(s) + isinstance(s, Answer)
            for s in segments]


def _save_token_index(folder: Path, runs: list[list[int]]) -> None:
    offsets = np.zeros(len(runs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in runs])
    flat = np.fromiter((n for r in runs for n in r), dtype=np.int32, count=int(offsets[-1]))
    np.save(folder / "index" / "segments.npy", flat)
    np.save(folder / "index" / "segment_offsets.npy", offsets)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_dataset(folder: Union[str, Path], kind: str, *, tokenizer=None,
                  progress: bool = False) -> dict:
    """Scan DIR/*.tar (name order) and write index/ and manifest.json; returns the manifest."""
    folder = Path(folder)
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise DatasetError(f"{folder}: no .tar shards")
    rows, images, runs = [], [], []
    shard_entries, bad = [], collections.Counter()
    text_chars = text_tokens = 0
    bar = _progress(progress, None, f"indexing {folder.name}")
    for shard_no, path in enumerate(shards):
        groups, cut = _scan_tar(path)
        with open(path, "rb") as f:
            for key, members in groups:
                if len(key.encode()) > KEY_BYTES:
                    raise DatasetError(f"{path}: key {key!r} is longer than {KEY_BYTES} bytes")
                row = dict(shard=shard_no, key=key.encode(), json_offset=-1, json_size=0,
                           image_start=len(images), num_images=0, text_chars=0,
                           text_tokens=-1 if tokenizer is None else 0, bad=0, bad_member=-1)
                reason, member, layout = _index_sample(kind, key, members, f, cut == key, row,
                                                       images, tokenizer)
                runs.append([] if reason else layout)
                if reason:
                    row["bad"], row["bad_member"] = BAD_REASONS.index(reason) + 1, member
                    bad[reason] += 1
                else:
                    text_chars += row["text_chars"]
                    text_tokens += max(row["text_tokens"], 0)
                rows.append(tuple(row[name] for name in SAMPLE_DTYPE.names))
                bar.update(1)
        shard_entries.append({"name": path.name, "samples": len(groups),
                              "bytes": path.stat().st_size, "sha256": _sha256(path)})
    bar.close()
    (folder / "index").mkdir(exist_ok=True)
    np.save(folder / "index" / "samples.npy", np.array(rows, dtype=SAMPLE_DTYPE))
    np.save(folder / "index" / "images.npy", np.array(images, dtype=IMAGE_DTYPE))
    index = {"samples": "index/samples.npy", "images": "index/images.npy"}
    for stale in ("segments.npy", "segment_offsets.npy"):
        (folder / "index" / stale).unlink(missing_ok=True)
    if tokenizer is not None:
        _save_token_index(folder, runs)
        index.update(segments="index/segments.npy", segment_offsets="index/segment_offsets.npy")
    manifest = {
        "format": FORMAT, "kind": kind, "shards": shard_entries,
        "samples": len(rows), "bytes": sum(s["bytes"] for s in shard_entries),
        "images": len(images), "bad": dict(sorted(bad.items())),
        "text_chars": text_chars, "text_tokens": None if tokenizer is None else text_tokens,
        "tokenizer": None if tokenizer is None else tokenizer_record(tokenizer),
        "index": index,
        "image_exts": list(IMAGE_EXTS), "bad_reasons": list(BAD_REASONS),
    }
    _write_manifest(folder, manifest)
    return manifest


def _write_manifest(folder: Path, manifest: dict) -> None:
    tmp = folder / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(folder / "manifest.json")  # atomic: a reader never sees half a manifest


def _index_sample(kind: str, key: str, members: dict, f, truncated: bool, row: dict,
                  images: list, tokenizer) -> tuple[Optional[str], int, list[int]]:
    """(bad reason or None, bad member, the packer's layout: `segment_runs`)."""
    if "json" not in members:
        return ("truncated", -1, []) if truncated else ("bad_json", -1, [])
    row["json_offset"], row["json_size"] = members["json"]
    if truncated and row["json_offset"] + row["json_size"] > _file_size(f):
        return "truncated", -1, []
    try:
        segments, names = parse_sample_json(kind, _read_at(f, *members["json"]))
    except ValueError as e:
        return e.args[0], -1, []
    if kind == "caption":
        found = [s for s in members if s in IMAGE_EXTS or normalize_ext(s) in IMAGE_EXTS
                 and "." not in s]
        names = found[:1] if found else ["jpg"]
        if not found:
            images.append((-1, 0, 0))
            row["num_images"] = 1
            return "missing_image", 0, []
    texts = [s for s in segments if isinstance(s, str)]
    row["text_chars"] = sum(len(t) for t in texts)
    layout = []
    if tokenizer is not None:
        layout = segment_runs(segments, tokenizer)
        row["text_tokens"] = sum(n for n in layout if n >= 0)
    row["num_images"] = len(names)
    problem: tuple[Optional[str], int] = (None, -1)
    for j, name in enumerate(names):
        offset, size = members.get(name, (-1, 0))
        images.append((offset, size, IMAGE_EXTS.index(normalize_ext(name))))
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


def _file_size(f) -> int:
    return os.fstat(f.fileno()).st_size


# ------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------


class IndexFile:
    """Point reads of one `.npy` index file with `os.pread`: what the loader looks up per
    sample (a row, its images, its segments). A memory map would do it too, but every page it
    touches stays mapped (on current kernels whole page-cache folios of up to 2 MB), so a
    long run's RSS would grow towards the index size; reads map nothing."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, self.dtype = read_header(f)
            self.start = f.tell()
        if fortran or len(shape) != 1:
            raise DatasetError(f"{path}: not a one-dimensional index")
        self.path, self.length = path, int(shape[0])
        self._fd: Optional[int] = None
        self._pid = -1

    def __len__(self) -> int:
        return self.length

    def get(self, start: int, count: int = 1) -> np.ndarray:
        """Records [start, start + count)."""
        size = self.dtype.itemsize
        data = self.raw(start, count)
        if len(data) != count * size:
            raise DatasetError(f"{self.path}: records {start}..{start + count} beyond its end")
        return np.frombuffer(data, self.dtype, count)

    def raw(self, start: int, count: int, field_offset: int = 0, size: int = 0) -> bytes:
        """The bytes of records [start, start + count), or of `size` bytes at `field_offset`
        inside record `start` (one field: no array built, for the per-document lookups)."""
        if self._fd is None or self._pid != os.getpid():  # per process (forked workers too)
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        item = self.dtype.itemsize
        return os.pread(self._fd, size or count * item, self.start + start * item + field_offset)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None


class ShardDataset:
    """Random access to one prepared dataset folder. Picklable; file handles are per process."""

    def __init__(self, folder: Union[str, Path], verify: bool = False) -> None:
        self.folder = Path(folder)
        mpath = self.folder / "manifest.json"
        try:
            self.manifest = json.loads(mpath.read_text())
        except OSError as e:
            raise DatasetError(f"{mpath}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{mpath}: not valid JSON ({e})") from None
        m = self.manifest
        try:
            self.kind: str = m["kind"]
            self.shards: list[str] = [s["name"] for s in m["shards"]]
            sizes = [(s["name"], int(s["bytes"]), s["sha256"], int(s["samples"]))
                     for s in m["shards"]]
        except (KeyError, TypeError, ValueError) as e:
            raise DatasetError(f"{mpath}: field {e} missing or malformed") from None
        if m.get("format") != FORMAT or self.kind not in KINDS:
            raise DatasetError(f"{mpath}: format {m.get('format')!r} / kind {self.kind!r} "
                               f"not supported (format {FORMAT}, kinds {KINDS})")
        for name, size, sha, _ in sizes:
            path = self.folder / name
            try:
                actual = path.stat().st_size
                with open(path, "rb") as f:
                    f.read(512)
            except OSError as e:
                raise DatasetError(f"{path}: cannot open shard ({e.strerror})") from None
            if actual != size:
                raise DatasetError(f"{path}: {actual} bytes but manifest.json says {size} "
                                   "(truncated or rewritten shard; re-run prepare_data)")
            if verify and _sha256(path) != sha:
                raise DatasetError(f"{path}: sha256 differs from manifest.json")
        try:
            self.samples = np.load(self.folder / "index" / "samples.npy", mmap_mode="r")
            self.images = np.load(self.folder / "index" / "images.npy", mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.folder / 'index'}: cannot load index ({e})") from None
        self._open_index()
        # Samples are in shard order: checking each shard's first and last row is O(shards),
        # where counting the shard column would page the whole index in (GBs at 10^9 samples).
        ends = np.cumsum([s[3] for s in sizes])
        consistent = len(self.samples) == m.get("samples") == (int(ends[-1]) if sizes else 0)
        for shard, (end, count) in enumerate(zip(ends.tolist(), (s[3] for s in sizes))):
            if consistent and count:
                consistent = int(self._rows.get(end - count)[0]["shard"]) == shard == \
                    int(self._rows.get(end - 1)[0]["shard"])
        if not consistent:
            raise DatasetError(f"{self.folder}: index does not match manifest.json sample "
                               "counts (re-run prepare_data)")
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _open_index(self) -> None:
        """Per-sample lookups go through `IndexFile` (point reads; nothing per sample stays in
        RAM or mapped); `samples` / `images` stay memory maps for whole-column tools."""
        index = self.folder / "index"
        self._rows = IndexFile(index / "samples.npy")
        self._images = IndexFile(index / "images.npy")
        self.segments = self.segment_offsets = None
        if "segments" not in self.manifest.get("index", {}):
            return
        try:
            self.segments = IndexFile(index / "segments.npy")
            self.segment_offsets = IndexFile(index / "segment_offsets.npy")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{index}: cannot load the token index ({e}); "
                               "re-run tools/index_tokens.py") from None
        if len(self.segment_offsets) != len(self.samples) + 1:
            raise DatasetError(f"{self.folder / 'index'}: segment_offsets.npy does not match "
                               "samples.npy; re-run tools/index_tokens.py")

    @property
    def tokenizer(self) -> Optional[dict]:
        """The manifest's record of the tokenizer its token counts come from (None: none)."""
        return self.manifest.get("tokenizer") if self.segments is not None else None

    def layout(self, i: int) -> list[int]:
        """Sample i's layout from the index alone (`segment_runs`: text token count per text
        segment, -1 per image); raises BadSample like `read`, without touching the shard."""
        # Called for every document of the global batch on every rank: raw reads, no arrays.
        if self._rows.raw(i, 1, _BAD_OFFSET, 1)[0]:
            row = self._rows.get(i)[0]
            raise BadSample(self.shards[int(row["shard"])],
                            self.member_name(i, int(row["bad_member"])),
                            BAD_REASONS[int(row["bad"]) - 1])
        start, end = struct.unpack("<2q", self.segment_offsets.raw(i, 2))
        raw = self.segments.raw(start, end - start)
        return array.array("i", raw).tolist() if _NATIVE_INT32 else \
            np.frombuffer(raw, "<i4").tolist()

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict:
        return {"folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        # Skip re-verification: the parent process already opened and checked the dataset.
        self.__dict__.update(_reopen(state["folder"]).__dict__)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked worker: never share a file offset with parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.folder / self.shards[shard], "rb")
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        for index in (self._rows, self._images, self.segments, self.segment_offsets):
            if index is not None:
                index.close()

    def member_name(self, i: int, member: int) -> str:
        """Tar member name of sample i's json (member=-1) or image `member`."""
        row = self._rows.get(i)[0]
        key = row["key"].decode()
        if member < 0:
            return f"{key}.json"
        ext = IMAGE_EXTS[int(self._images.get(int(row["image_start"]) + member)[0]["ext"])]
        return f"{key}.{ext}" if self.kind == "caption" else f"{key}.img{member}.{ext}"

    def bad_reason(self, i: int) -> Optional[str]:
        code = int(self._rows.get(i)[0]["bad"])
        return BAD_REASONS[code - 1] if code else None

    def read(self, i: int, images: bool = True) -> Sample:
        """Sample i (0 <= i < len). Raises BadSample; `images=False` skips image bytes."""
        if not 0 <= i < len(self):
            raise IndexError(f"{self.folder}: sample {i} out of range (0..{len(self) - 1})")
        row = self._rows.get(i)[0]
        shard_no = int(row["shard"])
        shard = self.shards[shard_no]
        if row["bad"]:
            raise BadSample(shard, self.member_name(i, int(row["bad_member"])),
                            BAD_REASONS[int(row["bad"]) - 1])
        f = self._file(shard_no)
        raw = _read_at(f, int(row["json_offset"]), int(row["json_size"]))
        if len(raw) != row["json_size"]:
            raise BadSample(shard, self.member_name(i, -1), "truncated")
        try:
            segments, _ = parse_sample_json(self.kind, raw)
        except ValueError as e:
            raise BadSample(shard, self.member_name(i, -1), e.args[0], e.args[1]) from None
        start, count = int(row["image_start"]), int(row["num_images"])
        table = self._images.get(start, count)
        exts = [IMAGE_EXTS[int(e)] for e in table["ext"]]
        data: list[bytes] = []
        for j, (offset, size) in enumerate(zip(table["offset"], table["size"])):
            if offset < 0:
                raise BadSample(shard, self.member_name(i, j), "missing_image")
            if size == 0:
                raise BadSample(shard, self.member_name(i, j), "zero_byte_image")
            if images:
                blob = _read_at(f, int(offset), int(size))
                if len(blob) != size:
                    raise BadSample(shard, self.member_name(i, j), "truncated")
                data.append(blob)
        return Sample(key=row["key"].decode(), kind=self.kind, segments=segments, images=data,
                      image_exts=exts, index=i)

    def iter_good(self, indices: Optional[Iterable[int]] = None, images: bool = True,
                  skips: Optional[SkipCounter] = None) -> Iterator[Sample]:
        """Read samples in order, skipping (and counting) bad ones."""
        skips = skips if skips is not None else SkipCounter(log=None)
        for i in (range(len(self)) if indices is None else indices):
            try:
                yield self.read(i, images=images)
            except BadSample as e:
                skips.add(e)


def _reopen(folder: Path) -> ShardDataset:
    ds = ShardDataset.__new__(ShardDataset)
    ds.folder = Path(folder)
    ds.manifest = json.loads((ds.folder / "manifest.json").read_text())
    ds.kind = ds.manifest["kind"]
    ds.shards = [s["name"] for s in ds.manifest["shards"]]
    ds.samples = np.load(ds.folder / "index" / "samples.npy", mmap_mode="r")
    ds.images = np.load(ds.folder / "index" / "images.npy", mmap_mode="r")
    ds._open_index()
    ds._files, ds._pid = {}, os.getpid()
    return ds


def _shard_runs(args: tuple) -> tuple[list[list[int]], list[int]]:
    """One shard's samples: (layout per sample, text tokens per sample); -1 tokens if bad."""
    folder, shard, tokenizer = args
    ds = _reopen(Path(folder))
    runs, tokens = [], []
    for i in np.flatnonzero(ds.samples["shard"] == shard).tolist():
        try:
            layout = segment_runs(ds.read(i, images=False).segments, tokenizer)
        except BadSample:
            layout, count = [], -1
        else:
            count = sum(n for n in layout if n >= 0)
        runs.append(layout)
        tokens.append(count)
    ds.close()
    return runs, tokens


def add_token_index(folder: Union[str, Path], tokenizer, *, workers: int = 1,
                    progress: bool = False) -> dict:
    """Write index/segments.npy + segment_offsets.npy (and the text token counts) for
    `tokenizer` into a prepared dataset, reading each sample's json once, shards in parallel.
    Returns the updated manifest."""
    import multiprocessing

    folder = Path(folder)
    ds = open_dataset(folder)
    jobs = [(str(folder), shard, tokenizer) for shard in range(len(ds.shards))]
    bar = _progress(progress, len(jobs), f"token index {folder.name}")
    results: list = []
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_shard_runs, jobs):  # in shard order
                results.append(result)
                bar.update(1)
    else:
        for job in jobs:
            results.append(_shard_runs(job))
            bar.update(1)
    bar.close()
    runs = [r for shard_runs, _ in results for r in shard_runs]
    tokens = np.array([t for _, shard_tokens in results for t in shard_tokens], dtype=np.int64)
    samples = np.array(ds.samples)  # samples are in shard order, so this lines up
    good = samples["bad"] == 0
    samples["text_tokens"] = np.where(good, tokens, -1)
    ds.close()
    np.save(folder / "index" / "samples.npy", samples)
    _save_token_index(folder, runs)
    manifest = dict(ds.manifest)
    manifest["text_tokens"] = int(samples["text_tokens"][good].sum())
    manifest["tokenizer"] = tokenizer_record(tokenizer)
    manifest["index"] = {**manifest.get("index", {}), "segments": "index/segments.npy",
                         "segment_offsets": "index/segment_offsets.npy"}
    _write_manifest(folder, manifest)
    return manifest


def open_dataset(folder: Union[str, Path], verify: bool = False) -> ShardDataset:
    """Open a prepared dataset folder. Checks every shard opens and matches the manifest's
    size (and sha256 with verify=True); raises DatasetError naming the first that does not."""
    return ShardDataset(folder, verify=verify)

"""Reading a prepared dataset folder: `open_dataset` checks every shard against the manifest
and returns a `ShardDataset`, random access to sample i (`read`, `iter_good`) and to its
packer layout from the token index (`layout`) by point reads of the index files (`IndexFile`)
and seeks into the shards; picklable, with file handles per process.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

import numpy as np

from mm1_megatron.data.shard_schema import (BAD_REASONS, FORMAT, IMAGE_EXTS, KINDS,
                                            SAMPLE_DTYPE, BadSample, DatasetError, Sample,
                                            SkipCounter, parse_text_member)

_BAD_OFFSET = SAMPLE_DTYPE.fields["bad"][1]
_REDO = "re-run mm1-prepare-data"  # what a changed or unreadable dataset needs
_NATIVE_INT32 = array.array("i").itemsize == 4 and sys.byteorder == "little"  # = "<i4"


def read_at(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        self._locate(m)
        for entry, (name, size, sha, _) in zip(m["shards"], sizes):
            path = self.root / name
            try:
                stat = path.stat()
                with open(path, "rb") as f:
                    f.read(512)
            except OSError as e:
                raise DatasetError(f"{path}: cannot open shard ({e.strerror}); "
                                   f"{_REDO}") from None
            if stat.st_size != size:
                raise DatasetError(f"{path}: {stat.st_size} bytes but manifest.json says {size} "
                                   f"(truncated or rewritten shard; {_REDO})")
            # In place, the source's own files: size and mtime, never a hash of terabytes.
            if "mtime_ns" in entry and stat.st_mtime_ns != int(entry["mtime_ns"]):
                raise DatasetError(f"{path}: modified since it was indexed (mtime_ns "
                                   f"{stat.st_mtime_ns}, manifest.json says {entry['mtime_ns']}:"
                                   f" rewritten shard; {_REDO})")
            if verify and sha is not None and file_sha256(path) != sha:
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
                               f"counts ({_REDO})")
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def _locate(self, manifest: dict) -> None:
        """Where the shards are: this folder, or (a source indexed in place, manifest
        "source") the source's root, and how a sample's text member reads."""
        source = manifest.get("source")
        self.root = Path(source["root"]) if source else self.folder
        self.text_member: Optional[dict] = source.get("text") if source else None

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
        self.__dict__.update(reopen_dataset(state["folder"]).__dict__)

    def _file(self, shard: int):
        if self._pid != os.getpid():  # forked worker: never share a file offset with parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / self.shards[shard], "rb")
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        for index in (self._rows, self._images, self.segments, self.segment_offsets):
            if index is not None:
                index.close()

    def member_name(self, i: int, member: int) -> str:
        """Tar member name of sample i's json (member=-1) or image `member` (in place, an
        interleaved document's image as its number, type and frame: the index keeps no name)."""
        row = self._rows.get(i)[0]
        key = row["key"].decode()
        if member < 0:
            return f"{key}.{(self.text_member or {}).get('member', 'json')}"
        image = self._images.get(int(row["image_start"]) + member)[0]
        ext = IMAGE_EXTS[int(image["ext"])]
        if self.kind == "caption":
            return f"{key}.{ext}"
        if self.text_member is None:
            return f"{key}.img{member}.{ext}"
        frame = int(image["frame"]) if "frame" in image.dtype.names else 0
        return f"{key} image {member} ({ext}{f' frame {frame}' if frame else ''})"

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
        raw = read_at(f, int(row["json_offset"]), int(row["json_size"]))
        if len(raw) != row["json_size"]:
            raise BadSample(shard, self.member_name(i, -1), "truncated")
        try:
            segments = parse_text_member(self.kind, raw, self.text_member)[0]
        except ValueError as e:
            raise BadSample(shard, self.member_name(i, -1), e.args[0], e.args[1]) from None
        start, count = int(row["image_start"]), int(row["num_images"])
        table = self._images.get(start, count)
        exts = [IMAGE_EXTS[int(e)] for e in table["ext"]]
        frames = table["frame"].tolist() if "frame" in table.dtype.names else [0] * count
        data: list[bytes] = []
        members: dict[int, bytes] = {}  # offset -> bytes: the pages of one member read once
        for j, (offset, size) in enumerate(zip(table["offset"].tolist(),
                                               table["size"].tolist())):
            if offset < 0:
                raise BadSample(shard, self.member_name(i, j), "missing_image")
            if size == 0:
                raise BadSample(shard, self.member_name(i, j), "zero_byte_image")
            if images:
                blob = members.get(offset) or read_at(f, offset, size)
                if len(blob) != size:
                    raise BadSample(shard, self.member_name(i, j), "truncated")
                members[offset] = blob
                data.append(tiff_page(blob, frames[j], shard, self.member_name(i, j))
                            if frames[j] else blob)
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


def tiff_page(data: bytes, page: int, shard: str, member: str) -> bytes:
    """Page `page` of a multi-page TIFF as a TIFF of its own (uncompressed: no encode cost
    worth the name), for the decoder, which reads a file's first page; page 0 needs no copy.
    A page the file lacks raises BadSample(undecodable_image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(page)
            im.load()
            page_image = im if im.mode in ("RGB", "L") else im.convert("RGB")
            out = io.BytesIO()
            page_image.save(out, format="TIFF")
    except (EOFError, OSError, ValueError) as e:
        raise BadSample(shard, member, "undecodable_image",
                        f"page {page}: {type(e).__name__}") from None
    return out.getvalue()


def reopen_dataset(folder: Path) -> ShardDataset:
    ds = ShardDataset.__new__(ShardDataset)
    ds.folder = Path(folder)
    ds.manifest = json.loads((ds.folder / "manifest.json").read_text())
    ds.kind = ds.manifest["kind"]
    ds.shards = [s["name"] for s in ds.manifest["shards"]]
    ds._locate(ds.manifest)
    ds.samples = np.load(ds.folder / "index" / "samples.npy", mmap_mode="r")
    ds.images = np.load(ds.folder / "index" / "images.npy", mmap_mode="r")
    ds._open_index()
    ds._files, ds._pid = {}, os.getpid()
    return ds


def open_dataset(folder: Union[str, Path], verify: bool = False) -> ShardDataset:
    """Open a prepared dataset folder. Checks every shard opens and matches the manifest's
    size (and sha256 with verify=True); raises DatasetError naming the first that does not."""
    return ShardDataset(folder, verify=verify)

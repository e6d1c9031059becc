"""The webdataset shard format every other shard module shares: the sample kinds, image
extensions and bad-sample reasons, the index's record dtypes, the errors (`BadSample`,
`DatasetError`), the `Sample` a reader returns, the `SkipCounter` that counts skipped samples,
and the validation of one sample's json (`parse_sample_json`), used alike by the writer
(`shard_writer`), the indexer (`shard_index`) and the reader (`shard_reader`).

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

import collections
import json
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import numpy as np

from mm1_megatron.data.prompt_format import Turn, chat_segments

KINDS = ("caption", "interleaved", "text", "sft")
IMAGE_EXTS = ("jpg", "png", "webp", "bmp", "gif", "tiff")
_EXT_ALIASES = {"jpeg": "jpg", "tif": "tiff"}
# Reason codes; 0 is "good". "undecodable_image" is raised by the image decoder (images.py),
# listed here so every skip is counted under one vocabulary.
# "misaligned": an interleaved document's `texts` / `images` lists are not aligned (OBELICS,
# MINT-1T and Energon's interleaved layout: exactly one non-null per position). Appended only:
# a code's number is stored in every index.
BAD_REASONS = ("truncated", "bad_json", "missing_image", "zero_byte_image", "empty_text",
               "images_only", "undecodable_image", "missing_text", "misaligned")
# Counted in a manifest's "bad" when a source indexed in place has gaps, with no index row
# (there is no sample to number): a download img2dataset recorded as failed (its parquet /
# stats hold it, the tar has no members) and a shard number missing from a numbered series.
SOURCE_GAPS = ("failed_download", "missing_shard")
FORMAT = 1
KEY_BYTES = 48
# How an interleaved document indexed in place reads (manifest "source.text"): KEY.json's
# aligned `texts` / `images` lists, as MINT-1T and Energon's interleaved layout write them.
ALIGNED_LISTS = {"member": "json", "texts": "texts", "images": "images"}

SAMPLE_DTYPE = np.dtype([
    ("shard", "<i4"), ("key", f"S{KEY_BYTES}"), ("json_offset", "<i8"), ("json_size", "<i8"),
    ("image_start", "<i8"), ("num_images", "<i4"), ("text_chars", "<i8"),
    ("text_tokens", "<i8"), ("bad", "u1"), ("bad_member", "<i4"),
])
# offset -1: the json names the image but the tar lacks the member. `frame`: the image is that
# frame of a multi-page member (MINT-1T's PDF documents hold all their images as the pages of one
# KEY.tiff); 0 for a plain image. Indexes written before `frame` existed read as frame 0.
IMAGE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<i8"), ("ext", "u1"), ("frame", "<i4")])


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


def parse_text_member(kind: str, raw: bytes, text: Optional[dict]
                      ) -> tuple[list[Union[str, int]], list]:
    """A sample's (segments, image names) from its text member. `text` None: our schema's json
    (`parse_sample_json`). A source indexed in place (manifest "source.text"):
    {"member": "txt"} the member is the text itself (img2dataset's KEY.txt);
    {"member": "json", "field": F} a JSON object whose field F holds it (caption, text);
    {"member": "json", "texts": T, "images": I} an interleaved document as aligned lists
    (`aligned_segments`; MINT-1T, Energon's interleaved layout), its image names the list's
    non-null entries. Raises ValueError(reason, detail)."""
    if text is None:
        return parse_sample_json(kind, raw)
    try:
        value = raw.decode("utf-8")
        if text["member"] == "json":
            obj = json.loads(value)
            if "texts" in text:
                if not isinstance(obj, dict):
                    raise ValueError("bad_json", "not an object")
                segments, names = aligned_segments(obj.get(text["texts"]),
                                                   obj.get(text["images"]))
                if not all(isinstance(n, str) and n for n in names):
                    raise ValueError("bad_json", f"an entry of {text['images']!r} is not a name")
                return segments, names
            value = obj.get(text["field"]) if isinstance(obj, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError("bad_json", str(e).split(":")[0]) from None
    if not isinstance(value, str):
        raise ValueError("missing_text", f"field {text.get('field')!r} missing or not a string")
    if not value.strip():
        raise ValueError("empty_text", text["member"])
    return ([0, value] if kind == "caption" else [value]), []


def aligned_segments(texts: object, images: object) -> tuple[list[Union[str, int]], list]:
    """An interleaved document as OBELICS / OmniCorpus, MINT-1T and Energon's interleaved layout
    write it: `texts` and `images` aligned lists, exactly one non-null per position, in document
    order -> (segments, the non-null `images` entries in order). Blank texts are dropped.
    Raises ValueError(reason, detail): bad_json, misaligned, images_only, empty_text."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise ValueError("bad_json", "texts / images are not lists")
    if len(texts) != len(images):
        raise ValueError("misaligned", f"{len(texts)} texts, {len(images)} images")
    segments: list[Union[str, int]] = []
    found: list = []
    for n, (text, image) in enumerate(zip(texts, images)):
        if (text is None) == (image is None):
            raise ValueError("misaligned", f"position {n}: "
                             f"{'both' if text is not None else 'neither'} of text and image")
        if text is None:
            found.append(image)
            segments.append(len(found) - 1)
        elif not isinstance(text, str):
            raise ValueError("bad_json", f"texts[{n}] is not a string")
        elif text.strip():
            segments.append(text)
    if not any(isinstance(s, str) for s in segments):
        raise ValueError("images_only" if found else "empty_text", "no text segment")
    return segments, found


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

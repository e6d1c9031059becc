"""JSONL (or a JSON array) + image files: records converted into our shards.

Input: one JSON object per line (UTF-8; blank lines ignored); image paths are relative to
--images-root (or absolute); image type from the file extension (jpg/jpeg, png, webp, bmp,
gif, tif/tiff). An optional "id" (string or number) is kept in the shard's json.

    caption      {"image": "cats/001.jpg", "text": "A cat asleep on a sofa."}
    interleaved  {"segments": [{"text": "Intro ..."}, {"image": "a.jpg"}, {"text": "..."}]}
    text         {"text": "A whole document ..."}
    sft          LLaVA's conversation format: {"id": ..., "image": "a.jpg" | ["a.jpg", ...]
                 (optional), "conversations": [{"from": "human", "value": "<image>\\nWhat is
                 this?"}, {"from": "gpt", "value": "A cat."}, ...]}; one "<image>" per image,
                 in order, in human turns only; an optional "system" turn first, then human /
                 gpt alternating, ending with gpt. A SOURCE may also be a JSON array of such
                 records (LLaVA ships llava_v1_5_mix665k.json that way). Text-only
                 conversations are fine.

--caption-field / --text-field name the field holding a caption / a text document ("text").

Compressed files are read as streams, line by line (memory bounded whatever their size):
`.jsonl.gz` / `.json.gz` (gzip) and `.jsonl.zst` / `.jsonl.zstd` (zstandard: DCLM's shards,
`{"text": ..., "url": ...}` per line). A compressed file cut short yields its complete lines,
then one `truncated` skip.
A bad record (not UTF-8, invalid JSON, missing/empty field, missing or zero-byte image file,
unsupported image type, a document with only images) is skipped as a BadSample(FILE, "line N",
reason, detail). Image bytes are copied as they are (no re-encoding); undecodable images are
caught later by the image decoder.

Matches `sources.Source` by shape (this module does not import the registry that lists it).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

from mm1_megatron.data.prompt_format import llava_turns
from mm1_megatron.data.shard_schema import IMAGE_EXTS, BadSample, normalize_ext
from mm1_megatron.data.shard_writer import RawSample
from mm1_megatron.data.sources.urls import UrlPath, source_path

SUFFIXES = (".jsonl", ".json")
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def is_record_file(path: Path) -> bool:
    """A .jsonl / .json file, plain or compressed (.jsonl.gz, .json.gz, .jsonl.zst)."""
    suffixes = path.suffixes[-2:]
    if suffixes and suffixes[-1] in COMPRESSED:
        return len(suffixes) == 2 and suffixes[0] in SUFFIXES
    return path.suffix in SUFFIXES


def open_stream(path: Union[str, Path, UrlPath]):
    """The file's bytes, decompressed as a stream where its name says so (a local path or an
    fsspec URL's `UrlPath`: both open with `.open("rb")`)."""
    path = source_path(path)
    kind = COMPRESSED.get(path.suffix)
    if kind == "gzip":
        raw = path.open("rb")
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
        stream.myfileobj = raw  # closed with the stream, as gzip.open(filename) does
        return stream
    if kind == "zstd":
        try:
            import zstandard  # only for .zst sources (the `data` extra)
        except ImportError:
            raise ValueError(f"{path}: reading .zst needs zstandard: pip install "
                             "'mm1_megatron[data]'") from None
        raw = path.open("rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw,
                                                                           closefd=True))
    return path.open("rb")


# What a cut-short compressed stream raises while being read.
_CUT = (EOFError, gzip.BadGzipFile, OSError)
# How the one-line "no usable samples" error names each skip reason ({kind}, {root}: --kind,
# --images-root): in terms of the options that most often cause it.
REASON_TEXT = {
    "not_utf8": "not UTF-8",
    "bad_json": "bad JSON or fields not those of --kind {kind}",
    "missing_image": "missing image under --images-root {root}",
    "zero_byte_image": "zero-byte image",
    "unsupported_image": "unsupported image type",
    "empty_text": "empty text",
    "images_only": "images but no text",
    "bad_conversation": "conversations not [system], human / gpt alternating, ending with gpt",
    "image_mismatch": "<image> markers not matching the images",
    "truncated": "compressed file cut short",
}


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def checked_utf8(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
        raise BadRecord("not_utf8", f"{where}: \\u{ord(value[e.start]):04x} is not a character "
                               "(lone surrogate escape)") from None
    return value


def read_image(root: Path, ref: object, where: str) -> tuple[str, bytes]:
    if not isinstance(ref, str) or not ref:
        raise BadRecord("bad_json", f"{where} must be a non-empty path string")
    ext = normalize_ext(ref)
    if ext not in IMAGE_EXTS:
        raise BadRecord("unsupported_image", f"{where}={ref!r}: extension not in {IMAGE_EXTS}")
    path = root / ref
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRecord("missing_image", f"{where}={ref!r}: {e.strerror}") from None
    except ValueError as e:  # embedded NUL, unencodable name
        raise BadRecord("missing_image", f"{where}={ref!r}: {e}") from None
    if not data:
        raise BadRecord("zero_byte_image", f"{where}={ref!r}")
    return ext, data


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise BadRecord("bad_json", f"{where} missing or not a string")
    if not value.strip():
        raise BadRecord("empty_text", where)
    return checked_utf8(value, where)


def parse_conversation(obj: dict, images_root: Path, sid: Optional[str]) -> RawSample:
    """A LLaVA-format record -> an sft RawSample (turns; images in marker order)."""
    refs = obj.get("image")
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    try:
        turns = llava_turns(obj.get("conversations"), len(refs))
    except ValueError as err:
        raise BadRecord(*err.args) from None
    for n, turn in enumerate(obj["conversations"]):
        checked_utf8(turn["value"], f"conversations[{n}].value")
    images = [read_image(images_root, ref, f"image[{j}]") for j, ref in enumerate(refs)]
    return RawSample([], images, sid, turns=turns)


def parse_record(kind: str, obj: object, images_root: Path, caption_field: str = "text",
                 text_field: str = "text") -> RawSample:
    """One decoded record -> RawSample; raises BadRecord(reason, detail)."""
    if not isinstance(obj, dict):
        raise BadRecord("bad_json", "line is not a JSON object")
    sid = obj.get("id")
    sid = None if sid is None else checked_utf8(str(sid), "id")
    if kind == "sft":
        return parse_conversation(obj, images_root, sid)
    if kind == "caption":
        img = read_image(images_root, obj.get("image"), "image")
        return RawSample([0, _text(obj.get(caption_field), caption_field)], [img], sid)
    if kind == "text":
        return RawSample([_text(obj.get(text_field), text_field)], [], sid)
    segs = obj.get("segments")
    if not isinstance(segs, list) or not segs:
        raise BadRecord("bad_json", "segments missing or not a non-empty list")
    out: list[Union[str, int]] = []
    images: list[tuple[str, bytes]] = []
    for n, seg in enumerate(segs):
        if isinstance(seg, dict) and set(seg) == {"text"}:
            out.append(_text(seg["text"], f"segments[{n}].text"))
        elif isinstance(seg, dict) and set(seg) == {"image"}:
            images.append(read_image(images_root, seg["image"], f"segments[{n}].image"))
            out.append(len(images) - 1)
        else:
            raise BadRecord("bad_json", f"segments[{n}] is not {{'text': ...}} or {{'image': ...}}")
    if not any(isinstance(s, str) for s in out):
        raise BadRecord("images_only", "no text segment")
    return RawSample(out, images, sid)


def _decode(raw: bytes, lineno: int) -> str:
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not "
                               "valid UTF-8") from None


def _is_json_array(path: Union[str, Path]) -> bool:
    """Whether the first significant byte is `[` (read in small pieces: a compressed file cut
    short still shows its beginning)."""
    try:
        with open_stream(path) as f:
            while piece := f.read(64):
                head = piece.lstrip(b"\xef\xbb\xbf \t\r\n")
                if head:
                    return head.startswith(b"[")
    except _CUT as e:
        raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    return False


def _records(path: Union[str, Path]) -> Iterator[tuple[str, object]]:
    """(where, the decoded record, or the BadRecord it is) per input record: JSONL lines, or
    the items of a JSON array."""
    if _is_json_array(path):
        try:
            with open_stream(path) as f:
                items = json.loads(f.read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a JSON array of records ({e})") from None
        yield from ((f"record {n}", obj) for n, obj in enumerate(items, 1))
        return
    lineno = 0
    with open_stream(path) as f:
        lines = iter(f)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                return
            except _CUT as e:  # a compressed file cut short: its complete lines were read
                yield f"line {lineno + 1}", BadRecord(
                    "truncated", f"the compressed stream ends early ({e})")
                return
            lineno += 1
            if raw.strip():
                yield f"line {lineno}", _decoded(raw, lineno)


def _decoded(raw: bytes, lineno: int) -> object:
    try:
        return json.loads(_decode(raw, lineno))
    except BadRecord as e:
        return e
    except json.JSONDecodeError as e:
        return BadRecord("bad_json", str(e))


def record_samples(paths: Sequence[Path], parse: Callable[[object], RawSample]
                   ) -> Iterator[Union[RawSample, BadSample]]:
    """Each record of the files of `paths`, turned into a sample by `parse` (which raises
    BadRecord for one it cannot use), or the BadSample(FILE, "line N", reason, detail) a
    record is. What the formats built on JSON records (jsonl, mmc4) read with."""
    for path in files(paths):
        for where, record in _records(path):
            try:
                if isinstance(record, BadRecord):
                    raise record
                yield parse(record)
            except BadRecord as e:
                yield BadSample(str(path), where, e.reason, e.detail)


def _count_records(path: Union[str, Path]) -> Optional[int]:
    if _is_json_array(path):
        return None  # unknown until parsed; the progress bar runs without a total
    if source_path(path).suffix in COMPRESSED:
        return None  # counting would decompress the whole file once more
    with open_stream(path) as f:
        return sum(1 for line in f if line.strip())


def files(paths: Sequence[Path]) -> list[Path]:
    """The record files: each file as named, each folder's .jsonl / .json files (sorted,
    subfolders included)."""
    found = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if is_record_file(p) and p.is_file())
        else:
            found.append(path)
    return found


class JsonlSource:
    """The `jsonl` format (see the module docstring)."""

    name = "jsonl"
    in_place = False
    record = "line"
    reason_text = REASON_TEXT

    def detect(self, path: Path) -> bool:
        if path.is_dir():  # a folder of tars holding stray .json (img2dataset's stats) is not
            return next(path.glob("*.tar"), None) is None and \
                any(is_record_file(p) for p in path.rglob("*"))
        return is_record_file(path)

    def count(self, paths: Sequence[Path]) -> Optional[int]:
        counts = [_count_records(p) for p in files(paths)]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]

    def files(self, paths: Sequence[Path]) -> list[Path]:
        return files(paths)

    def check(self, paths: Sequence[Path], kind: str) -> None:
        """Every kind reads from JSON lines: nothing to refuse before reading them."""

    def samples(self, paths: Sequence[Path], kind: str, *, images_root: Path,
                caption_field: str = "text", text_field: str = "text"
                ) -> Iterator[Union[RawSample, BadSample]]:
        return record_samples(paths, lambda obj: parse_record(
            kind, obj, images_root, caption_field, text_field))

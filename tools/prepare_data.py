"""JSONL + image files -> webdataset shards + manifest.json + index (mm1_megatron/data/shard_*.py).

    python tools/prepare_data.py --kind caption --input pairs.jsonl --images-root imgs/ \\
        --output data/caption [--shard-size-mb 64] [--tokenizer tok.model]

Input: one JSON object per line (UTF-8; blank lines ignored); image paths are relative to
--images-root (or absolute); image type from the file extension (jpg/jpeg, png, webp, bmp,
gif, tif/tiff). An optional "id" (string or number) is kept in the shard's json.

    caption      {"image": "cats/001.jpg", "text": "A cat asleep on a sofa."}
    interleaved  {"segments": [{"text": "Intro ..."}, {"image": "a.jpg"}, {"text": "..."}]}
    text         {"text": "A whole document ..."}
    sft          LLaVA's conversation format: {"id": ..., "image": "a.jpg" | ["a.jpg", ...]
                 (optional), "conversations": [{"from": "human", "value": "<image>\nWhat is
                 this?"}, {"from": "gpt", "value": "A cat."}, ...]}; one "<image>" per image,
                 in order, in human turns only; an optional "system" turn first, then human /
                 gpt alternating, ending with gpt. --input may also be a JSON array of such
                 records (LLaVA ships llava_v1_5_mix665k.json that way). Text-only
                 conversations are fine.

A bad line (not UTF-8, invalid JSON, missing/empty field, missing or zero-byte image file,
unsupported image type, a document with only images) is skipped and counted per reason; the
first few are printed as FILE:LINE. Image bytes are copied as they are (no re-encoding);
undecodable images are caught later by the image decoder.

The dataset is written to OUT.incomplete/ (next to OUT) and swapped in only at the end (OUT
renamed to OUT.prepare_data-old, the new one renamed to OUT, the old one deleted): until then
an existing OUT is untouched and usable, whatever happens (bad input, an error, Ctrl-C, a
killed process; the next run removes a stale OUT.incomplete/ and finishes an interrupted
swap). If no line is usable, nothing is written: exit status 2 and one line saying why.
--output must be a new folder or one this tool wrote (no other files in it).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

from mm1_megatron.data.prompt_format import llava_turns
from mm1_megatron.data.shard_schema import (IMAGE_EXTS, KINDS, BadSample, DatasetError,
                                            SkipCounter, normalize_ext)
from mm1_megatron.data.shard_writer import RawSample, write_dataset

MAX_PRINTED = 10
# How the one-line "no usable samples" error names each skip reason.
_REASON_TEXT = {
    "not_utf8": "not UTF-8",
    "bad_json": "bad JSON or fields not those of --kind {kind}",
    "missing_image": "missing image under --images-root {root}",
    "zero_byte_image": "zero-byte image",
    "unsupported_image": "unsupported image type",
    "empty_text": "empty text",
    "images_only": "images but no text",
    "bad_conversation": "conversations not [system], human / gpt alternating, ending with gpt",
    "image_mismatch": "<image> markers not matching the images",
}
# What a dataset folder written by this tool holds; anything else in OUT is not ours to delete.
_DATASET_ENTRIES = ("manifest.json", "manifest.json.tmp", "index")


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class PrepareError(ValueError):
    """A user error the CLI reports as one line (exit 2); the existing dataset is unchanged."""


def _utf8(value: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a JSON "\ud800" escape
        raise _Bad("not_utf8", f"{where}: \\u{ord(value[e.start]):04x} is not a character "
                               "(lone surrogate escape)") from None
    return value


def _image(root: Path, ref: object, where: str) -> tuple[str, bytes]:
    if not isinstance(ref, str) or not ref:
        raise _Bad("bad_json", f"{where} must be a non-empty path string")
    ext = normalize_ext(ref)
    if ext not in IMAGE_EXTS:
        raise _Bad("unsupported_image", f"{where}={ref!r}: extension not in {IMAGE_EXTS}")
    path = root / ref
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _Bad("missing_image", f"{where}={ref!r}: {e.strerror}") from None
    except ValueError as e:  # embedded NUL, unencodable name
        raise _Bad("missing_image", f"{where}={ref!r}: {e}") from None
    if not data:
        raise _Bad("zero_byte_image", f"{where}={ref!r}")
    return ext, data


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad("bad_json", f"{where} missing or not a string")
    if not value.strip():
        raise _Bad("empty_text", where)
    return _utf8(value, where)


def parse_conversation(obj: dict, images_root: Path, sid: Optional[str]) -> RawSample:
    """A LLaVA-format record -> an sft RawSample (turns; images in marker order)."""
    refs = obj.get("image")
    refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
    try:
        turns = llava_turns(obj.get("conversations"), len(refs))
    except ValueError as err:
        raise _Bad(*err.args) from None
    for n, turn in enumerate(obj["conversations"]):
        _utf8(turn["value"], f"conversations[{n}].value")
    images = [_image(images_root, ref, f"image[{j}]") for j, ref in enumerate(refs)]
    return RawSample([], images, sid, turns=turns)


def parse_line(kind: str, line: str, images_root: Path) -> RawSample:
    """One JSONL line -> RawSample; raises _Bad(reason, detail)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad("bad_json", str(e)) from None
    return parse_record(kind, obj, images_root)


def parse_record(kind: str, obj: object, images_root: Path) -> RawSample:
    if not isinstance(obj, dict):
        raise _Bad("bad_json", "line is not a JSON object")
    sid = obj.get("id")
    sid = None if sid is None else _utf8(str(sid), "id")
    if kind == "sft":
        return parse_conversation(obj, images_root, sid)
    if kind == "caption":
        img = _image(images_root, obj.get("image"), "image")
        return RawSample([0, _text(obj.get("text"), "text")], [img], sid)
    if kind == "text":
        return RawSample([_text(obj.get("text"), "text")], [], sid)
    segs = obj.get("segments")
    if not isinstance(segs, list) or not segs:
        raise _Bad("bad_json", "segments missing or not a non-empty list")
    out: list[Union[str, int]] = []
    images: list[tuple[str, bytes]] = []
    for n, seg in enumerate(segs):
        if isinstance(seg, dict) and set(seg) == {"text"}:
            out.append(_text(seg["text"], f"segments[{n}].text"))
        elif isinstance(seg, dict) and set(seg) == {"image"}:
            images.append(_image(images_root, seg["image"], f"segments[{n}].image"))
            out.append(len(images) - 1)
        else:
            raise _Bad("bad_json", f"segments[{n}] is not {{'text': ...}} or {{'image': ...}}")
    if not any(isinstance(s, str) for s in out):
        raise _Bad("images_only", "no text segment")
    return RawSample(out, images, sid)


def _decode(raw: bytes, lineno: int) -> str:
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad("not_utf8", f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not "
                               "valid UTF-8") from None


def _is_json_array(path: Union[str, Path]) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _records(path: Union[str, Path], kind: str, root: Path):
    """(where, parse()) per input record: JSONL lines, or the items of a JSON array."""
    if _is_json_array(path):
        try:
            items = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PrepareError(f"{path}: not a JSON array of records ({e})") from None
        for n, obj in enumerate(items, 1):
            yield f"record {n}", (lambda obj=obj: parse_record(kind, obj, root))
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                yield f"line {lineno}", (lambda raw=raw, lineno=lineno:
                                         parse_line(kind, _decode(raw, lineno), root))


def _count_records(path: Union[str, Path]) -> int:
    if _is_json_array(path):
        return -1  # unknown until parsed; the progress bar runs without a total
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


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
        raise PrepareError(f"{shown} holds files prepare_data did not write "
                           f"({', '.join(extra[:3])}{', ...' if len(extra) > 3 else ''}); "
                           "refusing to replace it: choose another --output or remove them")


def _output_paths(output: Union[str, Path]) -> tuple[Path, Path, Path]:
    """(OUT, OUT.incomplete, OUT.prepare_data-old); repairs what a killed run left behind."""
    out = Path(os.path.realpath(output))
    if not out.name or out == out.parent:
        raise PrepareError(f"--output {output}: not a usable dataset folder name")
    tmp = out.with_name(out.name + ".incomplete")
    old = out.with_name(out.name + ".prepare_data-old")
    if old.exists() or old.is_symlink():
        _check_replaceable(old, str(old))
        if out.exists():
            shutil.rmtree(old)  # killed after the swap, before deleting the old dataset
        else:
            os.replace(old, out)  # killed between the two renames: put the old dataset back
    if out.exists():
        _check_replaceable(out, f"--output {output}")
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp)  # a stale partial dataset from a crashed run
    elif tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    return out, tmp, old


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


def _no_samples(inputs: list, root: Path, kind: str, counts: dict, had_old: bool) -> str:
    where = ", ".join(str(p) for p in inputs)
    lines = sum(counts.values())
    if lines:
        parts = ", ".join(f"{n} {_REASON_TEXT.get(r, r).format(kind=kind, root=root)}"
                          for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        why = f"{lines} line{'s' * (lines != 1)}: {parts}"
    else:
        why = "no non-blank lines"
    kept = "; nothing written, the existing dataset is unchanged" if had_old else \
        "; nothing written"
    return f"no usable samples in {where} ({why}){kept}"


def prepare(kind: str, inputs: list[Union[str, Path]], images_root: Union[str, Path],
            output: Union[str, Path], shard_size_mb: float = 64.0, tokenizer=None,
            progress: bool = True, log=print) -> tuple[dict, collections.Counter]:
    """Returns (manifest, skipped input lines per reason). Raises PrepareError when no line is
    usable; on any error an existing dataset at `output` is left as it was."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not one of {KINDS}")
    root = Path(images_root)
    out, tmp, old = _output_paths(output)
    skips = SkipCounter(log=None)

    def samples() -> Iterator[RawSample]:
        for path in inputs:
            for where, parse in _records(path, kind, root):
                try:
                    yield parse()
                except _Bad as e:
                    skips.add(BadSample(str(path), where, e.reason, e.detail))
                    if sum(skips.counts.values()) <= MAX_PRINTED:
                        log(f"{path}:{where.split()[-1]}: skipped: {e}")

    counts = [_count_records(path) for path in inputs]
    total = None if -1 in counts else sum(counts)
    stream = samples()
    first = next(stream, None)  # all lines bad: stop before anything is created
    if first is None:
        raise PrepareError(_no_samples(inputs, root, kind, skips.snapshot(), out.exists()))
    try:
        manifest = write_dataset(itertools.chain([first], stream), tmp, kind,
                                 shard_size_mb=shard_size_mb, tokenizer=tokenizer,
                                 progress=progress, total=total)
        _swap_in(tmp, out, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hidden = sum(skips.counts.values()) - MAX_PRINTED
    if hidden > 0:
        log(f"... and {hidden} more skipped line{'s' * (hidden != 1)} (not listed)")
    return manifest, skips.counts


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--input", required=True, nargs="+", help="JSONL file(s)")
    p.add_argument("--images-root", default=".", help="image paths are relative to this")
    p.add_argument("--output", required=True, help="dataset folder to (re)write")
    p.add_argument("--shard-size-mb", type=float, default=64.0)
    p.add_argument("--tokenizer", help="sentencepiece model: store text token counts")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from mm1_megatron.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(args.tokenizer)
        for path in args.input:
            if not Path(path).is_file():
                raise ValueError(f"{path}: input file not found")
        manifest, skipped = prepare(args.kind, args.input, args.images_root, args.output,
                                    args.shard_size_mb, tok, progress=not args.no_progress)
    except PrepareError as e:
        print(f"prepare_data: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError, DatasetError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nprepare_data: interrupted; the existing dataset is unchanged", file=sys.stderr)
        return 130
    print(f"{args.output}: {manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{manifest['images']} images, {manifest['bytes'] / 2**20:.1f} MiB; "
          f"skipped input lines: {dict(skipped) or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

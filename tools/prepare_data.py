"""JSONL + image files -> webdataset shards + manifest.json + index (mm1_megatron/data/shards.py).

    python tools/prepare_data.py --kind caption --input pairs.jsonl --images-root imgs/ \\
        --output data/caption [--shard-size-mb 64] [--tokenizer tok.model]

Input: one JSON object per line (blank lines ignored); image paths are relative to
--images-root (or absolute); image type from the file extension (jpg/jpeg, png, webp, bmp,
gif, tif/tiff). An optional "id" (string or number) is kept in the shard's json.

    caption      {"image": "cats/001.jpg", "text": "A cat asleep on a sofa."}
    interleaved  {"segments": [{"text": "Intro ..."}, {"image": "a.jpg"}, {"text": "..."}]}
    text         {"text": "A whole document ..."}

A bad line (invalid JSON, missing/empty field, missing or zero-byte image file, unsupported
image type, a document with only images) is skipped and counted per reason; the first few are
printed with their line numbers. Image bytes are copied as they are (no re-encoding);
undecodable images are caught later by the image decoder.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

from mm1_megatron.data.shards import IMAGE_EXTS, KINDS, RawSample, normalize_ext, write_dataset

MAX_PRINTED = 10


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


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
    if not data:
        raise _Bad("zero_byte_image", f"{where}={ref!r}")
    return ext, data


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad("bad_json", f"{where} missing or not a string")
    if not value.strip():
        raise _Bad("empty_text", where)
    return value


def parse_line(kind: str, line: str, images_root: Path) -> RawSample:
    """One JSONL line -> RawSample; raises _Bad(reason, detail)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise _Bad("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise _Bad("bad_json", "line is not a JSON object")
    sid = obj.get("id")
    sid = None if sid is None else str(sid)
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


def prepare(kind: str, inputs: list[Union[str, Path]], images_root: Union[str, Path],
            output: Union[str, Path], shard_size_mb: float = 64.0, tokenizer=None,
            progress: bool = True, log=print) -> tuple[dict, collections.Counter]:
    """Returns (manifest, skipped input lines per reason)."""
    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not one of {KINDS}")
    root = Path(images_root)
    skipped: collections.Counter = collections.Counter()

    def samples() -> Iterator[RawSample]:
        for path in inputs:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield parse_line(kind, line, root)
                    except _Bad as e:
                        skipped[e.reason] += 1
                        if sum(skipped.values()) <= MAX_PRINTED:
                            log(f"{path}:{lineno}: skipped: {e}")

    total = 0
    for path in inputs:
        with open(path, "rb") as f:
            total += sum(1 for line in f if line.strip())
    manifest = write_dataset(samples(), output, kind, shard_size_mb=shard_size_mb,
                             tokenizer=tokenizer, progress=progress, total=total)
    return manifest, skipped


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
    except (ValueError, OSError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{manifest['images']} images, {manifest['bytes'] / 2**20:.1f} MiB; "
          f"skipped input lines: {dict(skipped) or 0}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""MMC4 documents (`docs_shard_N_v2.jsonl`, plain or compressed) with their separately
downloaded images, converted into interleaved shards.

One JSON object per line: `text_list` (the document's sentences in order), `image_info`
([{`image_name`, `raw_url`, `matched_text_index`, `matched_sim`, ...}]: each image and the
sentence CLIP matched it to), `similarity_matrix`, `url`, `could_have_url_duplicate`. The
images are files named `image_name` under --images-root (MMC4 ships them apart from the
documents; nothing is downloaded here).

Each image is placed before the sentence `matched_text_index` names, as OpenFlamingo's MMC4
loader does (images matched to one sentence keep their `image_info` order). A document with
an image file missing, an index outside `text_list`, or no text is skipped and counted, like
any record of the jsonl format. Matches `sources.Source` by shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from mm1_megatron.data.shard_schema import BadSample
from mm1_megatron.data.shard_writer import RawSample
from mm1_megatron.data.sources import jsonl

REASON_TEXT = {**jsonl.REASON_TEXT,
               "bad_json": "not an MMC4 document (text_list, image_info[{image_name, "
                           "matched_text_index}])"}


def is_mmc4(path: Path) -> bool:
    """A JSON-lines file whose first record has MMC4's `text_list` and `image_info`."""
    if not jsonl.is_record_file(path) or not path.is_file():
        return False
    try:
        with jsonl.open_stream(path) as f:
            first = f.readline()
        record = json.loads(first)
    except (ValueError, OSError, EOFError):
        return False
    return isinstance(record, dict) and "text_list" in record and "image_info" in record


def document(obj: object, images_root: Path) -> RawSample:
    """One MMC4 line -> an interleaved RawSample; raises jsonl.BadRecord(reason, detail)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("text_list"), list) \
            or not isinstance(obj.get("image_info"), list):
        raise jsonl.BadRecord("bad_json", "text_list / image_info missing or not lists")
    texts = obj["text_list"]
    before: dict[int, list[tuple[str, bytes]]] = {}
    for n, info in enumerate(obj["image_info"]):
        at = info.get("matched_text_index") if isinstance(info, dict) else None
        if not isinstance(at, int) or not 0 <= at < len(texts):
            raise jsonl.BadRecord("bad_json", f"image_info[{n}].matched_text_index {at!r} is not an "
                                         f"index into text_list ({len(texts)} sentences)")
        before.setdefault(at, []).append(
            jsonl.read_image(images_root, info.get("image_name"), f"image_info[{n}].image_name"))
    segments: list[Union[str, int]] = []
    images: list[tuple[str, bytes]] = []
    for n, sentence in enumerate(texts):
        for image in before.get(n, ()):
            images.append(image)
            segments.append(len(images) - 1)
        if not isinstance(sentence, str):
            raise jsonl.BadRecord("bad_json", f"text_list[{n}] is not a string")
        if sentence.strip():
            segments.append(jsonl.checked_utf8(sentence, f"text_list[{n}]"))
    if not any(isinstance(s, str) for s in segments):
        raise jsonl.BadRecord("images_only" if images else "empty_text", "no sentence")
    return RawSample(segments, images, None if obj.get("url") is None else str(obj["url"]))


class Mmc4Source:
    """The `mmc4` format (see the module docstring)."""

    name = "mmc4"
    in_place = False
    record = "line"
    reason_text = REASON_TEXT

    def detect(self, path: Path) -> bool:
        if path.is_dir():
            first = next(iter(jsonl.files([path])), None)
            return first is not None and is_mmc4(first)
        return is_mmc4(path)

    def count(self, paths: Sequence[Path]) -> Optional[int]:
        return jsonl.JsonlSource().count(paths)

    def files(self, paths: Sequence[Path]) -> list[Path]:
        return jsonl.files(paths)

    def check(self, paths: Sequence[Path], kind: str) -> None:
        if kind != "interleaved":
            raise ValueError(f"--kind {kind}: MMC4 documents are interleaved")

    def samples(self, paths: Sequence[Path], kind: str, *, images_root: Path,
                caption_field: str = "text", text_field: str = "text"
                ) -> Iterator[Union[RawSample, BadSample]]:
        if kind != "interleaved":
            raise ValueError(f"--kind {kind}: MMC4 documents are interleaved")
        return jsonl.record_samples(paths, lambda obj: document(obj, images_root))

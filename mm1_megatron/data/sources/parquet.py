"""Parquet records converted into our shards, streamed a row group's batch at a time (memory
bounded whatever the file's size): OBELICS / OmniCorpus interleaved documents and FineWeb-style
text.

    interleaved  OBELICS's columns: `texts` and `images`, aligned lists with exactly one
                 non-null per position, in document order (`metadata`, `general_metadata`:
                 JSON strings, not read). An image is what the user downloaded: its bytes
                 (binary), a file path relative to --images-root, or a struct with `bytes` /
                 `path` (HF datasets' Image feature). OBELICS as published holds image URLs:
                 such a source is refused in one line (download the images first, e.g. with
                 img2dataset); nothing is fetched.
    text         a string column, `text` by default (--text-field): FineWeb's `text`, `id`,
                 `dump`, `url`, `date`, `file_path`, `language`, `language_score`, `token_count`.

A bad row (texts / images not aligned, no text, a missing or zero-byte image, an unsupported
image type) is skipped as a BadSample(FILE, "row N", reason, detail); image types come from
the bytes' signature or the path's extension. Matches `sources.Source` by shape (this module
does not import the registry that lists it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from mm1_megatron.data.shard_schema import (IMAGE_EXTS, BadSample, aligned_segments,
                                            normalize_ext)
from mm1_megatron.data.shard_writer import RawSample

BATCH_ROWS = 256  # rows decoded at a time: OBELICS rows with image bytes run to megabytes
KINDS = ("interleaved", "text")
REASON_TEXT = {
    "misaligned": "texts / images not aligned (exactly one non-null per position)",
    "empty_text": "no text",
    "images_only": "images but no text",
    "missing_image": "missing image under --images-root {root}",
    "zero_byte_image": "zero-byte image",
    "unsupported_image": "unsupported image type",
    "bad_json": "a column missing or of another type than --kind {kind} reads",
}
# Leading bytes of each image type we decode (the bytes carry no file name).
_SIGNATURES = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF8", "gif"),
               (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def _pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install 'mm1_megatron[data]'") \
            from None
    return pq


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.lower().startswith(("http://", "https://"))


def _ext_of_bytes(data: bytes) -> Optional[str]:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for sig, ext in _SIGNATURES if data.startswith(sig)), None)


def _image(value: object, root: Path, where: str) -> tuple[str, bytes]:
    """An `images` entry -> (ext, bytes)."""
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise _Bad("zero_byte_image", where)
        ext = _ext_of_bytes(bytes(value))
        if ext is None:
            raise _Bad("unsupported_image", f"{where}: bytes of no type in {IMAGE_EXTS}")
        return ext, bytes(value)
    if not isinstance(value, str) or not value:
        raise _Bad("misaligned", f"{where}: neither bytes nor a path")
    ext = normalize_ext(value)
    if ext not in IMAGE_EXTS:
        raise _Bad("unsupported_image", f"{where}={value!r}: extension not in {IMAGE_EXTS}")
    try:
        data = (root / value).read_bytes()
    except OSError as e:
        raise _Bad("missing_image", f"{where}={value!r}: {e.strerror}") from None
    if not data:
        raise _Bad("zero_byte_image", f"{where}={value!r}")
    return ext, data


def interleaved_sample(texts: object, images: object, root: Path) -> RawSample:
    """One OBELICS row -> RawSample; raises _Bad(reason, detail)."""
    try:
        segments, found = aligned_segments(texts, images)
    except ValueError as e:
        raise _Bad(*e.args) from None
    return RawSample(segments, [_image(value, root, f"image {j}") for j, value in
                                enumerate(found)])


def _parquet_file(pq, path):
    """A local file by its name (pyarrow maps it), a `UrlPath` through its fsspec file."""
    return pq.ParquetFile(path if isinstance(path, Path) else path.open("rb"))


def files(paths: Sequence[Path]) -> list[Path]:
    """Each file as named, each folder's *.parquet (sorted, subfolders included)."""
    found: list[Path] = []
    for path in paths:
        found += sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return found


def _refuse_urls(path: Path, batch) -> None:
    """OBELICS as published: the images are URLs. Refused before anything is written."""
    for images in batch.column("images").to_pylist():
        first = next((v for v in images or () if v is not None), None)
        if first is not None:
            if _is_url(first) or isinstance(first, dict) and _is_url(first.get("path")) \
                    and not first.get("bytes"):
                raise ValueError(f"{path}: images are URLs ({str(first)[:60]}...); "
                                 "mm1-prepare-data never downloads: fetch them first (e.g. "
                                 "with img2dataset) and give their bytes or local paths")
            return


class ParquetSource:
    """The `parquet` format (see the module docstring)."""

    name = "parquet"
    in_place = False
    record = "row"
    reason_text = REASON_TEXT

    def detect(self, path: Path) -> bool:
        if path.is_dir():  # img2dataset's folders hold .parquet beside their tars
            return next(path.glob("*.tar"), None) is None and \
                next(path.rglob("*.parquet"), None) is not None
        return path.suffix == ".parquet"

    def count(self, paths: Sequence[Path]) -> Optional[int]:
        pq = _pyarrow()
        return sum(_parquet_file(pq, p).metadata.num_rows for p in files(paths))

    def files(self, paths: Sequence[Path]) -> list[Path]:
        return files(paths)

    def check(self, paths: Sequence[Path], kind: str) -> None:
        """Before any task: the kind, each file's columns (its footer only), and the first
        file's images not URLs (OBELICS as published). Raises ValueError."""
        if kind not in KINDS:
            raise ValueError(f"--kind {kind}: parquet sources are read for "
                             f"{' and '.join(KINDS)}")
        pq = _pyarrow()
        for n, path in enumerate(paths):
            try:
                names = _parquet_file(pq, path).schema_arrow.names
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: not a readable parquet file ({e})") from None
            if kind == "interleaved":
                missing = [c for c in ("texts", "images") if c not in names]
                if missing:
                    raise ValueError(f"{path}: no column {missing[0]!r} (columns: "
                                     f"{', '.join(names)})")
                if n == 0:
                    batch = next(_parquet_file(pq, path).iter_batches(
                        batch_size=BATCH_ROWS, columns=["images"]), None)
                    if batch is not None:
                        _refuse_urls(path, batch)

    def samples(self, paths: Sequence[Path], kind: str, *, images_root: Path,
                caption_field: str = "text", text_field: str = "text"
                ) -> Iterator[Union[RawSample, BadSample]]:
        if kind not in KINDS:
            raise ValueError(f"--kind {kind}: parquet sources are read for "
                             f"{' and '.join(KINDS)}")
        pq = _pyarrow()
        columns = ["texts", "images"] if kind == "interleaved" else [text_field]
        for path in files(paths):
            parquet = _parquet_file(pq, path)
            missing = [c for c in columns if c not in parquet.schema_arrow.names]
            if missing:
                raise ValueError(f"{path}: no column {missing[0]!r} (columns: "
                                 f"{', '.join(parquet.schema_arrow.names)})")
            row = 0
            for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
                if kind == "interleaved" and row == 0:
                    _refuse_urls(path, batch)
                values = [batch.column(c).to_pylist() for c in columns]
                for record in zip(*values):
                    row += 1
                    try:
                        if kind == "interleaved":
                            yield interleaved_sample(*record, images_root)
                        elif not isinstance(record[0], str) or not record[0].strip():
                            raise _Bad("empty_text", f"{text_field} missing or empty")
                        else:
                            yield RawSample([record[0]])
                    except _Bad as e:
                        yield BadSample(str(path), f"row {row}", e.reason, e.detail)

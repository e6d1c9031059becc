"""Webdataset shards indexed in place: img2dataset's output (DataComp, DFN, LAION, CC12M)
and any tars of KEY.<image ext> + KEY.txt / KEY.json samples (caption, text), and MINT-1T's
interleaved documents (interleaved).

Nothing is copied: OUT gets manifest.json and index/ (`shard_index.index_shards`) naming
each source tar relative to the source's root with its size and mtime, and the byte offset
and size of every sample's text and image member; the reader seeks into the source tars
(`shard_reader`, manifest "source"). A source tar that changes or vanishes afterwards is
refused when the dataset is opened.

MINT-1T's PDF and ArXiv subsets (and Energon's interleaved layout): a document is KEY.json
with `texts` and `images` aligned lists (exactly one non-null per position, in document order;
`image_metadata`, `url`, `pdf_name`... not read) and its images as tar members. An `images`
entry with an image extension names the member KEY.<entry> (Energon's "2345ew.jpg"); one
without (MINT's "page_0_image_85") is the next page of the document's one multi-page KEY.tiff,
which is how MINT-1T stores a PDF's images. The index records each image's member and page;
the reader hands the decoder that page alone (`shard_reader.tiff_page`). A page the TIFF lacks
is counted as undecodable when read; misaligned lists, a document with no text and an image
with no member are counted at indexing.

img2dataset's layout (`output_format="webdataset"`): `00000.tar`, `00001.tar`, ... each with
`00000_stats.json` and `00000.parquet` beside it; a sample is KEY.jpg, KEY.txt (the caption)
and KEY.json (url, caption, key, status, width, height, original_width, original_height,
sha256, ...), KEY = shard * 10**ceil(log10(samples_per_shard)) + i, zero-padded. A failed
download has a parquet row and no tar members; `_stats.json` counts them
(`failed_to_download`, `failed_to_resize`), and so does the manifest's "bad". A shard that
failed whole is missing from the numbered series: each gap counts as `missing_shard`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from mm1_megatron.data.shard_index import InPlaceSource, index_shards, write_manifest
from mm1_megatron.data.shard_schema import ALIGNED_LISTS, DatasetError

NAME = "webdataset"
KINDS = ("caption", "interleaved", "text")


def list_shards(paths: list[Path]) -> list[Path]:
    """The tars of `paths` (a folder: every *.tar under it, as MINT-1T's subsets hold theirs in
    shard folders), sorted, each once."""
    shards: set[Path] = set()
    for p in paths:
        found = sorted(p.rglob("*.tar")) if p.is_dir() else [p] if p.suffix == ".tar" else []
        if not found:
            raise DatasetError(f"{p}: no .tar shards")
        shards.update(f.resolve() for f in found)
    return sorted(shards)


def source_root(shards: list[Path]) -> Path:
    """The folder every shard lies under (names in the manifest are relative to it)."""
    return Path(os.path.commonpath([str(s.parent) for s in shards]))


def text_spec(kind: str, field: Optional[str]) -> dict:
    """How a sample's text reads: an interleaved document from KEY.json's aligned lists;
    else KEY.txt itself (img2dataset's caption), or a field of KEY.json when one is named."""
    if kind == "interleaved":
        if field is not None:
            raise DatasetError("--text-field: an interleaved tar's KEY.json holds `texts` / "
                               "`images` lists, no text field")
        return ALIGNED_LISTS
    return {"member": "txt"} if field is None else {"member": "json", "field": field}


def shard_gaps(shards: list[Path]) -> collections.Counter:
    """Downloads img2dataset recorded as failed in these shards (its _stats.json beside each
    tar: `failed_to_download`, `failed_to_resize`); counted by the task indexing them."""
    gaps: collections.Counter = collections.Counter()
    for shard in shards:
        stats = shard.with_name(f"{shard.stem}_stats.json")
        try:
            counts = json.loads(stats.read_text())
            failed = int(counts.get("failed_to_download", 0)) + \
                int(counts.get("failed_to_resize", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue  # no stats (not img2dataset's output) or unreadable: nothing known
        if failed:
            gaps["failed_download"] += failed
    return gaps


def series_gaps(shards: list[Path]) -> collections.Counter:
    """Numbered shards missing from their folder's series 0..max (a shard img2dataset failed
    whole); counted over the whole dataset."""
    numbered: dict[Path, set[int]] = collections.defaultdict(set)
    for shard in shards:
        if shard.stem.isdigit():
            numbered[shard.parent].add(int(shard.stem))
    missing = sum(max(numbers) + 1 - len(numbers) for numbers in numbered.values())
    return collections.Counter({"missing_shard": missing} if missing else {})


def plan(sources: list[Path], kind: str, caption_field: Optional[str] = None,
         text_field: Optional[str] = None) -> InPlaceSource:
    """What indexing `sources` (tars or folders of tars) reads; raises DatasetError."""
    if kind not in KINDS:
        raise DatasetError(f"--kind {kind}: webdataset sources are indexed in place for "
                           f"{', '.join(KINDS)}")
    shards = list_shards([Path(s) for s in sources])
    return InPlaceSource(NAME, source_root(shards), shards,
                         text_spec(kind, caption_field if kind == "caption" else text_field))


@contextlib.contextmanager
def lister(source: InPlaceSource) -> Iterator[None]:
    """`index_shards`' list_members: None, each tar is scanned."""
    yield None


def index_in_place(sources: list[Path], kind: str, output_tmp: Path, tokenizer=None,
                   caption_field: Optional[str] = None, text_field: Optional[str] = None,
                   progress: bool = False) -> tuple[dict, collections.Counter]:
    """Index `sources` (tars or folders of tars) into `output_tmp` (manifest written) in this
    process; returns the manifest and the skipped samples per reason (bad samples and gaps)."""
    source = plan(sources, kind, caption_field, text_field)
    manifest = index_shards(source.shards, kind, output_tmp, root=source.root,
                            text=source.text, tokenizer=tokenizer, progress=progress)
    skipped = collections.Counter(manifest["bad"]) + shard_gaps(source.shards) + \
        series_gaps(source.shards)
    manifest["bad"] = dict(sorted(skipped.items()))
    manifest["source"] = {"format": NAME, "root": str(source.root), "text": source.text}
    write_manifest(output_tmp, manifest)
    return manifest, skipped

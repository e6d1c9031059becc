"""Energon-prepared webdatasets (Megatron-LM / NeMo users' data) indexed in place, from the
metadata `energon prepare` wrote, without rescanning a tar.

What `energon prepare` leaves in the dataset folder (megatron-energon 7.x):
  .nv-meta/dataset.yaml   sample_type {__module__, __class__} and field_map {field: part},
                          e.g. CaptioningSample with {image: jpg, caption: txt}
  .nv-meta/split.yaml     split_parts (train / val / test tar patterns), exclude
  .nv-meta/.info.json     energon_version, shard_counts {tar path relative to the folder: n};
                          a tar's position in it is its `tar_file_id`
  .nv-meta/index.sqlite   samples(tar_file_id, sample_key, sample_index, byte_offset,
                          byte_size) and sample_parts(tar_file_id, sample_index, part_name,
                          content_byte_offset, content_byte_size): every member's bytes
  NNNNN.tar.idx           per tar, the sample offsets (not needed here)

The index here names each tar of shard_counts (all splits: the split is energon's concern,
the mixture ours) and each sample's caption and image member by the byte ranges of
index.sqlite; the reader seeks into the tars as for any source indexed in place. Read for
CaptioningSample (kind caption) whose field_map names plain parts, and InterleavedSample (kind
interleaved) in the layout energon's documentation gives for interleaved data ("Custom Sample
Loader: Interleaved Data and Arbitrary Image Count"): KEY.json with aligned `images` / `texts`
lists, each image entry naming its part (KEY.2345ew.jpg: "2345ew.jpg"), as MINT-1T's tars
(`sources/webdataset.py`). Its .nv-meta/sample_loader.py is not run (it is code; the json is
read as that layout says); other sample types are refused in one line.
"""

from __future__ import annotations

import collections
import contextlib
import json
import sqlite3
from pathlib import Path
from typing import Callable, Iterator, Optional

from mm1_megatron.config.yaml_file import read_yaml_file
from mm1_megatron.data.shard_index import InPlaceSource
from mm1_megatron.data.shard_schema import ALIGNED_LISTS, DatasetError

NAME = "energon"
META = ".nv-meta"
# Energon sample type -> (our kind, its field_map's text field, its image field); None: no
# field_map (the interleaved layout names its parts in each sample's json).
SAMPLE_TYPES = {"CaptioningSample": ("caption", "caption", "image"),
                "InterleavedSample": ("interleaved", None, None)}


def detect(path: Path) -> bool:
    """A folder `energon prepare` indexed (its tars make it look like webdataset too)."""
    return path.is_dir() and (path / META / "dataset.yaml").is_file() and \
        (path / META / "index.sqlite").is_file()


def _dataset_type(folder: Path) -> tuple[str, dict, Optional[set[str]]]:
    """(kind, how the text member reads, the parts to index; None: all) from
    .nv-meta/dataset.yaml."""
    where = folder / META / "dataset.yaml"
    spec = read_yaml_file(where) or {}
    name = (spec.get("sample_type") or {}).get("__class__")
    if name not in SAMPLE_TYPES:
        raise DatasetError(f"{where}: sample type {name!r} is not read (only "
                           f"{', '.join(SAMPLE_TYPES)}); convert it with mm1-prepare-data's "
                           "other formats")
    kind, text_field, image_field = SAMPLE_TYPES[name]
    if text_field is None:
        return kind, ALIGNED_LISTS, None
    fields = spec.get("field_map") or {}
    if not all(isinstance(fields.get(f), str) and fields[f].isalnum()
               for f in (text_field, image_field)):
        raise DatasetError(f"{where}: field_map {fields} must name plain parts for "
                           f"{text_field!r} and {image_field!r} (e.g. {{image: jpg, caption: "
                           "txt}})")
    return kind, {"member": fields[text_field]}, {fields[text_field], fields[image_field]}


def _shards(folder: Path) -> list[str]:
    where = folder / META / ".info.json"
    try:
        counts = json.loads(where.read_text())["shard_counts"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{where}: cannot read shard_counts ({e})") from None
    return list(counts)  # tar_file_id order


def _members_from_sqlite(db: sqlite3.Connection, ids: dict[Path, int],
                         wanted: Optional[set[str]]):
    """`index_shards`' list_members(path): one tar's samples from index.sqlite, in sample order,
    with the parts field_map names (a sample's other parts, e.g. img2dataset's json, left
    out so that the field_map's image is the one read); `wanted` None: every part."""
    def members(path: Path) -> tuple[list, Optional[str]]:
        tar_id = ids[path]
        keys = db.execute("SELECT sample_index, sample_key FROM samples WHERE tar_file_id = ? "
                          "ORDER BY sample_index", (tar_id,)).fetchall()
        parts: dict[int, dict[str, tuple[int, int]]] = collections.defaultdict(dict)
        for index, name, offset, size in db.execute(
                "SELECT sample_index, part_name, content_byte_offset, content_byte_size FROM "
                "sample_parts WHERE tar_file_id = ?", (tar_id,)):
            if wanted is None or name in wanted:
                parts[index][name] = (offset, size)
        return [(key, parts[index]) for index, key in keys], None
    return members


def plan(sources: list[Path], kind: str, caption_field: Optional[str] = None,
         text_field: Optional[str] = None) -> InPlaceSource:
    """What indexing one energon dataset folder reads; raises DatasetError."""
    if len(sources) != 1 or not detect(Path(sources[0])):
        raise DatasetError("an energon source is one folder holding .nv-meta/dataset.yaml "
                           "and .nv-meta/index.sqlite (from `energon prepare`)")
    folder = Path(sources[0]).resolve()
    their_kind, text, parts = _dataset_type(folder)
    if kind != their_kind:
        raise DatasetError(f"{folder}: an energon {their_kind} dataset, not --kind {kind}")
    if caption_field or text_field:
        raise DatasetError("--caption-field / --text-field: an energon dataset names its parts "
                           f"in {META}/dataset.yaml's field_map")
    return InPlaceSource(NAME, folder, [folder / name for name in _shards(folder)], text,
                         None if parts is None else sorted(parts))


@contextlib.contextmanager
def lister(source: InPlaceSource) -> Iterator[Callable]:
    """`index_shards`' list_members for any of `source`'s tars, from index.sqlite (opened
    read-only for the duration)."""
    db = sqlite3.connect(f"file:{source.root / META / 'index.sqlite'}?mode=ro", uri=True)
    try:
        yield _members_from_sqlite(db, {s: i for i, s in enumerate(source.shards)},
                                   None if source.parts is None else set(source.parts))
    finally:
        db.close()


def shard_gaps(shards: list[Path]) -> collections.Counter:
    return collections.Counter()  # energon keeps no record of samples that never arrived


series_gaps = shard_gaps

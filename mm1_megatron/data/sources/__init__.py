"""Source formats `mm1-prepare-data` reads: the one interface a format implements (`Source`),
the registry (`FORMATS`) and `detect_format`.

A format either converts or indexes in place:

* converting (`in_place = False`, e.g. `jsonl`): `samples()` yields a `RawSample` per usable
  record and a `BadSample` per record it skips; the tasks of `data.prepare_tasks` write the
  samples of their units of `files()` into our own shards (`shard_writer.write_dataset`);
* in place (`in_place = True`, e.g. `webdataset`: img2dataset tars, never copied): the
  format's module plans the tars to index (`plan`, `lister`, `shard_gaps`, `series_gaps`) and
  the tasks of `data.prepare_tasks` index slices of them; `samples()` is never called.

Either way `data.prepare` owns what does not depend on the format: the output folder
(OUT.incomplete/ + swap), the "no usable samples" error, progress and the summary.

A format module imports nothing of this package's `__init__` (the registry imports the
formats, so the other way round would be an import cycle): it matches `Source` by shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Mapping, Optional, Protocol, Sequence, Union

from mm1_megatron.data.shard_schema import BadSample
from mm1_megatron.data.shard_writer import RawSample
from mm1_megatron.data.sources import energon
from mm1_megatron.data.sources.jsonl import JsonlSource
from mm1_megatron.data.sources.mmc4 import Mmc4Source
from mm1_megatron.data.sources.parquet import ParquetSource


class PrepareError(ValueError):
    """A user error reported as one line (exit 2); the dataset at --output is unchanged."""


class Source(Protocol):
    """One input format."""

    name: str  # what --format calls it
    in_place: bool  # True: indexed where it lies by its own module; False: converted
    record: str  # what one input record is called in messages ("line", "sample")
    # How the "no usable samples" error words a skip reason (str.format with {kind}, {root});
    # a reason not listed is shown as its code.
    reason_text: Mapping[str, str]

    def detect(self, path: Path) -> bool:
        """Whether `path` (a file or folder named as SOURCE) is in this format."""
        ...

    def count(self, paths: Sequence[Path]) -> Optional[int]:
        """Records in `paths`, for the progress bar; None if unknown without parsing."""
        ...

    def files(self, paths: Sequence[Path]) -> list[Path]:
        """Converting formats: the files `samples` reads for SOURCE `paths`, in reading
        order (`prepare_tasks` groups them into units of work)."""
        ...

    def check(self, paths: Sequence[Path], kind: str) -> None:
        """Converting formats: refuse (ValueError, one line) what would fail every task,
        before any starts (a kind the format does not hold, OBELICS's image URLs)."""
        ...

    def samples(self, paths: Sequence[Path], kind: str, *, images_root: Path,
                caption_field: str, text_field: str
                ) -> Iterator[Union[RawSample, BadSample]]:
        """Converting formats: each record in order, as a sample to write or a skip
        (BadSample(file, "line N", reason, detail)). Raises ValueError for a file that cannot
        be read at all."""
        ...


class TarFolders:
    """webdataset tars (img2dataset output: KEY.jpg, KEY.txt, KEY.json; MINT-1T's interleaved
    KEY.json + KEY.tiff), a folder of them or the files: indexed in place by `sources/webdataset.py`, never copied. Its registry entry
    lives here so that detecting a format never imports an indexer (prepare imports that
    module only for a webdataset run)."""

    name = "webdataset"
    in_place = True
    record = "sample"
    reason_text: Mapping[str, str] = {}

    def detect(self, path: Path) -> bool:
        if path.is_dir():  # tars under it, as sources/webdataset.py lists them
            return next(path.rglob("*.tar"), None) is not None
        return path.suffix == ".tar"

    def count(self, paths: Sequence[Path]) -> Optional[int]:
        return None  # the indexer reports its own progress

    def samples(self, paths: Sequence[Path], kind: str, *, images_root: Path,
                caption_field: str, text_field: str
                ) -> Iterator[Union[RawSample, BadSample]]:
        raise NotImplementedError("webdataset sources are indexed in place, not converted")


class EnergonFolder(TarFolders):
    """A webdataset folder `energon prepare` indexed (.nv-meta/): indexed in place from its
    index.sqlite by `sources/energon.py`, no tar rescanned."""

    name = "energon"

    def detect(self, path: Path) -> bool:
        return energon.detect(path)


# Detection tries the formats in this order; the first that claims a path names it (MMC4's
# documents are JSON lines too, and an energon folder holds tars: each before the general one).
FORMATS: dict[str, Source] = {"mmc4": Mmc4Source(), "jsonl": JsonlSource(),
                              "energon": EnergonFolder(), "webdataset": TarFolders(),
                              "parquet": ParquetSource()}


def detect_format(source_paths: Sequence[Path]) -> str:
    """The one format all of `source_paths` are in. Raises PrepareError naming the path
    nothing recognises, or the two formats a mixed list holds."""
    found: dict[str, Path] = {}
    for path in source_paths:
        name = next((n for n, fmt in FORMATS.items() if fmt.detect(path)), None)
        if name is None:
            raise PrepareError(f"SOURCE {path}: format not recognised (jsonl: .jsonl / .json "
                               "files, also .gz / .zst; webdataset: .tar files or a folder of "
                               "them; energon: a folder `energon prepare` indexed; parquet: "
                               ".parquet files; mmc4: MMC4's docs_shard_N_v2.jsonl); pass "
                               "--format")
        found.setdefault(name, path)
    if len(found) > 1:
        shown = ", ".join(f"{p} is {n}" for n, p in found.items())
        raise PrepareError(f"SOURCEs mix formats ({shown}); prepare one format per run")
    if not found:
        raise PrepareError("no SOURCE given")
    return next(iter(found))

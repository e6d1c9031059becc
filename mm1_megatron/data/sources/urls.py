"""SOURCE (and --images-root) given as an fsspec URL: `s3://bucket/obelics/`, `gs://…`,
`hf://datasets/…`, `file:///lustre/…`, `memory://…` (tests).

The converting formats (jsonl, mmc4, parquet) read their files through the handful of
`pathlib.Path` methods `UrlPath` provides, so one code path reads a local file and an object
store's: listing a folder (`rglob`), a file's size (the units of work), opening it for reading
and reading an image beside it. Which fsspec filesystem serves a URL is fsspec's choice (its
protocol registry: s3fs for s3://, gcsfs for gs://, …, installed by the user as for any fsspec
tool); credentials come from that filesystem's own configuration, never from our flags.

Formats indexed in place (webdataset, MINT, energon) are refused for URLs: their index records
byte offsets into the tars, which the training loader reads where they lie with local
reads (`shard_reader`), so the tars must be on a mounted filesystem.

Why not universal-pathlib: the formats need seven methods, and its subclass-per-protocol API
changed between releases; this class is those seven methods over `fsspec.core.url_to_fs`.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, NamedTuple, Union


def is_url(text: str) -> bool:
    """`scheme://…` with a scheme fsspec could know (a Windows `C:\\` never reaches here)."""
    scheme, sep, _ = str(text).partition("://")
    return bool(sep) and scheme.replace("+", "").replace("-", "").isalnum()


class _Stat(NamedTuple):
    st_size: int


class UrlPath:
    """A file or folder named by an fsspec URL, with the `Path` methods the formats use."""

    def __init__(self, url: str, _fs=None, _path: str | None = None):
        if _fs is None:
            import fsspec  # a dependency of datatrove, which runs every preparation
            _fs, _path = fsspec.core.url_to_fs(url)
        self.fs = _fs
        self.path = _path.rstrip("/") or "/"
        self.url = self.fs.unstrip_protocol(self.path)

    def _child(self, path: str) -> "UrlPath":
        return UrlPath("", self.fs, path)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "UrlPath") -> bool:  # sorted() of a folder's files
        return self.url < other.url

    def __truediv__(self, name: str) -> "UrlPath":
        return self._child(f"{self.path.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.path).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.path).suffixes

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def is_file(self) -> bool:
        return self.fs.isfile(self.path)

    def stat(self) -> _Stat:
        try:
            return _Stat(int(self.fs.size(self.path)))
        except FileNotFoundError as e:
            raise OSError(f"{self.url}: {e}") from None

    def open(self, mode: str = "rb") -> BinaryIO:
        if mode != "rb":
            raise ValueError(f"{self.url}: sources are only read")
        return self.fs.open(self.path, "rb")

    def read_bytes(self) -> bytes:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(2, "No such file or directory", self.url) from None

    def glob(self, pattern: str) -> Iterator["UrlPath"]:
        """Direct entries matching `pattern` (one level, as Path.glob without `**`)."""
        for entry in sorted(self.fs.ls(self.path, detail=False)):
            if fnmatch.fnmatchcase(PurePosixPath(entry).name, pattern):
                yield self._child(entry)

    def rglob(self, pattern: str) -> Iterator["UrlPath"]:
        """Files and folders under this folder, at any depth, whose name matches."""
        for entry in sorted(self.fs.find(self.path, withdirs=True)):
            if entry.rstrip("/") != self.path and \
                    fnmatch.fnmatchcase(PurePosixPath(entry).name, pattern):
                yield self._child(entry)


SourcePath = Union[Path, UrlPath]


def source_path(text: Union[str, os.PathLike, UrlPath]) -> SourcePath:
    """A SOURCE as given: a URL read through fsspec, else a local path (a `UrlPath` or a
    `Path` is returned as it is)."""
    if isinstance(text, (UrlPath, Path)):
        return text
    return UrlPath(str(text)) if is_url(str(text)) else Path(text)


def resolved(path: SourcePath) -> str:
    """What a plan records: a local path made absolute (symlinks resolved), a URL as is."""
    return str(path) if isinstance(path, UrlPath) else os.path.realpath(path)


def expand_url(pattern: str) -> list[UrlPath]:
    """A URL SOURCE: itself if it exists, else its glob matches (fsspec's glob; `**` crosses
    folders). Empty when nothing matches."""
    path = UrlPath(pattern)
    if path.exists():
        return [path]
    if any(c in pattern for c in "*?["):
        return [path._child(p) for p in sorted(path.fs.glob(path.path))]
    return []

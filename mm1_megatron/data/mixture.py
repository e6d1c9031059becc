"""The 45/45/10 mixture and the global row stream, with state that resumes exactly.

Everything here is *global* and identical on every rank: the mixture decides which source
the next unit comes from, the packer turns documents into rows, and row j belongs to
data-parallel rank j % dp. A rank reads every document's text (cheap) to plan the rows but
loads image bytes only for its own rows. Because the plan does not depend on the number of
ranks, the saved state (rows consumed + where the next row starts) resumes exactly at any DP
size: no document repeated or skipped.

What the weights count (`data.mixture_unit`):
- `sequences` (`SourceRowStream`): every source packs its own documents into its own rows,
  and the weights choose the source of each row. MM1 mixes per-source packed sequences
  (Apple's axlearn recipe), so 45% of the rows are caption rows whatever a caption's length.
- `documents` (`RowStream`): the weights choose the source of each document and all sources
  are packed into one stream; short captions then fill far fewer than 45% of the rows.

Source choice is deterministic and exact rather than random: the next unit comes from the
source furthest below its target share (the greedy rule Megatron's blended datasets use), so
the realised mixture is within one unit of the weights at every point. Inside a source,
documents follow a seeded permutation per epoch, evaluated per position in O(1) memory
(`permutation.FeistelPermutation`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from mm1_megatron.data.packing import Document, Packer, PackedRow
from mm1_megatron.data.permutation import FeistelPermutation

SOURCES = ("interleaved", "caption", "text", "sft")
MIXTURE_UNITS = ("sequences", "documents")


def normalised_weights(sizes: list[int], weights: list[float]) -> list[float]:
    """An empty source gets no share; the others are renormalised."""
    if len(sizes) != len(weights):
        raise ValueError("one weight per source")
    total = sum(w for w, n in zip(weights, sizes) if n > 0)
    if total <= 0:
        raise ValueError("every source with a positive weight is empty")
    return [w / total if n > 0 else 0.0 for w, n in zip(weights, sizes)]


def furthest_behind(weights: list[float], counts: list[int]) -> int:
    """The source furthest below its share after one more unit (ties: the lower index)."""
    if weights.count(0.0) == len(weights) - 1:  # one source (per-source streams)
        return next(s for s, w in enumerate(weights) if w > 0)
    drawn = sum(counts) + 1
    deficits = [w * drawn - c for w, c in zip(weights, counts)]
    return max(range(len(deficits)), key=lambda s: (deficits[s], -s))


@dataclass
class MixtureState:
    drawn: int = 0  # documents drawn so far
    counts: list[int] = field(default_factory=lambda: [0] * len(SOURCES))

    def copy(self) -> "MixtureState":  # per document drawn: deepcopy cost 20 us, this 1
        return MixtureState(self.drawn, list(self.counts))


class MixtureSampler:
    """Global sequence of (source, epoch, index) draws over sources of given sizes."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.weights = normalised_weights(sizes, weights)
        self.sizes, self.seed = sizes, seed
        self.state = MixtureState(counts=[0] * len(sizes))
        self._permutations: dict[int, tuple[int, FeistelPermutation]] = {}

    def _permutation(self, source: int, epoch: int) -> FeistelPermutation:
        """Source `source`'s order in `epoch`: O(1) memory whatever the source's size."""
        cached = self._permutations.get(source)
        if cached is None or cached[0] != epoch:
            cached = (epoch, FeistelPermutation(self.sizes[source], self.seed,
                                                stream=(source << 32) + epoch))
            self._permutations[source] = cached
        return cached[1]

    def draw(self) -> tuple[int, int, int]:
        st = self.state
        source = furthest_behind(self.weights, st.counts)
        epoch, position = divmod(st.counts[source], self.sizes[source])
        st.counts[source] += 1
        st.drawn += 1
        return source, epoch, self._permutation(source, epoch)[position]


@dataclass
class RowSnapshot:
    """Where the row after a closed row starts: replay `document` (drawn from the mixture at
    `mixture`) from chunk `first_chunk`."""

    mixture: MixtureState
    first_chunk: int


@dataclass
class SourcePosition:
    """Per-source rows (`sequences`): rows taken from this source, and where its next row
    starts (None: at its beginning)."""

    rows: int
    snapshot: Optional[RowSnapshot]


def _snapshot_dict(snap: Optional[RowSnapshot]) -> Optional[dict]:
    return None if snap is None else {"drawn": snap.mixture.drawn,
                                      "counts": list(snap.mixture.counts),
                                      "first_chunk": snap.first_chunk}


def _snapshot(d: Optional[dict]) -> Optional[RowSnapshot]:
    return None if d is None else RowSnapshot(MixtureState(d["drawn"], list(d["counts"])),
                                              d["first_chunk"])


@dataclass
class LoaderState:
    rows: int  # global rows consumed
    snapshot: Optional[RowSnapshot]  # `documents`: where the next row starts (None: beginning)
    # What the data lost up to here ("skipped_<reason>", "dropped_images_row_limit"): stored
    # with the position, so a resumed run's counters continue instead of restarting at 0.
    counters: dict[str, int] = field(default_factory=dict)
    unit: str = "documents"  # data.mixture_unit the position refers to
    sources: Optional[list[SourcePosition]] = None  # `sequences`: one position per source

    def to_dict(self) -> dict:
        out = {"rows": self.rows, "snapshot": _snapshot_dict(self.snapshot),
               "counters": dict(self.counters), "unit": self.unit}
        if self.sources is not None:
            out["sources"] = [{"rows": p.rows, "snapshot": _snapshot_dict(p.snapshot)}
                              for p in self.sources]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        sources = None if d.get("sources") is None else [
            SourcePosition(p["rows"], _snapshot(p["snapshot"])) for p in d["sources"]]
        # Checkpoints written before data.mixture_unit existed hold per-document positions.
        return cls(d["rows"], _snapshot(d["snapshot"]), dict(d.get("counters", {})),
                   d.get("unit", "documents"), sources)


ReadDocument = Callable[[int, int, int, int], Optional[Document]]
"""(source, epoch, index, doc_id) -> Document, or None for a bad sample (skipped, counted)."""


class RowStream:
    """Global packed rows in order, each with the state to resume right after it."""

    def __init__(self, sampler: MixtureSampler, packer: Packer, read: ReadDocument,
                 start: Optional[LoaderState] = None):
        self.sampler, self.packer, self.read = sampler, packer, read
        self.start = start or LoaderState(0, None)
        if self.start.unit != "documents":
            raise ValueError(f"a loader position per {self.start.unit} cannot resume a stream "
                             "mixed per documents")
        self.skipped_documents = 0

    def _next_document(self) -> tuple[Document, MixtureState]:
        while True:
            before = self.sampler.state.copy()
            source, epoch, index = self.sampler.draw()
            doc = self.read(source, epoch, index, before.drawn)
            if doc is not None:
                return doc, before
            self.skipped_documents += 1

    def __iter__(self) -> Iterator[tuple[PackedRow, LoaderState]]:
        """Yields (row, state after consuming it); row numbering continues from the start."""
        rows = self.start.rows
        pending: list[tuple[PackedRow, RowSnapshot]] = []
        if self.start.snapshot is not None:
            self.sampler.state = self.start.snapshot.mixture.copy()
            # A position saved before a source was added drew nothing from it.
            missing = len(self.sampler.sizes) - len(self.sampler.state.counts)
            self.sampler.state.counts += [0] * missing
            doc, before = self._next_document()
            chunks = self.packer.chunks(doc)[self.start.snapshot.first_chunk:]
            pending += self._place(chunks, before, self.start.snapshot.first_chunk)
        while True:
            for row, snap in pending:
                rows += 1
                yield row, LoaderState(rows, snap)
            doc, before = self._next_document()
            pending = self._place(self.packer.chunks(doc), before, 0)

    def _place(self, chunks, before: MixtureState,
               first_index: int) -> list[tuple[PackedRow, RowSnapshot]]:
        closed = []
        for offset, chunk in enumerate(chunks):
            if self.packer.open and not self.packer.fits(chunk):
                row = self.packer.close_row()
                # The next row starts with this chunk of this document.
                closed.append((row, RowSnapshot(before.copy(), first_index + offset)))
            self.packer.place(chunk)
        return closed


class SourceRowStream:
    """`sequences`: each source packs its own documents into its own rows (one `RowStream`
    per source, own packer); the weights pick the source of each row. Yields like
    `RowStream`: (row, global state after it)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int,
                 make_packer: Callable[[], Packer], read: ReadDocument,
                 start: Optional[LoaderState] = None):
        self.weights = normalised_weights(sizes, weights)
        n = len(sizes)
        self.start = start or LoaderState(0, None, unit="sequences",
                                          sources=[SourcePosition(0, None)] * n)
        if self.start.sources is not None and len(self.start.sources) < n:
            # Saved before a source was added: no rows taken from it yet.
            missing = [SourcePosition(0, None)] * (n - len(self.start.sources))
            self.start = dataclasses.replace(self.start, sources=self.start.sources + missing)
        if self.start.unit != "sequences" or self.start.sources is None \
                or len(self.start.sources) != n:
            raise ValueError(f"a loader position per {self.start.unit} cannot resume a stream "
                             "mixed per sequences")
        self.streams: dict[int, RowStream] = {}
        for source in range(n):
            if self.weights[source] == 0:
                continue
            only = [float(s == source) for s in range(n)]
            position = self.start.sources[source]
            self.streams[source] = RowStream(
                MixtureSampler(sizes, only, seed), make_packer(),
                # Ids unique over sources: per-source draw number interleaved by source.
                lambda s, e, i, drawn, n=n: read(s, e, i, drawn * n + s),
                LoaderState(position.rows, position.snapshot))

    @property
    def skipped_documents(self) -> int:
        return sum(stream.skipped_documents for stream in self.streams.values())

    def __iter__(self) -> Iterator[tuple[PackedRow, LoaderState]]:
        positions = list(self.start.sources)
        rows = self.start.rows
        iterators = {source: iter(stream) for source, stream in self.streams.items()}
        while True:
            source = furthest_behind(self.weights, [p.rows for p in positions])
            row, after = next(iterators[source])
            positions[source] = SourcePosition(after.rows, after.snapshot)
            rows += 1
            yield row, LoaderState(rows, None, unit="sequences", sources=list(positions))


def row_stream(unit: str, sizes: list[int], weights: list[float], seed: int,
               make_packer: Callable[[], Packer], read: ReadDocument,
               start: Optional[LoaderState] = None) -> RowStream | SourceRowStream:
    """The global row stream for `data.mixture_unit` (see the module docstring)."""
    if unit == "sequences":
        return SourceRowStream(sizes, weights, seed, make_packer, read, start)
    if unit == "documents":
        return RowStream(MixtureSampler(sizes, weights, seed), make_packer(), read, start)
    raise ValueError(f"data.mixture_unit: unknown unit {unit!r}; choose one of "
                     f"{', '.join(MIXTURE_UNITS)}")


def rank_rows(stream: RowStream | SourceRowStream, dp_rank: int, dp_size: int
              ) -> Iterator[tuple[PackedRow, LoaderState]]:
    """This data-parallel rank's rows: row j after the start goes to rank j % dp_size.

    Each row comes with the global state after its whole group of dp_size rows, so all ranks
    hold the same state once they have consumed the same number of rows (a step end)."""
    mine: Optional[PackedRow] = None
    for row, state in stream:
        index = state.rows - 1 - stream.start.rows  # groups count from the resume point
        if index % dp_size == dp_rank:
            mine = row
        if index % dp_size == dp_size - 1:
            assert mine is not None
            yield mine, state
            mine = None


def source_shares(rows: list[PackedRow], num_sources: int = len(SOURCES)) -> dict[str, list]:
    """What each source realised over `rows`: share of rows (a row counts towards each
    source by its share of the row's real tokens, so per-source rows count whole), of real
    tokens, and of documents (chunks of one document count once)."""
    row_share, tokens, documents = [0.0] * num_sources, [0] * num_sources, [set() for _ in
                                                                          range(num_sources)]
    for row in rows:
        counts = torch.bincount(row.sources[row.sources >= 0], minlength=num_sources).tolist()
        real = sum(counts)
        for source, n in enumerate(counts):
            tokens[source] += n
            row_share[source] += n / real if real else 0.0
        seen = row.sources[row.document_ids >= 0]
        firsts = torch.ones_like(seen, dtype=torch.bool)
        ids = row.document_ids[row.document_ids >= 0]
        firsts[1:] = ids[1:] != ids[:-1]
        for doc_id, source in zip(row.doc_ids, seen[firsts].tolist()):
            documents[source].add(doc_id)
    total_tokens = sum(tokens) or 1
    total_docs = sum(len(d) for d in documents) or 1
    return {"rows": [r / max(len(rows), 1) for r in row_share],
            "tokens": [t / total_tokens for t in tokens],
            "documents": [len(d) / total_docs for d in documents]}

"""The 45/45/10 mixture and the global row stream, with state that resumes exactly.

Everything here is *global* and identical on every rank: the mixture decides which source
each next document comes from, the packer turns that document stream into rows, and row j
belongs to data-parallel rank j % dp. A rank reads every document's text (cheap) to plan the
rows but loads image bytes only for its own rows. Because the plan does not depend on the
number of ranks, the saved state (rows consumed + a snapshot of where the row after them
starts) resumes exactly at any DP size: no document repeated or skipped.

Source choice is deterministic and exact rather than random: the next document comes from
the source furthest below its target share (the greedy rule Megatron's blended datasets use),
so the realised mixture is within one document of the weights at every point. Inside a
source, documents follow a seeded permutation per epoch.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from mm1_megatron.data.packing import Document, Packer, PackedRow

SOURCES = ("interleaved", "caption", "text")


@dataclass
class MixtureState:
    drawn: int = 0  # documents drawn so far
    counts: list[int] = field(default_factory=lambda: [0] * len(SOURCES))


class MixtureSampler:
    """Global sequence of (source, epoch, index) draws over sources of given sizes."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        if len(sizes) != len(weights):
            raise ValueError("one weight per source")
        total = sum(w for w, n in zip(weights, sizes) if n > 0)
        if total <= 0:
            raise ValueError("every source with a positive weight is empty")
        # An empty source gets no share; the others are renormalised.
        self.weights = [w / total if n > 0 else 0.0 for w, n in zip(weights, sizes)]
        self.sizes, self.seed = sizes, seed
        self.state = MixtureState(counts=[0] * len(sizes))
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _permutation(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + source * 10_007 + epoch)
            self._perm_cache = {key: torch.randperm(self.sizes[source], generator=g)}
        return self._perm_cache[key]

    def draw(self) -> tuple[int, int, int]:
        st = self.state
        deficits = [w * (st.drawn + 1) - c for w, c in zip(self.weights, st.counts)]
        source = max(range(len(deficits)), key=lambda s: (deficits[s], -s))
        epoch, position = divmod(st.counts[source], self.sizes[source])
        st.counts[source] += 1
        st.drawn += 1
        return source, epoch, int(self._permutation(source, epoch)[position])


@dataclass
class RowSnapshot:
    """Where the row after a closed row starts: replay `document` (drawn from the mixture at
    `mixture`) from chunk `first_chunk`."""

    mixture: MixtureState
    first_chunk: int


@dataclass
class LoaderState:
    rows: int  # global rows consumed
    snapshot: Optional[RowSnapshot]  # None: from the very beginning
    # What the data lost up to here ("skipped_<reason>", "dropped_images_row_limit"): stored
    # with the position, so a resumed run's counters continue instead of restarting at 0.
    counters: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        snap = None if self.snapshot is None else {
            "drawn": self.snapshot.mixture.drawn, "counts": list(self.snapshot.mixture.counts),
            "first_chunk": self.snapshot.first_chunk}
        return {"rows": self.rows, "snapshot": snap, "counters": dict(self.counters)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        s = d["snapshot"]
        snap = None if s is None else RowSnapshot(MixtureState(s["drawn"], list(s["counts"])),
                                                  s["first_chunk"])
        return cls(d["rows"], snap, dict(d.get("counters", {})))


ReadDocument = Callable[[int, int, int, int], Optional[Document]]
"""(source, epoch, index, doc_id) -> Document, or None for a bad sample (skipped, counted)."""


class RowStream:
    """Global packed rows in order, each with the state to resume right after it."""

    def __init__(self, sampler: MixtureSampler, packer: Packer, read: ReadDocument,
                 start: Optional[LoaderState] = None):
        self.sampler, self.packer, self.read = sampler, packer, read
        self.start = start or LoaderState(0, None)
        self.skipped_documents = 0

    def _next_document(self) -> tuple[Document, MixtureState]:
        while True:
            before = copy.deepcopy(self.sampler.state)
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
            self.sampler.state = copy.deepcopy(self.start.snapshot.mixture)
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
                closed.append((row, RowSnapshot(copy.deepcopy(before), first_index + offset)))
            self.packer.open.append(chunk)
        return closed


def rank_rows(stream: RowStream, dp_rank: int, dp_size: int
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

"""Pack tokenized documents into fixed-length rows with at most N images each.

A document is a flat list of text token ids in which `IMAGE` (-1) marks one image; packing
expands every image into `tokens_per_image` placeholder ids (`llm.image_token_id`), which
the model overwrites with that image's connector outputs.

Rules (deterministic, order-preserving):
1. A document longer than a row is split into chunks of at most `seq_length` positions; a
   split never cuts through an image's placeholder run.
2. A chunk keeps at most `max_images` images: images past the limit are dropped from the
   chunk's tail (their text stays). Drops are counted.
3. Chunks are placed greedily in order: a chunk joins the open row if its positions and images
   fit, otherwise the open row is closed (padded) and a new one starts.
Labels are the next token within the same chunk; loss is off where the target is an image
placeholder, on each chunk's last position (no target across a boundary) and on padding. A
document with `trains` (a conversation: loss on the assistant's answers only) has loss exactly
where its target token trains.

Planning without text. A document may instead carry only its `layout` (`text token count | -1
per image` per run, from the dataset's token index): the same rules then give the same chunk
lengths and images, and `close_row` returns a `PlannedRow` (which chunks, no tensors). Only
the rank that owns a planned row reads and tokenizes its documents (`build_row`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch

IMAGE = -1  # marks one image inside a document's token list
PAD_DOCUMENT = -1  # document id of padding positions


@dataclass
class Document:
    doc_id: int  # global sample id (stable across resumes)
    source: int  # mixture source index (per-source loss reporting)
    tokens: Optional[list[int]]  # text ids with IMAGE markers; None: planned from `layout`
    images: list[Any] = field(default_factory=list)  # one payload per IMAGE, in order
    # Without tokens: per run, a text token count or IMAGE, in order (BOS/EOS included).
    layout: Optional[list[int]] = None
    origin: Any = None  # where to read the document back (planned rows)
    # Per token of `tokens` (markers included): whether predicting it carries loss. None: every
    # text token does (pre-training documents).
    trains: Optional[list[bool]] = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.layout is None):
            raise ValueError(f"document {self.doc_id}: give tokens or a layout, not both")
        if self.trains is not None and (self.tokens is None
                                        or len(self.trains) != len(self.tokens)):
            raise ValueError(f"document {self.doc_id}: one `trains` flag per token")
        markers = sum(1 for t in (self.tokens if self.tokens is not None else self.layout)
                      if t == IMAGE)
        if markers != len(self.images):
            raise ValueError(f"document {self.doc_id}: {markers} image markers but "
                             f"{len(self.images)} images")


@dataclass
class Chunk:
    doc_id: int
    source: int
    tokens: Optional[list[int]]  # IMAGE markers kept (not yet expanded); None when planned
    images: list[Any]
    length: int  # positions once images are expanded
    number: int = 0  # which chunk of its document
    origin: Any = None  # the document's `origin`
    void: bool = False  # unreadable when built: padding without loss in its slot
    trains: Optional[list[bool]] = None  # per kept token, as `Document.trains`


@dataclass
class PlannedRow:
    """A row planned from layouts: its chunks in order, without tokens."""

    chunks: list[Chunk]

    @property
    def images(self) -> list[Any]:
        return [payload for chunk in self.chunks for payload in chunk.images]

    @property
    def doc_ids(self) -> list[int]:
        return [c.doc_id for c in self.chunks]


@dataclass
class PackedRow:
    tokens: torch.Tensor  # [s] long
    labels: torch.Tensor  # [s] long
    loss_mask: torch.Tensor  # [s] float
    document_ids: torch.Tensor  # [s] long, PAD_DOCUMENT on padding
    sources: torch.Tensor  # [s] long, source of each position, -1 on padding
    images: list[Any]  # payloads in placeholder order
    doc_ids: list[int]  # documents (chunks) in the row, in order

    @property
    def real_tokens(self) -> int:
        return int((self.document_ids != PAD_DOCUMENT).sum())


@dataclass
class PackingStats:
    rows: int = 0
    real_tokens: int = 0
    slots: int = 0
    chunks_split: int = 0  # documents cut into more than one chunk
    images_dropped: int = 0
    chunks: int = 0
    chunk_positions: int = 0

    @property
    def efficiency(self) -> float:
        """Share of token slots that carry real tokens."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def one_per_row_efficiency(self, seq_length: int) -> float:
        """The same chunks padded one per row: the baseline packing is measured against."""
        return self.chunk_positions / (self.chunks * seq_length) if self.chunks else 0.0


class Packer:
    def __init__(self, seq_length: int, tokens_per_image: int, max_images: int,
                 image_token_id: int, pad_id: int = 0, stats: Optional[PackingStats] = None):
        """`stats`: shared with other packers (one per source when rows are per source)."""
        if tokens_per_image >= seq_length:
            raise ValueError(f"one image ({tokens_per_image} tokens) does not fit a row of "
                             f"{seq_length}")
        self.seq_length, self.k = seq_length, tokens_per_image
        self.max_images, self.image_token_id, self.pad_id = max_images, image_token_id, pad_id
        self.open: list[Chunk] = []
        self._open_length = self._open_images = 0  # running totals of `open` (fits)
        self.stats = stats if stats is not None else PackingStats()

    # -- chunking ------------------------------------------------------------------------
    def chunks(self, doc: Document) -> list[Chunk]:
        """Split and trim `doc` (rules 1 and 2), counting into `stats`."""
        out, dropped = self.split(doc)
        self.stats.images_dropped += dropped
        self.stats.chunks += len(out)
        self.stats.chunk_positions += sum(c.length for c in out)
        if len(out) > 1:
            self.stats.chunks_split += 1
        return out

    def split(self, doc: Document) -> tuple[list[Chunk], int]:
        """(chunks, images dropped), from the tokens or, planned, from the layout alone."""
        if doc.tokens is None:
            return self._split_layout(doc)
        pieces: list[list[int]] = [[]]  # token positions in the document
        lengths = [0]
        for at, token in enumerate(doc.tokens):
            width = self.k if token == IMAGE else 1
            if lengths[-1] + width > self.seq_length:
                pieces.append([])
                lengths.append(0)
            pieces[-1].append(at)
            lengths[-1] += width
        images = iter(doc.images)
        out, dropped = [], 0
        for piece in pieces:
            kept, payloads = [], []
            for at in piece:
                if doc.tokens[at] == IMAGE:
                    payload = next(images)
                    if len(payloads) == self.max_images:
                        dropped += 1
                        continue
                    payloads.append(payload)
                kept.append(at)
            tokens = [doc.tokens[at] for at in kept]
            length = sum(self.k if t == IMAGE else 1 for t in tokens)
            if length:
                trains = None if doc.trains is None else [doc.trains[at] for at in kept]
                out.append(Chunk(doc.doc_id, doc.source, tokens, payloads, length, len(out),
                                 doc.origin, trains=trains))
        return out, dropped

    def _split_layout(self, doc: Document) -> tuple[list[Chunk], int]:
        """The same rules as for tokens, on run lengths: a text run fills pieces up to
        `seq_length` and may be cut anywhere; an image starts a new piece if it does not fit."""
        s, k = self.seq_length, self.k
        lengths, images = [0], [0]  # per piece: positions, images
        for run in doc.layout:
            if run == IMAGE:
                if lengths[-1] + k > s:
                    lengths.append(0)
                    images.append(0)
                lengths[-1] += k
                images[-1] += 1
                continue
            while run > 0:
                if lengths[-1] == s:
                    lengths.append(0)
                    images.append(0)
                take = min(run, s - lengths[-1])
                lengths[-1] += take
                run -= take
        out, dropped, first_image = [], 0, 0
        for length, count in zip(lengths, images):
            kept = min(count, self.max_images)
            dropped += count - kept
            length -= (count - kept) * k
            if length:
                out.append(Chunk(doc.doc_id, doc.source, None,
                                 doc.images[first_image:first_image + kept], length, len(out),
                                 doc.origin))
            first_image += count
        return out, dropped

    # -- packing -------------------------------------------------------------------------
    def fits(self, chunk: Chunk) -> bool:
        return self._open_length + chunk.length <= self.seq_length and \
            self._open_images + len(chunk.images) <= self.max_images

    def place(self, chunk: Chunk) -> None:
        """Append `chunk` to the open row (the caller closed it first if it did not fit)."""
        self.open.append(chunk)
        self._open_length += chunk.length
        self._open_images += len(chunk.images)

    def add(self, doc: Document) -> list[PackedRow]:
        """Add one document; return the rows it closed (usually none or one)."""
        done = []
        for chunk in self.chunks(doc):
            if self.open and not self.fits(chunk):
                done.append(self.close_row())
            self.place(chunk)
        return done

    def flush(self) -> Optional[PackedRow]:
        return self.close_row() if self.open else None

    def pack(self, docs: Iterable[Document]) -> Iterator[PackedRow]:
        for doc in docs:
            yield from self.add(doc)
        last = self.flush()
        if last is not None:
            yield last

    def close_row(self) -> PackedRow | PlannedRow:
        """Close the open row: tensors, or a `PlannedRow` when its chunks were planned."""
        chunks, self.open = self.open, []
        self._open_length = self._open_images = 0
        self.stats.rows += 1
        self.stats.real_tokens += sum(c.length for c in chunks)
        self.stats.slots += self.seq_length
        if any(c.tokens is None for c in chunks):
            return PlannedRow(chunks)
        return self.build_row(chunks)

    def build_row(self, chunks: list[Chunk]) -> PackedRow:
        """The tensors of a row of tokenized chunks (a `void` chunk stays padding)."""
        s = self.seq_length
        tokens = torch.full((s,), self.pad_id, dtype=torch.long)
        doc_ids = torch.full((s,), PAD_DOCUMENT, dtype=torch.long)
        sources = torch.full((s,), -1, dtype=torch.long)
        loss_mask = torch.zeros(s)
        labels = torch.full((s,), self.pad_id, dtype=torch.long)
        images: list[Any] = []
        cursor = 0
        for index, chunk in enumerate(chunks):
            start = cursor
            if chunk.void:
                cursor += chunk.length
                continue
            # Expanded as one list, written with one copy (per-element tensor writes cost
            # ~1 us each, milliseconds per 4096-token row).
            ids, flags = expand_images(chunk.tokens, self.k, self.image_token_id, chunk.trains)
            cursor += len(ids)
            tokens[start:cursor] = torch.tensor(ids, dtype=torch.long)
            images += chunk.images
            # Unique id per chunk in the row: a split document's pieces are separate rows'
            # documents anyway, and neighbours must never attend to each other.
            doc_ids[start:cursor] = index
            sources[start:cursor] = chunk.source
            labels[start:cursor - 1] = tokens[start + 1:cursor]
            if chunk.trains is None:
                # The last placeholder of an image predicts the first caption token
                # (LLaVA-style); only targets that are placeholders carry no loss.
                loss_mask[start:cursor] = (labels[start:cursor] != self.image_token_id).float()
            else:  # a conversation: loss where the target token trains (the answers)
                loss_mask[start:cursor - 1] = torch.tensor(flags[1:], dtype=torch.float)
            loss_mask[cursor - 1] = 0.0  # no target across the boundary
        return PackedRow(tokens, labels, loss_mask, doc_ids, sources, images,
                         [c.doc_id for c in chunks])


def expand_images(tokens: list[int], tokens_per_image: int, image_token_id: int,
                  trains: Optional[list[bool]] = None) -> tuple[list[int], Optional[list[bool]]]:
    """A document's ids with IMAGE markers -> ids with every image as `tokens_per_image`
    placeholder ids (all its sub-images' tokens), and the per-token loss flags stretched to
    match when given (a placeholder never trains). Training rows, evaluation prompts and the
    answer loss all expand images here."""
    placeholders = [image_token_id] * tokens_per_image
    ids: list[int] = []
    for token in tokens:
        if token == IMAGE:
            ids += placeholders
        else:
            ids.append(token)
    if trains is None:
        return ids, None
    flags: list[bool] = []
    for token, flag in zip(tokens, trains):
        if token == IMAGE:
            flags += [False] * tokens_per_image
        else:
            flags.append(flag)
    return ids, flags


def segment_boundaries(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[b, s] document ids of a micro-batch -> (cu_seqlens [n + 1] int32, longest segment).

    The rows laid end to end as one sequence of b*s tokens, cut wherever the document changes
    and at every row start: each packed document is one segment, each run of padding another
    (it carries no loss). This is the `thd` form Transformer Engine's fused attention takes
    (Megatron-Core's PackedSeqParams), computed here on the host where reading the ids costs
    no device synchronisation.
    """
    b, s = document_ids.shape
    change = torch.ones(b, s, dtype=torch.bool)
    change[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    starts = change.reshape(-1).nonzero().flatten()
    cu_seqlens = torch.cat([starts, torch.tensor([b * s])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())

"""The training data loader: dataset index -> global row plan -> this rank's rows -> batches.

Every rank plans the same global rows (mixture.row_stream) from the datasets' token index
alone (`ShardDataset.layout`: token counts per text segment and the image positions; no shard
is read), takes rows j with j % dp == its rank, and only then reads and tokenizes those rows'
documents and decodes their images with DALI. The index must come from the run's tokenizer
(checked by sha256 at start). Bad samples (see shard_schema.BAD_REASONS) are skipped and
counted; an image that DALI cannot decode becomes a blank image and its document carries no
loss in that row (counted as `undecodable_image`), so a bad file never stalls or
desynchronises ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from mm1_megatron.config import Config
from mm1_megatron.config.blend import data_sources
from mm1_megatron.config.schema import DataConfig
from mm1_megatron.data.images import ImageDecoder
from mm1_megatron.data.mixture import SOURCES, LoaderState, rank_rows, row_stream
from mm1_megatron.data.packing import (IMAGE, Document, PackedRow, Packer, PackingStats,
                                       PlannedRow, segment_boundaries)
from mm1_megatron.data.prompt_format import Answer
from mm1_megatron.data.shard_index import tokenizer_record
from mm1_megatron.data.shard_reader import ShardDataset, open_dataset
from mm1_megatron.data.shard_schema import BadSample, DatasetError, SkipCounter
from mm1_megatron.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer
from mm1_megatron.runtime import pin_batch


@dataclass(frozen=True)
class ImageRef:
    """Where an image lives; resolved to bytes only on the rank that owns the row."""

    source: int
    index: int
    number: int


def document_tokens(tokenizer: Tokenizer, segments: list) -> list[int]:
    """[BOS] text / IMAGE markers in document order [EOS]."""
    return tokenized_document(tokenizer, segments)[0]


def image_tokens(cfg: Config) -> int:
    """Placeholder tokens per image: the connector's tokens for each of its sub-images."""
    return cfg.connector.num_tokens * cfg.vision.sub_images


def tokenized_document(tokenizer: Tokenizer, segments: list
                       ) -> tuple[list[int], Optional[list[bool]]]:
    """(tokens, which tokens carry loss as targets): [BOS] text / IMAGE markers [EOS]. A
    conversation's `Answer` segments (and the `</s>` closing each) train, nothing else does;
    a document without answers has no flags (every text target trains)."""
    tokens, trains = [BOS_ID], [False]
    for segment in segments:
        if isinstance(segment, int):
            piece, flag = [IMAGE], False
        elif isinstance(segment, Answer):
            piece, flag = tokenizer.encode(segment) + [EOS_ID], True
        else:
            piece, flag = tokenizer.encode(segment), False
        tokens += piece
        trains += [flag] * len(piece)
    tokens.append(EOS_ID)
    trains.append(False)
    return tokens, (trains if any(trains) else None)


DROPPED_IMAGES = "dropped_images_row_limit"


def dataset_fingerprint(d: DataConfig) -> dict[str, str]:
    """Per dataset stream ("caption", or "caption[1]" in a blend), a hash of its manifest and
    weight: a checkpoint remembers which data its loader position refers to."""
    out = {}
    for source in data_sources(d):
        manifest = source.folder / "manifest.json"
        if manifest.is_file():
            digest = hashlib.sha256(manifest.read_bytes())
            if d.blend:  # a position per stream means nothing under other weights
                digest.update(repr(source.weight).encode())
            out[source.name] = digest.hexdigest()[:16]
    return out


def check_token_index(datasets: list[Optional[ShardDataset]], tokenizer: Tokenizer) -> None:
    """Every dataset has the packer's token index, made with this tokenizer."""
    want = tokenizer_record(tokenizer)
    for ds in datasets:
        if ds is None:
            continue
        got = ds.tokenizer
        if got is None:
            raise DatasetError(f"{ds.folder}: no token index (prepared without --tokenizer); "
                               f"run: python tools/index_tokens.py {ds.folder} --tokenizer "
                               f"{tokenizer.path}")
        if got.get("sha256") != want["sha256"]:
            raise DatasetError(f"{ds.folder}: indexed with tokenizer {got.get('path')} (sha256 "
                               f"{str(got.get('sha256'))[:12]}), data.tokenizer_model is "
                               f"{tokenizer.path} (sha256 {want['sha256'][:12]}); re-index: "
                               f"python tools/index_tokens.py {ds.folder} --tokenizer "
                               f"{tokenizer.path}")


class MultimodalLoader:
    def __init__(self, cfg: Config, dp_rank: int, dp_size: int,
                 state: Optional[LoaderState] = None, log=print, decode_images: bool = True,
                 build_rows: bool = True):
        """`decode_images=False`: this rank neither reads nor decodes images (only the ranks
        that run the encoder, one per tensor-parallel group, do; the step shares them).
        `build_rows=False`: this rank plans (its loader state stays exact) but reads nothing
        and yields `None` micro-batches; the step receives them from the reading rank."""
        d = cfg.data
        self.tokenizer = Tokenizer.load(d.tokenizer_model)
        # One stream per dataset (data.path: one per kind, absent ones empty; data.blend: each
        # listed folder); the row plan draws from streams, a row's `sources` name its kind.
        self.sources = data_sources(d)
        self.kinds = [SOURCES.index(s.kind) for s in self.sources]
        self.datasets: list[Optional[ShardDataset]] = [
            open_dataset(s.folder) if d.blend or (s.folder / "manifest.json").exists() else None
            for s in self.sources]
        if not any(self.datasets):
            raise FileNotFoundError(f"{d.path}: no dataset folder ({', '.join(SOURCES)}) with a "
                                    "manifest.json")
        check_token_index(self.datasets, self.tokenizer)
        sizes = [len(ds) if ds is not None else 0 for ds in self.datasets]
        if state is not None and state.unit != d.mixture_unit:
            raise ValueError(f"data.mixture_unit={d.mixture_unit}: the checkpoint's loader "
                             f"position counts {state.unit}; resume with "
                             f"data.mixture_unit={state.unit} or start a new run")
        self.packing = PackingStats()  # shared by the packers (one per source: sequences)

        def packer(stats: Optional[PackingStats] = None) -> Packer:
            return Packer(d.seq_length, image_tokens(cfg), d.max_images_per_sequence,
                          cfg.llm.image_token_id, pad_id=PAD_ID, stats=stats)

        self.stream = row_stream(
            d.mixture_unit, sizes, [s.weight for s in self.sources], cfg.train.seed, lambda: packer(self.packing), self._document, state)
        self.rows = rank_rows(self.stream, dp_rank, dp_size)
        # Splits this rank's documents again once tokenized (stats-free: planning counted).
        self.builder = packer()
        self.decode_images = decode_images and build_rows
        self.build_rows = build_rows
        self.image_size = cfg.vision.image_size
        self.decoder = ImageDecoder(cfg.vision.image_size, batch_size=d.max_images_per_sequence,
                                    num_threads=d.num_workers, seed=cfg.train.seed,
                                    resize=cfg.vision.resize, tiles=cfg.vision.tiles) \
            if self.decode_images else None
        self.skips = SkipCounter(log=log)
        self.micro_batch_size = cfg.train.micro_batch_size
        self.image_token_id = cfg.llm.image_token_id
        self.tokens_per_image = image_tokens(cfg)  # placeholders per image (all sub-images)
        self.sub_images = cfg.vision.sub_images
        self.max_images = d.max_images_per_sequence
        self.state = state or self.stream.start
        for key, value in self.state.counters.items():  # resumed: the counts continue
            if key == DROPPED_IMAGES:
                self.packing.images_dropped = value
            elif key.startswith("skipped_"):
                self.skips.counts[key[len("skipped_"):]] = value

    def counters(self) -> dict[str, int]:
        """What the data lost so far: skipped samples per reason, images dropped at the
        per-row limit (TensorBoard `data/<key>`)."""
        out = {f"skipped_{reason}": n for reason, n in self.skips.snapshot().items()}
        out[DROPPED_IMAGES] = self.packing.images_dropped
        return out

    def _document(self, source: int, epoch: int, index: int, doc_id: int) -> Optional[Document]:
        """A document as the planner sees it: its layout from the index, nothing read."""
        try:
            runs = self.datasets[source].layout(index)
        except BadSample as err:
            self.skips.add(err)
            return None
        refs = [ImageRef(source, index, j) for j in range(runs.count(IMAGE))]
        return Document(doc_id, self.kinds[source], None, refs,
                        layout=[1, *runs, 1], origin=(source, index))  # + BOS, EOS

    def _build(self, planned: PlannedRow, samples: dict) -> PackedRow:
        """This rank's row: read and tokenize its documents (once per micro-batch, images too
        where this rank decodes), split them again and check each chunk matches the plan."""
        chunks = []
        for chunk in planned.chunks:
            source, index = chunk.origin
            try:
                if (source, index) not in samples:
                    samples[source, index] = self.datasets[source].read(
                        index, images=self.decode_images)
                sample = samples[source, index]
            except BadSample as err:  # the index said good; the shard changed since
                self.skips.add(err)
                chunks.append(dataclasses.replace(chunk, images=[], void=True))
                continue
            tokens, trains = tokenized_document(self.tokenizer, sample.segments)
            doc = Document(chunk.doc_id, self.kinds[source], tokens,
                           [ImageRef(source, index, j) for j in range(sample.num_images)],
                           trains=trains)
            real, _ = self.builder.split(doc)
            if chunk.number >= len(real) or real[chunk.number].length != chunk.length:
                ds = self.datasets[source]
                raise DatasetError(f"{ds.folder}: sample {index} ({ds.member_name(index, -1)}) "
                                   "tokenizes differently from its token index; re-run "
                                   f"tools/index_tokens.py {ds.folder} --tokenizer "
                                   f"{self.tokenizer.path}")
            chunks.append(real[chunk.number])
        return self.builder.build_row(chunks)

    def _image_bytes(self, refs: list[ImageRef], samples: dict) -> list[bytes]:
        out = []
        for ref in refs:
            key = (ref.source, ref.index)
            if key not in samples:
                samples[key] = self.datasets[ref.source].read(ref.index, images=True)
            out.append(samples[key].images[ref.number])
        return out

    def _images(self, rows: list[PackedRow], samples: dict
                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(images [n * sub_images, 3, H, W] in placeholder order (each image's sub-images
        together), or None where this rank does not decode; per-image flags, 0 for an
        undecodable image, whose sub-images stand in as blanks)."""
        refs = [ref for row in rows for ref in row.images]
        ok = torch.ones(len(refs))
        if not self.decode_images:
            return None, ok
        size = self.image_size
        if not refs:
            return torch.empty(0, 3, size, size), ok
        decoded, bad = self.decoder.decode(self._image_bytes(refs, samples))
        if not bad:
            return decoded, ok
        t = self.sub_images
        full = torch.zeros(len(refs), t, 3, size, size, dtype=decoded.dtype,
                           device=decoded.device)
        bad = set(bad)
        full[[i for i in range(len(refs)) if i not in bad]] = decoded.view(-1, t, 3, size, size)
        full = full.flatten(0, 1)
        for i in sorted(bad):
            ok[i] = 0.0
            self.skips.add(self._undecodable(refs[i], self.decoder.last_errors.get(i, "")))
        return full, ok

    def _undecodable(self, ref: ImageRef, detail: str) -> BadSample:
        ds = self.datasets[ref.source]
        shard = ds.shards[int(ds.samples[ref.index]["shard"])]
        return BadSample(shard, ds.member_name(ref.index, ref.number), "undecodable_image",
                         detail)

    def _image_starts(self, row: PackedRow) -> list[int]:
        """Position of each image's first placeholder. Consecutive images form one long run
        of placeholders, so runs are cut into blocks of `tokens_per_image`."""
        is_image = row.tokens == self.image_token_id
        position = torch.arange(is_image.numel())
        opens = is_image.clone()
        opens[1:] &= ~is_image[:-1]  # first placeholder of a run
        run_start = torch.cummax(torch.where(opens, position, -1), 0).values
        block_start = is_image & ((position - run_start) % self.tokens_per_image == 0)
        return position[block_start].tolist()

    def __iter__(self) -> Iterator[tuple[dict, LoaderState]]:
        """(micro-batch, global loader state after its rows) for this rank. At a step end
        the state is identical on every rank; it is what a checkpoint stores."""
        while True:
            rows = []
            for row, state in self.rows:
                rows.append(row)
                self.state = state
                if len(rows) == self.micro_batch_size:
                    break
            batch = self.collate(rows) if self.build_rows else None
            self.state = dataclasses.replace(self.state, counters=self.counters())
            yield batch, self.state

    def _check_image_slots(self, rows: list[PackedRow]) -> None:
        """Each row's placeholders are its images (the model only asserts this on the device,
        without a host sync), at most `data.max_images_per_sequence` of them."""
        k = self.tokens_per_image
        for i, row in enumerate(rows):
            slots = int((row.tokens == self.image_token_id).sum())
            if slots != len(row.images) * k or len(row.images) > self.max_images:
                raise ValueError(f"packed row {i} (documents {row.doc_ids}) has {slots} image "
                                 f"placeholder tokens for {len(row.images)} images x {k} tokens "
                                 f"(data.max_images_per_sequence={self.max_images})")

    def collate(self, rows: list[PackedRow | PlannedRow]) -> dict:
        samples: dict = {}  # (source, index) -> Sample, read once per micro-batch
        rows = [self._build(r, samples) if isinstance(r, PlannedRow) else r for r in rows]
        self._check_image_slots(rows)
        images, image_ok = self._images(rows, samples)
        tokens = torch.stack([r.tokens for r in rows])
        document_ids = torch.stack([r.document_ids for r in rows])
        cu_seqlens, max_seqlen = segment_boundaries(document_ids)
        # Which row and document each image belongs to: a document whose image could not be
        # decoded carries no loss in this row (applied here, and again by the step on ranks
        # that learn the flags from the decoding rank).
        owners = [(r, int(row.document_ids[start])) for r, row in enumerate(rows)
                  for start in self._image_starts(row)]
        image_rows = torch.tensor([r for r, _ in owners], dtype=torch.long)
        image_documents = torch.tensor([d for _, d in owners], dtype=torch.long)
        loss_mask = torch.stack([r.loss_mask for r in rows])
        if not bool((image_ok == 1).all()):  # host tensors here: no device sync
            loss_mask = drop_loss_of_undecoded(loss_mask, document_ids, image_rows,
                                               image_documents, image_ok)
        return pin_batch(dict(
            tokens=tokens,
            labels=torch.stack([r.labels for r in rows]),
            loss_mask=loss_mask,
            position_ids=torch.arange(tokens.shape[1]).expand(len(rows), -1),
            # Which packed document each position belongs to (the model's dense mask) and the
            # same as THD segment boundaries of the rows end to end (Transformer Engine).
            document_ids=document_ids,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            sources=torch.stack([r.sources for r in rows]),
            images=images,  # None where this rank does not decode
            image_ok=image_ok, image_rows=image_rows, image_documents=image_documents,
            sample_ids=[list(r.doc_ids) for r in rows],  # global sample ids per row
        ))


def drop_loss_of_undecoded(loss_mask: torch.Tensor, document_ids: torch.Tensor,
                           image_rows: torch.Tensor, image_documents: torch.Tensor,
                           image_ok: torch.Tensor) -> torch.Tensor:
    """`loss_mask` [b, s] without the positions of documents holding an undecodable image
    (`image_ok` 0), with tensor ops only (no host sync where the flags live on a GPU)."""
    if image_ok.numel() == 0:
        return loss_mask
    b = loss_mask.shape[0]
    in_row = image_rows[:, None, None] == torch.arange(b, device=loss_mask.device)[None, :, None]
    in_doc = document_ids[None] == image_documents[:, None, None]  # [n, b, s]
    dropped = ((in_row & in_doc).to(loss_mask.dtype) * (1 - image_ok)[:, None, None]).sum(0)
    return loss_mask * (dropped == 0).to(loss_mask.dtype)


class Prefetcher:
    """Runs an iterator in a background thread, `depth` items ahead, so reading, tokenizing
    and DALI decoding overlap the training step (both mostly release the GIL)."""

    _DONE = object()

    def __init__(self, iterator: Iterator, depth: int = 2):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._fill, args=(iterator,), daemon=True,
                                       name="mm1-data-prefetch")
        self.thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                self.queue.put(item)
        except BaseException as err:  # surfaced in the training thread
            self.queue.put(err)
        self.queue.put(self._DONE)

    def __iter__(self) -> "Prefetcher":
        return self

    def __next__(self):
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

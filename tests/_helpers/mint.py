"""MINT-1T's PDF subset as published (mlfoundations/MINT-1T-PDF-CC-2023-23), field for field,
written with webdataset's own TarWriter: CC-MAIN-2023-23-shard-0/CC-MAIN-<crawl>-NNNNN.tar,
one sample per PDF document, KEY = 32 hex digits:

    KEY.json  {"texts": [...], "images": [...]  aligned, exactly one non-null per position;
               image entries "page_<p>_image_<xref>", "image_metadata": [{height, page, sha256,
               width, xref}] one per image, "url", "pdf_name", "language_id_whole_page_fasttext",
               "bff_contained_ngram_count_before_dedupe", "previous_word_count"}
    KEY.tiff  the document's images, in order, as the pages of one multi-page TIFF

With MINT's failure cases as a reader meets them: lists not aligned, a document of images only,
a TIFF with fewer pages than the json names, a document whose TIFF is missing, a tar cut short.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

SHARD_FOLDER = "CC-MAIN-2023-23-shard-0"


@dataclass
class MintShards:
    folder: Path  # the subset's root (the shard folder lies inside)
    # key -> (segments: str text / int image number, the images' RGB colours) per good document
    good: dict[str, tuple[list[Union[str, int]], list[tuple[int, int, int]]]] = \
        field(default_factory=dict)
    keys: list[str] = field(default_factory=list)  # every document, in tar order


def colour(n: int) -> tuple[int, int, int]:
    """Image n's flat colour: far apart for n < 27, so a decoded page names its frame."""
    return (40 + 80 * (n % 3), 40 + 80 * (n // 3 % 3), 40 + 80 * (n // 9 % 3))


def multipage_tiff(colours: list[tuple[int, int, int]], size: tuple[int, int] = (20, 14)
                   ) -> bytes:
    from PIL import Image

    pages = [Image.new("RGB", (size[0] + 2 * j, size[1]), c) for j, c in enumerate(colours)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def write_mint(folder: Path, texts: list[str], docs: int = 6, shards: int = 2,
               misaligned: tuple[int, ...] = (), images_only: tuple[int, ...] = (),
               short_tiff: tuple[int, ...] = (), no_tiff: tuple[int, ...] = (),
               truncated_shard: Optional[int] = None) -> MintShards:
    """`docs` documents per shard; document n (0-based over all shards) has 1 + n % 3 images,
    each after a text from `texts`, and a closing text. `misaligned`: a text and an image share
    a position; `images_only`: no text; `short_tiff`: its TIFF lacks the last page (the
    decoder meets that); `no_tiff`: the json only; `truncated_shard`: that tar is cut inside
    its last document's TIFF."""
    import webdataset as wds

    out = MintShards(folder)
    shard_dir = folder / SHARD_FOLDER
    shard_dir.mkdir(parents=True, exist_ok=True)
    image_no = 0
    for shard in range(shards):
        tar = shard_dir / f"CC-MAIN-20230527223515-20230528013515-{shard:05d}.tar"
        last = None
        with open(tar, "wb") as f:
            sink = wds.TarWriter(f)
            for i in range(docs):
                n = shard * docs + i
                key = uuid.UUID(int=n + 1).hex
                segs: list[Union[str, int]] = []
                doc_texts: list[Optional[str]] = []
                doc_images: list[Optional[str]] = []
                colours, metadata = [], []
                for j in range(1 + n % 3):
                    text = texts[(n + j) % len(texts)]
                    if n not in images_only:
                        doc_texts.append(text)
                        doc_images.append(None)
                        segs.append(text)
                    name = f"page_{j}_image_{10 + 7 * j}"
                    doc_texts.append(None)
                    doc_images.append(name)
                    segs.append(j)
                    colours.append(colour(image_no % 27))
                    image_no += 1
                    metadata.append({"height": 14, "page": j, "width": 20 + 2 * j,
                                     "xref": 10 + 7 * j, "sha256": hashlib.sha256(
                                         name.encode()).hexdigest()})
                if n not in images_only:
                    doc_texts.append(texts[n % len(texts)].upper())
                    doc_images.append(None)
                    segs.append(texts[n % len(texts)].upper())
                if n in misaligned:
                    doc_texts[1] = "a caption where the image should be"
                meta = {"bff_contained_ngram_count_before_dedupe": n % 4,
                        "image_metadata": metadata, "images": doc_images,
                        "language_id_whole_page_fasttext": {"en": 0.93},
                        "pdf_name": f"{n}.pdf", "previous_word_count": 120 + n,
                        "texts": doc_texts,
                        "url": f"https://example.org/papers/{n}.pdf"}
                sample = {"__key__": key, "json": json.dumps(meta).encode()}
                if n not in no_tiff:
                    sample["tiff"] = multipage_tiff(colours[:-1] if n in short_tiff
                                                    else colours)
                    last = (key, sample["tiff"])
                sink.write(sample)
                out.keys.append(key)
                if not {n} & {*misaligned, *images_only, *short_tiff, *no_tiff}:
                    out.good[key] = (segs, colours)
            sink.close()
        if shard == truncated_shard and last is not None:
            data = tar.read_bytes()
            tar.write_bytes(data[:data.index(last[1]) + len(last[1]) // 2])
            out.good.pop(last[0], None)
    return out


# What `energon prepare --sample-type InterleavedSample` leaves to the user to write, filled in
# as energon's documentation does for this layout ("Interleaved Data and Arbitrary Image
# Count"): each json's images / texts zipped into the sample's sequence.
ENERGON_SAMPLE_LOADER = '''\
def sample_loader(raw: dict) -> dict:
    return dict(__key__=raw["__key__"],
                sequence=[raw[image] if text is None else text
                          for image, text in zip(raw["json"]["images"], raw["json"]["texts"])])


def part_filter(part: str) -> bool:
    return True
'''


def write_energon_interleaved(folder: Path, texts: list[str], docs: int = 4,
                              bad_shard: bool = True) -> MintShards:
    """Energon's interleaved layout: shard_N.tar with sample_NNNNNN.json ({"images": [null,
    "2345ew.jpg", ...], "texts": [...]}) and each image as its own part
    sample_NNNNNN.2345ew.jpg. `bad_shard`: shard_1.tar holds a document naming a part it
    lacks and one whose lists are not aligned (energon's own loader would stop at them)."""
    import webdataset as wds

    from PIL import Image

    out = MintShards(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "shard_0.tar", "wb") as f:
        sink = wds.TarWriter(f)
        for n in range(docs):
            key = f"sample_{n + 1:06d}"
            sample: dict = {"__key__": key}
            doc_texts, doc_images, segs, colours = [], [], [], []
            for j in range(1 + n % 2):
                doc_texts += [texts[(n + j) % len(texts)], None]
                part = f"{hashlib.sha1(f'{n}.{j}'.encode()).hexdigest()[:6]}.png"
                doc_images += [None, part]
                segs += [texts[(n + j) % len(texts)], j]
                colours.append(colour(2 * n + j))
                buf = io.BytesIO()
                Image.new("RGB", (16, 12), colours[-1]).save(buf, format="PNG")
                sample[part] = buf.getvalue()
            sample["json"] = json.dumps({"images": doc_images, "texts": doc_texts}).encode()
            sink.write(sample)
            out.keys.append(key)
            out.good[key] = (segs, colours)
        sink.close()
    if bad_shard:
        with open(folder / "shard_1.tar", "wb") as f:
            sink = wds.TarWriter(f)
            sink.write({"__key__": "sample_900001", "json": json.dumps(
                {"images": [None, "gone00.jpg"], "texts": ["a lost picture", None]}).encode()})
            sink.write({"__key__": "sample_900002", "json": json.dumps(
                {"images": [None, "x"], "texts": ["two", "at once"]}).encode()})
            sink.close()
    return out

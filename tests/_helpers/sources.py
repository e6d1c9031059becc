"""The published layouts mm1-prepare-data converts, field for field: OBELICS parquet, FineWeb
parquet, DCLM .jsonl.zst, MMC4 docs_shard_N_v2.jsonl; and `prepared_blend`, one dataset of
every format mm1-prepare-data reads, prepared and listed in a blend file."""

from __future__ import annotations

import json
from pathlib import Path

from tests._helpers.data import TEXT, jpeg, write_jsonl


def write_obelics(path: Path, rows: list[tuple[list, list]], image_type=None) -> Path:
    """OBELICS's columns (images, metadata, general_metadata, texts); `images` as given (bytes
    by default: what a user holds after downloading OBELICS's URLs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.dumps([{"document_url": "https://example.org/doc", "unformatted_src": None}])
    table = pa.table({
        "images": pa.array([r[1] for r in rows], pa.list_(image_type or pa.binary())),
        "metadata": [meta] * len(rows),
        "general_metadata": [json.dumps({"url": "https://example.org/doc",
                                         "warc_filename": "crawl.warc.gz"})] * len(rows),
        "texts": pa.array([r[0] for r in rows], pa.list_(pa.string())),
    })
    pq.write_table(table, path, row_group_size=2)
    return path


def write_fineweb(path: Path, texts: list[str]) -> Path:
    """FineWeb's columns: text, id, dump, url, date, file_path, language, language_score,
    token_count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = len(texts)
    pq.write_table(pa.table({
        "text": texts, "id": [f"<urn:uuid:{i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n, "url": [f"https://example.org/{i}" for i in range(n)],
        "date": ["2024-02-21T12:00:00Z"] * n,
        "file_path": ["s3://commoncrawl/crawl-data/x.warc.gz"] * n, "language": ["en"] * n,
        "language_score": [0.95] * n, "token_count": [12] * n}), path)
    return path


def dclm_record(n: int) -> dict:
    """One DCLM-baseline line: text plus its provenance and filter scores."""
    return {"bff_contained_ngram_count_before_dedup": 0,
            "language_id_whole_page_fasttext": {"en": 0.93},
            "metadata": {"Content-Length": "4096"}, "previous_word_count": 120,
            "text": f"{TEXT[n % len(TEXT)]} (document {n})", "url": f"https://example.org/{n}",
            "warcinfo": "isPartOf: CC-MAIN-2022-49",
            "fasttext_openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train_prob": 0.2}


def dclm_lines(numbers) -> bytes:
    return "".join(json.dumps(dclm_record(n)) + "\n" for n in numbers).encode()


def mmc4_doc(texts: list, infos: list) -> dict:
    """One MMC4 document: text_list, and image_info [{image_name, matched_text_index, ...}]."""
    return {"url": "https://example.org/post", "text_list": texts,
            "image_info": [{"image_name": name, "raw_url": f"https://cdn.example/{name}",
                            "matched_text_index": at, "matched_sim": 0.27,
                            "face_detections": None} for name, at in infos],
            "similarity_matrix": [[0.2] * len(texts)] * len(infos),
            "could_have_url_duplicate": 0}


def prepared_blend(root: Path, tokenizer) -> Path:
    """root/blend.yaml over one dataset of each format, each prepared in process with
    `tokenizer` (the command line's own path is tested apart):

        caption      img2dataset tars (in place), an `energon prepare`d folder (in place)
        interleaved  MINT-1T PDF tars (in place), OBELICS parquet, MMC4 + its image folder
        text         FineWeb parquet, DCLM .jsonl.zst
    """
    import zstandard

    from mm1_megatron.data.prepare import prepare
    from tests import _procs
    from tests._helpers.img2dataset import write_img2dataset
    from tests._helpers.mint import write_mint

    src, out = root / "sources", root / "prepared"

    def run(kind: str, name: str, paths: list[Path], images_root: Path = Path(".")) -> None:
        prepare(kind, paths, images_root, out / name, tokenizer=tokenizer, progress=False,
                log=lambda line: None)

    run("caption", "datacomp", [write_img2dataset(src / "datacomp", TEXT, shards=2,
                                                  samples_per_shard=6, failed=(3,)).folder])
    cc = write_img2dataset(src / "cc12m", TEXT[::-1], shards=1, samples_per_shard=8).folder
    made = _procs.run(["energon", "prepare", "--non-interactive", "--no-progress",
                       "--split-ratio", "1,0,0", "--sample-type", "CaptioningSample",
                       "--field-map", '{"image": "jpg", "caption": "txt"}', str(cc)],
                      capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    run("caption", "cc12m", [cc])
    run("interleaved", "mint", [write_mint(src / "mint", TEXT, docs=6, shards=2).folder])
    (src / "obelics").mkdir()
    run("interleaved", "obelics", [write_obelics(
        src / "obelics" / "train-00000-of-00001.parquet",
        [([TEXT[i], None, TEXT[-1 - i]], [None, jpeg(i), None]) for i in range(6)])])
    (src / "mmc4" / "images").mkdir(parents=True)
    for i in range(4):
        (src / "mmc4" / "images" / f"{i}.jpg").write_bytes(jpeg(20 + i))
    write_jsonl(src / "mmc4" / "docs_shard_0_v2.jsonl",
                [mmc4_doc([TEXT[i], TEXT[-1 - i]], [(f"{i}.jpg", 1)]) for i in range(4)])
    run("interleaved", "mmc4", [src / "mmc4" / "docs_shard_0_v2.jsonl"], src / "mmc4" / "images")
    (src / "fineweb").mkdir()
    run("text", "fineweb", [write_fineweb(src / "fineweb" / "000_00000.parquet",
                                          [" ".join(TEXT[i:] + TEXT[:i]) for i in range(6)])])
    (src / "dclm").mkdir()
    (src / "dclm" / "shard_00000000_processed.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(dclm_lines(range(8))))
    run("text", "dclm", [src / "dclm"])
    blend = root / "blend.yaml"
    blend.write_text("caption:\n  - {path: prepared/datacomp, weight: 0.7}\n"
                     "  - {path: prepared/cc12m, weight: 0.3}\n"
                     "interleaved:\n  - {path: prepared/mint}\n  - {path: prepared/obelics}\n"
                     "  - {path: prepared/mmc4}\n"
                     "text:\n  - {path: prepared/fineweb}\n  - {path: prepared/dclm}\n")
    return blend

"""What preparing MM1's data costs: samples per core-second of each stage of mm1-prepare-data
on sources with the recipe's sizes, the scale-out of its tasks from 1 to 2 workers, and from
those the core-hours and wall time for 2B image-text pairs, 141M interleaved documents
(OBELICS) and 1T text tokens.

    python benchmarks/prepare_at_scale.py [--repeats 3] [--page docs/data.md]
    python benchmarks/prepare_at_scale.py --quick        # seconds

Sources, written here with the sizes the recipe's data has:
  caption      img2dataset tars: ~50 KB images (random bytes: indexing never decodes one),
               captions of ~20 tokens
  interleaved  tars of documents in Energon's / MINT's layout (KEY.json's aligned texts /
               images, each image its own member): ~800 text tokens and 2 or 3 images (2.5 on
               average) of ~50 KB per document
  text         DCLM-like .jsonl.zst, documents of ~800 tokens
The tokenizer is a sentencepiece model trained here on the same kind of English text (the
token counts above are measured with it). Stages, each single-threaded in this process
through `data.prepare.prepare` (one DataTrove task), figure = samples per CPU-second:
  index        the caption tars indexed in place, no tokenizer
  tokenize     the same with the tokenizer (the token index: every caption tokenized)
  interleaved  the interleaved tars indexed in place with the tokenizer
  convert      the text converted into our shards with the tokenizer (also tokens / CPU-s)
Scale-out (the A/B row of the benchmark table): 96k pairs (small images: indexing reads
headers and captions) with the tokenizer in 4 tasks through DataTrove's local executor, 1
worker (baseline, in this process) against 2 workers (candidate: each a fresh interpreter),
samples per wall-second; 2.0 is linear on 2 cores. --quick's 1k pairs are too few for the
workers' start-up (~1-2 s) to vanish: its ratio says nothing of scaling. `--page docs/data.md` writes the cost table between
`<!-- prepare-cost:begin -->` and `<!-- prepare-cost:end -->`. The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import (compare, describe, emit, interleave, load_average,  # noqa: E402
                                machine)

WORDS = ("the a of and to in is was for on with as by at from that this it an be are or "
         "which has have had not but were their its also more one two first new after all "
         "other some time year city people world school state family during between "
         "under house river music water light small large early history church game team "
         "season album film station village island country road north south west east "
         "century war party member group company system market report design building "
         "picture photo view street garden mountain beach summer winter morning evening "
         "red blue green white black old young long short high low near open close").split()
BEGIN, END = "<!-- prepare-cost:begin -->", "<!-- prepare-cost:end -->"
# MM1's data (DESIGN.md): DFN-5B / DataComp-scale pairs, OBELICS documents, text tokens.
SCALE = {"pairs": 2e9, "documents": 141e6, "text_tokens": 1e12}
NODE_CORES = 64


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def text_of(rng: random.Random, words: int) -> str:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 20))
        out.append(sentence(rng, n))
        left -= n
    return " ".join(out)


def make_tokenizer(folder: Path, vocab: int) -> Path:
    """Our tokenizer's recipe (fixed special ids, byte fallback) on English-like text."""
    from mm1_megatron.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    return train_tokenizer((text_of(rng, 60) for _ in range(3000)), vocab, folder / "tok",
                           model_type="bpe", exact_vocab=False)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_captions(folder: Path, shards: int, per_shard: int, image_kb: int) -> int:
    """img2dataset-layout tars; returns the samples written."""
    rng = random.Random(1)
    folder.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                caption = sentence(rng, rng.randint(15, 22))
                _add(tar, f"{key}.jpg", os.urandom(image_kb * 1024))
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", json.dumps({"key": key, "caption": caption,
                                                     "status": "success"}).encode())
    return shards * per_shard


def write_documents(folder: Path, shards: int, per_shard: int, image_kb: int,
                    words: int) -> int:
    """Interleaved tars (KEY.json aligned lists, KEY.<name>.jpg members)."""
    rng = random.Random(2)
    folder.mkdir(parents=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"doc{shard:04d}{i:05d}"
                images = 2 + (i % 2)  # 2.5 on average
                texts, names = [], []
                for j in range(images + 1):
                    texts.append(text_of(rng, words // (images + 1)))
                    names.append(None)
                    if j < images:
                        texts.append(None)
                        names.append(f"im{j}.jpg")
                        _add(tar, f"{key}.im{j}.jpg", os.urandom(image_kb * 1024))
                _add(tar, f"{key}.json", json.dumps({"texts": texts, "images": names}).encode())
    return shards * per_shard


def write_text(folder: Path, files: int, per_file: int, words: int) -> int:
    import zstandard

    rng = random.Random(3)
    folder.mkdir(parents=True)
    for n in range(files):
        lines = "".join(json.dumps({"text": text_of(rng, words), "url": f"https://x/{n}/{i}"})
                        + "\n" for i in range(per_file))
        (folder / f"shard_{n:08d}_processed.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor().compress(lines.encode()))
    return files * per_file


def cpu_run(work) -> float:
    """CPU seconds of this process spent in `work` (children excluded: one worker runs here)."""
    c0 = time.process_time()
    work()
    return time.process_time() - c0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--page", help="write the cost table into this page (docs/data.md)")
    args = parser.parse_args(argv)
    size = dict(shards=8, per_shard=150, docs=60, text_files=4, per_file=60, vocab=4000,
                scale=96000)
    if args.quick:
        size = dict(shards=4, per_shard=30, docs=12, text_files=2, per_file=15, vocab=1000,
                    scale=1000)
        args.repeats, args.warmup = 5, 0
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    from loguru import logger

    logger.remove()  # DataTrove's per-task logs still go to their files
    from mm1_megatron.data.prepare import prepare
    from mm1_megatron.data.tokenizer import Tokenizer

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tok = Tokenizer.load(make_tokenizer(root, size["vocab"]))
        pairs = write_captions(root / "caption", size["shards"], size["per_shard"], 50)
        docs = write_documents(root / "interleaved", size["shards"], size["docs"], 50, 700)
        texts = write_text(root / "text", size["text_files"], size["per_file"], 700)
        # Scale-out: enough pairs that a worker's start (a fresh interpreter) is small beside
        # its work; small images, as indexing reads only headers and captions.
        scale_pairs = write_captions(root / "scale", 8, size["scale"] // 8, 2)
        for f in root.rglob("*.tar"):
            f.read_bytes()  # page cache warm: CPU cost, not the disk's

        def prep(kind: str, source: str, out: str, tokenizer=None, tasks: int = 1,
                 workers: int = 1) -> dict:
            shutil.rmtree(root / out, ignore_errors=True)
            manifest, _ = prepare(kind, [root / source], ".", root / out, tokenizer=tokenizer,
                                  progress=False, log=lambda _: None, tasks=tasks,
                                  workers=workers)
            return manifest

        stages: dict[str, dict] = {}
        for name, kind, source, tokenizer, count in (
                ("index", "caption", "caption", None, pairs),
                ("tokenize", "caption", "caption", tok, pairs),
                ("interleaved", "interleaved", "interleaved", tok, docs),
                ("convert", "text", "text", tok, texts)):
            seconds, manifest = [], {}
            for _ in range(2 if args.quick else args.repeats):
                seconds.append(cpu_run(lambda: manifest.update(
                    prep(kind, source, f"out-{name}", tokenizer))))
            best = min(seconds)
            stages[name] = {"samples": count, "cpu_s": round(best, 4),
                            "samples_per_core_s": round(count / best, 1)}
            if manifest.get("text_tokens"):
                stages[name]["tokens_per_sample"] = round(manifest["text_tokens"] / count, 1)
                stages[name]["tokens_per_core_s"] = round(manifest["text_tokens"] / best)
            print(f"{name}: {stages[name]}", flush=True)

        def scale(workers: int):
            def run() -> float:
                t0 = time.perf_counter()
                prep("caption", "scale", f"scale{workers}", tok, tasks=4, workers=workers)
                return scale_pairs / (time.perf_counter() - t0)
            return run

        one, two = interleave([scale(1), scale(2)], repeats=args.repeats, warmup=args.warmup)
    result = compare(one, two, unit="samples/s")
    print(describe("prepare tasks: 2 workers vs 1", result, fmt="{:,.0f}"))
    cost = cost_model(stages, result["ratio"])
    for line in cost_table(cost, stages, result["ratio"]):
        print(line)
    if args.page:
        write_page(Path(args.page), cost_table(cost, stages, result["ratio"]))
    emit("prepare_at_scale", result, valid=result["ratio"] > 1.0, load_before=load_before,
         quick=args.quick,
         baseline_is="4 tasks on 1 worker (DataTrove local executor)",
         candidate_is="4 tasks on 2 workers", stages=stages, cost=cost)
    return 0


def cost_model(stages: dict, scale_out: float) -> dict:
    """Core-hours per part of MM1's data from the measured rates; wall hours on N nodes of 64
    cores at the measured per-core efficiency of adding workers (scale_out / 2, at most 1)."""
    hours = {
        "pairs": SCALE["pairs"] / stages["tokenize"]["samples_per_core_s"] / 3600,
        "documents": SCALE["documents"] / stages["interleaved"]["samples_per_core_s"] / 3600,
        "text_tokens": SCALE["text_tokens"] / stages["convert"]["tokens_per_core_s"] / 3600,
    }
    efficiency = min(1.0, scale_out / 2)
    total = sum(hours.values())
    return {"core_hours": {k: round(v) for k, v in hours.items()},
            "total_core_hours": round(total), "efficiency": round(efficiency, 3),
            "wall_hours": {n: round(total / (NODE_CORES * n * efficiency), 2)
                           for n in (1, 8, 32)}}


def cost_table(cost: dict, stages: dict, scale_out: float) -> list[str]:
    info = machine()
    rows = [
        f"Measured {info['date'][:10]} on {info['cpus']} x {info['cpu']} (commit "
        f"{info['commit']}) by `python -m benchmarks --page docs/performance.md` (or `python "
        "benchmarks/prepare_at_scale.py --page docs/data.md` alone); CPU only, page cache "
        "warm: a cluster's file system adds its read time, which this does not model.",
        "",
        "| part of MM1's data | stage measured | rate per core | core-hours |",
        "|---|---|---|---|",
        f"| 2B image-text pairs (in place, with token index, "
        f"~{stages['tokenize'].get('tokens_per_sample', 0):.0f} tokens) | tokenize | "
        f"{stages['tokenize']['samples_per_core_s']:,.0f} pairs/s | "
        f"{cost['core_hours']['pairs']:,} |",
        f"| 141M interleaved documents (in place, ~"
        f"{stages['interleaved'].get('tokens_per_sample', 0):.0f} tokens, 2.5 images) | "
        f"interleaved | {stages['interleaved']['samples_per_core_s']:,.0f} docs/s | "
        f"{cost['core_hours']['documents']:,} |",
        f"| 1T text tokens (converted, .jsonl.zst) | convert | "
        f"{stages['convert']['tokens_per_core_s']:,.0f} tokens/s | "
        f"{cost['core_hours']['text_tokens']:,} |",
        f"| **total** | | | **{cost['total_core_hours']:,}** |",
        "",
        f"Index in place without a tokenizer: {stages['index']['samples_per_core_s']:,.0f} "
        f"pairs/s per core. Tasks on 2 workers vs 1: {scale_out:.2f}x (per-core efficiency "
        f"{cost['efficiency']:.0%}). Wall time at that efficiency: "
        + ", ".join(f"{h:,} h on {n} node{'s' * (int(n) > 1)} of {NODE_CORES} cores"
                    for n, h in cost["wall_hours"].items()) + ".",
    ]
    return rows


def write_page(page: Path, lines: list[str]) -> None:
    text = page.read_text()
    block = BEGIN + "\n" + "\n".join(lines) + "\n" + END
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)
    else:
        raise SystemExit(f"{page}: no {BEGIN} ... {END} markers to write between")
    page.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

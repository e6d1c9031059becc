"""Preparing img2dataset shards: indexed in place against rewritten into our shards.

    python benchmarks/prepare_in_place.py [--shards 8 --per-shard 250 --repeats 3]
    python benchmarks/prepare_in_place.py --quick        # seconds

The source is img2dataset's webdataset output (NNNNN.tar of KEY.jpg / KEY.txt / KEY.json,
NNNNN_stats.json beside it) with realistic sizes: JPEGs of ~50 KB (a photo-like 384 x 384
image, 30-word captions). Interleaved rounds (measure.interleave), both sides single-threaded
in this process, page cache warm for both:
  in place (candidate): `data.sources.webdataset.index_in_place` - scan the tar headers, read
          each caption, write the index and manifest (what `mm1-prepare-data` does with them);
  rewrite  (baseline):  read every sample's members from the tars and write them into our
          shards with their index (`shard_writer.write_dataset`: what a loose-file or JSONL
          source costs, and what every format that is converted costs).
Figure: samples per CPU-second of this process (one core's throughput). Also reported: the
bytes each side writes against the source's bytes (the in-place output holds no image byte).
The last line is JSON (benchmarks/measure.py).
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import (compare, describe, emit, interleave, load_average,  # noqa: E402
                                timed)

WORDS = "a photo of the red house by the river under blue sky with two dogs".split()


def photo_jpegs(count: int, size: int = 384) -> list[bytes]:
    """Distinct photo-like JPEGs of ~50 KB (smooth gradients with grain: flat colour or pure
    noise would give sizes no camera does)."""
    import numpy as np
    from PIL import Image

    out = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:size, 0:size] / size
        base = np.stack([np.sin(6 * x + seed), np.cos(5 * y - seed), np.sin(4 * (x + y))], -1)
        pixels = (base * 80 + 128 + rng.normal(0, 12, (size, size, 3))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def write_source(folder: Path, shards: int, per_shard: int) -> int:
    """img2dataset-layout shards; returns their bytes."""
    folder.mkdir(parents=True)
    images = photo_jpegs(16)
    digits = len(str(per_shard - 1))
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard * 10 ** digits + i:0{5 + digits}d}"
                caption = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))
                meta = {"url": f"https://example.com/{key}.jpg", "caption": caption,
                        "key": key, "status": "success", "error_message": None,
                        "width": 384, "height": 384}
                for ext, data in (("jpg", images[(shard + i) % len(images)]),
                                  ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(
            {"count": per_shard, "successes": per_shard, "failed_to_download": 0}))
    return sum(p.stat().st_size for p in folder.glob("*.tar"))


def rewrite(source: Path, out: Path) -> None:
    from mm1_megatron.data.shard_writer import RawSample, write_dataset

    def samples():
        for tar_path in sorted(source.glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                members: dict[str, dict[str, bytes]] = {}
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    members.setdefault(key, {})[ext] = tar.extractfile(info).read()
            for parts in members.values():
                yield RawSample([0, parts["txt"].decode()], [("jpg", parts["jpg"])])

    write_dataset(samples(), out, "caption")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.per_shard, args.repeats = 2, 40, 5
    from mm1_megatron.data.sources.webdataset import index_in_place

    load_before = load_average()
    samples = args.shards * args.per_shard
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source_bytes = write_source(root / "src", args.shards, args.per_shard)
        for tar in (root / "src").glob("*"):
            tar.read_bytes()  # warm: both sides read from the page cache
        written: dict[str, int] = {}
        cpu: dict[str, list[float]] = {"in_place": [], "rewrite": []}

        def side(name: str):
            def run() -> float:
                out = root / name
                shutil.rmtree(out, ignore_errors=True)
                if name == "in_place":
                    out.mkdir()
                    timed(lambda: index_in_place([root / "src"], "caption", out), cpu[name])
                else:
                    timed(lambda: rewrite(root / "src", out), cpu[name])
                written[name] = folder_bytes(out)
                return samples / cpu[name][-1]
            return run

        base, cand = interleave([side("rewrite"), side("in_place")], repeats=args.repeats,
                                warmup=args.warmup)
    result = compare(base, cand, unit="samples/CPU-s")
    print(describe("prepare in place vs rewrite", result, fmt="{:,.0f}"))
    fraction = written["in_place"] / source_bytes
    print(f"bytes written: in place {written['in_place']:,} ({fraction:.2%} of the source's "
          f"{source_bytes:,}), rewrite {written['rewrite']:,}")
    emit("prepare_in_place", result, valid=written["in_place"] < 0.05 * source_bytes,
         load_before=load_before, samples=samples,
         baseline_is="rewrite into our shards (shard_writer.write_dataset)",
         candidate_is="index in place (data.sources.webdataset.index_in_place)",
         bytes={"source": source_bytes, "in_place": written["in_place"],
                "rewrite": written["rewrite"], "in_place_fraction": round(fraction, 5)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

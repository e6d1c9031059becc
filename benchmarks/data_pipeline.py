"""Data pipeline throughput: DALI CPU image decoding against a PIL + torch baseline.

Both sides do the same work on the same JPEGs in the same run with the same number of threads:
decode, resize the centred square window to `image_size` x `image_size` with a cubic filter,
CLIP-normalise to float32 CHW, batch. Figures are images/s per CPU core (= per thread).

    python benchmarks/data_pipeline.py [--num-images 200] [--image-size 378] [--threads N]

The last line printed is one JSON object (DESIGN.md conventions).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mm1_megatron.data.images import CLIP_MEAN, CLIP_STD, ImageDecoder

# Real photographs shipped inside scikit-image (no network); synthetic images if it is absent.
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                  "hubble_deep_field", "retina")
SIZES = ((640, 480), (800, 600), (1024, 768), (480, 640), (768, 1024), (960, 720))


def _photos() -> tuple[list[np.ndarray], str]:
    try:
        import skimage.data
        photos = [getattr(skimage.data, name)()[..., :3] for name in SKIMAGE_PHOTOS]
        return photos, "scikit-image sample photos"
    except Exception:  # noqa: BLE001 - skimage missing or a sample not on disk
        rng = np.random.default_rng(0)
        x = np.linspace(0, 255, 800)[None, :, None]
        y = np.linspace(0, 255, 600)[:, None, None]
        photos = [np.clip(x * a + y * (1 - a) + rng.normal(0, 25, (600, 800, 3)), 0, 255)
                  .astype(np.uint8) for a in (0.2, 0.5, 0.8)]
        return photos, "synthetic gradients + noise"


def make_jpegs(n: int, seed: int = 0) -> tuple[list[bytes], str]:
    """`n` quality-90 JPEGs of 0.3-0.8 MPix: photos rescaled, with sensor-like noise so the
    entropy (and hence decode cost) stays photo-like after upscaling."""
    photos, source = _photos()
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        im = Image.fromarray(photos[i % len(photos)]).resize((w, h), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) + rng.normal(0, 4, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out, source


def _batches(images: Sequence[bytes], batch_size: int) -> list[Sequence[bytes]]:
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


class Rate(NamedTuple):
    wall: float  # images per wall-clock second
    cpu: float  # images per CPU-second of this process (all its threads): per-core cost,
    # robust to other processes sharing the cores, which wall-clock figures are not


def _rate(run_pass: Callable[[], int], repeats: int) -> Rate:
    run_pass()  # warm-up: thread pools, allocator, page cache
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n = run_pass()
        wall.append(n / (time.perf_counter() - t0))
        cpu.append(n / (time.process_time() - c0))
    return Rate(statistics.median(wall), statistics.median(cpu))


def measure_dali(images: Sequence[bytes], size: int, threads: int, batch_size: int,
                 repeats: int) -> Rate:
    """Throughput of `ImageDecoder` on device "cpu" with `threads` DALI worker threads."""
    decoder = ImageDecoder(size, batch_size=batch_size, num_threads=threads, device="cpu")

    def run_pass() -> int:
        n = 0
        for batch in _batches(images, batch_size):
            out, bad = decoder.decode(batch)
            assert not bad, decoder.last_errors
            n += out.shape[0]
        return n

    return _rate(run_pass, repeats)


def pil_preprocess(data: bytes, size: int) -> torch.Tensor:
    """The baseline for one image: PIL decode + BICUBIC resize of the centred square, torch
    normalise. (Same window as the DALI pipeline, so neither side resizes pixels it crops.)"""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.resize((size, size), Image.BICUBIC,
                   box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float().div_(255)
    return x.sub_(_MEAN).div_(_STD)


_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def measure_pil(images: Sequence[bytes], size: int, threads: int, batch_size: int,
                repeats: int) -> Rate:
    """Throughput of `pil_preprocess` on a pool of `threads` threads (PIL releases the GIL while
    decoding and resizing), batched into one tensor like the DALI output."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per pool thread, as DALI's workers; no oversubscription
    try:
        with ThreadPoolExecutor(threads) as pool:
            def run_pass() -> int:
                n = 0
                for batch in _batches(images, batch_size):
                    n += torch.stack(list(pool.map(lambda b: pil_preprocess(b, size),
                                                   batch))).shape[0]
                return n

            return _rate(run_pass, repeats)
    finally:
        torch.set_num_threads(torch_threads)


def measure_packing(data_dir: str, seq_length: int, max_images: int, tokens_per_image: int,
                    rows: int) -> dict:
    """Plan `rows` global rows from the demo shards (text only, one core) and compare the
    packing efficiency with one document per row, on the same documents."""
    import itertools
    import time

    from mm1_megatron.config import load_config
    from mm1_megatron.data.loader import MultimodalLoader

    cfg = load_config("demo", [f"data.path={data_dir}",
                               f"data.tokenizer_model={data_dir}/tokenizer.model",
                               f"data.seq_length={seq_length}",
                               f"data.max_images_per_sequence={max_images}",
                               f"connector.num_tokens={tokens_per_image}",
                               "vision.image_size=378"])
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    start = time.process_time()
    list(itertools.islice(loader.stream, rows))
    seconds = time.process_time() - start
    one_per_row = loader.packing.one_per_row_efficiency(seq_length)
    return {"rows_per_s_per_core": round(rows / seconds, 1),
            "efficiency": round(loader.packing.efficiency, 4),
            "one_per_row_efficiency": round(one_per_row, 4),
            "efficiency_ratio": round(loader.packing.efficiency / one_per_row, 2)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=378)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)

    parser.add_argument("--packing-rows", type=int, default=200)
    args = parser.parse_args(argv)

    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as data_dir:
        subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "tools"
                                            / "make_demo_data.py"), "--output", data_dir],
                       check=True, capture_output=True)
        # The recipe's rows (4096 tokens, <= 16 images of 144 tokens) and the demo's.
        packing = {"mm1": measure_packing(data_dir, 4096, 16, 144, args.packing_rows),
                   "demo": measure_packing(data_dir, 256, 8, 16, args.packing_rows)}

    images, source = make_jpegs(args.num_images)
    mpix = sum(Image.open(io.BytesIO(b)).size[0] * Image.open(io.BytesIO(b)).size[1]
               for b in images) / len(images) / 1e6
    kw = {"size": args.image_size, "threads": args.threads, "batch_size": args.batch_size,
          "repeats": args.repeats}
    dali = measure_dali(images, **kw)
    pil = measure_pil(images, **kw)
    load = os.getloadavg()[0]
    result = {
        "benchmark": "data_pipeline",
        # Per core = wall-clock rate / threads (cores given to the pipeline).
        "dali_images_per_s_per_core": round(dali.wall / args.threads, 2),
        "pil_images_per_s_per_core": round(pil.wall / args.threads, 2),
        "ratio": round(dali.wall / pil.wall, 3),
        # Per CPU-second actually consumed: the load-independent view of the same comparison.
        "dali_images_per_cpu_s": round(dali.cpu, 2),
        "pil_images_per_cpu_s": round(pil.cpu, 2),
        "cpu_ratio": round(dali.cpu / pil.cpu, 3),
        "baseline": "PIL decode + BICUBIC resize + torch normalise, same threads",
        "image_size": args.image_size,
        "threads": args.threads,
        "num_images": len(images),
        "mean_source_mpix": round(mpix, 3),
        "images": source,
        "batch_size": args.batch_size,
        "load_avg_1min": round(load, 2),
        "packing_mm1_4096": packing["mm1"],
        "packing_demo_256": packing["demo"],
    }
    print(f"{len(images)} JPEGs ({source}, mean {mpix:.2f} MPix) -> "
          f"{args.image_size}x{args.image_size}, {args.threads} threads, batch {args.batch_size}, "
          f"load average {load:.2f} on {os.cpu_count()} cores")
    for name, r in (("DALI CPU pipeline", dali), ("PIL + torch", pil)):
        print(f"  {name:18s}: {r.wall:7.1f} images/s = {r.wall / args.threads:6.1f} per core;"
              f" {r.cpu:6.1f} per CPU-second")
    print(f"  ratio DALI / PIL  : {dali.wall / pil.wall:.2f}x wall-clock,"
          f" {dali.cpu / pil.cpu:.2f}x per CPU-second")
    for name, pk in packing.items():
        print(f"  packing ({name}): {pk['rows_per_s_per_core']} rows/s per core, efficiency "
              f"{pk['efficiency']:.1%} vs {pk['one_per_row_efficiency']:.1%} one document "
              f"per row ({pk['efficiency_ratio']}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

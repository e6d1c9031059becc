"""Data pipeline throughput: DALI CPU image decoding against a PIL + torch baseline.

    python benchmarks/data_pipeline.py [--num-images 200] [--image-size 378] [--threads N]
    python benchmarks/data_pipeline.py --quick        # 48 images, seconds

Both sides do the same work on the same JPEGs in one process with the same number of threads:
decode, resize the centred square window to `image_size` x `image_size` with a cubic filter,
CLIP-normalise to float32 CHW, batch.
  PIL  (baseline):  `pil_preprocess` on a pool of `--threads` threads, torch on one thread each;
  DALI (candidate): `mm1_megatron.data.images.ImageDecoder(device="cpu")`, `--threads` workers.
One pass over all images is one repeat; passes are interleaved PIL, DALI, PIL, DALI ... after
a warm-up round (measure.interleave). Figures: images per wall-clock second (the ratio), and
images per CPU-second of the process (`cpu_time`: robust to other processes on the cores).
Also reported, not compared: the packer's planning rate and packing efficiency.
The last line is JSON (benchmarks/measure.py).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.measure import (compare, describe, emit, interleave, load_average,  # noqa: E402
                                timed)
from mm1_megatron.data.images import CLIP_MEAN, CLIP_STD, ImageDecoder  # noqa: E402

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


def dali_pass(images: Sequence[bytes], size: int, threads: int,
              batch_size: int) -> Callable[[], int]:
    """One pass of `ImageDecoder` on device "cpu" with `threads` DALI worker threads."""
    decoder = ImageDecoder(size, batch_size=batch_size, num_threads=threads, device="cpu")

    def run_pass() -> int:
        n = 0
        for batch in _batches(images, batch_size):
            out, bad = decoder.decode(batch)
            assert not bad, decoder.last_errors
            n += out.shape[0]
        return n

    return run_pass


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


def pil_pass(images: Sequence[bytes], size: int, batch_size: int,
             pool: ThreadPoolExecutor) -> Callable[[], int]:
    """One pass of `pil_preprocess` on `pool` (PIL releases the GIL while decoding and
    resizing), batched into one tensor like the DALI output, torch on one thread per pool
    thread as DALI's workers (no oversubscription); torch's setting is restored after."""
    def run_pass() -> int:
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            n = 0
            for batch in _batches(images, batch_size):
                n += torch.stack(list(pool.map(lambda b: pil_preprocess(b, size),
                                               batch))).shape[0]
            return n
        finally:
            torch.set_num_threads(torch_threads)

    return run_pass


def side(run_pass: Callable[[], int], cpu_rates: list[float]) -> Callable[[], float]:
    """A side for measure.interleave: images per wall-clock second of one pass; images per
    CPU-second of this process (all its threads) go to `cpu_rates`."""
    def run() -> float:
        counted: list[int] = []
        cpu: list[float] = []
        seconds = timed(lambda: counted.append(run_pass()), cpu)
        cpu_rates.append(counted[0] / cpu[0])
        return counted[0] / seconds

    return run


def measure_packing(data_dir: str, seq_length: int, max_images: int, tokens_per_image: int,
                    rows: int) -> dict:
    """Plan `rows` global rows from the demo shards (text only, one core) and compare the
    packing efficiency with one document per row, on the same documents."""
    import itertools

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
    parser.add_argument("--repeats", type=int, default=7, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run and dropped")
    parser.add_argument("--packing-rows", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="48 images, 5 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_images, args.batch_size, args.repeats, args.packing_rows = 48, 16, 5, 50

    load_before = load_average()
    with tempfile.TemporaryDirectory() as data_dir:
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                        data_dir], check=True, capture_output=True)
        # The recipe's rows (4096 tokens, <= 16 images of 144 tokens) and the demo's.
        packing = {"mm1": measure_packing(data_dir, 4096, 16, 144, args.packing_rows),
                   "demo": measure_packing(data_dir, 256, 8, 16, args.packing_rows)}

    images, source = make_jpegs(args.num_images)
    mpix = sum(Image.open(io.BytesIO(b)).size[0] * Image.open(io.BytesIO(b)).size[1]
               for b in images) / len(images) / 1e6
    size, threads, batch = args.image_size, args.threads, args.batch_size
    pil_cpu: list[float] = []
    dali_cpu: list[float] = []
    with ThreadPoolExecutor(threads) as pool:
        pil, dali = interleave([side(pil_pass(images, size, batch, pool), pil_cpu),
                                side(dali_pass(images, size, threads, batch), dali_cpu)],
                               repeats=args.repeats, warmup=args.warmup)
    result = compare(pil, dali, unit="images/s")
    cpu = compare(pil_cpu[args.warmup:], dali_cpu[args.warmup:], unit="images/CPU-s")
    print(f"{len(images)} JPEGs ({source}, mean {mpix:.2f} MPix) -> {size}x{size}, {threads} "
          f"threads, batch {batch}, {os.cpu_count()} cores")
    print(describe("data_pipeline DALI vs PIL, wall-clock", result, fmt="{:.1f}"))
    print(describe("data_pipeline DALI vs PIL, per CPU-second", cpu, fmt="{:.1f}"))
    for name, pk in packing.items():
        print(f"  packing ({name}): {pk['rows_per_s_per_core']} rows/s per core, efficiency "
              f"{pk['efficiency']:.1%} vs {pk['one_per_row_efficiency']:.1%} one document "
              f"per row ({pk['efficiency_ratio']}x)")
    return emit("data_pipeline", result, load_before=load_before, cpu_time=cpu,
                # Per core = wall-clock rate / threads (cores given to the pipeline).
                dali_images_per_s_per_core=round(result["candidate"]["median"] / threads, 2),
                pil_images_per_s_per_core=round(result["baseline"]["median"] / threads, 2),
                baseline_is="PIL decode + BICUBIC resize + torch normalise, same threads",
                candidate_is="mm1_megatron.data.images.ImageDecoder, DALI CPU operators",
                image_size=size, threads=threads, num_images=len(images),
                mean_source_mpix=round(mpix, 3), images=source, batch_size=batch,
                packing_mm1_4096=packing["mm1"], packing_demo_256=packing["demo"])


if __name__ == "__main__":
    main()

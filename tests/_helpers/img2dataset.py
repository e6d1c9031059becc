"""img2dataset's webdataset output, field for field (`output_format="webdataset"`), written
with webdataset's own TarWriter: NNNNN.tar holding KEY.jpg / KEY.txt / KEY.json per
downloaded sample and NNNNN_stats.json beside it, with img2dataset's failure cases (a failed
download: a stats count and no members; a whole shard missing; a caption without its image; a
tar cut short), and NNNNN.parquet beside each tar with one row per URL of the shard, failed
downloads included (status, error_message)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class Img2DatasetShards:
    folder: Path
    # key -> (caption, image bytes) of every sample a reader should return
    good: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    failed_downloads: int = 0


def jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A JPEG with some texture (flat colour compresses to nothing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_img2dataset(folder: Path, captions: list[str], shards: int = 3,
                      samples_per_shard: int = 4, image_size: tuple[int, int] = (24, 16),
                      failed: tuple[int, ...] = (), missing_shards: tuple[int, ...] = (),
                      no_image: tuple[int, ...] = (), truncated_shard: Optional[int] = None
                      ) -> Img2DatasetShards:
    """Sample n (0-based over all shards) gets captions[n % len]; `failed`: sample numbers
    whose download failed; `missing_shards`: shard numbers never written; `no_image`: samples
    written with KEY.txt / KEY.json only; `truncated_shard`: that tar is cut inside the image
    of its last sample."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    oom_shards = 5  # img2dataset: "00000.tar" ...
    oom_samples = math.ceil(math.log10(samples_per_shard))
    out = Img2DatasetShards(folder)
    for shard in range(shards):
        name = str(shard).zfill(oom_shards)
        successes = failures = 0
        last_image = None
        rows: list[dict] = []  # the shard's parquet: every URL it was given
        if shard not in missing_shards:
            with open(folder / f"{name}.tar", "wb") as f:
                sink = wds.TarWriter(f)
                for i in range(samples_per_shard):
                    n = shard * samples_per_shard + i
                    key = str(shard * 10 ** oom_samples + i).zfill(oom_shards + oom_samples)
                    url = f"https://example.com/images/{n}.jpg"
                    if n in failed:
                        failures += 1
                        rows.append({"url": url, "caption": captions[n % len(captions)],
                                     "key": key, "status": "failed_to_download",
                                     "error_message": "<urlopen error [Errno -2] Name or "
                                                      "service not known>",
                                     "width": None, "height": None, "original_width": None,
                                     "original_height": None, "exif": None, "sha256": None})
                        continue
                    caption, image = captions[n % len(captions)], jpeg(n, image_size)
                    meta = {"url": url, "caption": caption,
                            "key": key, "status": "success", "error_message": None,
                            "width": image_size[0], "height": image_size[1],
                            "original_width": 2 * image_size[0],
                            "original_height": 2 * image_size[1], "exif": "{}",
                            "sha256": hashlib.sha256(image).hexdigest()}
                    rows.append(meta)
                    sample = {"__key__": key, "txt": caption, "json": json.dumps(meta).encode()}
                    if n not in no_image:
                        sample["jpg"] = image
                        last_image = (key, image)
                        out.good[key] = (caption, image)
                    sink.write(sample)
                    successes += 1
                sink.close()
            if shard == truncated_shard and last_image is not None:
                data = (folder / f"{name}.tar").read_bytes()
                cut = data.index(last_image[1]) + len(last_image[1]) // 2
                (folder / f"{name}.tar").write_bytes(data[:cut])
                del out.good[last_image[0]]
            now = time.time()
            stats = {"count": successes + failures, "successes": successes,
                     "failed_to_download": failures, "failed_to_resize": 0,
                     "duration": 1.0, "start_time": now - 1, "end_time": now,
                     "status_dict": {"success": successes,
                                     **({"<urlopen error [Errno -2] Name or service not known>":
                                         failures} if failures else {})}}
            (folder / f"{name}_stats.json").write_text(json.dumps(stats))
            _write_parquet(folder / f"{name}.parquet", rows)
            out.failed_downloads += failures
    return out


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()),
                        ("width", pa.int64()), ("height", pa.int64()),
                        ("original_width", pa.int64()), ("original_height", pa.int64()),
                        ("exif", pa.string()), ("sha256", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path -> sha256 (to show a source unchanged)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}

"""Test images and what CLIP preprocessing makes of them: `encode` (a synthetic image of any
size, mode and format), `GOOD` (four decodable JPEGs of different shapes), and
`pil_reference`, the CLIP preprocessing in PIL + torch (normalised by `MEAN`, `STD`) that the
DALI decoder is held against.
"""

import io

import numpy as np
import torch
from PIL import Image

from mm1_megatron.data.images import CLIP_MEAN, CLIP_STD

MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
STD = torch.tensor(CLIP_STD).view(3, 1, 1)


def encode(w: int, h: int, mode: str = "RGB", fmt: str = "JPEG", seed: int = 0) -> bytes:
    """Noise over a horizontal gradient and a vertical colour ramp, plus a rectangle."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    rgb = np.stack([160 * x + 0 * y, 80 + 120 * y + 0 * x, 200 * (1 - x) * (1 - y)], axis=-1)
    rgb = rgb + rng.normal(0, 12, (h, w, 3))
    rgb[h // 4: h // 2, w // 3: w // 2] = (230, 40, 60)
    im = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pil_reference(data: bytes, size: int, box: bool = False,
                  resize: str = "crop") -> torch.Tensor:
    """CLIP preprocessing in PIL + torch, normalised. `resize="squash"`: the whole image to
    size x size (BICUBIC), open_clip's `squash`. `"crop"`: shorter side to `size` (BICUBIC),
    centre crop; `box=True` resizes the centred square straight to size x size (PIL's `box`),
    the exact geometry of our DALI ROI resize, which isolates the filter difference from crop
    rounding.
    """
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if resize == "squash":
        im = im.resize((size, size), Image.BICUBIC)
    elif box:
        s = min(w, h)
        im = im.resize((size, size), Image.BICUBIC,
                       box=((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2))
    else:
        nw, nh = (size, round(h * size / w)) if w <= h else (round(w * size / h), size)
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = round((nw - size) / 2), round((nh - size) / 2)
        im = im.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255
    return (x - MEAN) / STD


GOOD = [encode(640, 480, seed=1), encode(333, 500, seed=2), encode(1024, 768, seed=3),
        encode(100, 70, seed=4)]

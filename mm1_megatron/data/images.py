"""Image decoding with NVIDIA DALI: encoded bytes -> CLIP-normalised float32 CHW tensors.

One pipeline for both machines: the decoder runs with `device="mixed"` (nvJPEG, output on the
GPU) when CUDA is available and `device="cpu"` (libjpeg-turbo etc., `device_id=None`) otherwise;
`choose_device` is the only place that decides.

Geometry follows the image encoder (`resize`, from `cfg.vision.resize`):

- `squash` (default): the whole image to `size` x `size` with a cubic, antialiased filter; the
  aspect ratio is not kept and nothing is cropped. MM1's encoder, DFN5B-CLIP-ViT-H/14-378, was
  trained so: its open_clip preprocess config says `resize_mode: squash`, `interpolation:
  bicubic` (`open_clip_config.json` of https://huggingface.co/apple/DFN5B-CLIP-ViT-H-14-378).
- `crop`: OpenAI CLIP's shorter side to `size`, then a centred `size` x `size` crop (the edges
  of a non-square image are lost). We express it as one resize of the centred square region of
  interest (ROI) of the source to `size` x `size`: the same source window (exact to sub-pixel
  instead of rounded to the resized grid) without materialising the resized full image, whose
  long side for a 100:1 panorama at 378 would be 37,800 pixels.

Both modes are one DALI pipeline with the mode as a build-time parameter, on either device.

Tiling (`tiles` = `cfg.vision.tile_grid` when `cfg.vision.tiling` is "sphinx", MM1's
high-resolution SFT): each image gives an overview (the image to `size` x `size`) and the
`tiles` x `tiles` crops of the image resized to `size * tiles` (row-major), in that order, all
with the same resize mode; `decode` then returns 1 + tiles^2 sub-images per image.

Bad images never kill a batch. A cheap header check (Pillow reads only the header) rejects empty,
unidentifiable, unsupported-format and oversized images before DALI sees them; a failure DALI
still raises (truncated or corrupt entropy data) makes us decode that batch one image at a time
to isolate the culprits. A DALI pipeline that raised is dead, so it is rebuilt (a few ms).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Formats both Pillow identifies and DALI's image decoder reads (Pillow names; MPO is a
# multi-picture JPEG written by cameras, PPM covers the PNM family).
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"})
# 64 MPix: far beyond any photo we train on, far below what would exhaust host memory.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
RESIZE_MODES = ("squash", "crop")  # see the module docstring; `cfg.vision.resize`
_INPUT = "encoded"


def choose_device(cuda_available: bool | None = None) -> str:
    """DALI decoder device: "mixed" (nvJPEG) with CUDA, "cpu" without."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return "mixed" if cuda_available else "cpu"


def check_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why `data` cannot be an image we decode (reading only its header), or None if it may be."""
    if len(data) == 0:
        return "empty"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check size below
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
    except Exception as e:  # noqa: BLE001 - Pillow raises many types; all mean "not an image"
        return f"unidentified ({type(e).__name__})"
    if fmt not in SUPPORTED_FORMATS:
        return f"unsupported format {fmt}"
    if w <= 0 or h <= 0 or w * h > max_pixels:
        return f"bad size {w}x{h}"
    return None


@pipeline_def
def _clip_pipeline(size: int, decoder_device: str, resize: str, tiles: int = 0):
    encoded = fn.external_source(name=_INPUT, dtype=types.UINT8, batch=True)
    roi = {}
    if resize == "crop":
        # Centred square ROI of side min(h, w), in source pixels (HWC shape, read from the header).
        shape = fn.peek_image_shape(encoded, dtype=types.FLOAT)
        h, w = shape[0], shape[1]
        side = dmath.min(h, w)
        y0, x0 = (h - side) * 0.5, (w - side) * 0.5
        roi = dict(roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + side, x0 + side))
    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    # antialias (DALI's default) widens the cubic kernel when shrinking, like PIL's BICUBIC.
    # Without an ROI, both output sides given = the whole image stretched to size x size.
    def normalize(x):
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[m * 255 for m in CLIP_MEAN],
                                        std=[s * 255 for s in CLIP_STD])

    overview = fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC,
                         antialias=True, **roi)
    if not tiles:
        return normalize(overview)
    big = fn.resize(images, size=[size * tiles, size * tiles], interp_type=types.INTERP_CUBIC,
                    antialias=True, **roi)
    crops = []
    for row in range(tiles):
        for col in range(tiles):
            # crop_pos: the window's start as a fraction of (side - crop): exact tile offsets
            crops.append(fn.crop(big, crop=[size, size],
                                 crop_pos_y=row / (tiles - 1) if tiles > 1 else 0.5,
                                 crop_pos_x=col / (tiles - 1) if tiles > 1 else 0.5))
    return tuple(normalize(x) for x in [overview, *crops])


class ImageDecoder:
    """Decode batches of encoded images to `[n, 3, size, size]` float32, skipping bad ones.

    `decode` accepts any number of images (chunked by `batch_size`, DALI's max batch size).
    The output lives on the GPU for device "mixed", on the CPU for "cpu". `resize` is "squash"
    (whole image to size x size) or "crop" (centred square), as in the module docstring.
    """

    def __init__(self, size: int, batch_size: int, num_threads: int = 2,
                 device: str | None = None, seed: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, resize: str = "squash",
                 tiles: int = 0):
        if size <= 0 or batch_size <= 0 or num_threads <= 0:
            raise ValueError(f"size, batch_size, num_threads must be > 0, "
                             f"got {size}, {batch_size}, {num_threads}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        device = device or choose_device()
        if device not in ("cpu", "mixed"):
            raise ValueError(f"device must be 'cpu' or 'mixed', got {device!r}")
        self.size, self.batch_size, self.num_threads = size, batch_size, num_threads
        self.device, self.seed, self.max_pixels = device, seed, max_pixels
        self.resize = resize
        self.tiles = tiles
        self.per_image = 1 + tiles * tiles if tiles else 1  # sub-images per image
        self._cuda = device == "mixed"
        self._device_id = torch.cuda.current_device() if self._cuda else None
        # Our own stream for the copy out of DALI: queued behind the training kernels on the
        # default stream, it would wait for the step it is meant to overlap.
        self._stream = torch.cuda.Stream(self._device_id) if self._cuda else None
        # Why each image of the last `decode` call was skipped: index -> reason, for logging.
        self.last_errors: dict[int, str] = {}
        self.rebuilds = 0
        self._pipe = self._build()

    def _build(self):
        # Synchronous and unprefetched: each run consumes exactly the batch just fed, so an
        # error belongs to that batch and nothing else is queued in a pipeline we discard.
        pipe = _clip_pipeline(size=self.size, decoder_device=self.device, resize=self.resize,
                              tiles=self.tiles, batch_size=self.batch_size,
                              num_threads=self.num_threads, device_id=self._device_id,
                              seed=self.seed,
                              prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        pipe.build()
        return pipe

    def _run(self, batch: list[bytes]) -> torch.Tensor:
        outs = self._pipe.run(**{_INPUT: [np.frombuffer(b, dtype=np.uint8) for b in batch]})
        dense = [out.as_tensor() for out in outs]  # one per sub-image when tiling

        def gather(parts: list[torch.Tensor]) -> torch.Tensor:
            # sub-images: [n, 3, s, s] each -> image-major [n * per_image, 3, s, s]
            return parts[0] if len(parts) == 1 else torch.stack(parts, dim=1).flatten(0, 1)

        if not self._cuda:
            parts = []
            for d in dense:
                parts.append(torch.empty(d.shape(), dtype=torch.float32))
                feed_ndarray(d, parts[-1])
            return gather(parts)
        with torch.cuda.stream(self._stream):
            parts = []
            for d in dense:
                parts.append(torch.empty(d.shape(), dtype=torch.float32,
                                         device=f"cuda:{self._device_id}"))
                feed_ndarray(d, parts[-1], cuda_stream=self._stream)
            result = gather(parts)
            done = torch.cuda.Event()
            done.record(self._stream)
        # Handed over by the event: this (prefetch) thread waits for the copy, the training
        # stream does not; the memory is not reused while training kernels may read it.
        done.synchronize()
        result.record_stream(torch.cuda.default_stream(self._device_id))
        return result

    def _run_or_rebuild(self, batch: list[bytes]) -> torch.Tensor | str:
        """The decoded batch, or DALI's error message (after replacing the dead pipeline).
        A failure of the device (CUDA, memory) is raised: it says nothing about the images,
        and counting it as undecodable would silently blank good data."""
        try:
            return self._run(batch)
        except RuntimeError as e:
            if is_device_failure(str(e)):
                raise
            self._pipe = self._build()
            self.rebuilds += 1
            return _dali_reason(str(e))

    def _decode_chunk(self, images: Sequence[bytes], offset: int) -> list[torch.Tensor]:
        ok: list[int] = []
        for i, data in enumerate(images):
            reason = check_header(bytes(data), self.max_pixels)
            if reason is None:
                ok.append(i)
            else:
                self.last_errors[offset + i] = reason
        if not ok:
            return []
        result = self._run_or_rebuild([images[i] for i in ok])
        if isinstance(result, torch.Tensor):
            return [result]
        # Isolate the culprit(s): no random ops, so one image alone decodes exactly as in a batch.
        outs = []
        for i in ok:
            single = self._run_or_rebuild([images[i]])
            if isinstance(single, torch.Tensor):
                outs.append(single)
            else:
                self.last_errors[offset + i] = f"decode failed: {single}"
        return outs

    def decode(self, images: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        """`(tensor[n_good * per_image, 3, size, size], bad_indices)`; good images keep their
        input order, each as its `per_image` sub-images (1 without tiling)."""
        self.last_errors = {}
        outs: list[torch.Tensor] = []
        for start in range(0, len(images), self.batch_size):
            outs += self._decode_chunk(images[start:start + self.batch_size], start)
        if not outs:
            return torch.empty(0, 3, self.size, self.size,
                               device=f"cuda:{self._device_id}" if self._cuda else "cpu"), \
                sorted(self.last_errors)
        tensor = outs[0] if len(outs) == 1 else torch.cat(outs)
        return tensor, sorted(self.last_errors)


# Errors of the machine, not of an image: raised, never counted as a bad sample.
_DEVICE_FAILURES = re.compile(r"CUDA|cuda[A-Z]\w*|out of memory|[Aa]llocat|CUBLAS|NCCL|"
                              r"[Dd]evice-side|driver|illegal memory access", re.MULTILINE)


def is_device_failure(message: str) -> bool:
    return bool(_DEVICE_FAILURES.search(message))


def _dali_reason(message: str) -> str:
    """The operator and cause out of DALI's multi-line error (its traceback is our own code)."""
    op = re.search(r"Error in \w+ operator `([^`]+)`", message)
    cause = message.split("encountered:", 1)[-1].strip().splitlines()
    cause_line = cause[0].strip(" :") if cause else "unknown DALI error"
    return f"{op.group(1)}: {cause_line}" if op else cause_line

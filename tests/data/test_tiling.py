"""High-resolution tiling (vision.tiling=sphinx, MM1's SFT): DALI's overview and tiles against a
PIL reference, exact tiles of an image already at the tiled size, token counts, and tiled
images through the loader into a micro-batch."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from mm1_megatron.config import load_config
from mm1_megatron.data.images import ImageDecoder
from tests._helpers.images import GOOD, pil_reference

S = 56  # tile size (4 x 4 patches of 14)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def pil_tiles(data: bytes, size: int, grid: int) -> torch.Tensor:
    """Overview (the image to size^2), then grid x grid crops of the image resized to
    (size * grid)^2, row-major: PIL BICUBIC, CLIP-normalised."""
    big = pil_reference(data, size * grid, resize="squash")
    crops = [big[:, r * size:(r + 1) * size, c * size:(c + 1) * size]
             for r in range(grid) for c in range(grid)]
    return torch.stack([pil_reference(data, size, resize="squash"), *crops])


@pytest.mark.parametrize("grid", [2, 3])
def test_overview_and_tiles_match_a_pil_reference(grid):
    dec = ImageDecoder(S, batch_size=4, device="cpu", tiles=grid)
    out, bad = dec.decode(GOOD)
    per = 1 + grid * grid
    assert bad == [] and out.shape == (len(GOOD) * per, 3, S, S) and dec.per_image == per
    for i, data in enumerate(GOOD):
        diff = (out[i * per:(i + 1) * per] - pil_tiles(data, S, grid)).abs()
        # as the untiled squash test: DALI cubic vs PIL bicubic, a few levels apart
        assert diff.mean() < 0.01 and diff.max() < 0.25, (i, float(diff.mean()))


def test_an_image_at_the_tiled_size_gives_its_quadrants_and_its_downsample():
    """A 2S x 2S image with four flat quadrants: the tiles are exactly the quadrants (the big
    resize is the identity) and the overview is its S x S downsample."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    img = np.zeros((2 * S, 2 * S, 3), dtype=np.uint8)
    for q, colour in enumerate(colours):
        r, c = divmod(q, 2)
        img[r * S:(r + 1) * S, c * S:(c + 1) * S] = colour
    data = _png(img)
    out, _ = ImageDecoder(S, batch_size=1, device="cpu", tiles=2).decode([data])
    untiled, _ = ImageDecoder(S, batch_size=1, device="cpu").decode([data])
    assert torch.equal(out[0], untiled[0])  # the overview is the untiled decode
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    for q, colour in enumerate(colours):
        want = (torch.tensor(colour, dtype=torch.float).view(3, 1, 1) / 255 - mean) / std
        assert torch.allclose(out[1 + q], want.expand(3, S, S), atol=1e-5), q
    small = pil_reference(data, S, resize="squash")
    assert (out[0] - small).abs().mean() < 0.01


def test_tokens_per_image_and_the_planner_count_sub_images():
    from mm1_megatron.data.loader import image_tokens
    from mm1_megatron.model.flops import training_flops_per_sequence
    from mm1_megatron.plan import resolve_layout

    cfg = load_config("mm1-7b-sft", this_machine=False)  # tiled at 672 px
    assert cfg.vision.sub_images == 5 and image_tokens(cfg) == 720  # MM1: 5 x 144
    assert cfg.vision.num_patches == 48 * 48  # a 672 px tile: 2304 patches (+ class token)
    lay = resolve_layout(cfg, 128)
    assert lay.images == cfg.data.max_images_per_sequence * 5
    base = load_config("mm1-7b-sft", ["vision.tiling=none", "vision.image_size=378"],
                       this_machine=False)
    assert training_flops_per_sequence(cfg).vision > 5 * training_flops_per_sequence(base).vision
    with pytest.raises(Exception, match="does not fit data.seq_length"):
        load_config("demo", ["vision.tiling=sphinx", "vision.tile_grid=4",
                             "data.seq_length=256"], this_machine=False)


def test_tiled_images_flow_through_the_loader(demo_data):
    from mm1_megatron.data.loader import MultimodalLoader

    grid = 2
    cfg = load_config("demo", [f"data.path={demo_data}",
                               f"data.tokenizer_model={demo_data}/tokenizer.model",
                               "vision.tiling=sphinx", f"vision.tile_grid={grid}",
                               "data.max_images_per_sequence=2", "data.seq_length=256",
                               "train.micro_batch_size=2"])
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    batch, _ = next(iter(loader))
    per = 1 + grid * grid
    n = batch["image_ok"].numel()
    assert n > 0 and batch["images"].shape == (n * per, 3, cfg.vision.image_size,
                                               cfg.vision.image_size)
    slots = int((batch["tokens"] == cfg.llm.image_token_id).sum())
    assert slots == n * per * cfg.connector.num_tokens
    # the model takes them: placeholders per sub-image = the connector's tokens
    from mm1_megatron.model.mm1 import MM1Model  # noqa: F401 (import check only)

"""MM1 processor for `transformers` (shipped next to the weights; AutoProcessor with
trust_remote_code=True): the image processor and the tokenizer in one call.

    inputs = processor(images=[img1, img2], text=["<image> A photo of", "<image> A photo of"])
    out = model.generate(**inputs, max_new_tokens=20)

Each `<image>` in a prompt stands for one image (prompts take images in order, any number per
prompt, zero included) and becomes `num_image_tokens` placeholder tokens, the layout the model
was trained on. Rows are left-padded (generation appends on the right). Returned:
`input_ids`, `attention_mask`, `pixel_values` as [rows, most images in a row, 3, H, W] (a row's
unused slots are zeros) and `image_counts` [rows]. Keeping images per row lets `generate` expand
them with their row for beam search and `num_return_sequences`.

High resolution (`tile_grid` > 0, MM1's SFT, SPHINX-style): each image becomes an overview (the
image at the model's input size) and `tile_grid` x `tile_grid` crops of the image resized to
`tile_grid` times that size, row-major, each encoded on its own; its `<image>` then stands for
(1 + tile_grid^2) x `num_image_tokens` placeholders and `pixel_values` / `image_counts` count
sub-images, in that order. Training decodes the same geometry with DALI (bicubic, antialiased).
"""

from __future__ import annotations

from transformers.processing_utils import ProcessorMixin

try:  # loaded as a remote-code module (package-relative) or straight from the folder
    from .compat_mm1 import PROCESSOR_INFERS_PARTS
except ImportError:  # pragma: no cover
    from compat_mm1 import PROCESSOR_INFERS_PARTS


# Keyword arguments the processor call takes that are neither the tokenizer's nor the image
# processor's (sent by some releases' pipelines and chat templates): dropped.
PROCESSOR_ONLY = ("return_mm_token_type_ids", "return_text_replacement_offsets",
                  "sanitize_control_tokens", "videos", "audio", "videos_kwargs",
                  "audio_kwargs", "common_kwargs")


class MM1Processor(ProcessorMixin):
    # What this processor needs from transformers is in the call below, written against the
    # tokenizer's and image processor's own calls (stable from 4.57 to the newest 5.x), not
    # ProcessorMixin's multimodal machinery (its placeholder expansion and kwargs merging
    # appeared in 5.x and changed between 5.0, 5.19 and 5.24).
    if not PROCESSOR_INFERS_PARTS:  # transformers 4.x reads the parts from these names
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"
    # Defaults of the text side (call kwargs win): batches pad to the longest prompt, on the
    # left.
    text_kwargs = {"padding": "longest", "padding_side": "left"}

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
                 image_token: str = "<image>", num_image_tokens: int = 144, tile_grid: int = 0,
                 **kwargs):
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.tile_grid = int(tile_grid)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)

    @property
    def sub_images(self) -> int:
        """Encoder inputs per image: 1, or the overview and the tiles."""
        return 1 + self.tile_grid ** 2 if self.tile_grid else 1

    def _flat_images(self, images) -> list:
        """Images in prompt order, one list (nested lists per prompt flattened); tiled models
        as each image's overview and tiles."""
        if images is None:
            return []
        stack, flat = [images], []
        while stack:  # depth-first, in order
            item = stack.pop()
            if isinstance(item, (list, tuple)):
                stack.extend(reversed(item))
            else:
                flat.append(item)
        return [part for image in flat for part in self.tile(image)] if self.tile_grid else flat

    def tile(self, image) -> list:
        """One image -> [overview, tiles row-major] as PIL images. The overview is the image
        itself (the image processor brings it to the input size); the tiles are cut from the
        image resized (bicubic) to tile_grid x the input size, so the processor leaves them
        as they are. A centre-cropping image processor gets the centred square first."""
        from PIL import Image

        if not isinstance(image, Image.Image):
            from transformers.image_transforms import to_pil_image

            image = to_pil_image(image)
        image = image.convert("RGB")
        if getattr(self.image_processor, "do_center_crop", False):
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side))
        size = self.image_processor.crop_size["height"]
        big = image.resize((size * self.tile_grid,) * 2, Image.BICUBIC)
        tiles = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                 for r in range(self.tile_grid) for c in range(self.tile_grid)]
        return [image, *tiles]

    def __call__(self, images=None, text=None, **kwargs):
        if text is None:
            raise ValueError("MM1Processor needs `text`: one `<image>` per image, where the image "
                             "goes (e.g. '<image> A photo of')")
        from transformers.feature_extraction_utils import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        counts = [t.count(self.image_token) * self.sub_images for t in texts]  # encoder inputs
        parts = self._flat_images(images)
        if len(parts) != sum(counts):
            raise ValueError(f"the prompts hold {sum(counts) // self.sub_images} `{self.image_token}` "
                             f"but {len(parts) // self.sub_images} images were given")
        return_tensors = kwargs.pop("return_tensors", None)
        image_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        text_kwargs = {**self.text_kwargs, **(kwargs.pop("text_kwargs", None) or {})}
        for key, value in kwargs.items():
            if key in PROCESSOR_ONLY:
                continue
            if hasattr(self.image_processor, key) and not hasattr(self.tokenizer, key):
                image_kwargs[key] = value
            else:
                text_kwargs[key] = value
        placeholders = self.image_token * (self.num_image_tokens * self.sub_images)
        expanded = [t.replace(self.image_token, placeholders) for t in texts]
        out = dict(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
        if parts:
            pixels = self.image_processor(parts, return_tensors=return_tensors,
                                          **image_kwargs)["pixel_values"]
            out["pixel_values"] = images_per_row(pixels, counts)
        out["image_counts"] = counts
        if return_tensors == "pt":
            import torch

            out["image_counts"] = torch.tensor(counts, dtype=torch.long)
        return BatchFeature(data=out, tensor_type=None)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_counts"]


def images_per_row(pixels, counts: list[int]):
    """[n, 3, H, W] images in prompt order -> [rows, max(counts), 3, H, W], zeros after a row's
    own images (torch tensors, or numpy arrays / lists of them). The model regroups a flat
    list the same way before `generate`."""
    import numpy as np

    width = max(counts, default=0)
    if hasattr(pixels, "new_zeros"):  # torch
        grouped = pixels.new_zeros((len(counts), width, *pixels.shape[1:]))
    else:
        pixels = np.stack([np.asarray(p) for p in pixels])
        grouped = np.zeros((len(counts), width, *pixels.shape[1:]), dtype=pixels.dtype)
    first = 0
    for row, n in enumerate(counts):
        grouped[row, :n] = pixels[first:first + n]
        first += n
    return grouped


__all__ = ["MM1Processor"]

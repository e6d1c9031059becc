"""What a user does with an HF export, under whatever transformers is importable: run as
`python -m tests._helpers.hf_probe EXPORT_ROOT` (EXPORT_ROOT/hf, hf_sft, hf_tiled), it prints
one JSON object: the transformers version and, per use, the greedy tokens or the text.
Imports transformers, torch and PIL only (never mm1_megatron): it runs under transformers
releases overlaid on PYTHONPATH (tests/convert/test_hf_versions.py)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

MAX_NEW = 8
PROMPTS = {0: "Once upon a time", 1: "<image> A photo of",
           2: "<image> A photo of a man.\n<image> A photo of"}


def photos():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8))
            for i in range(3)]


def new_tokens(out, inputs, row: int = 0) -> list[int]:
    ids = out[row, inputs["input_ids"].shape[1]:].tolist()
    while ids and ids[-1] == 0:  # rows that stopped early are padded
        ids.pop()
    return ids


def main(root: Path) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    found: dict = {"transformers": transformers.__version__}
    images = photos()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForImageTextToText.from_pretrained(
            root / "hf", trust_remote_code=True, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(root / "hf", trust_remote_code=True)
    found["load_warnings"] = sorted({str(w.message).splitlines()[0][:120] for w in caught})
    for n, prompt in PROMPTS.items():
        inputs = processor(images=images[:n] or None, text=prompt, return_tensors="pt")
        found[f"prompt_ids_{n}"] = inputs["input_ids"][0].tolist()
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        found[f"greedy_{n}"] = new_tokens(out, inputs)
        with torch.no_grad():  # a random tiny model's greedy tokens hide small differences
            found[f"logits_{n}"] = model(**inputs).logits[0, :, :64].flatten().tolist()
    batch = processor(images=images[:2] + images[2:3], text=[PROMPTS[2], PROMPTS[0], PROMPTS[1]],
                      return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    found["batch"] = [new_tokens(out, batch, row) for row in range(3)]
    beams = model.generate(**processor(images=images[:1], text=PROMPTS[1], return_tensors="pt"),
                           num_beams=2, max_new_tokens=MAX_NEW, do_sample=False)
    found["beam"] = beams[0].tolist()

    pipe = pipeline("image-text-to-text", model=str(root / "hf"), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": images[1]}]}]
    found["pipeline"] = pipe(text=messages, max_new_tokens=MAX_NEW,
                             return_full_text=False)[0]["generated_text"]

    sft = AutoProcessor.from_pretrained(root / "hf_sft", trust_remote_code=True)
    chat = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                         {"type": "text", "text": "What is this?"}]}]
    found["chat_text"] = sft.apply_chat_template(chat, tokenize=False,
                                                 add_generation_prompt=True)
    inputs = sft.apply_chat_template(chat, tokenize=True, return_dict=True,
                                     add_generation_prompt=True, return_tensors="pt")
    sft_model = AutoModelForImageTextToText.from_pretrained(
        root / "hf_sft", trust_remote_code=True, dtype=torch.float32).eval()
    found["chat_greedy"] = new_tokens(sft_model.generate(**inputs, max_new_tokens=MAX_NEW,
                                                         do_sample=False), inputs)

    tiled = AutoModelForImageTextToText.from_pretrained(
        root / "hf_tiled", trust_remote_code=True, dtype=torch.float32).eval()
    tproc = AutoProcessor.from_pretrained(root / "hf_tiled", trust_remote_code=True)
    inputs = tproc.apply_chat_template(chat, tokenize=True, return_dict=True,
                                       add_generation_prompt=True, return_tensors="pt")
    found["tiled_counts"] = inputs["image_counts"].tolist()
    found["tiled_greedy"] = new_tokens(tiled.generate(**inputs, max_new_tokens=MAX_NEW,
                                                      do_sample=False), inputs)
    return found


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))

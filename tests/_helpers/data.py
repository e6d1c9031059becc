"""Small real inputs for the data, loader and trainer tests: JPEG bytes, JSONL files, a tiny
tokenizer."""

from __future__ import annotations

import io
import json
from pathlib import Path

TEXT = [
    "A small cat sleeps on a warm red sofa in the afternoon sun.",
    "The rocket rose slowly from the launch pad, trailing white smoke.",
    "Fresh coffee in a white cup, with milk foam and a silver spoon.",
    "Galaxies far away look like tiny smudges of light in the dark sky.",
    "An astronaut smiles for the camera, holding her helmet under one arm.",
    "Numbers such as 1990, 42 and 3.14 appear in text too.",
]


def jpeg(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    from PIL import Image

    im = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return path


def tiny_tokenizer(folder: Path, vocab_size: int = 400):
    from mm1_megatron.data.tokenizer import Tokenizer, train_tokenizer

    path = train_tokenizer(TEXT * 20, vocab_size, folder / "tiny", exact_vocab=False)
    return Tokenizer.load(path)

"""make_demo_data: all three kinds from scikit-image's photos, the counts it claims, a tokenizer."""

from __future__ import annotations

import hashlib
import io
import json

import pytest

from mm1_megatron.config import get_preset
from mm1_megatron.data.shard_reader import open_dataset
from mm1_megatron.data.tokenizer import IMAGE_ID, Tokenizer
from tools.make_demo_data import (CONVERSATIONS, DOCUMENTS, HELD_OUT, PHOTOS, TEXTS, VARIANTS,
                                  make_demo_data)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_data(out)


def test_counts_match_what_it_claims(demo):
    out, counts = demo
    assert counts == json.loads((out / "demo.json").read_text())
    assert counts["caption"] == len(PHOTOS) * len(VARIANTS) >= 50
    assert counts["interleaved"] == len(DOCUMENTS) and counts["text"] == len(TEXTS)
    assert counts["sft"] == len(CONVERSATIONS) - HELD_OUT
    images = 0
    for kind in ("caption", "interleaved", "text", "sft"):
        ds = open_dataset(out / kind, verify=True)
        assert len(ds) == counts[kind] == ds.manifest["samples"] and ds.manifest["bad"] == {}
        images += ds.manifest["images"]
    assert images == counts["images"]
    # the held-out conversations: LLaVA format, their images next to them, not in the shards
    held = [json.loads(line) for line in (out / "sft_heldout.jsonl").read_text().splitlines()]
    assert len(held) == HELD_OUT and all((out / h["image"]).is_file() for h in held)
    assert {h["id"] for h in held} == {f"{n}#{k}" for n, k, _ in CONVERSATIONS[-HELD_OUT:]}


def test_every_sample_reads_and_images_are_real_jpegs(demo):
    from PIL import Image

    out, _ = demo
    tok = Tokenizer.load(out / "tokenizer.model")
    for kind in ("caption", "interleaved", "text"):
        ds = open_dataset(out / kind)
        for i in range(len(ds)):
            s = ds.read(i)
            for blob in s.images:
                with Image.open(io.BytesIO(blob)) as im:
                    assert im.format == "JPEG" and min(im.size) >= 64
            if kind == "interleaved":
                assert 2 <= len(s.texts) <= 4 and 1 <= s.num_images <= 3
            assert ds.samples[i]["text_tokens"] == sum(len(tok.encode(t)) for t in s.texts)


def test_tokenizer_fits_demo_preset(demo):
    out, counts = demo
    tok = Tokenizer.load(out / "tokenizer.model")
    cfg = get_preset("demo")
    assert tok.vocab_size == counts["vocab_size"] <= cfg.llm.vocab_size
    assert tok.image_id == IMAGE_ID == cfg.llm.image_token_id


def test_deterministic(demo, tmp_path):
    out, _ = demo
    make_demo_data(tmp_path)
    for path in sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()):
        a, b = (out / path).read_bytes(), (tmp_path / path).read_bytes()
        assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), path

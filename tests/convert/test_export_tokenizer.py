"""The exported tokenizer: tokenizer.json (fast, no sentencepiece needed) gives the ids of our
sentencepiece tokenizer, and the special tokens are declared with their fixed ids."""

import json

import pytest

from mm1_megatron.config import load_config
from mm1_megatron.convert.hf_config import write_side_files
from mm1_megatron.data.tokenizer import SPECIAL_TOKENS, Tokenizer

TEXTS = ["A photo of a cat on a sofa.", "Ein Foto einer Katze über dem Fluß.", "猫の写真です。",
         "Привет, мир! Как дела?", "  two leading spaces,\ttabs\nand newlines\n\n",
         "emoji 🐱🚀 and digits 12345", "ß café naïve Øre", "عربى हिन्दी 한국어"]


@pytest.fixture(scope="module")
def exported(demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = load_config("demo", [f"data.tokenizer_model={demo_data}/tokenizer.model"])
    write_side_files(out, cfg, images=True, tokenizer_model=cfg.data.tokenizer_model)
    return out, Tokenizer.load(cfg.data.tokenizer_model)


def test_fast_tokenizer_matches_sentencepiece(exported):
    from tokenizers import Tokenizer as FastTokenizer

    out, ours = exported
    fast = FastTokenizer.from_file(str(out / "tokenizer.json"))  # no transformers, no spm
    for text in TEXTS:
        assert fast.encode(text, add_special_tokens=False).ids == ours.encode(text), text
    for piece, i in SPECIAL_TOKENS.items():
        assert fast.token_to_id(piece) == i


def test_auto_tokenizer_loads_the_fast_file_with_the_special_tokens(exported):
    from transformers import AutoTokenizer

    out, ours = exported
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.is_fast
    assert tok(TEXTS[1]).input_ids == [SPECIAL_TOKENS["<s>"]] + ours.encode(TEXTS[1])
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()} == \
        {i: piece for piece, i in SPECIAL_TOKENS.items()}
    assert tok.convert_tokens_to_ids("<image>") == SPECIAL_TOKENS["<image>"]

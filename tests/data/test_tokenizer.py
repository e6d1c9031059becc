"""Tokenizer: fixed special ids, exact round trip, refusal of models without the specials."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from mm1_megatron.config import LLMConfig
from mm1_megatron.data.tokenizer import (BOS_ID, EOC_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID,
                                         Tokenizer)
from tests._helpers.data import TEXT, tiny_tokenizer
from tests import _procs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_special_ids_fixed_and_match_model_config(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id, tok.eoc_id, tok.unk_id) == \
        (0, 1, 2, 3, 4, 5) == (PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, EOC_ID, UNK_ID)
    assert tok.image_id == LLMConfig().image_token_id
    assert 300 <= tok.vocab_size <= 400


def test_encode_decode_round_trip(tok):
    for text in TEXT + ["  two  spaces\tand tab\nnew line", "ünïcödé ✓ 漢字"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert BOS_ID not in ids and EOS_ID not in ids
        assert UNK_ID not in ids  # byte fallback covers unseen characters
    ids = tok.encode(TEXT[0], bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids[1:-1] == tok.encode(TEXT[0])


def test_literal_special_strings_in_data_are_not_placeholders(tok):
    text = "the html said <image> and <eoc> literally"
    ids = tok.encode(text)
    assert IMAGE_ID not in ids and EOC_ID not in ids
    assert tok.decode(ids) == text
    prompt = tok.encode("<image> A photo of", allow_special=True)
    assert prompt[0] == IMAGE_ID and tok.encode("x<eoc>", allow_special=True)[-1] == EOC_ID


def test_pickles_for_dataloader_workers(tok):
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(TEXT[1]) == tok.encode(TEXT[1]) and again.path == tok.path


def _plain_model(path: Path, **kwargs) -> Path:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT * 20), model_writer=buf,
                                   vocab_size=200, hard_vocab_limit=False, minloglevel=2,
                                   **kwargs)
    path.write_bytes(buf.getvalue())
    return path


def test_refuses_model_without_special_tokens(tmp_path):
    path = _plain_model(tmp_path / "plain.model")  # sentencepiece defaults: unk=0, no pad
    with pytest.raises(ValueError, match=r"plain\.model: special token '<pad>' is missing"):
        Tokenizer.load(path)


def test_refuses_model_with_special_token_at_other_id(tmp_path):
    path = _plain_model(tmp_path / "swapped.model", pad_id=0, bos_id=1, eos_id=2, unk_id=5,
                        user_defined_symbols=["<eoc>", "<image>"])
    with pytest.raises(ValueError, match=r"swapped\.model: special token '<image>' has id 4; "
                                         r"it must have id 3"):
        Tokenizer.load(path)


def test_refuses_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="nothing.model: cannot read"):
        Tokenizer.load(tmp_path / "nothing.model")


def test_train_tokenizer_cli_from_text_and_shards(tmp_path):
    from mm1_megatron.data.prepare import prepare
    from tests._helpers.data import write_jsonl

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXT * 10))
    jsonl = write_jsonl(tmp_path / "t.jsonl",
                        [{"text": "Shard text about zebras and a xylophone."}] * 5)
    prepare("text", [jsonl], tmp_path, tmp_path / "text", progress=False)
    out = _procs.run([sys.executable, "tools/train_tokenizer.py", "--input", str(corpus),
                      str(tmp_path / "text"), "--vocab-size", "350", "--soft-vocab",
                      "--output", str(tmp_path / "cli")],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    tok = Tokenizer.load(tmp_path / "cli.model")
    # The shard's text was part of the training data: its rare word is a learned piece.
    assert len(tok.encode("zebras")) < len("zebras")
    bad = _procs.run([sys.executable, "tools/train_tokenizer.py", "--input", "nope.txt",
                      "--vocab-size", "300", "--output", str(tmp_path / "x")],
                     cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "nope.txt: no such file" in bad.stderr

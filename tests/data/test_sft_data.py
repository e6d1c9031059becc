"""Supervised fine-tuning data: the chat format (segments and jinja agree), LLaVA conversations
into sft shards (bad records skipped and counted), loss on the assistant's answers only, packed
conversations isolated, and rows planned from the token index equal to rows built from text."""

import json
from pathlib import Path

import pytest
import torch

from mm1_megatron.data.loader import tokenized_document
from mm1_megatron.data.packing import IMAGE, PAD_DOCUMENT, Document, Packer
from mm1_megatron.data.prompt_format import (Answer, Turn, chat_segments, chat_template,
                                             render_chat)
from mm1_megatron.data.shard_index import segment_runs
from mm1_megatron.data.shard_reader import open_dataset
from mm1_megatron.data.tokenizer import EOS_ID, IMAGE_ID, Tokenizer

CONVERSATIONS = [
    [Turn("user", (0, "\nWhat animal is this?")), Turn("assistant", ("A cat.",))],
    [Turn("system", ("Answer briefly.",)), Turn("user", ("Name a colour.",)),
     Turn("assistant", ("Orange",)), Turn("user", ("Compare ", 0, " and ", 1, ".")),
     Turn("assistant", ("The first is a cat; the second, a rocket.",))],
]


def _messages(turns):
    out = []
    for t in turns:
        items = [{"type": "image"} if isinstance(c, int) else {"type": "text", "text": c}
                 for c in t.content]
        out.append({"role": t.role, "content": items})
    return out


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=["one_image", "system_two_images"])
def test_chat_template_renders_what_training_tokenizes(turns):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda message: (_ for _ in ()).throw(ValueError(message))
    template = env.from_string(chat_template())
    text = template.render(messages=_messages(turns), bos_token="<s>", eos_token="</s>",
                           add_generation_prompt=False)
    assert text == render_chat(chat_segments(turns))
    prompt = template.render(messages=_messages(turns[:-1]), bos_token="<s>",
                             eos_token="</s>", add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("\nAssistant:")
    with pytest.raises(ValueError, match="cannot render this tool turn"):
        template.render(messages=[{"role": "tool", "content": "x"}], bos_token="<s>",
                        eos_token="</s>")


def test_loss_is_on_the_answers_and_their_end_of_turn_only(demo_data):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    segments = chat_segments(CONVERSATIONS[1])
    tokens, trains = tokenized_document(tok, segments)
    k = 4
    packer = Packer(seq_length=256, tokens_per_image=k, max_images=4, image_token_id=IMAGE_ID)
    (row,) = list(packer.pack([Document(1, 0, tokens, ["a", "b"], trains=trains)]))
    # Expected by hand: the answers' ids, each then </s>, are the only targets with loss.
    expected = [t for seg in segments if isinstance(seg, Answer)
                for t in tok.encode(seg) + [EOS_ID]]
    targets = row.labels[row.loss_mask.bool()].tolist()
    assert targets == expected
    # ...and each sits right after the prompt it answers: the position before an answer is
    # "Assistant:"'s last token.
    n = len(tokens) + 2 * (k - 1)
    assert row.loss_mask[n:].sum() == 0 and int(row.loss_mask.sum()) == len(expected)
    first = 1 + len(tok.encode(segments[0]))  # BOS, the prompt, then " Orange"
    assert isinstance(segments[1], Answer) and row.tokens[first] == tok.encode(segments[1])[0]
    assert row.loss_mask[first - 1] == 1 and row.loss_mask[first - 2] == 0


def test_packed_conversations_stay_isolated(demo_data):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    docs = []
    for n, turns in enumerate(CONVERSATIONS):
        tokens, trains = tokenized_document(tok, chat_segments(turns))
        docs.append(Document(n, 0, tokens, [f"{n}.{j}" for j in range(tokens.count(IMAGE))],
                             trains=trains))
    pretrain = tok.encode("A plain text document.")
    docs.append(Document(9, 0, [1, *pretrain, 2], []))
    (row,) = list(Packer(256, 4, 8, IMAGE_ID).pack(docs))
    ids = row.document_ids
    assert ids[ids != PAD_DOCUMENT].unique().tolist() == [0, 1, 2]
    for d in range(3):  # no loss crosses a document boundary
        last = int((ids == d).nonzero().max())
        assert row.loss_mask[last] == 0
    # the pre-training document (no flags) keeps its usual rule: every text target trains
    span = (ids == 2).nonzero().flatten()
    assert row.loss_mask[span[:-1]].sum() == len(span) - 1


def _llava_records(root: Path) -> list:
    from PIL import Image
    from skimage import data

    (root / "img").mkdir()
    for name, f in (("cat.jpg", data.chelsea), ("rocket.png", data.rocket)):
        Image.fromarray(f()).save(root / "img" / name)
    good = [
        {"id": "one", "image": "cat.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat animal is this?"},
            {"from": "gpt", "value": "A cat."}]},
        {"id": 2, "image": ["cat.jpg", "rocket.png"], "conversations": [
            {"from": "system", "value": "Answer briefly."},
            {"from": "human", "value": "Compare <image> and <image>."},
            {"from": "gpt", "value": "A cat; a rocket."},
            {"from": "human", "value": "Which flies?"}, {"from": "gpt", "value": "The rocket."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Say hi."},
                                         {"from": "gpt", "value": "Hi."}]},
    ]
    bad = [
        {"id": "b1", "image": "cat.jpg", "conversations": [  # no marker for the image
            {"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "b2", "conversations": [  # two human turns in a row
            {"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        {"id": "b3", "image": "gone.jpg", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "b4", "conversations": [  # ends with the user
            {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
            {"from": "human", "value": "c"}]},
        {"id": "b5", "image": "cat.jpg", "conversations": [  # marker in the answer
            {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "<image>"}]},
    ]
    return good, bad


@pytest.mark.parametrize("layout", ["json_array", "jsonl"])
def test_prepare_llava_conversations(tmp_path, demo_data, layout):
    from mm1_megatron.data.prepare import prepare

    good, bad = _llava_records(tmp_path)
    records = good[:2] + bad + good[2:]
    src = tmp_path / ("in.json" if layout == "json_array" else "in.jsonl")
    src.write_text(json.dumps(records) if layout == "json_array"
                   else "\n".join(json.dumps(r) for r in records) + "\n")
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    manifest, skipped = prepare("sft", [src], tmp_path / "img", tmp_path / "sft",
                                tokenizer=tok, progress=False, log=lambda *_: None)
    assert manifest["samples"] == 3 and manifest["images"] == 3
    assert dict(skipped) == {"image_mismatch": 2, "bad_conversation": 2, "missing_image": 1}
    ds = open_dataset(tmp_path / "sft")
    s0, s1, s2 = (ds.read(i) for i in range(3))
    assert s0.segments == chat_segments([Turn("user", (0, "\nWhat animal is this?")),
                                         Turn("assistant", ("A cat.",))])
    assert s1.num_images == 2 and s1.image_exts == ["jpg", "png"]
    assert render_chat(s1.segments) == (
        "<s>Answer briefly.\n\nUser: Compare <image> and <image>.\nAssistant: A cat; a "
        "rocket.</s>User: Which flies?\nAssistant: The rocket.</s>")
    assert s2.num_images == 0 and isinstance(s2.segments[-1], Answer)
    # The packer's plan from the token index equals the row built from the text.
    packer = Packer(64, 4, 4, IMAGE_ID)
    for i, sample in enumerate((s0, s1, s2)):
        tokens, trains = tokenized_document(tok, sample.segments)
        layout = ds.layout(i)
        assert layout == segment_runs(sample.segments, tok)
        built, _ = packer.split(Document(i, 0, tokens, list(range(sample.num_images)),
                                         trains=trains))
        planned, _ = packer.split(Document(i, 0, None, list(range(sample.num_images)),
                                           layout=[1, *layout, 1]))
        assert [c.length for c in planned] == [c.length for c in built]
        assert [c.images for c in planned] == [c.images for c in built]


def test_prepare_refuses_a_broken_json_array(tmp_path):
    from mm1_megatron.data.prepare import main

    (tmp_path / "in.json").write_text('[{"id": 1, "conversations": []')
    assert main([str(tmp_path / "in.json"), "--kind", "sft", "--output",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()


def test_row_loss_mask_shape_is_float(demo_data):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    tokens, trains = tokenized_document(tok, chat_segments(CONVERSATIONS[0]))
    (row,) = list(Packer(64, 4, 2, IMAGE_ID).pack([Document(0, 0, tokens, ["a"],
                                                             trains=trains)]))
    assert row.loss_mask.dtype == torch.float32 and set(row.loss_mask.unique().tolist()) <= {0, 1}


def test_answer_loss_reads_llava_conversations_and_names_a_bad_line(tmp_path):
    from mm1_megatron.evaluation.answer_loss import load_conversations

    good = {"id": "a", "image": "x.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]}
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")
    [(cid, turns, images)] = load_conversations(tmp_path / "ok.jsonl")
    assert cid == "a" and images == [str(tmp_path / "x.jpg")]
    assert turns == [Turn("user", (0, "\nWhat?")), Turn("assistant", ("A cat.",))]
    bad = dict(good, image=["x.jpg", "y.jpg"])  # two images, one marker
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: image_mismatch"):
        load_conversations(tmp_path / "bad.jsonl")

"""Task files, support draws and k-shot prompt construction (exact strings and token layout)."""

import json

import pytest

from mm1_megatron.data.tokenizer import BOS_ID, IMAGE_ID, Tokenizer
from mm1_megatron.evaluation.prompts import build_prompt, postprocess, render, segments
from mm1_megatron.evaluation.tasks import CAPTION, VQA, Example, load_task, write_task

K = 9  # tokens per image (the tiny preset)


def caption_task(tmp_path, n=12):
    lines = [{"id": f"p{i}", "image": f"img/{i}.jpg",
              "captions": [f"Caption {i} one.", f"Caption {i} two."]} for i in range(n)]
    return load_task(write_task(tmp_path / "cap.jsonl", lines))


def vqa_task(tmp_path, n=12):
    lines = [{"image": f"img/{i}.jpg", "question": f"What is {i}?",
              "answers": ["two"] * 7 + ["2"] * 3} for i in range(n)]
    return load_task(write_task(tmp_path / "vqa.jsonl", lines))


def test_task_files_resolve_paths_and_kinds(tmp_path):
    task = caption_task(tmp_path)
    assert task.kind == CAPTION and len(task) == 12 and task.name == "cap"
    assert task.examples[3].images == (str(tmp_path / "img" / "3.jpg"),)
    assert task.examples[3].target == "Caption 3 one."
    v = vqa_task(tmp_path)
    assert v.kind == VQA and v.examples[0].id == "0" and v.examples[0].target == "two"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "a.jpg", "captions": ["x"]}) + "\n"
                   + json.dumps({"image": "a.jpg", "question": "q?", "answers": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="mixes"):
        load_task(bad)
    bad.write_text(json.dumps({"image": "a.jpg"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_task(bad)


def test_support_draw_is_seeded_excludes_the_query_and_ignores_order(tmp_path):
    task = caption_task(tmp_path)
    for i in range(len(task)):
        shots = task.support_for(i, 8, seed=0)
        assert len(shots) == 8 and len({s.id for s in shots}) == 8
        assert task.examples[i] not in shots
    assert task.support_for(5, 4, seed=0) == task.support_for(5, 4, seed=0)
    assert task.support_for(5, 4, seed=0) != task.support_for(5, 4, seed=1)
    reordered = caption_task(tmp_path)
    reordered.examples.reverse()
    assert [s.id for s in reordered.support_for(len(task) - 1 - 5, 4, seed=0)] == \
        [s.id for s in task.support_for(5, 4, seed=0)]
    assert task.support_for(0, 0, seed=0) == []
    with pytest.raises(ValueError, match="needs 12"):
        task.support_for(0, 12, seed=0)
    # A separate support file never offers the query's own image.
    task2 = load_task(tmp_path / "cap.jsonl")
    task2.support = load_task(write_task(tmp_path / "sup.jsonl", [
        {"image": str(tmp_path / "img" / f"{i}.jpg"), "captions": ["c"]} for i in range(9)]))
    for i in range(9):
        assert all(s.images != task2.examples[i].images for s in task2.support_for(i, 8, 0))


def test_exact_prompt_strings_for_0_4_8_shots(tmp_path):
    cap, vqa = caption_task(tmp_path), vqa_task(tmp_path)
    assert render(segments(CAPTION, cap.examples[0], [])) == "<image> A photo of"
    assert render(segments(VQA, vqa.examples[0], [])) == \
        "<image> Question: What is 0? Short answer:"
    shots = [cap.examples[3], cap.examples[7]]
    assert render(segments(CAPTION, cap.examples[0], shots)) == (
        "<image> A photo of Caption 3 one.\n"
        "<image> A photo of Caption 7 one.\n"
        "<image> A photo of")
    assert render(segments(VQA, vqa.examples[0], [vqa.examples[1]])) == (
        "<image> Question: What is 1? Short answer: two\n"
        "<image> Question: What is 0? Short answer:")
    for k in (0, 4, 8):
        shots = cap.support_for(0, k, seed=0)
        text = render(segments(CAPTION, cap.examples[0], shots))
        expected = "".join(f"<image> A photo of {s.captions[0]}\n" for s in shots) + \
            "<image> A photo of"
        assert text == expected and text.count("<image>") == k + 1
        shots = vqa.support_for(0, k, seed=0)
        text = render(segments(VQA, vqa.examples[0], shots))
        expected = "".join(f"<image> Question: {s.question} Short answer: two\n"
                           for s in shots) + "<image> Question: What is 0? Short answer:"
        assert text == expected


def test_prompt_tokens_place_image_placeholders(demo_data, tmp_path):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    cap = caption_task(tmp_path)
    for k in (0, 4, 8):
        shots = cap.support_for(2, k, seed=0)
        p = build_prompt(tok, CAPTION, cap.examples[2], shots, K, IMAGE_ID)
        assert p.tokens[0] == BOS_ID
        assert p.images == [s.images[0] for s in shots] + [cap.examples[2].images[0]]
        # Each image is one run of exactly K placeholders, followed by its example's text,
        # tokenized on its own as training tokenizes document segments.
        expected = [BOS_ID]
        for s in shots:
            expected += [IMAGE_ID] * K + tok.encode(f" A photo of {s.captions[0]}\n")
        expected += [IMAGE_ID] * K + tok.encode(" A photo of")
        assert p.tokens == expected
        assert p.tokens.count(IMAGE_ID) == (k + 1) * K
        text_only = [t for t in p.tokens[1:] if t != IMAGE_ID]
        assert tok.decode(text_only) == p.text.replace("<image>", "")


def test_literal_image_tag_in_data_is_not_a_placeholder(demo_data):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    query = Example("q", ("a.jpg",), question="Is <image> a tag?", answers=("yes",))
    p = build_prompt(tok, VQA, query, [], K, IMAGE_ID)
    assert p.tokens.count(IMAGE_ID) == K


def test_postprocess_cuts_at_separator():
    assert postprocess(" a cat on a mat.\n<image> A photo of") == "a cat on a mat."
    assert postprocess("  yes ") == "yes"


def test_chat_prompts_for_each_task_kind(demo_data, tmp_path):
    """--chat prompts: the chat format's user turn (images, question, LLaVA-1.5's answer
    instruction) and "Assistant:", tokenized as SFT training tokenizes conversations."""
    import json

    from mm1_megatron.data.loader import tokenized_document
    from mm1_megatron.data.prompt_format import Answer, Turn, chat_segments
    from mm1_megatron.data.tokenizer import Tokenizer
    from mm1_megatron.evaluation.prompts import build_chat_prompt
    from mm1_megatron.evaluation.tasks import load_task

    lines = {"choice": {"image": "a.jpg", "question": "Which is a mammal?",
                        "options": ["shark", "dolphin"], "answer": "B"},
             "yesno": {"image": "a.jpg", "question": "Is there a cat?", "answer": "Yes"},
             "vqa": {"image": "a.jpg", "question": "What colour?", "answers": ["red"]}}
    want = {"choice": "User: <image>\nWhich is a mammal?\nA. shark\nB. dolphin\nAnswer with "
                      "the option's letter from the given choices directly.\nAssistant:",
            "yesno": "User: <image>\nIs there a cat?\nAnswer the question using a single word "
                     "or phrase.\nAssistant:",
            "vqa": "User: <image>\nWhat colour?\nAnswer the question using a single word or "
                   "phrase.\nAssistant:"}
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    for kind, line in lines.items():
        (tmp_path / f"{kind}.jsonl").write_text(json.dumps(line) + "\n")
        task = load_task(tmp_path / f"{kind}.jsonl")
        assert task.kind == kind
        prompt = build_chat_prompt(tok, kind, task.examples[0], 4, 3)
        assert prompt.text == want[kind]
        # training's tokens of the same turn followed by an answer start with the prompt's
        question = want[kind].split("<image>")[1].rsplit("\nAssistant:", 1)[0]
        tokens, _ = tokenized_document(tok, chat_segments(
            [Turn("user", (0, question)), Turn("assistant", ("x",))]))
        expanded = [t for t in tokens for t in ([3] * 4 if t == -1 else [t])]
        assert expanded[:len(prompt.tokens)] == prompt.tokens
        assert isinstance(chat_segments([Turn("user", ("q",)), Turn("assistant", ("a",))])[-1],
                          Answer)

"""k-shot prompts with the in-context examples interleaved in one sequence (MM1's format, whose
strings live in `data.prompt_format`; the HF export renders the same as its chat template).

Per example (`<image>` stands for one image, i.e. `connector.num_tokens` placeholder ids):

    captioning   "<image> A photo of" + " " + caption
    VQA          "<image> Question: {q} Short answer:" + " " + answer

A k-shot sequence is BOS, then the k in-context examples each followed by SEPARATOR ("\\n"),
then the query's prompt without an answer; the model continues it and generation stops at the
first newline (the separator), `</s>`, `<eoc>` or the token limit. E.g. 2-shot captioning:

    <s><image> A photo of a cat on a sofa.\\n<image> A photo of two dogs.\\n<image> A photo of

The prompt ends with no trailing space: the answer's leading space belongs to its first token
(no dummy prefix in our sentencepiece model, so " cat" is one piece), as in the examples.
Text is tokenized exactly as training tokenizes documents (`data.loader.document_tokens`):
BOS, each text segment encoded on its own (data text: a literal "<image>" in a caption is
spelled with bytes, never a placeholder), each image expanded to `num_tokens` placeholders.
Answers and captions shown in-context are whitespace-normalised (newlines would read as the
separator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from mm1_megatron.data.packing import IMAGE, expand_images
from mm1_megatron.data.prompt_format import (CAPTION_PROMPT, CHAT_ASSISTANT, SEPARATOR,
                                             VQA_PROMPT, Turn, chat_segments, render_chat)
from mm1_megatron.data.tokenizer import BOS_ID, IMAGE_TOKEN, Tokenizer
from mm1_megatron.evaluation.tasks import CAPTION, CHOICE, VQA, YESNO, Example

Segment = Union[str, "ImageSlot"]


@dataclass(frozen=True)
class ImageSlot:
    path: str


def clean(text: str) -> str:
    return " ".join(text.split())


def prompt_text(kind: str, example: Example) -> str:
    """The text after an example's image(s), without the answer."""
    if kind == CAPTION:
        return CAPTION_PROMPT
    if kind == VQA:
        return VQA_PROMPT.format(question=clean(example.question or ""))
    raise ValueError(f"unknown task kind {kind!r}")


def segments(kind: str, query: Example, shots: Sequence[Example],
             separator: str = SEPARATOR) -> list[Segment]:
    """Images and text in sequence order (adjacent text merged), BOS not included."""
    out: list[Segment] = []

    def add_text(text: str) -> None:
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)

    for example in shots:
        out += [ImageSlot(p) for p in example.images]
        add_text(prompt_text(kind, example) + " " + clean(example.target) + separator)
    out += [ImageSlot(p) for p in query.images]
    add_text(prompt_text(kind, query))
    return out


def render(segs: Sequence[Segment]) -> str:
    """The prompt as text, `<image>` for each image (what a reader of the paper expects)."""
    return "".join(IMAGE_TOKEN if isinstance(s, ImageSlot) else s for s in segs)


@dataclass
class Prompt:
    tokens: list[int]  # BOS + text ids, each image expanded to num_tokens placeholders
    images: list[str]  # image paths, in placeholder order
    text: str  # rendered, "<image>" per image (no BOS)


def build_prompt(tokenizer: Tokenizer, kind: str, query: Example, shots: Sequence[Example],
                 tokens_per_image: int, image_token_id: int,
                 separator: str = SEPARATOR) -> Prompt:
    segs = segments(kind, query, shots, separator)
    tokens = [BOS_ID]
    for s in segs:
        tokens += [IMAGE] if isinstance(s, ImageSlot) else tokenizer.encode(s)
    ids, _ = expand_images(tokens, tokens_per_image, image_token_id)
    return Prompt(ids, [s.path for s in segs if isinstance(s, ImageSlot)], render(segs))


def postprocess(text: str, separator: Optional[str] = SEPARATOR) -> str:
    """Generated continuation -> answer: cut at the separator, strip whitespace."""
    if separator:
        text = text.split(separator, 1)[0]
    return text.strip()


# ------------------------------------------------------------------ zero-shot chat (--chat)

# The instructions LLaVA-1.5's evaluation appends (llava/eval: VQAv2 / GQA / POPE and
# ScienceQA / MMBench), so a model fine-tuned on the LLaVA mixture answers in their form.
SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."


def chat_question(kind: str, example: Example) -> str:
    """The user turn's text after the image(s)."""
    question = example.question or ""
    if kind == CHOICE:
        options = "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(example.options))
        return f"\n{question}\n{options}\n{LETTER_ANSWER}"
    if kind in (VQA, YESNO):
        return f"\n{question}\n{SHORT_ANSWER}"
    raise ValueError(f"--chat scores {VQA}, {CHOICE} and {YESNO} tasks, not {kind!r}")


def build_chat_prompt(tokenizer: Tokenizer, kind: str, example: Example,
                      tokens_per_image: int, image_token_id: int) -> Prompt:
    """One user turn (the images, then the question and its instruction) and the generation
    prompt, tokenized as SFT training tokenizes conversations."""
    turn = Turn("user", (*range(len(example.images)), chat_question(kind, example)))
    segments = chat_segments([turn])
    segments[-1] += CHAT_ASSISTANT
    tokens = [BOS_ID]
    for seg in segments:
        tokens += [IMAGE] if isinstance(seg, int) else tokenizer.encode(seg)
    ids, _ = expand_images(tokens, tokens_per_image, image_token_id)
    return Prompt(ids, list(example.images), render_chat(segments, bos=""))

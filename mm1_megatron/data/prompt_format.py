"""The two prompt formats of MM1, each defined once and rendered both as training / evaluation
segments and as a transformers chat template (jinja) for the HF export.

**Pre-training format** (the paper's few-shot evaluation style, §3.4 / App. C):
`evaluation.prompts` builds k-shot prompts from it.

    captioning   "<image> A photo of" + " " + caption + "\\n"
    VQA          "<image> Question: {q} Short answer:" + " " + answer + "\\n"

As a chat: each user turn is its images (`<image>` each) then the captioning prompt, or the VQA
prompt when the turn has text (the question); each assistant turn is " " + its text + "\\n"
(an in-context answer). The sequence starts with BOS; nothing is added for the generation
prompt: the model continues after "A photo of" / "Short answer:". Whitespace in turns is
collapsed (a newline would read as the separator). System turns do not exist in this format.

**Chat format** (supervised fine-tuning, `mm1-eval --chat`, exports of SFT runs), in the
style of LLaVA-1.5's conversation template (MM1's SFT data is the LLaVA mixture, §5):

    <s>{system}\n\n                       (optional)
    User: {text, <image> where an image goes}\n
    Assistant: {answer}</s>
    User: ...\n
    Assistant: {answer}</s>

`</s>` (EOS) ends each assistant turn; the generation prompt is "Assistant:". Loss is on the
assistant's answers (the leading space, the text, the `</s>`), nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

SEPARATOR = "\n"
CAPTION_PROMPT = " A photo of"
VQA_PROMPT = " Question: {question} Short answer:"


# Both templates: BOS, then per message its content as `content`, a list of items (a string is
# one text item). The name matters: vLLM passes a request's parts (images included) as a list
# only to a template that loops `for ... in content`; to any other it gives one string.
_JINJA_MESSAGES = "".join([
    "{{- bos_token -}}",
    "{%- for message in messages -%}",
    "{%- if message['content'] is string -%}",
    "{%- set content = [{'type': 'text', 'text': message['content']}] -%}",
    "{%- else -%}{%- set content = message['content'] -%}{%- endif -%}",
])


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def pretrain_chat_template(image_token: str = "<image>") -> str:
    """The jinja chat template of the format above (transformers' `apply_chat_template`)."""
    before, after = VQA_PROMPT.split("{question}")
    return "".join([
        _JINJA_MESSAGES,
        "{%- set ns = namespace(text='', images=0) -%}",
        "{%- for item in content -%}",
        "{%- if item['type'] == 'image' -%}{%- set ns.images = ns.images + 1 -%}",
        "{%- elif item['type'] == 'text' -%}{%- set ns.text = ns.text + ' ' + item['text'] -%}",
        "{%- endif -%}{%- endfor -%}",
        "{%- set text = ns.text.split() | join(' ') -%}",
        "{%- if message['role'] == 'user' -%}",
        "{{- ", _jinja_string(image_token), " * ns.images -}}",
        "{%- if text -%}{{- ", _jinja_string(before), " + text + ", _jinja_string(after), " -}}",
        "{%- else -%}{{- ", _jinja_string(CAPTION_PROMPT), " -}}{%- endif -%}",
        "{%- elif message['role'] == 'assistant' and ns.images == 0 -%}",
        "{{- ' ' + text + ", _jinja_string(SEPARATOR), " -}}",
        "{%- else -%}",
        "{{- raise_exception('the pre-training prompt format has user turns (images, then an "
        "optional question) and text-only assistant turns; cannot render this ' "
        "+ message['role'] + ' turn') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ])


# ------------------------------------------------------------------------------- chat format

CHAT_USER = "User: "
CHAT_ASSISTANT = "Assistant:"
CHAT_SYSTEM_END = "\n\n"
CHAT_TURN_END = "\n"  # after a user turn; an assistant turn ends with </s>
CHAT_FORMAT = "mm1-chat-v1"  # recorded in a dataset's token index


class Answer(str):
    """Assistant text in a rendered conversation: trained on, and followed by `</s>`."""


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    content: tuple  # text (str) and images (int: the sample's image number), in order


ChatSegment = Union[str, int, Answer]


def chat_segments(turns: Sequence[Turn]) -> list[ChatSegment]:
    """A conversation as training segments (BOS / EOS not included; an `Answer` gets its `</s>`
    when tokenized): prompt text (str, no loss), images (int), answers (`Answer`, loss).
    Adjacent prompt text is merged, so tokenization breaks only at images and answers, as the
    HF tokenizer's special tokens do."""
    out: list[ChatSegment] = []

    def prompt(text: str) -> None:
        if out and type(out[-1]) is str:
            out[-1] += text
        elif text:
            out.append(text)

    for turn in turns:
        if turn.role == "system":
            prompt("".join(turn.content).strip() + CHAT_SYSTEM_END)
        elif turn.role == "user":
            prompt(CHAT_USER)
            for item in turn.content:
                if isinstance(item, int):
                    out.append(item)
                else:
                    prompt(item)
            prompt(CHAT_TURN_END)
        elif turn.role == "assistant":
            prompt(CHAT_ASSISTANT)
            out.append(Answer(" " + "".join(turn.content).strip()))
        else:
            raise ValueError(f"unknown role {turn.role!r}")
    return out


def chat_template(image_token: str = "<image>") -> str:
    """The jinja of the chat format: the same text as `chat_segments`, `<image>` per image."""
    j = _jinja_string
    return "".join([
        _JINJA_MESSAGES,
        "{%- if message['role'] == 'user' -%}{{- ", j(CHAT_USER), " -}}",
        "{%- for item in content -%}",
        "{%- if item['type'] == 'image' -%}{{- ", j(image_token), " -}}",
        "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}",
        "{%- endfor -%}{{- ", j(CHAT_TURN_END), " -}}",
        "{%- else -%}",
        "{%- set ns = namespace(text='') -%}",
        "{%- for item in content -%}{%- if item['type'] == 'text' -%}",
        "{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}{%- endfor -%}",
        "{%- if message['role'] == 'system' -%}",
        "{{- ns.text | trim -}}{{- ", j(CHAT_SYSTEM_END), " -}}",
        "{%- elif message['role'] == 'assistant' -%}",
        "{{- ", j(CHAT_ASSISTANT + " "), " + (ns.text | trim) + eos_token -}}",
        "{%- else -%}{{- raise_exception('the chat format has system, user and assistant "
        "turns; cannot render this ' + message['role'] + ' turn') -}}",
        "{%- endif -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- ", j(CHAT_ASSISTANT), " -}}{%- endif -%}",
    ])


def render_chat(segments: Sequence[ChatSegment], image_token: str = "<image>",
                bos: str = "<s>", eos: str = "</s>") -> str:
    """Rendered segments as text (what the jinja template gives for the same turns)."""
    parts = [bos]
    for seg in segments:
        if isinstance(seg, Answer):
            parts += [seg, eos]
        elif isinstance(seg, int):
            parts.append(image_token)
        else:
            parts.append(seg)
    return "".join(parts)


# LLaVA's conversation records ({"from": "human" | "gpt" | "system", "value": "...<image>..."}),
# read by `mm1-prepare-data --kind sft` (data/sources/jsonl.py) and `mm1-eval --answer-loss`.
LLAVA_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


def llava_turns(conversations: object, num_images: int,
                image_token: str = "<image>") -> list[Turn]:
    """LLaVA `conversations` -> turns, images numbered in marker order. Raises
    ValueError(reason, detail): "bad_json", "bad_conversation" (roles not [system], human /
    gpt alternating, ending with gpt), "image_mismatch" (markers != `num_images`, or a marker
    outside a human turn), "empty_text"."""
    if not isinstance(conversations, list) or not conversations or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations):
        raise ValueError("bad_json", "conversations missing or not a list of {from, value}")
    roles = [LLAVA_ROLES.get(t.get("from")) for t in conversations]
    body = roles[1:] if roles[0] == "system" else roles
    if None in roles or not body or len(body) % 2 or \
            body != ["user", "assistant"] * (len(body) // 2):
        raise ValueError("bad_conversation", f"roles {[t.get('from') for t in conversations]}")
    markers = [t["value"].count(image_token) for t in conversations]
    if sum(markers) != num_images or any(m for m, r in zip(markers, roles) if r != "user"):
        raise ValueError("image_mismatch", f"{sum(markers)} {image_token} markers in the "
                                           f"text, {num_images} images")
    turns, next_image = [], 0
    for n, (turn, role) in enumerate(zip(conversations, roles)):
        if role != "user":
            if not turn["value"].strip():
                raise ValueError("empty_text", f"conversations[{n}].value")
            turns.append(Turn(role, (turn["value"],)))
            continue
        content: list[Union[str, int]] = []
        for k, piece in enumerate(turn["value"].split(image_token)):
            if k:
                content.append(next_image)
                next_image += 1
            if piece:
                content.append(piece)
        if not any(isinstance(c, int) or c.strip() for c in content):
            raise ValueError("empty_text", f"conversations[{n}].value")
        turns.append(Turn(role, tuple(content)))
    return turns

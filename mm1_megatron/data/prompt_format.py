"""The prompt format of a pre-trained MM1 model (the paper's few-shot evaluation style, §3.4 /
App. C), in one place: `evaluation.prompts` builds k-shot prompts from it and the HF export
renders it as the tokenizer's / processor's chat template.

    captioning   "<image> A photo of" + " " + caption + "\\n"
    VQA          "<image> Question: {q} Short answer:" + " " + answer + "\\n"

As a chat: each user turn is its images (`<image>` each) then the captioning prompt, or the VQA
prompt when the turn has text (the question); each assistant turn is " " + its text + "\\n"
(an in-context answer). The sequence starts with BOS; nothing is added for the generation
prompt: the model continues after "A photo of" / "Short answer:". Whitespace in turns is
collapsed (a newline would read as the separator). System turns do not exist in this format.
"""

from __future__ import annotations

SEPARATOR = "\n"
CAPTION_PROMPT = " A photo of"
VQA_PROMPT = " Question: {question} Short answer:"


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def pretrain_chat_template(image_token: str = "<image>") -> str:
    """The jinja chat template of the format above (transformers' `apply_chat_template`)."""
    before, after = VQA_PROMPT.split("{question}")
    return "".join([
        "{{- bos_token -}}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}",
        "{%- set items = [{'type': 'text', 'text': message['content']}] -%}",
        "{%- else -%}{%- set items = message['content'] -%}{%- endif -%}",
        "{%- set ns = namespace(text='', images=0) -%}",
        "{%- for item in items -%}",
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

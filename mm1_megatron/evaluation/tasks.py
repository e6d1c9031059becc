"""Few-shot task files: documented JSONL, one example per line.

Captioning (kind "caption")::

    {"image": "images/cat.jpg", "captions": ["A cat on a sofa.", "A sleeping cat.", ...]}

VQA (kind "vqa")::

    {"image": "images/cat.jpg", "question": "What animal is this?",
     "answers": ["cat", "cat", "kitten", ...]}          # the 10 human answers (VQAv2)

Zero-shot instruction benchmarks (`mm1-eval --chat`; VQA lines as above score there too)::

    {"image": "images/a.jpg", "question": "Which is a mammal?",       # kind "choice"
     "options": ["shark", "dolphin", "trout"], "answer": "B"}          # ScienceQA / MMBench
    {"image": "images/a.jpg", "question": "Is there a dog in the image?",
     "answer": "no"}                                                    # kind "yesno" (POPE)

Rules:
- `image` is a path relative to the JSONL file (absolute paths are kept); `"images": [...]`
  (a list) is accepted too, for prompts with several images per example.
- The kind of a file is read from its lines: every line must have `captions` (caption) or
  every line must have `question` + `answers` (vqa); mixing is an error.
- Optional `"id"` (string or int): defaults to the line number (0-based).
- Blank lines and lines starting with `#` are skipped.
The in-context (support) examples of a query are drawn from a support set: by default the same
file without the query itself (`support=` another task file of the same kind otherwise).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

CAPTION, VQA, CHOICE, YESNO = "caption", "vqa", "choice", "yesno"
KINDS = (CAPTION, VQA, CHOICE, YESNO)
CHAT_KINDS = (VQA, CHOICE, YESNO)  # what `mm1-eval --chat` scores


@dataclass(frozen=True)
class Example:
    id: str
    images: tuple[str, ...]  # resolved paths
    captions: tuple[str, ...] = ()  # caption tasks: references
    question: Optional[str] = None  # vqa tasks
    answers: tuple[str, ...] = ()  # vqa tasks: human answers
    options: tuple[str, ...] = ()  # choice tasks, lettered A, B, ...
    answer: Optional[str] = None  # choice: the letter; yesno: "yes" | "no"

    @property
    def target(self) -> str:
        """The text an in-context example shows after its prompt: the first reference
        caption, or the most common human answer (first seen wins ties)."""
        if self.question is None:
            return self.captions[0]
        if self.answer is not None:
            return self.answer
        counts: dict[str, int] = {}
        for a in self.answers:
            counts[a] = counts.get(a, 0) + 1
        return max(counts, key=lambda a: counts[a])  # dicts keep first-seen order


@dataclass
class Task:
    name: str
    kind: str
    examples: list[Example]
    path: Optional[Path] = None
    support: Optional["Task"] = None  # None: the task itself, minus the query
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    def support_for(self, index: int, k: int, seed: int) -> list[Example]:
        """k in-context examples for query `index`, reproducibly: the draw depends only on
        (seed, the query's id, k, the support ids), not on batching, evaluation order or
        the order of lines in the file. The query itself
        is never one of them (nor, with a separate support file, its image)."""
        if k == 0:
            return []
        query = self.examples[index]
        if self.support is None:
            candidates = [e for i, e in enumerate(self.examples) if i != index]
        else:  # a separate support file: drop any entry showing the query's image(s)
            candidates = [e for e in self.support.examples if e.images != query.images]
        if len(candidates) < k:
            raise ValueError(f"task {self.name}: {k}-shot needs {k} support examples, "
                             f"only {len(candidates)} available")
        candidates.sort(key=lambda e: e.id)  # the file's line order does not matter
        rng = random.Random(f"{seed}/{query.id}/{k}")
        return rng.sample(candidates, k)


def _as_str_list(value, what: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: {what!r} must be a non-empty list of strings")
    return tuple(value)


def _parse_line(obj: dict, root: Path, number: int, where: str) -> tuple[str, Example]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a line must be a JSON object")
    if "images" in obj:
        images = _as_str_list(obj["images"], "images", where)
    elif "image" in obj:
        images = _as_str_list(obj["image"], "image", where)
    else:
        raise ValueError(f"{where}: missing 'image'")
    resolved = tuple(str(p if Path(p).is_absolute() else root / p) for p in images)
    ex_id = str(obj.get("id", number))
    if "captions" in obj:
        return CAPTION, Example(ex_id, resolved,
                                captions=_as_str_list(obj["captions"], "captions", where))
    if "question" in obj:
        if not isinstance(obj["question"], str) or not obj["question"].strip():
            raise ValueError(f"{where}: 'question' must be a non-empty string")
        if "options" in obj:
            options = _as_str_list(obj["options"], "options", where)
            letters = [chr(ord("A") + i) for i in range(len(options))]
            if len(options) < 2 or len(options) > 26 or obj.get("answer") not in letters:
                raise ValueError(f"{where}: a choice line needs 2-26 'options' and 'answer', "
                                 f"one of {', '.join(letters[:26])}")
            return CHOICE, Example(ex_id, resolved, question=obj["question"], options=options,
                                   answer=obj["answer"])
        if "answer" in obj:
            if not isinstance(obj["answer"], str) or obj["answer"].lower() not in ("yes", "no"):
                raise ValueError(f"{where}: a yes/no line's 'answer' must be 'yes' or 'no'")
            return YESNO, Example(ex_id, resolved, question=obj["question"],
                                  answer=obj["answer"].lower())
        if "answers" not in obj:
            raise ValueError(f"{where}: a VQA line needs 'answers'")
        return VQA, Example(ex_id, resolved, question=obj["question"],
                            answers=_as_str_list(obj["answers"], "answers", where))
    raise ValueError(f"{where}: a line needs 'captions' (captioning), 'question' + "
                     "'answers' (VQA), + 'options' + 'answer' (choice) or + 'answer' (yes/no)")


def load_task(path: Union[str, Path], name: Optional[str] = None,
              support: Optional[Union[str, Path]] = None) -> Task:
    path = Path(path)
    kinds, examples = set(), []
    with path.open(encoding="utf-8") as f:
        number = 0
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            kind, example = _parse_line(obj, path.parent, number, where)
            kinds.add(kind)
            examples.append(example)
            number += 1
    if not examples:
        raise ValueError(f"{path}: no examples")
    if len(kinds) != 1:
        raise ValueError(f"{path}: mixes kinds of lines ({', '.join(sorted(kinds))})")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate example ids")
    task = Task(name or path.stem, kinds.pop(), examples, path=path)
    if support is not None:
        task.support = load_task(support)
        if task.support.kind != task.kind:
            raise ValueError(f"{support}: support set is {task.support.kind}, task is "
                             f"{task.kind}")
    return task


def write_task(path: Union[str, Path], examples: Sequence[dict]) -> Path:
    """Write task lines (dicts in the format above)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples),
                    encoding="utf-8")
    return path

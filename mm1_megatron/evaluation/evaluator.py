"""Run k-shot tasks: prompts -> batched greedy generation -> CIDEr-D / VQA accuracy; and, for
chat models (`--chat`), zero-shot instruction tasks: VQA accuracy, multiple-choice accuracy,
yes/no accuracy and F1."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from mm1_megatron.data.tokenizer import Tokenizer
from mm1_megatron.evaluation.generate import Generator, parallel_groups_up
from mm1_megatron.evaluation.okvqa_stem import okvqa_stem
from mm1_megatron.evaluation.metrics import (choice_letter, cider_d, normalize_answer,
                                             vqa_accuracy, yes_no_scores)
from mm1_megatron.evaluation.prompts import (SEPARATOR, build_chat_prompt, build_prompt,
                                             postprocess)
from mm1_megatron.evaluation.tasks import CAPTION, CHAT_KINDS, CHOICE, VQA, YESNO, Task

METRIC = {CAPTION: "cider", VQA: "vqa_acc", CHOICE: "choice_acc", YESNO: "yesno_acc"}
METRIC_NAME = {"cider": "CIDEr", "vqa_acc": "VQA acc", "choice_acc": "choice acc",
               "yesno_acc": "yes/no acc", "exact_match": "exact match"}
DEFAULT_MAX_NEW_TOKENS = {CAPTION: 20, VQA: 10, CHOICE: 8, YESNO: 4}


@dataclass
class TaskResult:
    task: str
    kind: str
    shots: int
    metric: str
    # CIDEr-D as pycocoevalcap returns it (papers print it x100, see `reported`), or VQA
    # accuracy in percent.
    score: float
    examples: int  # scored
    predictions: list[dict] = field(default_factory=list)
    # Examples not scored because an image of their prompt (theirs or an in-context
    # example's) is missing or undecodable: {"id", "reason"}.
    skipped: list[dict] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # yes/no: precision, recall, F1, yes ratio
    chat: bool = False  # zero-shot in the chat format

    @property
    def reported(self) -> float:
        """As papers print it: CIDEr x100 (MM1's "CIDEr 116"), VQA accuracy in percent."""
        return self.score * 100.0 if self.metric == "cider" else self.score


class ImageCache:
    """path -> decoded [sub-images, 3, S, S] tensor, DALI CPU/GPU decode, LRU-bounded. `resize`
    and `tiles` are `cfg.vision.resize` / `cfg.vision.tiles`: evaluation must see images shaped
    as in training (a tiled model: each image's overview and tiles)."""

    def __init__(self, size: int, capacity: int = 256, num_threads: int = 2,
                 resize: str = "squash", tiles: int = 0):
        from mm1_megatron.data.images import ImageDecoder

        self.decoder = ImageDecoder(size, batch_size=16, num_threads=num_threads, resize=resize,
                                    tiles=tiles)
        self.per_image = self.decoder.per_image  # encoder inputs per image
        self.capacity = capacity
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, paths: Sequence[str]) -> torch.Tensor:
        """[len(paths) * per_image, 3, S, S]: each image's sub-images in a row, in path order."""
        missing = list(dict.fromkeys(p for p in paths if p not in self.cache))
        if missing:
            data = []
            for p in missing:
                try:
                    with open(p, "rb") as f:
                        data.append(f.read())
                except OSError as err:
                    raise FileNotFoundError(f"{p}: cannot read image ({err.strerror})") from None
            decoded, bad = self.decoder.decode(data)
            if bad:
                raise ValueError(f"{missing[bad[0]]}: cannot decode image "
                                 f"({self.decoder.last_errors.get(bad[0], '')})")
            for p, t in zip(missing, decoded.split(self.per_image)):
                self.cache[p] = t.cpu()
        out = []
        for p in paths:
            self.cache.move_to_end(p)
            out.append(self.cache[p])
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        size = self.decoder.size
        return torch.cat(out) if out else torch.empty(0, 3, size, size)


class FewShotEvaluator:
    def __init__(self, model, tokenizer: Tokenizer, image_size: int, batch_size: int = 8,
                 seed: int = 0, use_cache: bool = True,
                 max_new_tokens: Optional[dict] = None, separator: str = SEPARATOR,
                 images: Optional[ImageCache] = None, resize: str = "squash",
                 tiles: int = 0, chat: bool = False, shard: tuple[int, int] = (0, 1)):
        """`chat`: prompt in the chat format, zero-shot (a fine-tuned model); else the
        pre-training format with k in-context examples. `shard` = (share, shares), from
        `query_shard()` under a launch: each share generates for queries share,
        share + shares, ... and the predictions are gathered (torch.distributed) in query
        order before scoring, so every rank returns one process's result."""
        self.chat = chat
        self.shard = shard
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        self.separator = separator
        self.max_new_tokens = {**DEFAULT_MAX_NEW_TOKENS, **(max_new_tokens or {})}
        self.generator = Generator(model, tokenizer, use_cache=use_cache)
        self.images = images or ImageCache(image_size, resize=resize, tiles=tiles)
        # Placeholders per image: the model's tokens per encoder input x the image's sub-images.
        self.tokens_per_image = model.tokens_per_image * self.images.per_image

    def prompts(self, task: Task, shots: int, indices: Sequence[int]):
        if self.chat:
            if shots:
                raise ValueError("--chat evaluates zero-shot (give --shots 0)")
            if task.kind not in CHAT_KINDS:
                raise ValueError(f"task {task.name}: --chat scores {', '.join(CHAT_KINDS)} "
                                 f"tasks, not {task.kind}")
            return [build_chat_prompt(self.tokenizer, task.kind, task.examples[i],
                                      self.tokens_per_image, self.model.image_token_id)
                    for i in indices]
        if task.kind not in (CAPTION, VQA):
            raise ValueError(f"task {task.name}: {task.kind} tasks are scored with --chat")
        return [build_prompt(self.tokenizer, task.kind, task.examples[i],
                             task.support_for(i, shots, self.seed),
                             self.tokens_per_image, self.model.image_token_id,
                             self.separator) for i in indices]

    def evaluate(self, task: Task, shots: int, limit: Optional[int] = None) -> TaskResult:
        indices = list(range(len(task) if limit is None else min(limit, len(task))))
        rank, ranks = self.shard
        predictions, skipped = self._generate(task, shots, indices[rank::ranks])
        if ranks > 1:
            predictions, skipped = _gathered(predictions, skipped, ranks)
        return self._score(task, shots, indices, predictions, skipped)

    def _generate(self, task: Task, shots: int, indices: list[int]
                  ) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
        """(query index, prediction) and (query index, skip) for `indices`, in order."""
        predictions, skipped = [], []
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start:start + self.batch_size]
            prompts = self.prompts(task, shots, batch)
            usable = []
            for i, prompt in zip(batch, prompts):  # one bad image costs one example
                try:
                    self.images.get(prompt.images)
                    usable.append((i, prompt))
                except (OSError, ValueError) as err:
                    skipped.append((i, {"id": task.examples[i].id, "reason": str(err)}))
            if not usable:
                continue
            batch, prompts = [i for i, _ in usable], [p for _, p in usable]
            images = self.images.get([p for prompt in prompts for p in prompt.images])
            gen = self.generator.generate([p.tokens for p in prompts], images,
                                          max_new_tokens=self.max_new_tokens[task.kind])
            for i, ids, reason in zip(batch, gen.tokens, gen.stop_reasons):
                text = self.tokenizer.decode(ids)
                predictions.append((i, {"id": task.examples[i].id, "raw": text,
                                         "stop": reason,
                                         "prediction": postprocess(text, self.separator)}))
        return predictions, skipped

    def _score(self, task: Task, shots: int, indices: list[int],
               indexed: list[tuple[int, dict]], indexed_skips: list[tuple[int, dict]]
               ) -> TaskResult:
        predictions = [p for _, p in sorted(indexed, key=lambda ip: ip[0])]
        skipped = [s for _, s in sorted(indexed_skips, key=lambda ip: ip[0])]
        scored = {p["id"] for p in predictions}
        examples = [task.examples[i] for i in indices if task.examples[i].id in scored]
        if task.kind == CAPTION:
            score, per = cider_d({p["id"]: p["prediction"] for p in predictions},
                                 {e.id: list(e.captions) for e in examples})
            for p in predictions:
                p["cider"] = per[p["id"]]
        details: dict = {}
        metric = task.meta.get("metric", METRIC[task.kind])  # a benchmark may name its own
        if task.kind == VQA and metric == "exact_match":  # one answer per question (GQA)
            for p, e in zip(predictions, examples):
                p["exact_match"] = float(normalize_answer(p["prediction"]) ==
                                         normalize_answer(e.answers[0]))
            score = 100.0 * sum(p["exact_match"] for p in predictions) / max(1, len(predictions))
        elif task.kind == VQA:
            stems = task.meta.get("answer_stems")  # OK-VQA: answers are stemmed
            for p, e in zip(predictions, examples):
                if stems is not None:
                    p["stemmed"] = okvqa_stem(p["prediction"], stems)
                p["vqa_acc"] = vqa_accuracy(p.get("stemmed", p["prediction"]), e.answers)
            score = 100.0 * sum(p["vqa_acc"] for p in predictions) / max(1, len(predictions))
        elif task.kind == CHOICE:
            for p, e in zip(predictions, examples):
                p["letter"] = choice_letter(p["prediction"], e.options)
                p["correct"] = p["letter"] == e.answer
            score = 100.0 * sum(p["correct"] for p in predictions) / max(1, len(predictions))
        elif task.kind == YESNO:
            details = yes_no_scores([p["prediction"] for p in predictions],
                                    [e.answer for e in examples])
            score = details["accuracy"]
        return TaskResult(task.name, task.kind, shots, metric, float(score),
                          len(examples), predictions, skipped, details, self.chat)


SECONDS_TAG = "eval/seconds"  # how long an evaluation took, beside its scores


def scalar_tag(task: str, shots: int) -> str:
    """The TensorBoard tag of a task's k-shot score: the in-training evaluation's
    (evaluation/callback.py) and `mm1-eval --tensorboard`'s, one name for both."""
    return f"eval/{task}/{shots}shot"


def query_shard() -> tuple[int, int]:
    """(this rank's share, shares) of a task's queries under a launch: Megatron-Core's
    expert-data-parallel rank and size, so ranks that differ only in their TP or EP rank (and
    run each forward pass together) get the same queries; (0, 1) in a world of one."""
    group = _query_group()
    return (0, 1) if group is None else (group.rank(), group.size())


def _query_group():
    from megatron.core import parallel_state

    if not parallel_groups_up():
        return None
    return parallel_state.get_expert_data_parallel_group()


def _gathered(predictions: list, skipped: list, ranks: int) -> tuple[list, list]:
    """Every share's (index, prediction) and (index, skip) pairs, on every rank."""
    import torch.distributed as dist

    parts: list = [None] * ranks
    dist.all_gather_object(parts, (predictions, skipped), group=_query_group())
    return ([p for part in parts for p in part[0]], [s for part in parts for s in part[1]])


def format_table(results: Sequence[TaskResult]) -> str:
    """One row per task, one column per shot count: CIDEr x100 / VQA accuracy %."""
    shots = sorted({r.shots for r in results})
    tasks = list(dict.fromkeys((r.task, r.metric) for r in results))
    by = {(r.task, r.shots): r for r in results}
    any_skipped = any(r.skipped for r in results)
    head = ["task", "metric", "n"] + [f"{k}-shot" for k in shots] + \
        (["skipped (bad images)"] if any_skipped else [])
    rows = [head]
    for name, metric in tasks:
        mine = [r for r in results if r.task == name]
        n = "/".join(sorted({str(r.examples) for r in mine}))  # scored, per shot count
        row = [name, METRIC_NAME[metric], n] + \
            [f"{by[name, k].reported:.1f}" if (name, k) in by else "-" for k in shots]
        if any_skipped:
            row.append("/".join(str(len(by[name, k].skipped)) if (name, k) in by else "-"
                                for k in shots))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def paper_table(results: Sequence[TaskResult], columns: dict[str, str]) -> tuple[str, dict]:
    """MM1 Table 3's shape: one row per shot count, one column per benchmark (`columns`:
    task name -> column title, in the table's order), CIDEr x100 / accuracy %. Returns the
    Markdown and the same figures as a dict ({"columns", "rows": {k: {column: score}},
    "queries": {column: n}, "metrics": {column: name}})."""
    by = {(r.task, r.shots): r for r in results}
    shots = sorted({r.shots for r in results})
    names = [n for n in columns if any(r.task == n for r in results)]
    head = "| shots | " + " | ".join(columns[n] for n in names) + " |"
    lines = [head, "|---" * (len(names) + 1) + "|"]
    rows: dict[int, dict[str, Optional[float]]] = {}
    for k in shots:
        rows[k] = {columns[n]: (round(by[n, k].reported, 2) if (n, k) in by else None)
                   for n in names}
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{v:.1f}"
                                               for v in rows[k].values()) + " |")
    counts = {columns[n]: max(by[n, k].examples for k in shots if (n, k) in by) for n in names}
    metrics = {columns[n]: METRIC_NAME[next(r.metric for r in results if r.task == n)]
               for n in names}
    lines += ["", "Queries scored: " + ", ".join(f"{c} {n}" for c, n in counts.items()) +
              ". Metrics: " + ", ".join(f"{c} {m}" for c, m in metrics.items()) + "."]
    return "\n".join(lines) + "\n", {"columns": [columns[n] for n in names],
                                      "rows": {str(k): v for k, v in rows.items()},
                                      "queries": counts, "metrics": metrics}

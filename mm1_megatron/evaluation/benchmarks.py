"""The benchmarks of the paper's few-shot table (MM1 Table 3), read from the files their
authors publish, under their published names (symlinks allowed):

    coco-karpathy  dataset_coco.json (Karpathy's split: images[{filepath, filename, cocoid,
                   split, sentences[{raw}]}]), val2014/, train2014/. Queries: the 5,000
                   `test` images; shots: `train` + `restval`.
    nocaps         nocaps_val_4500_captions.json (COCO style: images[{id, file_name, domain}],
                   annotations[{image_id, caption}]), validation/ (Open Images' validation
                   images). Shots: COCO Karpathy train (its folder: --support-data).
    textcaps       TextCaps_0.1_val.json and TextCaps_0.1_train.json (data[{image_id,
                   caption_str}], one row per caption: grouped by image), train_images/.
    vqav2          v2_OpenEnded_mscoco_{val,train}2014_questions.json and
                   v2_mscoco_{val,train}2014_annotations.json (joined on question_id),
                   val2014/, train2014/.
    textvqa        TextVQA_0.5.1_{val,train}.json (data[{question_id, image_id, question,
                   answers[10]}]), train_images/ (val's images are Open Images train images).
    vizwiz         Annotations/{val,train}.json (a list of {image, question, answers[{answer,
                   answer_confidence}]}; "unanswerable" is an answer), val/, train/.
    okvqa          OK-VQA v1.1 in VQA format: OpenEnded_mscoco_{val,train}2014_questions.json,
                   mscoco_{val,train}2014_annotations.json (answers[{answer (stemmed),
                   raw_answer}]), val2014/, train2014/. Predictions are stemmed the same way
                   (meta["answer_stems"]: evaluation/okvqa_stem.py).
    gqa            testdev_balanced_questions.json and train_balanced_questions.json (dicts
                   keyed by question id: {imageId, question, answer}), images/.

Each reader returns a `Task` of queries whose `support` is the training split the in-context
examples are drawn from (seeded per query: `Task.support_for`), and `meta["metric"]`:
CIDEr-D for captions, the official VQA accuracy for VQAv2 / TextVQA / VizWiz / OK-VQA, exact
match (after the VQA answer normalisation) for GQA, whose questions have one answer.
A missing file or folder is one line (`BenchmarkError`) naming it and the expected layout.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from mm1_megatron.evaluation.tasks import CAPTION, VQA, Example, Task


class BenchmarkError(ValueError):
    """A benchmark folder that does not hold the published layout (one line)."""


@dataclass(frozen=True)
class Benchmark:
    name: str  # --benchmark NAME
    folder: str  # its folder under --benchmarks-root (--suite paper-fewshot)
    column: str  # its column in the paper's table
    kind: str  # CAPTION | VQA
    metric: str  # "cider" | "vqa_acc" | "exact_match"
    layout: str  # what DIR must hold, for the one-line error
    read: Callable[[Path, Optional[Path]], Task]


def _required(folder: Path, name: str, bench: str, folder_wanted: bool = False) -> Path:
    path = folder / name
    if not (path.is_dir() if folder_wanted else path.is_file()):
        raise BenchmarkError(f"{bench}: {path}{'/' * folder_wanted} is missing (expected in "
                             f"{folder}: {BENCHMARKS[bench].layout})")
    return path


def _file(folder: Path, name: str, bench: str) -> Path:
    return _required(folder, name, bench)


def _dir(folder: Path, name: str, bench: str) -> Path:
    return _required(folder, name, bench, folder_wanted=True)


def _json(folder: Path, name: str, bench: str):
    path = _file(folder, name, bench)
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{bench}: {path} is not JSON ({err})") from None


def _field(record: dict, key: str, where: str):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise BenchmarkError(f"{where}: a record has no {key!r}") from None


def _task(bench: str, queries: list[Example], support: list[Example], folder: Path) -> Task:
    b = BENCHMARKS[bench]
    if not queries:
        raise BenchmarkError(f"{bench}: no queries in {folder}")
    return Task(b.name, b.kind, queries, path=folder,
                support=Task(b.name + "-support", b.kind, support, path=folder),
                meta={"metric": b.metric})


# ---- captions --------------------------------------------------------------------------------

def _karpathy(folder: Path, splits: tuple[str, ...]) -> list[Example]:
    data = _json(folder, "dataset_coco.json", "coco-karpathy")
    where = str(folder / "dataset_coco.json")
    out = []
    for img in _field(data, "images", where):
        if _field(img, "split", where) in splits:
            sub = _dir(folder, _field(img, "filepath", where), "coco-karpathy")
            captions = tuple(_field(s, "raw", where) for s in _field(img, "sentences", where))
            out.append(Example(str(_field(img, "cocoid", where)),
                               (str(sub / _field(img, "filename", where)),), captions=captions))
    return out


def read_coco(folder: Path, support: Optional[Path] = None) -> Task:
    return _task("coco-karpathy", _karpathy(folder, ("test",)),
                 _karpathy(support or folder, ("train", "restval")), folder)


def read_nocaps(folder: Path, support: Optional[Path] = None) -> Task:
    if support is None:
        raise BenchmarkError("nocaps: its in-context examples come from COCO Karpathy train: "
                             "give the COCO folder with --support-data (or put it at "
                             "BENCHMARKS_ROOT/coco for --suite)")
    data = _json(folder, "nocaps_val_4500_captions.json", "nocaps")
    where = str(folder / "nocaps_val_4500_captions.json")
    images = _dir(folder, "validation", "nocaps")
    captions: dict[int, list[str]] = defaultdict(list)
    for ann in _field(data, "annotations", where):
        captions[_field(ann, "image_id", where)].append(_field(ann, "caption", where))
    queries = [Example(str(img["id"]), (str(images / _field(img, "file_name", where)),),
                       captions=tuple(captions[img["id"]]),)
               for img in _field(data, "images", where) if captions.get(img.get("id"))]
    return _task("nocaps", queries, _karpathy(support, ("train", "restval")), folder)


def _textcaps(folder: Path, name: str) -> list[Example]:
    data = _json(folder, name, "textcaps")
    where = str(folder / name)
    images = _dir(folder, "train_images", "textcaps")
    grouped: dict[str, list[str]] = {}
    for row in _field(data, "data", where):  # one row per caption
        grouped.setdefault(str(_field(row, "image_id", where)), []).append(
            _field(row, "caption_str", where))
    return [Example(i, (str(images / f"{i}.jpg"),), captions=tuple(c))
            for i, c in grouped.items()]


def read_textcaps(folder: Path, support: Optional[Path] = None) -> Task:
    return _task("textcaps", _textcaps(folder, "TextCaps_0.1_val.json"),
                 _textcaps(support or folder, "TextCaps_0.1_train.json"), folder)


# ---- VQA -------------------------------------------------------------------------------------

def _vqa_format(folder: Path, questions: str, annotations: str, images: str, prefix: str,
                bench: str, raw_pairs: Optional[list] = None) -> list[Example]:
    """VQAv2 / OK-VQA: questions and annotations joined on question_id. `raw_pairs` collects
    (raw_answer, answer) of every answer that has both (OK-VQA v1.1)."""
    qs = _field(_json(folder, questions, bench), "questions", str(folder / questions))
    where = str(folder / annotations)
    anns = {_field(a, "question_id", where): a
            for a in _field(_json(folder, annotations, bench), "annotations", where)}
    image_dir = _dir(folder, images, bench)
    out = []
    for q in qs:
        qid = _field(q, "question_id", str(folder / questions))
        ann = anns.get(qid)
        if ann is None:
            raise BenchmarkError(f"{bench}: question {qid} of {folder / questions} has no "
                                 f"annotation in {where}")
        answers = tuple(_field(a, "answer", where) for a in _field(ann, "answers", where))
        if raw_pairs is not None:
            raw_pairs += [(a["raw_answer"], a["answer"]) for a in ann["answers"]
                          if isinstance(a.get("raw_answer"), str)]
        image = image_dir / f"{prefix}{int(_field(q, 'image_id', where)):012d}.jpg"
        out.append(Example(str(qid), (str(image),), question=_field(q, "question", where),
                           answers=answers))
    return out


def read_vqav2(folder: Path, support: Optional[Path] = None) -> Task:
    def split(d: Path, s: str) -> list[Example]:
        return _vqa_format(d, f"v2_OpenEnded_mscoco_{s}2014_questions.json",
                           f"v2_mscoco_{s}2014_annotations.json", f"{s}2014",
                           f"COCO_{s}2014_", "vqav2")
    return _task("vqav2", split(folder, "val"), split(support or folder, "train"), folder)


def read_okvqa(folder: Path, support: Optional[Path] = None) -> Task:
    """Predictions are stemmed as the answers were (evaluation/okvqa_stem.py), with the word
    table learned from the training split's raw and stemmed answers."""
    from mm1_megatron.evaluation.okvqa_stem import learn_stems

    def split(d: Path, s: str, pairs: Optional[list] = None) -> list[Example]:
        return _vqa_format(d, f"OpenEnded_mscoco_{s}2014_questions.json",
                           f"mscoco_{s}2014_annotations.json", f"{s}2014", f"COCO_{s}2014_",
                           "okvqa", pairs)
    pairs: list = []
    task = _task("okvqa", split(folder, "val"), split(support or folder, "train", pairs),
                 folder)
    task.meta["answer_stems"] = learn_stems(pairs)
    return task


def _textvqa(folder: Path, split: str) -> list[Example]:
    name = f"TextVQA_0.5.1_{split}.json"
    where = str(folder / name)
    rows = _field(_json(folder, name, "textvqa"), "data", where)
    images = _dir(folder, "train_images", "textvqa")
    return [Example(str(_field(r, "question_id", where)),
                    (str(images / f"{_field(r, 'image_id', where)}.jpg"),),
                    question=_field(r, "question", where),
                    answers=tuple(_field(r, "answers", where)))
            for r in rows]


def read_textvqa(folder: Path, support: Optional[Path] = None) -> Task:
    return _task("textvqa", _textvqa(folder, "val"), _textvqa(support or folder, "train"),
                 folder)


def _vizwiz(folder: Path, split: str) -> list[Example]:
    name = f"Annotations/{split}.json"
    where = str(folder / name)
    rows = _json(folder, name, "vizwiz")
    if not isinstance(rows, list):
        raise BenchmarkError(f"vizwiz: {where} is not a list of questions")
    images = _dir(folder, split, "vizwiz")
    # every human answer counts, whatever its answer_confidence (VizWiz's own evaluation)
    return [Example(str(_field(r, "image", where)), (str(images / r["image"]),),
                    question=_field(r, "question", where),
                    answers=tuple(_field(a, "answer", where)
                                  for a in _field(r, "answers", where)))
            for r in rows]


def read_vizwiz(folder: Path, support: Optional[Path] = None) -> Task:
    return _task("vizwiz", _vizwiz(folder, "val"), _vizwiz(support or folder, "train"), folder)


def _gqa(folder: Path, name: str) -> list[Example]:
    data = _json(folder, name, "gqa")
    where = str(folder / name)
    if not isinstance(data, dict):
        raise BenchmarkError(f"gqa: {where} is not a dict keyed by question id")
    images = _dir(folder, "images", "gqa")
    return [Example(str(qid), (str(images / f"{_field(q, 'imageId', where)}.jpg"),),
                    question=_field(q, "question", where),
                    answers=(_field(q, "answer", where),))
            for qid, q in data.items()]


def read_gqa(folder: Path, support: Optional[Path] = None) -> Task:
    return _task("gqa", _gqa(folder, "testdev_balanced_questions.json"),
                 _gqa(support or folder, "train_balanced_questions.json"), folder)


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("coco-karpathy", "coco", "COCO", CAPTION, "cider",
              "dataset_coco.json, val2014/, train2014/", read_coco),
    Benchmark("nocaps", "nocaps", "NoCaps", CAPTION, "cider",
              "nocaps_val_4500_captions.json, validation/ (+ --support-data: COCO Karpathy)",
              read_nocaps),
    Benchmark("textcaps", "textcaps", "TextCaps", CAPTION, "cider",
              "TextCaps_0.1_val.json, TextCaps_0.1_train.json, train_images/", read_textcaps),
    Benchmark("vqav2", "vqav2", "VQAv2", VQA, "vqa_acc",
              "v2_OpenEnded_mscoco_{val,train}2014_questions.json, "
              "v2_mscoco_{val,train}2014_annotations.json, val2014/, train2014/", read_vqav2),
    Benchmark("textvqa", "textvqa", "TextVQA", VQA, "vqa_acc",
              "TextVQA_0.5.1_val.json, TextVQA_0.5.1_train.json, train_images/", read_textvqa),
    Benchmark("vizwiz", "vizwiz", "VizWiz", VQA, "vqa_acc",
              "Annotations/val.json, Annotations/train.json, val/, train/", read_vizwiz),
    Benchmark("gqa", "gqa", "GQA", VQA, "exact_match",
              "testdev_balanced_questions.json, train_balanced_questions.json, images/",
              read_gqa),
    Benchmark("okvqa", "okvqa", "OK-VQA", VQA, "vqa_acc",
              "OpenEnded_mscoco_{val,train}2014_questions.json, "
              "mscoco_{val,train}2014_annotations.json, val2014/, train2014/", read_okvqa),
)}
# --suite paper-fewshot: the benchmarks in the table's order, each in ROOT/<folder>
SUITE_FOLDERS = {name: b.folder for name, b in BENCHMARKS.items()}


def load_benchmark(name: str, folder: Path, support: Optional[Path] = None) -> Task:
    if name not in BENCHMARKS:
        raise BenchmarkError(f"--benchmark {name}: not one of {', '.join(BENCHMARKS)}")
    if not Path(folder).is_dir():
        raise BenchmarkError(f"{name}: --data {folder} is not a folder (expected: "
                             f"{BENCHMARKS[name].layout})")
    return BENCHMARKS[name].read(Path(folder), None if support is None else Path(support))

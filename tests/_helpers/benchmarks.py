"""Tiny copies of the paper's few-shot benchmarks in their published formats, quirks included:
Karpathy's dataset_coco.json (splits test / train / restval, `filepath` naming the COCO
folder), nocaps' COCO-style captions (a `domain` per image), TextCaps' one row per caption,
VQAv2 / OK-VQA question and annotation files joined on question_id (COCO_<split>2014_<12
digits>.jpg), TextVQA's `data` list, VizWiz's list with answer_confidence and "unanswerable",
GQA's dict keyed by question id. `write_benchmarks(ROOT)` writes ROOT/coco ... ROOT/okvqa as
`mm1-eval --suite paper-fewshot --benchmarks-root ROOT` reads them; QUERIES and SUPPORT rows
each (enough support for 8 shots)."""

from __future__ import annotations

import json
from pathlib import Path

from tests._helpers.data import TEXT, jpeg

QUERIES, SUPPORT = 3, 9
WORDS = ["cat", "dog", "red", "two", "yes", "tree", "blue", "car", "unanswerable", "table"]


def _image(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg(seed))
    return path.name


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _answers(n: int) -> list[str]:
    return [WORDS[(n + i // 4) % len(WORDS)] for i in range(10)]  # a 4/4/2 split of 3 words


def write_coco(root: Path) -> None:
    images = []
    for n in range(QUERIES + SUPPORT + 2):
        split = "test" if n < QUERIES else ("restval" if n % 3 == 0 else "train")
        if n >= QUERIES + SUPPORT:
            split = "val"  # Karpathy's val split: read by nobody here
        folder = "val2014" if split in ("test", "val", "restval") else "train2014"
        name = _image(root / folder / f"COCO_{folder}_{n:012d}.jpg", n)
        images.append({"filepath": folder, "filename": name, "cocoid": 1000 + n,
                       "imgid": n, "split": split,
                       "sentences": [{"raw": TEXT[(n + i) % len(TEXT)], "tokens": [],
                                      "imgid": n, "sentid": 5 * n + i} for i in range(5)],
                       "sentids": list(range(5 * n, 5 * n + 5))})
    _dump(root / "dataset_coco.json", {"images": images, "dataset": "coco"})


def write_nocaps(root: Path) -> None:
    images, annotations = [], []
    for n in range(QUERIES):
        name = _image(root / "validation" / f"{n:016x}.jpg", 50 + n)
        images.append({"id": n, "file_name": name, "height": 16, "width": 24,
                       "domain": ["in-domain", "near-domain", "out-domain"][n % 3],
                       "open_images_id": f"{n:016x}", "coco_url": "https://example.org/x"})
        annotations += [{"image_id": n, "id": 10 * n + i, "caption": TEXT[(n + i) % len(TEXT)]}
                        for i in range(10)]
    _dump(root / "nocaps_val_4500_captions.json",
          {"licenses": [], "info": {}, "images": images, "annotations": annotations})


def write_textcaps(root: Path) -> None:
    for split, count, base in (("val", QUERIES, 100), ("train", SUPPORT, 200)):
        rows = []
        for n in range(count):
            image_id = f"{base + n:016x}"
            _image(root / "train_images" / f"{image_id}.jpg", base + n)
            for i in range(5):  # one row per caption
                rows.append({"image_id": image_id, "image_path": f"train/{image_id}.jpg",
                             "caption_id": 5 * n + i, "caption_str": TEXT[(n + i) % len(TEXT)],
                             "reference_strs": [TEXT[(n + j) % len(TEXT)] for j in range(5)],
                             "set_name": split})
        _dump(root / f"TextCaps_0.1_{split}.json", {"dataset_type": split,
                                                     "dataset_name": "textcaps", "data": rows})


# OK-VQA v1.1's answers as typed and as stemmed (its `raw_answer` and `answer` fields).
OKVQA_RAW = [("riding horses", "ride horse"), ("christmas", "christmas"),
             ("morning", "morn"), ("kites", "kite")]


def _vqa_pair(root: Path, questions: str, annotations: str, split: str, count: int,
              base: int, raw: bool = False) -> None:
    qs, anns = [], []
    for n in range(count):
        image_id = base + n
        _image(root / f"{split}2014" / f"COCO_{split}2014_{image_id:012d}.jpg", image_id)
        qid = image_id * 10
        qs.append({"image_id": image_id, "question": f"What is {TEXT[n % len(TEXT)][:20]}?",
                   "question_id": qid})
        answers = _answers(n)
        records = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                   for i, a in enumerate(answers)]
        if raw:  # OK-VQA v1.1: a 4/4/2 split of typed answers, stemmed
            for i, record in enumerate(records):
                record["raw_answer"], record["answer"] = OKVQA_RAW[(n + i // 4) % len(OKVQA_RAW)]
        anns.append({"question_id": qid, "image_id": image_id, "answer_type": "other",
                     "question_type": "what is", "multiple_choice_answer": records[0]["answer"],
                     "answers": records})
    _dump(root / questions, {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                             "data_subtype": f"{split}2014", "questions": qs})
    _dump(root / annotations, {"info": {}, "data_type": "mscoco",
                               "data_subtype": f"{split}2014", "annotations": anns})


def write_vqav2(root: Path) -> None:
    for split, count, base in (("val", QUERIES, 300), ("train", SUPPORT, 400)):
        _vqa_pair(root, f"v2_OpenEnded_mscoco_{split}2014_questions.json",
                  f"v2_mscoco_{split}2014_annotations.json", split, count, base)


def write_okvqa(root: Path) -> None:
    for split, count, base in (("val", QUERIES, 500), ("train", SUPPORT, 600)):
        _vqa_pair(root, f"OpenEnded_mscoco_{split}2014_questions.json",
                  f"mscoco_{split}2014_annotations.json", split, count, base, raw=True)


def write_textvqa(root: Path) -> None:
    for split, count, base in (("val", QUERIES, 700), ("train", SUPPORT, 800)):
        rows = []
        for n in range(count):
            image_id = f"{base + n:016x}"
            _image(root / "train_images" / f"{image_id}.jpg", base + n)
            rows.append({"question": "What does the sign say?", "image_id": image_id,
                         "image_classes": ["Sign"], "flickr_original_url": "", "flickr_300k_url":
                         "", "image_width": 24, "image_height": 16, "answers": _answers(n),
                         "question_tokens": [], "question_id": base + n,
                         "set_name": split})
        _dump(root / f"TextVQA_0.5.1_{split}.json",
              {"dataset_type": split, "dataset_name": "textvqa", "dataset_version": "0.5.1",
               "data": rows})


def write_vizwiz(root: Path) -> None:
    for split, count, base in (("val", QUERIES, 900), ("train", SUPPORT, 1000)):
        rows = []
        for n in range(count):
            name = _image(root / split / f"VizWiz_{split}_{n:08d}.jpg", base + n)
            answers = _answers(n + 8)  # "unanswerable" among them
            rows.append({"image": name, "question": "What is this?",
                         "answers": [{"answer": a, "answer_confidence":
                                      ["yes", "maybe", "no"][i % 3]}
                                     for i, a in enumerate(answers)],
                         "answer_type": "other", "answerable": int("unanswerable" not in
                                                                   answers[:4])})
        _dump(root / "Annotations" / f"{split}.json", rows)


def write_gqa(root: Path) -> None:
    for name, count, base in (("testdev_balanced_questions.json", QUERIES, 1100),
                              ("train_balanced_questions.json", SUPPORT, 1200)):
        questions = {}
        for n in range(count):
            image_id = f"n{base + n}"
            _image(root / "images" / f"{image_id}.jpg", base + n)
            questions[str(20000000 + base + n)] = {
                "semantic": [], "entailed": [], "equivalent": [], "question":
                f"Is the {WORDS[n % 4]} on the left?", "imageId": image_id, "isBalanced": True,
                "groups": {"global": None, "local": "10c-cat"}, "answer": WORDS[(n + 1) % 4],
                "semanticStr": "", "annotations": {"answer": {}, "question": {},
                                                   "fullAnswer": {}},
                "types": {"detailed": "relS", "semantic": "rel", "structural": "verify"},
                "fullAnswer": "It is."}
        _dump(root / name, questions)


WRITERS = {"coco": write_coco, "nocaps": write_nocaps, "textcaps": write_textcaps,
           "vqav2": write_vqav2, "textvqa": write_textvqa, "vizwiz": write_vizwiz,
           "gqa": write_gqa, "okvqa": write_okvqa}


def write_benchmarks(root: Path) -> Path:
    for folder, write in WRITERS.items():
        write(root / folder)
    return root

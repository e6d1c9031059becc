"""Four-row copies of two stock lmms-eval tasks' datasets, in their published columns, saved
as `mm1-lmms-tasks save` saves the real ones (`save_to_disk` + index.json): POPE (generation,
yes/no; lmms-lab/POPE) and SEED-Bench for `seedbench_ppl` (multiple choice by loglikelihood;
lmms-lab/SEED-Bench). `rows()` needs only numpy and PIL (the test's reference side);
`python -m tests._helpers.lmms_data DIR` needs `datasets` (run under the lmms-eval overlay)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

POPE = "lmms-lab__POPE"
SEED = "lmms-lab__SEED-Bench"


def image(i: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(100 + i)
    return Image.fromarray(rng.integers(0, 255, (32 + 4 * i, 40, 3), dtype=np.uint8))


def rows() -> dict[str, dict[str, list]]:
    ids = [str(i) for i in range(4)]
    pope = {"id": ids, "question_id": ids,
            "question": ["Is there a cat in the image?", "Is there a dog in the image?",
                         "Is there a car in the image?", "Is there a person in the image?"],
            "answer": ["yes", "no", "no", "yes"], "image_source": ["COCO_val2014"] * 4,
            "category": ["adversarial", "popular", "random", "adversarial"],
            "image": [image(i) for i in range(4)]}
    seed = {"answer": ["A", "B", "C", "D"],
            "choice_a": ["a cat", "red", "one", "yes"], "choice_b": ["a dog", "blue", "two", "no"],
            "choice_c": ["a car", "green", "three", "maybe"],
            "choice_d": ["a tree", "black", "four", "never"],
            "data_id": ids, "data_type": ["image"] * 4,
            "question": ["What is shown?", "Which colour is it?", "How many are there?",
                         "Is it day?"],
            "question_id": ids, "question_type_id": [1, 2, 3, 4],
            "image": [[image(4 + i)] for i in range(4)], "segment": [None] * 4}
    return {"pope": pope, "seedbench_ppl": seed}


def save(folder: Path) -> None:
    import datasets

    v = datasets.Value
    data = rows()
    pope = datasets.Features({"id": v("string"), "question_id": v("string"),
                              "question": v("string"), "answer": v("string"),
                              "image_source": v("string"), "category": v("string"),
                              "image": datasets.Image()})
    seed = datasets.Features({**{k: v("string") for k in (
        "answer", "choice_a", "choice_b", "choice_c", "choice_d", "data_id", "data_type",
        "question", "question_id")}, "question_type_id": v("int64"),
        "image": datasets.Sequence(datasets.Image()), "segment": datasets.Sequence(v("int64"))})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(data["pope"], features=pope)}
                         ).save_to_disk(str(folder / POPE))
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(data["seedbench_ppl"],
                                                             features=seed)}
                         ).save_to_disk(str(folder / SEED))
    (folder / "index.json").write_text(json.dumps({"pope": POPE, "seedbench_ppl": SEED}))


if __name__ == "__main__":
    save(Path(sys.argv[1]))

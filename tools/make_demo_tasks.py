"""Build tiny few-shot tasks (captioning + VQA) from the demo dataset's caption shards.

    python tools/make_demo_tasks.py --data demo_data --output demo_tasks

Writes OUTPUT/images/*.jpg (one JPEG per photo, the first crop variant in the shards) and

    OUTPUT/caption.jsonl  {"id", "image", "captions": [the photo's 4 hand-written captions]}
    OUTPUT/vqa.jsonl      {"id", "image", "question", "answers": [10 answers]}

VQA questions per photo: "What is in the photo?" (answers from the photo's subject, a few
synonyms spread over the 10 answers) and "Is this photo in black and white?" (yes/no).

For `mm1-eval --chat` (a `demo-sft` model), zero-shot:

    OUTPUT/chat_vqa.jsonl     the held-out conversations' questions (demo_data's
                              sft_heldout.jsonl) as short-answer VQA (their answer, 10 x)
    OUTPUT/chat_choice.jsonl  "What is in the photo?" with 3 options (the subject, two others)
    OUTPUT/chat_yesno.jsonl   "Is there a <subject> in the image?" once true, once false
Deterministic. The task format is documented in mm1_megatron/evaluation/tasks.py.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

# photo -> (subject answers (the most common first), black and white?)
SUBJECTS: dict[str, tuple[list[str], bool]] = {
    "astronaut.png": (["astronaut", "woman", "astronaut"], False),
    "chelsea.png": (["cat", "tabby cat", "cat"], False),
    "coffee.png": (["coffee", "cup of coffee", "coffee"], False),
    "rocket.jpg": (["rocket", "rocket launch", "rocket"], False),
    "motorcycle_left.png": (["motorcycle", "motorbike", "motorcycle"], False),
    "hubble_deep_field.jpg": (["galaxies", "stars", "galaxies"], False),
    "retina.jpg": (["retina", "eye", "retina"], False),
    "ihc.png": (["tissue", "cells", "tissue"], False),
    "camera.png": (["man", "photographer", "man"], True),
    "coins.png": (["coins", "money", "coins"], True),
    "moon.png": (["moon", "craters", "moon"], True),
    "brick.png": (["bricks", "wall", "bricks"], True),
    "grass.png": (["grass", "grass", "lawn"], True),
    "page.png": (["text", "page", "text"], True),
    "clock_motion.png": (["clock", "clock", "wall clock"], True),
    "cell.png": (["cell", "cell", "microscope"], True),
}


def ten_answers(options: list[str]) -> list[str]:
    """10 human-like answers: 6 x the first option, then the options 2 x each (cycled)."""
    rest = [options[(i // 2) % len(options)] for i in range(4)]
    return [options[0]] * 6 + rest


def make_demo_tasks(data: str | Path, output: str | Path) -> dict[str, Path]:
    from mm1_megatron.data.shard_reader import open_dataset
    from mm1_megatron.evaluation.tasks import write_task

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_demo_data import PHOTOS

    # Caption k of a photo is the caption of its crop variant k.
    which = {c: (photo, k) for photo, caps in PHOTOS.items() for k, c in enumerate(caps)}
    data, out = Path(data), Path(output)
    ds = open_dataset(data / "caption")
    captions: dict[str, list[str]] = defaultdict(list)
    first_image: dict[str, bytes] = {}
    for i in range(len(ds)):
        sample = ds.read(i, images=True)
        photo, variant = which[sample.texts[0]]
        captions[photo].append(sample.texts[0])
        if variant == 0:
            first_image[photo] = sample.images[0]
    (out / "images").mkdir(parents=True, exist_ok=True)
    cap_lines, vqa_lines = [], []
    for photo in sorted(first_image):
        stem = photo.rsplit(".", 1)[0]
        rel = f"images/{stem}.jpg"
        (out / rel).write_bytes(first_image[photo])
        cap_lines.append({"id": stem, "image": rel, "captions": captions[photo]})
        if photo in SUBJECTS:
            subject, gray = SUBJECTS[photo]
            vqa_lines.append({"id": f"{stem}/what", "image": rel,
                              "question": "What is in the photo?",
                              "answers": ten_answers(subject)})
            vqa_lines.append({"id": f"{stem}/bw", "image": rel,
                              "question": "Is this photo in black and white?",
                              "answers": ["yes" if gray else "no"] * 10})
    chat = _chat_tasks(data, out, sorted(p for p in first_image if p in SUBJECTS))
    return {"caption": write_task(out / "caption.jsonl", cap_lines),
            "vqa": write_task(out / "vqa.jsonl", vqa_lines), **chat}


def _chat_tasks(data: Path, out: Path, photos: list[str]) -> dict[str, Path]:
    import json

    from mm1_megatron.evaluation.tasks import write_task

    vqa = []
    held = data / "sft_heldout.jsonl"
    for line in held.read_text().splitlines() if held.is_file() else []:
        record = json.loads(line)
        image = f"images/heldout_{Path(record['image']).name}"
        (out / image).write_bytes((data / record["image"]).read_bytes())
        question = record["conversations"][0]["value"].replace("<image>", "").strip()
        answer = record["conversations"][1]["value"].rstrip(".")
        # two spellings, so the official VQA normalisation (articles, punctuation) applies
        vqa.append({"id": record["id"], "image": image, "question": question,
                    "answers": ten_answers([answer, answer.lower()])})
    choice, yesno = [], []
    subjects = [SUBJECTS[p][0][0] for p in photos]
    for n, photo in enumerate(photos):
        stem = photo.rsplit(".", 1)[0]
        rel = f"images/{stem}.jpg"
        subject = subjects[n]
        others = [subjects[(n + 3) % len(photos)], subjects[(n + 7) % len(photos)]]
        options = [subject, *others]
        order = [options[(i + n) % 3] for i in range(3)]  # the answer's letter varies
        choice.append({"id": stem, "image": rel, "question": "What is in the photo?",
                       "options": order, "answer": "ABC"[order.index(subject)]})
        for kind, thing in (("yes", subject), ("no", others[0])):
            article = "an" if thing[0] in "aeiou" else "a"
            yesno.append({"id": f"{stem}/{kind}", "image": rel,
                          "question": f"Is there {article} {thing} in the image?",
                          "answer": kind})
    return {"chat_vqa": write_task(out / "chat_vqa.jsonl", vqa),
            "chat_choice": write_task(out / "chat_choice.jsonl", choice),
            "chat_yesno": write_task(out / "chat_yesno.jsonl", yesno)}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the demo dataset (tools/make_demo_data.py)")
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    for kind, path in make_demo_tasks(args.data, args.output).items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Build the demo dataset (all three kinds) and its tokenizer from scikit-image's sample photos.

    python tools/make_demo_data.py --output demo_data

Writes DIR/caption, DIR/interleaved, DIR/text, DIR/sft (prepared shard folders; `sft`: short
hand-written conversations about the photos, for `demo-sft`), DIR/sft_heldout.jsonl (held-out
conversations, LLaVA format, for `mm1-eval --chat`) and DIR/tokenizer.model
(vocab <= 2048, the `demo` preset's llm.vocab_size). Images: 16 photos shipped inside the
scikit-image package, each JPEG-encoded in 4 crops/sizes (64 images, no network). Captions,
interleaved documents and text documents are hand-written below. Deterministic: same bytes on
every run (fixed crops, JPEG quality, tar mtime, single-threaded tokenizer training).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Optional

DEMO_VOCAB = 2048
VARIANTS = ("full", "center", "corner", "small")  # 4 JPEGs per photo

# file in skimage/data -> hand-written captions (variant k uses caption k % len)
PHOTOS: dict[str, list[str]] = {
    "astronaut.png": [
        "An astronaut in a white spacesuit smiles in front of an American flag.",
        "Portrait of a female astronaut holding her helmet, with a flag behind her.",
        "A NASA crew member poses for an official photo in her orange and white suit.",
        "Close view of an astronaut's face and the patches on her suit.",
    ],
    "chelsea.png": [
        "A ginger tabby cat looks to the side with bright yellow eyes.",
        "Close-up of an orange cat named Chelsea sitting indoors.",
        "A striped cat with long white whiskers stares at something off camera.",
        "The soft fur of a tabby cat, brown and orange stripes.",
    ],
    "coffee.png": [
        "A cup of coffee with a saucer and a spoon on a red table.",
        "Top view of a cappuccino in a white cup, foam on the surface.",
        "Fresh coffee served in a ceramic cup on a bright background.",
        "A hot drink with milk foam waiting on a table.",
    ],
    "rocket.jpg": [
        "A rocket lifts off from the launch pad in a cloud of smoke.",
        "A space launch at the coast, flames under the rocket.",
        "The Falcon rocket rising into a pale blue sky.",
        "Launch tower and rocket at the moment of ignition.",
    ],
    "motorcycle_left.png": [
        "A motorcycle parked in a garage next to shelves and tools.",
        "A red motorbike seen from the side in a workshop.",
        "An indoor scene with a parked motorcycle and a cluttered wall.",
        "The front wheel and engine of a motorcycle.",
    ],
    "hubble_deep_field.jpg": [
        "Thousands of distant galaxies in the Hubble Deep Field.",
        "A telescope image of deep space full of small glowing galaxies.",
        "Spiral and elliptical galaxies scattered across a black sky.",
        "A dark patch of sky revealing faint, colorful galaxies.",
    ],
    "retina.jpg": [
        "A photograph of the human retina with red blood vessels.",
        "Fundus image of an eye showing the optic disc and vessels.",
        "Medical image of the back of the eye, orange and red.",
        "Branching blood vessels spread across the retina.",
    ],
    "ihc.png": [
        "A microscope slide of tissue stained brown and blue.",
        "Immunohistochemistry image of cells under a microscope.",
        "Stained tissue sample with dark brown and pale blue regions.",
        "A magnified view of stained cells in a tissue section.",
    ],
    "camera.png": [
        "A black and white photo of a man with a camera on a tripod.",
        "A photographer in a coat stands on a lawn behind his camera.",
        "Grayscale picture of a cameraman with buildings in the distance.",
        "A classic test image: a man looking through a camera.",
    ],
    "coins.png": [
        "Old coins laid out in rows on a dark background.",
        "A grayscale photo of many small coins.",
        "Rows of round metal coins of slightly different sizes.",
        "Several coins with worn faces seen from above.",
    ],
    "moon.png": [
        "The surface of the moon with craters and gray plains.",
        "A close view of lunar craters in black and white.",
        "Rough gray terrain on the moon, lit from the side.",
        "Craters and ridges on the lunar surface.",
    ],
    "brick.png": [
        "A brick wall in black and white.",
        "Rows of bricks held together by lines of mortar.",
        "The rough texture of an old brick wall.",
        "A close-up of bricks and mortar in gray tones.",
    ],
    "grass.png": [
        "Blades of grass seen from above in grayscale.",
        "A dense patch of grass, a natural texture.",
        "Thin leaves of grass crossing each other.",
        "A field of short grass in black and white.",
    ],
    "page.png": [
        "A scanned page of printed text.",
        "A photo of a book page with several lines of text.",
        "Printed words on a sheet of paper, slightly uneven light.",
        "A document page with dark text on a light background.",
    ],
    "clock_motion.png": [
        "A wall clock blurred by motion.",
        "A round clock with hands, smeared as the camera moved.",
        "A grayscale image of a clock face with motion blur.",
        "A blurry clock on a plain background.",
    ],
    "cell.png": [
        "A single cell imaged under a microscope.",
        "A grayscale microscopy image of a living cell.",
        "The outline of a cell and its nucleus in gray.",
        "A biological cell seen through a light microscope.",
    ],
}

# Interleaved documents: str = text segment, (photo, variant) = image.
DOCUMENTS: list[list] = [
    ["A day at the space center.", ("rocket.jpg", 0),
     "The launch was loud and the smoke rose for minutes.", ("astronaut.png", 0),
     "Later we met an astronaut who told us about life in orbit."],
    ["My cat Chelsea has a favorite spot by the window.", ("chelsea.png", 0),
     "She watches birds for hours and ignores everyone."],
    ["How I make coffee in the morning:", ("coffee.png", 1),
     "Grind the beans, heat the water just below boiling, and pour slowly.",
     "A little milk foam on top makes it perfect."],
    ["Looking far away.", ("hubble_deep_field.jpg", 0),
     "Every small spot in this image is a galaxy with billions of stars.",
     ("hubble_deep_field.jpg", 2), "Even the faintest ones are millions of light years away."],
    ["The eye doctor took a picture of my retina.", ("retina.jpg", 0),
     "The red lines are blood vessels.", ("retina.jpg", 1),
     "The bright circle is where the optic nerve leaves the eye."],
    ["Under the microscope, tissue looks like a map.", ("ihc.png", 0),
     "Brown stain marks one protein.", ("cell.png", 0),
     "A single cell has a clear outline and a nucleus."],
    ["An old photo of a photographer.", ("camera.png", 0),
     "The image is so common that many image processing books use it."],
    ["Textures are everywhere.", ("brick.png", 0), ("grass.png", 0), ("gravel.png", None),
     "Bricks, grass and stones each have their own pattern."],
    ["A night of watching the moon.", ("moon.png", 0),
     "With a small telescope you can see craters clearly.", ("moon.png", 2),
     "The shadows are longest near the line between day and night."],
    ["My coin collection.", ("coins.png", 0),
     "Some of these coins are more than a hundred years old."],
    ["Our garage project.", ("motorcycle_left.png", 0),
     "We spent the winter fixing this motorcycle.", ("motorcycle_left.png", 3),
     "The engine finally started in March."],
    ["Reading in the age of cameras.", ("page.png", 0),
     "Text in photos can be read by machines, if the image is sharp.", ("clock_motion.png", 0),
     "Motion blur makes both clocks and words hard to read."],
]

TEXTS: list[str] = [
    "Cats are small carnivores that have lived with people for thousands of years. They sleep "
    "for much of the day and hunt at dawn and dusk.\n\nA cat's whiskers help it judge whether "
    "it can fit through a gap. Its eyes see well in dim light.",
    "Coffee grows as the seed of a cherry-like fruit. After harvest the seeds are dried, "
    "roasted and ground.\n\nThe roast decides much of the flavor: light roasts taste bright "
    "and fruity, dark roasts taste bitter and smoky.",
    "A rocket carries its own fuel and oxidizer, so it can fly where there is no air. Most of "
    "its mass at launch is propellant.\n\nReaching orbit means flying sideways very fast: "
    "about eight kilometers per second.",
    "The Hubble Space Telescope was launched in 1990. Above the atmosphere, it takes sharp "
    "images of planets, stars and galaxies.\n\nThe Deep Field images showed that even an "
    "empty-looking patch of sky holds thousands of galaxies.",
    "The retina is a thin layer of tissue at the back of the eye. Light-sensitive cells turn "
    "light into signals that travel along the optic nerve to the brain.\n\nDoctors photograph "
    "the retina to look for disease in its blood vessels.",
    "The moon has no air and no weather, so its craters last for billions of years. Its dark "
    "plains are old lava flows.\n\nThe same side of the moon always faces the earth.",
    "Microscopes let us see cells, the small units that make up living things. Stains color "
    "parts of a cell so they stand out.\n\nA nucleus holds the cell's DNA.",
    "Motorcycles have two wheels, an engine and a frame. Keeping one in good shape means "
    "checking the chain, the tires and the brakes.\n\nIn winter many riders store their bikes "
    "in a garage and work on them.",
    "Bricks are made of clay fired in a kiln. Laid in rows with mortar, they make walls that "
    "last for centuries.\n\nGrass, gravel and brick are common test textures in image "
    "processing.",
    "A language model reads text as tokens. A multimodal model also reads images: each image "
    "becomes a short run of tokens placed where the picture appeared in the document.\n\n"
    "Training mixes image-caption pairs, interleaved documents and plain text.",
]


# Hand-written conversations about the photos (the `sft` set, for `demo-sft`): photo, variant,
# then (question, answer) turns. The first image of each conversation comes with its first
# question. HELD_OUT ones are not trained on (mm1-eval --chat scores them).
CONVERSATIONS: list[tuple[str, int, list[tuple[str, str]]]] = [
    ("astronaut.png", 0, [("What is the person wearing?", "A white spacesuit."),
                          ("What is behind her?", "An American flag.")]),
    ("astronaut.png", 1, [("What is her job?", "She is an astronaut.")]),
    ("chelsea.png", 0, [("What animal is this?", "A cat."),
                        ("What colour is its fur?", "Orange with brown stripes.")]),
    ("chelsea.png", 2, [("What colour are the cat's eyes?", "Yellow.")]),
    ("coffee.png", 0, [("What drink is shown?", "A cup of coffee."),
                       ("What is the cup standing on?", "A saucer on a red table.")]),
    ("coffee.png", 1, [("Is there foam on the drink?", "Yes, milk foam.")]),
    ("rocket.jpg", 0, [("What is happening?", "A rocket is lifting off."),
                       ("What is under the rocket?", "Flames and smoke.")]),
    ("rocket.jpg", 2, [("Is the rocket on the ground or in the air?", "In the air.")]),
    ("motorcycle_left.png", 0, [("What vehicle is this?", "A motorcycle."),
                                ("Where is it parked?", "In a garage.")]),
    ("motorcycle_left.png", 1, [("What colour is the motorbike?", "Red.")]),
    ("hubble_deep_field.jpg", 0, [("What are the small lights?", "Distant galaxies.")]),
    ("hubble_deep_field.jpg", 1, [("Which telescope took this?", "The Hubble telescope.")]),
    ("retina.jpg", 0, [("What does this image show?", "The retina of an eye.")]),
    ("ihc.png", 0, [("What kind of image is this?", "A stained tissue sample under a "
                                                     "microscope.")]),
    ("camera.png", 0, [("What is the man holding?", "A camera on a tripod."),
                       ("Is the photo in colour?", "No, it is black and white.")]),
    ("coins.png", 0, [("What objects are shown?", "Old coins."),
                      ("How many rows of coins are there?", "Four rows.")]),
    ("moon.png", 0, [("What is this?", "The surface of the Moon.")]),
    ("brick.png", 0, [("What is the texture?", "A brick wall.")]),
    ("grass.png", 0, [("What is shown?", "Grass.")]),
    ("page.png", 0, [("What is on the page?", "Printed text.")]),
    ("clock_motion.png", 0, [("What object is this?", "A clock, blurred by motion.")]),
    ("cell.png", 0, [("What is this image of?", "A cell under a microscope.")]),
    # held out
    ("chelsea.png", 3, [("What animal is this?", "A cat.")]),
    ("rocket.jpg", 3, [("What is happening?", "A rocket is lifting off.")]),
    ("coffee.png", 3, [("What drink is shown?", "A cup of coffee.")]),
]
HELD_OUT = 3  # the last ones


def _conversation(turns: list[tuple[str, str]]) -> list:
    """Chat turns of (question, answer) pairs; the sample's one image (0) opens the first."""
    from mm1_megatron.data.prompt_format import Turn

    out = []
    for n, (question, answer) in enumerate(turns):
        out.append(Turn("user", (0, "\n" + question) if n == 0 else (question,)))
        out.append(Turn("assistant", (answer,)))
    return out


def _variant(im, k: int):
    """Crop/size variant k of a PIL image (deterministic)."""
    from PIL import Image

    w, h = im.size
    if k == 0:  # whole photo, longest side 378
        s = 378 / max(w, h)
        return im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    if k == 1:  # center square
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        return im.crop(box).resize((320, 320), Image.BICUBIC)
    if k == 2:  # top-left 60%
        return im.crop((0, 0, int(w * 0.6), int(h * 0.6))).resize((256, 256 * h // w or 1),
                                                                  Image.BICUBIC)
    return im.resize((160, max(1, 160 * h // w)), Image.BICUBIC)  # small thumbnail


def _jpegs(names: list[str]) -> dict[tuple[str, int], bytes]:
    import skimage.data
    from PIL import Image

    root = Path(skimage.data.__file__).parent
    out = {}
    for name in names:
        with Image.open(root / name) as im:
            im = im.convert("RGB")
            for k in range(len(VARIANTS)):
                buf = io.BytesIO()
                _variant(im, k).save(buf, format="JPEG", quality=88)
                out[name, k] = buf.getvalue()
    return out


def make_demo_data(output: str | Path, vocab_size: int = DEMO_VOCAB,
                   progress: bool = False) -> dict:
    """Build everything; returns {"caption": n, "interleaved": n, "text": n, "images": n,
    "vocab_size": n}."""
    from mm1_megatron.data.shard_writer import RawSample, write_dataset
    from mm1_megatron.data.tokenizer import Tokenizer, train_tokenizer

    out = Path(output)
    names = sorted(set(PHOTOS) | {n for d in DOCUMENTS for s in d
                                  if isinstance(s, tuple) for n in [s[0]]})
    jpegs = _jpegs(names)

    captions = [RawSample([0, caps[k % len(caps)]], [("jpg", jpegs[name, k])], f"{name}#{k}")
                for name, caps in PHOTOS.items() for k in range(len(VARIANTS))]
    docs = []
    for n, doc in enumerate(DOCUMENTS):
        segs, imgs = [], []
        for s in doc:
            if isinstance(s, str):
                segs.append(s)
            else:
                imgs.append(("jpg", jpegs[s[0], s[1] or 0]))
                segs.append(len(imgs) - 1)
        docs.append(RawSample(segs, imgs, f"doc{n}"))
    texts = [RawSample([t], [], f"text{n}") for n, t in enumerate(TEXTS)]
    conversations = [RawSample([], [("jpg", jpegs[name, k])], f"{name}#{k}#chat",
                               turns=_conversation(turns))
                     for name, k, turns in CONVERSATIONS[:-HELD_OUT]]

    corpus = ([c for caps in PHOTOS.values() for c in caps] + TEXTS
              + [s for d in DOCUMENTS for s in d if isinstance(s, str)])
    tok_path = train_tokenizer(corpus, vocab_size, out / "tokenizer.model", model_type="bpe",
                               exact_vocab=False)
    tok = Tokenizer.load(tok_path)
    counts = {}
    # The tokenizer is trained without the conversations (byte fallback covers their words):
    # the pre-training demo's tokenizer, and so its figures, stay what they were.
    for kind, samples in (("caption", captions), ("interleaved", docs), ("text", texts),
                          ("sft", conversations)):
        m = write_dataset(samples, out / kind, kind, shard_size_mb=0.5 if kind == "caption"
                          else 64, tokenizer=tok, progress=progress, total=len(samples))
        # The manifest must not depend on where DIR lives (reproducible bytes).
        m["tokenizer"]["path"] = "../tokenizer.model"
        (out / kind / "manifest.json").write_text(json.dumps(m, indent=1) + "\n")
        counts[kind] = m["samples"]
        counts["images"] = counts.get("images", 0) + m["images"]
    counts["vocab_size"] = tok.vocab_size
    with open(out / "sft_heldout.jsonl", "w") as f:  # held out: LLaVA format, image paths
        for name, k, turns in CONVERSATIONS[-HELD_OUT:]:
            image = f"heldout/{name.split('.')[0]}_{k}.jpg"
            (out / "heldout").mkdir(exist_ok=True)
            (out / image).write_bytes(jpegs[name, k])
            conv = []
            for n, (question, answer) in enumerate(turns):
                conv += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + question},
                         {"from": "gpt", "value": answer}]
            f.write(json.dumps({"id": f"{name}#{k}", "image": image,
                                "conversations": conv}) + "\n")
    (out / "demo.json").write_text(json.dumps(counts, indent=1) + "\n")
    return counts


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output", required=True)
    p.add_argument("--vocab-size", type=int, default=DEMO_VOCAB)
    args = p.parse_args(argv)
    counts = make_demo_data(args.output, args.vocab_size, progress=True)
    print(f"{args.output}: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

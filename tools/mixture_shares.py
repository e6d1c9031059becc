"""What the 45/45/10 mixture realises per source, for `data.mixture_unit` sequences vs documents.

    python tools/mixture_shares.py --data demo_data [--rows 400] [--json]
    python tools/mixture_shares.py --synthetic [--rows 2000] [--json]

Prints, per unit and source, the share of rows (a mixed row counts towards each source by
its share of the row's real tokens), of real tokens and of documents; the last line is JSON.

`--data DIR`: the prepared dataset under the demo preset's shapes (only text is read).
`--synthetic`: a corpus with realistic lengths at the paper's shapes (4096 tokens per row,
144 tokens per image, at most 16 images per row), drawn with a fixed seed:
  - caption: 1 image + 10-40 text tokens (~170 positions with the image);
  - interleaved: OBELICS-like, ~816 text tokens and ~2.5 images per document on average
    (OBELICS: 115B tokens, 353M images over 141M documents);
  - text: C4-like, ~430 tokens per document (C4 en: 156B tokens over 365M documents).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys

from mm1_megatron.data.mixture import SOURCES, row_stream, source_shares
from mm1_megatron.data.packing import IMAGE, Document, Packer

UNITS = ("sequences", "documents")
WEIGHTS = [0.45, 0.45, 0.10, 0.0]  # MM1's mixture; no SFT conversations


def synthetic_document(source: int, epoch: int, index: int, doc_id: int) -> Document:
    rng = random.Random(source * 1_000_003 + index)  # a document is the same every epoch
    if source == 1:  # caption
        tokens = [IMAGE] + [5 + rng.randrange(1000) for _ in range(rng.randint(10, 40))]
    elif source == 0:  # interleaved: images spread through the text
        words = max(1, int(rng.lognormvariate(6.5, 0.6)))  # mean ~ e^(6.5+0.18) ~ 800
        images = max(1, min(8, int(rng.expovariate(1 / 2.5) + 0.5)))
        tokens = [5 + rng.randrange(1000) for _ in range(words)]
        for _ in range(images):
            tokens.insert(rng.randrange(len(tokens) + 1), IMAGE)
    else:  # text
        tokens = [5 + rng.randrange(1000) for _ in range(max(1, int(rng.lognormvariate(5.9,
                                                                                   0.6))))]
    return Document(doc_id, source, tokens, [None] * tokens.count(IMAGE))


def synthetic_shares(unit: str, rows: int, sizes=(200_000, 200_000, 200_000, 0)) -> dict:
    stream = row_stream(unit, list(sizes), WEIGHTS, 0,
                        lambda: Packer(4096, 144, 16, image_token_id=3), synthetic_document)
    return source_shares([row for row, _ in itertools.islice(iter(stream), rows)])


def dataset_shares(unit: str, data: str, rows: int) -> dict:
    from mm1_megatron.config import load_config
    from mm1_megatron.data.loader import MultimodalLoader

    cfg = load_config("demo", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               f"data.mixture_unit={unit}"])
    loader = MultimodalLoader(cfg, 0, 1, log=None, decode_images=False)
    return source_shares([row for row, _ in itertools.islice(iter(loader.stream), rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a prepared dataset folder (e.g. demo_data)")
    what.add_argument("--synthetic", action="store_true", help="realistic lengths, paper shapes")
    parser.add_argument("--rows", type=int, default=None,
                        help="rows to plan (default: 400 --data, 2000 --synthetic)")
    args = parser.parse_args(argv)
    rows = args.rows or (2000 if args.synthetic else 400)
    result = {}
    for unit in UNITS:
        result[unit] = synthetic_shares(unit, rows) if args.synthetic else \
            dataset_shares(unit, args.data, rows)
    print(f"{'unit':<10} {'source':<12} {'rows':>7} {'tokens':>7} {'documents':>10}")
    for unit, shares in result.items():
        for s, name in enumerate(SOURCES):
            print(f"{unit:<10} {name:<12} {shares['rows'][s]:>7.1%} {shares['tokens'][s]:>7.1%} "
                  f"{shares['documents'][s]:>10.1%}")
    print(json.dumps({"corpus": "synthetic" if args.synthetic else args.data, "rows": rows,
                      "weights": WEIGHTS, "sources": list(SOURCES),
                      **{unit: {k: [round(x, 4) for x in v] for k, v in shares.items()}
                         for unit, shares in result.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

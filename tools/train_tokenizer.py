"""Train the sentencepiece tokenizer (fixed special ids, see mm1_megatron/data/tokenizer.py).

    python tools/train_tokenizer.py --input corpus.txt data/caption data/text \\
        --vocab-size 32000 --output tok   # writes tok.model

--input takes text files (one or more documents; trained line by line) and/or prepared shard
folders (their samples' text fields are read through the index; bad samples skipped).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, Optional, Union


def iter_texts(inputs: list[Union[str, Path]]) -> Iterator[str]:
    from mm1_megatron.data.shard_reader import open_dataset

    for item in map(Path, inputs):
        if item.is_dir():
            ds = open_dataset(item)
            for sample in ds.iter_good(images=False):
                yield from sample.texts
        elif item.is_file():
            with open(item, encoding="utf-8", errors="replace") as f:
                yield from f
        else:
            raise ValueError(f"{item}: no such file or shard folder")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, nargs="+", help="text files and/or shard folders")
    p.add_argument("--vocab-size", required=True, type=int)
    p.add_argument("--output", required=True, help="model path prefix (PREFIX.model)")
    p.add_argument("--model-type", default="unigram", choices=["unigram", "bpe"])
    p.add_argument("--soft-vocab", action="store_true",
                   help="allow fewer pieces than --vocab-size when the text is small")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="lines sampled for training")
    args = p.parse_args(argv)
    from mm1_megatron.data.shard_schema import DatasetError
    from mm1_megatron.data.tokenizer import Tokenizer, train_tokenizer

    try:
        path = train_tokenizer(iter_texts(args.input), args.vocab_size, args.output,
                               model_type=args.model_type, exact_vocab=not args.soft_vocab,
                               input_sentence_size=args.input_sentence_size)
    except (ValueError, OSError, RuntimeError, DatasetError) as e:
        print(f"train_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: vocab_size={Tokenizer.load(path).vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

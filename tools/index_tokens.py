"""Add the packer's token index to prepared datasets (made without --tokenizer, or with another).

    python tools/index_tokens.py DIR [DIR ...] --tokenizer tok.model [--workers 8]

DIR is one prepared dataset folder (e.g. data/caption) or a data root holding interleaved/,
caption/ and text/. Per sample it stores the text token count of each segment and where the
images are (index/segments.npy, index/segment_offsets.npy), the text token counts, and the
tokenizer (path, sha256, vocabulary size) in manifest.json: the loader plans rows from these
alone and refuses a dataset indexed with another tokenizer. Shards are read in parallel
(--workers processes); a progress bar per dataset. Exit 2 with one line on a bad folder or
tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mm1_megatron.data.shard_index import add_token_index
from mm1_megatron.data.shard_schema import KINDS, DatasetError


def _datasets(paths: list[str]) -> list[Path]:
    out = []
    for text in paths:
        path = Path(text)
        if (path / "manifest.json").is_file():
            out.append(path)
            continue
        found = [path / kind for kind in KINDS if (path / kind / "manifest.json").is_file()]
        if not found:
            raise DatasetError(f"{path}: no manifest.json, and no {'/'.join(KINDS)} dataset "
                               "folder with one")
        out += found
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="DIR")
    parser.add_argument("--tokenizer", required=True, help="sentencepiece .model")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from mm1_megatron.data.tokenizer import Tokenizer

    try:
        tokenizer = Tokenizer.load(args.tokenizer)
        folders = _datasets(args.paths)
    except (ValueError, DatasetError) as e:
        print(f"index_tokens: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        start = time.perf_counter()
        try:
            manifest = add_token_index(folder, tokenizer, workers=args.workers,
                                       progress=not args.no_progress)
        except DatasetError as e:
            print(f"index_tokens: {e}", file=sys.stderr)
            return 2
        print(f"{folder}: {manifest['samples']} samples, {manifest['text_tokens']} text tokens "
              f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

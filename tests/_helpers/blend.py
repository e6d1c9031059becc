"""A blend of two datasets per kind around the demo data: the demo's own folders, a caption
set the caller prepared (e.g. img2dataset shards indexed in place), and small interleaved and
text sets in our shards, all indexed with the demo tokenizer."""

from __future__ import annotations

from pathlib import Path

from tests._helpers.data import TEXT, jpeg


def write_second_datasets(root: Path, tokenizer) -> tuple[Path, Path]:
    """root/docs (interleaved) and root/books (text)."""
    from mm1_megatron.data.shard_writer import RawSample, write_dataset

    write_dataset([RawSample([f"{t} Then a picture:", 0, t.upper()], [("jpg", jpeg(i))])
                   for i, t in enumerate(TEXT * 3)], root / "docs", "interleaved",
                  tokenizer=tokenizer)
    write_dataset([RawSample([" ".join(TEXT[i:] + TEXT[:i])]) for i in range(len(TEXT))],
                  root / "books", "text", tokenizer=tokenizer)
    return root / "docs", root / "books"


def write_blend(path: Path, demo_data: Path, caption: Path, interleaved: Path, text: Path,
                weights: tuple[float, float, float] = (0.25, 1, 3)) -> Path:
    """path (YAML): per kind the demo's folder first, then the given one; the given ones by
    path relative to the file where they lie beside it."""
    def rel(p: Path) -> str:
        return str(p.relative_to(path.parent)) if p.parent == path.parent else str(p)

    c, i, t = weights
    path.write_text(
        f"caption:\n  - {{path: {demo_data / 'caption'}, weight: {1 - c}}}\n"
        f"  - {{path: {rel(caption)}, weight: {c}}}\n"
        f"interleaved:\n  - {{path: {demo_data / 'interleaved'}, weight: 1}}\n"
        f"  - {{path: {rel(interleaved)}, weight: {i}}}\n"
        f"text:\n  - {{path: {demo_data / 'text'}}}\n  - {{path: {rel(text)}, weight: {t}}}\n")
    return path

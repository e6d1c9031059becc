"""Writing a dataset folder: `RawSample` (one sample as a tool holds it) encoded into the
schema's tar members (`shard_schema`), packed into size-targeted, deterministic
shard-NNNNNN.tar files, then indexed (`shard_index.index_dataset`) so the folder is ready to
open (`shard_reader.open_dataset`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from mm1_megatron.data.prompt_format import Turn
from mm1_megatron.data.shard_index import index_dataset, progress_bar
from mm1_megatron.data.shard_schema import KINDS


@dataclass
class RawSample:
    """Input to `write_dataset`: segments as in `Sample` plus (ext, bytes) per image."""

    segments: list[Union[str, int]]
    images: list[tuple[str, bytes]] = field(default_factory=list)
    source_id: Optional[str] = None
    turns: Optional[list[Turn]] = None  # kind sft: the conversation (ints: image numbers)


def _members(kind: str, key: str, s: RawSample) -> dict[str, bytes]:
    """Schema encoding of one sample: {suffix: bytes} (webdataset: member = KEY.suffix)."""
    if kind == "caption":
        if len(s.images) != 1 or len(s.segments) != 2 or s.segments[0] != 0:
            raise ValueError(f"{key}: a caption pair is [image 0, text]")
        ext, data = s.images[0]
        obj: dict = {"text": s.segments[1]}
        members = {ext: data}
    elif kind == "text":
        obj, members = {"text": s.segments[0]}, {}
    elif kind == "sft":
        obj, members = {"turns": []}, {}
        for turn in s.turns or []:
            segs = []
            for item in turn.content:
                if isinstance(item, str):
                    segs.append({"text": item})
                else:
                    ext, data = s.images[item]
                    name = f"img{len(members)}.{ext}"
                    segs.append({"image": name})
                    members[name] = data
            obj["turns"].append({"role": turn.role, "segments": segs})
    else:
        obj, members = {"segments": []}, {}
        for seg in s.segments:
            if isinstance(seg, str):
                obj["segments"].append({"text": seg})
            else:
                ext, data = s.images[seg]
                name = f"img{len(members)}.{ext}"
                obj["segments"].append({"image": name})
                members[name] = data
    if s.source_id is not None:
        obj["id"] = s.source_id
    members["json"] = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return members


def write_dataset(samples: Iterable[RawSample], output: Union[str, Path], kind: str, *,
                  shard_size_mb: float = 64.0, tokenizer=None, progress: bool = False,
                  total: Optional[int] = None, key_prefix: str = "") -> dict:
    """Write samples into size-targeted shards, then manifest and index. Returns the manifest.

    A shard is closed before the sample that would take it past the target (a sample larger
    than the target gets a shard of its own). Deterministic: fixed mtime/owner in the tar.
    KEY = `key_prefix` + the sample's 9-digit number here (a prefix keeps the keys of
    several writers, one per unit of a preparation, apart).
    """
    import webdataset as wds

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()  # a re-run must not leave stale shards behind
    target = int(shard_size_mb * 2**20)
    writer, written, shard_no, n = None, 0, -1, 0
    bar = progress_bar(progress, total, f"writing {kind}")
    try:
        for s in samples:
            key = f"{key_prefix}{n:09d}"
            members = _members(kind, key, s)
            size = sum(512 + (len(v) + 511) // 512 * 512 for v in members.values())
            if writer is None or (written and written + size > target):
                if writer is not None:
                    writer.close()
                shard_no += 1
                writer = wds.TarWriter(str(out / f"shard-{shard_no:06d}.tar"), encoder=False,
                                       mtime=0, user="mm1", group="mm1")
                written = 0
            writer.write({"__key__": key, **members})
            written += size
            n += 1
            bar.update(1)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    return index_dataset(out, kind, tokenizer=tokenizer, progress=progress)

"""Read tensors of a Megatron-Core `dist_checkpointing` checkpoint in one process, any layout.

dist_checkpointing stores each tensor under its global key with global shape, whatever the
TP/PP/EP/DP layout that wrote it (TP shards of fused QKV / gated fc1 are placed so that the
global tensor is the unsharded one; experts are stacked by global expert index). This reader
asks for whole tensors or single slices along leading (layer / expert) axes, many per call,
so memory stays at the size of one request group.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from mm1_megatron.convert.mappings import ConvertError

MODEL_PREFIXES = ("vision.", "connector.", "language_model.")


def ensure_process_group() -> None:
    """dist_checkpointing needs a process group: a gloo world of one with an in-memory store."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run dir / checkpoints dir with a `latest` marker."""
    from mm1_megatron.checkpoint import resolve_checkpoint as resolve

    try:
        return resolve(path)
    except FileNotFoundError as err:
        raise ConvertError(str(err)) from None


class CheckpointReader:
    def __init__(self, path: str | Path):
        self.path = resolve_checkpoint(path)
        ensure_process_group()
        from megatron.core import dist_checkpointing

        try:
            meta = dist_checkpointing.load_tensors_metadata(str(self.path))
        except Exception as err:  # noqa: BLE001 - unreadable metadata: one clear line
            raise ConvertError(f"{self.path}: cannot read the checkpoint metadata "
                               f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
        self.meta = {k: v for k, v in meta.items() if k.startswith(MODEL_PREFIXES)}
        if not self.meta:
            raise ConvertError(f"{self.path}: holds no MM1 model tensors (no key starts with "
                               f"{', '.join(MODEL_PREFIXES)}); is it a checkpoint of another "
                               "model?")
        self._check_files()

    def _check_files(self) -> None:
        """Every storage file the model tensors live in exists and is long enough."""
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(str(self.path)).read_metadata().storage_data
        need: dict[str, tuple[int, str]] = {}
        for index, info in storage.items():
            if index.fqn.startswith(MODEL_PREFIXES):
                end = info.offset + info.length
                if end > need.get(info.relative_path, (0, ""))[0]:
                    need[info.relative_path] = (end, index.fqn)
        for rel, (end, example) in sorted(need.items()):
            file = self.path / rel
            if not file.is_file():
                raise ConvertError(f"{self.path}: shard file {rel} is missing (it holds e.g. "
                                   f"{example})")
            if file.stat().st_size < end:
                raise ConvertError(f"{self.path}: shard file {rel} is truncated "
                                   f"({file.stat().st_size} bytes, needs {end})")

    def shape(self, key: str) -> Optional[tuple[int, ...]]:
        t = self.meta.get(key)
        return None if t is None else tuple(t.global_shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.meta[key].dtype

    def load(self, requests: Sequence[tuple[str, tuple[int, ...]]]) -> list[torch.Tensor]:
        """[(key, leading index)] -> tensors (the slice, leading axes dropped)."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing import ShardedTensor

        state = {}
        for n, (key, index) in enumerate(requests):
            shape = self.shape(key)
            local = (1,) * len(index) + shape[len(index):]
            offsets = [(axis, i, shape[axis]) for axis, i in enumerate(index)]
            data = torch.empty(local, dtype=self.dtype(key))
            state[f"t{n}"] = ShardedTensor.from_rank_offsets(key, data, *offsets)
        try:
            out = dist_checkpointing.load(state, str(self.path), validate_access_integrity=False)
        except Exception as err:  # noqa: BLE001
            raise ConvertError(f"{self.path}: reading {len(requests)} tensors (e.g. "
                               f"{requests[0][0]}) failed: {type(err).__name__}: "
                               f"{str(err).splitlines()[0][:300]}") from None
        return [out[f"t{n}"].reshape(self.shape(key)[len(index):])
                for n, (key, index) in enumerate(requests)]

    def common_state(self) -> dict:
        from megatron.core import dist_checkpointing

        try:
            return dist_checkpointing.load_common_state_dict(str(self.path)) or {}
        except Exception:  # noqa: BLE001
            return {}

    def nbytes(self) -> int:
        return sum(os.path.getsize(p) for p in self.path.iterdir() if p.is_file())

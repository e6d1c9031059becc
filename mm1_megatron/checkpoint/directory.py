"""Where checkpoints live in a run directory, which one is the newest, and retention.

Layout under `run_dir/checkpoints/`:
  step_00000100/   one dist_checkpointing directory (written by `checkpoint.state`)
  latest           text file naming the newest complete checkpoint
A checkpoint is written to `step_N.partial/` and renamed only after every rank has finished,
then `latest` is replaced atomically: a crash mid-save never leaves `latest` pointing at a
partial checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "latest")


def prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in steps[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.partial"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    root = checkpoint_root(run_dir)
    marker = root / "latest"
    if not marker.exists():
        return None
    path = root / marker.read_text().strip()
    if not STEP_DIR.match(path.name) or not path.is_dir():
        raise FileNotFoundError(f"{marker}: names {path.name!r}, which is not a complete "
                                "checkpoint directory")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory itself, or a run dir / checkpoints dir with a `latest` marker.
    Raises FileNotFoundError with one line saying what is missing."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    for marker in (path / "checkpoints" / "latest", path / "latest"):
        if marker.is_file():
            target = marker.parent / marker.read_text().strip()
            if not target.is_dir():
                raise FileNotFoundError(f"{marker} names {target.name!r}, which is not a "
                                        "checkpoint directory")
            return target
    if not (path / "metadata.json").is_file() or not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a Megatron-Core dist_checkpointing checkpoint "
                                "(no metadata.json/.metadata, and no `latest` marker)")
    return path

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
import warnings
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


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete step directories of a run, oldest save first (by the time they were
    written, not by step number: a run that restarted lower must not lose its new saves)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(steps, key=lambda p: (p.stat().st_mtime_ns, p.name))


def prune(root: Path, keep_last: int, keep: Optional[str] = None) -> None:
    """Keep the `keep_last` most recent saves (and `keep`, the one just written)."""
    steps = [p for p in complete_checkpoints(root.parent) if p.name != keep]
    for old in steps[:max(0, len(steps) - (keep_last - (keep is not None)))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.partial"):  # left by a crash mid-save
        shutil.rmtree(stale, ignore_errors=True)


def resume_point(run_dir: str | Path) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint to resume from, or None; a warning when `latest` could not be followed)."""
    root = checkpoint_root(run_dir)
    marker = root / "latest"
    complete = complete_checkpoints(run_dir)
    if marker.exists():
        path = root / marker.read_text().strip()
        if STEP_DIR.match(path.name) and path.is_dir():
            return path, None
        if not complete:
            raise FileNotFoundError(f"{marker}: names {path.name!r}, which is not a complete "
                                    "checkpoint directory, and no other checkpoint is there")
        return complete[-1], (f"{marker} names {path.name!r}, which is not a complete "
                              f"checkpoint; using the newest complete one, {complete[-1].name}")
    if complete:
        return complete[-1], (f"{marker} is missing; using the newest complete checkpoint, "
                              f"{complete[-1].name}")
    return None, None


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    path, warning = resume_point(run_dir)
    if warning:
        warnings.warn(warning, stacklevel=2)
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

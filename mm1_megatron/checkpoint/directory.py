"""Where checkpoints live in a run directory, which one is the newest, and retention.

Layout under `run_dir/checkpoints/`:
  step_00000100/   one dist_checkpointing directory (written by `checkpoint.state`)
  latest           text file naming the newest complete checkpoint
A checkpoint is written to `step_N.partial/` and renamed only after every rank has finished,
then `latest` is replaced atomically: a crash mid-save never leaves `latest` pointing at a
partial checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Optional

from mm1_megatron.runtime.mcore_version import MCORE, format_newer_than_installed

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


MANIFEST = "files.json"  # written last into each checkpoint: every file's size and end sums
_SUM_BYTES = 64 * 1024


def _end_sums(path: Path, size: int) -> list[int]:
    """crc32 of the first and last 64 KiB: cheap at any checkpoint size, and a truncated or
    overwritten file end changes them."""
    with path.open("rb") as f:
        head = f.read(_SUM_BYTES)
        f.seek(max(0, size - _SUM_BYTES))
        tail = f.read(_SUM_BYTES)
    return [zlib.crc32(head), zlib.crc32(tail)]


def write_manifest(checkpoint: Path) -> None:
    files = {str(p.relative_to(checkpoint)): p for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    entries = {name: {"bytes": p.stat().st_size, "sums": _end_sums(p, p.stat().st_size)}
               for name, p in files.items()}
    tmp = checkpoint / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(entries, indent=0))
    os.replace(tmp, checkpoint / MANIFEST)


WRITTEN_BY = "written_by.json"  # the Megatron-Core (and torch) that wrote the checkpoint


def write_written_by(checkpoint: Path, versions: dict[str, str]) -> None:
    (checkpoint / WRITTEN_BY).write_text(json.dumps(
        {"megatron_core": str(MCORE), **versions}, indent=0))


def check_readable(checkpoint: Path) -> None:
    """Refuse, in one line naming both versions, a checkpoint written by a later
    Megatron-Core release than the installed one (checkpoints from before this record are
    taken as readable: they were all written by 0.16)."""
    record = Path(checkpoint) / WRITTEN_BY
    if not record.is_file():
        return
    saved = json.loads(record.read_text()).get("megatron_core", "")
    if saved and format_newer_than_installed(saved):
        raise CheckpointFormatError(
            f"{checkpoint}: written by Megatron-Core {saved}, whose checkpoint format the "
            f"installed Megatron-Core {MCORE} may not read; install megatron-core>={saved}")


class CheckpointFormatError(ValueError):
    """A checkpoint this Megatron-Core cannot read (see `check_readable`)."""


def damage(checkpoint: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files against its manifest (missing, truncated or
    changed file), or None. A checkpoint written before manifests existed is not checked."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest}: unreadable"
    for name, entry in entries.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{path}: {size} bytes, {entry['bytes']} when it was saved"
        if _end_sums(path, size) != entry["sums"]:
            return f"{path}: its contents changed since it was saved"
    return None


def resume_point(run_dir: str | Path) -> tuple[Optional[Path], Optional[str]]:
    """(checkpoint to resume from, or None; a warning when `latest` could not be followed or
    was damaged and an earlier complete checkpoint is used instead)."""
    root = checkpoint_root(run_dir)
    marker = root / "latest"
    complete = complete_checkpoints(run_dir)
    notes: list[str] = []
    chosen: Optional[Path] = None
    if marker.exists():
        path = root / marker.read_text().strip()
        if STEP_DIR.match(path.name) and path.is_dir():
            chosen = path
        else:
            notes.append(f"{marker} names {path.name!r}, which is not a complete checkpoint")
    elif complete:
        notes.append(f"{marker} is missing")
    candidates = ([chosen] if chosen else []) + [p for p in reversed(complete) if p != chosen]
    for candidate in candidates:
        problem = damage(candidate)
        if problem is None:
            if candidate != chosen or notes:
                notes.append(f"using the newest complete checkpoint, {candidate.name}")
            return candidate, "; ".join(notes) or None
        notes.append(f"{candidate.name} is damaged ({problem})")
    if notes:
        raise FileNotFoundError(f"no usable checkpoint in {root}: " + "; ".join(notes))
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

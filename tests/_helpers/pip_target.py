"""What the PYTHONPATH overlays (transformers_overlay.py, lmms_overlay.py) share: pip with its
output kept out of the test log, pins resolved against this environment, and a build that
runs once per folder across threads and processes."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable


def pip(*args: str) -> None:
    """pip, its output kept out of the test log unless it fails."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q",
                           *args], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def missing_pins(*requirements: str) -> list[str]:
    """NAME==VERSION of what pip would install for `requirements` into this environment
    (`--dry-run --report`): what the environment lacks or holds out of range, deps included."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        pip("install", "--dry-run", "--ignore-requires-python", "--report", str(report),
            *requirements)
        return [f"{item['metadata']['name']}=={item['metadata']['version']}"
                for item in json.loads(report.read_text())["install"]]


def install_into(folder: Path, *requirements: str) -> None:
    """`requirements` as they are (no dependencies) into `folder`, not byte-compiled:
    compiling transformers' few thousand modules costs more CPU than the one process that
    imports each release."""
    pip("install", "--no-deps", "--no-compile", "--target", str(folder), *requirements)


def built_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """`build(folder)` unless a finished build is there; a second caller (the suite starts
    the builds in the background: tests/conftest.py) waits for the first, and a build that
    failed half-way is redone."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".complete").touch()
    return folder

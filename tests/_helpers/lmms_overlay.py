"""lmms-eval 0.7.3 in a folder, to put on PYTHONPATH beside this environment (as
transformers_overlay.py does for transformers releases): lmms-eval without its declared
dependencies, plus what its CLI, its task loading and its result writing import.

Why not `pip install lmms-eval`: it requires torchvision, and PyPI's torchvision is a CUDA
build whose operators fail to register beside the CPU torch ("operator torchvision::nms does
not exist"), which then breaks transformers' image processors in the whole environment. Its
other declared dependencies (wandb, yt-dlp, opencv, av, timm, peft, openai, ...) are for
models and tasks this plugin does not use. docs/evaluation.md gives the same recipe for users.

filelock < 4: lmms-eval 0.7.3 patches `filelock._api`, which filelock 4 removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

LMMS_EVAL = "lmms-eval==0.7.3"
RUNTIME = ("filelock<4", "datasets", "evaluate", "sacrebleu", "tabulate", "lxml", "pandas",
           "pytz", "tenacity", "pytablewriter")
ROOT = Path(os.environ.get("MM1_LMMS_EVAL_OVERLAY", "/tmp/mm1-lmms-eval"))


@contextlib.contextmanager
def _locked(folder: Path):
    """One builder per folder across threads and processes (the suite starts the builds in
    the background: tests/conftest.py); a second caller waits for the first to finish."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _pip(*args: str) -> None:
    """pip, its output kept out of the test log unless it fails."""
    done = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q",
                           *args], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"pip {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def overlay(folder: Path = ROOT) -> Path:
    with _locked(folder):
        if not (folder / ".complete").exists():
            _build(folder)
    return folder


def _build(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    report = folder / "report.json"
    # what this environment lacks for RUNTIME, resolved against it (pins, deps included)
    _pip("install", "--dry-run", "--report", str(report), *RUNTIME)
    pins = [f"{item['metadata']['name']}=={item['metadata']['version']}"
            for item in json.loads(report.read_text())["install"]]
    _pip("install", "--no-deps", "--target", str(folder), LMMS_EVAL, *pins)
    (folder / "pins.txt").write_text("\n".join([LMMS_EVAL, *pins]) + "\n")
    (folder / ".complete").touch()


if __name__ == "__main__":
    print(overlay())

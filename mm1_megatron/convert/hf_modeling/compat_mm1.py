"""What MM1's remote code needs from `transformers` that moved between the releases it runs on,
4.57 to the newest 5.x (shipped beside the other *_mm1.py files). Each difference is found by
feature, not by version string, so a release in between, or a later one that keeps the newer
API, takes the right branch without a table of versions. Tested in CI under 4.57.6, 5.0.0,
5.19.0 and the installed release (tests/convert/test_hf_usage.py).
"""

from __future__ import annotations

import inspect

from transformers import LlamaConfig
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.processing_utils import ProcessorMixin

# The decoder's KV cache: the argument `generate` passes and the output field it reads back,
# `past_key_values` up to 5.23, `cache` from 5.24.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"

# RoPE's base: 5.x reads `rope_parameters` ({"rope_type", "rope_theta"}), 4.x `rope_theta`
# (and `rope_scaling`) and ignores `rope_parameters`: a 4.x load would run at the default base.
LLAMA_TAKES_ROPE_PARAMETERS = "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters

# A processor's parts: 5.x infers them from __init__'s arguments (and warns about the class
# attributes 4.x reads them from).
PROCESSOR_INFERS_PARTS = hasattr(ProcessorMixin, "get_attributes")


def llama_kwargs(text_config: dict) -> dict:
    """The text config as this release's LlamaConfig reads it (export writes 5.x's fields)."""
    rope = text_config.get("rope_parameters")
    if LLAMA_TAKES_ROPE_PARAMETERS or not isinstance(rope, dict):
        return text_config
    legacy = {k: v for k, v in text_config.items() if k != "rope_parameters"}
    legacy.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        legacy.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    return legacy

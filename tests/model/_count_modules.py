"""Run as a script: build every preset's modules and print measured parameter and FLOP counts.

Full presets are built on the meta device (no memory); `tiny` is also run for real under
torch's FlopCounterMode to measure forward FLOPs. Prints one JSON object.
"""

import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mm1_megatron.config import PRESETS, get_preset, set_field
from mm1_megatron.model.builder import connector_parts, language_parts, vision_parts
from mm1_megatron.runtime import init_distributed, shutdown_distributed


def numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measured_flops(fn) -> int:
    # The math SDPA backend decomposes attention into counted matmuls; the fused CPU kernel
    # is invisible to FlopCounterMode.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    cfg = get_preset("tiny")
    init_distributed(cfg.parallel, seed=0)
    out: dict = {"params": {}, "flops": {}}
    for name in PRESETS:
        cfg = get_preset(name)
        # The whole model in this one process: no model parallelism, no FP8 (no TE here).
        for key, value in (("parallel.tp", 1), ("parallel.pp", 1), ("parallel.ep", 1),
                           ("parallel.first_stage_layers", None), ("train.fp8", None)):
            set_field(cfg, key, value)
        entry = {}
        with torch.device("meta"):
            entry["llm"] = numel(language_parts(cfg, use_te=False).build())
            entry["vision"] = numel(vision_parts(cfg, use_te=False).build())
            for kind in ("c_abstractor", "avg_pool", "attn_pool"):
                set_field(cfg, "connector.type", kind)
                entry[f"connector.{kind}"] = numel(connector_parts(cfg).build())
        out["params"][name] = entry
    # Heads wider than hidden / heads (kv_channels), GQA: the decoder alone.
    cfg = get_preset("tiny")
    set_field(cfg, "llm.kv_channels", 32)
    set_field(cfg, "llm.num_query_groups", 2)
    with torch.device("meta"):
        out["params"]["tiny_kv_channels"] = {
            "llm": numel(language_parts(cfg, use_te=False).build())}

    # Forward FLOPs of real tiny modules (batch of 2), per component and connector type.
    cfg = get_preset("tiny")
    set_field(cfg, "train.precision", "fp32")
    seq, batch = cfg.data.seq_length, 2
    decoder = language_parts(cfg, use_te=False).build()
    tokens = torch.randint(0, cfg.llm.vocab_size, (batch, seq))
    positions = torch.arange(seq).expand(batch, -1)
    causal = torch.ones(1, 1, seq, seq, dtype=torch.bool).triu(1)
    out["flops"]["llm"] = measured_flops(lambda: decoder(tokens, positions, causal)) // batch
    vision = vision_parts(cfg, use_te=False).build()
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    out["flops"]["vision"] = measured_flops(lambda: vision(images)) // batch
    patches = torch.randn(batch, cfg.vision.num_patches, cfg.vision.hidden_size)
    for kind in ("c_abstractor", "avg_pool", "attn_pool"):
        set_field(cfg, "connector.type", kind)
        connector = connector_parts(cfg).build()
        out["flops"][f"connector.{kind}"] = measured_flops(lambda: connector(patches)) // batch
    shutdown_distributed()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

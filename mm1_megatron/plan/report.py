"""The run plan: layout, parameter counts, learning rate, FLOPs and the modelled H100 memory
and step time (`plan.h100`) of a resolved config.

`tools/plan.py` prints it (JSON or a table); `mm1-train --dry-run` prints it before exiting.
Without a world size (config, launcher) an MM1 preset is planned at `parallel.planned_nodes`.
"""

from __future__ import annotations

from typing import Any, Optional

from mm1_megatron.config import Config, data_parallel_size, resolve_world_size
from mm1_megatron.model.flops import training_flops_per_sequence
from mm1_megatron.model.params import count_params
from mm1_megatron.model.recipe import lr_rule_params, peak_lr_and_weight_decay
from mm1_megatron.plan.h100 import estimate


def layout(cfg: Config, environ: Optional[dict[str, str]] = None) -> dict[str, int]:
    p, t = cfg.parallel, cfg.train
    dp = data_parallel_size(cfg, environ)
    return dict(world_size=resolve_world_size(cfg, environ), tp=p.tp, pp=p.pp, cp=p.cp, ep=p.ep,
                expert_tp=p.expert_tp or p.tp, dp=dp, micro_batch_size=t.micro_batch_size,
                grad_accum_steps=t.global_batch_size // (t.micro_batch_size * dp),
                global_batch_size=t.global_batch_size)


def make_plan(cfg: Config, environ: Optional[dict[str, str]] = None) -> dict[str, Any]:
    world = resolve_world_size(cfg, environ)
    environ = {"WORLD_SIZE": str(world)}
    params = count_params(cfg)
    lr_params = lr_rule_params(cfg)
    lr, weight_decay = peak_lr_and_weight_decay(cfg.train.lr, lr_params,
                                                cfg.train.weight_decay_ratio)
    flops = training_flops_per_sequence(cfg)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    return {
        "preset": cfg.preset,
        "layout": layout(cfg, environ),
        "params": params.to_dict(),
        "lr": lr,
        "lr_source": "train.lr" if cfg.train.lr is not None else
        f"paper rule, N = {lr_params:,} ({cfg.train.lr_params} non-embedding LLM parameters)",
        "weight_decay": weight_decay,
        "flops_per_sequence": flops.to_dict(),
        "flops_per_step": flops.total * cfg.train.global_batch_size,
        "tokens_per_step": tokens_per_step,
        "train_tokens": tokens_per_step * cfg.train.train_steps,
        "h100": estimate(cfg, world, cfg.parallel.gpus_per_node or 8),
    }


def _human(n: float) -> str:
    for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{unit}"
    return f"{n:g}"


def h100_rows(est: dict[str, Any]) -> list[tuple[str, str]]:
    mem, t, lay = est["memory"], est["time"], est["layout"]
    stages = " ".join(f"{m['total_gib']:.1f}" for m in mem["stages"])
    verdict = "fits" if mem["fits"] else "DOES NOT FIT"
    per_mb = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in t["per_microbatch_s"].items())
    return [
        ("H100 model", f"{est['gpus']} GPUs = {est['nodes']:g} nodes (modelled, not measured)"),
        ("  recompute", f"llm {lay['recompute']}, vision {lay['vision_recompute']}; "
                        f"fp8 {lay['fp8'] or 'off'}; first stage layers "
                        f"{lay['first_stage_layers'] or 'even'}"),
        ("  memory/stage GiB", f"{stages}  worst stage {mem['worst_stage']} "
                               f"{mem['worst_gib']:.1f} of {mem['usable_gib']:.1f} usable: "
                               f"{verdict}"),
        ("  step time", f"{t['step_s']:.3f} s (bubble {t['bubble_fraction']:.1%}, slowest "
                        f"stage {t['slowest_stage']}: {per_mb} ms/micro-batch; DP exposed "
                        f"{t['dp_exposed_s'] * 1e3:.1f} ms)"),
        ("  throughput", f"{_human(t['tokens_per_s'])} tokens/s, "
                         f"{t['model_tflops_per_gpu']:.0f} TFLOP/s/GPU"),
        ("  MFU", f"{t['mfu']:.1%} of {t['peak_tflops']:.0f} TFLOP/s"
                  + (f" ({t['mfu_bf16_peak']:.1%} of bf16 peak)" if lay["fp8"] else "")),
    ]


def format_plan(plan: dict[str, Any]) -> str:
    lay, par, flops = plan["layout"], plan["params"], plan["flops_per_sequence"]
    rows = [
        ("preset", plan["preset"]),
        ("layout", " ".join(f"{k}={lay[k]}" for k in ("world_size", "tp", "pp", "cp", "ep", "dp"))),
        ("batch", f"global {lay['global_batch_size']} = micro {lay['micro_batch_size']} x dp "
                  f"{lay['dp']} x accum {lay['grad_accum_steps']}"),
        ("params total", _human(par["total"])),
        ("params active/token", _human(par["active"])),
        ("  vision", _human(par["vision"])),
        ("  connector", _human(par["connector"])),
        ("  llm", _human(par["llm"])),
        ("  llm non-embedding", _human(par["non_embedding"])),
        ("peak lr", f"{plan['lr']:.3e} ({plan['lr_source']})"),
        ("weight decay", f"{plan['weight_decay']:.3e}"),
        ("FLOPs/sequence", f"{_human(flops['total'])} (llm {_human(flops['llm'])}, vision "
                           f"{_human(flops['vision'])}, connector {_human(flops['connector'])})"),
        ("FLOPs/step", _human(plan["flops_per_step"])),
        ("tokens/step", _human(plan["tokens_per_step"])),
    ]
    rows += h100_rows(plan["h100"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

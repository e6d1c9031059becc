"""Search over layouts: every TP / PP (even, uneven, interleaved) / EP / micro-batch /
recompute choice of a config on a GPU count, validated, modelled, fastest fitting first."""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional

from mm1_megatron.config import Config, ConfigError, validate
from mm1_megatron.plan.h100 import estimate
from mm1_megatron.plan.h100_constants import USABLE_GIB



def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pipeline_splits(layers: int, world: int
                     ) -> Iterator[tuple[int, Optional[int], Optional[int]]]:
    """(pp, first_stage_layers, virtual_stages): even splits (interleaved with 2 chunks too,
    where pp > 2), and uneven ones with a lighter stage 0 (the stage that also runs the ViT)."""
    for pp in _divisors(world):
        if pp > layers:
            break
        if layers % pp == 0:
            yield pp, None, None
            if pp > 2 and layers % (2 * pp) == 0:
                yield pp, None, 2
        if pp > 1:
            for first in range(1, -(-layers // pp)):
                if (layers - first) % (pp - 1) == 0:
                    yield pp, first, None


def candidate_layouts(cfg: Config, world: int, gpus_per_node: int) -> Iterator[dict[str, Any]]:
    """Dotted field -> value: tp in a node, pp (+ uneven stage 0), ep, expert_tp, micro-batch,
    decoder and ViT recompute."""
    moe = cfg.llm.moe.num_experts > 0
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node):
        for pp, first, vs in _pipeline_splits(cfg.llm.num_layers, world // tp):
            for ep in (_divisors(cfg.llm.moe.num_experts) if moe else [1]):
                for etp in ([None, 1] if moe and tp > 1 else [None]):
                    for mb in (1, 2):
                        for rec in ("none", "selective", "full"):
                            for vrec in ("none", "full"):
                                yield {"parallel.tp": tp, "parallel.pp": pp,
                                       "parallel.first_stage_layers": first,
                                       "parallel.virtual_stages": vs, "parallel.ep": ep,
                                       "parallel.expert_tp": etp, "train.micro_batch_size": mb,
                                       "llm.recompute": rec, "llm.recompute_layers": 1,
                                       "vision.recompute": vrec, "vision.recompute_layers": 1}


def as_overrides(fields: dict[str, Any]) -> list[str]:
    """`key.sub=value` strings that reproduce a candidate with mm1-train / tools/plan.py."""
    return [f"{k}={'null' if v is None else v}" for k, v in fields.items()]


def planning_validate(cfg: Config, world: int) -> None:
    """The project's validation for a target H100 cluster of `world` GPUs (FP8 available)."""
    cfg.parallel.world_size = world
    validate(cfg, environ={}, fp8_ok=True)


def search(cfg: Config, world: int, gpus_per_node: int = 8, top: int = 5,
           max_gib: float = USABLE_GIB) -> dict[str, Any]:
    """Enumerate layouts of `cfg` on `world` GPUs, keep the valid ones whose worst stage fits
    (below `max_gib`, default the usable memory), fastest first."""
    evaluated = valid = 0
    fitting: list[tuple[float, dict[str, Any], dict[str, Any]]] = []
    for fields in candidate_layouts(cfg, world, gpus_per_node):
        evaluated += 1
        trial = copy.deepcopy(cfg)
        for dotted, value in fields.items():  # typed values: no parsing needed
            section, name = dotted.split(".")
            setattr(getattr(trial, section), name, value)
        try:
            planning_validate(trial, world)
        except ConfigError:
            continue
        valid += 1
        est = estimate(trial, world, gpus_per_node)
        if est["memory"]["fits"] and est["memory"]["worst_gib"] <= max_gib:
            fitting.append((est["time"]["step_s"], fields, est))
    fitting.sort(key=lambda x: (x[0], x[2]["memory"]["worst_gib"]))
    return {"gpus": world, "evaluated": evaluated, "valid": valid, "fit": len(fitting),
            "best": [dict(overrides=as_overrides(f), **e) for _, f, e in fitting[:top]]}

"""Learning-rate rule of MM1 (arXiv 2403.09611, Sec. 3.4)."""

from __future__ import annotations

import dataclasses
import math

from mm1_megatron.config import Config, MoEConfig
from mm1_megatron.model.params import count_params, embedding_params, llm_params


def paper_peak_lr(non_embedding_params: int) -> float:
    """Peak LR fitted over the LLM's non-embedding parameter count N."""
    return math.exp(-0.4214 * math.log(non_embedding_params) - 0.5535)


def lr_rule_params(cfg: Config) -> int:
    """The N the rule sees (`train.lr_params`). `dense`: the non-embedding parameters of the
    dense backbone an MoE decoder is built from (the paper trains its MoE models with the
    dense model's hyper-parameters); `active`: those one token goes through (top-k experts).
    A dense decoder has one answer."""
    if cfg.train.lr_params == "dense" and cfg.llm.moe.num_experts > 0:
        dense = dataclasses.replace(cfg.llm, moe=MoEConfig())
        return llm_params(dense) - embedding_params(dense)
    return count_params(cfg).non_embedding_active


def peak_lr_and_weight_decay(lr: float | None, non_embedding_params: int,
                             weight_decay_ratio: float) -> tuple[float, float]:
    """The configured LR (or the paper's rule) and decoupled weight decay = ratio * LR."""
    peak = lr if lr is not None else paper_peak_lr(non_embedding_params)
    return peak, weight_decay_ratio * peak

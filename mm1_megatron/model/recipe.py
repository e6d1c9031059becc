"""Learning-rate rule of MM1 (arXiv 2403.09611, Sec. 3.4)."""

from __future__ import annotations

import math


def paper_peak_lr(non_embedding_params: int) -> float:
    """Peak LR fitted over the LLM's non-embedding parameter count N."""
    return math.exp(-0.4214 * math.log(non_embedding_params) - 0.5535)


def peak_lr_and_weight_decay(lr: float | None, non_embedding_params: int,
                             weight_decay_ratio: float) -> tuple[float, float]:
    """The configured LR (or the paper's rule) and decoupled weight decay = ratio * LR."""
    peak = lr if lr is not None else paper_peak_lr(non_embedding_params)
    return peak, weight_decay_ratio * peak

"""The evaluation tests' model overrides and fixed prompts, shared with their worker processes."""

import torch

from mm1_megatron.evaluation.prompts import build_prompt
from mm1_megatron.evaluation.tasks import CAPTION, VQA, Example

# The tiny MoE model of the parity tests, with the demo tokenizer's vocabulary.
EVAL_OVERRIDES = ["llm.vocab_size=2048"]


def fixed_prompts(cfg, tokenizer):
    """Three prompts of different lengths (0-, 1- and 2-shot) and their random images."""
    k, image_id = cfg.connector.num_tokens, cfg.llm.image_token_id
    cat = Example("cat", ("cat.jpg",), captions=("A ginger cat.",))
    moon = Example("moon", ("moon.jpg",), captions=("The moon at night.",))
    q = Example("q", ("q.jpg",), question="What is it?", answers=("cat",) * 10)
    prompts = [build_prompt(tokenizer, CAPTION, cat, [], k, image_id),
               build_prompt(tokenizer, CAPTION, moon, [cat], k, image_id),
               build_prompt(tokenizer, VQA, q, [q, q], k, image_id)]
    n_images = sum(len(p.images) for p in prompts)
    g = torch.Generator().manual_seed(7)
    size = cfg.vision.image_size
    return [p.tokens for p in prompts], torch.randn(n_images, 3, size, size, generator=g)

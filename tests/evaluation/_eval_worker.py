"""`torchrun ... _eval_worker.py OUT.json RUN_DIR TOKENIZER key=value...`

Builds the tiny MoE model at the given layout (e.g. parallel.tp=2), trains one step on
synthetic rows (so weights are off their initial values), saves a checkpoint at step 1, then
greedily generates from fixed few-shot prompts with the KV cache and writes the tokens and
per-step logits (rank 0) for the one-process evaluation to reproduce.
"""

import json
import sys

import torch
import torch.distributed as dist

from mm1_megatron.config import load_config
from mm1_megatron.data.tokenizer import Tokenizer
from mm1_megatron.evaluation.generate import Generator
from mm1_megatron.runtime import init_distributed, shutdown_distributed
from mm1_megatron.checkpoint import save_checkpoint
from mm1_megatron.train.step import build_model, build_optimizer, train_step
from tests._helpers.evaluation import EVAL_OVERRIDES, fixed_prompts
from tests._helpers.parity import BASE, microbatches, synthetic_rows


def main() -> None:
    out_path, run_dir, tokenizer_path, *overrides = sys.argv[1:]
    cfg = load_config("tiny", BASE + EVAL_OVERRIDES + list(overrides))
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    model = build_model(cfg, use_te=False)
    optimizer, scheduler = build_optimizer(cfg, model)
    rows = synthetic_rows(cfg, 0, cfg.train.global_batch_size)
    train_step(cfg, model, optimizer, scheduler, microbatches(cfg, rows))
    save_checkpoint(run_dir, 1, model, optimizer, scheduler, extra={}, keep_last=1)
    prompts, images = fixed_prompts(cfg, Tokenizer.load(tokenizer_path))
    gen = Generator(model[0].module, Tokenizer.load(tokenizer_path), max_new_tokens=6,
                    use_cache=True, stop_at_newline=False)
    result = gen.generate(prompts, images, keep_logits=True)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"tokens": result.tokens,
                       "logits": [x.tolist() for x in result.step_logits]}, f)
    dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

"""The tiny MoE model's parity runs, shared by the parity, checkpoint, evaluation and device
tests and their workers: the overrides every case adds to the tiny preset (`BASE`), a fixed
synthetic global batch of packed rows (`synthetic_rows`), this DP rank's micro-batches of it
(`microbatches`), and the report written by the one rank that holds the reduced loss
(`write_report`).
"""

import json

import torch
from megatron.core import parallel_state as ps

BASE = ["llm.moe.num_experts=4", "llm.moe.layer_freq=2", "train.global_batch_size=4",
        "train.micro_batch_size=1", "train.lr=3e-3", "train.warmup_steps=0",
        "data.seq_length=64"]


def synthetic_rows(cfg, step: int, rows: int) -> list[dict]:
    """Packed rows: 1-3 documents each, 0-2 images per row, padding at the end."""
    g = torch.Generator().manual_seed(1000 + step)
    s, k, img = cfg.data.seq_length, cfg.connector.num_tokens, cfg.vision.image_size
    image_id, vocab = cfg.llm.image_token_id, cfg.llm.vocab_size
    out = []
    for r in range(rows):
        tokens = torch.randint(10, vocab, (s,), generator=g)
        docs = torch.zeros(s, dtype=torch.long)
        loss_mask = torch.ones(s)
        # step 1: text only; step 2: with DP=2 one rank gets only text, the other images.
        n_images = [r % 3, 0, 2 * (r % 2)][step % 3]
        cursor = 2
        for _ in range(n_images):
            tokens[cursor:cursor + k] = image_id
            cursor += k + 3
        boundary = s // 2 + r
        docs[boundary:] = 1
        pad_from = s - 4 * (r % 2)
        docs[pad_from:] = 2
        labels = torch.roll(tokens, -1)
        loss_mask[tokens == image_id] = 0  # no loss on image positions ...
        loss_mask[labels == image_id] = 0  # ... nor on predicting a placeholder
        loss_mask[boundary - 1] = 0  # no prediction across documents
        loss_mask[pad_from - 1:] = 0  # padding
        out.append(dict(tokens=tokens, labels=labels, loss_mask=loss_mask, docs=docs,
                        images=torch.randn(n_images, 3, img, img, generator=g)))
    return out


def microbatches(cfg, rows: list[dict]) -> list[dict]:
    """This DP rank's share of the global batch, grouped into micro-batches."""
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = cfg.train.micro_batch_size
    mine = rows[rank::dp]
    batches = []
    for i in range(0, len(mine), mbs):
        group = mine[i:i + mbs]
        tokens = torch.stack([r["tokens"] for r in group])
        batches.append(dict(
            tokens=tokens, labels=torch.stack([r["labels"] for r in group]),
            loss_mask=torch.stack([r["loss_mask"] for r in group]),
            position_ids=torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1),
            document_ids=torch.stack([r["docs"] for r in group]),
            images=torch.cat([r["images"] for r in group])))
    return batches


def write_report(path: str, report) -> None:
    """One rank holds the reduced loss: the last pipeline stage's first DP/TP rank."""
    if ps.is_pipeline_last_stage() and ps.get_data_parallel_rank() == 0 \
            and ps.get_tensor_model_parallel_rank() == 0:
        with open(path, "w") as f:
            json.dump(report, f)

"""Held-out answer loss of a chat model (`mm1-eval --answer-loss FILE.jsonl`): conversations in
LLaVA's format (as `mm1-prepare-data --kind sft` reads them; image paths relative to the
file), tokenized exactly as SFT training tokenizes them, and the mean cross-entropy over the
tokens that training puts loss on (the assistant's answers and their `</s>`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch

from mm1_megatron.data.loader import tokenized_document
from mm1_megatron.data.packing import expand_images
from mm1_megatron.data.prompt_format import Turn, chat_segments, llava_turns
from mm1_megatron.data.tokenizer import PAD_ID, Tokenizer


def load_conversations(path: Union[str, Path]) -> list[tuple[str, list[Turn], list[str]]]:
    """(id, turns, image paths) per line; a bad line raises ValueError naming it."""
    path = Path(path)
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
            refs = record.get("image")
            refs = [] if refs is None else refs if isinstance(refs, list) else [refs]
            turns = llava_turns(record.get("conversations"), len(refs))
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{where}: not a LLaVA conversation record ({err})") from None
        except ValueError as err:
            raise ValueError(f"{where}: {': '.join(map(str, err.args))}") from None
        images = [str(r if Path(r).is_absolute() else path.parent / r) for r in refs]
        out.append((str(record.get("id", number)), turns, images))
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


@torch.no_grad()
def answer_loss(model, tokenizer: Tokenizer, conversations, images) -> dict:
    """Mean cross-entropy (nats per answer token) over `conversations`, one forward each;
    `images` is an `evaluator.ImageCache`."""
    from mm1_megatron.runtime import to_device

    k = model.tokens_per_image * images.per_image  # placeholders per image, sub-images included
    device = next(model.parameters()).device
    total, count, per = 0.0, 0, {}
    # Whole rows on every TP rank (a row's length need not divide by TP).
    with model.without_sequence_parallel():
        for cid, turns, paths in conversations:
            tokens, trains = tokenized_document(tokenizer, chat_segments(turns))
            ids, flags = expand_images(tokens, k, model.image_token_id,
                                       trains or [False] * len(tokens))
            s = len(ids)
            labels = ids[1:] + [PAD_ID]  # position i predicts token i + 1
            mask = torch.tensor(flags[1:] + [False])
            batch = to_device({"ids": torch.tensor([ids]), "pos": torch.arange(s)[None],
                               "labels": torch.tensor([labels]),
                               "docs": torch.zeros(1, s, dtype=torch.long),
                               "pixels": images.get(paths) if paths else None}, device)
            losses = model(batch["ids"], batch["pos"], images=batch["pixels"],
                           labels=batch["labels"], document_ids=batch["docs"]).float().cpu()[0]
            mine = losses[mask]
            per[cid] = float(mine.mean())
            total += float(mine.sum())
            count += int(mask.sum())
    return {"answer_loss": total / count, "answer_tokens": count,
            "conversations": len(conversations), "per_conversation": per}

"""Batched greedy decoding for MM1Model, with Megatron-Core's static KV cache or without one.

Prompts of one batch are left-padded to a common length; a key-padding mask keeps padding out
of attention, and RoPE scores depend only on relative offsets, so a padded row scores exactly
as the row alone would. Images are encoded once per batch and spliced over their placeholders
(in row order, as in training).

Under Transformer Engine (whose causal mask type ignores a padding mask) rows are batched
only with rows of the same prompt length, so nothing is padded.

KV cache: Megatron-Core's `StaticInferenceContext` (`inference_context=` of GPTModel.forward).
Prefill runs the whole prompt once and stores every layer's keys and values; each decode step
feeds one token per row and attends over the cache. Works with the local layer spec on CPU
(DotProductAttention applies the explicit [b, 1, sq, sk] mask we pass: causal + key padding at
prefill, key padding at decode). The cache-free path (`use_cache=False`) re-runs the full
sequence every step; tests check both give the same tokens and logits.

Model parallel: the TP and EP ranks of a row run every forward pass together (the logits are
gathered over TP; the first rank's picked tokens are broadcast, so all stop at the same step).
Sequence parallelism is switched off while generating (`MM1Model.without_sequence_parallel`),
as Megatron-Core's own generation does. Pipeline stages are not supported.

Stop rule per row: `</s>`, `<eoc>`, any token whose text holds a newline (the prompts'
example separator), or `max_new_tokens`. `<pad>`, `<s>` and `<image>` are never generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from mm1_megatron.data.tokenizer import BOS_ID, EOC_ID, EOS_ID, PAD_ID, Tokenizer
from mm1_megatron.model.mm1 import splice_image_tokens


@dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per row, stop token excluded
    stop_reasons: list[str]  # "eos" | "eoc" | "newline" | "length"
    step_logits: list[torch.Tensor] = field(default_factory=list)  # [b, V] per step (if kept)


def newline_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Every id whose text contains a newline (byte-fallback <0x0A> included)."""
    return frozenset(i for i in range(tokenizer.vocab_size)
                     if "\n" in tokenizer.decode([i]) or
                     tokenizer._sp.id_to_piece(i) == "<0x0A>")


def parallel_groups_up() -> bool:
    """torch.distributed and Megatron-Core's groups are initialised (not so for a model
    built without them, e.g. in a test)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    return dist.is_initialized() and parallel_state.model_parallel_is_initialized()


def lockstep_group():
    """(group, its first global rank) of the ranks that run one row's forward passes together
    (the TP ranks and, for experts, the EP ranks: Megatron-Core's expert-tensor-and-model
    group, which is the TP group of a dense model), or None in a world of one."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not parallel_groups_up():
        return None
    group = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
    if group is None or group.size() == 1:
        return None
    return group, dist.get_global_rank(group, 0)


class Generator:
    def __init__(self, model, tokenizer: Tokenizer, max_new_tokens: int = 20,
                 use_cache: bool = True, stop_at_newline: bool = True):
        self.model = model  # an MM1Model (PP=1; TP / EP ranks run in lock-step)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.use_cache = use_cache
        self.image_token_id = model.image_token_id
        self.stop_ids = {EOS_ID: "eos", EOC_ID: "eoc"}
        self.newline_ids = newline_token_ids(tokenizer) if stop_at_newline else frozenset()
        self.banned = [PAD_ID, BOS_ID, self.image_token_id]
        self.lockstep = lockstep_group()

    # -- embeddings ----------------------------------------------------------------------
    def _embed(self, tokens: torch.Tensor, image_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """[b, s] ids -> [s, b, h] decoder input with image tokens over the placeholders."""
        lm = self.model.language_model
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        embeddings = lm.embedding(input_ids=tokens, position_ids=positions)
        slots = tokens == self.image_token_id
        n_image_tokens = 0 if image_tokens is None else image_tokens.shape[0] * \
            image_tokens.shape[1]
        # A device-side check: reading the count on the host would stall a GPU every step.
        torch._assert_async(slots.sum() == n_image_tokens,
                            f"the image placeholders are not {n_image_tokens} image tokens")
        if n_image_tokens:
            embeddings = splice_image_tokens(embeddings, slots, image_tokens)
        return embeddings

    def _logits(self, tokens: torch.Tensor, decoder_input: torch.Tensor, mask: torch.Tensor,
                context=None) -> torch.Tensor:
        """Last position's logits [b, V] (gathered over TP)."""
        lm = self.model.language_model
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        out = lm(input_ids=tokens, position_ids=positions, attention_mask=mask,
                 decoder_input=decoder_input, inference_context=context,
                 runtime_gather_output=True)
        return out[:, -1].float()  # [b, s or 1, V] -> [b, V]

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[:, self.banned] = float("-inf")
        picked = logits.argmax(dim=-1)
        if self.lockstep is not None:
            # Every rank of the group must feed the same tokens and stop at the same step, or
            # the next collective hangs. Gathered TP logits are equal on every rank, but an EP
            # rank's expert GEMMs see its copy of a row at another position in the batch, so a
            # near tie could break differently: the group's first rank decides.
            import torch.distributed as dist

            group, first = self.lockstep
            dist.broadcast(picked, src=first, group=group)
        return picked

    # -- generation ----------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], images: Optional[torch.Tensor],
                 keep_logits: bool = False, max_new_tokens: Optional[int] = None) -> Generation:
        """`prompts`: token ids with image placeholders expanded; `images`: [n, 3, H, W], the
        images of all rows in placeholder order (row 0's first)."""
        max_new = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.without_sequence_parallel():
                if getattr(self.model, "packed_sequences", False) and \
                        len(set(map(len, prompts))) > 1:
                    return self._generate_by_length(prompts, images, max_new)
                return self._generate(prompts, images, keep_logits, max_new)
        finally:
            self.model.train(was_training)

    def _generate_by_length(self, prompts, images, max_new: int) -> Generation:
        """Under Transformer Engine the attention's causal mask type ignores our key-padding
        mask, so left-padded rows would attend to their padding: rows of one prompt length
        need no padding and are generated together, in as many batches as lengths."""
        k = self.model.tokens_per_image
        counts = [sum(t == self.image_token_id for t in p) // k for p in prompts]
        firsts = [sum(counts[:i]) for i in range(len(prompts))]
        tokens: list = [None] * len(prompts)
        reasons: list = [None] * len(prompts)
        for length in sorted(set(map(len, prompts))):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            picked = [images[firsts[i]:firsts[i] + counts[i]] for i in rows if counts[i]]
            part = self._generate([prompts[i] for i in rows],
                                  torch.cat(picked) if picked else None, False, max_new)
            for i, t, r in zip(rows, part.tokens, part.stop_reasons):
                tokens[i], reasons[i] = t, r
        return Generation(tokens, reasons)

    def _generate(self, prompts, images, keep_logits: bool, max_new: int) -> Generation:
        device = next(self.model.parameters()).device
        b, length = len(prompts), max(len(p) for p in prompts)
        total = length + max_new
        tokens = torch.full((b, length), PAD_ID, dtype=torch.long, device=device)
        valid = torch.zeros(b, total, dtype=torch.bool, device=device)  # real key positions
        for i, p in enumerate(prompts):
            tokens[i, length - len(p):] = torch.tensor(list(p), dtype=torch.long)
            valid[i, length - len(p):] = True
        valid[:, length:] = True
        image_tokens = None
        if images is not None and images.shape[0] > 0:
            image_tokens = self.model.encode_images(images.to(device))
        causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()

        def mask(rows: slice, keys: int) -> torch.Tensor:  # True = blocked, [b, 1, q, k]
            allowed = causal[rows, :keys].unsqueeze(0) & valid[:, None, :keys]
            return ~allowed.unsqueeze(1)

        # Materialises only the last position's logits by default (0.16's constructor
        # argument, 0.19's `InferenceConfig` field): prefill returns [b, 1, vocab].
        context = StaticInferenceContext(b, total) if self.use_cache else None
        out: list[list[int]] = [[] for _ in range(b)]
        reasons: list[Optional[str]] = [None] * b
        step_logits: list[torch.Tensor] = []
        seq = tokens
        # Prefill (or the first full pass without a cache).
        logits = self._logits(seq, self._embed(seq, image_tokens), mask(slice(0, length), length),
                              context)
        for step in range(max_new):
            if keep_logits:
                step_logits.append(logits.cpu())
            nxt = self._pick(logits)
            picked = nxt.tolist()  # one read of the step's tokens
            for i in range(b):
                if reasons[i] is not None:
                    continue
                t = picked[i]
                if t in self.stop_ids:
                    reasons[i] = self.stop_ids[t]
                elif t in self.newline_ids:
                    reasons[i] = "newline"
                else:
                    out[i].append(t)
            if all(r is not None for r in reasons) or step == max_new - 1:
                break
            nxt = nxt.masked_fill(torch.tensor([r is not None for r in reasons],
                                               device=device), EOS_ID)
            pos = seq.shape[1]
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
            if context is not None:
                context.sequence_len_offset = pos  # positions already in the cache
                if step == 0:
                    context.enable_decode_mode()
                new = seq[:, pos:]
                logits = self._logits(new, self._embed(new, None), mask(slice(pos, pos + 1),
                                                                         pos + 1), context)
            else:
                logits = self._logits(seq, self._embed(seq, image_tokens),
                                      mask(slice(0, pos + 1), pos + 1))
        return Generation(out, [r or "length" for r in reasons], step_logits)

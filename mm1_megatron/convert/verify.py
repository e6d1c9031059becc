"""Parity gate: the exported HF model against the Megatron model built from the same checkpoint.

Both run in this process, in fp32 on CPU, on a fixed probe (two images spliced into text, each
as its overview and tiles for a tiled model, or text only for the stock decoder): fail when
max |logit difference| > 1e-3 or the greedy 16-token continuations differ (the HF side through
`generate()` with its KV cache, the Megatron side by re-running the full sequence).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from mm1_megatron.config import Config, single_process_config
from mm1_megatron.convert.mappings import ConvertError
from mm1_megatron.data.loader import image_tokens
from mm1_megatron.data.tokenizer import EOS_ID

LOGIT_TOL = 1e-3
GREEDY_TOKENS = 16


def reference_config(cfg: Config) -> Config:
    """The parity gate's reference: one process, fp32, no recompute, no grouped GEMM."""
    c = single_process_config(cfg)
    c.train.precision, c.train.fp8 = "fp32", None
    c.llm.recompute = c.vision.recompute = "none"
    c.llm.moe.grouped_gemm = False
    return c


def megatron_model(ckpt: str | Path, cfg: Config, round_to: Optional[torch.dtype] = None):
    """MM1Model of `cfg` in this process (TP=PP=EP=1, fp32), weights from `ckpt` (any layout);
    `round_to`: round the weights through that dtype (an export cast to bf16 is compared with
    the same rounded weights)."""
    from megatron.core import parallel_state as ps

    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import init_distributed, training_device
    from mm1_megatron.checkpoint import load_model_weights

    c = reference_config(cfg)
    ensure_process_group()
    if not ps.model_parallel_is_initialized():
        init_distributed(c.parallel, seed=c.train.seed, environ={})
    model = build_mm1_model(c, use_te=False)
    load_model_weights(ckpt, [model])
    if round_to is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(round_to).float())
    return model.to(training_device()).eval()


def probe(cfg: Config, images: bool = True, seed: int = 0):
    """[1, s] token ids (two images between text when `images`) and [n, 3, H, W] pixels: a
    tiled model's images are their sub-images in a row, each image's placeholders all of theirs."""
    g = torch.Generator().manual_seed(seed)
    vocab, k = cfg.llm.vocab_size, image_tokens(cfg)
    low = min(10, vocab - 1)
    text = lambda n: torch.randint(low, vocab, (n,), generator=g)
    bos = torch.tensor([1])
    if not images:
        return torch.cat([bos, text(23)]).unsqueeze(0), None
    img = torch.full((k,), cfg.llm.image_token_id)
    ids = torch.cat([bos, text(3), img, text(5), img, text(4)])
    size = cfg.vision.image_size
    pixels = torch.randn(2 * cfg.vision.sub_images, 3, size, size, generator=g)
    return ids.unsqueeze(0), pixels


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor, pixels: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits on the host (the HF side runs there), the forward on the model's device."""
    from mm1_megatron.runtime import to_device

    batch = to_device({"ids": ids, "pos": torch.arange(ids.shape[1]).unsqueeze(0),
                       "docs": torch.zeros_like(ids), "pixels": pixels},
                      next(model.parameters()).device)
    return model(batch["ids"], batch["pos"], images=batch["pixels"],
                 document_ids=batch["docs"]).float().cpu()


@torch.no_grad()
def megatron_greedy(model, ids, pixels, steps: int, suppress: Sequence[int]) -> list[int]:
    """Greedy `steps` tokens; `suppress` ids (EOS, the image placeholder) are never chosen, so
    every probe compares the full length."""
    out = []
    for _ in range(steps):
        logits = megatron_logits(model, ids, pixels)[0, -1]
        logits[list(suppress)] = float("-inf")
        nxt = int(logits.argmax())
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _load_hf(hf_dir: Path, auto_cls: str):
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cls = getattr(transformers, auto_cls)
    return cls.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32,
                               local_files_only=True).eval()


@torch.no_grad()
def _hf_greedy(model, ids, pixels, steps, suppress) -> list[int]:
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=None,
                           pad_token_id=0, suppress_tokens=list(suppress))
    kwargs = {"pixel_values": pixels} if pixels is not None else {}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         generation_config=gen, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def _compare(name: str, ref: torch.Tensor, got: torch.Tensor, greedy_ref, greedy_got) -> dict:
    diff = float((ref - got).abs().max())
    result = {"max_abs_logit_diff": diff, "greedy_tokens": len(greedy_ref),
              "greedy_equal": greedy_ref == greedy_got, "logit_scale": float(ref.abs().max())}
    if not diff <= LOGIT_TOL:
        raise ConvertError(f"parity gate ({name}): max |logit diff| {diff:.3e} > {LOGIT_TOL:g}")
    if greedy_ref != greedy_got:
        raise ConvertError(f"parity gate ({name}): greedy continuations differ: megatron "
                           f"{greedy_ref} vs HF {greedy_got}")
    return result


def verify_export(ckpt: str | Path, hf_dir: str | Path, cfg: Config,
                  round_to: Optional[torch.dtype] = None) -> dict:
    """The full MM1 export: images + text probe."""
    ref_model = megatron_model(ckpt, cfg, round_to)
    hf = _load_hf(Path(hf_dir), "AutoModelForCausalLM")
    ids, pixels = probe(cfg, images=True)
    ref = megatron_logits(ref_model, ids, pixels)
    with torch.no_grad():
        got = hf(input_ids=ids, pixel_values=pixels).logits.float()
    suppress = [EOS_ID, cfg.llm.image_token_id]
    g_ref = megatron_greedy(ref_model, ids, pixels, GREEDY_TOKENS, suppress)
    g_got = _hf_greedy(hf, ids, pixels, GREEDY_TOKENS, suppress)
    return _compare("MM1", ref, got, g_ref, g_got)


def verify_llama(ckpt: str | Path, hf_dir: str | Path, cfg: Config,
                 round_to: Optional[torch.dtype] = None) -> dict:
    """The stock LlamaForCausalLM export: text-only probe against Megatron's text logits."""
    ref_model = megatron_model(ckpt, cfg, round_to)
    hf = _load_hf(Path(hf_dir), "AutoModelForCausalLM")
    ids, _ = probe(cfg, images=False)
    ref = megatron_logits(ref_model, ids, None)
    with torch.no_grad():
        got = hf(input_ids=ids).logits.float()
    g_ref = megatron_greedy(ref_model, ids, None, GREEDY_TOKENS, [EOS_ID])
    g_got = _hf_greedy(hf, ids, None, GREEDY_TOKENS, [EOS_ID])
    return _compare("Llama", ref, got, g_ref, g_got)


@torch.no_grad()
def open_clip_vision_features(get, pixels: torch.Tensor, *, layers: int, heads: int,
                              eps: float, quick_gelu: bool) -> torch.Tensor:
    """[n, 1 + grid^2, width] tokens of open_clip's VisionTransformer after `layers` resblocks
    (before ln_post), from `get(open_clip_name)`. Written from open_clip's forward on its own
    tensor names (conv1, class token, positional_embedding, ln_pre, pre-LN resblocks whose
    nn.MultiheadAttention stacks q|k|v in in_proj): the reference of an open_clip import, so a
    slip in the open_clip -> HF names shows up."""
    import torch.nn.functional as F

    t = lambda name: get(name).float()
    conv = t("visual.conv1.weight")
    x = F.conv2d(pixels.float(), conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = t("visual.class_embedding").reshape(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + t("visual.positional_embedding")
    width = x.shape[-1]
    ln = lambda h, p: F.layer_norm(h, (width,), t(p + ".weight"), t(p + ".bias"), eps)
    act = (lambda h: h * torch.sigmoid(1.702 * h)) if quick_gelu else F.gelu
    linear = lambda h, p: F.linear(h, t(p + ".weight"), t(p + ".bias"))
    heads_of = lambda h: h.unflatten(-1, (heads, width // heads)).transpose(1, 2)
    x = ln(x, "visual.ln_pre")
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        q, k, v = F.linear(ln(x, p + "ln_1"), t(p + "attn.in_proj_weight"),
                           t(p + "attn.in_proj_bias")).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(heads_of(q), heads_of(k), heads_of(v))
        x = x + linear(a.transpose(1, 2).flatten(2), p + "attn.out_proj")
        x = x + linear(act(linear(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return x

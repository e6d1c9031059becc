"""lmms-eval's `mm1` model: an HF export (`mm1-convert-hf`) scored by lmms-eval, installed as
an `lmms_eval.models` entry point (setup.py), so `lmms-eval --model mm1 --model_args
pretrained=EXPORT_DIR --tasks ...` works with no fork of lmms-eval and no model code passed
through `--include_path`.

The prompt is the export's own chat template, which knows how the model was trained: a
pre-training export asks ` Question: {text} Short answer:` after its images (the paper's VQA
format) and answers up to a newline; an SFT export speaks its `User: ...` / `Assistant:` turns.
A request's images come first in its user turn, then its text.

* `generate_until`: greedy or sampled, batched (left-padded rows with different image
  counts), stopping at `until` (and, for pre-training exports, at the newline ending an
  answer); the text is cut at the first stop string.
* `loglikelihood` (lmms-eval's multiple-choice tasks): the sum of the continuation's token
  log-probabilities after the prompt, and whether greedy decoding would produce it.

Runs on CPU or CUDA (`device=`, `dtype=`); under `accelerate launch` each process scores its
share of the requests (lmms-eval splits them by rank).
This module imports lmms_eval, which is only installed where it is used: nothing else in the
package imports it.
"""

from __future__ import annotations

from typing import Optional

import torch
from lmms_eval.api.instance import GenerationResult, Instance, unwrap_generation_output
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from tqdm import tqdm

# lmms-eval 0.7.3's evaluator passes every model output through `unwrap_generation_output`,
# which turns a loglikelihood's (logprob, is_greedy) into its str(): every multiple-choice
# task then fails ("too many values to unpack"). A GenerationResult's `text` passes as is, so
# where the release stringifies, the pair travels in one; a release that keeps tuples gets
# them plain.
_WRAP_LOGLIKELIHOOD = unwrap_generation_output((0.0, True))[0] != (0.0, True)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "auto": "auto"}


def manifest() -> ModelManifest:
    """The entry point's payload (`lmms_eval.models`: mm1)."""
    return ModelManifest(model_id="mm1", simple_class_path=f"{__name__}.MM1")


def _flat(visuals) -> list:
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        if isinstance(v, (list, tuple)):
            out.extend(_flat(v))
        elif v is not None:
            out.append(v)
    return out


class MM1(lmms):
    """An MM1 HF export under lmms-eval (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str, device: Optional[str] = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = 128,
                 attn_implementation: Optional[str] = None, **kwargs) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        unknown = sorted(k for k in kwargs if k not in ("max_batch_size",))
        if unknown:
            raise ValueError(f"mm1: unknown model_args {unknown} (known: pretrained, device, "
                             "dtype, batch_size, max_new_tokens, attn_implementation)")
        self._rank, self._world_size, device = self._distributed(device)
        self._device = torch.device(device)
        if dtype not in DTYPES:
            raise ValueError(f"mm1: dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        wanted = DTYPES[dtype]
        if wanted == "auto":  # the export's dtype on a GPU; fp32 on CPU (bf16 matmuls crawl)
            wanted = "auto" if self._device.type == "cuda" else torch.float32
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        self.model = AutoModelForImageTextToText.from_pretrained(
            pretrained, trust_remote_code=True, dtype=wanted, **extra).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.tokenizer = self.processor.tokenizer
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 1
        self.max_new_tokens = int(max_new_tokens)
        meta = getattr(self.model.config, "mm1_megatron", None) or {}
        fmt = meta.get("prompt_format") or (
            "chat" if (meta.get("config", {}).get("data", {}).get("weight_sft") or 0) > 0
            else "pretrain")
        # a pre-training export's answers end at a newline (the paper's k-shot format)
        self.stops = ("\n",) if fmt == "pretrain" else ()

    @staticmethod
    def _distributed(device: Optional[str]) -> tuple[int, int, str]:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # accelerate launch / torchrun: one process per GPU
            rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", 0))
            return rank, world, f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return 0, 1, device

    # ---- prompts ------------------------------------------------------------------------

    def _doc(self, request: Instance):
        *_, doc_id, task, split = request.args
        return self.task_dict[task][split][doc_id]

    def _images(self, request: Instance, doc) -> list:
        """The request's images (its task's doc_to_visual, flattened), as RGB."""
        doc_to_visual = request.args[2]
        visuals = _flat(doc_to_visual(doc)) if doc_to_visual is not None else []
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals]

    def _prompt(self, context: str, n_images: int) -> str:
        content = [{"type": "image"}] * n_images + ([{"type": "text", "text": context}]
                                                    if context else [])
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  tokenize=False, add_generation_prompt=True)

    def _inputs(self, prompts: list[str], images: list) -> dict:
        # the template writes the BOS itself
        batch = self.processor(images=images or None, text=prompts, return_tensors="pt",
                               add_special_tokens=False)
        return {k: (v.to(self._device) if hasattr(v, "to") else v) for k, v in batch.items()}

    # ---- lmms-eval's calls --------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        out: list[Optional[str]] = [None] * len(requests)
        # batches of requests with the same generation arguments, in order
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="mm1 generate")
        for indices in groups.values():
            gen = dict(requests[indices[0]].args[1])
            until = gen.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            stops = [s for s in (*until, *self.stops) if s]
            for at in range(0, len(indices), self.batch_size):
                chunk = indices[at:at + self.batch_size]
                texts, images = [], []
                for i in chunk:
                    mine = self._images(requests[i], self._doc(requests[i]))
                    texts.append(self._prompt(requests[i].args[0], len(mine)))
                    images += mine
                inputs = self._inputs(texts, images)
                with torch.inference_mode():
                    ids = self.model.generate(**inputs, **self._generation(gen, stops))
                width = inputs["input_ids"].shape[1]
                for row, i in enumerate(chunk):
                    text = self.tokenizer.decode(ids[row, width:], skip_special_tokens=True)
                    for stop in stops:
                        text = text.split(stop, 1)[0]
                    out[i] = text.strip() if self.stops else text
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]

    def _generation(self, gen: dict, stops: list[str]) -> dict:
        """transformers' generate() arguments from lmms-eval's (`gen` is only read: every
        batch of a group gets the same)."""
        temperature = float(gen.get("temperature", 0) or 0)
        kwargs = {"max_new_tokens": int(gen.get("max_new_tokens", self.max_new_tokens)),
                  "num_beams": int(gen.get("num_beams", 1) or 1),
                  "do_sample": bool(gen.get("do_sample", False)) and temperature > 0}
        if kwargs["do_sample"]:
            kwargs.update(temperature=temperature, top_p=float(gen.get("top_p", 1.0) or 1.0))
        if stops:  # stop as soon as every row has met a stop string
            kwargs.update(stop_strings=stops, tokenizer=self.tokenizer)
        return kwargs

    def loglikelihood(self, requests: list[Instance]) -> list:
        out = []
        for r in tqdm(requests, disable=self.rank != 0, desc="mm1 loglikelihood"):
            context, target, *_ = r.args
            doc = self._doc(r)
            continuation = target if isinstance(target, str) else target(doc)
            images = self._images(r, doc)
            inputs = self._inputs([self._prompt(context, len(images))], images)
            cont = self.tokenizer(continuation, add_special_tokens=False,
                                  return_tensors="pt")["input_ids"].to(self._device)
            ids = torch.cat([inputs["input_ids"], cont], dim=1)
            mask = torch.ones_like(ids)
            with torch.inference_mode():
                logits = self.model(input_ids=ids, attention_mask=mask,
                                    pixel_values=inputs.get("pixel_values"),
                                    image_counts=inputs.get("image_counts")).logits
            n = cont.shape[1]
            scores = torch.log_softmax(logits[0, -n - 1:-1].float(), dim=-1)
            logprob = float(scores.gather(1, cont[0, :, None]).sum())
            greedy = bool((scores.argmax(-1) == cont[0]).all())
            self.cache_hook.add_partial("loglikelihood", r.args, (logprob, greedy))
            out.append(GenerationResult((logprob, greedy)) if _WRAP_LOGLIKELIHOOD
                       else (logprob, greedy))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mm1: multi-round generation is not supported; use tasks "
                                  "whose output_type is generate_until or multiple_choice")

"""MM1 in vLLM (an out-of-tree model, registered by `convert/vllm_plugin.py`): an HF export
(`mm1-convert-hf`) served by `vllm.LLM(EXPORT_DIR)` / `vllm serve EXPORT_DIR`.

The parts, laid out as vLLM's own LLaVA (model_executor/models/llava.py):
- the vision tower and connector are the export's own modules (`hf_modeling/modeling_mm1.py`,
  the code the export ships), replicated on every rank and run once per image;
- the decoder is vLLM's `LlamaForCausalLM` (paged KV cache, continuous batching, its
  tensor-parallel layers), built from the export's `text_config`;
- the export's weight names map onto both with one `WeightsMapper`.

Prompts: vLLM tokenizes the prompt with the export's tokenizer, in which `<image>` is one
token (`image_token_id`); the processor here replaces each by the `connector.num_tokens`
placeholder ids the model reads, and runs the export's image processor on the images (vLLM
calls an HF processor with the images only, so `MM1Processor`'s own expansion is not used).
The image embeddings go over the placeholders in prompt order, as in training.

Generation: placeholder ids are never generated (the export's `generation_config.json`
suppresses them for transformers; here `compute_logits` masks them). MoE exports: vLLM's
fused-MoE layer on the MoE layers (`MM1SparseMoe`). Not yet: tiled (high-resolution SFT)
exports are refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMultiModal
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper,
                                              init_vllm_registered_model, maybe_prefix)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageSize
from vllm.multimodal.processing import (BaseDummyInputsBuilder, BaseMultiModalProcessor,
                                        BaseProcessingInfo, PromptReplacement)

from mm1_megatron.convert.hf_modeling.modeling_mm1 import MM1VisionTower, build_connector

IMAGE = "<image>"


class MM1SparseMoe(nn.Module):
    """The export's `MM1SparseMoeBlock` on vLLM's fused MoE kernels: the router's top-k over
    the logits, softmax over the k chosen (vLLM's `renormalize=True`: softmax over all experts
    renormalised over the top k, the same weights), SwiGLU experts, dropless. The experts
    split over vLLM's tensor- / expert-parallel ranks; the router is replicated."""

    def __init__(self, config, prefix: str):
        from vllm.model_executor.layers.fused_moe.layer import FusedMoEFactory

        super().__init__()
        text = config.text_config
        self.hidden_size = text.hidden_size
        self.router_fp32 = bool(getattr(config, "moe_router_fp32", False))
        self.gate = nn.Linear(text.hidden_size, config.moe_num_experts, bias=False)
        self.experts = FusedMoEFactory(
            num_experts=config.moe_num_experts, top_k=config.moe_top_k,
            hidden_size=text.hidden_size,
            intermediate_size=config.moe_ffn_hidden_size or text.intermediate_size,
            renormalize=True, prefix=f"{prefix}.experts",
            ckpt_names=("gate_proj", "down_proj", "up_proj"))  # the export's expert names

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, self.hidden_size)
        weight = self.gate.weight
        logits = (torch.nn.functional.linear(flat.float(), weight.float()) if self.router_fp32
                  else torch.nn.functional.linear(flat, weight))
        return self.experts(flat, logits).reshape(shape)


class MM1ProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def tokens_per_image(self) -> int:
        processor = self.get_hf_processor()
        if getattr(processor, "sub_images", 1) != 1:
            raise NotImplementedError("MM1 in vLLM: tiled (high-resolution) exports are not "
                                      "supported yet; serve this export with transformers")
        return int(self.get_hf_config().connector["num_tokens"])

    def get_image_size_with_most_features(self) -> ImageSize:
        size = int(self.get_hf_config().vision_config.image_size)
        return ImageSize(width=size, height=size)

    def get_mm_max_tokens_per_item(self, seq_len: int,
                                   mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": self.tokens_per_image()}


class MM1DummyInputsBuilder(BaseDummyInputsBuilder[MM1ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return IMAGE * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        size = self.info.get_image_size_with_most_features()
        overrides = (mm_options or {}).get("image")
        return {"image": self._get_dummy_images(width=size.width, height=size.height,
                                                num_images=mm_counts.get("image", 0),
                                                overrides=overrides)}


class MM1MultiModalProcessor(BaseMultiModalProcessor[MM1ProcessingInfo]):
    def _call_hf_processor(self, hf_data: Mapping[str, object],
                           hf_kwargs: Mapping[str, object]):
        # MM1Processor wants the prompt; vLLM has tokenized it already and passes only the
        # images, which the export's image processor turns into pixel_values [n, 3, S, S].
        image_processor = self.info.get_hf_processor().image_processor
        return self.info.ctx.call_hf_processor(image_processor, hf_data)

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        return {"pixel_values": MultiModalFieldConfig.batched("image")}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs,
                            out_mm_kwargs) -> Sequence[PromptReplacement]:
        token = int(self.info.get_hf_config().image_token_id)
        return [PromptReplacement(modality="image", target=[token],
                                  replacement=[token] * self.info.tokens_per_image())]


@MULTIMODAL_REGISTRY.register_processor(MM1MultiModalProcessor, info=MM1ProcessingInfo,
                                        dummy_inputs=MM1DummyInputsBuilder)
class MM1ForConditionalGeneration(nn.Module, SupportsMultiModal):
    # The export's names (modeling_mm1.py) -> this module's (vLLM's Llama under
    # `language_model`, whose own layout is `model.*` + `lm_head`).
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={
        "language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    })

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        return IMAGE if modality.startswith("image") else None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.image_token_id = int(config.image_token_id)
        # transformers' CLIPEncoder reads the attention implementation from its config
        if getattr(config.vision_config, "_attn_implementation", None) is None:
            config.vision_config._attn_implementation = "sdpa"
        self.vision_tower = MM1VisionTower(config.vision_config, config.vision_class_token)
        self.connector = build_connector(config)
        self.language_model = init_vllm_registered_model(
            vllm_config=vllm_config, hf_config=config.text_config,
            prefix=maybe_prefix(prefix, "language_model"), architectures=["LlamaForCausalLM"])
        # MoE exports: vLLM's Llama with the MLP of every MoE layer (layer % moe_layer_freq
        # == 0, the export's `is_moe_layer`) replaced by the fused-MoE block
        for i, layer in enumerate(self.language_model.model.layers):
            if config.is_moe_layer(i):
                name = maybe_prefix(prefix, f"language_model.model.layers.{i}.mlp")
                layer.mlp = MM1SparseMoe(config, name)
        self.make_empty_intermediate_tensors = \
            self.language_model.make_empty_intermediate_tensors

    def get_language_model(self) -> nn.Module:
        return self.language_model

    def embed_multimodal(self, **kwargs: object):
        pixels = kwargs.pop("pixel_values", None)
        if pixels is None:
            return []
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack(list(pixels))
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        tokens = self.connector(self.vision_tower(pixels.to(dtype)))  # [n, num_tokens, h]
        return list(tokens)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs: object):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors,
                                         inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor):
        logits = self.language_model.compute_logits(hidden_states)
        if logits is not None:  # the placeholders are inputs, never outputs
            logits[..., self.image_token_id] = float("-inf")
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The export's tensors, streamed; MoE routers and experts go straight to their
        modules (vLLM's Llama loader would read an expert's gate_proj as a dense
        gate_up_proj), the rest through vLLM's loader."""
        loaded: set[str] = set()

        def the_rest():
            for name, tensor in weights:
                moe_names = self._load_moe_tensor(name, tensor)
                if moe_names is None:
                    yield name, tensor
                else:
                    loaded.update(moe_names)

        # AutoWeightsLoader consumes the_rest() whole before it returns: `loaded` is complete
        rest = AutoWeightsLoader(self).load_weights(the_rest(), mapper=self.hf_to_vllm_mapper)
        return loaded | rest

    def _load_moe_tensor(self, name: str, tensor: torch.Tensor):
        """The parameter names it loaded if `name` (language_model.layers.I.mlp.gate.weight,
        ...mlp.experts.E.{gate,up,down}_proj.weight) belongs to an MoE layer, else None."""
        parts = name.split(".")
        if len(parts) <= 5 or parts[:2] != ["language_model", "layers"] or parts[3] != "mlp":
            return None
        moe = self.language_model.model.layers[int(parts[2])].mlp
        if not isinstance(moe, MM1SparseMoe):
            return None
        where = f"language_model.model.layers.{parts[2]}.mlp."
        if parts[4] == "gate":
            moe.gate.weight.data.copy_(tensor)
            return [where + "gate.weight"]
        local = ".".join(parts[5:])  # E.{gate,up,down}_proj.weight, relative to the experts
        return [where + "experts." + n for n in moe.experts.load_weights([(local, tensor)])]

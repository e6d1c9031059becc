"""The decoder: Megatron-Core GPTModel, Llama-style, dense or with every-Nth-layer MoE, built
from an injected TransformerConfig and block spec (model/builder.py makes them from a Config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig


@dataclass(frozen=True)
class LanguageParts:
    """What the decoder is built from, as LLaVAModel takes its language model's."""

    config: TransformerConfig
    # Layer spec, or the block spec of one pipeline stage (and model chunk, with interleaving).
    layer_spec: Union[ModuleSpec, TransformerBlockSubmodules]
    vocab_size: int
    max_sequence_length: int
    tie_embeddings: bool
    rotary_base: int

    def build(self, pre_process: bool = True, post_process: bool = True,
              vp_stage: Optional[int] = None) -> GPTModel:
        """The decoder layers of `layer_spec`, model chunk `vp_stage` (interleaving)."""
        return GPTModel(
            config=self.config,
            transformer_layer_spec=self.layer_spec,
            vp_stage=vp_stage,
            vocab_size=self.vocab_size,
            max_sequence_length=self.max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=self.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=self.rotary_base,
            # MM1Model splices image tokens into the full sequence first, then scatters for SP.
            scatter_embedding_sequence_parallel=False,
        )

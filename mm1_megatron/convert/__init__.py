"""HuggingFace conversion: export Megatron MM1 checkpoints (any layout) to transformers
directories, gated on logit parity (`to_hf`), and import CLIP + Llama weights (`from_hf`)."""

from mm1_megatron.convert.mappings import ConvertError

__all__ = ["ConvertError"]

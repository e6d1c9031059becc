"""mm1_megatron: MM1-style multimodal LLM pre-training on Megatron-Core."""

__version__ = "0.1.0"

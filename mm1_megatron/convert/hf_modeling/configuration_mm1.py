"""MM1 configuration for `transformers` (shipped next to the weights; trust_remote_code=True).

A CLIP-style vision tower (`vision_config`: a `CLIPVisionConfig`), a connector (`connector`:
a plain dict) and a Llama-style decoder (`text_config`: a `LlamaConfig`) whose every
`moe_layer_freq`-th layer (0, N, 2N, ...) may be a top-k mixture of experts.
"""

from transformers import CLIPVisionConfig, LlamaConfig, PretrainedConfig

try:  # loaded as a remote-code module (package-relative) or straight from the folder
    from .compat_mm1 import llama_kwargs
except ImportError:  # pragma: no cover
    from compat_mm1 import llama_kwargs


class MM1Config(PretrainedConfig):
    model_type = "mm1"
    sub_configs_defaults = {"vision_config": CLIPVisionConfig, "text_config": LlamaConfig}

    def __init__(self, vision_config=None, text_config=None, connector=None, image_token_id=3,
                 vision_class_token=True, moe_num_experts=0, moe_layer_freq=1, moe_top_k=2,
                 moe_ffn_hidden_size=None, moe_router_fp32=False, **kwargs):
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = CLIPVisionConfig(**(vision_config or {}))
        if isinstance(text_config, dict) or text_config is None:
            text_config = LlamaConfig(**llama_kwargs(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        self.connector = dict(connector or {"type": "avg_pool", "num_tokens": 1})
        self.image_token_id = image_token_id
        self.vision_class_token = vision_class_token
        self.moe_num_experts = moe_num_experts
        self.moe_layer_freq = moe_layer_freq
        self.moe_top_k = moe_top_k
        self.moe_ffn_hidden_size = moe_ffn_hidden_size
        self.moe_router_fp32 = moe_router_fp32  # router logits, top-k and softmax in fp32
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def num_image_tokens(self) -> int:
        return int(self.connector["num_tokens"])

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_num_experts > 0 and layer % self.moe_layer_freq == 0


__all__ = ["MM1Config"]

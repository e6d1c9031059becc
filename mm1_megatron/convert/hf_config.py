"""Our typed `Config` -> transformers configs (MM1Config, LlamaConfig, CLIPVisionConfig) and the
side files of an exported directory (generation, image processor, tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

from mm1_megatron.config import Config
from mm1_megatron.data.images import CLIP_MEAN, CLIP_STD
from mm1_megatron.data.loader import image_tokens
from mm1_megatron.data.prompt_format import chat_template, pretrain_chat_template
from mm1_megatron.data.tokenizer import (BOS_ID, EOS_ID, IMAGE_TOKEN, PAD_ID, SPECIAL_TOKENS,
                                         UNK_ID)

HF_MODELING_DIR = Path(__file__).parent / "hf_modeling"
# The transformers releases the export's remote code runs on, and those CI runs it under besides
# the installed one (tests/convert/test_hf_usage.py overlays each; hf_modeling/compat_mm1.py
# holds what differs between them). Stated in the exported config.json and model card.
TRANSFORMERS_RANGE = ">=4.57,<6"
TRANSFORMERS_TESTED = ("4.57.6", "5.0.0", "5.19.0")
MODELING_FILES = ("compat_mm1.py", "configuration_mm1.py", "modeling_mm1.py",
                  "processing_mm1.py")


def vision_config_dict(cfg: Config) -> dict[str, Any]:
    v = cfg.vision
    return dict(hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
                num_hidden_layers=v.layers_built, num_attention_heads=v.num_attention_heads,
                num_channels=3, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.activation,  # "quick_gelu" | "gelu": same names in transformers
                layer_norm_eps=v.layernorm_eps, attention_dropout=0.0)


def text_config_dict(cfg: Config) -> dict[str, Any]:
    llm = cfg.llm
    return dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                intermediate_size=llm.ffn_hidden_size, num_hidden_layers=llm.num_layers,
                num_attention_heads=llm.num_attention_heads,
                num_key_value_heads=llm.query_groups, head_dim=llm.head_dim, hidden_act="silu",
                max_position_embeddings=cfg.data.seq_length, rms_norm_eps=llm.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": float(llm.rope_theta)},
                attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
                bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def connector_dict(cfg: Config) -> dict[str, Any]:
    c = cfg.connector
    return dict(type=c.type, num_tokens=c.num_tokens, hidden_size=c.hidden_size, depth=c.depth,
                mlp_depth=c.mlp_depth, pos_emb=c.pos_emb, norm_eps=c.norm_eps,
                num_heads=cfg.vision.num_attention_heads)


def mm1_config(cfg: Config):
    from mm1_megatron.convert.hf_modeling.configuration_mm1 import MM1Config

    moe = cfg.llm.moe
    config = MM1Config(vision_config=vision_config_dict(cfg), text_config=text_config_dict(cfg),
                       connector=connector_dict(cfg), image_token_id=cfg.llm.image_token_id,
                       vision_class_token=cfg.vision.class_token, moe_num_experts=moe.num_experts,
                       moe_layer_freq=moe.layer_freq, moe_top_k=moe.top_k,
                       moe_ffn_hidden_size=cfg.llm.expert_ffn_hidden_size,
                       moe_router_fp32=moe.router_dtype == "fp32",
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    config.architectures = ["MM1ForConditionalGeneration"]
    config.auto_map = {"AutoConfig": "configuration_mm1.MM1Config",
                       "AutoModel": "modeling_mm1.MM1ForConditionalGeneration",
                       "AutoModelForCausalLM": "modeling_mm1.MM1ForConditionalGeneration",
                       "AutoModelForImageTextToText": "modeling_mm1.MM1ForConditionalGeneration",
                       "AutoProcessor": "processing_mm1.MM1Processor"}
    config.mm1_megatron = {"preset": cfg.preset, "config": cfg.to_dict(),
                           # how to prompt it (harnesses read this: lmms-eval's `mm1` model)
                           "prompt_format": "chat" if is_chat_model(cfg) else "pretrain",
                           "transformers": {"range": TRANSFORMERS_RANGE,
                                            "tested": transformers_tested()}}
    return config


def transformers_tested() -> list[str]:
    """TRANSFORMERS_TESTED and the installed release (which exports and checks parity)."""
    import transformers
    from packaging.version import Version

    return sorted({*TRANSFORMERS_TESTED, transformers.__version__}, key=Version)


def llama_config(cfg: Config):
    from transformers import LlamaConfig

    config = LlamaConfig(**text_config_dict(cfg))
    config.architectures = ["LlamaForCausalLM"]
    return config


def image_processor_dict(cfg: Config) -> dict[str, Any]:
    """preprocessor_config.json: a CLIPImageProcessor doing what our DALI decoder does
    (`vision.resize`, bicubic = resample 3). A `{"height", "width"}` size resizes to exactly
    that, aspect not kept, in both of transformers' backends (PIL and torchvision); crop_size is
    written in both modes for readers that take it as the model's input size."""
    size = cfg.vision.image_size
    square = {"height": size, "width": size}
    geometry = dict(size=square, do_center_crop=False) if cfg.vision.resize == "squash" else \
        dict(size={"shortest_edge": size}, do_center_crop=True)
    return dict(image_processor_type="CLIPImageProcessor", do_resize=True, resample=3,
                **geometry, crop_size=square, do_rescale=True, rescale_factor=1 / 255,
                do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                do_convert_rgb=True)


def _write_fast_tokenizer(out: Path) -> None:
    """tokenizer.json: transformers' conversion of the sentencepiece model just written (the
    same ids; serving stacks load it without sentencepiece)."""
    from transformers import LlamaTokenizerFast

    fast = LlamaTokenizerFast.from_pretrained(out, from_slow=True)
    fast.backend_tokenizer.save(str(out / "tokenizer.json"))


def write_side_files(out: Path, cfg: Config, images: bool, tokenizer_model: Optional[str]) -> list[str]:
    """generation_config.json, preprocessor_config.json, tokenizer files. Returns notes."""
    notes = []
    gen = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
               max_new_tokens=32)
    if images:
        gen["suppress_tokens"] = [cfg.llm.image_token_id]  # placeholders are never generated
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if images:
        (out / "preprocessor_config.json").write_text(
            json.dumps(image_processor_dict(cfg), indent=2) + "\n")
    if tokenizer_model and Path(tokenizer_model).is_file():
        shutil.copyfile(tokenizer_model, out / "tokenizer.model")
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                    "pad_token": "<pad>"}
        # Left padding: generation appends on the right of a batch of prompts.
        tok = dict(tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                   add_prefix_space=False, legacy=False, model_max_length=cfg.data.seq_length,
                   sp_model_kwargs={}, clean_up_tokenization_spaces=False, padding_side="left",
                   **specials)
        if images:
            tok["extra_special_tokens"] = {"image_token": IMAGE_TOKEN}
            tok["chat_template"] = export_chat_template(cfg)
        tok["added_tokens_decoder"] = {
            str(i): {"content": piece, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for piece, i in sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1])}
        (out / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        try:
            _write_fast_tokenizer(out)
        except Exception as e:  # noqa: BLE001 - the slow tokenizer files still load
            notes.append(f"no tokenizer.json: transformers could not convert {tokenizer_model} "
                         f"({type(e).__name__}: {e})")
    elif tokenizer_model:
        notes.append(f"tokenizer {tokenizer_model} not found: no tokenizer files written")
    else:
        notes.append("no data.tokenizer_model: no tokenizer files written")
    if images:
        for name in MODELING_FILES:
            shutil.copyfile(HF_MODELING_DIR / name, out / name)
        if (out / "tokenizer_config.json").is_file():  # the processor needs the tokenizer
            (out / "processor_config.json").write_text(json.dumps(processor_dict(cfg), indent=2)
                                                       + "\n")
            (out / "chat_template.jinja").write_text(export_chat_template(cfg))
    return notes


def is_chat_model(cfg: Config) -> bool:
    """A run trained on conversations (an SFT run) speaks the chat format."""
    return cfg.data.weight_sft > 0


def export_chat_template(cfg: Config) -> str:
    """The chat format for SFT runs, the pre-training prompt format otherwise."""
    return chat_template(IMAGE_TOKEN) if is_chat_model(cfg) else \
        pretrain_chat_template(IMAGE_TOKEN)


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def model_card(cfg: Config, report: dict) -> str:
    """README.md of an export: what the model is, how it was trained (the run's config), the
    parity figures of this export, and the standard transformers usage."""
    from mm1_megatron.model.params import count_params

    n, v, llm, moe = count_params(cfg), cfg.vision, cfg.llm, cfg.llm.moe
    parity = report.get("parity")
    decoder = (f"{llm.num_layers} layers, hidden {llm.hidden_size}, {llm.num_attention_heads} "
               f"heads ({llm.query_groups} KV groups), vocab {llm.vocab_size}")
    if moe.num_experts:
        every = {1: "every layer", 2: "every 2nd layer", 3: "every 3rd layer"}.get(
            moe.layer_freq, f"every {moe.layer_freq}th layer")
        decoder += f", {moe.num_experts} experts, top-{moe.top_k}, on {every}"
    lines = [
        "---", "library_name: transformers", "pipeline_tag: image-text-to-text",
        "tags: [mm1, multimodal, megatron-core, custom_code]", "---", "",
        f"# MM1 ({cfg.preset or 'custom config'}), exported by mm1_megatron", "",
        "An MM1-style multimodal LLM (arXiv 2403.09611): a CLIP ViT image encoder, a "
        f"{cfg.connector.type} connector ({cfg.connector.num_tokens} tokens per image) and a "
        "decoder-only LLM, pre-trained on interleaved image-text documents, image-caption "
        "pairs and text" + (
            ", then fine-tuned on conversations (the chat template renders their format: "
            "`User: ...` / `Assistant: ...`)." if is_chat_model(cfg) else
            ". This is a pre-trained model, not an instruction-tuned one: prompt it the way "
            "the paper evaluates it (the chat template renders that format)."), "",
        "| | |", "|---|---|",
        f"| parameters | {_billions(n.total)} total, {_billions(n.active)} active per token |",
        f"| image encoder | ViT {v.layers_built} layers, width {v.hidden_size}, patch "
        f"{v.patch_size}, {v.image_size} px ({v.resize}), {v.activation} |",
        "| images | " + (f"{v.image_size * v.tile_grid} px as a {v.image_size} px overview and "
                          f"{v.tile_grid} x {v.tile_grid} tiles of {v.image_size} px, "
                          f"{image_tokens(cfg)} tokens per image (the "
                          f"processor tiles) |" if v.tiles else
                          f"{v.image_size} px, {cfg.connector.num_tokens} tokens per image |"),
        f"| decoder | {decoder} |",
        f"| trained | preset `{cfg.preset}`, sequence length {cfg.data.seq_length}, "
        f"checkpoint `{Path(report.get('checkpoint', '?')).name}` |",
    ]
    if parity:
        lines.append(f"| parity with the Megatron model | max abs logit difference "
                     f"{parity['max_abs_logit_diff']:.2e} (fp32, two images + text), "
                     f"{parity['greedy_tokens']} greedy tokens equal |")
    else:
        lines.append("| parity with the Megatron model | not checked (`--no-verify`) |")
    lines += [
        "", "## Use", "", "```python",
        "from PIL import Image",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'model = AutoModelForImageTextToText.from_pretrained(".", trust_remote_code=True)',
        'processor = AutoProcessor.from_pretrained(".", trust_remote_code=True)',
        'inputs = processor(images=Image.open("photo.jpg"), text="<image> A photo of",',
        '                   return_tensors="pt")',
        "out = model.generate(**inputs, max_new_tokens=20)",
        'print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```", "",
        "Each `<image>` in a prompt takes the next image; prompts may hold any number of "
        "images, batches are left-padded. `pipeline(\"image-text-to-text\", model=\".\", "
        "trust_remote_code=True)` works too. The prompt format (`chat_template.jinja`): "
        "`<image> A photo of` for captions, `<image> Question: ... Short answer:` for VQA, "
        "in-context examples separated by a newline.", "",
        f"Runs on transformers {TRANSFORMERS_RANGE.replace(',', ', ')} (tested: "
        f"{', '.join(transformers_tested())}).", "",
    ]
    return "\n".join(lines)


def processor_dict(cfg: Config) -> dict[str, Any]:
    """processor_config.json: MM1Processor (shipped as processing_mm1.py) over the image
    processor and the tokenizer; each `<image>` becomes `connector.num_tokens` placeholders per
    encoder input (x 1 + tile_grid^2 for a tiled, high-resolution model)."""
    return dict(processor_class="MM1Processor",
                auto_map={"AutoProcessor": "processing_mm1.MM1Processor"},
                image_token=IMAGE_TOKEN, num_image_tokens=cfg.connector.num_tokens,
                tile_grid=cfg.vision.tiles)


__all__ = ["mm1_config", "llama_config", "write_side_files", "image_processor_dict",
           "processor_dict", "model_card",
           "vision_config_dict", "text_config_dict", "connector_dict", "BOS_ID", "EOS_ID",
           "PAD_ID", "UNK_ID"]

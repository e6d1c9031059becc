"""`mm1-import-hf --clip` on every format DFN5B-CLIP-ViT-H-14-378 ships.

One 2-layer CLIP with DFN5B's vision shapes (width 1280, 16 heads of 80, MLP 5120, patch 14,
quick_gelu, LayerNorm eps 1e-5) at 56 px, saved from the same weights as (a) a CLIPVisionModel
`model.safetensors`, (b) a CLIPModel `pytorch_model.bin` (old transformers' names and buffers,
written with torch.save: transformers 5 saves safetensors only), beside the open_clip files,
(c) CLIPModel sharded safetensors, (d) open_clip's `open_clip_pytorch_model.bin` +
`open_clip_config.json` (names and layout written here from open_clip's model code), (e)
sharded `pytorch_model.bin.index.json`. Each is imported, and the Megatron encoder loaded back
from its checkpoint is compared with transformers' CLIPVisionModel holding the same weights.
All of it runs in one fresh process (`case_clip_imports`): Megatron's parallel state is
process-global. When open_clip is importable, open_clip's own model, built from the same
config with the same weights, is compared too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests._procs import run_ranks

pytestmark = [pytest.mark.mcore, pytest.mark.slow]

SIZE = 56  # 4x4 patches of 14
VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=2,
              num_attention_heads=16, patch_size=14, image_size=SIZE, hidden_act="quick_gelu",
              layer_norm_eps=1e-5)
TEXT = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
            vocab_size=64, max_position_embeddings=8, hidden_act="quick_gelu",
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=1)
OPEN_CLIP_CONFIG = {
    "model_cfg": {"embed_dim": 32, "quick_gelu": True,
                  "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 1280,
                                 "head_width": 80, "mlp_ratio": 4.0, "patch_size": 14},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2,
                               "layers": 1}},
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711],
                       "interpolation": "bicubic", "resize_mode": "squash"}}
OVERRIDES = ["vision.hidden_size=1280", "vision.num_attention_heads=16",
             "vision.ffn_hidden_size=5120", "vision.num_layers=2"]
FORMATS = ["safetensors", "bin", "sharded", "open_clip", "bin_sharded"]


# ---------------------------------------------------------------------------- the sources


def _open_clip_state(sd: dict, vision_layers: int, text_layers: int) -> dict:
    """A HF CLIPModel state dict in open_clip's CLIP names and layout (nn.MultiheadAttention's
    in_proj stacks q, k, v; projections are [width, embed_dim] parameters)."""
    import torch

    out = {
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t().contiguous(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t().contiguous(),
        "logit_scale": sd["logit_scale"],
    }
    for w in ("weight", "bias"):
        out[f"visual.ln_pre.{w}"] = sd[f"vision_model.pre_layrnorm.{w}"]
        out[f"visual.ln_post.{w}"] = sd[f"vision_model.post_layernorm.{w}"]
        out[f"ln_final.{w}"] = sd[f"text_model.final_layer_norm.{w}"]
    for hf, oc, n in (("vision_model.encoder.layers.", "visual.transformer.resblocks.",
                       vision_layers),
                      ("text_model.encoder.layers.", "transformer.resblocks.", text_layers)):
        for i in range(n):
            h, o = f"{hf}{i}.", f"{oc}{i}."
            for w in ("weight", "bias"):
                out[f"{o}ln_1.{w}"] = sd[f"{h}layer_norm1.{w}"]
                out[f"{o}attn.in_proj_{w}"] = torch.cat(
                    [sd[f"{h}self_attn.{p}_proj.{w}"] for p in "qkv"])
                out[f"{o}attn.out_proj.{w}"] = sd[f"{h}self_attn.out_proj.{w}"]
                out[f"{o}ln_2.{w}"] = sd[f"{h}layer_norm2.{w}"]
                out[f"{o}mlp.c_fc.{w}"] = sd[f"{h}mlp.fc1.{w}"]
                out[f"{o}mlp.c_proj.{w}"] = sd[f"{h}mlp.fc2.{w}"]
    return {k: v.clone() for k, v in out.items()}


def _sources(root: Path):
    """The CLIP in every format; returns (dirs, transformers CLIPVisionModel reference)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=32)
    clip = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in clip.parameters():
            # off the init (LayerNorms not all ones), features still O(1) like a trained ViT's
            p.add_(torch.randn_like(p) * 0.01)
    sd = {k: v.detach().clone() for k, v in clip.state_dict().items()}
    d = {f: root / f for f in FORMATS}
    for path in d.values():
        path.mkdir(parents=True)

    vision = transformers.CLIPVisionModel(config.vision_config).eval()
    # transformers 5 names CLIPVisionModel's tensors without the `vision_model.` prefix
    vision.load_state_dict({k[len("vision_model."):]: v for k, v in sd.items()
                            if k.startswith("vision_model.")})
    vision.save_pretrained(d["safetensors"])  # (a)
    clip.save_pretrained(d["sharded"], max_shard_size="60MB")  # (c)

    # (b) pytorch_model.bin as older transformers wrote it (position_ids buffers included)
    old = dict(sd)
    old["vision_model.embeddings.position_ids"] = torch.arange(VISION["image_size"] ** 2
                                                               // 14 ** 2 + 1)[None]
    old["text_model.embeddings.position_ids"] = torch.arange(TEXT["max_position_embeddings"])[None]
    torch.save(old, d["bin"] / "pytorch_model.bin")
    config.save_pretrained(d["bin"])
    # (e) the same, in two .bin shards with an index
    keys = sorted(old)
    half = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
            "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in half.items():
        torch.save({k: old[k] for k in part}, d["bin_sharded"] / name)
    (d["bin_sharded"] / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, part in half.items() for k in part}}))
    config.save_pretrained(d["bin_sharded"])

    # (d) open_clip; the .bin dir holds them too, as the published repo does (HF is preferred)
    torch.save(_open_clip_state(sd, VISION["num_hidden_layers"], TEXT["num_hidden_layers"]),
               d["open_clip"] / "open_clip_pytorch_model.bin")
    (d["open_clip"] / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    for f in ("open_clip_pytorch_model.bin", "open_clip_config.json"):
        os.symlink(d["open_clip"] / f, d["bin"] / f)
    return d, vision


def _error(fn, *args, **kwargs) -> str:
    from mm1_megatron.convert import ConvertError

    try:
        fn(*args, **kwargs)
    except ConvertError as err:
        return str(err)
    return "NO ERROR"


def _variant(src: Path, dst: Path, edit_json: dict) -> Path:
    """`src` as symlinks, with JSON files `edit_json` {name: fn(data) -> data} rewritten."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in edit_json:
            (dst / f.name).write_text(json.dumps(edit_json[f.name](json.loads(f.read_text()))))
        else:
            os.symlink(f.resolve(), dst / f.name)
    return dst


def _drop(data: dict, *path: str) -> dict:
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return data


def _open_clip_features(dirs, pixels):
    """open_clip's own CLIP from the config, our open_clip file loaded strictly: its visual
    tower's token features before ln_post (the output of `visual.transformer`)."""
    import open_clip
    import torch

    cfg = json.loads((dirs["open_clip"] / "open_clip_config.json").read_text())["model_cfg"]
    model = open_clip.CLIP(**cfg).eval()
    state = torch.load(dirs["open_clip"] / "open_clip_pytorch_model.bin", weights_only=True)
    model.load_state_dict(state, strict=True)  # our layout is open_clip's, name for name
    got = {}
    model.visual.transformer.register_forward_hook(lambda m, i, o: got.setdefault("x", o))
    with torch.no_grad():
        model.encode_image(pixels)
    return got["x"], {"open_clip": open_clip.__version__, "activation":
                      type(model.visual.transformer.resblocks[0].mlp.gelu).__name__}


def case_clip_imports(root: str) -> dict:
    import torch

    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.convert.from_hf import import_hf
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.source_weights import clip_weights
    from mm1_megatron.convert.verify import megatron_model
    from mm1_megatron.runtime import init_distributed

    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1234, environ={})
    root_p = Path(root)
    t0 = time.monotonic()
    dirs, vision = _sources(root_p / "src")
    out: dict = {"timing": {"sources": time.monotonic() - t0}, "imports": {}}
    cfg = load_config("tiny", OVERRIDES + [f"vision.image_size={SIZE}"])
    pixels = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]

    # 1. every format imports; the encoder loaded back gives transformers' features
    ours = {}
    for fmt in FORMATS:
        t0 = time.monotonic()
        lines: list[str] = []
        rep = import_hf(root_p / "runs" / fmt, cfg, clip=str(dirs[fmt]), log=lines.append)
        model = megatron_model(rep["checkpoint"], cfg)
        with torch.no_grad():
            ours[fmt] = model.vision(pixels)
        del model
        out["imports"][fmt] = {
            "max_abs_diff": float((ours[fmt] - want).abs().max()),
            "feature_scale": float(want.abs().max()), "parity": rep["parity"],
            "source": rep["clip_source"], "unused": rep["unused"]["clip"], "log": lines}
        out["timing"][fmt] = time.monotonic() - t0

    # 2. another image size: the table is interpolated, the parity check runs at 56 px
    t0 = time.monotonic()
    out["resized"] = {}
    for fmt in ("safetensors", "open_clip"):
        lines = []
        rep = import_hf(root_p / "runs" / f"resized_{fmt}",
                        load_config("tiny", OVERRIDES + ["vision.image_size=84"]),
                        clip=str(dirs[fmt]), log=lines.append)
        out["resized"][fmt] = {"parity": rep["parity"], "source": rep["clip_source"],
                               "log": lines}
    out["timing"]["resized"] = time.monotonic() - t0

    # 3. bad sources: one clear line each
    bad = root_p / "bad"
    no_act = _variant(dirs["safetensors"], bad / "no_hidden_act",
                      {"config.json": lambda c: _drop(c, "hidden_act")})
    no_qg = _variant(dirs["open_clip"], bad / "no_quick_gelu",
                     {"open_clip_config.json": lambda c: _drop(c, "model_cfg", "quick_gelu")})
    gelu = _variant(dirs["open_clip"], bad / "gelu",
                    {"open_clip_config.json": lambda c: {**c, "model_cfg": {
                        **c["model_cfg"], "quick_gelu": False}}})
    layer_scale = _variant(dirs["open_clip"], bad / "layer_scale",
                           {"open_clip_config.json": lambda c: {**c, "model_cfg": {
                               **c["model_cfg"], "vision_cfg": {
                                   **c["model_cfg"]["vision_cfg"], "ls_init_value": 1e-5}}}})
    # a layer-scale tensor the config does not announce: refused, not dropped
    stray = bad / "stray_tensor"
    stray.mkdir()
    shutil.copy(dirs["open_clip"] / "open_clip_config.json", stray)
    state = torch.load(dirs["open_clip"] / "open_clip_pytorch_model.bin", weights_only=True)
    state["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(1280)
    torch.save(state, stray / "open_clip_pytorch_model.bin")
    del state
    # a .bin that needs arbitrary unpickling: torch.load(weights_only=True) refuses it
    pickled = bad / "pickled"
    pickled.mkdir()
    shutil.copy(dirs["bin"] / "config.json", pickled)
    torch.save({"embeddings.patch_embedding.weight": torch.ones(1), "hook": os.getcwd},
               pickled / "pytorch_model.bin")
    errors = {name: _error(import_hf, bad / f"run_{name}", cfg, clip=str(d), log=lambda s: None)
              for name, d in (("no_hidden_act", no_act), ("no_quick_gelu", no_qg),
                              ("gelu", gelu), ("layer_scale", layer_scale),
                              ("stray_tensor", stray), ("pickled", pickled))}
    empty = bad / "empty"
    empty.mkdir()
    errors["empty"] = _error(import_hf, bad / "run_empty", cfg, clip=str(empty),
                             log=lambda s: None)
    out["errors"] = errors
    out["left_behind"] = sorted(p.name for p in bad.iterdir() if p.name.startswith("run_"))

    # 4. a bare open_clip model config (the inner model_cfg, named after the model) works too
    bare = bad / "bare_config"
    bare.mkdir()
    os.symlink(dirs["open_clip"] / "open_clip_pytorch_model.bin",
               bare / "open_clip_pytorch_model.bin")
    (bare / "ViT-H-14-378-quickgelu.json").write_text(json.dumps(OPEN_CLIP_CONFIG["model_cfg"]))
    w = clip_weights(bare)
    out["bare_config"] = {"format": w.describe(), "config": w.config}

    from mm1_megatron.convert.from_hf import build_parser

    out["help"] = build_parser().format_help()

    # 5. open_clip's own model on the same weights, when it is installed
    if importlib.util.find_spec("open_clip") is not None:
        feats, info = _open_clip_features(dirs, pixels)
        out["open_clip"] = {**info,
                            "vs_import": float((ours["open_clip"] - feats).abs().max()),
                            "vs_transformers": float((want - feats).abs().max())}
    return out


# ---------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("import_clip")
    result = run_ranks(__file__, "case_clip_imports", nprocs=1, timeout=900,
                       kwargs={"root": str(root)})[0]
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_imports_with_transformers_features(report, fmt):
    rep = report["imports"][fmt]
    assert rep["max_abs_diff"] <= 1e-5, rep  # fp32; the features are O(10)
    assert rep["feature_scale"] > 1.0  # not vanishing features
    assert rep["parity"]["vision_max_abs_diff"] <= 1e-5
    assert rep["parity"]["vision_tolerance"] == 1e-3  # features O(1): the plain gate
    assert rep["parity"]["vision_check_image_size"] == SIZE
    assert "position_table" not in rep["source"]  # same size: nothing interpolated


def test_formats_are_named_and_hf_is_preferred(report):
    src = {f: report["imports"][f]["source"]["format"] for f in FORMATS}
    assert src["safetensors"] == "CLIPVisionModel (model.safetensors)"
    assert src["bin"] == "CLIPModel (pytorch_model.bin)"
    assert src["sharded"] == "CLIPModel (model.safetensors.index.json)"
    assert src["open_clip"] == "open_clip (open_clip_pytorch_model.bin + open_clip_config.json)"
    assert src["bin_sharded"] == "CLIPModel (pytorch_model.bin.index.json)"
    # the .bin dir also holds the open_clip files: the HF ones are read, and the log says so
    assert "HF files preferred: open_clip_pytorch_model.bin not read" \
        in report["imports"]["bin"]["log"][0]
    # open_clip's reference is its own forward, HF's is transformers
    assert report["imports"]["open_clip"]["parity"]["vision_reference"].startswith("open_clip")
    assert report["imports"]["bin"]["parity"]["vision_reference"].startswith("transformers")


def test_unused_source_tensors_are_one_short_line(report):
    line = [ln for ln in report["imports"]["bin"]["log"] if "unused source tensors" in ln]
    assert len(line) == 1
    assert line[0] == ("--clip: unused source tensors: 21 text tower (text_model.*), "
                       "logit_scale, text_projection.weight, "
                       "vision_model.embeddings.position_ids, "
                       "vision_model.post_layernorm.{bias,weight}, visual_projection.weight")
    assert report["imports"]["open_clip"]["unused"] == (
        "16 text tower (transformer.*, ln_final.*, positional_embedding, "
        "token_embedding.weight), logit_scale, text_projection, visual.ln_post.{bias,weight}, "
        "visual.proj")
    assert report["imports"]["safetensors"]["unused"] == "post_layernorm.{bias,weight}"


def test_other_image_size_interpolates_and_still_checks_parity(report):
    for fmt, rep in report["resized"].items():
        assert rep["source"]["position_table"] == "4x4 -> 6x6"
        p = rep["parity"]
        assert p["vision_check_image_size"] == SIZE and p["vision_image_size"] == 84
        assert p["vision_max_abs_diff"] <= 1e-5, fmt
        assert p["position_table_max_abs_diff"] == 0.0
        line = [ln for ln in rep["log"] if ln.startswith("clip parity:")]
        assert len(line) == 1 and f"at the source's {SIZE} px" in line[0], rep["log"]
        assert "interpolated to 84 px" in line[0]


def test_bad_sources_give_one_clear_line(report):
    e = report["errors"]
    assert "no_hidden_act/config.json: no hidden_act" in e["no_hidden_act"]
    assert "no_quick_gelu/open_clip_config.json: no \"quick_gelu\"" in e["no_quick_gelu"]
    assert '"quick_gelu": true|false' in e["no_quick_gelu"]
    assert "quick_gelu=False (gelu), vision.activation='quick_gelu'" in e["gelu"]
    assert "vision_cfg.ls_init_value=1e-05 is not supported" in e["layer_scale"]
    assert "open_clip_pytorch_model.bin: visual.transformer.resblocks.0.ls_1.gamma has no " \
        "place in MM1's ViT" in e["stray_tensor"]
    assert "no CLIP weights" in e["empty"]
    assert "pickled/pytorch_model.bin: torch.load(weights_only=True) cannot read it " \
        "(Trying to load unsupported GLOBAL" in e["pickled"]
    for msg in e.values():
        assert "\n" not in msg and msg != "NO ERROR"
    assert report["left_behind"] == []


def test_bare_open_clip_model_config_is_accepted(report):
    b = report["bare_config"]
    assert b["format"] == "open_clip (open_clip_pytorch_model.bin + ViT-H-14-378-quickgelu.json)"
    assert b["config"] == {"hidden_size": 1280, "intermediate_size": 5120,
                           "num_attention_heads": 16, "num_hidden_layers": 2, "patch_size": 14,
                           "image_size": SIZE, "layer_norm_eps": 1e-5,
                           "hidden_act": "quick_gelu"}


def test_open_clip_own_model_matches_import(report):
    pytest.importorskip("open_clip")
    oc = report["open_clip"]
    assert oc["activation"] == "QuickGELU"
    assert oc["vs_import"] <= 1e-5 and oc["vs_transformers"] <= 1e-5


def test_help_lists_the_formats(report):
    text = report["help"]
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json",
                 "open_clip_pytorch_model.bin", "open_clip_config.json", "quick_gelu",
                 "weights_only=True", "interpolated"):
        assert name in text, name

"""MM1Model: image splicing shapes and limits, packed-row isolation, recompute, spec choice.

Cases that build Megatron-Core modules run in fresh processes (`tests._procs.run_ranks`):
parallel state and the CPU compatibility patches are process-global.
"""

from __future__ import annotations

import pytest

from mm1_megatron.config import get_preset, set_field
from mm1_megatron.runtime.backends import Backends
from tests._procs import run_ranks

pytestmark = pytest.mark.mcore


def _cfg(**fields):
    cfg = get_preset("tiny")
    for key, value in fields.items():
        set_field(cfg, key.replace("__", "."), value)
    return cfg


def _start(cfg):
    from mm1_megatron.runtime import init_distributed

    init_distributed(cfg.parallel, seed=0)


def _row(cfg, n_images: int, length: int, first: int = 10):
    """Token ids: `n_images` placeholder runs spaced by 3 text tokens, then text."""
    import torch

    k, image_id = cfg.connector.num_tokens, cfg.llm.image_token_id
    ids = torch.arange(first, first + length) % (cfg.llm.vocab_size - 10) + 10
    for i in range(n_images):
        ids[1 + i * (k + 3): 1 + i * (k + 3) + k] = image_id
    return ids


# ----------------------------------------------------------------------------- shapes, limits


def case_shapes_and_limits() -> dict:
    import torch

    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.mm1 import document_attention_mask

    # ViT at the real 378 px / patch 14 (27x27 grid), tiny width; 144 tokens per image.
    cfg = _cfg(vision__image_size=378, connector__num_tokens=144, llm__num_layers=2,
               data__seq_length=17 * 147 + 8, data__max_images_per_sequence=16)
    _start(cfg)
    out: dict = {"tokens": {}}
    images = torch.randn(2, 3, 378, 378)
    for kind in ("c_abstractor", "avg_pool", "attn_pool"):
        set_field(cfg, "connector.type", kind)
        torch.manual_seed(0)
        model = build_mm1_model(cfg, use_te=False)
        out["tokens"][kind] = list(model.encode_images(images).shape)

    s = cfg.data.seq_length
    rows = torch.stack([_row(cfg, n, s) for n in (0, 1, 16)])
    pos = torch.arange(s).expand(3, -1)
    mask = document_attention_mask(torch.zeros(3, s, dtype=torch.long))
    loss = model(rows, pos, mask, torch.randn(17, 3, 378, 378), labels=rows.roll(-1, 1))
    out["loss_shape"] = list(loss.shape)
    out["finite"] = bool(torch.isfinite(loss).all())

    def refused(ids, n_images):
        try:  # a device-side assert (torch._assert_async): no host sync on a GPU
            model(ids, pos[:1], mask[:1], torch.randn(n_images, 3, 378, 378))
        except RuntimeError as err:
            return str(err)
        return None

    out["over_limit"] = refused(_row(cfg, 17, s).unsqueeze(0), 17)
    out["mismatch"] = refused(_row(cfg, 2, s).unsqueeze(0), 1)
    return out


def test_image_shapes_and_limits():
    (r,) = run_ranks(__file__, "case_shapes_and_limits", timeout=600)
    for kind, shape in r["tokens"].items():
        assert shape == [2, 144, 64], kind  # 144 tokens at the LLM width, every connector
    assert r["loss_shape"] == [3, 17 * 147 + 8] and r["finite"]  # rows with 0, 1, 16 images
    assert r["over_limit"] == "a row holds more than data.max_images_per_sequence=16 images"
    assert r["mismatch"] == "the batch's image placeholder tokens are not 1 images x 144 tokens"


# ----------------------------------------------------------------------------- isolation


def case_packed_isolation() -> dict:
    import torch

    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.mm1 import document_attention_mask

    cfg = _cfg()
    _start(cfg)
    torch.manual_seed(0)
    model = build_mm1_model(cfg, use_te=False).eval()
    s, img = cfg.data.seq_length, cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, img, img, generator=g)
    doc_a, doc_b = _row(cfg, 1, 40, first=7), _row(cfg, 0, 50, first=300)
    pad = torch.zeros(s, dtype=torch.long)

    def run(segments, images, docs_ids):
        ids = torch.cat(segments + [pad[: s - sum(len(x) for x in segments)]]).unsqueeze(0)
        docs = torch.cat([torch.full((len(x),), d) for x, d in zip(segments, docs_ids)]
                         + [torch.full((s - sum(len(x) for x in segments),), 99)]).unsqueeze(0)
        with torch.no_grad():
            return model(ids, torch.arange(s).unsqueeze(0), document_attention_mask(docs),
                         images)[0]

    packed = run([doc_a, doc_b], image, [0, 1])
    alone_a = run([doc_a], image, [0])
    alone_b = run([doc_b], None, [0])
    causal_only = run([doc_a, doc_b], image, [0, 0])  # one document: B sees A
    return {
        "a": float((packed[:40] - alone_a[:40]).abs().max()),
        "b": float((packed[40:90] - alone_b[:50]).abs().max()),
        "b_without_mask": float((causal_only[40:90] - alone_b[:50]).abs().max()),
    }


def test_packed_documents_do_not_see_each_other():
    (r,) = run_ranks(__file__, "case_packed_isolation")
    assert r["a"] == 0.0  # same positions: bitwise identical
    assert r["b"] < 1e-4  # shifted by 40 positions: RoPE is relative, equal up to rounding
    assert r["b_without_mask"] > 1e-2  # the check can fail: without the mask B sees A


# ----------------------------------------------------------------------------- recompute


def case_recompute_gradients() -> dict:
    import torch

    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.mm1 import document_attention_mask
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    base = _cfg(llm__moe__num_experts=4, llm__moe__layer_freq=2)
    _start(base)
    s, img, k = base.data.seq_length, base.vision.image_size, base.connector.num_tokens
    ids = torch.stack([_row(base, 2, s), _row(base, 0, s, first=50)])
    images = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    mask = document_attention_mask(torch.zeros(2, s, dtype=torch.long))
    grads = {}
    for mode in ("none", "selective", "full"):
        cfg = _cfg(llm__moe__num_experts=4, llm__moe__layer_freq=2, llm__recompute=mode,
                   vision__recompute=mode)
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_mm1_model(cfg, use_te=False)
        loss = model(ids, torch.arange(s).expand(2, -1), mask, images, labels=ids.roll(-1, 1))
        loss.mean().backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert k > 0
    ref = grads["none"]
    return {mode: {"params": len(g), "max_diff": max(float((g[n] - ref[n]).abs().max())
                                                      for n in ref)}
            for mode, g in grads.items() if mode != "none"} | {"params": len(ref)}


def test_recompute_gives_identical_gradients():
    (r,) = run_ranks(__file__, "case_recompute_gradients")
    for mode in ("selective", "full"):
        assert r[mode]["params"] == r["params"] > 50  # every parameter got a gradient
        assert r[mode]["max_diff"] < 1e-6, (mode, r[mode])


# ----------------------------------------------------------------------------- specs, FP8


def _backends(cuda: bool, te: bool, cc=(9, 0)) -> Backends:
    return Backends(cuda_available=cuda, device_name="H100" if cuda else "cpu",
                    compute_capability=cc if cuda else None, transformer_engine=te,
                    transformer_engine_version="2.8" if te else None, apex=cuda,
                    apex_fused_adam=cuda, fp8_capable=cuda and cc >= (8, 9))


def test_layer_spec_choice():
    from mm1_megatron.model.specs import use_transformer_engine

    assert use_transformer_engine(_backends(cuda=True, te=True))
    assert not use_transformer_engine(_backends(cuda=True, te=False))
    assert not use_transformer_engine(_backends(cuda=False, te=False))
    assert not use_transformer_engine()  # this CPU machine


def test_vision_spec_is_bidirectional_and_megatrons_is_untouched():
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.enums import AttnMaskType

    from mm1_megatron.model.specs import vision_layer_spec

    def mask_of(spec):
        return spec.submodules.self_attention.params["attn_mask_type"]

    before = mask_of(get_vit_layer_with_local_spec())  # causal before 0.17, no_mask since
    ours = vision_layer_spec(use_te=False)
    assert mask_of(ours) == AttnMaskType.no_mask
    assert mask_of(get_vit_layer_with_local_spec()) == before  # built beside, not patched in


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_switch_reaches_megatron_config(recipe):
    from mm1_megatron.model.builder import precision_kwargs

    cfg = _cfg(train__precision="bf16", train__fp8="hybrid", train__fp8_recipe=recipe)
    kwargs = precision_kwargs(cfg)
    assert kwargs["fp8"] == "hybrid" and kwargs["fp8_recipe"] == recipe and kwargs["bf16"]
    assert "fp8" not in precision_kwargs(_cfg(train__precision="bf16"))


# ----------------------------------------------------------------------------- resolution


def case_resize_and_feature_layer() -> dict:
    import torch

    from mm1_megatron.config import Config
    from mm1_megatron.model.builder import mm1_parts
    from mm1_megatron.model.mm1 import MM1Model
    from mm1_megatron.model.params import count_params
    from mm1_megatron.model.vision import interpolate_position_grid

    out: dict = {}
    cfg = _cfg(vision__feature_layer=-2)
    _start(cfg)
    torch.manual_seed(0)
    model = MM1Model(mm1_parts(cfg, use_te=False))  # the parts injected, as LLaVAModel's
    out["holds_config"] = any(isinstance(value, Config) for module in model.modules()
                              for value in vars(module).values())
    out["vision_layers"] = len(model.vision.decoder.layers)
    out["vision_params"] = [sum(p.numel() for p in model.vision.parameters()),
                            count_params(cfg).vision]
    table = model.vision.position_embeddings.weight.detach().clone()
    out["same_size_identity"] = bool(torch.equal(interpolate_position_grid(table, 1, 6), table))
    # A field linear in the grid coordinates stays linear in the interior after bicubic
    # upsampling (6x6 -> 12x12): checks the grid is reshaped row-major, not scrambled.
    ramp = torch.arange(6.0).repeat(6).unsqueeze(1)  # x coordinate of each row-major cell
    up = interpolate_position_grid(ramp, 0, 12).reshape(12, 12)
    out["ramp_rows_equal"] = bool(torch.allclose(up[3], up[8]))
    out["ramp_increasing"] = bool((up[5, 3:9].diff() > 0).all())
    model.resize_images(168)
    out["tokens_168"] = list(model.encode_images(torch.randn(2, 3, 168, 168)).shape)
    out["position_rows"] = model.vision.position_embeddings.weight.shape[0]
    out["class_row_kept"] = bool(torch.equal(model.vision.position_embeddings.weight[0],
                                             table[0]))
    return out


def test_resize_for_higher_resolution_and_feature_layer():
    (r,) = run_ranks(__file__, "case_resize_and_feature_layer")
    assert not r["holds_config"]  # built from injected parts, not the run Config
    assert r["vision_layers"] == 1  # feature_layer=-2 of 2: the last layer is not built
    assert r["vision_params"][0] == r["vision_params"][1]
    assert r["same_size_identity"] and r["ramp_rows_equal"] and r["ramp_increasing"]
    assert r["tokens_168"] == [2, 9, 64]  # 12x12 patches still give 3x3 = 9 tokens
    assert r["position_rows"] == 1 + 144 and r["class_row_kept"]


def case_encoder_fidelity() -> dict:
    """quick_gelu vs gelu ViT on the same weights; fp32 router logits in a bf16 MoE decoder;
    the C-Abstractor's Honeybee initialisation."""
    import torch

    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.connector import CAbstractor, LayerNorm2d

    cfg = _cfg()
    _start(cfg)
    images = torch.randn(2, 3, 84, 84)
    features = {}
    for act in ("quick_gelu", "gelu", "quick_gelu_again"):
        set_field(cfg, "vision.activation", act.removesuffix("_again"))
        torch.manual_seed(0)
        model = build_mm1_model(cfg, use_te=False)
        with torch.no_grad():
            features[act] = model.vision(images)
    diff = {act: float((features[act] - features["quick_gelu"]).abs().max())
            for act in ("gelu", "quick_gelu_again")}
    out = {"activation_diff": diff}
    abstractor = model.connector
    assert isinstance(abstractor, CAbstractor)
    out["pos_emb_std"] = float(abstractor.pos_emb.std())
    out["pos_emb_max"] = float(abstractor.pos_emb.abs().max())
    out["norm_eps"] = sorted({m.eps for m in abstractor.modules() if isinstance(m, LayerNorm2d)})

    moe = _cfg(llm__moe__num_experts=4, llm__moe__layer_freq=2, train__precision="bf16")
    dtypes = {}
    for router_dtype in ("fp32", "model"):
        set_field(moe, "llm.moe.router_dtype", router_dtype)
        torch.manual_seed(0)
        router = build_mm1_model(moe, use_te=False).language_model.decoder.layers[0].mlp.router
        x = torch.randn(8, 1, moe.llm.hidden_size, dtype=torch.bfloat16)
        dtypes[router_dtype] = str(router.gating(x).dtype)
    out["router_logits"] = dtypes
    return out


def test_encoder_activation_router_dtype_and_connector_init():
    (r,) = run_ranks(__file__, "case_encoder_fidelity")
    # The switch reaches the ViT's MLP (init weights are small, so the gap is too).
    assert r["activation_diff"]["quick_gelu_again"] == 0.0
    assert r["activation_diff"]["gelu"] > 1e-5
    # Honeybee's timm trunc_normal_(std=0.02) cuts at +-2 absolute (as torch's does).
    assert 0.015 < r["pos_emb_std"] < 0.025 and 0 < r["pos_emb_max"] <= 2
    assert r["norm_eps"] == [1e-6]
    assert r["router_logits"] == {"fp32": "torch.float32", "model": "torch.bfloat16"}


@pytest.mark.parametrize("value", [0, -3, 3])
def test_feature_layer_must_exist(value):
    from mm1_megatron.config import ConfigError, validate

    cfg = _cfg(vision__feature_layer=value)
    with pytest.raises(ConfigError, match="vision.feature_layer"):
        validate(cfg, environ={})


def test_userbuffers_bootstrap_over_nccl_with_te_version_arguments():
    """`initialize_ub` as Megatron-LM calls it (TE is absent here: the arguments are checked)."""
    from mm1_megatron.model.specs import userbuffer_kwargs

    cfg = _cfg(parallel__tp=2, train__fp8="hybrid", data__seq_length=4096,
               train__micro_batch_size=2)
    new = userbuffer_kwargs(cfg, "2.8.0")
    assert new["bootstrap_backend"] == "nccl" and new["quantization_modes"] == ["FP8"]
    assert new["shape"] == [8192, cfg.llm.hidden_size] and new["tp_size"] == 2
    assert "use_fp8" not in new
    old = userbuffer_kwargs(_cfg(parallel__tp=2), "2.5.0")
    assert old["use_fp8"] is False and old["bootstrap_backend"] == "nccl"
    assert "quantization_modes" not in old
    with pytest.raises(RuntimeError, match="Transformer Engine >= 1.9"):
        userbuffer_kwargs(cfg, "1.8.0")


def test_quick_gelu_is_clips():
    """Ours equals transformers' QuickGELUActivation (what HF CLIP and the export run)."""
    import torch
    from transformers.activations import QuickGELUActivation

    from mm1_megatron.model.vision import quick_gelu

    x = torch.linspace(-8, 8, 1001)
    assert torch.equal(quick_gelu(x), QuickGELUActivation()(x))
    assert not torch.allclose(quick_gelu(x), torch.nn.functional.gelu(x), atol=1e-3)


def case_init_from_another_image_size(root: str) -> dict:
    """A checkpoint saved at 84 px loaded into a 168 px model (checkpoint.init_from for SFT at
    a higher resolution): the position tables are interpolated, every other tensor loads as
    saved, and the features of an upsampled image stay close to the 84 px model's."""
    import torch
    import torch.nn.functional as F
    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import model_sharded_state
    from mm1_megatron.checkpoint.state import load_model_weights
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.model.vision import interpolate_position_grid

    cfg = _cfg(connector__type="c_abstractor", connector__pos_emb=True)
    _start(cfg)
    torch.manual_seed(0)
    small = build_mm1_model(cfg, use_te=False).eval()
    with torch.no_grad():  # positions that matter: larger than the random patch features
        small.vision.position_embeddings.weight.mul_(30)
        small.connector.pos_emb.normal_(0, 1.0)
    __import__("os").makedirs(root)
    dist_checkpointing.save({"model": model_sharded_state([small])}, root)
    big_cfg = _cfg(connector__type="c_abstractor", connector__pos_emb=True,
                   vision__image_size=168)
    big = build_mm1_model(big_cfg, use_te=False).eval()
    logs = []
    load_model_weights(root, [big], adapt_positions=True, log=logs.append)
    table = small.vision.position_embeddings.weight.detach()
    out = {"logs": logs}
    out["vision_table"] = bool(torch.allclose(big.vision.position_embeddings.weight,
                                              interpolate_position_grid(table, 1, 12)))
    conn = small.connector.pos_emb.detach()[0]
    out["connector_table"] = bool(torch.allclose(big.connector.pos_emb[0],
                                                 interpolate_position_grid(conn, 0, 12)))
    out["rest_equal"] = all(torch.equal(a, b) for (n, a), (_, b) in
                            zip(small.state_dict().items(), big.state_dict().items())
                            if "position_embeddings" not in n and "pos_emb" not in n
                            and isinstance(a, torch.Tensor) and a.shape == b.shape)
    torch.manual_seed(1)
    x = F.interpolate(torch.randn(2, 3, 6, 6), size=84, mode="bicubic")  # smooth images
    up = F.interpolate(x, size=168, mode="bicubic", align_corners=False)
    with torch.no_grad():
        ref = small.encode_images(x)
        good = big.encode_images(up)
        rows = big.vision.position_embeddings.weight
        rows[1:] = rows[1:].flip(0)  # a broken interpolation: the grid reversed
        broken = big.encode_images(up)
    out["good"] = float((good - ref).norm() / ref.norm())
    out["broken"] = float((broken - ref).norm() / ref.norm())
    return out


def test_init_from_a_checkpoint_at_another_image_size(tmp_path):
    (r,) = run_ranks(__file__, "case_init_from_another_image_size",
                     kwargs={"root": str(tmp_path / "ckpt")}, timeout=300)
    assert r["vision_table"] and r["connector_table"] and r["rest_equal"]
    assert len(r["logs"]) == 2 and "interpolated" in r["logs"][0]
    print(f"relative feature error: interpolated {r['good']:.3f}, reversed grid "
          f"{r['broken']:.3f}")
    assert r["good"] < 0.6 * r["broken"]  # measured 0.35 vs 0.78

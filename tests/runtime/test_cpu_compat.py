"""One test per Megatron-Core CPU compatibility patch.

Each case runs in fresh process(es) with every other needed patch applied, calls the real
Megatron-Core code that needs the patch, and checks it fails (or silently goes wrong) without
it; then applies the patch and checks the same call works and gives the right numbers. If a
Megatron-Core upgrade fixes a call, the "without" half fails: drop the patch. If the upgrade
moves the call, the "with" half fails: adapt the patch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


from mm1_megatron.runtime.backends import Backends, detect_backends
from mm1_megatron.runtime.mcore_version import MCORE
from mm1_megatron.runtime.cpu_compat import (
    PATCHES,
    apply_cpu_compat,
    needed_patches,
)
from tests._helpers.tiny_gpt import (
    gloo_world,
    lm_batch,
    lm_loss,
    tiny_config,
    tiny_gpt,
)
from tests._procs import outcome, run_ranks

pytestmark = pytest.mark.mcore

NO_CUDA = "Torch not compiled with CUDA enabled"
NEEDED = needed_patches()  # on a GPU machine with TE and apex: none, and these tests skip


def needs(name: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(name not in NEEDED, reason=f"{name} not needed on this machine "
                              f"(Megatron-Core {MCORE})")


def _apply_all_but(target: str) -> Any:
    from mm1_megatron.runtime import cpu_compat

    assert target in cpu_compat.needed_patches(), f"{target} is not needed on this machine"
    cpu_compat.apply_cpu_compat(exclude=[target])
    return getattr(cpu_compat, target)


def _assert_needed(without: dict, error: str, message: str = "") -> None:
    assert not without["ok"], "Megatron-Core call now works without the patch: drop the patch"
    assert without["error"] == error, without
    assert message in without["message"], without


# ---------------------------------------------------------------------------------------------
# CUDA absent
# ---------------------------------------------------------------------------------------------


def case_cuda_stubs() -> dict:
    patch = _apply_all_but("patch_cuda_stubs")
    import torch
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    def rope() -> list:
        # get_emb moves inv_freq to torch.cuda.current_device() on the first forward
        emb = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(6)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
        freqs = torch.outer(torch.arange(6, dtype=torch.float32), inv_freq)
        expected = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        return (emb - expected).abs().max().item()

    def moe_alltoall_forward() -> float:
        # MoEAlltoAllTokenDispatcher creates a torch.cuda.Stream and enters torch.cuda.stream()
        model = tiny_gpt(tiny_config(num_experts=4, dispatcher="alltoall"))
        loss = lm_loss(model, lm_batch())
        loss.backward()
        return loss.item()

    with gloo_world():
        without = outcome(rope)
        patch()
        return {"without": without, "rope": outcome(rope), "moe": outcome(moe_alltoall_forward)}


@needs("patch_cuda_stubs")
def test_patch_cuda_stubs() -> None:
    (r,) = run_ranks(__file__, "case_cuda_stubs")
    _assert_needed(r["without"], "AssertionError", NO_CUDA)
    assert r["rope"]["ok"] and r["rope"]["value"] < 1e-6, r["rope"]
    assert r["moe"]["ok"], r["moe"]


def case_cuda_device_to_cpu() -> dict:
    patch = _apply_all_but("patch_cuda_device_to_cpu")
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def schedule_step() -> float:
        # forward_backward_no_pipelining: total_num_tokens = torch.zeros(..., device="cuda")
        model = tiny_gpt(tiny_config())
        batch = lm_batch()

        def forward_step(data_iterator: Any, model: Any) -> Any:
            out = model(batch["input_ids"], batch["position_ids"], batch["attention_mask"],
                        labels=batch["labels"])
            return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach()})

        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([None]), model=[model],
            num_microbatches=1, seq_length=16, micro_batch_size=2, forward_only=False)
        grads_present = all(p.grad is not None for p in model.parameters())
        assert grads_present, "backward did not reach every parameter"
        return losses[0]["loss"].item()

    def explicit_moves() -> list:
        x = torch.ones(2)
        return [str(x.cuda().device), str(x.to("cuda:0").device),
                str(torch.zeros(1, device="cuda").device), bool(x.pin_memory() is x)]

    with gloo_world():
        without = outcome(schedule_step)
        patch()
        return {"without": without, "with": outcome(schedule_step),
                "moves": outcome(explicit_moves)}


@needs("patch_cuda_device_to_cpu")
def test_patch_cuda_device_to_cpu() -> None:
    (r,) = run_ranks(__file__, "case_cuda_device_to_cpu")
    _assert_needed(r["without"], "AssertionError", NO_CUDA)
    assert r["with"]["ok"] and 3.0 < r["with"]["value"] < 6.0, r["with"]  # ~ln(64)
    assert r["moves"] == {"ok": True, "value": ["cpu", "cpu", "cpu", True]}


def case_optimizer_cuda_type_check() -> dict:
    patch = _apply_all_but("patch_optimizer_cuda_type_check")
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    def build_and_step() -> float:
        config = tiny_config()
        model = DistributedDataParallel(
            config=config, module=tiny_gpt(config),
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True), [model])
        before = [p.detach().clone() for p in model.parameters()]
        lm_loss(model, lm_batch()).backward()
        model.finish_grad_sync()
        ok, grad_norm, _ = opt.step()  # clip_grads runs here too
        assert ok
        moved = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
        assert moved == len(before), f"only {moved}/{len(before)} params updated"
        return grad_norm

    with gloo_world():
        without = outcome(build_and_step)
        patch()
        return {"without": without, "with": outcome(build_and_step),
                "type_outside_megatron": torch.zeros(1).type()}


@needs("patch_optimizer_cuda_type_check")
def test_patch_optimizer_cuda_type_check() -> None:
    (r,) = run_ranks(__file__, "case_optimizer_cuda_type_check")
    _assert_needed(r["without"], "TypeError", "Wrapped parameters must be one of torch.cuda")
    assert r["with"]["ok"] and r["with"]["value"] > 0, r["with"]
    assert r["type_outside_megatron"] == "torch.FloatTensor"  # the spoof stays scoped


def case_cuda_rng_tracker() -> dict:
    patch = _apply_all_but("patch_cuda_rng_tracker")
    import logging

    import torch
    from megatron.core.tensor_parallel.random import (
        get_cuda_rng_tracker,
        model_parallel_cuda_manual_seed,
    )

    warnings: list = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())  # type: ignore
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)

    def seeded_streams() -> dict:
        model_parallel_cuda_manual_seed(123)
        tracker = get_cuda_rng_tracker()
        torch.manual_seed(7)
        outside_before = torch.get_rng_state()
        with tracker.fork():  # 'model-parallel-rng', seeded 123 + 2718 + tp_rank
            a = torch.rand(4)
            drop = torch.nn.functional.dropout(torch.ones(64), p=0.5)
        with tracker.fork():
            b = torch.rand(4)
        untouched = torch.equal(outside_before, torch.get_rng_state())
        g = torch.Generator().manual_seed(123 + 2718)
        expected = torch.rand(4, generator=g)
        return {"matches_seed": torch.equal(a, expected),
                "stream_advances": not torch.equal(a, b),
                "dropout_random": 0 < int((drop == 0).sum()) < 64,
                "outer_cpu_stream_untouched": untouched}

    with gloo_world():
        without = outcome(seeded_streams)
        patch()
        return {"without": without, "with": outcome(seeded_streams), "warnings": warnings}


@needs("patch_cuda_rng_tracker")
def test_patch_cuda_rng_tracker() -> None:
    (r,) = run_ranks(__file__, "case_cuda_rng_tracker")
    _assert_needed(r["without"], "AssertionError", NO_CUDA)
    assert r["with"] == {"ok": True, "value": {
        "matches_seed": True, "stream_advances": True, "dropout_random": True,
        "outer_cpu_stream_untouched": True}}, r["with"]
    assert not r["warnings"], r["warnings"]


def case_moe_alltoall_split_sizes() -> dict:
    patch = _apply_all_but("patch_moe_alltoall_split_sizes")

    def loss_with(dispatcher: str) -> float:
        model = tiny_gpt(tiny_config(num_experts=4, dispatcher=dispatcher, ep=2))
        loss = lm_loss(model, lm_batch())
        loss.backward()
        return loss.item()

    with gloo_world(ep=2):
        without = outcome(loss_with, "alltoall")
        patch()
        return {"without": without, "alltoall": outcome(loss_with, "alltoall"),
                "allgather": outcome(loss_with, "allgather")}


@needs("patch_moe_alltoall_split_sizes")
@pytest.mark.multirank
def test_patch_moe_alltoall_split_sizes() -> None:
    results = run_ranks(__file__, "case_moe_alltoall_split_sizes", nprocs=2)
    for r in results:
        _assert_needed(r["without"], "TypeError", "all_to_all_single(): incompatible")
        assert r["alltoall"]["ok"] and r["allgather"]["ok"], r
        # same weights, same tokens: both dispatchers must route to the same experts
        assert r["alltoall"]["value"] == pytest.approx(r["allgather"]["value"], rel=1e-5)


def case_gloo_uneven_all_gather() -> dict:
    patch = _apply_all_but("patch_gloo_uneven_all_gather")
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    sizes = [3, 5]  # rows per TP rank, as the MoE all-to-all dispatcher's output_splits_tp

    def gather() -> dict:
        rank = dist.get_rank()
        x = torch.full((sizes[rank], 4), float(rank + 1), requires_grad=True)
        out = gather_from_sequence_parallel_region(
            x, group=parallel_state.get_tensor_model_parallel_group(), output_split_sizes=sizes)
        weight = torch.arange(out.shape[0], dtype=torch.float32)[:, None]
        (out * weight).sum().backward()  # backward: reduce-scatter with input_split_sizes
        expected = torch.cat([torch.full((n, 4), float(r + 1)) for r, n in enumerate(sizes)])
        start = sum(sizes[:rank])
        expected_grad = 2 * weight[start:start + sizes[rank]].expand(-1, 4)  # summed over TP
        return {"forward": torch.equal(out, expected),
                "backward": torch.equal(x.grad, expected_grad)}

    with gloo_world(tp=2):
        without = outcome(gather)
        patch()
        return {"without": without, "with": outcome(gather)}


@needs("patch_gloo_uneven_all_gather")
@pytest.mark.multirank
def test_patch_gloo_uneven_all_gather() -> None:
    for r in run_ranks(__file__, "case_gloo_uneven_all_gather", nprocs=2):
        _assert_needed(r["without"], "RuntimeError",
                       "ProcessGroupGloo::allgather: invalid tensor size")
        assert r["with"] == {"ok": True, "value": {"forward": True, "backward": True}}, r


# ---------------------------------------------------------------------------------------------
# Transformer Engine absent
# ---------------------------------------------------------------------------------------------


def case_moe_te_gemm_placeholder() -> dict:
    patch = _apply_all_but("patch_moe_te_gemm_placeholder")
    import torch
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    def router_logits() -> dict:
        g = torch.Generator().manual_seed(0)
        inp = torch.randn(2, 3, 8, generator=g, requires_grad=True)
        weight = torch.randn(4, 8, generator=g, requires_grad=True)
        out = router_gating_linear(inp, weight, None, torch.float32)
        out.sum().backward()
        ref_inp, ref_w = inp.detach().requires_grad_(), weight.detach().requires_grad_()
        (ref_inp @ ref_w.t()).sum().backward()
        return {"forward": torch.allclose(out, inp @ weight.t(), atol=1e-6),
                "backward": torch.allclose(weight.grad, ref_w.grad, atol=1e-6)}

    without = outcome(router_logits)
    patch()
    return {"without": without, "with": outcome(router_logits)}


@needs("patch_moe_te_gemm_placeholder")
def test_patch_moe_te_gemm_placeholder() -> None:
    (r,) = run_ranks(__file__, "case_moe_te_gemm_placeholder")
    _assert_needed(r["without"], "NameError", "te_general_gemm")
    assert r["with"] == {"ok": True, "value": {"forward": True, "backward": True}}, r


def case_torch_norm_sequence_parallel() -> dict:
    patch = _apply_all_but("patch_torch_norm_sequence_parallel")
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    config = tiny_config(tp=2, sp=True)

    def build() -> dict:
        norm = WrappedTorchNorm(config=config, hidden_size=32, eps=1e-6)
        return {"type": type(norm).__name__, "eps": norm.eps,
                "tagged": all(getattr(p, "sequence_parallel", False) for p in norm.parameters()),
                "config_untouched": config.sequence_parallel}

    without = outcome(build)
    patch()
    # That the tag makes finalize_model_grads sum the norm grads over TP is checked
    # end to end by tests/runtime/test_tp_parity.py (TP=2 + SP vs TP=1 gradients).
    return {"without": without, "with": outcome(build)}


@needs("patch_torch_norm_sequence_parallel")
def test_patch_torch_norm_sequence_parallel() -> None:
    (r,) = run_ranks(__file__, "case_torch_norm_sequence_parallel")
    _assert_needed(r["without"], "AssertionError", "sequence parallel not supported")
    assert r["with"] == {"ok": True, "value": {"type": "RMSNorm", "eps": 1e-6, "tagged": True,
                                               "config_untouched": True}}, r


def case_clip_vit_default_norm() -> dict:
    patch = _apply_all_but("patch_clip_vit_default_norm")
    import torch
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
        use_cpu_initialization=True, normalization="LayerNorm", layernorm_epsilon=1e-5,
        add_bias_linear=True, activation_func=torch.nn.functional.gelu,
        gradient_accumulation_fusion=False, hidden_dropout=0.0, attention_dropout=0.0)

    def build_and_run() -> dict:
        model_parallel_cuda_manual_seed(0)
        vit = CLIPViTModel(config, get_vit_layer_with_local_spec(), img_h=16, img_w=16,
                           patch_dim=8)
        out = vit(torch.randn(2, 3, 16, 16))
        return {"ln_pre": type(vit.ln_pre).__name__, "eps": vit.ln_pre.eps,
                "shape": list(out.shape)}

    with gloo_world():
        without = outcome(build_and_run)
        patch()
        return {"without": without, "with": outcome(build_and_run)}


@needs("patch_clip_vit_default_norm")
def test_patch_clip_vit_default_norm() -> None:
    (r,) = run_ranks(__file__, "case_clip_vit_default_norm")
    _assert_needed(r["without"], "TypeError", "unexpected keyword argument 'config'")
    # 4 patches + 1 class token, batch 2, hidden 16
    assert r["with"] == {"ok": True, "value": {"ln_pre": "LayerNorm", "eps": 1e-5,
                                               "shape": [2, 5, 16]}}, r


# ---------------------------------------------------------------------------------------------
# apex/TE FusedAdam absent: DistributedOptimizer + torch Adam checkpoint resume (DP=2)
# ---------------------------------------------------------------------------------------------


def case_distopt_resume(target: str, ckpt_dir: str) -> dict:
    """Train 2 steps, save (model + DistributedOptimizer, fully_reshardable), take step 3;
    then resume fresh objects from the checkpoint, take step 3 again, compare."""
    patch = _apply_all_but(target)
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    sharding = {"distrib_optim_sharding_type": "fully_reshardable"}
    batches = [lm_batch(seed=s, batch=4) for s in range(3)]

    def build(seed: int) -> tuple:
        config = tiny_config()
        gpt = tiny_gpt(config, seed=seed)
        model = DistributedDataParallel(
            config=config, module=gpt,
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
        config.finalize_model_grads_func = finalize_model_grads
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-2, weight_decay=0.01, use_distributed_optimizer=True),
            [model])
        return gpt, model, opt

    def train_step(model: Any, opt: Any, batch: dict) -> None:
        model.zero_grad_buffer()
        opt.zero_grad()
        dp_rank = dist.get_rank()
        mine = {k: v[2 * dp_rank: 2 * dp_rank + 2] if k != "attention_mask" else v
                for k, v in batch.items()}
        lm_loss(model, mine).backward()
        finalize_model_grads([model])
        assert opt.step()[0]

    def sharded(gpt: Any, opt: Any, is_loading: bool) -> dict:
        model_sd = gpt.sharded_state_dict(prefix="")
        return {"model": model_sd, "optimizer": opt.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=sharding)}

    def resume() -> dict:
        gpt, model, opt = build(seed=999)  # different init: everything must come from ckpt
        state = dist_checkpointing.load(sharded(gpt, opt, is_loading=True), ckpt_dir)
        gpt.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        train_step(model, opt, batches[2])
        diff = max((p - r).abs().max().item()
                   for p, r in zip(model.parameters(), reference, strict=True))
        steps = [s["step"] for s in opt.optimizer.state.values()]
        return {"max_param_diff": diff, "steps": sorted({float(s) for s in steps}),
                "distinct_step_tensors": len({id(s) for s in steps}),
                "params_with_state": len(steps)}

    with gloo_world():
        gpt, model, opt = build(seed=1)
        for batch in batches[:2]:
            train_step(model, opt, batch)
        dist_checkpointing.save(sharded(gpt, opt, is_loading=False), ckpt_dir)
        train_step(model, opt, batches[2])
        reference = [p.detach().clone() for p in model.parameters()]
        without = outcome(resume)
        patch()
        return {"without": without, "with": outcome(resume)}


def _run_distopt(target: str, tmp_path: Path) -> list:
    return run_ranks(__file__, "case_distopt_resume", nprocs=2,
                     kwargs={"target": target, "ckpt_dir": str(tmp_path)})


def _assert_resume_exact(r: dict) -> None:
    assert r["ok"], r
    v = r["value"]
    assert v["max_param_diff"] < 1e-6, v
    assert v["steps"] == [3.0] and v["distinct_step_tensors"] == v["params_with_state"], v


@needs("patch_distopt_init_adam_state_for_load")
@pytest.mark.multirank
def test_patch_distopt_init_adam_state_for_load(tmp_path: Path) -> None:
    for r in _run_distopt("patch_distopt_init_adam_state_for_load", tmp_path):
        _assert_needed(r["without"], "AssertionError")
        _assert_resume_exact(r["with"])


@needs("patch_distopt_skip_adam_step_on_load")
@pytest.mark.multirank
def test_patch_distopt_skip_adam_step_on_load(tmp_path: Path) -> None:
    for r in _run_distopt("patch_distopt_skip_adam_step_on_load", tmp_path):
        _assert_needed(r["without"], "KeyError", "step")
        _assert_resume_exact(r["with"])


@needs("patch_distopt_unshare_adam_step")
@pytest.mark.multirank
def test_patch_distopt_unshare_adam_step(tmp_path: Path) -> None:
    for r in _run_distopt("patch_distopt_unshare_adam_step", tmp_path):
        # Silent without the patch: loads, steps, but all params share one step counter,
        # which advanced once per param, so Adam's bias correction and the update are wrong.
        w = r["without"]
        assert w["ok"], w
        assert w["value"]["distinct_step_tensors"] == 1 < w["value"]["params_with_state"], \
            "step tensors no longer shared after load: drop the patch"
        assert w["value"]["steps"] == [2.0 + w["value"]["params_with_state"]], w
        assert w["value"]["max_param_diff"] > 1e-4, w
        _assert_resume_exact(r["with"])


# ---------------------------------------------------------------------------------------------
# The layer as a whole
# ---------------------------------------------------------------------------------------------


def case_apply_semantics() -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.models.vision import clip_vit_model
    from megatron.core.optimizer import distrib_optimizer
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils

    def snapshot() -> list:
        return [id(torch.cuda.current_device), id(dist.all_gather),
                id(mrandom._get_cuda_rng_state), id(mrandom.CudaRNGStatesTracker.fork),
                id(distrib_optimizer.DistributedOptimizer.load_state_dict),
                id(clip_vit_model.CLIPViTModel.__init__), hasattr(moe_utils, "te_general_gemm"),
                torch._C._len_torch_function_stack()]

    before_import = snapshot()
    from mm1_megatron.runtime import cpu_compat
    from mm1_megatron.runtime.backends import detect_backends

    untouched_by_import = before_import == snapshot() and cpu_compat.applied_patches() == []
    first = cpu_compat.apply_cpu_compat()
    after_first = snapshot()
    second = cpu_compat.apply_cpu_compat()
    b = detect_backends()
    return {
        "untouched_by_import": untouched_by_import,
        "first": first, "second": second, "applied": cpu_compat.applied_patches(),
        "patched_once": after_first == snapshot(),
        "mode_stack": torch._C._len_torch_function_stack(),
        # our Backends flags must say what Megatron-Core's own probes concluded
        "flags": {
            "fused_adam": [b.fused_adam, distrib_optimizer.HAVE_APEX_OR_TE],
            "te": [b.transformer_engine, moe_utils.HAVE_TE],
            "clip_norm_is_torch": [not b.transformer_engine,
                                   clip_vit_model.NORM_IMPL is torch.nn.LayerNorm],
            "apex": [b.apex, gpt_layer_specs.HAVE_APEX],
        },
    }


@pytest.fixture(scope="module")
def apply_semantics() -> dict:
    (r,) = run_ranks(__file__, "case_apply_semantics")
    return r


def test_import_patches_nothing(apply_semantics: dict) -> None:
    assert apply_semantics["untouched_by_import"]


def test_apply_is_idempotent_and_returns_names(apply_semantics: dict) -> None:
    r = apply_semantics
    assert r["first"] == NEEDED  # here (no CUDA, TE or apex): every patch, in PATCHES order
    assert r["second"] == r["first"] == r["applied"]
    assert r["patched_once"]
    assert r["mode_stack"] == (1 if "patch_cuda_device_to_cpu" in NEEDED else 0)


def test_backend_flags_agree_with_megatron(apply_semantics: dict) -> None:
    for name, (ours, megatrons) in apply_semantics["flags"].items():
        assert ours == megatrons, f"{name}: detect_backends says {ours}, Megatron-Core {megatrons}"


def _backends(cuda: bool, te: bool, apex: bool) -> Backends:
    return Backends(cuda_available=cuda, device_name="NVIDIA H100" if cuda else "cpu",
                    compute_capability=(9, 0) if cuda else None, transformer_engine=te,
                    transformer_engine_version="2.8.0" if te else None, apex=apex,
                    apex_fused_adam=apex, fp8_capable=cuda)


def test_registry_applies_nothing_with_cuda_te_apex() -> None:
    gpu = _backends(cuda=True, te=True, apex=True)
    assert needed_patches(gpu) == []
    assert apply_cpu_compat(gpu) == []  # safe in-process: nothing to apply


def test_registry_conditions() -> None:
    from mm1_megatron.runtime.mcore_version import MOE_UTILS_BINDS_TE_GEMM

    te_fallbacks = ([] if MOE_UTILS_BINDS_TE_GEMM else ["patch_moe_te_gemm_placeholder"]) + \
        ["patch_torch_norm_sequence_parallel", "patch_clip_vit_default_norm"]
    adam_fallbacks = ["patch_distopt_init_adam_state_for_load",
                      "patch_distopt_skip_adam_step_on_load", "patch_distopt_unshare_adam_step"]
    # CUDA without TE or apex: the plain-torch fallbacks, no CUDA redirects
    assert needed_patches(_backends(cuda=True, te=False, apex=False)) == \
        te_fallbacks + adam_fallbacks
    # CUDA with apex but no TE: apex's FusedAdam avoids the torch-Adam bugs
    assert needed_patches(_backends(cuda=True, te=False, apex=True)) == te_fallbacks
    # CPU: everything this Megatron-Core release needs
    assert needed_patches(_backends(cuda=False, te=False, apex=False)) == \
        [p.name for p in PATCHES
         if p.name != "patch_moe_te_gemm_placeholder" or not MOE_UTILS_BINDS_TE_GEMM]
    assert len({p.name for p in PATCHES}) == len(PATCHES)
    assert all(p.name == p.apply.__name__ for p in PATCHES)


# What the registry's conditions mean, as each patch module's docstring must say it.
_APPLIES_WHEN = {"_no_cuda": "Applies when: no CUDA",
                 "_no_te": "Applies when: no Transformer Engine",
                 "_no_te_and_moe_utils_unbound": "Applies when: no Transformer Engine",
                 "_no_fused_adam": "Applies when: no fused Adam"}


def test_patch_modules_documented_and_registered() -> None:
    # One module per patch, each in the registry exactly once, each docstring naming the
    # Megatron-Core call that fails, its error, when the patch applies and when to drop it.
    import importlib
    import pkgutil
    from collections import Counter

    from mm1_megatron.runtime import cpu_compat

    package = cpu_compat.__name__
    modules = sorted(m.name for m in pkgutil.iter_modules(cpu_compat.__path__)
                     if not m.name.startswith("_"))
    registered = Counter(p.apply.__module__ for p in PATCHES)
    assert sorted(registered) == [f"{package}.{m}" for m in modules], (registered, modules)
    assert set(registered.values()) == {1}, registered
    for patch in PATCHES:
        module = importlib.import_module(patch.apply.__module__)
        assert patch.name == "patch_" + module.__name__.rpartition(".")[2], patch.name
        assert getattr(module, patch.name) is patch.apply is getattr(cpu_compat, patch.name)
        doc = module.__doc__ or ""
        for phrase in ("Breaks (Megatron-Core 0.16.1): ", "Error: ",
                       _APPLIES_WHEN[patch.condition.__name__], "Redirect: ", "Drop when: "):
            assert phrase in doc, f"{module.__name__} docstring lacks {phrase!r}"
        breaks = doc.split("Breaks (Megatron-Core 0.16.1): ", 1)[1].split("Error: ", 1)[0]
        assert "``" in breaks, f"{module.__name__}: name the failing Megatron-Core call"


# ---------------------------------------------------------------------------------------------
# Backend detection (it decides which patches apply)
# ---------------------------------------------------------------------------------------------


def case_detect_backends() -> dict:
    from megatron.core.models.gpt import gpt_layer_specs

    from mm1_megatron.runtime.backends import describe_backends, detect_backends

    b = detect_backends()
    return {"apex": b.apex, "apex_fused_adam": b.apex_fused_adam, "stray_apex": b.stray_apex,
            "megatron_have_apex": gpt_layer_specs.HAVE_APEX,
            "line": describe_backends("fp32", None)}


@pytest.mark.skipif(detect_backends().apex,
                    reason="apex is importable already; an extra folder changes nothing")
def test_stray_apex_folder_is_detected_like_megatron(tmp_path: Path) -> None:
    # Any folder named `apex` on sys.path makes `import apex` work: Megatron-Core's layer
    # specs then pick apex norms. Detection must see what Megatron-Core sees, and say so.
    (tmp_path / "apex").mkdir()
    (r,) = run_ranks(__file__, "case_detect_backends", env={"PYTHONPATH": str(tmp_path)})
    assert r["megatron_have_apex"] and r["apex"] and not r["apex_fused_adam"]
    assert r["stray_apex"] and "folder named 'apex'" in r["line"]


def test_describe_backends_gpu() -> None:
    from mm1_megatron.runtime.backends import describe_backends

    line = describe_backends("bf16", "hybrid", _backends(cuda=True, te=True, apex=True))
    assert "\n" not in line
    assert "Transformer Engine spec (TE 2.8.0)" in line and "comm=nccl" in line
    assert "precision=bf16 + fp8 hybrid" in line and "sm_90" in line
    no_fp8 = _backends(cuda=True, te=True, apex=True)
    no_fp8 = Backends(**{**no_fp8.__dict__, "compute_capability": (8, 0), "fp8_capable": False})
    assert "UNAVAILABLE" in describe_backends("bf16", "e4m3", no_fp8)
    no_te = _backends(cuda=True, te=False, apex=True)  # Hopper, but no Transformer Engine
    assert no_te.fp8_capable and not no_te.fp8_available
    assert "UNAVAILABLE" in describe_backends("bf16", "hybrid", no_te)
    assert "local spec (apex norms, no TE)" in describe_backends("bf16", None, no_te)


def test_describe_backends_cpu() -> None:
    from mm1_megatron.runtime.backends import describe_backends

    line = describe_backends("fp32", None, _backends(cuda=False, te=False, apex=False))
    assert "Megatron-Core local spec (torch norms, no TE)" in line
    assert "comm=gloo" in line and "precision=fp32 |" in line and "device=cpu" in line
    assert "WARNING" not in line

"""The device audit: "the GPU" becomes the meta device, so any tensor our code leaves on the
host meets the model's meta tensors and raises, as it would on an H100 (where the host-side
batch of our first version crashed step 1). A training step, a batched generation of mm1-eval
and the converter's Megatron-side forward run under it; leaving the batch or the model
behind is caught.

Dense decoders: Megatron-Core's MoE token permutation sizes its outputs from the routing
(`masked_select`), which has no meta kernel.
"""

from pathlib import Path

import pytest

from tests._procs import run_ranks

pytestmark = pytest.mark.mcore

DENSE = ["llm.moe.num_experts=0"]


def case_training_step() -> dict:
    import torch

    from mm1_megatron.config import load_config
    from mm1_megatron.runtime import device_audit, init_distributed
    from mm1_megatron.train.step import build_model, build_optimizer, train_step
    from tests._helpers.parity import BASE, microbatches, synthetic_rows

    cfg = load_config("tiny", BASE + DENSE)
    init_distributed(cfg.parallel, seed=0)
    out: dict = {}
    with device_audit():
        model = build_model(cfg, use_te=False)
        optimizer, scheduler = build_optimizer(cfg, model)
        out["param_devices"] = sorted({p.device.type for p in model[0].parameters()})
        out["buffer_devices"] = sorted({b.device.type for b in model[0].module.buffers()})
        results = [train_step(cfg, model, optimizer, scheduler,
                              microbatches(cfg, synthetic_rows(cfg, step, 4)))
                   for step in range(2)]  # step 1 is text only, step 2 has images
        out["steps"] = [not r.skipped for r in results]
        # What the audit is for: the step as our first version ran it, with the batch left
        # on the host, fails here as it failed on the first H100.
        from mm1_megatron.train import step as step_module

        moving = step_module.to_device
        step_module.to_device = lambda batch: batch
        try:
            train_step(cfg, model, optimizer, scheduler,
                       microbatches(cfg, synthetic_rows(cfg, 2, 4)))
            out["host_batch"] = "ran"
        except RuntimeError as err:
            out["host_batch"] = str(err)
        finally:
            step_module.to_device = moving
    # And a model left on the host does not meet a batch on the device.
    with device_audit():
        from mm1_megatron.model.builder import build_mm1_model
        from mm1_megatron.runtime import to_device

        host_model = build_mm1_model(cfg, use_te=False)
        batch = to_device(microbatches(cfg, synthetic_rows(cfg, 2, 4))[0])
        try:
            host_model(batch["tokens"], batch["position_ids"], images=batch["images"],
                       labels=batch["labels"], document_ids=batch["document_ids"])
            out["host_model"] = "ran"
        except RuntimeError as err:
            out["host_model"] = str(err)
    out["after"] = str(torch.zeros(1, device="cuda").device)  # the audit ended: the host again
    return out


def case_eval_generation(data: str) -> dict:
    import torch

    from mm1_megatron.config import load_config, single_process_config
    from mm1_megatron.data.tokenizer import Tokenizer
    from mm1_megatron.evaluation.generate import Generator
    from mm1_megatron.evaluation.model_io import build_eval_model
    from mm1_megatron.runtime import apply_cpu_compat, device_audit

    apply_cpu_compat()
    cfg = single_process_config(load_config("demo", [f"data.path={data}",
                                                     f"data.tokenizer_model={data}/tokenizer.model",
                                                     *DENSE]))
    tokenizer = Tokenizer.load(cfg.data.tokenizer_model)
    k, size = cfg.connector.num_tokens, cfg.vision.image_size
    image = [cfg.llm.image_token_id] * k
    prompts = [[1, *image, 30, 31, 32], [1, 40, *image, 41, *image, 42, 43, 44]]  # 3 images
    with device_audit():
        model = build_eval_model(cfg)
        generation = Generator(model, tokenizer, max_new_tokens=3).generate(
            prompts, torch.randn(3, 3, size, size))
        device = next(model.parameters()).device.type
    return {"device": device, "rows": len(generation.tokens),
            "reasons": generation.stop_reasons}


def case_converter_forward(run_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import model_sharded_state
    from mm1_megatron.config import load_config
    from mm1_megatron.convert.verify import (megatron_greedy, megatron_logits, megatron_model,
                                             probe, reference_config)
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import device_audit, init_distributed

    cfg = load_config("tiny", DENSE)
    init_distributed(reference_config(cfg).parallel, seed=0, environ={})
    ckpt = Path(run_dir) / "step_00000000"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save({"model": model_sharded_state([build_mm1_model(
        reference_config(cfg), use_te=False)])}, str(ckpt))
    with device_audit():
        model = megatron_model(ckpt, cfg)
        ids, pixels = probe(cfg, images=True)
        logits = megatron_logits(model, ids, pixels)
        greedy = megatron_greedy(model, ids, pixels, 2, [2])
        device = next(model.parameters()).device.type
    return {"device": device, "logits": [str(logits.device), list(logits.shape)],
            "ids": list(ids.shape), "greedy": len(greedy)}


def test_training_step_runs_on_the_device_and_host_leftovers_raise():
    (r,) = run_ranks(__file__, "case_training_step", timeout=300)
    assert r["param_devices"] == ["meta"] and r["buffer_devices"] in ([], ["meta"])
    assert r["steps"] == [True, True]  # forward, backward, DDP reduction, optimizer step
    assert "is not on the expected device meta" in r["host_batch"]
    assert "device" in r["host_model"] and r["host_model"] != "ran"
    assert r["after"] == "cpu"


def test_mm1_eval_batched_generation_runs_on_the_device(demo_data):
    (r,) = run_ranks(__file__, "case_eval_generation", timeout=300,
                     kwargs={"data": str(demo_data)})
    assert r["device"] == "meta" and r["rows"] == 2 and len(r["reasons"]) == 2


def test_converter_reference_runs_on_the_device(tmp_path):
    (r,) = run_ranks(__file__, "case_converter_forward", timeout=300,
                     kwargs={"run_dir": str(tmp_path)})
    assert r["device"] == "meta"
    assert r["logits"][0] == "cpu" and r["logits"][1][:2] == r["ids"]  # logits back on host
    assert r["greedy"] == 2


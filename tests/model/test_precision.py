"""bf16 end to end: every connector trains on micro-batches with 0, 1 and 16 images, with the
loss within 2e-2 (relative) of the same run in fp32. (Before the whole model was cast to the
run's dtype, a text-only micro-batch crashed in the patch convolution: fp32 weights, bf16
input.)"""

import pytest

from tests._procs import run_ranks

pytestmark = pytest.mark.mcore

IMAGES_PER_MICROBATCH = (0, 1, 16)
STEPS = 3


def _rows(cfg, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    s, k, size = cfg.data.seq_length, cfg.connector.num_tokens, cfg.vision.image_size
    rows = []
    for n in IMAGES_PER_MICROBATCH:
        tokens = torch.randint(10, cfg.llm.vocab_size, (s,), generator=g)
        tokens[2:2 + n * k] = cfg.llm.image_token_id  # consecutive images, then text
        labels = torch.roll(tokens, -1)
        loss_mask = ((tokens != cfg.llm.image_token_id)
                     & (labels != cfg.llm.image_token_id)).float()
        rows.append(dict(tokens=tokens.unsqueeze(0), labels=labels.unsqueeze(0),
                         loss_mask=loss_mask.unsqueeze(0),
                         position_ids=torch.arange(s).unsqueeze(0),
                         document_ids=torch.zeros(1, s, dtype=torch.long),
                         images=torch.randn(n, 3, size, size, generator=g)))
    return rows


def case_bf16_vs_fp32() -> dict:
    import torch

    from mm1_megatron.config import load_config
    from mm1_megatron.runtime import init_distributed
    from mm1_megatron.train.step import build_model, build_optimizer, train_step

    out: dict = {}
    started = False
    variants = [(c, p, True) for c in ("c_abstractor", "avg_pool", "attn_pool")
                for p in ("fp32", "bf16")] + [("c_abstractor", "bf16", False)]
    for connector, precision, fp32_grads in variants:
        cfg = load_config("tiny", [f"connector.type={connector}",
                                   f"train.precision={precision}", "data.seq_length=256",
                                   f"train.grad_reduce_in_fp32={fp32_grads}",
                                   "data.max_images_per_sequence=16",
                                   "train.micro_batch_size=1", "train.global_batch_size=3",
                                   "train.lr=1e-3", "train.warmup_steps=0"])
        if not started:
            init_distributed(cfg.parallel, seed=0)
            started = True
        torch.manual_seed(0)
        model = build_model(cfg, use_te=False)
        optimizer, scheduler = build_optimizer(cfg, model)
        dtypes = {str(p.dtype) for p in model[0].module.parameters()}
        # Megatron DDP's gradient buffer, as train.grad_reduce_in_fp32 asks
        grad_dtypes = {str(p.main_grad.dtype) for p in model[0].module.parameters()}
        # The same micro-batches every step: the loss must fall as the model fits them.
        losses = [train_step(cfg, model, optimizer, scheduler, _rows(cfg, 0)).loss
                  for _ in range(STEPS)]
        name = f"{connector}/{precision}" + ("" if fp32_grads else "/bf16-grads")
        out[name] = {"losses": losses, "dtypes": sorted(dtypes),
                     "grad_dtypes": sorted(grad_dtypes)}
    return out


@pytest.fixture(scope="module")
def runs():
    (result,) = run_ranks(__file__, "case_bf16_vs_fp32", timeout=600)
    return result


@pytest.mark.parametrize("connector", ["c_abstractor", "avg_pool", "attn_pool"])
def test_bf16_trains_every_connector_close_to_fp32(runs, connector):
    fp32, bf16 = runs[f"{connector}/fp32"], runs[f"{connector}/bf16"]
    assert bf16["dtypes"] == ["torch.bfloat16"]  # every parameter, the connector's included
    assert fp32["dtypes"] == ["torch.float32"]
    for step, (a, b) in enumerate(zip(fp32["losses"], bf16["losses"]), start=1):
        assert abs(b - a) <= 2e-2 * abs(a), f"step {step}: bf16 {b} vs fp32 {a}"
    assert bf16["losses"][-1] < bf16["losses"][0]  # and it learns


def test_bf16_gradient_buffer_when_grad_reduce_in_fp32_is_off(runs):
    """train.grad_reduce_in_fp32=false: Megatron DDP accumulates and reduces gradients in bf16
    (2 bytes per parameter less, as the planner counts) and training stays close to fp32."""
    fp32, bf16, bf16_grads = (runs["c_abstractor/fp32"], runs["c_abstractor/bf16"],
                              runs["c_abstractor/bf16/bf16-grads"])
    assert bf16["grad_dtypes"] == ["torch.float32"]  # the default: fp32 main grads
    assert bf16_grads["grad_dtypes"] == ["torch.bfloat16"]
    for a, b in zip(fp32["losses"], bf16_grads["losses"]):
        assert abs(b - a) <= 2e-2 * abs(a)
    assert bf16_grads["losses"][-1] < bf16_grads["losses"][0]

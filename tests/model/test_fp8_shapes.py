"""FP8 shape audit: every GEMM that runs in FP8 under `train.fp8=hybrid` meets Transformer
Engine's divisibility rule (its `assert_dim_for_fp8_exec`: the input's leading dims multiply
to a multiple of 8, its last dim and the weight's input dim are multiples of 16, the weight's
output dim a multiple of 8), on an mm1-30b-shaped model (two layers of each tower, at the
preset's TP size) with 0 to 16 images per micro-batch.

TE is absent here, so the model uses the local layer spec on the meta device (a device audit:
shapes only); the layers that would run in FP8 are the decoder's transformer layers, whose
Megatron-Core config carries `fp8`. The ViT's GEMMs see 730 x images rows: with the encoder in
FP8, 1-3 images per micro-batch (any count not a multiple of 4) would assert on the first H100
step, so the encoder stays out of FP8; the check below shows both.
"""

import pytest

from tests._procs import run_ranks

pytestmark = pytest.mark.mcore

IMAGE_COUNTS = (0, 1, 2, 3, 4, 5, 16)


def _violations(records: list[tuple[str, list[int], list[int], str, int]]) -> list[str]:
    """Records of a tp=1 model, checked as the tp-way shards TE would see."""
    bad = []
    for name, inp, weight, kind, tp in records:
        rows = 1
        for d in inp[:-1]:
            rows *= d
        out_dim, in_dim = weight
        # TP splits the output dim of a column-parallel GEMM, the input dim of a row-parallel.
        local_out = out_dim // tp if kind == "column" else out_dim
        local_in = in_dim // tp if kind == "row" else in_dim
        if rows % 8 or local_in % 16 or local_out % 8:
            bad.append(f"{name}: {rows} rows x {local_in} -> {local_out} ({kind}-parallel, "
                       f"tp={tp})")
    return bad


def case_fp8_shapes() -> dict:
    import torch
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from mm1_megatron.config import get_preset, set_field
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import device_audit, init_distributed

    cfg = get_preset("mm1-30b")
    tp = cfg.parallel.tp
    assert cfg.train.fp8 == "hybrid"
    # Two layers per tower, the whole model in this one process (shapes scale with tp below).
    for key, value in (("parallel.tp", 1), ("parallel.pp", 1), ("parallel.first_stage_layers", None),
                       ("parallel.sequence_parallel", False), ("parallel.tp_comm_overlap", False),
                       ("llm.num_layers", 2), ("vision.num_layers", 2), ("llm.recompute", "none"),
                       ("vision.recompute", "none")):
        set_field(cfg, key, value)
    init_distributed(cfg.parallel, seed=0, environ={})
    out: dict = {"decoder": {}, "vision_if_fp8": {}, "seen": 0}
    with device_audit(), torch.device("meta"):
        model = build_mm1_model(cfg, use_te=False)
        towers = {"decoder": model.language_model.decoder, "vision": model.vision.decoder}
        out["fp8"] = {name: tower.config.fp8 for name, tower in towers.items()}
        records: dict[str, list] = {"decoder": [], "vision": []}

        def hook(tower: str, name: str, kind: str):
            def record(module, args):
                records[tower].append((name, list(args[0].shape), list(module.weight.shape),
                                       kind, tp))
            return record

        for tower, block in towers.items():
            for name, module in block.named_modules():
                kind = ("column" if isinstance(module, ColumnParallelLinear) else
                        "row" if isinstance(module, RowParallelLinear) else None)
                if kind:
                    module.register_forward_pre_hook(hook(tower, f"{tower}.{name}", kind))
        s, k, size = cfg.data.seq_length, cfg.connector.num_tokens, cfg.vision.image_size
        for n in IMAGE_COUNTS:
            records["decoder"].clear()
            records["vision"].clear()
            ids = torch.full((cfg.train.micro_batch_size, s), 7)
            ids[0, 1:1 + n * k] = cfg.llm.image_token_id
            model(ids, torch.arange(s).unsqueeze(0), images=torch.zeros(n, 3, size, size),
                  document_ids=torch.zeros_like(ids))
            out["seen"] += len(records["decoder"])
            out["decoder"][n] = _violations(records["decoder"])
            out["vision_if_fp8"][n] = _violations(records["vision"])
    return out


def test_every_fp8_gemm_meets_te_divisibility_with_0_to_16_images():
    (r,) = run_ranks(__file__, "case_fp8_shapes", timeout=300)
    assert r["fp8"] == {"decoder": "hybrid", "vision": None}  # the encoder never runs FP8
    assert r["seen"] >= 4 * len(IMAGE_COUNTS)  # qkv, proj, fc1, fc2 of every decoder layer
    assert all(v == [] for v in r["decoder"].values()), r["decoder"]
    # What FP8 in the encoder would do: 730 x n rows, refused unless n % 4 == 0 (n = 0 runs a
    # blank image, one 730-row batch).
    for n, bad in r["vision_if_fp8"].items():
        assert bool(bad) == (int(n) % 4 != 0 or int(n) == 0), (n, bad)

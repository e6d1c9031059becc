"""One reader per tensor x pipeline group: the first stage's TP rank 0 reads, tokenizes and
decodes; its peers plan the same rows (same loader state) but read nothing, and receive
identical micro-batches (images on the first stage only). Tiled images (vision.tiling=sphinx:
five sub-images each) travel the same way."""

from __future__ import annotations

import pytest

from tests._procs import run_ranks

pytestmark = pytest.mark.multirank


def _digest(tensor) -> str:
    import hashlib

    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def case_share_batches(data: str) -> dict:
    import itertools

    from megatron.core import parallel_state as ps

    from mm1_megatron.config import load_config
    from mm1_megatron.data.loader import MultimodalLoader
    from mm1_megatron.runtime import init_distributed
    from mm1_megatron.train.step import reads_data, share_batches, share_images

    cfg = load_config("demo", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               "parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true",
                               "train.micro_batch_size=1", "vision.tiling=sphinx",
                               "data.prefetch=0"])
    init_distributed(cfg.parallel, seed=0)
    reader = reads_data()
    loader = MultimodalLoader(cfg, ps.get_data_parallel_rank(),
                              ps.get_data_parallel_world_size(), log=None,
                              decode_images=reader, build_rows=reader)
    reads = []
    for ds in loader.datasets:
        if ds is not None:
            ds.read = lambda *a, _read=ds.read, **k: reads.append(a) or _read(*a, **k)
    steps = []
    pairs = iter(loader)
    for _ in range(2):
        got = list(itertools.islice(pairs, 4))
        batches = share_batches([batch for batch, _ in got])
        share_images(cfg, batches)
        steps.append({
            "state": got[-1][1].to_dict(),
            "fields": [{k: _digest(b[k]) for k in ("tokens", "labels", "loss_mask",
                                                   "document_ids", "sources", "cu_seqlens",
                                                   "position_ids", "image_ok", "image_rows",
                                                   "image_documents")}
                       | {"max_seqlen": b["max_seqlen"],
                          "images": None if b["images"] is None else _digest(b["images"]),
                          "sub_images": None if b["images"] is None or not b["image_ok"].numel()
                          else b["images"].shape[0] / b["image_ok"].numel()}
                       for b in batches]})
    return {"reader": reader, "first_stage": ps.is_pipeline_first_stage(),
            "reads": len(reads), "steps": steps}


def test_one_reader_per_tp_pp_group_and_identical_batches(demo_data):
    ranks = run_ranks(__file__, "case_share_batches", nprocs=4, timeout=300,
                      kwargs={"data": str(demo_data)})
    readers = [r for r in ranks if r["reader"]]
    assert len(readers) == 1 and readers[0]["reads"] > 0
    assert all(r["reads"] == 0 for r in ranks if not r["reader"])
    reference = readers[0]["steps"]
    assert any(f["images"] for step in reference for f in step["fields"])
    assert {f["sub_images"] for step in reference for f in step["fields"]} - {None} == {5.0}
    for r in ranks:
        for got, want in zip(r["steps"], reference):
            assert got["state"] == want["state"]  # every rank planned the same rows
            for g, w in zip(got["fields"], want["fields"]):
                assert {k: v for k, v in g.items() if k not in ("images", "sub_images")} == \
                    {k: v for k, v in w.items() if k not in ("images", "sub_images")}
                # Images reach the first stage's TP peer; later stages never hold them.
                assert g["images"] == (w["images"] if r["first_stage"] else None)

"""Packed rows as THD segments (what the Transformer Engine path feeds its fused attention):
attention computed segment by segment over the `cu_seqlens` the loader builds equals the
dense document mask the local spec uses; the decoder's TE-path arguments carry them."""

import sys

import pytest
import torch

from mm1_megatron.data.packing import PAD_DOCUMENT, segment_boundaries
from mm1_megatron.model.mm1 import document_attention_mask
from tests._procs import run_ranks

pytestmark = pytest.mark.mcore


def packed_rows(seed: int, b: int = 4, s: int = 48) -> torch.Tensor:
    """Document ids of random packed rows: one-token documents, padding at the end, and a
    row filled by one document."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(b):
        if r == 0:
            rows.append(torch.zeros(s, dtype=torch.long))  # one document fills the row
            continue
        ids, doc = [], 0
        while len(ids) < s:
            length = int(torch.randint(1, 9, (1,), generator=g)) if r % 2 else 1
            ids += [doc] * length
            doc += 1
        row = torch.tensor(ids[:s])
        pad = int(torch.randint(0, s // 3, (1,), generator=g))
        if pad:
            row[-pad:] = PAD_DOCUMENT
        rows.append(row)
    return torch.stack(rows)


def segment_attention(q, k, v, cu_seqlens):
    """Causal attention inside each [start, end) segment of the flattened tokens."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) / q.shape[-1] ** 0.5
        causal = torch.ones(end - start, end - start, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
    return out


def dense_attention(q, k, v, document_ids):
    b, s = document_ids.shape
    blocked = document_attention_mask(document_ids)  # [b, 1, s, s]
    q, k, v = (t.reshape(b, s, *t.shape[1:]) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(blocked, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b * s, *q.shape[2:])


@pytest.mark.parametrize("seed", range(5))
def test_segment_attention_over_cu_seqlens_equals_the_dense_document_mask(seed):
    docs = packed_rows(seed)
    cu_seqlens, max_seqlen = segment_boundaries(docs)
    b, s = docs.shape
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens[0] == 0 and cu_seqlens[-1] == b * s
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    assert min(lengths) >= 1 and max(lengths) == max_seqlen
    assert s in lengths  # the row one document fills is one segment
    assert set(cu_seqlens.tolist()) >= {r * s for r in range(b)}  # every row starts one
    g = torch.Generator().manual_seed(100 + seed)
    q, k, v = (torch.randn(b * s, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = segment_attention(q, k, v, cu_seqlens)
    want = dense_attention(q, k, v, docs)
    assert (got - want).abs().max() <= 1e-6


def case_te_path_arguments() -> dict:
    from mm1_megatron.config import load_config
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import init_distributed

    cfg = load_config("tiny", [])
    init_distributed(cfg.parallel, seed=0)
    model = build_mm1_model(cfg, use_te=False)
    b, s = 2, cfg.data.seq_length
    docs = packed_rows(7, b, s)
    cu_seqlens, max_seqlen = segment_boundaries(docs)
    ids = torch.randint(10, cfg.llm.vocab_size, (b, s))
    positions = torch.arange(s).expand(b, -1)
    local = model.language_inputs(ids, positions, labels=ids, document_ids=docs,
                                  cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    model.packed_sequences = True  # what use_te=True sets: the TE path's arguments
    te = model.language_inputs(ids, positions, labels=ids, document_ids=docs,
                               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    params = te["packed_seq_params"]
    return {
        "te_imported": "transformer_engine" in sys.modules,
        "local_mask": list(local["attention_mask"].shape), "local_packed": "packed_seq_params"
        in local,
        "te_mask": te["attention_mask"] is None, "format": params.qkv_format,
        "cu_q": params.cu_seqlens_q.tolist(), "cu_kv": params.cu_seqlens_kv.tolist(),
        "max": [params.max_seqlen_q, params.max_seqlen_kv], "cu": cu_seqlens.tolist(),
        "max_seqlen": max_seqlen, "input": list(te["decoder_input"].shape),
        "ids": list(te["input_ids"].shape), "labels": list(te["labels"].shape),
        "rows_in_order": bool(torch.equal(
            te["decoder_input"][s:2 * s, 0], local["decoder_input"][:, 1])),
        "b": b, "s": s, "hidden": cfg.llm.hidden_size,
    }


def test_te_path_hands_the_decoder_thd_segments_and_no_mask():
    (r,) = run_ranks(__file__, "case_te_path_arguments", timeout=300)
    b, s = r["b"], r["s"]
    assert not r["te_imported"]  # built without Transformer Engine
    assert r["local_mask"] == [b, 1, s, s] and not r["local_packed"]  # local spec: dense mask
    assert r["te_mask"] and r["format"] == "thd"
    assert r["cu_q"] == r["cu_kv"] == r["cu"] and r["max"] == [r["max_seqlen"]] * 2
    assert r["input"] == [b * s, 1, r["hidden"]] and r["ids"] == r["labels"] == [1, b * s]
    assert r["rows_in_order"]  # row 1's embeddings follow row 0's

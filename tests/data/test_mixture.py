"""Mixture proportions and exact resume of the global row stream, also across DP sizes."""

import itertools

import pytest

from mm1_megatron.data.mixture import (LoaderState, MixtureSampler, RowStream, SourceRowStream,
                                       rank_rows, row_stream)
from mm1_megatron.data.packing import IMAGE, Document, Packer
from tests import _procs

UNITS = ["sequences", "documents"]

SIZES = [40, 60, 25]  # interleaved, caption, text
WEIGHTS = [0.45, 0.45, 0.10]


def read(source: int, epoch: int, index: int, doc_id: int):
    """Synthetic documents: interleaved 1-3 images, caption 1 image, text sometimes > a row."""
    if source == 0 and index == 7:
        return None  # a bad sample: skipped and counted
    length = 5 + (index * 37 + source * 11) % 60
    if source == 2 and index % 5 == 0:
        length = 150  # longer than a row: split
    images = [1 + index % 3, 1, 0][source]
    tokens = [IMAGE] * images + [1000 * source + (index + i) % 900 for i in range(length)]
    payloads = [(source, epoch, index, i) for i in range(images)]
    return Document(doc_id, source, tokens, payloads)


def stream(start=None, unit="documents") -> RowStream | SourceRowStream:
    return row_stream(unit, SIZES, WEIGHTS, 3,
                      lambda: Packer(seq_length=96, tokens_per_image=8, max_images=4,
                                     image_token_id=3),
                      read, start)


def signature(row) -> tuple:
    return tuple(row.tokens.tolist()), tuple(row.images), tuple(row.doc_ids)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_mixture_proportions():
    sampler = MixtureSampler([1000, 1000, 1000], WEIGHTS, seed=0)
    draws = [sampler.draw()[0] for _ in range(4000)]
    for source, weight in enumerate(WEIGHTS):
        assert abs(draws.count(source) / 4000 - weight) < 0.005
    # Exact at every prefix: within one document of the target.
    counts = [0, 0, 0]
    for i, s in enumerate(draws[:500], 1):
        counts[s] += 1
        assert all(abs(c - w * i) <= 1 for c, w in zip(counts, WEIGHTS))


def test_epochs_visit_every_sample_once():
    sampler = MixtureSampler([7, 0, 0], [1.0, 1.0, 1.0], seed=5)  # empty sources get no share
    first = [sampler.draw() for _ in range(14)]
    assert {s for s, _, _ in first} == {0}
    assert sorted(i for _, e, i in first if e == 0) == list(range(7))
    assert sorted(i for _, e, i in first if e == 1) == list(range(7))
    assert [i for _, e, i in first if e == 0] != [i for _, e, i in first if e == 1]


@pytest.mark.parametrize("unit", UNITS)
def test_resume_is_exact(unit):
    full = [signature(r) for r, _ in take(iter(stream(unit=unit)), 60)]
    first = take(iter(stream(unit=unit)), 23)
    state = LoaderState.from_dict(first[-1][1].to_dict())  # through a checkpoint's dict
    rest = [signature(r) for r, _ in take(iter(stream(state, unit)), 37)]
    assert [signature(r) for r, _ in first] + rest == full


@pytest.mark.parametrize("unit", UNITS)
def test_a_position_saved_before_the_sft_source_existed_resumes(unit):
    """Checkpoints from before `sft` joined the sources hold three per-source entries; with a
    fourth, empty, zero-weight source the stream resumes with the same rows (tokens and
    images; document ids, unique per source count, are numbered anew)."""
    def signature(row) -> tuple:
        return tuple(row.tokens.tolist()), tuple(row.images)

    def four(start=None):
        return row_stream(unit, SIZES + [0], WEIGHTS + [0.0], 3,
                          lambda: Packer(seq_length=96, tokens_per_image=8, max_images=4,
                                         image_token_id=3), read, start)

    full = [signature(r) for r, _ in take(iter(four()), 40)]
    assert full == [signature(r) for r, _ in take(iter(stream(unit=unit)), 40)]
    old = take(iter(stream(unit=unit)), 17)[-1][1].to_dict()  # a three-source position
    rest = [signature(r) for r, _ in take(iter(four(LoaderState.from_dict(old))), 23)]
    assert rest == full[17:]


@pytest.mark.parametrize("unit", UNITS)
def test_resume_from_dp2_on_dp1_and_dp3(unit):
    def stream(start=None):
        return globals()["stream"](start, unit)

    full = [signature(r) for r, _ in take(iter(stream()), 48)]
    # DP=2 for 5 steps of 2 rows per rank: each rank sees its rows, states agree at the end.
    ranks = [take(rank_rows(stream(), r, 2), 10) for r in range(2)]
    assert ranks[0][-1][1].to_dict() == ranks[1][-1][1].to_dict()
    assert ranks[0][-1][1].rows == 20
    seen = [signature(row) for pair in zip(*ranks) for row, _ in pair]
    assert seen == full[:20]
    state = ranks[1][-1][1]
    on_dp1 = [signature(r) for r, _ in take(rank_rows(stream(state), 0, 1), 28)]
    assert on_dp1 == full[20:48]
    on_dp3 = [take(rank_rows(stream(state), r, 3), 4) for r in range(3)]
    interleaved = [signature(row) for triple in zip(*on_dp3) for row, _ in triple]
    assert interleaved == full[20:32]


def test_no_document_repeated_or_lost_and_bad_ones_counted():
    s = stream()
    docs = [d for row, _ in take(iter(s), 100) for d in row.doc_ids]  # > an epoch of source 0
    # Document ids are draw numbers: in order, a split document's chunks adjacent.
    assert docs == sorted(docs)
    distinct = sorted(set(docs))
    missing = set(range(distinct[0], distinct[-1] + 1)) - set(distinct)
    assert len(missing) == s.skipped_documents >= 1  # bad samples leave exactly their gap


def test_sequences_rows_hold_one_source_in_the_mixture_share():
    """`sequences`: each row packs one source; row shares are within one row of 45/45/10 at
    every prefix; every source still visits each of its documents once per epoch."""
    s = stream(unit="sequences")
    rows = [row for row, _ in take(iter(s), 200)]
    counts = [0, 0, 0]
    for i, row in enumerate(rows, 1):
        sources = set(row.sources.tolist()) - {-1}
        assert len(sources) == 1
        counts[sources.pop()] += 1
        assert all(abs(c - w * i) <= 1 for c, w in zip(counts, WEIGHTS))
    # Per source, ids are draw number * 3 + source: in order, gaps only for bad samples.
    for source, size in enumerate(SIZES):
        drawn = sorted({d // 3 for row in rows for d in row.doc_ids if d % 3 == source})
        assert drawn == sorted(drawn)
        missing = set(range(drawn[-1] + 1)) - set(drawn)
        assert len(missing) == (s.streams[source].skipped_documents if source == 0 else 0)
    assert s.skipped_documents >= 1


def test_documents_mode_mixes_sources_within_rows():
    rows = [row for row, _ in take(iter(stream(unit="documents")), 40)]
    assert any(len(set(row.sources.tolist()) - {-1}) > 1 for row in rows)


def test_a_position_of_one_unit_does_not_resume_the_other():
    _, state = take(iter(stream(unit="documents")), 5)[-1]
    with pytest.raises(ValueError, match="per documents"):
        stream(LoaderState.from_dict(state.to_dict()), "sequences")
    _, state = take(iter(stream(unit="sequences")), 5)[-1]
    with pytest.raises(ValueError, match="per sequences"):
        stream(LoaderState.from_dict(state.to_dict()), "documents")
    # A checkpoint from before data.mixture_unit: per documents.
    old = {"rows": 3, "snapshot": None, "counters": {}}
    assert LoaderState.from_dict(old).unit == "documents"


@pytest.mark.parametrize("bad", [{"rows": 3}, {}])
def test_state_dict_shape(bad):
    with pytest.raises(KeyError):
        LoaderState.from_dict(bad)


def test_shares_tool_reports_what_each_unit_realises():
    """tools/mixture_shares.py on its realistic-length corpus: per-sequence mixing gives
    45/45/10 of the rows; per-document mixing leaves short captions far fewer rows."""
    import json
    import sys
    from pathlib import Path

    tool = Path(__file__).parents[2] / "tools" / "mixture_shares.py"
    out = _procs.run([sys.executable, str(tool), "--synthetic", "--rows", "120"],
                     capture_output=True, text=True, timeout=300, check=True).stdout
    shares = json.loads(out.strip().splitlines()[-1])
    for got, want in zip(shares["sequences"]["rows"], WEIGHTS):
        assert abs(got - want) <= 1 / 120 + 1e-4
    assert shares["documents"]["documents"][1] == pytest.approx(0.45, abs=0.02)
    assert shares["documents"]["rows"][1] < 0.25  # captions: ~170 of 4096 positions each

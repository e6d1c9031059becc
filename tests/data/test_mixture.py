"""Mixture proportions and exact resume of the global row stream, also across DP sizes."""

import itertools

import pytest

from mm1_megatron.data.mixture import (LoaderState, MixtureSampler, RowStream, rank_rows)
from mm1_megatron.data.packing import IMAGE, Document, Packer

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


def stream(start=None) -> RowStream:
    return RowStream(MixtureSampler(SIZES, WEIGHTS, seed=3),
                     Packer(seq_length=96, tokens_per_image=8, max_images=4, image_token_id=3),
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


def test_resume_is_exact():
    full = [signature(r) for r, _ in take(iter(stream()), 60)]
    first = take(iter(stream()), 23)
    state = LoaderState.from_dict(first[-1][1].to_dict())  # through a checkpoint's dict
    rest = [signature(r) for r, _ in take(iter(stream(state)), 37)]
    assert [signature(r) for r, _ in first] + rest == full


def test_resume_from_dp2_on_dp1_and_dp3():
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
    docs = [d for row, _ in take(iter(s), 40) for d in row.doc_ids]
    # Document ids are draw numbers: in order, a split document's chunks adjacent.
    assert docs == sorted(docs)
    distinct = sorted(set(docs))
    missing = set(range(distinct[0], distinct[-1] + 1)) - set(distinct)
    assert len(missing) == s.skipped_documents >= 1  # bad samples leave exactly their gap


@pytest.mark.parametrize("bad", [{"rows": 3}, {}])
def test_state_dict_shape(bad):
    with pytest.raises(KeyError):
        LoaderState.from_dict(bad)

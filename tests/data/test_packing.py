"""Packing: row length and image limits, masks, document boundaries, splitting, efficiency."""

import random

import pytest
import torch

from mm1_megatron.data.packing import IMAGE, PAD_DOCUMENT, Document, Packer

S, K, MAX_IMAGES, IMG_ID = 64, 6, 3, 3


def packer() -> Packer:
    return Packer(seq_length=S, tokens_per_image=K, max_images=MAX_IMAGES,
                  image_token_id=IMG_ID, pad_id=0)


def doc(doc_id: int, text: int, images: int = 0, source: int = 0) -> Document:
    """`images` images first (a caption pair when 1), then `text` text tokens."""
    tokens = [IMAGE] * images + [100 + doc_id * 10 + i % 10 for i in range(text)]
    return Document(doc_id, source, tokens, [f"img{doc_id}.{i}" for i in range(images)])


def test_caption_pair_masks_and_labels():
    row = packer().flush() or None
    assert row is None
    p = packer()
    (row,) = list(p.pack([doc(1, 5, images=1)]))
    assert row.tokens[:K].tolist() == [IMG_ID] * K
    assert row.tokens[K:K + 5].tolist() == [110, 111, 112, 113, 114]
    assert row.images == ["img1.0"]
    # Targets: placeholders carry no loss; the last placeholder predicts the first word.
    assert row.loss_mask[:K - 1].tolist() == [0.0] * (K - 1)
    assert row.loss_mask[K - 1] == 1.0 and row.labels[K - 1] == 110
    assert row.loss_mask[K:K + 4].tolist() == [1.0] * 4
    assert row.labels[K:K + 4].tolist() == [111, 112, 113, 114]
    assert row.loss_mask[K + 4] == 0.0  # last position of the document: no target
    assert (row.loss_mask[K + 5:] == 0).all() and (row.document_ids[K + 5:] == PAD_DOCUMENT).all()
    assert row.real_tokens == K + 5


def test_documents_in_a_row_are_separated():
    p = packer()
    rows = list(p.pack([doc(1, 10), doc(2, 10, images=1, source=1), doc(3, 10, source=2)]))
    assert len(rows) == 1
    row = rows[0]
    ids = row.document_ids.tolist()
    assert ids[:10] == [0] * 10 and ids[10:26] == [1] * 16 and ids[26:36] == [2] * 10
    assert row.sources[:10].tolist() == [0] * 10 and row.sources[26:36].tolist() == [2] * 10
    for end in (9, 25, 35):  # no prediction of the next document's first token
        assert row.loss_mask[end] == 0.0
    assert row.doc_ids == [1, 2, 3]


def test_row_limits_hold_for_random_documents():
    rng = random.Random(0)
    docs = [doc(i, rng.randint(1, 90), images=rng.randint(0, 5)) for i in range(300)]
    p = packer()
    rows = list(p.pack(docs))
    placed_images = 0
    for row in rows:
        n_images = int((row.tokens == IMG_ID).sum()) // K
        assert row.tokens.shape == (S,)
        assert n_images == len(row.images) <= MAX_IMAGES
        placed_images += n_images
        # Every image is a whole run of K placeholders inside one document.
        runs = (row.tokens == IMG_ID).int().tolist()
        assert sum(runs) % K == 0
        assert (row.loss_mask[row.labels == IMG_ID] == 0).all()
    assert placed_images + p.stats.images_dropped == sum(len(d.images) for d in docs)
    assert p.stats.rows == len(rows)


def test_long_document_is_split_without_cutting_an_image():
    p = packer()
    tokens = [1] * 60 + [IMAGE] + [2] * 10  # the image does not fit after 60 tokens
    rows = list(p.pack([Document(7, 0, tokens, ["x"])]))
    assert len(rows) == 2 and p.stats.chunks_split == 1
    assert rows[0].tokens[:60].tolist() == [1] * 60 and rows[0].images == []
    assert rows[1].tokens[:K].tolist() == [IMG_ID] * K and rows[1].images == ["x"]


def test_images_past_the_limit_are_dropped_from_the_tail():
    p = packer()
    tokens = [IMAGE, 5, IMAGE, 6, IMAGE, 7, IMAGE, 8, IMAGE, 9]  # 5 images, limit 3
    (row,) = list(p.pack([Document(1, 0, tokens, list("abcde"))]))
    assert row.images == ["a", "b", "c"] and p.stats.images_dropped == 2
    text = [t for t in row.tokens.tolist() if t not in (IMG_ID, 0)]
    assert text == [5, 6, 7, 8, 9]  # the text around dropped images stays


def test_marker_count_must_match_images():
    with pytest.raises(ValueError, match="2 image markers but 1 images"):
        Document(1, 0, [IMAGE, IMAGE], ["a"])


def test_packing_beats_one_document_per_row():
    rng = random.Random(1)
    docs = [doc(i, rng.randint(3, 20), images=rng.randint(0, 1)) for i in range(500)]
    p = packer()
    list(p.pack(docs))
    one_per_row = sum(len(c.tokens) + (K - 1) * len(c.images) for c in docs) / (S * len(docs))
    assert p.stats.one_per_row_efficiency(S) == pytest.approx(one_per_row)
    assert p.stats.efficiency > 0.85 > 3 * one_per_row


def test_one_image_must_fit_a_row():
    with pytest.raises(ValueError, match="does not fit a row"):
        Packer(seq_length=K, tokens_per_image=K, max_images=1, image_token_id=IMG_ID)


def test_rows_feed_the_model_mask():
    from mm1_megatron.model.mm1 import document_attention_mask

    (row,) = list(packer().pack([doc(1, 4), doc(2, 4)]))
    mask = document_attention_mask(row.document_ids.unsqueeze(0))[0, 0]
    assert not mask[5, 4] and mask[5, 3]  # doc 2 sees itself, not doc 1
    assert torch.equal(mask[:4, :4], ~torch.ones(4, 4, dtype=torch.bool).tril())


def _random_document(rng: random.Random, doc_id: int) -> tuple[Document, Document]:
    """The same document twice: with its tokens, and as the layout the token index stores
    (text runs of random length, images anywhere, sometimes longer than a row)."""
    runs = []
    for _ in range(rng.randint(1, 6)):
        runs.append(IMAGE if rng.random() < 0.4 else rng.choice([0, 1, 5, 30, 63, 64, 65, 150]))
    tokens = []
    for run in runs:
        tokens += [IMAGE] if run == IMAGE else [100 + (doc_id + i) % 50 for i in range(run)]
    payloads = [f"img{doc_id}.{j}" for j in range(runs.count(IMAGE))]
    return (Document(doc_id, 0, tokens, payloads),
            Document(doc_id, 0, None, payloads, layout=runs, origin=doc_id))


def test_planning_from_layouts_equals_packing_tokens():
    """Rows planned from token counts alone, then built from the tokenized documents, equal
    the rows packed from the tokens: same boundaries, chunks, images, tensors and stats."""
    rng = random.Random(0)
    pairs = [_random_document(rng, i) for i in range(400)]
    by_id = {d.doc_id: d for d, _ in pairs}
    packed, planned = packer(), packer()
    want = list(packed.pack(d for d, _ in pairs))
    got = list(planned.pack(layout for _, layout in pairs))
    assert len(got) == len(want) > 50
    builder = packer()
    for plan, row in zip(got, want):
        chunks = [builder.split(by_id[c.doc_id])[0][c.number] for c in plan.chunks]
        assert [c.length for c in chunks] == [c.length for c in plan.chunks]
        built = builder.build_row(chunks)
        assert plan.images == row.images and plan.doc_ids == row.doc_ids
        for field in ("tokens", "labels", "loss_mask", "document_ids", "sources"):
            assert torch.equal(getattr(built, field), getattr(row, field))
    assert planned.stats == packed.stats
    assert packed.stats.chunks_split > 10 and packed.stats.images_dropped > 0

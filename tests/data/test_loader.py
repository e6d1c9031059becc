"""The loader end to end on real shards: batches, exact resume (also across DP sizes), bad
images decoded as blanks with their document's loss off."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from mm1_megatron.config import load_config
from mm1_megatron.data.loader import MultimodalLoader
from mm1_megatron.data.mixture import LoaderState
from mm1_megatron.data.shard_writer import RawSample, write_dataset
from mm1_megatron.data.tokenizer import Tokenizer
from tests import _procs



def config(data: Path, *extra: str):
    return load_config("demo", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                                "data.seq_length=256", *extra])


def batches(loader, n):
    return [batch for batch, _ in itertools.islice(iter(loader), n)]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_batches_match_the_model_contract(demo_data):
    cfg = config(demo_data)
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    for batch in batches(loader, 6):
        b, s = batch["tokens"].shape
        assert (b, s) == (cfg.train.micro_batch_size, 256)
        placeholders = int((batch["tokens"] == cfg.llm.image_token_id).sum())
        assert placeholders == batch["images"].shape[0] * cfg.connector.num_tokens
        assert batch["images"].shape[1:] == (3, cfg.vision.image_size, cfg.vision.image_size)
        assert batch["document_ids"].shape == (b, s)
        # The same documents as THD segments of the rows end to end (the TE path).
        cu = batch["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == b * s and isinstance(batch["max_seqlen"], int)
        flat = batch["document_ids"].reshape(-1).tolist()
        for start, end in zip(cu[:-1], cu[1:]):
            assert len(set(flat[start:end])) == 1 and (end - start) <= batch["max_seqlen"]
            assert start % s == 0 or flat[start] != flat[start - 1]  # cut at a change only
        assert (batch["loss_mask"][batch["labels"] == cfg.llm.image_token_id] == 0).all()
    assert loader.packing.efficiency > 0.5
    assert not loader.skips.counts


@pytest.mark.parametrize("unit", ["sequences", "documents"])
def test_resume_exact_and_across_dp_sizes(demo_data, unit):
    cfg = config(demo_data, f"data.mixture_unit={unit}")
    full = batches(MultimodalLoader(cfg, 0, 1, log=None), 8)
    first = MultimodalLoader(cfg, 0, 1, log=None)
    batches(first, 3)
    state = LoaderState.from_dict(first.state.to_dict())
    rest = batches(MultimodalLoader(cfg, 0, 1, state, log=None), 5)
    assert all(same(a, b) for a, b in zip(full[3:], rest))
    # DP=2: micro-batch 1 so row j -> rank j % 2; after 2 rows each, resume on one rank.
    cfg1 = config(demo_data, "train.micro_batch_size=1", "train.global_batch_size=8",
                  f"data.mixture_unit={unit}")
    rows = batches(MultimodalLoader(cfg1, 0, 1, log=None), 8)
    ranks = [MultimodalLoader(cfg1, r, 2, log=None) for r in range(2)]
    got = [batches(loader, 2) for loader in ranks]
    assert ranks[0].state.to_dict() == ranks[1].state.to_dict()
    assert all(same(x, y) for x, y in zip([got[0][0], got[1][0], got[0][1], got[1][1]],
                                          rows[:4]))
    resumed = batches(MultimodalLoader(cfg1, 0, 1, ranks[1].state, log=None), 4)
    assert all(same(x, y) for x, y in zip(resumed, rows[4:8]))
    other = "documents" if unit == "sequences" else "sequences"
    with pytest.raises(ValueError, match=f"data.mixture_unit={other}: .* counts {unit}"):
        MultimodalLoader(config(demo_data, f"data.mixture_unit={other}"), 0, 1,
                         ranks[1].state, log=None)


def test_undecodable_image_is_blank_and_counted(tmp_path, demo_data):
    from tests._helpers.data import jpeg

    root = tmp_path / "data"
    good, bad = jpeg(1, (64, 48)), b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
    samples = [RawSample([0, f"picture number {i}"], [("jpg", bad if i == 1 else good)])
               for i in range(6)]
    (root / "tokenizer.model").parent.mkdir(parents=True)
    (root / "tokenizer.model").write_bytes((demo_data / "tokenizer.model").read_bytes())
    write_dataset(samples, root / "caption", "caption",
                  tokenizer=Tokenizer.load(root / "tokenizer.model"))
    cfg = config(root, "data.weight_interleaved=0", "data.weight_text=0",
                 "train.micro_batch_size=1", "data.max_images_per_sequence=6")
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    # 6 caption pairs, at most 6 images a row: the first row is exactly one epoch.
    found = []
    for batch in batches(loader, 1):
        images, tokens = batch["images"], batch["tokens"][0]
        k = cfg.connector.num_tokens
        starts = [i for i in range(tokens.numel()) if tokens[i] == cfg.llm.image_token_id
                  and (i == 0 or tokens[i - 1] != cfg.llm.image_token_id)]
        assert len(starts) == images.shape[0]  # caption pairs: one run per image
        for j in range(images.shape[0]):
            if not images[j].any():  # the blank stand-in
                found.append(j)
                # Its caption (the next tokens up to the document end) carries no loss.
                assert batch["loss_mask"][0, starts[j]:starts[j] + k + 4].sum() == 0
        assert batch["loss_mask"].sum() > 0  # the other documents keep theirs
    assert len(found) == 1
    assert loader.skips.counts["undecodable_image"] == 1


def test_collate_refuses_rows_whose_placeholders_are_not_their_images(demo_data):
    """The host-side check the model relies on (it only asserts on the device, no sync)."""
    import pytest

    loader = MultimodalLoader(config(demo_data), 0, 1, log=None)
    rows = [row for row, _ in itertools.islice(loader.rows, 4)]
    planned = next(r for r in rows if r.images)
    loader.collate([planned])  # a consistent row passes
    row = loader._build(planned, {})
    row.images = row.images[:-1]
    with pytest.raises(ValueError, match=r"packed row 0 \(documents .*\) has \d+ image "
                                         r"placeholder tokens for \d+ images x 16 tokens"):
        loader.collate([row])


@pytest.mark.parametrize("unit", ["sequences", "documents"])
def test_rows_planned_from_the_index_equal_rows_packed_from_tokenized_text(demo_data, unit):
    """The loader plans from the token index without reading a shard; the rows it builds
    equal rows packed from every document's tokenized text (the plan before the index)."""
    from mm1_megatron.data.loader import ImageRef, document_tokens
    from mm1_megatron.data.mixture import row_stream
    from mm1_megatron.data.packing import Document, Packer, PlannedRow

    cfg = config(demo_data, f"data.mixture_unit={unit}", "train.micro_batch_size=1")
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    reads = []
    for ds in filter(None, loader.datasets):  # planning must not read shards
        ds.read = lambda *a, _read=ds.read, **k: reads.append(a) or _read(*a, **k)
    planned = [row for row, _ in itertools.islice(loader.rows, 60)]
    assert reads == [] and all(isinstance(r, PlannedRow) for r in planned)

    def tokenized(source, epoch, index, doc_id):
        sample = loader.datasets[source].read(index, images=False)
        return Document(doc_id, source, document_tokens(loader.tokenizer, sample.segments),
                        [ImageRef(source, index, j) for j in range(sample.num_images)])

    d = cfg.data
    reference = row_stream(unit, [len(ds) if ds else 0 for ds in loader.datasets],
                           [d.weight_interleaved, d.weight_caption, d.weight_text,
                            d.weight_sft],
                           cfg.train.seed,
                           lambda: Packer(d.seq_length, cfg.connector.num_tokens,
                                          d.max_images_per_sequence, cfg.llm.image_token_id),
                           tokenized)
    want = [row for row, _ in itertools.islice(iter(reference), 60)]
    for plan, row in zip(planned, want):
        built = loader._build(plan, {})
        assert built.doc_ids == row.doc_ids and built.images == row.images
        for field in ("tokens", "labels", "loss_mask", "document_ids", "sources"):
            assert torch.equal(getattr(built, field), getattr(row, field))


def test_token_index_missing_or_from_another_tokenizer_is_refused(tmp_path, demo_data):
    import shutil
    import sys

    from mm1_megatron.data.shard_schema import DatasetError
    from mm1_megatron.data.tokenizer import train_tokenizer

    root = tmp_path / "data"
    shutil.copytree(demo_data / "text", root / "text")
    shutil.copy(demo_data / "tokenizer.model", root / "tokenizer.model")
    cfg = config(root, "data.weight_interleaved=0", "data.weight_caption=0")
    other = train_tokenizer([f"other words number {i} and more" for i in range(300)], 300,
                            tmp_path / "other.model", exact_vocab=False)
    tool = [sys.executable, str(Path(__file__).parents[2] / "tools" / "index_tokens.py"),
            "--no-progress", "--workers", "2"]
    _procs.run([*tool, str(root), "--tokenizer", str(other)], check=True,
               capture_output=True, timeout=300)
    with pytest.raises(DatasetError, match=r"text: indexed with tokenizer .*other.model "
                       r"\(sha256 \w+\), data.tokenizer_model is .*tokenizer.model"):
        MultimodalLoader(cfg, 0, 1, log=None)
    for name in ("segments.npy", "segment_offsets.npy"):  # as prepared without --tokenizer
        (root / "text" / "index" / name).unlink()
    manifest = json.loads((root / "text" / "manifest.json").read_text())
    del manifest["index"]["segments"], manifest["index"]["segment_offsets"]
    (root / "text" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"no token index .* run: python "
                                           r"tools/index_tokens.py .*text --tokenizer"):
        MultimodalLoader(cfg, 0, 1, log=None)
    out = _procs.run([*tool, str(root), "--tokenizer", str(root / "tokenizer.model")],
                     check=True, capture_output=True, text=True, timeout=300).stdout
    assert "text: 10 samples" in out
    got = batches(MultimodalLoader(cfg, 0, 1, log=None), 3)
    want = batches(MultimodalLoader(config(demo_data, "data.weight_interleaved=0",
                                           "data.weight_caption=0"), 0, 1, log=None), 3)
    assert all(same(a, b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def blend(demo_data, tmp_path_factory) -> Path:
    """Two datasets per kind: the demo's own, plus an img2dataset-layout caption set indexed
    in place and small interleaved / text sets in our shards, listed with weights."""
    from mm1_megatron.data.sources.webdataset import index_in_place
    from tests._helpers.blend import write_blend, write_second_datasets
    from tests._helpers.data import TEXT
    from tests._helpers.img2dataset import write_img2dataset

    root = tmp_path_factory.mktemp("blend")
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    shards = write_img2dataset(root / "src" / "cc", TEXT, shards=3, samples_per_shard=6,
                               failed=(4,), no_image=(7,))
    (root / "cc").mkdir()
    index_in_place([shards.folder], "caption", root / "cc", tokenizer=tok)
    docs, books = write_second_datasets(root, tok)
    return write_blend(root / "blend.yaml", Path(demo_data), root / "cc", docs, books)


def blend_config(demo_data: Path, blend: Path, *extra: str):
    return load_config("demo", [f"data.blend={blend}",
                                f"data.tokenizer_model={demo_data}/tokenizer.model",
                                "data.seq_length=256", *extra], this_machine=True)


@pytest.mark.parametrize("unit", ["sequences", "documents"])
def test_a_blend_draws_every_dataset_and_resumes_exactly_across_dp_sizes(demo_data, blend,
                                                                        unit):
    cfg = blend_config(demo_data, blend, "train.micro_batch_size=1",
                       "train.global_batch_size=8", f"data.mixture_unit={unit}")
    assert cfg.data.path == ""  # the blend replaced the preset's folder
    one = MultimodalLoader(cfg, 0, 1, log=None)
    assert [s.name for s in one.sources] == ["interleaved[0]", "interleaved[1]", "caption[0]",
                                             "caption[1]", "text[0]", "text[1]"]
    # Inside a kind the blend's weights split the kind's: caption 0.45 as 0.75 / 0.25.
    assert [round(s.weight, 4) for s in one.sources] == [0.225, 0.225, 0.3375, 0.1125,
                                                         0.025, 0.075]
    rows = batches(one, 40)
    drawn = one.state.sources if unit == "sequences" else None
    if drawn is not None:  # rows per dataset: each drew, in its share
        assert all(p.rows > 0 for p in drawn)
        assert abs(drawn[2].rows - 3 * drawn[3].rows) <= 3
    kinds = {int(k) for b in rows for k in b["sources"].unique().tolist() if k >= 0}
    assert kinds == {0, 1, 2}  # interleaved, caption, text (row sources name the kind)
    # The in-place set's sample without an image is skipped and counted (each time drawn).
    assert set(one.skips.snapshot()) == {"missing_image"}
    ranks = [MultimodalLoader(cfg, r, 2, log=None) for r in range(2)]
    got = [batches(loader, 10) for loader in ranks]
    assert ranks[0].state.to_dict() == ranks[1].state.to_dict()
    assert all(same(x, y) for x, y in zip([b for pair in zip(*got) for b in pair], rows[:20]))
    resumed = batches(MultimodalLoader(cfg, 0, 1, ranks[1].state, log=None), 20)
    assert all(same(x, y) for x, y in zip(resumed, rows[20:40]))


def test_a_blend_is_refused_in_one_line_naming_what_is_wrong(demo_data, blend, tmp_path):
    from mm1_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="data.blend: .* and data.path=.* both name"):
        load_config("demo", [f"data.blend={blend}", f"data.path={demo_data}"])
    for text, words in [("caption: [{path: nowhere}]\n", r"names .*nowhere, which holds no "
                         r"manifest.json"),
                        ("pictures: [{path: x}]\n", "unknown kind 'pictures'"),
                        ("caption: [{path: x, weight: -1}]\n", r"caption\[0\]: weight must "
                         "be a number > 0"),
                        ("caption: {path: x}\n", "caption: a non-empty list")]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=f"data.blend: .*{words}"):
            blend_config(demo_data, bad)

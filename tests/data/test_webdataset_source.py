"""Webdataset shards indexed in place (img2dataset / DataComp tars, Energon-prepared folders):
nothing copied, the source untouched, every failure case counted, and a source shard changed
afterwards refused."""

import os
import stat

import pytest

from mm1_megatron.data.shard_reader import open_dataset
from mm1_megatron.data.shard_schema import DatasetError, SkipCounter
from mm1_megatron.data.sources.webdataset import index_in_place
from tests._helpers.data import TEXT
from tests._helpers.img2dataset import tree_digest, write_img2dataset


def read_only(folder) -> None:
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def source(tmp_path):
    # Shard 2 failed whole; sample 1 failed to download; sample 5 has no image; shard 3 is
    # cut inside its last image.
    shards = write_img2dataset(tmp_path / "datacomp", TEXT, shards=4, failed=(1,),
                               missing_shards=(2,), no_image=(5,), truncated_shard=3)
    read_only(shards.folder)
    yield shards
    for p in [shards.folder, *shards.folder.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_img2dataset_shards_are_indexed_in_place_with_every_gap_counted(source, tmp_path):
    before = tree_digest(source.folder)
    out = tmp_path / "out"
    out.mkdir()
    manifest, skipped = index_in_place([source.folder], "caption", out)
    assert tree_digest(source.folder) == before  # the source, byte for byte
    assert not list(out.rglob("*.tar"))  # not one member copied
    assert skipped == {"failed_download": 1, "missing_shard": 1, "missing_image": 1,
                       "truncated": 1}
    assert manifest["bad"] == dict(sorted(skipped.items()))
    assert [s["name"] for s in manifest["shards"]] == ["00000.tar", "00001.tar", "00003.tar"]
    assert manifest["source"]["root"] == str(source.folder.resolve())
    ds = open_dataset(out)
    skips = SkipCounter(log=None)
    read = {s.key: (s.segments[1], s.images[0]) for s in ds.iter_good(skips=skips)}
    assert read == source.good  # each caption from KEY.txt, each image's own bytes
    assert skips.snapshot() == {"missing_image": 1, "truncated": 1}
    assert manifest["samples"] == len(source.good) + 2


def test_a_json_field_can_hold_the_caption(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    index_in_place([source.folder / "00000.tar"], "caption", out, caption_field="caption")
    assert {s.key: s.segments[1] for s in open_dataset(out).iter_good()} == \
        {k: v[0] for k, v in source.good.items() if k.startswith("00000")}
    out2 = tmp_path / "out2"
    out2.mkdir()
    manifest, skipped = index_in_place([source.folder / "00000.tar"], "caption", out2,
                                       caption_field="no_such_field")
    assert skipped["missing_text"] == manifest["samples"]


def test_a_source_shard_changed_or_gone_after_indexing_is_refused(tmp_path):
    shards = write_img2dataset(tmp_path / "src", TEXT, shards=2)
    out = tmp_path / "out"
    out.mkdir()
    index_in_place([shards.folder], "caption", out)
    open_dataset(out)  # fine as indexed
    first = shards.folder / "00000.tar"
    mtime = first.stat().st_mtime_ns
    os.utime(first, ns=(mtime + 10**9, mtime + 10**9))  # same size, rewritten later
    with pytest.raises(DatasetError, match=r"00000\.tar: .*rewritten shard"):
        open_dataset(out)
    first.unlink()
    with pytest.raises(DatasetError, match=r"00000\.tar: cannot open shard"):
        open_dataset(out)


@pytest.mark.slow  # energon prepare and two mm1-prepare-data runs: ~14 s
def test_an_energon_prepared_folder_is_indexed_in_place_from_its_sqlite(tmp_path):
    """The fixture is made by megatron-energon's own `energon prepare`; the index read from
    its index.sqlite equals the one from scanning the same tars, byte range for byte range."""
    import json

    import numpy as np

    from tests import _procs

    shards = write_img2dataset(tmp_path / "energon", TEXT, shards=3, failed=(2,),
                               no_image=(5,))
    made = _procs.run(["energon", "prepare", "--non-interactive", "--no-progress",
                       "--split-ratio", "1,0,0", "--sample-type", "CaptioningSample",
                       "--field-map", '{"image": "jpg", "caption": "txt"}', str(shards.folder)],
                      capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    assert (shards.folder / ".nv-meta" / "index.sqlite").is_file()
    read_only(shards.folder)
    before = tree_digest(shards.folder)
    out = tmp_path / "caption"
    result = _procs.run(["mm1-prepare-data", "--no-progress", str(shards.folder), "--kind",
                         "caption", "--output", str(out)], capture_output=True, text=True,
                        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["format"], summary["samples"], summary["bad"]) == \
        ("energon", len(source_good := shards.good), {"missing_image": 1})
    assert tree_digest(shards.folder) == before and not list(out.rglob("*.tar"))
    assert {s.key: (s.segments[1], s.images[0]) for s in open_dataset(out).iter_good()} == \
        source_good
    scanned = tmp_path / "scanned"
    scanned.mkdir()
    index_in_place([shards.folder], "caption", scanned)
    for name in ("samples.npy", "images.npy"):
        assert np.array_equal(np.load(out / "index" / name), np.load(scanned / "index" / name))
    # A sample type energon has and we do not read yet: one line, exit 2, nothing written.
    meta = shards.folder / ".nv-meta" / "dataset.yaml"
    meta.chmod(0o644)
    meta.write_text(meta.read_text().replace("CaptioningSample", "VQASample"))
    refused = _procs.run(["mm1-prepare-data", "--no-progress", str(shards.folder), "--kind",
                          "caption", "--output", str(tmp_path / "vqa")], capture_output=True,
                         text=True, timeout=300)
    assert refused.returncode == 2 and not (tmp_path / "vqa").exists()
    assert refused.stderr.strip().count("\n") == 0 and "'VQASample' is not read" in \
        refused.stderr, refused.stderr


def test_mm1_train_refuses_a_changed_or_missing_source_tar_before_starting(demo_data,
                                                                           tmp_path):
    from mm1_megatron.data.tokenizer import Tokenizer
    from tests import _procs

    shards = write_img2dataset(tmp_path / "src", TEXT, shards=2)
    root = tmp_path / "data"
    (root / "caption").mkdir(parents=True)
    index_in_place([shards.folder], "caption", root / "caption",
                   tokenizer=Tokenizer.load(demo_data / "tokenizer.model"))
    run_dir = tmp_path / "run"
    cmd = ["mm1-train", "--preset", "demo", f"data.path={root}",
           f"data.tokenizer_model={demo_data}/tokenizer.model", f"run_dir={run_dir}",
           "data.weight_interleaved=0", "data.weight_text=0"]
    tar = shards.folder / "00001.tar"
    mtime = tar.stat().st_mtime_ns
    os.utime(tar, ns=(mtime + 10**9, mtime + 10**9))
    for problem in ("changed since it was indexed", "No such file"):
        out = _procs.run(cmd, capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
        assert lines[0].startswith(f"mm1-train: config error: data.path: {tar}: {problem}")
        assert not run_dir.exists()  # nothing started, nothing written
        tar.unlink(missing_ok=True)  # next: the tar gone


def test_mint_pdf_tars_are_indexed_in_place_page_by_page(tmp_path):
    """MINT-1T's PDF documents: KEY.json's aligned texts / images, the images the pages of one
    KEY.tiff. Each image read is its own page (the decoder sees it alone, as DALI decodes it);
    every failure case counted where it is met."""
    import io

    import numpy as np
    from PIL import Image

    import torch

    from mm1_megatron.data.images import CLIP_MEAN, CLIP_STD, ImageDecoder
    from tests._helpers.mint import write_mint

    mint = write_mint(tmp_path / "MINT-1T-PDF-CC-2023-23", TEXT, docs=6, shards=2,
                      misaligned=(1,), images_only=(3,), short_tiff=(5,), no_tiff=(7,),
                      truncated_shard=1)
    read_only(mint.folder)
    before = tree_digest(mint.folder)
    out = tmp_path / "out"
    out.mkdir()
    manifest, skipped = index_in_place([mint.folder], "interleaved", out)
    assert tree_digest(mint.folder) == before and not list(out.rglob("*.tar"))
    assert skipped == {"misaligned": 1, "images_only": 1, "missing_image": 1, "truncated": 1}
    assert manifest["source"]["text"] == {"member": "json", "texts": "texts",
                                          "images": "images"}
    ds = open_dataset(out)
    skips = SkipCounter(log=None)
    docs = {s.key: s for s in ds.iter_good(skips=skips)}
    assert skips.snapshot() == {"undecodable_image": 1, "missing_image": 1, "truncated": 1,
                                "misaligned": 1, "images_only": 1}
    assert set(docs) == set(mint.good)
    decoder = ImageDecoder(16, batch_size=8, device="cpu")
    for key, (segments, colours) in mint.good.items():
        doc = docs[key]
        assert doc.segments == segments and doc.image_exts == ["tiff"] * len(colours)
        pages = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in doc.images]
        assert [tuple(int(v) for v in p[0, 0]) for p in pages] == colours
        assert [p.shape[1] for p in pages] == [20 + 2 * j for j in range(len(colours))]
        decoded, bad = decoder.decode(doc.images)  # DALI, as the loader decodes them
        assert bad == [] and decoded.shape[0] == len(colours)
        rgb = decoded.mean(dim=(2, 3)) * torch.tensor(CLIP_STD) + torch.tensor(CLIP_MEAN)
        assert torch.allclose(rgb * 255, torch.tensor(colours, dtype=torch.float32), atol=2)


@pytest.mark.slow  # energon prepare, then energon's own loader: ~8 s
def test_an_energon_interleaved_dataset_reads_as_energon_reads_it(tmp_path):
    """`energon prepare --sample-type InterleavedSample` over energon's documented interleaved
    layout, its sample_loader.py filled in as the documentation does: indexed in place from
    index.sqlite, each document equals what energon's own loader yields for it."""
    import io

    import numpy as np
    from PIL import Image

    from megatron.energon import WorkerConfig, get_loader, get_val_dataset
    from mm1_megatron.data.prepare import prepare
    from tests import _procs
    from tests._helpers.mint import ENERGON_SAMPLE_LOADER, write_energon_interleaved

    docs = write_energon_interleaved(tmp_path / "interleaved", TEXT)
    made = _procs.run(["energon", "prepare", "--non-interactive", "--no-progress",
                       "--split-parts", "train:shard_0.tar", "--split-parts",
                       "val:shard_1.tar", "--sample-type", "InterleavedSample",
                       str(docs.folder)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    (docs.folder / ".nv-meta" / "sample_loader.py").write_text(ENERGON_SAMPLE_LOADER)
    read_only(docs.folder)
    before = tree_digest(docs.folder)
    out = tmp_path / "out"
    manifest, skipped = prepare("interleaved", [docs.folder], ".", out)
    assert manifest["source"]["format"] == "energon" and not list(out.rglob("*.tar"))
    assert skipped == {"missing_image": 1, "misaligned": 1} and tree_digest(docs.folder) == before
    ours = {s.key: s for s in open_dataset(out).iter_good()}
    assert {k: s.segments for k, s in ours.items()} == {k: v[0] for k, v in docs.good.items()}
    theirs = get_loader(get_val_dataset(str(docs.folder), split_part="train", batch_size=None,
                                        worker_config=WorkerConfig(rank=0, world_size=1,
                                                                   num_workers=0)))
    seen = 0
    for sample in theirs:
        mine = ours[sample.__key__]
        texts = [x for x in sample.sequence if isinstance(x, str)]
        pictures = [x.numpy() for x in sample.sequence if not isinstance(x, str)]
        assert texts == mine.texts and len(pictures) == mine.num_images
        for data, picture in zip(mine.images, pictures):
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32) / 255
            assert np.allclose(pixels.transpose(2, 0, 1), picture, atol=1e-6)
        seen += 1
    assert seen == len(docs.good)

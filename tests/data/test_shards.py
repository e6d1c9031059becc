"""Shards: schema round trip, manifest/index, bad samples skipped and counted, open errors."""

from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from mm1_megatron.data.shard_index import index_dataset
from mm1_megatron.data.shard_reader import open_dataset
from mm1_megatron.data.shard_schema import BadSample, DatasetError, SkipCounter
from tests._helpers.data import TEXT, jpeg, tiny_tokenizer, write_jsonl
from tests import _procs
from mm1_megatron.data.prepare import prepare

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for n in range(6):
        (root / f"{n}.jpg").write_bytes(jpeg(n, (20 + n, 16)))
    (root / "p.png").write_bytes(b"\x89PNG not really, the decoder judges that")
    (root / "empty.jpg").write_bytes(b"")
    return root


def _records(kind: str) -> list[dict]:
    if kind == "caption":
        return [{"image": f"{n}.jpg", "text": TEXT[n], "id": n} for n in range(6)] + \
               [{"image": "p.png", "text": "a png"}]
    if kind == "text":
        return [{"text": t} for t in TEXT]
    return [{"segments": [{"text": TEXT[0]}, {"image": "0.jpg"}, {"text": TEXT[1]}]},
            {"segments": [{"image": "1.jpg"}, {"image": "2.jpg"}, {"text": TEXT[2]},
                          {"image": "p.png"}]},
            {"segments": [{"text": TEXT[3]}]}]


def _expected(kind: str, rec: dict, root: Path) -> tuple[list, list[bytes]]:
    if kind == "caption":
        return [0, rec["text"]], [(root / rec["image"]).read_bytes()]
    if kind == "text":
        return [rec["text"]], []
    segs, imgs = [], []
    for s in rec["segments"]:
        if "text" in s:
            segs.append(s["text"])
        else:
            imgs.append((root / s["image"]).read_bytes())
            segs.append(len(imgs) - 1)
    return segs, imgs


@pytest.mark.parametrize("kind", ["caption", "interleaved", "text"])
def test_round_trip(kind, tmp_path, images, tok):
    recs = _records(kind)
    jsonl = write_jsonl(tmp_path / "in.jsonl", recs)
    # A tiny shard target forces several shards: order must survive the rollover.
    manifest, skipped = prepare(kind, [jsonl], images, tmp_path / kind, shard_size_mb=0.004,
                                tokenizer=tok, progress=False)
    assert not skipped
    ds = open_dataset(tmp_path / kind, verify=True)
    assert len(ds) == len(recs) == manifest["samples"] and ds.kind == kind
    assert len(manifest["shards"]) > 1 or kind == "text"
    for i, rec in enumerate(recs):
        s = ds.read(i)
        segs, imgs = _expected(kind, rec, images)
        assert (s.segments, s.images, s.key) == (segs, imgs, f"000000{i:09d}")  # unit 0
        row = ds.samples[i]
        assert row["num_images"] == len(imgs)
        assert row["text_chars"] == sum(len(t) for t in s.texts)
        assert row["text_tokens"] == sum(len(tok.encode(t)) for t in s.texts)
        assert ds.read(i, images=False).images == []
    # Manifest: per-shard counts, bytes and checksums are those of the files.
    assert sum(s["samples"] for s in manifest["shards"]) == len(recs)
    assert manifest["images"] == sum(len(_expected(kind, r, images)[1]) for r in recs)
    for entry in manifest["shards"]:
        data = (tmp_path / kind / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["text_tokens"] == int(ds.samples["text_tokens"].sum())
    # Index offsets give exactly the bytes a sequential tar read gives.
    seq = {}
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / kind / entry["name"]) as tar:
            for m in tar:
                seq[m.name] = tar.extractfile(m).read()
    for i in range(len(ds)):
        s = ds.read(i)
        assert json.loads(seq[ds.member_name(i, -1)])  # the json member is where the index says
        assert s.images == [seq[ds.member_name(i, j)] for j in range(s.num_images)]
    # Plain webdataset sees the same samples (the schema is ordinary webdataset).
    urls = [str(tmp_path / kind / e["name"]) for e in manifest["shards"]]
    keys = [x["__key__"] for x in wds.WebDataset(urls, shardshuffle=False)]
    assert keys == [f"000000{i:09d}" for i in range(len(recs))]


def test_dataset_pickles_and_reads_in_another_process_state(tmp_path, images):
    prepare("caption", [write_jsonl(tmp_path / "c.jsonl", _records("caption"))], images,
            tmp_path / "c", progress=False)
    ds = open_dataset(tmp_path / "c")
    ds.read(0)  # opens a file handle, which must not travel
    again = pickle.loads(pickle.dumps(ds))
    assert again.read(3).images == ds.read(3).images


def test_prepare_skips_and_counts_bad_lines(tmp_path, images):
    recs = [{"image": "0.jpg", "text": "fine"}, "{not json", {"image": "nope.jpg", "text": "x"},
            {"image": "empty.jpg", "text": "x"}, {"image": "1.jpg", "text": "   "},
            {"image": "1.gifv", "text": "x"}, {"text": "no image"}, "[1, 2]",
            {"image": "2.jpg", "text": "also fine"}]
    manifest, skipped = prepare("caption", [write_jsonl(tmp_path / "c.jsonl", recs)], images,
                                tmp_path / "c", progress=False, log=lambda m: None)
    assert manifest["samples"] == 2
    assert dict(skipped) == {"bad_json": 3, "missing_image": 1, "zero_byte_image": 1,
                             "empty_text": 1, "unsupported_image": 1}
    docs = [{"segments": [{"image": "0.jpg"}, {"image": "1.jpg"}]},
            {"segments": [{"text": "ok"}, {"image": "0.jpg"}]}, {"segments": []},
            {"segments": [{"text": "x", "image": "0.jpg"}]}]
    manifest, skipped = prepare("interleaved", [write_jsonl(tmp_path / "d.jsonl", docs)],
                                images, tmp_path / "d", progress=False, log=lambda m: None)
    assert manifest["samples"] == 1 and dict(skipped) == {"images_only": 1, "bad_json": 2}


def test_prepare_cli(tmp_path, images):
    jsonl = write_jsonl(tmp_path / "c.jsonl", _records("caption") + ["{broken"])
    out = _procs.run(["mm1-prepare-data", str(jsonl), "--kind", "caption", "--images-root",
                      str(images), "--output", str(tmp_path / "c"), "--shard-size-mb", "1",
                      "--no-progress"],
                     cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "7 samples in 1 shards" in out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["samples"] == 7 and result["bad"] == {"bad_json": 1}
    assert len(open_dataset(tmp_path / "c")) == 7


# ---- bad samples inside shards (written by hand with webdataset, as another tool might) ----

def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for s in samples:
            w.write({k: v if k == "__key__" else (v if isinstance(v, bytes) else
                                                 json.dumps(v).encode()) for k, v in s.items()})


def _skip_all(ds) -> tuple[list[int], dict[str, list[str]]]:
    good, bad = [], {}
    for i in range(len(ds)):
        try:
            ds.read(i)
            good.append(i)
        except BadSample as e:
            assert str(e).startswith(f"{e.shard}: {e.member}: {e.reason}") and "\n" not in str(e)
            bad.setdefault(e.reason, []).append(e.member)
    return good, bad


def test_bad_samples_interleaved(tmp_path):
    d = tmp_path / "il"
    d.mkdir()
    ok = {"segments": [{"text": "hello"}, {"image": "img0.jpg"}]}
    _write_shard(d / "a.tar", [
        {"__key__": "good0", "json": ok, "img0.jpg": jpeg(1)},
        {"__key__": "badjson", "json": b'{"segments": [', "img0.jpg": jpeg(1)},
        {"__key__": "missing", "json": {"segments": [{"text": "t"}, {"image": "img0.jpg"},
                                                     {"image": "img1.jpg"}]},
         "img0.jpg": jpeg(2)},
        {"__key__": "zero", "json": ok, "img0.jpg": b""},
        {"__key__": "empty", "json": {"segments": [{"text": " "}, {"image": "img0.jpg"}]},
         "img0.jpg": jpeg(3)},
        {"__key__": "onlyimg", "json": {"segments": [{"image": "img0.jpg"}]}, "img0.jpg": jpeg(4)},
        {"__key__": "good1", "json": ok, "img0.jpg": jpeg(5)},
        {"__key__": "cut", "json": ok, "img0.jpg": jpeg(6, (64, 64))},
    ])
    tar = d / "a.tar"
    data = tar.read_bytes()
    with tarfile.open(tar) as t:
        last = [m for m in t.getmembers() if m.name.startswith("cut.")]
    img = next(m for m in last if m.name == "cut.img0.jpg")
    # Truncated mid-image; webdataset writes members in name order, so the json
    # (after img0.jpg) is what is lost, and the error names it.
    tar.write_bytes(data[: img.offset_data + img.size // 2])
    manifest = index_dataset(d, "interleaved")
    assert manifest["samples"] == 8
    ds = open_dataset(d, verify=True)
    good, bad = _skip_all(ds)
    assert [ds.read(i).key for i in good] == ["good0", "good1"]
    assert bad == {"bad_json": ["badjson.json"], "missing_image": ["missing.img1.jpg"],
                   "zero_byte_image": ["zero.img0.jpg"], "empty_text": ["empty.json"],
                   "images_only": ["onlyimg.json"], "truncated": ["cut.json"]}
    assert manifest["bad"] == {r: len(m) for r, m in bad.items()}
    # The packer can exclude them from the index alone.
    assert [ds.bad_reason(i) for i in range(len(ds))][:2] == [None, "bad_json"]
    skips = SkipCounter(log=None)
    assert [s.key for s in ds.iter_good(skips=skips)] == ["good0", "good1"]
    assert sum(skips.counts.values()) == 6


def test_bad_samples_caption_and_text(tmp_path):
    d = tmp_path / "cap"
    d.mkdir()
    _write_shard(d / "a.tar", [
        {"__key__": "k0", "json": {"text": "a cat"}, "jpg": jpeg(0)},
        {"__key__": "k1", "json": {"text": "no image member"}},
        {"__key__": "k2", "json": {"text": ""}, "png": jpeg(1)},
        {"__key__": "k3", "json": {"caption": "wrong field"}, "jpg": jpeg(2)},
        {"__key__": "k4", "json": {"text": "zero"}, "jpeg": b""},
        {"__key__": "k5", "json": {"text": "a png"}, "png": jpeg(3)},
    ])
    index_dataset(d, "caption")
    ds = open_dataset(d)
    good, bad = _skip_all(ds)
    assert good == [0, 5] and ds.read(5).image_exts == ["png"]
    assert bad == {"missing_image": ["k1.jpg"], "empty_text": ["k2.json"],
                   "bad_json": ["k3.json"], "zero_byte_image": ["k4.jpg"]}
    t = tmp_path / "text"
    t.mkdir()
    _write_shard(t / "a.tar", [{"__key__": "t0", "json": {"text": "words"}},
                               {"__key__": "t1", "json": b"\xff\xfe"},
                               {"__key__": "t2", "json": {"text": "\n\t "}}])
    index_dataset(t, "text")
    good, bad = _skip_all(open_dataset(t))
    assert good == [0] and bad == {"bad_json": ["t1.json"], "empty_text": ["t2.json"]}


# ---- datasets that cannot be used at all: error at open, naming the file ----

@pytest.fixture
def prepared(tmp_path, images):
    jsonl = write_jsonl(tmp_path / "c.jsonl", _records("caption"))
    prepare("caption", [jsonl], images, tmp_path / "c", shard_size_mb=0.004, progress=False)
    return tmp_path / "c"


def test_an_index_written_before_image_pages_existed_reads_the_same(prepared):
    """images.npy without the `frame` field (datasets prepared before MINT-1T support): every
    image reads as a plain one, the same bytes as with the field."""
    import numpy as np

    before = [(s.segments, s.images) for s in open_dataset(prepared).iter_good()]
    path = prepared / "index" / "images.npy"
    table = np.load(path)
    assert set(table["frame"].tolist()) == {0}
    old = np.dtype([("offset", "<i8"), ("size", "<i8"), ("ext", "u1")])
    np.save(path, np.array([tuple(r)[:3] for r in table.tolist()], dtype=old))
    assert [(s.segments, s.images) for s in open_dataset(prepared).iter_good()] == before


def test_truncated_shard_fails_open(prepared):
    shard = prepared / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(DatasetError, match=r"shard-000001\.tar: \d+ bytes but manifest"):
        open_dataset(prepared)


def test_missing_shard_fails_open(prepared):
    (prepared / "shard-000000.tar").unlink()
    with pytest.raises(DatasetError, match=r"shard-000000\.tar: cannot open shard"):
        open_dataset(prepared)


def test_checksum_mismatch_fails_open_with_verify(prepared):
    shard = prepared / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_dataset(prepared)  # the size check alone cannot see it
    with pytest.raises(DatasetError, match=r"shard-000001\.tar: sha256 differs"):
        open_dataset(prepared, verify=True)


def test_corrupt_manifest_fails_open(prepared):
    m = prepared / "manifest.json"
    text = m.read_text()
    m.write_text(text[: len(text) // 2])
    with pytest.raises(DatasetError, match=r"manifest\.json: not valid JSON"):
        open_dataset(prepared)
    obj = json.loads(text)
    obj["shards"][0]["samples"] += 1
    m.write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match="index does not match manifest.json"):
        open_dataset(prepared)
    del obj["shards"][0]["sha256"]
    m.write_text(json.dumps(obj))
    with pytest.raises(DatasetError, match=r"manifest\.json: field 'sha256' missing"):
        open_dataset(prepared)


def test_unreadable_tar_fails_indexing(tmp_path):
    (tmp_path / "x.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(DatasetError, match=r"x\.tar: cannot read as a tar file"):
        index_dataset(tmp_path, "text")


def test_skip_counter_lists_a_bounded_number_and_counts_all():
    from mm1_megatron.data.shard_schema import BadSample, SkipCounter

    lines = []
    skips = SkipCounter(log=lines.append, max_listed=3)
    for epoch in range(2):
        for i in range(5):
            skips.add(BadSample("s.tar", f"{i}.json", "bad_json"))
    assert skips.snapshot() == {"bad_json": 10}
    assert len(lines) == 3 and "the rest only counted" in lines[-1]

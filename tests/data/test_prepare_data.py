"""mm1-prepare-data over an existing dataset: bad lines skipped as FILE:LINE, all-bad input
is one stderr line, and no error or crash ever damages the dataset already at --output."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mm1_megatron.data.shard_reader import open_dataset
from tests._helpers.data import TEXT, jpeg, write_jsonl
from tests._helpers.sources import (dclm_lines, dclm_record, mmc4_doc, write_fineweb,
                                    write_obelics)
from tests import _procs

REPO = Path(__file__).resolve().parents[2]
TOOL = ["mm1-prepare-data", "--no-progress"]


def _args(kind: str, jsonl: Path, root: Path, out: Path, shard_mb: str = "1") -> list[str]:
    return TOOL + [str(jsonl), "--kind", kind, "--images-root", str(root),
                   "--output", str(out), "--shard-size-mb", shard_mb]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    return _procs.run(_args(*args, **kw), cwd=REPO, capture_output=True, text=True,
                      timeout=120)


@pytest.fixture
def images(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for n in range(6):
        (root / f"{n}.jpg").write_bytes(jpeg(n))
    return root


@pytest.fixture
def old(tmp_path, images) -> Path:
    """An existing 6-sample caption dataset at tmp_path/caption."""
    jsonl = write_jsonl(tmp_path / "old.jsonl",
                        [{"image": f"{n}.jpg", "text": f"old {n}"} for n in range(6)])
    done = _run("caption", jsonl, images, tmp_path / "caption")
    assert done.returncode == 0, done.stderr
    return tmp_path / "caption"


def _assert_old_intact(out: Path) -> None:
    ds = open_dataset(out, verify=True)
    assert len(ds) == 6 and [ds.read(i).texts for i in range(6)] == \
        [[f"old {n}"] for n in range(6)]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


def test_non_utf8_line_skipped_with_file_line(tmp_path, images, old):
    jsonl = tmp_path / "new.jsonl"
    lines = [json.dumps({"image": f"{n}.jpg", "text": TEXT[n]}).encode() for n in range(4)]
    lines.insert(2, b'{"image": "5.jpg", "text": "caf\xe9 in Latin-1"}')  # line 3
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    done = _run("caption", jsonl, images, old)
    assert done.returncode == 0, done.stderr
    assert f"{jsonl}:3: skipped: not_utf8" in done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["samples"] == 4 and result["shards"] == 1 and result["format"] == "jsonl"
    assert result["bad"] == {"not_utf8": 1} and result["output"] == str(old)
    ds = open_dataset(old, verify=True)
    assert [ds.read(i).texts for i in range(len(ds))] == [[t] for t in TEXT[:4]]
    assert _leftovers(old) == []


@pytest.mark.parametrize("case", ["bad_lines", "wrong_images_root", "wrong_kind"])
def test_all_lines_bad_is_one_line_and_keeps_old_dataset(tmp_path, images, old, case):
    manifest = (old / "manifest.json").read_bytes()
    jsonl, root, kind = tmp_path / "bad.jsonl", images, "caption"
    if case == "bad_lines":
        jsonl.write_bytes(b'{"image": "nope.jpg", "text": "x"}\n' * 10 + b"\n"
                          + b'{"image": "0.jpg", "text": "\xff\xfe"}\n' * 2)
        want = [f"no usable samples in {jsonl} (12 lines: 10 missing image under "
                f"--images-root {images}, 2 not UTF-8)"]
    else:
        write_jsonl(jsonl, [{"image": f"{n}.jpg", "text": TEXT[n]} for n in range(3)])
        if case == "wrong_images_root":
            root = tmp_path / "elsewhere"
            want = [f"(3 lines: 3 missing image under --images-root {root})"]
        else:
            kind = "interleaved"
            want = ["(3 lines: 3 bad JSON or fields not those of --kind interleaved)"]
    done = _run(kind, jsonl, root, old)
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mm1-prepare-data: no usable samples in "), err
    assert err[0].endswith("; nothing written, the existing dataset is unchanged"), err
    for text in want:
        assert text in err[0], err
    assert (old / "manifest.json").read_bytes() == manifest
    _assert_old_intact(old)
    assert _leftovers(old) == []


def _wait_for_reader(fifo: Path, proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Block until `proc` opens `fifo` for reading (it then waits for image bytes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("mm1-prepare-data never reached the FIFO image")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_crash_mid_write_keeps_old_dataset(tmp_path, images, old, sig):
    # Lines 1-3 are written (one shard each), then the tool blocks reading an image that is a
    # FIFO; it is killed there, with shards of the new dataset already on disk.
    os.mkfifo(images / "slow.jpg")
    jsonl = write_jsonl(tmp_path / "new.jsonl",
                        [{"image": f"{n}.jpg", "text": TEXT[n]} for n in range(3)]
                        + [{"image": "slow.jpg", "text": "never read"}])
    proc = _procs.popen(_args("caption", jsonl, images, old, shard_mb="0.001"), cwd=REPO,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = None
    try:
        fd = _wait_for_reader(images / "slow.jpg", proc)
        _assert_old_intact(old)  # while the new dataset is being written
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if fd is not None:
            os.close(fd)
    _assert_old_intact(old)
    # Either way the unfinished task's work stays behind, under a name no merge takes for
    # finished; the same command again goes on from there.
    assert _leftovers(old) == ["caption.incomplete"]
    assert list((old.parent / "caption.incomplete" / "parts").glob(
        "00000.tmp-*/units/000000/shard-000001.tar"))
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and stderr.strip().splitlines() == [
            "mm1-prepare-data: interrupted; the existing dataset is unchanged (run the same "
            "command again to go on from the finished tasks)"], stderr
    (images / "slow.jpg").unlink()
    (images / "slow.jpg").write_bytes(jpeg(9))
    done = _run("caption", jsonl, images, old, shard_mb="0.001")  # the same command
    assert done.returncode == 0, done.stderr
    ds = open_dataset(old, verify=True)
    assert [ds.read(i).texts for i in range(len(ds))] == [[t] for t in TEXT[:3]] + \
        [["never read"]]
    assert _leftovers(old) == []


def test_killed_between_renames_restores_old_dataset(tmp_path, old):
    # The swap renames OUT aside before renaming the new one in; a kill in between leaves no
    # OUT. The next run (even one that writes nothing) puts the old dataset back.
    aside = old.with_name("caption.prepare_data-old")
    old.rename(aside)
    done = _run("caption", write_jsonl(tmp_path / "bad.jsonl", ["{broken"]), tmp_path, old)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    _assert_old_intact(old)
    assert _leftovers(old) == []


def test_refuses_output_holding_other_files(tmp_path, images):
    jsonl = write_jsonl(tmp_path / "c.jsonl", [{"image": "0.jpg", "text": TEXT[0]}])
    before = sorted(p.name for p in images.iterdir())
    done = _run("caption", jsonl, images, images)  # --output pointed at the images by mistake
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"mm1-prepare-data: --output {images} holds files mm1-prepare-data did not write "
        "(0.jpg, 1.jpg, 2.jpg, ...); refusing to replace it: choose another --output or "
        "remove them"]
    assert sorted(p.name for p in images.iterdir()) == before


# ---- the command line: SOURCE globs, format detection, where OUT may be, the JSON line -----

def _main(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    from mm1_megatron.data.prepare import main

    code = main(["--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def test_quoted_glob_of_a_read_only_folder_and_caption_field(tmp_path, images, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for part in range(2):
        write_jsonl(src / f"part{part}.jsonl", [{"image": f"{n}.jpg", "caption": TEXT[n]}
                                                for n in range(3 * part, 3 * part + 3)])
    src.chmod(0o555)
    try:
        code, out, err = _main(capsys, src / "part*.jsonl", "--kind", "caption",
                               "--caption-field", "caption", "--images-root", images,
                               "--output", tmp_path / "out")
    finally:
        src.chmod(0o755)
    assert code == 0, err
    result = json.loads(out[-1])
    assert len(out) == 1 and result["samples"] == 6 and result["bad"] == {}
    assert result["format"] == "jsonl" and result["images"] == 6
    assert result["text_tokens"] is None and result["seconds"] >= 0
    assert sorted(p.name for p in src.iterdir()) == ["part0.jsonl", "part1.jsonl"]
    ds = open_dataset(tmp_path / "out")
    assert [ds.read(i).texts for i in range(6)] == [[t] for t in TEXT[:6]]


@pytest.mark.parametrize("case", ["out_in_source", "source_in_out", "mixed", "unknown",
                                  "no_match", "field_for_other_kind"])
def test_refusals_are_one_line_and_write_nothing(tmp_path, images, capsys, case):
    src = tmp_path / "src"
    src.mkdir()
    jsonl = write_jsonl(src / "c.jsonl", [{"image": "0.jpg", "text": TEXT[0]}])
    out, extra, want = tmp_path / "out", [], ""
    if case == "out_in_source":
        sources, out = [src], src / "out"
        want = f"--output {out} is inside SOURCE {src}"
    elif case == "source_in_out":
        sources, out = [jsonl], src
        want = f"SOURCE {jsonl} is inside --output {src}"
    elif case == "mixed":
        (src / "x.tar").write_bytes(b"")
        sources = [jsonl, src / "x.tar"]
        want = f"SOURCEs mix formats ({jsonl} is jsonl, {src / 'x.tar'} is webdataset)"
    elif case == "unknown":
        sources = [images / "0.jpg"]
        want = f"SOURCE {images / '0.jpg'}: format not recognised"
    elif case == "no_match":
        sources = [src / "*.parquet"]
        want = f"SOURCE {src / '*.parquet'}: no file or folder matches"
    else:
        sources, extra = [jsonl], ["--text-field", "body"]
        want = "--text-field is for --kind text, not --kind caption"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, stdout, err = _main(capsys, *sources, "--kind", "caption", "--images-root", images,
                              "--output", out, *extra)
    assert code == 2 and stdout == [] and len(err) == 1, err
    assert err[0].startswith(f"mm1-prepare-data: {want}"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_img2dataset_folder_is_indexed_in_place_from_the_command_line(tmp_path, capsys):
    from tests._helpers.img2dataset import tree_digest, write_img2dataset

    shards = write_img2dataset(tmp_path / "datacomp", TEXT, shards=3, failed=(1,),
                               missing_shards=(1,), no_image=(9,))
    before = tree_digest(shards.folder)
    out = tmp_path / "caption"
    code, stdout, err = _main(capsys, shards.folder, "--kind", "caption", "--output", out)
    assert code == 0, err
    result = json.loads(stdout[-1])
    assert result["format"] == "webdataset" and result["samples"] == len(shards.good)
    assert result["bad"] == {"failed_download": 1, "missing_image": 1, "missing_shard": 1}
    assert tree_digest(shards.folder) == before and not list(out.rglob("*.tar"))
    assert {s.key: s.segments[1] for s in open_dataset(out).iter_good()} == \
        {k: v[0] for k, v in shards.good.items()}
    # No caption where --caption-field points: nothing usable, one line, OUT as it was.
    manifest = (out / "manifest.json").read_bytes()
    code, stdout, err = _main(capsys, shards.folder / "*.tar", "--kind", "caption",
                              "--caption-field", "no_such_field", "--output", out)
    assert code == 2 and stdout == [] and len(err) == 1, err
    assert err[0].startswith("mm1-prepare-data: no usable samples in "), err
    assert "missing_text" in err[0] and err[0].endswith("the existing dataset is unchanged")
    assert (out / "manifest.json").read_bytes() == manifest and _leftovers(out) == []


def test_dclm_jsonl_zst_and_gzip_text_stream_with_a_cut_file_counted(tmp_path, capsys):
    """DCLM's shards are .jsonl.zst of {"text", "url", ...}; other corpora ship .jsonl.gz /
    .json.gz. Read as streams; a file cut short gives its complete lines, then one skip."""
    import gzip

    import zstandard

    src = tmp_path / "dclm"
    src.mkdir()
    (src / "shard_00000000_processed.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(dclm_lines(range(5))))
    (src / "part-1.jsonl.gz").write_bytes(gzip.compress(dclm_lines(range(5, 9))))
    whole = gzip.compress(dclm_lines(range(9, 40)))
    (src / "part-2.json.gz").write_bytes(whole[:len(whole) // 2])  # a download cut short
    out = tmp_path / "text"
    code, stdout, err = _main(capsys, src, "--kind", "text", "--output", out)
    assert code == 0, err
    result = json.loads(stdout[-1])
    assert result["format"] == "jsonl" and result["bad"] == {"truncated": 1}
    texts = [s.segments[0] for s in open_dataset(out).iter_good()]
    # Files in name order: part-1 (gzip), part-2 (cut), the zstd shard.
    assert texts[:4] == [dclm_record(n)["text"] for n in range(5, 9)]
    assert texts[-5:] == [dclm_record(n)["text"] for n in range(5)]
    cut = texts[4:-5]  # part-2's complete lines, in order, none invented
    assert 0 < len(cut) < 31 and cut == [dclm_record(n)["text"] for n in range(9, 9 + len(cut))]
    assert any("part-2.json.gz" in line and "truncated" in line for line in err), err


def test_obelics_parquet_with_downloaded_images_and_its_bad_rows(tmp_path, images, capsys):
    import pyarrow as pa

    src = tmp_path / "obelics"
    src.mkdir()
    good = [([TEXT[0], None, TEXT[1]], [None, jpeg(0), None]),
            ([None, TEXT[2], None, TEXT[3]], [jpeg(1), None, jpeg(2), None]),
            ([TEXT[4]], [None])]
    bad = [([TEXT[0], TEXT[1]], [None, jpeg(3)]),  # both at position 1: misaligned
           ([None], [jpeg(4)]),  # images only
           ([TEXT[5], None], [None, b""])]  # a zero-byte image
    write_obelics(src / "train-00000-of-00002.parquet", good[:2] + bad, pa.binary())
    # The second file holds local paths (under --images-root) instead of bytes.
    write_obelics(src / "train-00001-of-00002.parquet",
             [([TEXT[5], None], [None, "3.jpg"]), ([None, TEXT[1]], ["9.jpg", None])],
             pa.string())
    out = tmp_path / "interleaved"
    code, stdout, err = _main(capsys, src, "--kind", "interleaved", "--images-root", images,
                              "--output", out)
    assert code == 0, err
    result = json.loads(stdout[-1])
    assert result["format"] == "parquet" and result["samples"] == 3
    assert result["bad"] == {"images_only": 1, "misaligned": 1, "missing_image": 1,
                             "zero_byte_image": 1}
    got = [(s.segments, s.images) for s in open_dataset(out).iter_good()]
    assert got == [([TEXT[0], 0, TEXT[1]], [jpeg(0)]),
                   ([0, TEXT[2], 1, TEXT[3]], [jpeg(1), jpeg(2)]),
                   ([TEXT[5], 0], [(images / "3.jpg").read_bytes()])]
    assert any("train-00000-of-00002.parquet:3: skipped: misaligned" in line for line in err)


def test_obelics_as_published_with_image_urls_is_refused_in_one_line(tmp_path, capsys):
    import pyarrow as pa

    src = write_obelics(tmp_path / "obelics.parquet",
                   [([TEXT[0], None], [None, "https://example.org/cat.jpg"])], pa.string())
    out = tmp_path / "interleaved"
    code, stdout, err = _main(capsys, src, "--kind", "interleaved", "--output", out)
    assert code == 2 and stdout == [] and len(err) == 1, err
    assert "images are URLs" in err[0] and "never downloads" in err[0], err
    assert not out.exists() and _leftovers(out) == []


def test_fineweb_parquet_text(tmp_path, capsys):
    n = 7
    texts = [f"{TEXT[i % len(TEXT)]} ({i})" for i in range(n)]
    texts[3] = "   "  # a blank document
    write_fineweb(tmp_path / "000_00000.parquet", texts)
    out = tmp_path / "text"
    code, stdout, err = _main(capsys, tmp_path / "000_00000.parquet", "--kind", "text",
                              "--output", out)
    assert code == 0, err
    result = json.loads(stdout[-1])
    assert (result["format"], result["samples"], result["bad"]) == ("parquet", 6,
                                                                    {"empty_text": 1})
    assert [s.segments[0] for s in open_dataset(out).iter_good()] == \
        [t for i, t in enumerate(texts) if i != 3]


def test_mmc4_documents_with_their_image_folder(tmp_path, images, capsys):
    """MMC4's docs_shard_N_v2.jsonl: each image goes before the sentence it was matched to."""
    src = tmp_path / "mmc4"
    src.mkdir()
    write_jsonl(src / "docs_shard_0_v2.jsonl", [
        mmc4_doc([TEXT[0], TEXT[1], TEXT[2]], [("2.jpg", 1), ("0.jpg", 0), ("1.jpg", 1)]),
        mmc4_doc([TEXT[3]], [("9.jpg", 0)]),  # its image was never downloaded
        mmc4_doc([TEXT[4]], [("3.jpg", 5)]),  # matched to a sentence it does not have
        mmc4_doc([TEXT[5], TEXT[0]], [])])
    out = tmp_path / "interleaved"
    code, stdout, err = _main(capsys, src, "--kind", "interleaved", "--images-root", images,
                              "--output", out)
    assert code == 0, err
    result = json.loads(stdout[-1])
    assert (result["format"], result["samples"], result["bad"]) == \
        ("mmc4", 2, {"bad_json": 1, "missing_image": 1})
    got = [(s.segments, s.images) for s in open_dataset(out).iter_good()]
    jpg = {n: (images / f"{n}.jpg").read_bytes() for n in range(3)}
    assert got == [([0, TEXT[0], 1, 2, TEXT[1], TEXT[2]], [jpg[0], jpg[2], jpg[1]]),
                   ([TEXT[5], TEXT[0]], [])]

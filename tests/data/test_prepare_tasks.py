"""mm1-prepare-data as DataTrove tasks on one machine: a failed task is named, the rerun runs
only it and the merge, and the index is byte-identical whatever the task count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1_megatron.data.prepare import main
from mm1_megatron.data.prepare_tasks import FAULT
from tests._helpers.data import TEXT
from tests._helpers.img2dataset import tree_digest, write_img2dataset


def _run(capsys, *argv) -> tuple[int, list[str], list[str]]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err.splitlines()


def _task_logs(out: Path) -> dict[str, str]:
    logs = out.with_name(out.name + ".incomplete") / "logs" / "index" / "logs"
    return {p.name: p.read_text() for p in sorted(logs.glob("task_*.log"))}


def test_a_failed_task_is_rerun_alone_and_the_index_matches_one_task(tmp_path, capsys,
                                                                      monkeypatch):
    from mm1_megatron.data.sources.webdataset import index_in_place

    source = write_img2dataset(tmp_path / "src", TEXT, shards=20, samples_per_shard=5,
                               failed=(7, 52), missing_shards=(11,), no_image=(30,))
    args = [source.folder, "--kind", "caption", "--no-progress"]
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT, "2")
    code, stdout, err = _run(capsys, *args, "--output", out, "--tasks", 4, "--workers", 2)
    assert code == 1 and stdout == [] and not out.exists() and len(err) == 1, err
    assert err[0].startswith("mm1-prepare-data: task 2 of 4 failed: MM1_FAULT_PREPARE_TASK=2: "
                             "task 2 fails (fault injection) (log: ") and \
        err[0].endswith("run the same command again to run it and the merge"), err
    first = _task_logs(out)
    assert sorted(first) == [f"task_{r:05d}.log" for r in range(4)]
    assert "fault injection" in first["task_00002.log"]

    # Another task count on the half-done preparation: refused, nothing changed.
    code, stdout, err = _run(capsys, *args, "--output", out, "--tasks", 3)
    assert code == 2 and len(err) == 1 and "holds a half-done preparation in 4 tasks; rerun " \
        "with --tasks 4" in err[0], err
    monkeypatch.delenv(FAULT)
    before = _task_logs(out)
    code, stdout, err = _run(capsys, *args, "--output", out, "--tasks", 4, "--workers", 2)
    assert code == 0, err[-5:]
    summary = json.loads(stdout[-1])
    assert (summary["tasks"], summary["samples"], summary["bad"]) == \
        (4, 19 * 5 - 3, {"failed_download": 2, "missing_image": 1, "missing_shard": 1})
    after = {p.name: p.read_text() for p in sorted((out / "logs" / "index" / "logs").glob(
        "task_*.log"))}
    assert {k: after[k] == before[k] for k in after} == {  # only task 2 ran again
        "task_00000.log": True, "task_00001.log": True, "task_00002.log": False,
        "task_00003.log": True}
    assert not out.with_name("out.incomplete").exists()

    one = tmp_path / "one"
    assert _run(capsys, *args, "--output", one)[0] == 0
    serial = tmp_path / "serial"
    serial.mkdir()
    index_in_place([source.folder], "caption", serial)  # one process, np.save
    for name in ("samples.npy", "images.npy"):
        data = (out / "index" / name).read_bytes()
        assert data == (one / "index" / name).read_bytes() == \
            (serial / "index" / name).read_bytes(), name
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (out, one, serial)]
    assert manifests[0] == manifests[1] == manifests[2]
    assert tree_digest(out / "index") == tree_digest(one / "index")


def test_interleaved_tokens_merge_the_same_in_any_task_count(tmp_path, capsys, demo_data):
    """MINT-1T documents with the token index: parts' image and segment offsets rebased, so
    three tasks (one of them over no shard) give one task's index byte for byte."""
    from tests._helpers.mint import write_mint

    mint = write_mint(tmp_path / "mint", TEXT, docs=5, shards=2, misaligned=(3,))
    args = [mint.folder, "--kind", "interleaved", "--no-progress", "--tokenizer",
            demo_data / "tokenizer.model"]
    results = {}
    for tasks in (1, 3):
        out = tmp_path / f"tasks{tasks}"
        code, stdout, err = _run(capsys, *args, "--output", out, "--tasks", tasks)
        assert code == 0, err[-5:]
        results[tasks] = json.loads(stdout[-1])
        assert tree_digest(out / "index") == tree_digest(tmp_path / "tasks1" / "index")
    assert results[3]["samples"] == results[1]["samples"] == 9
    assert results[3]["text_tokens"] == results[1]["text_tokens"] > 0
    assert sorted(p.name for p in (tmp_path / "tasks3" / "index").iterdir()) == [
        "images.npy", "samples.npy", "segment_offsets.npy", "segments.npy"]


def test_converted_files_give_one_dataset_whatever_the_task_count(tmp_path, capsys):
    """Converted sources run in units of files (about --shard-size-mb of source each): the
    shards, their index and the manifest are byte-identical in 1 task and in 4 on 2 workers,
    a bad line is counted and listed once either way."""
    from tests._helpers.data import write_jsonl

    src = tmp_path / "src"
    src.mkdir()
    for n in range(6):
        records = [{"text": f"{TEXT[(n + i) % len(TEXT)]} (file {n}, line {i})"}
                   for i in range(40)]
        write_jsonl(src / f"part-{n}.jsonl", records)
    with open(src / "part-3.jsonl", "a") as f:
        f.write("{not json\n")
    dumps = {}
    for tasks, workers in ((1, 1), (4, 2)):
        out = tmp_path / f"tasks{tasks}"
        code, stdout, err = _run(capsys, src, "--kind", "text", "--output", out,
                                 "--no-progress", "--shard-size-mb", "0.005", "--tasks",
                                 tasks, "--workers", workers)
        assert code == 0, err[-5:]
        summary = json.loads(stdout[-1])
        assert (summary["samples"], summary["bad"]) == (240, {"bad_json": 1})
        listed = [line for line in err if ": skipped: " in line]
        assert len(listed) == 1 and listed[0].startswith(
            f"{src / 'part-3.jsonl'}:41: skipped: bad_json"), err
        dumps[tasks] = {name: digest for name, digest in tree_digest(out).items()
                        if not name.startswith(("logs/", "plan.json"))}
        assert summary["shards"] > 3  # the units cut the shards, several per preparation
    assert dumps[1] == dumps[4]


def test_a_token_index_added_in_tasks_equals_one_made_while_preparing(tmp_path, capsys,
                                                                      demo_data, monkeypatch):
    """tools/index_tokens.py's path (`add_token_index`): tasks over slices of the shards, one
    failing and rerun alone, give the token index preparing with --tokenizer gives."""
    import numpy as np

    from mm1_megatron.data.prepare_tasks import TaskFailure, add_token_index
    from tests._helpers.mint import write_mint

    mint = write_mint(tmp_path / "mint", TEXT, docs=4, shards=3, images_only=(2,))
    tokenizer = demo_data / "tokenizer.model"
    args = [mint.folder, "--kind", "interleaved", "--no-progress"]
    assert _run(capsys, *args, "--output", tmp_path / "with", "--tokenizer", tokenizer)[0] == 0
    later = tmp_path / "later"
    assert _run(capsys, *args, "--output", later)[0] == 0
    monkeypatch.setenv(FAULT, "1")
    with pytest.raises(TaskFailure, match="task 1 of 3 failed"):
        add_token_index(later, str(tokenizer), tasks=3)
    monkeypatch.delenv(FAULT)
    manifest = add_token_index(later, str(tokenizer), tasks=3)
    for name in ("segments.npy", "segment_offsets.npy"):
        assert (later / "index" / name).read_bytes() == \
            (tmp_path / "with" / "index" / name).read_bytes(), name
    good = [np.load(d / "index" / "samples.npy") for d in (later, tmp_path / "with")]
    assert np.array_equal(good[0]["text_tokens"][good[0]["bad"] == 0],
                          good[1]["text_tokens"][good[1]["bad"] == 0])
    assert manifest["text_tokens"] == json.loads(
        (tmp_path / "with" / "manifest.json").read_text())["text_tokens"] > 0
    assert not (later / "logs" / "token-index" / "plan.json").exists()


def test_sources_given_as_fsspec_urls_prepare_as_the_local_files_do(tmp_path, capsys):
    """SOURCE and --images-root as fsspec URLs: MMC4 documents (gzip) with their images in
    fsspec's memory filesystem (one worker: in this process) and FineWeb parquet through a
    file:// URL in 2 tasks on 2 workers give the local files' shards and index byte for byte;
    tars, which are indexed in place, are refused in one line (mount them)."""
    import gzip

    import fsspec

    from tests._helpers.data import jpeg
    from tests._helpers.sources import mmc4_doc, write_fineweb

    src, images = tmp_path / "mmc4", tmp_path / "images"
    src.mkdir()
    images.mkdir()
    for n in range(4):
        (images / f"img{n}.jpg").write_bytes(jpeg(n))
    docs = [mmc4_doc([TEXT[i % len(TEXT)], TEXT[(i + 1) % len(TEXT)]],
                     [(f"img{i % 4}.jpg", i % 2)]) for i in range(12)]
    docs.append(mmc4_doc([TEXT[0]], [("absent.jpg", 0)]))  # skipped: missing_image
    for shard in range(2):
        lines = "".join(json.dumps(d) + "\n" for d in docs[shard::2])
        (src / f"docs_shard_{shard}_v2.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    fineweb = write_fineweb(tmp_path / "fineweb.parquet", [t * 3 for t in TEXT])

    memory = fsspec.filesystem("memory")
    memory.put(str(src), "/bucket/mmc4", recursive=True)
    memory.put(str(images), "/bucket/images", recursive=True)
    try:
        runs = {"mmc4": (src, images, 1, 1, "interleaved"),
                "mmc4-url": ("memory://bucket/mmc4", "memory://bucket/images", 1, 1,
                             "interleaved"),
                "fineweb": (fineweb, ".", 1, 1, "text"),
                "fineweb-url": (f"file://{fineweb}", ".", 2, 2, "text")}
        dumps = {}
        for name, (source, root, tasks, workers, kind) in runs.items():
            out = tmp_path / "out" / name
            code, stdout, err = _run(capsys, source, "--kind", kind, "--images-root", root,
                                     "--output", out, "--no-progress", "--tasks", tasks,
                                     "--workers", workers)
            assert code == 0, (name, err[-5:])
            summary = json.loads(stdout[-1])
            assert summary["samples"] == (12 if kind == "interleaved" else len(TEXT)), name
            assert summary["bad"] == ({"missing_image": 1} if kind == "interleaved" else {})
            dumps[name] = {n: d for n, d in tree_digest(out).items()
                           if n.startswith(("index/", "shards/"))}
            assert dumps[name], name
        assert dumps["mmc4-url"] == dumps["mmc4"]
        # the progress bar's record count reads through the URL too (unknown for .gz)
        from mm1_megatron.data.sources import FORMATS
        from mm1_megatron.data.sources.urls import source_path

        assert FORMATS["mmc4"].count([source_path("memory://bucket/mmc4")]) is None
        memory.pipe("/bucket/plain.jsonl", b'{"text": "a"}\n\n{"text": "b"}\n')
        assert FORMATS["jsonl"].count([source_path("memory://bucket/plain.jsonl")]) == 2
        assert dumps["fineweb-url"] == dumps["fineweb"]

        write_img2dataset(tmp_path / "tars", ["a cat", "a dog"], shards=1)
        memory.put(str(tmp_path / "tars"), "/bucket/tars", recursive=True)
        code, stdout, err = _run(capsys, "memory://bucket/tars", "--kind", "caption",
                                 "--output", tmp_path / "refused", "--no-progress")
        assert code == 2 and len(err) == 1 and "memory:///bucket/tars" in err[0] \
            and "mount" in err[0], err
        assert not (tmp_path / "refused").exists()
    finally:
        memory.rm("/bucket", recursive=True)

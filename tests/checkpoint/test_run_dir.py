"""No checkpoint is lost in any order of start, restart and start-over: retention by recency,
`checkpoint.resume=false` refused on a run's checkpoints unless `checkpoint.overwrite=true`, a
missing `latest` resumes from the newest complete checkpoint, and resuming with another model
shape is refused before anything is written."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mm1_megatron.checkpoint.directory import complete_checkpoints, prune
from tests import _procs

REPO = Path(__file__).resolve().parents[2]


def train(data: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mm1_megatron.cli", "--preset", "tiny", f"data.path={data}",
           f"data.tokenizer_model={data}/tokenizer.model", "llm.vocab_size=2048",
           f"run_dir={run_dir}", "train.warmup_steps=0", "checkpoint.save_interval=1",
           *overrides]
    return _procs.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                      env={**os.environ, "PYTHONWARNINGS": "ignore"})


def names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def two_steps(demo_data, tmp_path_factory):
    """The tiny run both tests below start from: 2 steps, a checkpoint after each. Each test
    takes a copy, as a user moves a run directory (the command's run_dir is the one used)."""
    run_dir = tmp_path_factory.mktemp("two_steps") / "run"
    first = train(demo_data, run_dir, "train.train_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run_dir, tmp_path / "run", symlinks=True))


def test_retention_keeps_the_newest_saves_not_the_highest_steps(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step_00000010", "step_00000002", "step_00000003"):  # saved in this order
        (root / name).mkdir(parents=True)
        (root / name / "x").write_text(name)
        time.sleep(0.02)
    now = time.time()
    for age, name in ((30, "step_00000010"), (20, "step_00000002"), (10, "step_00000003")):
        os.utime(root / name, (now - age, now - age))
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "step_00000010", "step_00000002", "step_00000003"]
    prune(root, keep_last=2, keep="step_00000003")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000003"]


@pytest.mark.slow
def test_start_over_restart_and_a_lost_latest_lose_nothing(demo_data, two_steps, tmp_path):
    run_dir = copy_of(two_steps, tmp_path)
    assert names(run_dir) == ["latest", "step_00000001", "step_00000002"]
    config = (run_dir / "config.yaml").read_bytes()

    # Starting over on them is refused in one line; nothing is touched.
    over = train(demo_data, run_dir, "train.train_steps=2", "checkpoint.resume=false")
    assert over.returncode == 2
    assert over.stderr.strip().splitlines() == [over.stderr.strip()]
    assert over.stderr.startswith("mm1-train: config error: checkpoint.resume: false, but")
    assert names(run_dir) == ["latest", "step_00000001", "step_00000002"]

    # Resuming with another model shape: refused before config.yaml is replaced.
    other = train(demo_data, run_dir, "train.train_steps=3", "llm.hidden_size=128")
    assert other.returncode == 2
    assert "llm.hidden_size 64 -> 128" in other.stderr and len(other.stderr.splitlines()) == 1
    assert (run_dir / "config.yaml").read_bytes() == config

    # `latest` lost: the newest complete checkpoint is resumed, with a warning.
    (run_dir / "checkpoints" / "latest").unlink()
    again = train(demo_data, run_dir, "train.train_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "latest is missing; using the newest complete checkpoint, step_00000002" \
        in again.stderr
    assert "at step 2" in again.stdout
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000003"

    # Asked for: start over, the old checkpoints go.
    fresh = train(demo_data, run_dir, "train.train_steps=1", "checkpoint.resume=false",
                  "checkpoint.overwrite=true")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert names(run_dir) == ["latest", "step_00000001"]


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(demo_data, two_steps, tmp_path):
    run_dir = copy_of(two_steps, tmp_path)
    step2 = run_dir / "checkpoints" / "step_00000002"
    assert (step2 / "files.json").is_file()  # sizes and end sums, written with the save
    # The Megatron-Core that wrote it is recorded; a later release's checkpoint is refused.
    from mm1_megatron.checkpoint.directory import write_manifest
    from mm1_megatron.runtime.mcore_version import MCORE

    record, manifest = step2 / "written_by.json", step2 / "files.json"
    assert json.loads(record.read_text())["megatron_core"] == str(MCORE)
    originals = record.read_bytes(), manifest.read_bytes()
    record.write_text(json.dumps({"megatron_core": "9.1.0"}))
    write_manifest(step2)  # as that release would have written it: not damaged
    newer = train(demo_data, run_dir, "train.train_steps=3")
    assert newer.returncode == 2 and len(newer.stderr.strip().splitlines()) == 1, newer.stderr
    assert "written by Megatron-Core 9.1.0" in newer.stderr and str(MCORE) in newer.stderr
    record.write_bytes(originals[0])
    manifest.write_bytes(originals[1])
    shard = sorted(step2.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    again = train(demo_data, run_dir, "train.train_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    warning = [line for line in again.stderr.splitlines() if "damaged" in line]
    assert len(warning) == 1 and shard.name in warning[0]
    assert "using the newest complete checkpoint, step_00000001" in warning[0]
    assert "at step 1" in again.stdout
    # None left intact: one line, nothing started.
    for checkpoint in (run_dir / "checkpoints").glob("step_*"):
        for shard in checkpoint.glob("*.distcp"):  # every Megatron-Core writes these
            shard.write_bytes(b"")
    none = train(demo_data, run_dir, "train.train_steps=4")
    assert none.returncode == 2
    assert none.stderr.startswith("mm1-train: config error: run_dir: no usable checkpoint in")
    assert len(none.stderr.strip().splitlines()) == 1


def _tensorboard(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


@pytest.mark.slow
def test_data_counters_continue_on_resume_and_another_dataset_is_refused(demo_data, tmp_path):
    """Undecodable images and images dropped at the per-row limit are counted, and the counts
    continue after a resume (they restarted at 0); resuming on another dataset is refused
    unless data.allow_change=true (the old position was applied to new data silently)."""
    from mm1_megatron.data.shard_writer import RawSample, write_dataset
    from tests._helpers.data import jpeg

    def dataset(root: Path, docs: int) -> Path:
        bad = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
        # Interleaved documents of 3 images with a limit of 2 per row: one image of each
        # document is dropped; every third document holds an undecodable image.
        samples = [RawSample([f"story {i}", 0, "then", 1, "and", 2, "end"],
                             [("jpg", bad if i % 3 == 0 and j == 0 else jpeg(i + j, (48, 32)))
                              for j in range(3)]) for i in range(docs)]
        from mm1_megatron.data.tokenizer import Tokenizer

        write_dataset(samples, root / "interleaved", "interleaved",
                      tokenizer=Tokenizer.load(demo_data / "tokenizer.model"))
        (root / "tokenizer.model").write_bytes((demo_data / "tokenizer.model").read_bytes())
        return root

    data = dataset(tmp_path / "data", 9)
    mix = ["data.weight_caption=0", "data.weight_text=0", "data.max_images_per_sequence=2",
           "data.prefetch=0"]
    run_dir = tmp_path / "run"
    assert train(data, run_dir, *mix, "train.train_steps=2").returncode == 0
    again = train(data, run_dir, *mix, "train.train_steps=4")
    assert again.returncode == 0, again.stderr[-3000:]
    for tag in ("data/skipped_undecodable_image", "data/dropped_images_row_limit"):
        counts = _tensorboard(run_dir, tag)
        assert sorted(counts) == [1, 2, 3, 4], tag
        assert counts[1] > 0 and all(counts[s + 1] >= counts[s] for s in (1, 2, 3)), (tag, counts)

    other = dataset(tmp_path / "other", 12)
    refused = train(other, run_dir, *mix, "train.train_steps=5")
    assert refused.returncode == 2
    assert refused.stderr.startswith("mm1-train: config error: data.path: ")
    assert "interleaved changed" in refused.stderr and len(refused.stderr.splitlines()) == 1
    allowed = train(other, run_dir, *mix, "train.train_steps=5", "data.allow_change=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]

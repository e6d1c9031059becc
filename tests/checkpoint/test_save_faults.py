"""A save that cannot complete loses nothing: on a full disk (a real tmpfs, mounted for the
test) the run stops with one line saying so and exit status 4, leaves no `.partial`, keeps
`latest` on the last complete checkpoint, and the next start resumes from it; an asynchronous
save that fills the disk in its background writer stops the run the same way."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests import _procs

pytestmark = [pytest.mark.mcore, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT_MB = 8.4  # one checkpoint of `tiny` with the demo vocabulary (measured)


def train(data: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mm1_megatron.cli", "--preset", "tiny", f"data.path={data}",
           f"data.tokenizer_model={data}/tokenizer.model", "llm.vocab_size=2048",
           f"run_dir={run_dir}", "train.warmup_steps=1", "checkpoint.save_interval=1",
           "checkpoint.keep_last=5", *overrides]
    return _procs.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                      env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs at the run's checkpoint folder (root, as CI is); unmount after."""
    mounts = []

    def mount(path: Path, megabytes: float) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(megabytes * 1024)}k",
                                 "tmpfs", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"cannot mount a tmpfs (root needed): {result.stderr}"
        mounts.append(path)
        return path

    yield mount
    for path in reversed(mounts):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def stop_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("mm1-train:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_full_disk_before_the_save_keeps_latest_and_the_run_resumes(demo_data, tmp_path, tmpfs):
    run_dir = tmp_path / "run"
    checkpoints = tmpfs(run_dir / "checkpoints", 1.5 * CHECKPOINT_MB)  # room for one
    first = train(demo_data, run_dir, "train.train_steps=3")
    assert first.returncode == 4, first.stdout[-2000:] + first.stderr[-2000:]
    line = stop_line(first)
    assert "step 2 not saved: no space left on device" in line and "GB free" in line, line
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    # Room again (the tmpfs grows in place): the next start resumes from step 1.
    subprocess.run(["mount", "-o", f"remount,size={int(4 * CHECKPOINT_MB * 1024)}k",
                    str(checkpoints)], check=True)
    again = train(demo_data, run_dir, "train.train_steps=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and "at step 1" in again.stdout
    assert (checkpoints / "latest").read_text().strip() == "step_00000003"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_disk_filling_during_the_write_leaves_no_partial(demo_data, tmp_path, tmpfs, async_save):
    """Async: the forked writer hits ENOSPC while training goes on; the failure reaches the
    step loop when the save is finalized, with the same line and status."""
    run_dir = tmp_path / "run"
    checkpoints = tmpfs(run_dir / "checkpoints", 0.5 * CHECKPOINT_MB)  # not even one
    result = train(demo_data, run_dir, "train.train_steps=2",
                   f"checkpoint.async_save={str(async_save).lower()}")
    assert result.returncode == 4, result.stdout[-2000:] + result.stderr[-2000:]
    line = stop_line(result)
    assert "step 1 not saved: no space left on device" in line, line
    assert not any(p.name.endswith(".partial") for p in checkpoints.iterdir())
    assert not (checkpoints / "latest").exists()

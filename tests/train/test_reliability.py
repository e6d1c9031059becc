"""Reliability at scale, on real processes: asynchronous checkpoint saves (training goes on
while a forked writer writes; SIGUSR1 waits for it; SIGKILL mid-write keeps the previous
checkpoint), and the hang watchdog (a rank that stops before a collective leaves its peer
waiting in it; within the timeout both write their stacks and exit 75 for a requeue)."""

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import psutil
import pytest

from mm1_megatron.runtime.distributed import subgroup_timeout_minutes
from mm1_megatron.runtime.faults import HANG, SLOW_SAVE
from mm1_megatron.runtime.watchdog import (FLIGHT_RECORDER_ENTRIES, collective_timeout,
                                           enable_flight_recorder)
from tests._procs import free_port, sigkill_at_line
from tests import _procs

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 8  # a tiny step takes ~0.2 s here; 40 x that is a hang


def rank_command(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mm1_megatron.cli", "--preset", "tiny", f"data.path={data}",
            f"data.tokenizer_model={data}/tokenizer.model", "llm.vocab_size=2048",
            f"run_dir={run_dir}", "train.warmup_steps=1", "logging.log_interval=1",
            f"train.hang_timeout_s={TIMEOUT_S}", "train.hang_timeout_slow_s=120", *overrides]


@pytest.mark.slow
@pytest.mark.mcore
@pytest.mark.multirank
def test_a_rank_stopped_before_a_collective_ends_both_ranks_with_75(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), HANG: "1:3"}
        log = (tmp_path / f"rank{rank}.log").open("w+")
        procs.append(_procs.popen(rank_command(demo_data, run_dir, "train.train_steps=6"),
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  text=True))
        logs.append(log)
    try:
        deadline = time.monotonic() + 240
        while "step      2/6" not in (tmp_path / "rank0.log").read_text():
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.1)
        step_2 = time.monotonic()
        for p in procs:
            p.wait(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - step_2
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = [(tmp_path / f"rank{rank}.log").read_text() for rank in range(2)]
    assert [p.returncode for p in procs] == [75, 75], out[0][-3000:] + out[1][-3000:]
    assert TIMEOUT_S - 1 <= waited <= TIMEOUT_S + 30, waited
    # The flight recorder names the collective: rank 0 waits in one, rank 1 is in none (the
    # rank a 256-rank job waits for).
    collective = {0: r"waiting in gloo:\w+ #\d+ on \S+", 1: "in no collective"}
    for rank in range(2):
        lines = [ln for ln in out[rank].splitlines() if ln.startswith("mm1-train:")]
        assert len(lines) == 1 and re.fullmatch(
            f"mm1-train: rank {rank}: hang: step 3 did not complete within {TIMEOUT_S} s "
            f"\\(last completed step 2\\); {collective[rank]}; stacks in "
            f"{re.escape(str(run_dir / 'hang' / f'rank_{rank}.txt'))}; exiting 75 for a "
            "requeue", lines[0]), lines
        report = (run_dir / "hang" / f"rank_{rank}.txt").read_text()
        assert "last completed step: 2" in report and "most recent call first" in report
        assert "collectives (torch flight recorder):" in report
        assert ("  in flight: gloo:" in report) == (rank == 0), report[:3000]
    # The waiting frames: rank 1 stopped in the fault, rank 0 waits for it in a collective.
    hung = (run_dir / "hang" / "rank_1.txt").read_text()
    waiting = (run_dir / "hang" / "rank_0.txt").read_text()
    assert "in hang_before_step" in hung
    main = next(block for block in waiting.split("\n\n") if "in train_step" in block)
    assert "torch/distributed" in main.splitlines()[1], main  # its innermost frame
    assert not (run_dir / "hang" / "rank_2.txt").exists()


@pytest.mark.mcore
def test_the_collective_timeout_sits_above_the_watchdog():
    assert collective_timeout(0, 0) == timedelta(minutes=10)  # off: torch's default
    assert collective_timeout(600, 1800) == timedelta(seconds=1860)
    assert collective_timeout(8, 0) == timedelta(minutes=10)  # never below the default
    assert collective_timeout(300, 0) == timedelta(seconds=1560)  # 5 x 300 + 60
    # Megatron-Core's subgroups (where TP / DP collectives run) take whole minutes: never
    # fewer than the margin, e.g. a 1000 s allowance gives 1060 s -> 18 min, not 17.
    for step_s, slow_s in ((600, 1800), (100, 1000), (8, 0), (300, 659), (45, 0)):
        pg = collective_timeout(step_s, slow_s)
        assert subgroup_timeout_minutes(pg) * 60 >= pg.total_seconds(), (step_s, slow_s)
        assert subgroup_timeout_minutes(pg) * 60 < pg.total_seconds() + 60


def test_the_flight_recorder_is_switched_on_unless_the_environment_says(monkeypatch):
    for name in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"):
        monkeypatch.delenv(name, raising=False)
    enable_flight_recorder()
    assert os.environ["TORCH_FR_BUFFER_SIZE"] == os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] \
        == str(FLIGHT_RECORDER_ENTRIES)
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE")
    monkeypatch.setenv("TORCH_NCCL_TRACE_BUFFER_SIZE", "0")  # a user's "off", by the old name
    enable_flight_recorder()
    assert "TORCH_FR_BUFFER_SIZE" not in os.environ


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return _procs.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                      env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def scalars(run_dir: Path, tag: str) -> list[dict[int, float]]:
    """{step: value} of `tag`, one dict per events file (per start of the run), oldest first."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"),
                         key=lambda p: p.stat().st_mtime_ns):
        acc = EventAccumulator(str(events))
        acc.Reload()
        out.append({e.step: e.value for e in acc.Scalars(tag)}
                   if tag in acc.Tags()["scalars"] else {})
    return out


ASYNC = ["checkpoint.async_save=true"]


@pytest.mark.slow
def test_async_saves_overlap_training_and_sigusr1_waits_for_the_write(demo_data, tmp_path):
    # Saves at 3 and 6 and the last step's, each held 1.5 s in the writer: the save of step 6
    # is due while step 3's is still being written, and waits for it (logged).
    run_dir = tmp_path / "run"
    done = run(rank_command(demo_data, run_dir, "train.train_steps=8",
                            "checkpoint.save_interval=3", *ASYNC), **{SLOW_SAVE: "1.5"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "checkpoints: written in the background (megatron-core" in out or \
        "(nvidia-resiliency-ext)" in out
    assert out.index("checkpoint: step 3 is being written in the background") < \
        out.index("step      4/8") < out.index("saved checkpoint at step 3")
    assert "checkpoint: the save of step 6 waited" in out and "for the save of step 3" in out
    for step in (3, 6, 8):
        assert f"saved checkpoint at step {step}" in out
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    blocking = scalars(run_dir, "perf/checkpoint_blocking_s")[-1]
    write = scalars(run_dir, "perf/checkpoint_write_s")[-1]
    assert blocking[4] < 1.5 <= write[7], (blocking, write)  # step 3's save: logged next step

    # SIGUSR1 while a save is in flight: exit 75 only once it and the stop's save are written.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", SLOW_SAVE: "3"}
    proc = _procs.popen(rank_command(demo_data, run_dir, "train.train_steps=200",
                                     "checkpoint.save_interval=10", *ASYNC),
                        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("checkpoint: step 10 is being written in the background"):
                proc.send_signal(signal.SIGUSR1)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 75, err[-3000:]
    stopped = int(err.split("mm1-train: stopped at step ")[1].split(":")[0])
    assert out.index("saved checkpoint at step 10") < out.index(f"saved checkpoint at step "
                                                                f"{stopped}")
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"
    again = run(rank_command(demo_data, run_dir, f"train.train_steps={stopped + 1}", *ASYNC))
    assert again.returncode == 0 and f"at step {stopped}" in again.stdout, again.stderr[-3000:]


@pytest.mark.slow
def test_sigkill_during_an_async_write_resumes_bitwise_from_the_previous(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    steps = ["train.train_steps=6", "checkpoint.save_interval=2", *ASYNC]
    # Step 2's save is written at once; step 4's is held in its writer until the kill.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", SLOW_SAVE: "60:4"}
    proc = _procs.popen(rank_command(demo_data, run_dir, *steps), cwd=REPO, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    # Steps 5 and 6 train for a second while the writer holds.
    writers = sigkill_at_line(proc, "checkpoint: step 4 is being written in the background",
                              after_s=1.0)
    assert writers, "no background writer process was running"
    gone, alive = psutil.wait_procs(writers, timeout=10)
    assert not alive, "the background writer outlived the killed trainer"
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert not (root / "step_00000004").exists()
    resumed = run(rank_command(demo_data, run_dir, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout
    killed_run, resumed_run = scalars(run_dir, "loss/lm")[-2:]
    assert {1, 2, 3, 4} <= set(killed_run) and sorted(resumed_run) == [3, 4, 5, 6]
    same = [s for s in resumed_run if s in killed_run]
    assert all(resumed_run[s] == killed_run[s] for s in same), (killed_run, resumed_run)

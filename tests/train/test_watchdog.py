"""The hang watchdog on real gloo ranks: a rank that stops before a collective leaves its peer
waiting in it; within the timeout both ranks write their stacks and exit 75 (requeue)."""

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from mm1_megatron.runtime.faults import HANG
from mm1_megatron.runtime.watchdog import collective_timeout
from tests._procs import free_port

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 8  # a tiny step takes ~0.2 s here; 40 x that is a hang


def rank_command(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mm1_megatron.cli", "--preset", "tiny", f"data.path={data}",
            f"data.tokenizer_model={data}/tokenizer.model", "llm.vocab_size=2048",
            f"run_dir={run_dir}", "train.warmup_steps=1", "logging.log_interval=1",
            f"train.hang_timeout_s={TIMEOUT_S}", "train.hang_timeout_slow_s=120", *overrides]


def test_a_rank_stopped_before_a_collective_ends_both_ranks_with_75(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
               "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), HANG: "1:3"}
        log = (tmp_path / f"rank{rank}.log").open("w+")
        procs.append(subprocess.Popen(rank_command(demo_data, run_dir, "train.train_steps=6"),
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
    for rank in range(2):
        lines = [ln for ln in out[rank].splitlines() if ln.startswith("mm1-train:")]
        assert lines == [f"mm1-train: rank {rank}: hang: step 3 did not complete within "
                         f"{TIMEOUT_S} s (last completed step 2); stacks in "
                         f"{run_dir / 'hang' / f'rank_{rank}.txt'}; exiting 75 for a requeue"]
        report = (run_dir / "hang" / f"rank_{rank}.txt").read_text()
        assert "last completed step: 2" in report and "most recent call first" in report
    # The waiting frames: rank 1 stopped in the fault, rank 0 waits for it in a collective.
    hung = (run_dir / "hang" / "rank_1.txt").read_text()
    waiting = (run_dir / "hang" / "rank_0.txt").read_text()
    assert "in hang_before_step" in hung
    main = next(block for block in waiting.split("\n\n") if "in train_step" in block)
    assert "torch/distributed" in main.splitlines()[1], main  # its innermost frame
    assert not (run_dir / "hang" / "rank_2.txt").exists()


def test_the_collective_timeout_sits_above_the_watchdog():
    assert collective_timeout(0, 0) == timedelta(minutes=10)  # off: torch's default
    assert collective_timeout(600, 1800) == timedelta(seconds=1860)
    assert collective_timeout(8, 0) == timedelta(minutes=10)  # never below the default
    assert collective_timeout(300, 0) == timedelta(seconds=1560)  # 5 x 300 + 60

"""`mm1-gpu-check` on a machine without a GPU: one line and exit 0; with --cpu-parts (what CI
runs) the CPU-checkable checks pass and every GPU-only one reports a skip, in one JSON line."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from tests import _procs


def run(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mm1-gpu-check")
    assert exe, "the mm1-gpu-check console script is not installed (pip install -e .)"
    return _procs.run([exe, *args], capture_output=True, text=True, timeout=600,
                      env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0():
    out = run()
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [out.stdout.strip()]
    assert "no CUDA GPU" in out.stdout


@pytest.mark.slow
def test_cpu_parts_pass_and_gpu_checks_skip(demo_data):
    from mm1_megatron.gpu_check import CHECKS, GPU_ONLY

    out = run("--cpu-parts", "--steps", "3", "--data", str(demo_data))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    status = {c["name"]: c for c in summary["checks"]}
    assert list(status) == [name for name, _ in CHECKS]  # every check, once, in order
    assert summary["failed"] == 0 and summary["device"] == "cpu"
    from mm1_megatron.runtime.mcore_version import MCORE

    assert summary["versions"]["megatron_core"] == str(MCORE)
    assert summary["versions"]["torch"] == torch.__version__
    for name, check in status.items():
        assert check["status"] == ("skip" if name in GPU_ONLY else "pass"), check
        lines = [line for line in out.stdout.splitlines() if line.split(" ", 1)[-1]
                 .startswith(f"{name}:")]
        assert len(lines) == 1 and lines[0].startswith(check["status"].upper())
    assert status["host_syncs"]["figures"]["per_step"] and \
        max(status["host_syncs"]["figures"]["per_step"][1:]) <= 8
    losses = status["demo_bf16_steps"]["figures"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "predicted" in status["decoder_slice_vs_plan"]["detail"]  # the planner side ran
    resumed = status["async_save_resume"]["figures"]  # from the background save of step 1
    assert len(resumed["resumed"]) == 2 and resumed["relative"] == 0  # one CPU process: bitwise
    assert resumed["blocking_s"]

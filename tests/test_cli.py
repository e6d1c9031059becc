"""`mm1-train` console script: dry runs and one-line config errors."""

import os
import shutil
import subprocess
import sys

import pytest
from tests import _procs


def mm1_train(*args: str, env: dict | None = None,
              fresh: bool = False) -> subprocess.CompletedProcess:
    """The console script, forked from the suite's warm parent unless `fresh`."""
    exe = shutil.which("mm1-train")
    assert exe, "the mm1-train console script is not installed (pip install -e .)"
    environ = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "SLURM_NTASKS")}
    return _procs.run([exe, *args], capture_output=True, text=True, timeout=120,
                      env={**environ, **(env or {})}, fresh=fresh)


def test_dry_run_prints_config_layout_and_plan():
    # A new interpreter: the one test of the installed console script's own start-up.
    out = mm1_train("--preset", "mm1-30b", "parallel.tp=8", "parallel.pp=4",
                    "parallel.world_size=256", "--dry-run", fresh=True)
    assert out.returncode == 0, out.stderr
    assert "tp: 8" in out.stdout and "world_size=256 tp=8 pp=4 cp=1 ep=1 dp=8" in out.stdout
    assert "peak lr" in out.stdout and "params total" in out.stdout
    assert "layers:" in out.stdout and "precision" in out.stdout


@pytest.mark.parametrize("args, field", [
    (["parallel.tp=13"], "parallel.tp"),
    (["parallel.tensor_parallel=8"], "parallel.tensor_parallel"),
    (["lm.hidden_size=8196"], "lm"),
])
def test_bad_config_is_one_line_naming_the_field(args, field):
    out = mm1_train("--preset", "mm1-30b", *args, "--dry-run")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mm1-train: config error: {field}: ")
    assert out.stdout == ""


def test_world_size_from_torchrun_environment_is_checked():
    out = mm1_train("--preset", "tiny", "parallel.tp=2", "--dry-run", env={"WORLD_SIZE": "3"})
    assert out.returncode == 2 and "parallel.world_size" in out.stderr


def test_missing_config_file():
    out = mm1_train("--preset", "tiny", "--config", "/nonexistent.yaml", "--dry-run")
    assert out.returncode == 2
    assert out.stderr.strip() == ("mm1-train: config error: /nonexistent.yaml: "
                                  "No such file or directory")


def test_launch_script_is_the_same_main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = _procs.run([sys.executable, os.path.join(root, "launch", "train.py"),
                      "--preset", "tiny", "--dry-run"], capture_output=True, text=True,
                     timeout=120)
    assert out.returncode == 0, out.stderr
    assert "preset: tiny" in out.stdout


def test_entry_point_adds_few_shot_evaluation_only_when_tasks_are_set():
    """The trainer knows nothing of evaluation: `mm1-train` composes it into the callbacks."""
    from mm1_megatron.cli import run_callbacks
    from mm1_megatron.config import load_config
    from mm1_megatron.evaluation.callback import FewShotEval
    from mm1_megatron.train.callbacks import Checkpointing, SampleLog, TensorBoard

    plain = run_callbacks(load_config("tiny", [], this_machine=False))
    assert not any(isinstance(cb, FewShotEval) for cb in plain)
    assert isinstance(plain[-1], Checkpointing) and any(isinstance(cb, TensorBoard)
                                                        for cb in plain)
    assert not any(isinstance(cb, SampleLog) for cb in plain)  # logging.sample_ids is off
    cfg = load_config("tiny", ["eval.tasks=a.jsonl,b.jsonl", "eval.interval=5",
                               "logging.sample_ids=true"], this_machine=False)
    evals = [cb for cb in run_callbacks(cfg) if isinstance(cb, FewShotEval)]
    assert len(evals) == 1 and evals[0].interval == 5
    assert [p.name for p in evals[0].task_files] == ["a.jsonl", "b.jsonl"]
    assert any(isinstance(cb, SampleLog) for cb in run_callbacks(cfg))


@pytest.mark.parametrize("override, field", [
    ("checkpoint.save_interval=0", "checkpoint.save_interval"),  # was ZeroDivisionError
    ("logging.log_interval=0", "logging.log_interval"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("llm.moe.layer_freq=0", "llm.moe.layer_freq"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.grad_clip=-1", "train.grad_clip"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("data.weight_text=-1", "data.weight_text"),  # used to blame data.weight_interleaved
])
def test_out_of_range_values_are_one_line_naming_the_field(override, field):
    out = mm1_train("--preset", "tiny", override, "--dry-run")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mm1-train: config error: {field}: ")
    assert out.stdout == ""


def test_malformed_config_file_is_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  micro_batch_size: [1\nllm:\n  num_layers: 2\n")
    out = mm1_train("--preset", "tiny", "--config", str(path), "--dry-run")
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"mm1-train: config error: {path}:4: ")
    assert out.stdout == ""


def test_training_here_checks_the_data_and_tokenizer_first(demo_data, tmp_path):
    """A run (no --dry-run) is refused before any process group starts when its data is not
    there or its tokenizer does not fit the model; dry runs plan for a cluster and do not
    look at the files."""
    run_dir = f"run_dir={tmp_path}/run"
    out = mm1_train("--preset", "tiny", run_dir)  # tiny names no data: was a loader traceback
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith("mm1-train: config error: data.path: ")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    data = [f"data.path={demo_data}", f"data.tokenizer_model={demo_data}/tokenizer.model"]
    out = mm1_train("--preset", "tiny", run_dir, *data)  # 2048 pieces, 512 embedding rows
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().startswith("mm1-train: config error: llm.vocab_size: 512 ")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists()
    assert mm1_train("--preset", "tiny", "--dry-run").returncode == 0

"""The in-training few-shot evaluation callback, driven by the real Trainer with the tiny
model on the demo data: eval/<task>/<k>shot scalars land in TensorBoard beside the loss, in
one process, at TP=2 with sequence parallelism (in the training ranks), and at PP=2 (a side
job on the next checkpoint)."""

import math
import sys
from pathlib import Path

import pytest

from tests._helpers.tensorboard import scalars
from tests._procs import REPO, run_ranks
from tests import _procs

pytestmark = pytest.mark.slow


def train_with_eval(data: str, tasks: str, run_dir: str, with_eval: bool,
                    layout: tuple = ()) -> dict:
    from mm1_megatron.config import load_config
    from mm1_megatron.evaluation.callback import FewShotEval
    from mm1_megatron.train.callbacks import Callback, default_callbacks
    from mm1_megatron.train.loop import train

    cfg = load_config("tiny", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               "llm.vocab_size=2048", f"run_dir={run_dir}",
                               "train.train_steps=3", "train.warmup_steps=1",
                               "checkpoint.save_interval=100", "data.prefetch=0", *layout])
    callbacks = default_callbacks(cfg)
    evaluation = FewShotEval([f"{tasks}/caption.jsonl", f"{tasks}/vqa.jsonl"], interval=2,
                             shots=(0, 2), limit=3, max_new_tokens=4)
    if with_eval:
        callbacks.append(evaluation)
    losses = []

    class Losses(Callback):
        def on_step(self, trainer, m):
            losses.append(m.loss)

    train(cfg, callbacks + [Losses()])
    side = evaluation.side
    return {"history": evaluation.history, "losses": losses,
            "side_jobs": None if side is None else {"started": side.started,
                                                    "failed": side.failed}}


@pytest.fixture(scope="module")
def tasks(demo_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    _procs.run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                str(demo_data), "--output", str(out)], check=True, capture_output=True)
    return out


def test_callback_logs_few_shot_scores_and_leaves_training_unchanged(demo_data, tasks,
                                                                     tmp_path):
    kwargs = {"data": str(demo_data), "tasks": str(tasks)}
    with_eval = run_ranks(__file__, "train_with_eval", nprocs=1, timeout=300,
                          kwargs={**kwargs, "run_dir": str(tmp_path / "a"), "with_eval": True})[0]
    names = {(h["task"], h["shots"]) for h in with_eval["history"]}
    assert names == {("caption", 0), ("caption", 2), ("vqa", 0), ("vqa", 2)}
    assert all(h["step"] == 2 for h in with_eval["history"])
    for task, metric_range in (("caption", (0.0, 1000.0)), ("vqa", (0.0, 100.0))):
        for k in (0, 2):
            logged = scalars(tmp_path / "a", f"eval/{task}/{k}shot")
            assert [step for step, _ in logged] == [2]
            assert metric_range[0] <= logged[0][1] <= metric_range[1]
    assert scalars(tmp_path / "a", "loss/lm")  # beside the loss, same run directory
    # Evaluation draws no random numbers and restores train mode: the same losses.
    without = run_ranks(__file__, "train_with_eval", nprocs=1, timeout=300,
                        kwargs={**kwargs, "run_dir": str(tmp_path / "b"), "with_eval": False})[0]
    assert with_eval["losses"] == without["losses"]


@pytest.mark.multirank
def test_tp2_with_sequence_parallelism_evaluates_in_the_training_ranks(demo_data, tasks,
                                                                      tmp_path):
    """The GPU presets' TP + SP layout: generation switches SP off and back on, so the
    scalars are logged at step 2 and training goes on (step 3's loss is finite)."""
    ranks = run_ranks(__file__, "train_with_eval", nprocs=2, timeout=300, kwargs={
        "data": str(demo_data), "tasks": str(tasks), "run_dir": str(tmp_path), "with_eval": True,
        "layout": ["parallel.tp=2", "parallel.sequence_parallel=true"]})
    for rank in ranks:  # both TP ranks evaluated, in lock-step, to the same scores
        assert {(h["task"], h["shots"]) for h in rank["history"]} == \
            {("caption", 0), ("caption", 2), ("vqa", 0), ("vqa", 2)}
        assert rank["side_jobs"] is None
    assert ranks[0]["history"] == ranks[1]["history"]
    assert len(ranks[0]["losses"]) == 3 and math.isfinite(ranks[0]["losses"][2])
    for tag in ("eval/caption/0shot", "eval/vqa/2shot"):
        assert [step for step, _ in scalars(tmp_path, tag)] == [2]


@pytest.mark.multirank
def test_pp2_evaluates_the_next_checkpoint_in_a_side_job(demo_data, tasks, tmp_path):
    """Pipeline stages: the evaluation due at step 2 runs mm1-eval (a child of rank 0) on the
    next published checkpoint, the final one at step 3, and its scalars land in the run's
    TensorBoard folder at step 3; the run ends only after it."""
    ranks = run_ranks(__file__, "train_with_eval", nprocs=2, timeout=300, kwargs={
        "data": str(demo_data), "tasks": str(tasks), "run_dir": str(tmp_path), "with_eval": True,
        "layout": ["parallel.pp=2"]})
    assert ranks[0]["history"] == [] and ranks[0]["side_jobs"] == {"started": [3], "failed": []}
    assert ranks[1]["side_jobs"] is None  # only the logging rank starts side jobs
    log = (tmp_path / "eval" / "step_3.log").read_text()
    assert "--checkpoint" in log and "step 3" in log, log[-2000:]
    for task, top in (("caption", 1000.0), ("vqa", 100.0)):
        for k in (0, 2):
            logged = scalars(tmp_path, f"eval/{task}/{k}shot")
            assert [step for step, _ in logged] == [3], log[-2000:]
            assert 0.0 <= logged[0][1] <= top
    assert scalars(tmp_path, "loss/lm")

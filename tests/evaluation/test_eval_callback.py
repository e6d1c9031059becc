"""The in-training few-shot evaluation callback, driven by the real Trainer with the tiny
model on the demo data: eval/<task>/<k>shot scalars land in TensorBoard beside the loss."""

import sys
from pathlib import Path

import pytest

from tests._helpers.tensorboard import scalars
from tests._procs import REPO, run_ranks
from tests import _procs

pytestmark = pytest.mark.slow


def train_with_eval(data: str, tasks: str, run_dir: str, with_eval: bool) -> dict:
    from mm1_megatron.config import load_config
    from mm1_megatron.evaluation.callback import FewShotEval
    from mm1_megatron.train.callbacks import Callback, default_callbacks
    from mm1_megatron.train.loop import train

    cfg = load_config("tiny", [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
                               "llm.vocab_size=2048", f"run_dir={run_dir}",
                               "train.train_steps=3", "train.warmup_steps=1",
                               "checkpoint.save_interval=100", "data.prefetch=0"])
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
    return {"history": evaluation.history, "losses": losses}


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

"""In-training few-shot evaluation: every N steps, 0- and k-shot scores on small held-out
task files, logged to TensorBoard beside the loss as `eval/<task>/<k>shot`.

Wiring (`mm1-train`, mm1_megatron/cli.py): `FewShotEval.from_config(cfg)` joins the
default callbacks when `cfg.eval.tasks` is non-empty. Every rank runs the evaluation (the forward passes are
collective under TP/EP); rank 0 writes the scalars. Greedy decoding, dropout off, no RNG
draws: training continues exactly as without the callback (the model is put back in train
mode; the MoE expert-load counters are restored, so eval tokens do not count as training
load).

Supported layouts: pipeline parallel size 1, no sequence parallelism (any TP/DP/EP). Other
layouts log one notice and skip evaluation; evaluate their checkpoints with `mm1-eval`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

from mm1_megatron.train.callbacks import Callback


class FewShotEval(Callback):
    priority = 10  # after the step's checkpoint: a slow or failing evaluation costs no save

    def __init__(self, tasks: Sequence[Union[str, Path]], interval: int,
                 shots: Sequence[int] = (0, 4), limit: Optional[int] = None,
                 batch_size: int = 8, seed: int = 0, max_new_tokens: Optional[int] = None,
                 tokenizer_model: Optional[str] = None, chat: bool = False):
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.task_files = [Path(t) for t in tasks]
        self.interval = interval
        self.shots = list(shots)
        self.limit = limit
        self.batch_size = batch_size
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.tokenizer_model = tokenizer_model
        self.chat = chat  # zero-shot chat prompts (a fine-tuned model)
        self.tasks: list = []
        self.evaluator = None
        self.writer = None
        self._own_writer = False
        self.disabled: Optional[str] = None
        self.history: list[dict] = []  # {"step", "task", "shots", "metric", "value"}

    @classmethod
    def from_config(cls, cfg) -> "FewShotEval":
        """From `cfg.eval`: tasks (comma-separated paths, or a list), interval, shots
        ("0,4", or a list), limit, batch_size, seed, max_new_tokens, chat."""
        e = cfg.eval
        return cls(_items(e.tasks), e.interval, shots=[int(k) for k in _items(e.shots)],
                   limit=e.limit, batch_size=e.batch_size, seed=e.seed,
                   max_new_tokens=e.max_new_tokens, chat=e.chat)

    # -- lifecycle -----------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        from mm1_megatron.data.tokenizer import Tokenizer
        from mm1_megatron.evaluation.evaluator import FewShotEvaluator
        from mm1_megatron.evaluation.tasks import KINDS, load_task

        cfg = trainer.cfg
        p = cfg.parallel
        if p.pp > 1 or (p.sequence_parallel and p.tp > 1) or len(trainer.model) > 1:
            self.disabled = ("in-training few-shot evaluation needs parallel.pp=1 and no "
                             "sequence parallelism; skipped (use mm1-eval on checkpoints)")
            if trainer.is_logging_rank:
                print(f"eval: {self.disabled}", flush=True)
            return
        self.tasks = [load_task(t) for t in self.task_files]
        tokenizer = Tokenizer.load(self.tokenizer_model or cfg.data.tokenizer_model)
        limits = None if self.max_new_tokens is None else \
            dict.fromkeys(KINDS, self.max_new_tokens)
        model = trainer.model[0].module  # the MM1Model inside Megatron DDP
        self.evaluator = FewShotEvaluator(model, tokenizer, cfg.vision.image_size,
                                          batch_size=self.batch_size, seed=self.seed,
                                          max_new_tokens=limits, resize=cfg.vision.resize,
                                          tiles=cfg.vision.tiles, chat=self.chat)
        if trainer.is_logging_rank and cfg.logging.tensorboard:
            self.writer = self._shared_writer(trainer)
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(trainer.run_dir / "tensorboard"))
                self._own_writer = True

    @staticmethod
    def _shared_writer(trainer):
        """The TensorBoard callback's writer, so eval scalars share its event file."""
        for cb in trainer.callbacks:
            if getattr(cb, "writer", None) is not None and type(cb).__name__ == "TensorBoard":
                return cb.writer
        return None

    def on_step(self, trainer, m) -> None:
        if self.evaluator is not None and m.step % self.interval == 0:
            with trainer.slow_phase(f"the evaluation at step {m.step}"):
                self.run(trainer, m.step)

    def close(self, trainer) -> None:
        if self._own_writer and self.writer is not None:
            self.writer.close()
        self.writer = None

    # -- evaluation ----------------------------------------------------------------------
    def run(self, trainer, step: int) -> dict[str, float]:
        moe = getattr(trainer, "moe_metrics", None)
        saved = moe.tokens.clone() if moe is not None else None
        start = time.perf_counter()
        scores: dict[str, float] = {}
        try:
            for task in self.tasks:
                for k in self.shots:
                    r = self.evaluator.evaluate(task, k, limit=self.limit)
                    name = f"eval/{task.name}/{k}shot"
                    scores[name] = r.reported
                    self.history.append({"step": step, "task": task.name, "shots": k,
                                         "metric": r.metric, "value": r.reported})
        finally:
            if saved is not None:
                moe.tokens = saved
        seconds = time.perf_counter() - start
        if trainer.is_logging_rank:
            if self.writer is not None:
                for name, value in scores.items():
                    self.writer.add_scalar(name, value, step)
                self.writer.add_scalar("eval/seconds", seconds, step)
                self.writer.flush()
            print(f"eval step {step}: " + " | ".join(f"{n[5:]} {v:.1f}" for n, v in
                                                    scores.items()) + f" | {seconds:.1f}s",
                  flush=True)
        return scores


def _items(value) -> list[str]:
    """"a,b" / ["a", "b"] / 4 -> ["a", "b"] / ["4"]."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]

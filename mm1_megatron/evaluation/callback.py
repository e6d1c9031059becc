"""In-training few-shot evaluation: every N steps, 0- and k-shot scores on small held-out
task files, logged to TensorBoard beside the loss as `eval/<task>/<k>shot`.

Wiring (`mm1-train`, mm1_megatron/cli.py): `FewShotEval.from_config(cfg)` joins the
default callbacks when `cfg.eval.tasks` is non-empty.

In the training processes (pipeline parallel size 1; any TP / SP / EP / DP): every rank runs
the evaluation (the forward passes are collective under TP/EP; sequence parallelism is
switched off while generating); rank 0 writes the scalars. Greedy decoding, dropout off, no RNG
draws: training continues exactly as without the callback (the model is put back in train
mode; the MoE expert-load counters are restored, so eval tokens do not count as training
load).

Pipeline stages (parallel.pp > 1): generation would need the pipeline schedule at every
decoded token, so an evaluation that falls due is run by `mm1-eval` on the next complete
checkpoint in a side job (`eval.side_job`: a child of rank 0 by default, or e.g. an sbatch of
slurm/eval.sh), which writes the same scalars at that checkpoint's step into the run's
TensorBoard folder. Training never waits for it; a normal end waits for local side jobs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from mm1_megatron.train.callbacks import Callback


class FewShotEval(Callback):
    priority = 10  # after the step's checkpoint: a slow or failing evaluation costs no save

    def __init__(self, tasks: Sequence[Union[str, Path]], interval: int,
                 shots: Sequence[int] = (0, 4), limit: Optional[int] = None,
                 batch_size: int = 8, seed: int = 0, max_new_tokens: Optional[int] = None,
                 tokenizer_model: Optional[str] = None, chat: bool = False,
                 side_job: str = ""):
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
        self.side: Optional[SideJobs] = None  # pipeline layouts: evaluations in side jobs
        self.side_job = side_job
        self.ended = False
        self.history: list[dict] = []  # {"step", "task", "shots", "metric", "value"}

    @classmethod
    def from_config(cls, cfg) -> "FewShotEval":
        """From `cfg.eval`: tasks (comma-separated paths, or a list), interval, shots
        ("0,4", or a list), limit, batch_size, seed, max_new_tokens, chat, side_job."""
        e = cfg.eval
        return cls(_items(e.tasks), e.interval, shots=[int(k) for k in _items(e.shots)],
                   limit=e.limit, batch_size=e.batch_size, seed=e.seed,
                   max_new_tokens=e.max_new_tokens, chat=e.chat, side_job=e.side_job)

    # -- lifecycle -----------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        from mm1_megatron.data.tokenizer import Tokenizer
        from mm1_megatron.evaluation.evaluator import FewShotEvaluator
        from mm1_megatron.evaluation.tasks import KINDS, load_task

        cfg = trainer.cfg
        self.tasks = [load_task(t) for t in self.task_files]  # a bad file fails the start
        if cfg.parallel.pp > 1 or len(trainer.model) > 1:
            if trainer.is_logging_rank:  # the other ranks have nothing to do
                self.side = SideJobs(self, trainer)
                print(f"eval: {cfg.parallel.pp} pipeline stages: each evaluation runs "
                      f"mm1-eval on the next complete checkpoint in a side job "
                      f"({self.side.describe()}), logged at that checkpoint's step; logs in "
                      f"{self.side.log_dir}", flush=True)
            return
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
        if self.side is not None:
            if m.step % self.interval == 0:
                self.side.due(m.step)
            self.side.pump()  # a finished side job makes room for a waiting one
        elif self.evaluator is not None and m.step % self.interval == 0:
            with trainer.slow_phase(f"the evaluation at step {m.step}"):
                self.run(trainer, m.step)

    def on_checkpoint(self, trainer, step: int, path: Path) -> None:
        if self.side is not None:
            self.side.published(step, path)

    def on_train_end(self, trainer) -> None:
        self.ended = True

    def close(self, trainer) -> None:
        if self.side is not None and self.ended:
            self.side.finish()  # after the last checkpoint (the loop finished its save)
        if self._own_writer and self.writer is not None:
            self.writer.close()
        self.writer = None

    def eval_arguments(self, checkpoint: Path, tensorboard: Path) -> list[str]:
        """mm1-eval's arguments for the same evaluation of `checkpoint` (the run's
        config.yaml describes the model), its scalars written to `tensorboard`."""
        args = ["--checkpoint", str(checkpoint), "--tensorboard", str(tensorboard),
                "--shots", *map(str, self.shots), "--batch-size", str(self.batch_size),
                "--seed", str(self.seed)]
        for task in self.task_files:
            args += ["--task", str(task.resolve())]
        if self.limit is not None:
            args += ["--limit", str(self.limit)]
        if self.max_new_tokens is not None:
            args += ["--max-new-tokens", str(self.max_new_tokens)]
        if self.tokenizer_model:
            args += ["--tokenizer", str(self.tokenizer_model)]
        return args + (["--chat"] if self.chat else [])

    # -- evaluation ----------------------------------------------------------------------
    def run(self, trainer, step: int) -> dict[str, float]:
        from mm1_megatron.evaluation.evaluator import SECONDS_TAG, scalar_tag

        moe = getattr(trainer, "moe_metrics", None)
        saved = moe.tokens.clone() if moe is not None else None
        start = time.perf_counter()
        scores: dict[str, float] = {}
        try:
            for task in self.tasks:
                for k in self.shots:
                    r = self.evaluator.evaluate(task, k, limit=self.limit)
                    name = scalar_tag(task.name, k)
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
                self.writer.add_scalar(SECONDS_TAG, seconds, step)
                self.writer.flush()
            print(f"eval step {step}: " + " | ".join(f"{n[5:]} {v:.1f}" for n, v in
                                                    scores.items()) + f" | {seconds:.1f}s",
                  flush=True)
        return scores


class SideJobs:
    """The evaluations of a pipeline-parallel run (on its logging rank): each one that falls
    due is started on the next checkpoint published at or after its step, as
    `eval.side_job` + mm1-eval's arguments, its output in run_dir/eval/step_N.log. One at a
    time: a due evaluation waits while the previous side job runs (a later checkpoint
    replaces a waiting one). A command that returns at once (sbatch) frees the slot at once."""

    def __init__(self, callback: FewShotEval, trainer):
        self.callback = callback
        self.run_dir = trainer.run_dir
        self.log_dir = trainer.run_dir / "eval"
        self.prefix = shlex.split(callback.side_job) if callback.side_job.strip() else \
            [sys.executable, "-m", "mm1_megatron.evaluation.cli"]
        self.due_step: Optional[int] = None
        self.waiting: Optional[tuple[int, Path]] = None  # (step, checkpoint)
        self.running: Optional[tuple[int, subprocess.Popen]] = None
        self.started: list[int] = []  # checkpoint steps handed to a side job
        self.failed: list[int] = []

    def describe(self) -> str:
        return "eval.side_job: " + (shlex.join(self.prefix) if self.callback.side_job.strip()
                                    else "mm1-eval as a child process")

    def due(self, step: int) -> None:
        if self.due_step is None:
            self.due_step = step

    def published(self, step: int, path: Path) -> None:
        if self.due_step is not None and step >= self.due_step:
            self.due_step = None
            self.waiting = (step, path)
        self.pump()

    def pump(self) -> None:
        if self.running is not None:
            step, proc = self.running
            if proc.poll() is None:
                return
            self._done(step, proc.returncode)
        if self.waiting is None:
            return
        step, path = self.waiting
        self.waiting = None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"step_{step}.log"
        cmd = self.prefix + self.callback.eval_arguments(path, self.run_dir / "tensorboard")
        with open(log, "w", encoding="utf-8") as out:
            out.write("$ " + shlex.join(cmd) + "\n")
            out.flush()
            # Its own session (a signal to the trainer's group does not reach it) and no
            # launcher variables: mm1-eval would read them as its own world.
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    env=without_launch_variables(os.environ),
                                    start_new_session=True, cwd=os.getcwd())
        self.running = (step, proc)
        self.started.append(step)
        print(f"eval: side job for checkpoint step {step} started (log {log})", flush=True)

    def _done(self, step: int, code: int) -> None:
        self.running = None
        if code != 0:
            self.failed.append(step)
            print(f"eval: the side job for checkpoint step {step} exited {code}; see "
                  f"{self.log_dir / f'step_{step}.log'}", file=sys.stderr, flush=True)

    def finish(self) -> None:
        """At the end of the run: the waiting evaluation started and every local one done."""
        while self.running is not None or self.waiting is not None:
            if self.running is not None:
                step, proc = self.running
                print(f"eval: waiting for the side job of checkpoint step {step}", flush=True)
                proc.wait()
            self.pump()


def without_launch_variables(environ) -> dict[str, str]:
    """`environ` less what torchrun / srun / sbatch set for a rank and its job: a child would
    take them for its own world, and an sbatch from inside a job would inherit the job's
    shape (SLURM_CONF, where the cluster's config lives, stays)."""
    launch = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "ROLE_RANK", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {k: v for k, v in environ.items()
            if k not in launch and not k.startswith("TORCHELASTIC_") and
            (not k.startswith("SLURM_") or k == "SLURM_CONF")}


def _items(value) -> list[str]:
    """"a,b" / ["a", "b"] / 4 -> ["a", "b"] / ["4"]."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]

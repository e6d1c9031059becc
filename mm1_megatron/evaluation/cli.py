"""`mm1-eval`: few-shot captioning / VQA scores of a Megatron checkpoint (any layout).

    mm1-eval --run-dir runs/demo --preset demo --task demo_tasks/caption.jsonl \\
             --task demo_tasks/vqa.jsonl --shots 0 4 8

    mm1-eval --run-dir runs/demo-sft --chat --task demo_tasks/chat_vqa.jsonl \\
             --task demo_tasks/chat_choice.jsonl --task demo_tasks/chat_yesno.jsonl

    mm1-eval --run-dir runs/mm1-3b --benchmark vqav2 --data /data/vqav2 --shots 0 4 8
    mm1-eval --run-dir runs/mm1-3b --suite paper-fewshot --benchmarks-root /data/bench \
             --table results/table3.md

`--benchmark` reads a benchmark's official files (evaluation/benchmarks.py names each layout);
`--suite paper-fewshot` runs the eight of the paper's Table 3 from ROOT/coco, ROOT/nocaps,
ROOT/textcaps, ROOT/vqav2, ROOT/textvqa, ROOT/vizwiz, ROOT/gqa and ROOT/okvqa and, with
`--table FILE.md`, writes that table (shots x benchmarks) and FILE.json.

`--chat` evaluates a fine-tuned (SFT) model zero-shot in the chat format: short-answer VQA
(VQA accuracy), multiple choice (accuracy of the letter read from the answer) and yes/no
(accuracy; F1 and the "yes" share in --output).

The model is described by the same preset (+ YAML + key=value overrides) the run trained
with; the model part of the checkpoint (any training layout) is loaded into it. Launched as N
ranks (torchrun / srun), each model spans --tp x --ep ranks and the rest split the queries:

    torchrun --nproc-per-node 8 -m mm1_megatron.evaluation.cli --run-dir runs/mm1-30b \
             --tp 8 --suite paper-fewshot --benchmarks-root /data/bench

Prints a table (CIDEr x100 for captioning, VQA accuracy in % for VQA) and, with `--output`,
writes every prediction and score as JSON; `--tensorboard DIR` writes the scores as the
in-training evaluation's scalars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from mm1_megatron.config import (PRESETS, ConfigError, evaluation_config, load_config,
                                 load_run_config)

# Why --pp is refused (docs/evaluation.md says the same).
NO_PIPELINE = ("pipeline-parallel evaluation is not supported: the generator runs the whole "
               "decoder in one forward per token (pipeline stages would need Megatron-Core's "
               "P2P forward schedule at every decode step); give the model to --tp / --ep "
               "instead: TP=8 or EP=8 fits every preset on one 8-GPU node")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mm1-eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Task format: see mm1_megatron/evaluation/tasks.py. "
                                       "Presets: " + ", ".join(PRESETS))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", help="evaluate the latest checkpoint of this run")
    src.add_argument("--checkpoint", help="a checkpoint directory (run/checkpoints/step_N)")
    p.add_argument("--preset", help="the preset the run trained with (default: the run's "
                                    "config.yaml, written by mm1-train)")
    p.add_argument("--config", help="YAML file of config sections (as for mm1-train)")
    p.add_argument("--task", action="append", default=[], metavar="FILE.jsonl",
                   help="a task file (repeat for several)")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME",
                   help="an official benchmark (evaluation/benchmarks.py), read from --data")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="one per --benchmark: the folder of its published files")
    p.add_argument("--support-data", metavar="DIR",
                   help="where the in-context examples come from when not --data itself "
                        "(nocaps: the COCO Karpathy folder)")
    p.add_argument("--suite", choices=["paper-fewshot"],
                   help="the paper's few-shot table: every benchmark under --benchmarks-root")
    p.add_argument("--benchmarks-root", metavar="ROOT", help="for --suite (see above)")
    p.add_argument("--table", metavar="FILE.md",
                   help="write the paper-shaped table (shots x benchmarks) here, and FILE.json")
    p.add_argument("--answer-loss", metavar="FILE.jsonl",
                   help="held-out conversations (LLaVA format): the mean loss on their answers")
    p.add_argument("--support", action="append", default=None, metavar="FILE.jsonl",
                   help="support set per --task, in the same order (default: the task "
                        "file itself, minus the query)")
    p.add_argument("--shots", type=int, nargs="+", default=None,
                   help="in-context examples per prompt (default 0 4 8; --chat: 0)")
    p.add_argument("--chat", action="store_true",
                   help="zero-shot in the chat format (SFT models): vqa, choice, yesno tasks")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks per model (launch with torchrun / srun)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert-parallel ranks per model (MoE; inside the data-parallel ranks)")
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="evaluate only the first N examples per task")
    p.add_argument("--seed", type=int, default=0, help="draw of the in-context examples")
    p.add_argument("--max-new-tokens", type=int,
                   help="default: 20 captioning, 10 VQA, 8 choice, 4 yes/no")
    p.add_argument("--tokenizer", help="default: data.tokenizer_model of the config")
    p.add_argument("--no-kv-cache", action="store_true", help="re-run the full sequence per "
                                                              "token (slow; for checking)")
    p.add_argument("--output", help="write predictions and scores to this JSON file")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write the scores as eval/<task>/<k>shot scalars at the "
                        "checkpoint's step into this TensorBoard folder (e.g. the run's)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    for pattern in (r"(Transformer Engine and )?Apex (are|is) not installed",
                    r"full scope is deprecated", r"`load_state_dict` is deprecated",
                    r"Please use DTensor instead"):
        warnings.filterwarnings("ignore", message=pattern)
    args = parse_args(argv)
    if args.suite and not args.benchmarks_root:
        print("mm1-eval: --suite paper-fewshot needs --benchmarks-root ROOT", file=sys.stderr)
        return 2
    if len(args.benchmark) != len(args.data):
        print("mm1-eval: give one --data DIR per --benchmark", file=sys.stderr)
        return 2
    if not (args.task or args.answer_loss or args.benchmark or args.suite):
        print("mm1-eval: give --task FILE.jsonl, --benchmark NAME --data DIR, --suite "
              "paper-fewshot and/or --answer-loss FILE.jsonl", file=sys.stderr)
        return 2
    if args.shots is None:
        args.shots = [0] if args.chat else [0, 4, 8]
    if args.chat and args.shots != [0]:
        print("mm1-eval: --chat evaluates zero-shot; give --shots 0 (or none)", file=sys.stderr)
        return 2
    if args.pp != 1:
        print(f"mm1-eval: --pp {args.pp}: {NO_PIPELINE}", file=sys.stderr)
        return 2
    if args.support is not None and len(args.support) != len(args.task):
        print("mm1-eval: give one --support per --task", file=sys.stderr)
        return 2
    try:
        # Validated below with the evaluation layout (evaluation_config), not the training one.
        if args.preset:
            cfg = load_config(args.preset, args.overrides, args.config, this_machine=False,
                              check=False)
        else:
            run_dir = args.run_dir or Path(args.checkpoint).resolve().parent.parent
            cfg = load_run_config(run_dir, args.overrides, check=False)
    except ConfigError as err:
        print(f"mm1-eval: config error: {err}", file=sys.stderr)
        return 2

    from mm1_megatron.data.tokenizer import Tokenizer
    from mm1_megatron.evaluation.answer_loss import answer_loss, load_conversations
    from mm1_megatron.evaluation.evaluator import FewShotEvaluator, format_table
    from mm1_megatron.evaluation.model_io import (build_eval_model, load_model_weights,
                                                  resolve_checkpoint)
    from mm1_megatron.evaluation.tasks import KINDS, load_task

    try:
        tasks = [load_task(t, support=args.support[i] if args.support else None)
                 for i, t in enumerate(args.task)] + benchmark_tasks(args)
        conversations = load_conversations(args.answer_loss) if args.answer_loss else None
        path = resolve_checkpoint(args.run_dir, args.checkpoint)
        tokenizer = Tokenizer.load(args.tokenizer or cfg.data.tokenizer_model)
    except (OSError, ValueError) as err:
        print(f"mm1-eval: {err}", file=sys.stderr)
        return 2
    if tokenizer.vocab_size > cfg.llm.vocab_size:
        print(f"mm1-eval: the tokenizer has {tokenizer.vocab_size} pieces but llm.vocab_size="
              f"{cfg.llm.vocab_size}", file=sys.stderr)
        return 2
    import os

    from mm1_megatron.evaluation.evaluator import query_shard
    from mm1_megatron.runtime.distributed import dist_env_from_environ

    launch = dist_env_from_environ(os.environ)  # torchrun / srun
    try:
        cfg = evaluation_config(cfg, launch.world_size, tp=args.tp, ep=args.ep)
    except ConfigError as err:
        print(f"mm1-eval: config error (evaluated with --tp {args.tp} --ep {args.ep} on "
              f"{launch.world_size} ranks): {err}", file=sys.stderr)
        return 2
    model = build_eval_model(cfg, environ=os.environ if launch.world_size > 1 else None)
    step = load_model_weights(model, path)
    shard = query_shard()
    lead = launch.rank == 0  # prints and writes; every rank holds the same results
    say = print if lead else (lambda *a, **k: None)
    say(f"mm1-eval: {path} (step {step}), preset {cfg.preset}{layout_text(args, shard[1])}",
        flush=True)
    limits = None
    if args.max_new_tokens:
        limits = dict.fromkeys(KINDS, args.max_new_tokens)
    evaluator = FewShotEvaluator(model, tokenizer, cfg.vision.image_size,
                                 batch_size=args.batch_size, seed=args.seed,
                                 use_cache=not args.no_kv_cache, max_new_tokens=limits,
                                 resize=cfg.vision.resize, tiles=cfg.vision.tiles,
                                 chat=args.chat, shard=shard)
    results = []
    began = time.perf_counter()
    for task in tasks:
        for k in args.shots:
            start = time.perf_counter()
            try:
                r = evaluator.evaluate(task, k, limit=args.limit)
            except ValueError as err:
                print(f"mm1-eval: {err}", file=sys.stderr)
                return 2
            results.append(r)
            say(f"  {task.name} {k}-shot: {r.reported:.1f} ({r.examples} examples, "
                f"{time.perf_counter() - start:.1f}s)", flush=True)
            for skip in r.skipped[:3]:
                say(f"  skipped {skip['id']}: {skip['reason']}", flush=True)
    losses = None
    if conversations:
        losses = answer_loss(model, tokenizer, conversations, evaluator.images)
        say(f"  answer loss: {losses['answer_loss']:.4f} over {losses['answer_tokens']} answer "
            f"tokens of {losses['conversations']} conversations", flush=True)
    if not lead:
        return 0
    if results:
        print()
        print(format_table(results))
    if args.table:
        from mm1_megatron.evaluation.benchmarks import BENCHMARKS
        from mm1_megatron.evaluation.evaluator import paper_table

        columns = {name: b.column for name, b in BENCHMARKS.items()}
        columns.update({t.name: t.name for t in tasks if t.name not in columns})
        markdown, figures = paper_table(results, columns)
        table = Path(args.table)
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text(f"Checkpoint `{path}` (step {step}), preset `{cfg.preset}`, seed "
                         f"{args.seed}{f', first {args.limit} queries' if args.limit else ''}."
                         f"\n\n{markdown}")
        table.with_suffix(".json").write_text(json.dumps(
            {"checkpoint": str(path), "step": step, "preset": cfg.preset, "seed": args.seed,
             "limit": args.limit, **figures}, indent=1) + "\n")
        print(f"mm1-eval: wrote {table} and {table.with_suffix('.json')}", flush=True)
    if args.tensorboard:
        write_scalars(Path(args.tensorboard), step, results, time.perf_counter() - began)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump({"checkpoint": str(path), "step": step, "answer_loss": losses,
                       "results": [
                {"task": r.task, "kind": r.kind, "shots": r.shots, "metric": r.metric,
                 "score": r.score, "reported": r.reported, "examples": r.examples,
                 "predictions": r.predictions, "skipped": r.skipped, "details": r.details,
                 "chat": r.chat} for r in results]},
                      f, indent=1)
    return 0


def write_scalars(folder: Path, step: int, results: list, seconds: float) -> None:
    """The in-training evaluation's scalars (evaluation/callback.py) at `step`, in an event
    file of their own beside the run's (TensorBoard shows a folder's files as one run)."""
    from torch.utils.tensorboard import SummaryWriter

    from mm1_megatron.evaluation.evaluator import SECONDS_TAG, scalar_tag

    writer = SummaryWriter(str(folder), filename_suffix=".mm1-eval")
    try:
        for r in results:
            writer.add_scalar(scalar_tag(r.task, r.shots), r.reported, step)
        writer.add_scalar(SECONDS_TAG, seconds, step)
    finally:
        writer.close()
    print(f"mm1-eval: wrote {len(results)} scalars at step {step} to {folder}", flush=True)


def layout_text(args: argparse.Namespace, shares: int) -> str:
    """", TP=2 x EP=1, 2 data-parallel ranks" (empty in a world of one)."""
    parts = []
    if args.tp > 1 or args.ep > 1:
        parts.append(f"TP={args.tp} x EP={args.ep}")
    if shares > 1:
        parts.append(f"{shares} data-parallel ranks")
    return "".join(f", {p}" for p in parts)


def benchmark_tasks(args: argparse.Namespace) -> list:
    """--benchmark/--data pairs and --suite's benchmarks, read from their official files.
    Raises ValueError (BenchmarkError) in one line for a missing file or folder."""
    from mm1_megatron.evaluation.benchmarks import SUITE_FOLDERS, load_benchmark

    tasks = [load_benchmark(name, Path(d), args.support_data)
             for name, d in zip(args.benchmark, args.data)]
    if args.suite == "paper-fewshot":
        root = Path(args.benchmarks_root)
        for name, folder in SUITE_FOLDERS.items():
            support = root / SUITE_FOLDERS["coco-karpathy"] if name == "nocaps" else None
            tasks.append(load_benchmark(name, root / folder, support))
    return tasks


if __name__ == "__main__":
    sys.exit(main())

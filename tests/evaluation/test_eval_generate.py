"""Greedy generation: stop rules, KV cache == no cache, padding-invariant batching, and a
DP=2 x EP=2 (MoE) checkpoint evaluated in one process (weights, tokens and logits reproduced); the
`mm1-eval` command end to end on it."""

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mm1_megatron.data.tokenizer import EOC_ID, EOS_ID, IMAGE_ID, PAD_ID, Tokenizer
from mm1_megatron.evaluation.generate import Generator, newline_token_ids
from tests._procs import REPO, run_ranks, torchrun
from tests import _procs

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_eval_worker.py"
TOL = 1e-4


# -- stop rules (scripted logits, no model) ------------------------------------------------

class Scripted(Generator):
    """Row i emits script[i][step]; the model is never called."""

    def __init__(self, tokenizer, script, max_new_tokens):
        model = SimpleNamespace(image_token_id=IMAGE_ID, training=False, eval=lambda: None,
                                train=lambda mode: None,
                                without_sequence_parallel=contextlib.nullcontext,
                                parameters=lambda: iter([torch.zeros(1)]))
        super().__init__(model, tokenizer, max_new_tokens=max_new_tokens, use_cache=False)
        self.script, self.calls = script, 0

    def _embed(self, tokens, image_tokens):
        return None

    def _logits(self, tokens, decoder_input, mask, context=None):
        logits = torch.zeros(len(self.script), self.tokenizer.vocab_size)
        for i, row in enumerate(self.script):
            logits[i, row[min(self.calls, len(row) - 1)]] = 1.0
            logits[i, [PAD_ID, IMAGE_ID]] = 5.0  # banned: never picked
        self.calls += 1
        return logits


def test_stop_rules(demo_data):
    tok = Tokenizer.load(demo_data / "tokenizer.model")
    newline = min(newline_token_ids(tok))
    assert tok.decode([newline]).count("\n") >= 1
    words = tok.encode("a cat")
    script = [words + [EOS_ID], words + [EOC_ID], words + [newline], words * 10]
    gen = Scripted(tok, script, max_new_tokens=5).generate([[1, 7], [1, 7], [1], [1]], None)
    assert gen.tokens == [words, words, words, (words * 10)[:5]]
    assert gen.stop_reasons == ["eos", "eoc", "newline", "length"]


# -- a real model: EP=2 checkpoint -> one process -----------------------------------------

def one_process_case(run_dir: str, tokenizer: str) -> dict:
    """Load the latest checkpoint of `run_dir` into a one-process model; generate with and
    without the KV cache, batched and one row at a time."""
    from mm1_megatron.config import load_config, single_process_config
    from mm1_megatron.evaluation.model_io import (build_eval_model, load_model_weights,
                                                  resolve_checkpoint)
    from tests._helpers.evaluation import EVAL_OVERRIDES, fixed_prompts
    from tests._helpers.parity import BASE

    cfg = single_process_config(load_config("tiny", BASE + EVAL_OVERRIDES))
    model = build_eval_model(cfg, seed=999)  # other initial weights: only loading matches
    step = load_model_weights(model, resolve_checkpoint(run_dir=run_dir))
    tok = Tokenizer.load(tokenizer)
    prompts, images = fixed_prompts(cfg, tok)
    out = {"step": step}
    for name, cache in (("cache", True), ("no_cache", False)):
        gen = Generator(model, tok, max_new_tokens=6, use_cache=cache, stop_at_newline=False)
        r = gen.generate(prompts, images, keep_logits=True)
        out[name] = {"tokens": r.tokens, "logits": [x.tolist() for x in r.step_logits]}
    # Row 1 alone (no padding): its images are the ones after row 0's.
    n0, n1 = 1, 2  # images of rows 0 and 1 (0-shot, 1-shot)
    gen = Generator(model, tok, max_new_tokens=6, use_cache=True, stop_at_newline=False)
    r = gen.generate([prompts[1]], images[n0:n0 + n1], keep_logits=True)
    out["row1_alone"] = {"tokens": r.tokens, "logits": [x.tolist() for x in r.step_logits]}
    # The TE path: rows batched only with rows of their length (no padding), here a repeated
    # 0-shot prompt beside the others; the local spec honours padding, so tokens must agree.
    model.packed_sequences = True
    r = gen.generate(prompts + [prompts[0]], torch.cat([images, images[:n0]]))
    model.packed_sequences = False
    out["by_length"] = r.tokens
    return out


@pytest.fixture(scope="module")
def ep2_run(demo_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("ep2")
    tokenizer = str(demo_data / "tokenizer.model")
    torchrun(WORKER, 2, str(root / "ep2.json"), str(root / "run"), tokenizer,
             "parallel.ep=2", timeout=300)
    reference = json.loads((root / "ep2.json").read_text())
    local = run_ranks(__file__, "one_process_case", nprocs=1, timeout=300,
                      kwargs={"run_dir": str(root / "run"), "tokenizer": tokenizer})[0]
    return root, reference, local


def max_diff(a, b) -> float:
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


@pytest.mark.slow
@pytest.mark.multirank
def test_kv_cache_equals_no_cache(ep2_run):
    _, _, local = ep2_run
    assert local["cache"]["tokens"] == local["no_cache"]["tokens"]
    assert len(local["cache"]["logits"]) == 6
    assert max_diff(local["cache"]["logits"], local["no_cache"]["logits"]) < TOL


@pytest.mark.slow
@pytest.mark.multirank
def test_left_padding_does_not_change_a_row(ep2_run):
    _, _, local = ep2_run
    assert local["row1_alone"]["tokens"][0] == local["cache"]["tokens"][1]
    batched = [step[1] for step in local["cache"]["logits"]]
    alone = [step[0] for step in local["row1_alone"]["logits"]]
    assert max_diff(batched, alone) < TOL


@pytest.mark.slow
@pytest.mark.multirank
def test_te_path_batches_rows_by_length_with_the_same_tokens(ep2_run):
    _, _, local = ep2_run
    assert local["by_length"] == local["cache"]["tokens"] + [local["cache"]["tokens"][0]]


@pytest.mark.slow
@pytest.mark.multirank
def test_ep2_checkpoint_evaluates_identically_in_one_process(ep2_run):
    _, reference, local = ep2_run
    assert local["step"] == 1
    assert local["cache"]["tokens"] == reference["tokens"]
    assert max_diff(local["cache"]["logits"], reference["logits"]) < TOL


@pytest.mark.slow
@pytest.mark.multirank
def test_mm1_eval_command_prints_the_table(ep2_run, demo_data):
    root, _, _ = ep2_run
    tasks = root / "tasks"
    _procs.run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                str(demo_data), "--output", str(tasks)], check=True, capture_output=True)
    from tests._helpers.evaluation import EVAL_OVERRIDES
    from tests._helpers.parity import BASE

    cmd = ["mm1-eval", "--run-dir",
           str(root / "run"), "--preset", "tiny", "--task", str(tasks / "caption.jsonl"),
           "--task", str(tasks / "vqa.jsonl"), "--shots", "0", "4", "8", "--limit", "2",
           "--max-new-tokens", "4", "--output", str(root / "eval.json"),
           *BASE, *EVAL_OVERRIDES, f"data.tokenizer_model={demo_data / 'tokenizer.model'}"]
    run = _procs.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert lines[-4].split(" | ")[3:] == ["0-shot", "4-shot", "8-shot"]
    assert lines[-2].startswith("caption ") and "CIDEr" in lines[-2]
    assert lines[-1].startswith("vqa ") and "VQA acc" in lines[-1]
    results = json.loads((root / "eval.json").read_text())["results"]
    assert [(r["task"], r["shots"]) for r in results] == [
        ("caption", 0), ("caption", 4), ("caption", 8), ("vqa", 0), ("vqa", 4), ("vqa", 8)]
    assert all(len(r["predictions"]) == 2 for r in results)


@pytest.mark.slow
@pytest.mark.multirank
def test_mm1_eval_skips_and_counts_an_example_whose_image_is_missing(ep2_run, demo_data):
    """One missing image costs one example, counted in the table, not the whole evaluation."""
    root, _, _ = ep2_run
    tasks = root / "tasks_missing"
    _procs.run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                str(demo_data), "--output", str(tasks)], check=True, capture_output=True)
    lines = (tasks / "caption.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["image"] = "images/not-there.jpg"
    (tasks / "caption.jsonl").write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    from tests._helpers.evaluation import EVAL_OVERRIDES
    from tests._helpers.parity import BASE

    cmd = ["mm1-eval", "--run-dir",
           str(root / "run"), "--preset", "tiny", "--task", str(tasks / "caption.jsonl"),
           "--shots", "0", "--limit", "3", "--max-new-tokens", "4", "--output",
           str(root / "eval_missing.json"), *BASE, *EVAL_OVERRIDES,
           f"data.tokenizer_model={demo_data / 'tokenizer.model'}"]
    run = _procs.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.strip().splitlines()
    assert table[-3].split(" | ")[-1].strip() == "skipped (bad images)"
    assert table[-1].startswith("caption ") and table[-1].split(" | ")[2].strip() == "2"
    assert table[-1].split(" | ")[-1].strip() == "1"
    (result,) = json.loads((root / "eval_missing.json").read_text())["results"]
    assert result["examples"] == 2 and len(result["predictions"]) == 2
    assert result["skipped"][0]["id"] == first["id"] and "not-there.jpg" in \
        result["skipped"][0]["reason"]


def _vqa_accuracy_reference(prediction: str, answers: list[str]) -> float:
    """The official VQA accuracy, written out here: min(1, matches / 3) averaged over the ten
    leave-one-out subsets of the human answers (answers and prediction normalised alike)."""
    from mm1_megatron.evaluation.metrics import normalize_answer

    pred, gts = normalize_answer(prediction), [normalize_answer(a) for a in answers]
    subsets = [gts[:i] + gts[i + 1:] for i in range(len(gts))]
    return sum(min(1.0, sum(g == pred for g in s) / 3.0) for s in subsets) / len(subsets)


@pytest.mark.slow
@pytest.mark.multirank
def test_mm1_eval_writes_the_papers_fewshot_table_from_official_files(ep2_run, demo_data):
    """`mm1-eval --suite paper-fewshot` on the eight benchmarks' published layouts (3 queries
    each) at 0/4/8 shots: the Table-3-shaped Markdown and JSON hold the scores this test
    recomputes from the predictions (pycocoevalcap's CIDEr-D; the VQA accuracy written out
    above; GQA's exact match)."""
    from pycocoevalcap.cider import cider

    from mm1_megatron.evaluation.benchmarks import BENCHMARKS, SUITE_FOLDERS, load_benchmark
    from mm1_megatron.evaluation.metrics import normalize_answer, ptb_tokenize
    from tests._helpers.benchmarks import write_benchmarks
    from tests._helpers.evaluation import EVAL_OVERRIDES
    from tests._helpers.parity import BASE

    root, _, _ = ep2_run
    bench = write_benchmarks(root / "bench")
    cmd = ["mm1-eval", "--run-dir", str(root / "run"), "--preset", "tiny", "--suite",
           "paper-fewshot", "--benchmarks-root", str(bench), "--shots", "0", "4", "8",
           "--max-new-tokens", "4", "--table", str(root / "table3.md"), "--output",
           str(root / "fewshot.json"), *BASE, *EVAL_OVERRIDES,
           f"data.tokenizer_model={demo_data / 'tokenizer.model'}"]
    run = _procs.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO),
                     env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    table = (root / "table3.md").read_text().splitlines()
    columns = [b.column for b in BENCHMARKS.values()]
    assert table[2] == "| shots | " + " | ".join(columns) + " |"
    assert [line.split(" | ")[0] for line in table[4:7]] == ["| 0", "| 4", "| 8"]
    figures = json.loads((root / "table3.json").read_text())
    assert figures["columns"] == columns and figures["queries"]["GQA"] == 3
    out = json.loads((root / "fewshot.json").read_text())["results"]
    assert len(out) == 8 * 3
    for r in out:
        name = r["task"]
        support = bench / "coco" if name == "nocaps" else None
        task = load_benchmark(name, bench / SUITE_FOLDERS[name], support)
        truth = {e.id: e for e in task.examples}
        preds = {p["id"]: p["prediction"] for p in r["predictions"]}
        assert set(preds) == set(truth)
        if BENCHMARKS[name].metric == "cider":
            tok = {i: " ".join(ptb_tokenize(p)) for i, p in preds.items()}
            gts = {i: [" ".join(ptb_tokenize(c)) for c in truth[i].captions] for i in preds}
            want = 100 * float(cider.Cider().compute_score(gts, {i: [t] for i, t in
                                                                tok.items()})[0])
        elif BENCHMARKS[name].metric == "exact_match":
            want = 100 * sum(normalize_answer(p) == normalize_answer(truth[i].answers[0])
                             for i, p in preds.items()) / len(preds)
        else:
            if name == "okvqa":  # scored on the stemmed prediction (okvqa_stem is unit-tested)
                from mm1_megatron.evaluation.okvqa_stem import okvqa_stem

                stems = task.meta["answer_stems"]
                for p in r["predictions"]:
                    assert p["stemmed"] == okvqa_stem(p["prediction"], stems)
                preds = {p["id"]: p["stemmed"] for p in r["predictions"]}
            want = 100 * sum(_vqa_accuracy_reference(p, list(truth[i].answers))
                             for i, p in preds.items()) / len(preds)
        assert r["reported"] == pytest.approx(want, abs=1e-6), (name, r["shots"])
        column = BENCHMARKS[name].column
        assert figures["rows"][str(r["shots"])][column] == pytest.approx(want, abs=0.006)


@pytest.fixture(scope="module")
def one_process_eval(ep2_run, demo_data):
    """`mm1-eval` in one process on the EP=2-trained MoE checkpoint: captions and VQA at 0 and
    4 shots (3 queries each) and the held-out answer loss; (its arguments, stdout, JSON)."""
    from tests._helpers.evaluation import EVAL_OVERRIDES
    from tests._helpers.parity import BASE

    root, _, _ = ep2_run
    tasks = root / "tasks_dp"
    _procs.run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                str(demo_data), "--output", str(tasks)], check=True, capture_output=True)
    args = ["--run-dir", str(root / "run"), "--preset", "tiny", "--task",
            str(tasks / "caption.jsonl"), "--task", str(tasks / "vqa.jsonl"), "--shots", "0",
            "4", "--limit", "3", "--max-new-tokens", "4", "--answer-loss",
            str(demo_data / "sft_heldout.jsonl"), *BASE, *EVAL_OVERRIDES,
            f"data.tokenizer_model={demo_data / 'tokenizer.model'}"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    one = _procs.run(["mm1-eval", *args, "--output", str(root / "one.json")],
                     capture_output=True, text=True, timeout=300, cwd=str(REPO), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    return args, one.stdout, json.loads((root / "one.json").read_text())


@pytest.mark.slow
@pytest.mark.multirank
@pytest.mark.parametrize("layout,flags,banner", [
    ("dp2", [], "2 data-parallel ranks"),
    ("tp2", ["--tp", "2"], "TP=2 x EP=1"),  # MoE at tp>1: built with SP, generates without
    ("ep2", ["--ep", "2"], "TP=1 x EP=2"),
])
def test_mm1_eval_on_two_ranks_equals_one_process(one_process_eval, ep2_run, layout, flags,
                                                  banner):
    """`mm1-eval` launched as 2 gloo ranks (torchrun's variables) gives one process's
    predictions, scores and table exactly. dp2: each rank generates for every other query
    (3 queries: 2 and 1) and the predictions are gathered in query order. tp2 / ep2: both
    ranks hold half of each weight matrix / half of the experts and generate every query in
    lock-step. The checkpoint was trained at EP=2 x DP=2, so each layout reshards it."""
    root, _, _ = ep2_run
    args, one_stdout, one = one_process_eval
    out = root / f"{layout}.json"
    two = torchrun(REPO / "mm1_megatron" / "evaluation" / "cli.py", 2, *args, *flags,
                   "--output", str(out), timeout=300)
    assert banner in two.stdout
    table = one_stdout.strip().splitlines()[-4:]
    assert two.stdout.count(table[-1]) == 1  # printed once, by rank 0, the same table
    assert two.stdout.strip().splitlines()[-4:] == table
    got = json.loads(out.read_text())
    assert [len(r["predictions"]) for r in got["results"]] == [3, 3, 3, 3]
    assert got["results"] == one["results"]
    # The answer loss sums over TP ranks in another order: equal to float32 rounding.
    loss, reference = got["answer_loss"], one["answer_loss"]
    assert loss["answer_tokens"] == reference["answer_tokens"] > 0
    assert abs(loss["answer_loss"] - reference["answer_loss"]) < 1e-5 * reference["answer_loss"]

"""mm1-train end to end on the demo data: loss falls, TensorBoard and checkpoints written,
automatic resume, SIGUSR1 preemption (checkpoint + exit 75), NaN guard (exit 3)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests._helpers.tensorboard import scalars
from tests._procs import free_port, run_ranks, sigkill_at_line
from tests import _procs

pytestmark = pytest.mark.slow


REPO = Path(__file__).resolve().parents[2]


def command(data: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mm1_megatron.cli", "--preset", "demo",
            f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
            f"run_dir={run_dir}", "train.warmup_steps=1", "logging.log_interval=1", *overrides]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return _procs.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                      env=env)


EIGHT_STEPS = ["train.train_steps=8", "checkpoint.save_interval=4", "logging.sample_ids=true"]


@pytest.fixture(scope="module")
def eight_steps(demo_data, tmp_path_factory):
    """One uninterrupted 8-step demo run (checkpoints at steps 4 and 8, sample ids logged),
    left as it finished: the run the resume tests continue (in a copy) or compare with."""
    run_dir = tmp_path_factory.mktemp("eight_steps") / "run"
    first = run(command(demo_data, run_dir, *EIGHT_STEPS))
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir, first


def test_train_log_checkpoint_and_resume(demo_data, eight_steps, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(eight_steps[0], run_dir)  # the fixture's run stays as it finished
    first = eight_steps[1]
    assert "step      8/8 | loss" in first.stdout
    losses = [v for _, v in scalars(run_dir, "loss/lm")]
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])  # it learns
    per_layer = [f"moe/{name}{suffix}" for name in ("load_balancing_loss", "z_loss",
                                                     "expert_load_imbalance")
                 for suffix in ("", "/layer_1", "/layer_3")]
    # Rows are per source (45/45/10 of 8 rows a step): a source's loss is logged on the
    # steps whose batch held one of its rows, text on about 0.8 of them.
    for tag in ("loss/caption", "loss/interleaved", "loss/text"):
        assert 1 <= len(scalars(run_dir, tag)) <= 8, tag
    assert len(scalars(run_dir, "loss/caption")) == len(scalars(run_dir, "loss/interleaved")) == 8
    for tag in ("optim/lr", "optim/grad_norm", "optim/skipped_steps", "perf/step_time_s", "perf/tokens_per_s",
                "perf/images_per_s", "perf/tflops_per_device", "memory/max_rss_gb", *per_layer):
        assert len(scalars(run_dir, tag)) == 8, tag
    balance = [v for _, v in scalars(run_dir, "moe/load_balancing_loss/layer_1")]
    assert all(0.9 < v < 4.0 for v in balance)  # 1.0 = uniform routing (no coefficient)
    imbalance = [v for _, v in scalars(run_dir, "moe/expert_load_imbalance/layer_1")]
    assert all(1.0 <= v <= 4.0 for v in imbalance)  # max/mean over 4 experts
    assert (run_dir / "config.yaml").is_file()  # what mm1-eval / the converters read
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000004",
                                                                 "step_00000008"]
    again = run(command(demo_data, run_dir, "train.train_steps=10"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {checkpoints / 'step_00000008'} at step 8" in again.stdout
    assert [s for s, _ in scalars(run_dir, "loss/lm")][-2:] == [9, 10]

    # SFT from this run (its latest checkpoint, given as the run dir), the ViT frozen: loss
    # on the conversations' answers only, logged per source as loss/sft. demo-sft is tiled
    # (168 px tiles: the 112 px position tables interpolated) and evaluates in the chat
    # format during training.
    tasks = tmp_path / "tasks"
    made = run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                str(demo_data), "--output", str(tasks)])
    assert made.returncode == 0, made.stderr[-2000:]
    sft_dir = tmp_path / "sft"
    cmd = command(demo_data, sft_dir, "train.train_steps=3", "checkpoint.save_interval=3",
                  f"checkpoint.init_from={run_dir}", "train.freeze=[vision]",
                  f"eval.tasks={tasks}/chat_vqa.jsonl", "eval.interval=3", "eval.limit=2",
                  "eval.max_new_tokens=3")
    cmd[cmd.index("demo")] = "demo-sft"
    sft = run(cmd)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert f"initialised model weights from {run_dir}" in sft.stdout
    assert len(scalars(sft_dir, "loss/sft")) == 3 and not scalars(sft_dir, "loss/caption")
    assert [step for step, _ in scalars(sft_dir, "eval/chat_vqa/0shot")] == [3]
    same = run_ranks(__file__, "case_parts_changed", timeout=300, kwargs={
        "before": str(checkpoints / "step_00000010"),
        "after": str(sft_dir / "checkpoints" / "step_00000003")})[0]
    assert same == {"vision": False, "connector": True, "language_model": True,
                    # interpolated once for the 168 px tiles (then frozen / trained)
                    "resized": ["connector.pos_emb", "vision.position_embeddings.weight"]}

    # mm1-eval --chat on the fine-tuned run: zero-shot VQA, multiple choice, yes/no
    chat = run([sys.executable, "-m", "mm1_megatron.evaluation.cli", "--run-dir", str(sft_dir),
                "--chat", "--limit", "4", "--max-new-tokens", "3", "--output",
                str(tmp_path / "chat.json"), f"data.tokenizer_model={demo_data}/tokenizer.model",
                *[a for t in ("chat_vqa", "chat_choice", "chat_yesno")
                  for a in ("--task", str(tasks / f"{t}.jsonl"))]])
    assert chat.returncode == 0, chat.stderr[-3000:]
    # the held-out conversations' answer loss falls with SFT
    losses = {}
    for name, rd in (("pretrained", run_dir), ("sft", sft_dir)):
        out = run([sys.executable, "-m", "mm1_megatron.evaluation.cli", "--run-dir", str(rd),
                   "--answer-loss", str(demo_data / "sft_heldout.jsonl"), "--output",
                   str(tmp_path / f"{name}.json"),
                   f"data.tokenizer_model={demo_data}/tokenizer.model"])
        assert out.returncode == 0, out.stderr[-3000:]
        losses[name] = json.loads((tmp_path / f"{name}.json").read_text())["answer_loss"]
    assert losses["sft"]["answer_tokens"] == losses["pretrained"]["answer_tokens"] > 0
    print("held-out answer loss", {k: v["answer_loss"] for k, v in losses.items()})
    assert losses["sft"]["answer_loss"] < losses["pretrained"]["answer_loss"]
    table = chat.stdout.strip().splitlines()[-3:]
    assert [row.split(" | ")[:2] for row in table] == [
        ["chat_vqa   ", "VQA acc   "], ["chat_choice", "choice acc"],
        ["chat_yesno ", "yes/no acc"]]
    results = {r["task"]: r for r in json.loads((tmp_path / "chat.json").read_text())["results"]}
    assert all(r["chat"] and r["shots"] == 0 for r in results.values())
    assert results["chat_vqa"]["examples"] == 3 and results["chat_choice"]["examples"] == 4
    assert set(results["chat_yesno"]["details"]) == {"accuracy", "precision", "recall", "f1",
                                                     "yes_ratio"}
    for p in results["chat_choice"]["predictions"]:
        assert p["letter"] in (None, "A", "B", "C") and p["correct"] in (True, False)


def case_parts_changed(before: str, after: str) -> dict:
    """Per model part: whether any of its tensors differs between two checkpoints; tensors
    whose shape differs (position tables interpolated to another image size) are listed apart."""
    import torch

    from mm1_megatron.convert.reader import CheckpointReader

    a, b = CheckpointReader(before), CheckpointReader(after)
    keys = sorted(a.meta)
    assert keys == sorted(b.meta)
    changed: dict = {"resized": []}
    for key, x, y in zip(keys, a.load([(k, ()) for k in keys]), b.load([(k, ()) for k in keys])):
        if x.shape != y.shape:
            changed["resized"].append(key)
            continue
        part = key.split(".")[0]
        changed[part] = changed.get(part, False) or not torch.equal(x, y)
    return changed


def test_sigusr1_checkpoints_and_exits_for_requeue(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = _procs.popen(command(demo_data, run_dir, "train.train_steps=200"),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                        cwd=REPO, env=env)
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            if line.startswith("step      2/200"):
                proc.send_signal(signal.SIGUSR1)
                break
            assert time.monotonic() < deadline
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err[-3000:]
    assert "received SIGUSR1" in err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert 2 <= int(latest.split("_")[1]) < 200


def test_non_finite_steps_stop_the_run(demo_data, tmp_path):
    result = run(command(demo_data, tmp_path / "run", "train.train_steps=20", "train.lr=1e30",
                         "train.grad_clip=0", "train.max_nonfinite_steps=2"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "2 steps in a row had a NaN/Inf loss or gradient" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def newest_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max((run_dir / "tensorboard").glob("events.out.tfevents.*"),
                 key=lambda p: p.stat().st_mtime_ns)
    acc = EventAccumulator(str(newest))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def sample_log(run_dir: Path, rank: int = 0) -> dict[int, list]:
    """step -> the sample ids of the rows data-parallel rank `rank` trained on (the last line
    per step wins: a killed run may have logged a step that its restart repeats)."""
    lines = (run_dir / "samples" / f"dp_rank_{rank}.jsonl").read_text().splitlines()
    return {entry["step"]: entry["rows"] for entry in map(json.loads, lines)}


def test_sigkill_after_checkpoint_then_resume_is_bitwise(demo_data, eight_steps, tmp_path):
    steps = EIGHT_STEPS
    whole = eight_steps[0]  # the same run uninterrupted
    reference = newest_scalars(whole, "loss/lm")

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = _procs.popen(command(demo_data, killed, *steps), stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
    helpers = sigkill_at_line(proc, "saved checkpoint at step 4")
    assert helpers, "the save started no helper process: nothing to check below"
    gone, alive = psutil.wait_procs(helpers, timeout=10)
    assert not alive, f"helpers outlived the killed rank: {[p.cmdline()[-1:] for p in alive]}"
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    resumed = run(command(demo_data, killed, *steps))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = newest_scalars(killed, "loss/lm")
    assert sorted(after) == [5, 6, 7, 8]
    assert all(after[s] == reference[s] for s in after)  # bitwise on CPU fp32
    samples, reference_samples = sample_log(killed), sample_log(whole)
    assert sorted(samples) == list(range(1, 9))
    assert samples == reference_samples  # the same rows, step by step
    assert len({i for rows in samples.values() for row in rows for i in row}) > 8


def torchrun_command(nproc: int, cmd: list[str]) -> list[str]:
    """`command(...)` (python -m mm1_megatron.cli ARGS) as torchrun launch/train.py ARGS: the
    suite's one run through torchrun's own agent (fresh interpreters)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", str(REPO / "launch" / "train.py"), *cmd[3:]]


def ranks(nproc: int, cmd: list[str]) -> subprocess.CompletedProcess:
    """`command(...)` as `nproc` ranks of launch/train.py with torchrun's variables, forked
    from the suite's warm parent (the CompletedProcess of `run`)."""
    return _procs.torchrun(REPO / "launch" / "train.py", nproc, *cmd[3:], check=False)


@pytest.mark.mcore
@pytest.mark.multirank
def test_pipeline_run_logs_every_moe_layer_and_resumes_in_one_process(demo_data, tmp_path):
    """PP=2 (each stage owns one MoE layer; rank 0 logs both) for 2 steps, then one process
    continues: steps 3-4 match the uninterrupted PP=2 run within 1e-5 relative."""
    whole = tmp_path / "whole"
    uninterrupted = ranks(2, command(demo_data, whole, "train.train_steps=4", "parallel.pp=2"))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = newest_scalars(whole, "loss/lm")
    assert sorted(reference) == [1, 2, 3, 4]  # computed on the last stage, logged on rank 0
    for tag in ("moe/z_loss/layer_1", "moe/z_loss/layer_3",
                "moe/expert_load_imbalance/layer_1", "moe/expert_load_imbalance/layer_3"):
        assert len(scalars(whole, tag)) == 4, tag

    resharded = tmp_path / "resharded"
    first = ranks(2, command(demo_data, resharded, "train.train_steps=2", "parallel.pp=2"))
    assert first.returncode == 0, first.stderr[-3000:]
    # train_steps grows from 2 to 4 on resume: the config's LR schedule applies from here.
    rest = run(command(demo_data, resharded, "train.train_steps=4"))
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "at step 2" in rest.stdout
    after = newest_scalars(resharded, "loss/lm")
    assert sorted(after) == [3, 4]
    for step in (3, 4):
        assert abs(after[step] - reference[step]) <= 1e-5 * reference[step], step


def test_pipeline_stage_without_moe_layers_logs_and_finishes(demo_data, tmp_path):
    """MoE only on layer 1 of 4 (layer_freq=4) with PP=2: stage 1 has no router, yet the MoE
    metrics' collectives still line up across stages."""
    result = run(torchrun_command(2, command(demo_data, tmp_path / "run", "train.train_steps=2",
                                             "parallel.pp=2", "llm.moe.layer_freq=4")))
    assert result.returncode == 0, result.stderr[-3000:]
    for tag in ("moe/z_loss/layer_1", "moe/load_balancing_loss/layer_1",
                "moe/expert_load_imbalance/layer_1"):
        assert len(scalars(tmp_path / "run", tag)) == 2, tag
    assert not scalars(tmp_path / "run", "moe/z_loss/layer_3")


def test_images_decoded_once_per_tp_group_and_on_the_first_stage_only(demo_data, tmp_path):
    """Only the first pipeline stage's TP rank 0 reads and decodes images; its TP peer gets
    them by broadcast and every stage learns which could not be decoded (their documents
    carry no loss). TP=2 and PP=2 on data with an undecodable image match one process."""
    from mm1_megatron.data.shard_writer import RawSample, write_dataset
    from tests._helpers.data import jpeg

    data = tmp_path / "data"
    good, bad = jpeg(1, (64, 48)), b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
    from mm1_megatron.data.tokenizer import Tokenizer

    write_dataset([RawSample([0, f"picture number {i}"], [("jpg", bad if i == 1 else good)])
                   for i in range(6)], data / "caption", "caption",
                  tokenizer=Tokenizer.load(demo_data / "tokenizer.model"))
    (data / "tokenizer.model").write_bytes((demo_data / "tokenizer.model").read_bytes())
    mixture = ["data.weight_interleaved=0", "data.weight_text=0", "llm.moe.num_experts=0",
               "train.warmup_steps=0",
               "data.prefetch=0"]
    # PP stages draw their initial weights in another order, so PP=2 starts from the single
    # process's step-1 checkpoint (resharded on resume) and is compared on steps 2-3.
    assert run(command(data, tmp_path / "pp2", *mixture, "train.train_steps=1")).returncode == 0
    losses = {}
    for name, nproc, layout in (("single", 1, []),
                                ("tp2", 2, ["parallel.tp=2"]),
                                ("pp2", 2, ["parallel.pp=2"])):
        cmd = command(data, tmp_path / name, *mixture, *layout, "train.train_steps=3")
        result = ranks(nproc, cmd) if nproc > 1 else run(cmd)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = newest_scalars(tmp_path / name, "loss/lm")
        skipped = newest_scalars(tmp_path / name, "data/skipped_undecodable_image")
        assert skipped and max(skipped.values()) >= 1, name  # counted where it was decoded
    assert sorted(losses["single"]) == [1, 2, 3] and sorted(losses["pp2"]) == [2, 3]
    for name in ("tp2", "pp2"):
        for step, got in losses[name].items():
            want = losses["single"][step]
            assert abs(got - want) <= 1e-5 * want, (name, step, got, want)


def test_one_run_per_run_dir_and_a_killed_holder_does_not_block(demo_data, tmp_path):
    """A second mm1-train on a run directory in use is refused in one line naming the holder
    (nothing written); after the holder is SIGKILLed the next run starts."""
    run_dir = tmp_path / "run"
    log = (tmp_path / "first.log").open("w")
    first = _procs.popen(command(demo_data, run_dir, "train.train_steps=500"), cwd=REPO,
                         stdout=log, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 180
        while "step " not in (tmp_path / "first.log").read_text():
            assert first.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        events = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
        second = run(command(demo_data, run_dir, "train.train_steps=500"))
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            f"mm1-train: run_dir {run_dir} is in use by pid {first.pid} on "
            f"{__import__('socket').gethostname()}; wait for it to finish or choose another "
            "run_dir"]
        assert sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")) == events
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        log.close()
    third = run(command(demo_data, run_dir, "train.train_steps=2"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert "saved checkpoint at step 2" in third.stdout


def test_mm1_train_on_a_blend_of_every_source_format_resumes_dp2_on_dp1(demo_data, tmp_path):
    """One dataset of every format mm1-prepare-data reads (img2dataset and energon captions,
    MINT-1T / OBELICS / MMC4 documents, FineWeb / DCLM text), prepared and blended: DP=2
    trains 2 steps and checkpoints, DP=1 resumes for 2 more. Every dataset is drawn, every
    kind's loss logged, and each rank of each step trained the rows one uninterrupted
    single-process loader gives."""
    import itertools

    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import latest_checkpoint
    from mm1_megatron.config import load_config
    from mm1_megatron.data.loader import MultimodalLoader
    from mm1_megatron.data.tokenizer import Tokenizer
    from tests._helpers.sources import prepared_blend

    blend = prepared_blend(tmp_path, Tokenizer.load(demo_data / "tokenizer.model"))
    overrides = [f"data.blend={blend}", f"data.tokenizer_model={demo_data}/tokenizer.model",
                 "data.weight_interleaved=1", "data.weight_caption=1", "data.weight_text=1"]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mm1_megatron.cli", "--preset", "demo", *overrides,
           f"run_dir={run_dir}", "train.warmup_steps=1", "logging.log_interval=1",
           "logging.sample_ids=true"]
    first = ranks(2, cmd + ["train.train_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run(cmd + ["train.train_steps=4"])
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "at step 2" in rest.stdout and "resumed from" in rest.stdout
    for kind in ("interleaved", "caption", "text"):
        assert [step for step, _ in scalars(run_dir, f"loss/{kind}")], kind
    common = dist_checkpointing.load_common_state_dict(str(latest_checkpoint(run_dir)))
    streams = common["extra"]["loader"]["sources"]  # one position per dataset, in blend order
    assert len(streams) == 7 and all(s["rows"] > 0 for s in streams), streams
    assert set(common["extra"]["dataset"]) == {"caption[0]", "caption[1]", "interleaved[0]",
                                               "interleaved[1]", "interleaved[2]", "text[0]",
                                               "text[1]"}
    # The rows each rank trained, against one loader run through: at DP=2 rank r took rows
    # r, r + 2, ... of each step's eight; at DP=1 all eight.
    cfg = load_config("demo", overrides, this_machine=True)
    loader = MultimodalLoader(cfg, 0, 1, log=None)
    micro = [b["sample_ids"] for b, _ in itertools.islice(iter(loader), 16)]
    per_step = cfg.train.global_batch_size // cfg.train.micro_batch_size
    logged = {rank: sample_log(run_dir, rank) for rank in (0, 1)}
    assert sorted(logged[0]) == [1, 2, 3, 4] and sorted(logged[1]) == [1, 2]
    for step in (1, 2, 3, 4):
        rows = [r for mb in micro[(step - 1) * per_step:step * per_step] for r in mb]
        if step <= 2:
            assert [logged[0][step], logged[1][step]] == [rows[0::2], rows[1::2]], step
        else:
            assert logged[0][step] == rows, step

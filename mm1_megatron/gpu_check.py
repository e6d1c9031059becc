"""`mm1-gpu-check`: the one command that proves the GPU path on a real node (1-8 GPUs).

No GPU is lent to this project, so the CPU suite proves what a CPU can see (device placement
through the meta-device audit, bf16, THD segments, FP8 shapes, host syncs) and this command
proves the rest where the hardware is: run it once on a GPU node of a new cluster or container,

    mm1-gpu-check                   # a line per check, then one JSON summary line; exit 1 on a failure

Checks: Transformer Engine layer specs build; TE and local-spec logits agree on `tiny` within
bf16 tolerance (the same weights through dist_checkpointing); bf16 steps of `demo` lower the
loss; FP8 steps' loss stays close to bf16 (Hopper); DALI `mixed` (nvJPEG) decodes like `cpu`;
NCCL all-reduces device tensors across the node's GPUs; a 30B-shaped decoder slice's step time
and peak memory against the planner's prediction (ratios); host syncs per training step; a
run resumed from a background (async) save retraces the losses of the run that wrote it.
Without a GPU it says so in one line and exits 0; `--cpu-parts` runs the checks a CPU can do
(CI does), the others report "skip".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
SYNC_BUDGET = 8
BF16_REL_TOL = 2e-2  # TE vs local logits, relative to the largest logit
FP8_REL_TOL = 5e-2  # final loss, FP8 vs bf16
# Resumed vs uninterrupted losses: the same kernels on the same layout (TE's fused-attention
# backward may reorder sums); a checkpoint a step ahead differs by percents on `demo`.
RESUME_REL_TOL = 1e-3


@dataclass
class Result:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str
    figures: dict = field(default_factory=dict)


class Skip(Exception):
    """The check cannot run on this machine (no GPU, no TE, no FP8)."""


# Without a GPU (--cpu-parts) the demo runs trade batch for time: two micro-batches a step still
# accumulate, save, resume and sync as eight do, at half the steps' cost (bf16 matmuls are
# emulated, and slow, on CPUs without native bf16). A GPU node runs the preset as it is.
CPU_PARTS_OVERRIDES = ("train.global_batch_size=4",)


@dataclass
class Context:
    data: Path
    work: Path
    steps: int
    overrides: tuple[str, ...] = ()


def _need_gpu(fp8: bool = False, te: bool = True) -> None:
    from mm1_megatron.runtime import detect_backends

    b = detect_backends()
    if not b.cuda_available:
        raise Skip("needs a CUDA GPU")
    if te and b.layer_spec != "transformer_engine":
        raise Skip("needs Transformer Engine")
    if fp8 and not b.fp8_available:
        raise Skip("needs an FP8 GPU (Hopper) with Transformer Engine")


def _demo_config(ctx: Context, name: str, *overrides: str):
    from mm1_megatron.config import load_config

    return load_config("demo", [f"data.path={ctx.data}",
                                f"data.tokenizer_model={ctx.data}/tokenizer.model",
                                f"run_dir={ctx.work / name}", f"train.train_steps={ctx.steps}",
                                "train.warmup_steps=1", "data.prefetch=0", *ctx.overrides,
                                *overrides])


def _train(cfg, watch: Optional[Callable] = None, checkpoints: bool = False) -> list[float]:
    """Losses of the steps `cfg` trains in this process (a world of one); `checkpoints`: saved
    and resumed as `mm1-train` does."""
    from mm1_megatron.runtime import shutdown_distributed
    from mm1_megatron.train.callbacks import Callback, Checkpointing
    from mm1_megatron.train.loop import Trainer

    losses: list[float] = []

    class Record(Callback):
        def on_step(self, trainer, m) -> None:
            losses.append(m.loss)
            if watch is not None:
                watch(m)

    trainer = Trainer(cfg, callbacks=[Record(), *([Checkpointing()] if checkpoints else [])])
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.close()
        shutdown_distributed()
    return losses


@contextlib.contextmanager
def _tiny_bf16_world() -> Iterator:
    """`tiny` in bf16 in a world of one, shut down afterwards."""
    from mm1_megatron.config import load_config, single_process_config
    from mm1_megatron.runtime import init_distributed, shutdown_distributed

    cfg = single_process_config(load_config("tiny", ["train.precision=bf16"]))
    init_distributed(cfg.parallel, seed=0, environ={})
    try:
        yield cfg
    finally:
        shutdown_distributed()


# -- the checks ------------------------------------------------------------------------------

def check_te_spec_builds(ctx: Context) -> Result:
    _need_gpu()
    from mm1_megatron.model.builder import build_mm1_model

    with _tiny_bf16_world() as cfg:
        n_te, n_local = (sum(p.numel() for p in build_mm1_model(cfg, use_te=te).parameters())
                         for te in (True, False))
    ok = n_te == n_local
    return Result("te_spec_builds", "pass" if ok else "fail",
                  f"TE spec {n_te:,} parameters, local spec {n_local:,}",
                  {"te_params": n_te, "local_params": n_local})


def check_te_vs_local_logits(ctx: Context) -> Result:
    _need_gpu()
    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import load_model_weights, model_sharded_state
    from mm1_megatron.convert.verify import probe
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import to_device

    with _tiny_bf16_world() as cfg:
        local = build_mm1_model(cfg, use_te=False)
        ckpt = ctx.work / "te_vs_local"
        ckpt.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save({"model": model_sharded_state([local])}, str(ckpt))
        te = build_mm1_model(cfg, use_te=True)
        load_model_weights(ckpt, [te])  # the local spec saves under TE-compatible keys
        ids, pixels = probe(cfg, images=True)
        out = {}
        for name, model in (("local", local), ("te", te)):
            model.cuda().eval()
            s = ids.shape[1]  # one document: the TE model runs it as one THD segment
            b = to_device({"ids": ids, "pos": torch.arange(s).unsqueeze(0),
                           "docs": torch.zeros_like(ids), "pixels": pixels,
                           "cu": torch.tensor([0, s], dtype=torch.int32)})
            with torch.no_grad():
                out[name] = model(b["ids"], b["pos"], images=b["pixels"],
                                  document_ids=b["docs"], cu_seqlens=b["cu"],
                                  max_seqlen=s).float()
    diff = float((out["te"] - out["local"]).abs().max())
    scale = float(out["local"].abs().max())
    ok = diff <= BF16_REL_TOL * scale
    return Result("te_vs_local_logits", "pass" if ok else "fail",
                  f"max |logit diff| {diff:.3g} vs largest logit {scale:.3g} "
                  f"(tolerance {BF16_REL_TOL:g} relative)", {"max_diff": diff, "scale": scale})


def check_demo_bf16_steps(ctx: Context) -> Result:
    losses = _train(_demo_config(ctx, "bf16", "train.precision=bf16"))
    ok = len(losses) == ctx.steps and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    return Result("demo_bf16_steps", "pass" if ok else "fail",
                  f"{len(losses)} bf16 steps of demo: loss {losses[0]:.3f} -> {losses[-1]:.3f}",
                  {"losses": losses})


def check_fp8_vs_bf16(ctx: Context) -> Result:
    _need_gpu(fp8=True)
    dense = "llm.moe.num_experts=0"  # MoE expert GEMMs see any token count: FP8 needs padding
    bf16 = _train(_demo_config(ctx, "dense_bf16", "train.precision=bf16", dense))
    fp8 = _train(_demo_config(ctx, "dense_fp8", "train.precision=bf16", "train.fp8=hybrid",
                              dense))
    rel = abs(fp8[-1] - bf16[-1]) / abs(bf16[-1])
    ok = all(map(math.isfinite, fp8)) and rel <= FP8_REL_TOL
    return Result("fp8_vs_bf16", "pass" if ok else "fail",
                  f"final loss FP8 {fp8[-1]:.4f} vs bf16 {bf16[-1]:.4f} ({rel:.2%}; tolerance "
                  f"{FP8_REL_TOL:.0%})", {"fp8": fp8, "bf16": bf16, "relative": rel})


def _demo_photos() -> list[bytes]:
    import io

    from PIL import Image
    from skimage import data as photos

    out = []
    for name in ("chelsea", "astronaut", "coffee", "rocket"):
        buffer = io.BytesIO()
        Image.fromarray(getattr(photos, name)()).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def check_dali_mixed_vs_cpu(ctx: Context) -> Result:
    _need_gpu(te=False)
    from mm1_megatron.data.images import ImageDecoder

    photos = _demo_photos()
    ok, details, figures = True, [], {}
    # Both geometries (vision.resize): each runs its own resize on the GPU for "mixed".
    for resize in ("squash", "crop"):
        cpu, bad_cpu = ImageDecoder(378, batch_size=4, device="cpu",
                                    resize=resize).decode(photos)
        mixed, bad_mixed = ImageDecoder(378, batch_size=4, device="mixed",
                                        resize=resize).decode(photos)
        diff = (mixed.cpu() - cpu).abs()
        mean, worst = float(diff.mean()), float(diff.max())
        ok = ok and not bad_cpu and not bad_mixed and mixed.is_cuda and mean < 0.02 \
            and worst < 0.5
        details.append(f"{resize} mean |diff| {mean:.4f}, max {worst:.3f}")
        figures[resize] = {"mean_abs_diff": mean, "max_abs_diff": worst}
    return Result("dali_mixed_vs_cpu", "pass" if ok else "fail",
                  f"nvJPEG vs CPU decode of {len(photos)} photos at 378 px: "
                  f"{'; '.join(details)} (CLIP-normalised units)", figures)


def _all_reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    value = torch.full((1024,), float(rank + 1), device="cuda")
    dist.all_reduce(value)
    torch.cuda.synchronize()
    if rank == 0:
        Path(out).write_text(json.dumps(value[:4].tolist()))
    dist.destroy_process_group()


def check_nccl_all_reduce(ctx: Context) -> Result:
    _need_gpu(te=False)
    import socket

    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctx.work / "all_reduce.json"
    mp.spawn(_all_reduce_worker, args=(world, port, str(out)), nprocs=world, join=True)
    got, want = json.loads(out.read_text()), world * (world + 1) / 2
    ok = all(v == want for v in got)
    return Result("nccl_all_reduce", "pass" if ok else "fail",
                  f"{world} GPUs: all-reduce of device tensors gave {got[0]:g} (want {want:g})",
                  {"gpus": world})


def _slice_config(layers: int = 2):
    """mm1-30b's decoder shape on one GPU: `layers` layers, text only, bf16, no recompute."""
    from mm1_megatron.config import get_preset, set_field

    cfg = get_preset("mm1-30b")
    for key, value in (("parallel.tp", 1), ("parallel.pp", 1), ("parallel.ep", 1),
                       ("parallel.first_stage_layers", None), ("parallel.world_size", 1),
                       ("parallel.sequence_parallel", False), ("parallel.tp_comm_overlap", False),
                       ("parallel.overlap_grad_reduce", False),
                       ("parallel.overlap_param_gather", False), ("train.fp8", None),
                       ("llm.num_layers", layers), ("vision.num_layers", 1),
                       ("llm.recompute", "none"), ("vision.recompute", "none"),
                       ("train.micro_batch_size", 1), ("train.global_batch_size", 1)):
        set_field(cfg, key, value)
    cfg.data.max_images_per_sequence = 0  # text only (the encoder sees one blank image)
    return cfg


def check_decoder_slice_vs_plan(ctx: Context) -> Result:
    from mm1_megatron.plan import estimate

    cfg = _slice_config()
    plan = estimate(cfg, world=1, gpus_per_node=1)
    predicted_s, predicted_gib = plan["time"]["step_s"], plan["memory"]["worst_gib"]
    figures = {"predicted_step_s": predicted_s, "predicted_gib": predicted_gib}
    try:
        _need_gpu()
    except Skip as why:
        raise Skip(f"{why} (predicted: {predicted_s:.3f} s, {predicted_gib:.1f} GiB)") from None
    from mm1_megatron.runtime import init_distributed, shutdown_distributed
    from mm1_megatron.train.step import build_model, build_optimizer, train_step

    init_distributed(cfg.parallel, seed=0, environ={})
    try:
        model = build_model(cfg, use_te=True)
        optimizer, scheduler = build_optimizer(cfg, model)
        s = cfg.data.seq_length
        tokens = torch.randint(10, cfg.llm.vocab_size, (1, s))
        batch = dict(tokens=tokens, labels=tokens.roll(-1, 1), loss_mask=torch.ones(1, s),
                     position_ids=torch.arange(s).unsqueeze(0),
                     document_ids=torch.zeros(1, s, dtype=torch.long),
                     cu_seqlens=torch.tensor([0, s], dtype=torch.int32), max_seqlen=s,
                     images=torch.empty(0, 3, cfg.vision.image_size, cfg.vision.image_size))
        for _ in range(2):  # warm-up: kernels chosen, allocator settled
            train_step(cfg, model, optimizer, scheduler, [batch])
        torch.cuda.synchronize()
        start, repeats = time.perf_counter(), 5
        for _ in range(repeats):
            train_step(cfg, model, optimizer, scheduler, [batch])
        torch.cuda.synchronize()
        measured_s = (time.perf_counter() - start) / repeats
        measured_gib = torch.cuda.max_memory_allocated() / 2**30
    finally:
        shutdown_distributed()
    figures.update(measured_step_s=measured_s, measured_gib=measured_gib,
                   time_ratio=measured_s / predicted_s, memory_ratio=measured_gib / predicted_gib)
    ok = 0.5 <= figures["time_ratio"] <= 2.0 and 0.7 <= figures["memory_ratio"] <= 1.3
    return Result("decoder_slice_vs_plan", "pass" if ok else "fail",
                  f"2-layer mm1-30b decoder slice: step {measured_s:.3f} s vs planned "
                  f"{predicted_s:.3f} s (x{figures['time_ratio']:.2f}), peak "
                  f"{measured_gib:.1f} GiB vs planned {predicted_gib:.1f} GiB "
                  f"(x{figures['memory_ratio']:.2f})", figures)


def check_host_syncs(ctx: Context) -> Result:
    from mm1_megatron.runtime.host_syncs import HostSyncCounter

    counter = HostSyncCounter()
    per_step: list[int] = []

    def count(m) -> None:
        per_step.append(counter.total)
        counter.reset()

    with counter:
        _train(_demo_config(ctx, "syncs"), watch=count)
    worst = max(per_step[1:] or per_step)  # the first step's count includes set-up
    ok = worst <= SYNC_BUDGET
    return Result("host_syncs", "pass" if ok else "fail",
                  f"at most {worst} host syncs per step from our code (budget {SYNC_BUDGET})",
                  {"per_step": per_step})


def check_async_save_resume(ctx: Context) -> Result:
    """Background saves on this node's stack: the device-to-host copy (Megatron-Core's
    `preload_fn`) and a writer forked from a CUDA process. A bf16 run saves in the background
    halfway while it trains on; a second process resumes from that checkpoint and must retrace
    the first run's losses, which it cannot if the copy lagged behind the next optimizer step."""
    from mm1_megatron.checkpoint.directory import checkpoint_root, step_dir_name, write_latest

    half = max(1, ctx.steps // 2)
    overrides = ("train.precision=bf16", "checkpoint.async_save=true",
                 f"checkpoint.save_interval={half}")
    blocking: list[float] = []
    first = _train(_demo_config(ctx, "async_save", *overrides), checkpoints=True,
                   watch=lambda m: blocking.extend(v for k, v in m.checkpoint.items()
                                                   if k == "checkpoint_blocking_s"))
    cfg = _demo_config(ctx, "async_save", *overrides)
    write_latest(checkpoint_root(cfg.run_dir), step_dir_name(half))
    resumed = _train(cfg, checkpoints=True)
    retraced = first[half:]
    worst = max((abs(a - b) / abs(b) for a, b in zip(resumed, retraced)), default=math.inf)
    ok = len(resumed) == len(retraced) > 0 and worst <= RESUME_REL_TOL and bool(blocking)
    return Result("async_save_resume", "pass" if ok else "fail",
                  f"resumed from the background save of step {half}: {len(resumed)} steps, "
                  f"largest loss difference {worst:.2g} relative (tolerance {RESUME_REL_TOL:g}); "
                  f"blocking per save {max(blocking, default=math.nan):.2f} s",
                  {"first": first, "resumed": resumed, "relative": worst,
                   "blocking_s": blocking})


CHECKS: list[tuple[str, Callable[[Context], Result]]] = [
    ("te_spec_builds", check_te_spec_builds),
    ("te_vs_local_logits", check_te_vs_local_logits),
    ("demo_bf16_steps", check_demo_bf16_steps),
    ("fp8_vs_bf16", check_fp8_vs_bf16),
    ("dali_mixed_vs_cpu", check_dali_mixed_vs_cpu),
    ("nccl_all_reduce", check_nccl_all_reduce),
    ("decoder_slice_vs_plan", check_decoder_slice_vs_plan),
    ("host_syncs", check_host_syncs),
    ("async_save_resume", check_async_save_resume),
]
GPU_ONLY = {"te_spec_builds", "te_vs_local_logits", "fp8_vs_bf16", "dali_mixed_vs_cpu",
            "nccl_all_reduce", "decoder_slice_vs_plan"}


def run_checks(ctx: Context, names: Sequence[str]) -> list[Result]:
    results = []
    for name, check in CHECKS:
        if name not in names:
            continue
        start = time.perf_counter()
        try:
            result = check(ctx)
        except Skip as why:
            result = Result(name, "skip", str(why))
        except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
            last = traceback.format_exception_only(type(err), err)[-1].strip()
            result = Result(name, "fail", last[:300])
        result.figures["seconds"] = round(time.perf_counter() - start, 2)
        print(f"{result.status.upper():4} {name}: {result.detail}", flush=True)
        results.append(result)
    return results


def _demo_data(work: Path, data: Optional[str]) -> Path:
    if data:
        return Path(data)
    out = work / "demo_data"
    tool = REPO / "tools" / "make_demo_data.py"
    if not tool.is_file():
        raise SystemExit(f"mm1-gpu-check: {tool} not found; pass --data DIR (the output of "
                         "tools/make_demo_data.py)")
    subprocess.run([sys.executable, str(tool), "--output", str(out)], check=True,
                   capture_output=True)
    return out


def stack_versions() -> dict[str, Optional[str]]:
    """What the node runs, for the summary: a GPU report means little without them."""
    from mm1_megatron.runtime.backends import detect_backends
    from mm1_megatron.runtime.mcore_version import MCORE

    nccl = None
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {"megatron_core": str(MCORE), "transformer_engine":
            detect_backends().transformer_engine_version, "torch": torch.__version__,
            "cuda": torch.version.cuda, "nccl": nccl}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mm1-gpu-check", description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-parts", action="store_true",
                        help="without a GPU: run the checks a CPU can do (the others skip)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per demo run")
    parser.add_argument("--data", help="demo dataset (default: built with make_demo_data.py)")
    parser.add_argument("--only", nargs="*", choices=[n for n, _ in CHECKS],
                        help="run only these checks")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_parts:
        print("mm1-gpu-check: no CUDA GPU on this machine; nothing to check here (run it on a "
              "GPU node; --cpu-parts runs the parts a CPU can check)")
        return 0
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    names = args.only or [n for n, _ in CHECKS]
    with tempfile.TemporaryDirectory(prefix="mm1-gpu-check-") as tmp:
        work = Path(tmp)
        ctx = Context(data=_demo_data(work, args.data), work=work, steps=args.steps,
                      overrides=() if torch.cuda.is_available() else CPU_PARTS_OVERRIDES)
        results = run_checks(ctx, names)
    summary = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "gpus": torch.cuda.device_count(), "versions": stack_versions(),
               "passed": sum(r.status == "pass" for r in results),
               "failed": sum(r.status == "fail" for r in results),
               "skipped": sum(r.status == "skip" for r in results),
               "checks": [asdict(r) for r in results]}
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

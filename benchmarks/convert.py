"""Export throughput: Megatron checkpoint -> HF directory, against reading and writing the
same bytes.

    python benchmarks/convert.py [--llm-hidden 512 --llm-layers 8 --experts 4 --vocab 32000]
    python benchmarks/convert.py --quick        # a few-MB model, seconds

Saves a mid-size MM1 model (MoE every 2nd layer, c_abstractor; ~90M parameters, ~0.36 GB in
fp32 with the defaults) as a dist_checkpointing checkpoint in a temp dir, then interleaves
(measure.interleave, after one untimed export that sizes the output and warms imports):
  export (candidate): `mm1_megatron.convert.to_hf.export(..., verify=False)` - read the
          checkpoint, split fused QKV / GLU / stacked experts, write safetensors shards, index,
          config;
  copy   (baseline):  read every checkpoint file once and write the export's output bytes
          (files of the same sizes, filled with what was read).
Page cache: equally warm. Before every timed side (untimed) the previous output is removed,
every checkpoint file is read once (both sides read from the page cache) and `os.sync()` flushes
what is pending, then `prefault` touches as much memory as the side will use; the timed
writes land in the page cache (well under the kernel's dirty limit),
so neither side's time includes disk writeback. `--sync` adds a timed `os.sync()` to both: the
disk's cost, but os.sync flushes every process's writes, so on a shared disk it is noisy
(spreads of 2.6-3.3x were seen here, against ~1.1x without).
Throughput = bytes of export output per wall-clock second, both sides; ratio = export / copy.
`cpu_time`: the same per CPU-second of this process (less disturbed by other processes).
The last line is JSON (benchmarks/measure.py).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import (compare, describe, emit, interleave, load_average,  # noqa: E402
                                timed)

CHUNK = 8 << 20


def build_and_save(run_dir: Path, overrides: list[str]):
    from megatron.core import dist_checkpointing

    from mm1_megatron.checkpoint import model_sharded_state
    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.verify import reference_config
    from mm1_megatron.model.builder import build_mm1_model
    from mm1_megatron.runtime import init_distributed

    cfg = load_config("tiny", overrides)
    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1, environ={})
    model = build_mm1_model(reference_config(cfg), use_te=False)
    ckpt = run_dir / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save({"model": model_sharded_state([model])}, str(ckpt))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return cfg, ckpt, n_params


def _chunks(files: list[Path]) -> Iterator[bytes]:
    """The files' bytes in chunks, over and over."""
    while True:
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK):
                    yield chunk


def read_and_write(files: list[Path], in_bytes: int, sizes: dict[str, int], dst: Path) -> None:
    """Read every file of `files` once (more if the output is larger) and write files of
    `sizes` into `dst` from what was read: the bytes an export moves, without the export."""
    dst.mkdir()
    source, read = _chunks(files), 0
    for name, size in sizes.items():
        with open(dst / name, "wb") as f:
            while size:
                chunk = next(source)
                read += len(chunk)
                size -= f.write(memoryview(chunk)[:size])
    while read < in_bytes:
        read += len(next(source))


def prefault(path: Path, size: int) -> None:
    """Write `size` bytes to the page cache and delete them unwritten: the next side's
    allocations reuse pages the machine has just touched. In a VM whose idle memory the host
    takes back, first-touch pages cost ~3x per byte written, which otherwise lands on one
    side or the other at random."""
    block = bytes(CHUNK)
    with open(path, "wb") as f:
        for _ in range(0, size, CHUNK):
            f.write(block)
    path.unlink()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm-hidden", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--shard-gb", type=float, default=0.1)
    ap.add_argument("--sync", action="store_true",
                    help="time os.sync() after each side too (the disk's writeback; noisy on a "
                         "shared disk, as it flushes every process's writes)")
    ap.add_argument("--quick", action="store_true", help="a few-MB model, 5 repeats")
    ap.add_argument("--workdir", help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args(argv)
    if args.quick:
        args.llm_hidden, args.llm_layers, args.experts, args.vocab = 128, 2, 2, 4000
        args.repeats, args.shard_gb = 5, 0.004

    from mm1_megatron.convert.to_hf import export

    load_before = load_average()
    h = args.llm_hidden
    overrides = [f"llm.hidden_size={h}", f"llm.num_layers={args.llm_layers}",
                 f"llm.num_attention_heads={h // 64}", f"llm.ffn_hidden_size={3 * h}",
                 f"llm.vocab_size={args.vocab}", "vision.hidden_size=256",
                 "vision.num_layers=4", "vision.num_attention_heads=4",
                 "vision.ffn_hidden_size=1024", "connector.hidden_size=256"]
    if args.experts:
        overrides += [f"llm.moe.num_experts={args.experts}", "llm.moe.layer_freq=2"]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mm1_convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        cfg, ckpt, n_params = build_and_save(work / "run", overrides)
        files = sorted(p for p in ckpt.iterdir() if p.is_file())
        ckpt_bytes = sum(p.stat().st_size for p in files)
        out, dst = work / "hf", work / "copy"

        def run_export() -> None:
            export(ckpt, out, cfg, verify=False, progress=False, overwrite=True,
                   max_shard_bytes=int(args.shard_gb * 1024**3), log=lambda *_: None)

        run_export()  # untimed: imports, the output's sizes
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        out_bytes = sum(sizes.values())

        def prepare() -> None:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(dst, ignore_errors=True)
            for path in files:  # both sides read from the page cache
                with open(path, "rb", buffering=0) as f:
                    while f.read(CHUNK):
                        pass
            os.sync()
            prefault(work / "scratch", 2 * (ckpt_bytes + out_bytes))

        cpu: dict[str, list[float]] = {"copy": [], "export": []}

        def side(name: str, work_fn: Callable[[], None]) -> Callable[[], float]:
            def work() -> None:
                work_fn()
                if args.sync:
                    os.sync()

            def run() -> float:
                prepare()
                return out_bytes / timed(work, cpu[name])
            return run

        copy_bps, export_bps = interleave(
            [side("copy", lambda: read_and_write(files, ckpt_bytes, sizes, dst)),
             side("export", run_export)], repeats=args.repeats, warmup=args.warmup)
        cpu_result = compare([out_bytes / t for t in cpu["copy"][args.warmup:]],
                             [out_bytes / t for t in cpu["export"][args.warmup:]],
                             unit="B/CPU-s")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    result = compare(copy_bps, export_bps, unit="B/s")
    print(describe("convert export vs read+write, wall-clock", result, fmt="{:.4g}"))
    print(describe("convert export vs read+write, per CPU-second", cpu_result, fmt="{:.4g}"))
    return emit("convert", result, load_before=load_before, cpu_time=cpu_result, params=n_params,
                checkpoint_bytes=ckpt_bytes, output_bytes=out_bytes, output_files=len(sizes),
                page_cache="warm for both sides: checkpoint read once and os.sync() before each "
                           "side, untimed; " + ("os.sync() timed after each side" if args.sync
                                                else "writeback to disk not timed"),
                baseline_is="read the checkpoint files once, write the export's output bytes "
                            "(same file sizes)",
                candidate_is="convert.to_hf.export(verify=False)")


if __name__ == "__main__":
    main()

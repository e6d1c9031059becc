"""Export throughput: Megatron checkpoint -> HF directory, against a plain copy of the bytes.

    python benchmarks/convert.py [--llm-hidden 512 --llm-layers 8 --experts 4 --vocab 32000]

Saves a mid-size MM1 model (MoE every 2nd layer, c_abstractor; ~90M parameters, ~0.36 GB in
fp32 with the defaults) as a dist_checkpointing checkpoint in a temp dir, then times
  export: `mm1_megatron.convert.to_hf.export(..., verify=False)` (read, split fused QKV / GLU /
          stacked experts, write safetensors shards + index), bytes = safetensors written;
  copy:   `shutil.copyfile` of the checkpoint's files to the same disk, bytes = files copied.
Each is run `--repeats` times (best taken; the first export also warms the page cache, as the
copy's reads are warm too). Last line: JSON with both rates and ratio = export / copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_and_save(run_dir: Path, overrides: list[str]):
    from megatron.core import dist_checkpointing

    from mm1_megatron.config import ParallelConfig, load_config
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.verify import reference_config
    from mm1_megatron.model.mm1 import MM1Model
    from mm1_megatron.runtime import init_distributed
    from mm1_megatron.checkpoint import model_sharded_state

    cfg = load_config("tiny", overrides)
    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1, environ={})
    model = MM1Model(reference_config(cfg), use_te=False)
    ckpt = run_dir / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    dist_checkpointing.save({"model": model_sharded_state([model])}, str(ckpt))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return cfg, ckpt, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llm-hidden", type=int, default=512)
    ap.add_argument("--llm-layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shard-gb", type=float, default=0.1)
    ap.add_argument("--workdir", help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()

    from mm1_megatron.convert.to_hf import export

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
        export_s, copy_s, out_bytes = [], [], 0
        files = [p for p in ckpt.iterdir() if p.is_file()]
        ckpt_bytes = sum(p.stat().st_size for p in files)
        for r in range(args.repeats):
            out = work / f"hf{r}"
            t = time.perf_counter()
            export(ckpt, out, cfg, verify=False, progress=False, overwrite=True,
                   max_shard_bytes=int(args.shard_gb * 1024**3), log=lambda *_: None)
            os.sync()  # both sides include flushing to disk
            export_s.append(time.perf_counter() - t)
            out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            shutil.rmtree(out)
            dst = work / f"copy{r}"
            dst.mkdir()
            t = time.perf_counter()
            for p in files:
                shutil.copyfile(p, dst / p.name)
            os.sync()
            copy_s.append(time.perf_counter() - t)
            shutil.rmtree(dst)
        export_bps = out_bytes / min(export_s)
        copy_bps = ckpt_bytes / min(copy_s)
        result = {"benchmark": "convert", "params": n_params, "checkpoint_bytes": ckpt_bytes,
                  "safetensors_bytes": out_bytes, "export_seconds": min(export_s),
                  "copy_seconds": min(copy_s), "export_bytes_per_s": export_bps,
                  "baseline": "shutil.copyfile of the checkpoint files, same disk",
                  "copy_bytes_per_s": copy_bps, "ratio": export_bps / copy_bps}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

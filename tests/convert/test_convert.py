"""HF conversion: export (any layout, dense/MoE, each connector) gated on parity, stock-Llama
export, CLIP + Llama import, HF -> Megatron -> HF round trip, bad inputs.

Megatron-Core's parallel state and the CPU patches are process-global, so all conversions run
in one fresh process (`case_conversions`, started by `run_ranks`); the checkpoint saved under
TP=2 x PP=2 x EP=2 comes from one 4-rank torchrun. Both run once per module (module fixture);
the tests assert on their report.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest

from tests._helpers.convert import save_single
from tests._procs import run_ranks, torchrun

pytestmark = [pytest.mark.mcore, pytest.mark.multirank, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
MOE = ["llm.moe.num_experts=4", "llm.moe.layer_freq=2"]
LAYOUTS = {
    # one save covers TP, PP and EP (expert_tp=1 so EP fits dp=1), c_abstractor, GQA
    "tp2pp2ep2_moe_cabs": MOE + ["llm.num_query_groups=2", "connector.type=c_abstractor"],
    # exact-GELU ViT (quick_gelu, the default, is in the other two); heads wider than
    # hidden / heads (kv_channels 24, not 16: Qwen3-style), HF `head_dim`
    "single_moe_attn_pool": MOE + ["connector.type=attn_pool", "vision.activation=gelu",
                                   "llm.kv_channels=24"],
    "single_dense_avg_pool": ["llm.num_query_groups=2", "connector.type=avg_pool"],
}
PARALLEL_4 = ["parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.expert_tp=1",
              "parallel.sequence_parallel=true"]


# ---------------------------------------------------------------------------- the case


def _tiny_hf_sources(root: Path) -> tuple[str, str]:
    """A randomly initialised transformers CLIPVisionModel and LlamaForCausalLM (tiny)."""
    import torch
    import transformers

    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=84, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False))
    for m in (clip, llama):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    clip.save_pretrained(root / "clip")
    llama.save_pretrained(root / "llama")
    return str(root / "clip"), str(root / "llama")


def _bitwise(a: Path, b: Path, prefix: str = "", skip: tuple = ()) -> list[str]:
    """Names of tensors of `a` whose `prefix`+name in `b` differ (shape, dtype or any bit)."""
    import torch
    from safetensors.torch import load_file

    A, B = load_file(str(a)), load_file(str(b))
    return [k for k in A if not any(s in k for s in skip)
            and not (prefix + k in B and A[k].dtype == B[prefix + k].dtype
                     and torch.equal(A[k], B[prefix + k]))]


def _error(fn, *args, **kwargs) -> str:
    from mm1_megatron.convert import ConvertError

    try:
        fn(*args, **kwargs)
    except ConvertError as err:
        return str(err)
    return "NO ERROR"


def case_conversions(root: str, multi_rank_run: str) -> dict:
    import os

    os.umask(0o022)  # the export honours the umask; fix it for the mode check
    from mm1_megatron.config import load_config
    from mm1_megatron.convert import to_hf
    from mm1_megatron.convert.from_hf import import_hf
    from mm1_megatron.convert.reader import ensure_process_group
    from mm1_megatron.convert.to_hf import export

    from mm1_megatron.config import ParallelConfig
    from mm1_megatron.runtime import init_distributed

    ensure_process_group()
    init_distributed(ParallelConfig(world_size=1), seed=1234, environ={})
    root_p = Path(root)
    runs = {"tp2pp2ep2_moe_cabs": multi_rank_run}
    for name in ("single_moe_attn_pool", "single_dense_avg_pool"):
        runs[name] = str(root_p / "runs" / name)
        save_single(runs[name], LAYOUTS[name])
    cfg = {name: load_config("tiny", ov) for name, ov in LAYOUTS.items()}
    out: dict = {"export": {}}
    quiet = dict(progress=False, log=lambda *_: None)

    # 1. export + parity gate, every layout / connector
    for name, run in runs.items():
        extra = {}
        if name == "single_dense_avg_pool":
            extra["decoder_only"] = root_p / "hf" / (name + "_llama")
        rep = export(run, root_p / "hf" / name, cfg[name], **quiet, **extra)
        out["export"][name] = {"parity": rep["parity"], "llama_parity": rep.get("llama_parity"),
                               "files": sorted(p.name for p in (root_p / "hf" / name).iterdir()),
                               "modes": sorted({oct(p.stat().st_mode & 0o777) for p in
                                                (root_p / "hf" / name).rglob("*")}),
                               "hidden_act": json.loads((root_p / "hf" / name / "config.json")
                                                        .read_text())["vision_config"]["hidden_act"]}
        out["export"][name]["llama_files"] = sorted(
            p.name for p in Path(extra["decoder_only"]).iterdir()) if extra else None

    # an export cast to bf16 is gated against the same rounded weights
    rep = export(runs["single_dense_avg_pool"], root_p / "hf" / "bf16", cfg["single_dense_avg_pool"],
                 dtype="bf16", **quiet)
    from safetensors import safe_open

    with safe_open(str(root_p / "hf" / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in f.keys()})
    out["bf16"] = {"parity": rep["parity"], "dtypes": dtypes}

    # 2. the CLI, on the dense run: multi-file shards + index, exit code 0
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = to_hf.main([runs["single_dense_avg_pool"], str(root_p / "hf" / "cli"), "--preset",
                           "tiny", *LAYOUTS["single_dense_avg_pool"], "--max-shard-size",
                           "0.0002", "--no-progress"])
    out["cli"] = {"code": code, "files": sorted(p.name for p in (root_p / "hf" / "cli").iterdir())}

    # 3. import: tiny random CLIP + Llama -> Megatron (parity of each part), then the
    #    round trips HF -> Megatron -> HF (bitwise)
    dense = cfg["single_dense_avg_pool"]
    clip, llama = _tiny_hf_sources(root_p / "src")
    imp = import_hf(root_p / "imported", dense, clip=clip, llama=llama)
    rt = root_p / "rt"
    export(root_p / "imported", rt / "mm1", dense, decoder_only=rt / "llama", **quiet)
    imp2 = import_hf(root_p / "imported2", dense, mm1=str(rt / "mm1"))
    export(root_p / "imported2", rt / "mm1_again", dense, **quiet)
    moe = cfg["single_moe_attn_pool"]
    import_hf(root_p / "imported_moe", moe, mm1=str(root_p / "hf" / "single_moe_attn_pool"))
    export(root_p / "imported_moe", rt / "moe_again", moe, **quiet)
    out["import"] = {"clip_llama": imp["parity"], "mm1": imp2["parity"]}
    out["roundtrip"] = {
        "llama": _bitwise(Path(llama) / "model.safetensors", rt / "llama" / "model.safetensors"),
        "clip": _bitwise(Path(clip) / "model.safetensors", rt / "mm1" / "model.safetensors",
                         "vision_tower.", skip=("post_layernorm",)),
        "mm1": _bitwise(rt / "mm1" / "model.safetensors", rt / "mm1_again" / "model.safetensors"),
        "moe": _bitwise(root_p / "hf" / "single_moe_attn_pool" / "model.safetensors",
                        rt / "moe_again" / "model.safetensors"),
    }

    # 4. bad input: one clear line each, nothing left behind
    bad = root_p / "bad"
    broken = bad / "missing_shard"
    shutil.copytree(Path(runs["single_dense_avg_pool"]) / "checkpoints" / "step_00000001", broken)
    next(broken.glob("*.distcp")).unlink()
    errors = {
        "no_checkpoint": _error(export, bad / "nowhere", bad / "o1", dense, **quiet),
        "missing_shard": _error(export, broken, bad / "o2", dense, **quiet),
        "shape_mismatch": _error(export, runs["single_dense_avg_pool"], bad / "o3",
                                 load_config("tiny", LAYOUTS["single_dense_avg_pool"]
                                             + ["llm.ffn_hidden_size=96"]), **quiet),
        "fewer_layers": _error(export, runs["single_dense_avg_pool"], bad / "o4",
                               load_config("tiny", LAYOUTS["single_dense_avg_pool"]
                                           + ["llm.num_layers=2"]), **quiet),
        "other_connector": _error(export, runs["single_moe_attn_pool"], bad / "o5",
                                  load_config("tiny", MOE + ["connector.type=avg_pool",
                                                             "llm.kv_channels=24"]), **quiet),
        "moe_to_llama": _error(export, runs["single_moe_attn_pool"], bad / "o6", moe,
                               decoder_only=bad / "o6l", **quiet),
        # refused before any checkpoint file is read: a missing checkpoint says the same
        "moe_to_llama_unread": _error(export, bad / "no_such_run", bad / "o7", moe,
                                      decoder_only=bad / "o7l", **quiet),
    }
    # another model's checkpoint
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    other = bad / "other_model"
    other.mkdir(parents=True)
    dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("encoder.weight",
                                                                  torch.ones(4, 4))}, str(other))
    errors["other_model"] = _error(export, other, bad / "o7", dense, **quiet)
    # importing into a run directory that holds checkpoints would point `latest` back at 0
    errors["import_over_run"] = _error(import_hf, root_p / "imported", dense, clip=clip,
                                       llama=llama)
    # a failure after files were written (here: the parity gate) leaves nothing behind
    from mm1_megatron.convert import verify
    from mm1_megatron.convert.mappings import ConvertError

    def failing(*_a, **_k):
        raise ConvertError("parity gate (MM1): injected failure")

    real, verify.verify_export = verify.verify_export, failing
    try:
        errors["parity_fail"] = _error(export, runs["single_dense_avg_pool"], bad / "o8", dense,
                                       **quiet)
    finally:
        verify.verify_export = real
    out["errors"] = errors
    out["left_behind"] = sorted(p.name for p in bad.iterdir()
                                if p.name not in ("missing_shard", "other_model"))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = to_hf.main([str(broken), str(bad / "o9"), "--preset", "tiny"])
    out["cli_error"] = {"code": code, "stderr": err.getvalue().strip().splitlines()}

    # no --preset: the run's stored config (RUN_DIR/config.yaml), else a clear refusal
    import yaml

    run = Path(runs["single_dense_avg_pool"])
    codes = []
    for stored in (False, True):
        if stored:
            (run / "config.yaml").write_text(yaml.safe_dump({"config": dense.to_dict()}))
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            codes.append((to_hf.main([str(run), str(root_p / "hf" / f"stored{stored}"),
                                      "--no-verify", "--no-progress"]),
                          err.getvalue().strip().splitlines()[-1:]))
    out["stored_config"] = codes
    return out


# ---------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    multi = root / "runs" / "tp2pp2ep2_moe_cabs"
    torchrun(HERE / "_save_worker.py", 4, str(multi), *LAYOUTS["tp2pp2ep2_moe_cabs"],
             *PARALLEL_4)
    result = run_ranks(__file__, "case_conversions", nprocs=1, timeout=600,
                       kwargs={"root": str(root), "multi_rank_run": str(multi)})[0]
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_export_passes_parity_gate(report, name):
    rep = report["export"][name]
    assert rep["parity"]["max_abs_logit_diff"] <= 1e-5  # gate is 1e-3; fp32 gives ~1e-6
    assert rep["parity"]["greedy_equal"] and rep["parity"]["greedy_tokens"] == 16
    for f in ("config.json", "model.safetensors", "generation_config.json",
              "preprocessor_config.json", "configuration_mm1.py", "modeling_mm1.py"):
        assert f in rep["files"]
    assert rep["hidden_act"] == ("gelu" if "vision.activation=gelu" in LAYOUTS[name]
                                 else "quick_gelu")
    # Readable by others on a shared cluster (safetensors alone writes 0600); umask 022 here.
    assert rep["modes"] == ["0o644"]


def test_stock_llama_export_matches_megatron_text_logits(report):
    rep = report["export"]["single_dense_avg_pool"]
    assert rep["llama_parity"]["max_abs_logit_diff"] <= 1e-5
    assert rep["llama_parity"]["greedy_equal"]
    assert "modeling_mm1.py" not in rep["llama_files"]  # stock class, no remote code


def test_bf16_export_is_gated_on_rounded_weights(report):
    assert report["bf16"]["dtypes"] == ["BF16"]
    assert report["bf16"]["parity"]["max_abs_logit_diff"] <= 1e-5
    assert report["bf16"]["parity"]["greedy_equal"]


def test_cli_writes_sharded_output_with_index(report):
    assert report["cli"]["code"] == 0
    files = report["cli"]["files"]
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1


def test_import_clip_and_llama_matches_each_part(report):
    p = report["import"]["clip_llama"]
    assert p["vision_max_abs_diff"] <= 1e-5 and p["text_max_abs_logit_diff"] <= 1e-5
    assert report["import"]["mm1"]["max_abs_logit_diff"] <= 1e-5


@pytest.mark.parametrize("what", ["llama", "clip", "mm1", "moe"])
def test_hf_megatron_hf_round_trip_is_bitwise(report, what):
    assert report["roundtrip"][what] == []


def test_bad_inputs_give_one_clear_error_and_leave_nothing(report):
    e = report["errors"]
    assert "no such file" in e["no_checkpoint"]
    assert "shard file" in e["missing_shard"] and "missing" in e["missing_shard"]
    assert "linear_fc1.weight has shape (256, 64), the config expects (192, 64)" \
        in e["shape_mismatch"]
    # per-layer keys (DDP-wrapped save) or layers stacked on a leading axis (plain module save)
    assert re.search(r"tensor language_model\.decoder\.layers\.([23]\..*not part of the "
                     r"configured model|.*stacks \(4,\) layers/experts, the config uses 2)",
                     e["fewer_layers"])
    assert "connector." in e["other_connector"]
    assert "no stock transformers architecture" in e["moe_to_llama"]
    assert e["moe_to_llama_unread"] == e["moe_to_llama"] and "without --decoder-only" in \
        e["moe_to_llama"]
    assert "no MM1 model tensors" in e["other_model"]
    assert "injected failure" in e["parity_fail"]
    assert "already holds checkpoints (newest step_00000000)" in e["import_over_run"]
    for msg in e.values():
        assert "\n" not in msg and msg != "NO ERROR"
    assert report["left_behind"] == []  # no output dir, no *.incomplete
    assert report["cli_error"]["code"] == 2
    assert len(report["cli_error"]["stderr"]) == 1
    assert report["cli_error"]["stderr"][0].startswith("mm1-convert-hf: error:")


def test_config_comes_from_the_run_when_no_preset_is_given(report):
    (code_none, err_none), (code_yaml, _) = report["stored_config"]
    assert code_none == 2 and "pass --preset" in err_none[0]
    assert code_yaml == 0

"""tools/plan.py: the paper's targets, the LR rule and the JSON/table outputs."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mm1_megatron.config import PRESETS, get_preset, load_config
from mm1_megatron.model.params import count_params
from mm1_megatron.plan import make_plan
from mm1_megatron.train.optim import paper_peak_lr

ROOT = Path(__file__).resolve().parents[1]


def plan_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), *args, "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("preset, target, tolerance", [
    ("mm1-3b-moe64", 64e9, 0.05),
    ("mm1-7b-moe32", 47e9, 0.05),
])
def test_moe_presets_hit_the_papers_total(preset, target, tolerance):
    plan = plan_json("--preset", preset)
    assert abs(plan["params"]["total"] / target - 1) < tolerance


@pytest.mark.parametrize("preset, target", [("mm1-3b", 3e9), ("mm1-7b", 7e9), ("mm1-30b", 30e9)])
def test_dense_llms_within_ten_percent(preset, target):
    params = count_params(get_preset(preset))
    assert abs(params.llm / target - 1) < 0.10
    assert params.active == params.total  # dense: every parameter is active


def test_30b_learning_rate_matches_the_paper():
    plan = plan_json("--preset", "mm1-30b")
    assert abs(plan["lr"] / 2.2e-5 - 1) < 0.05
    assert plan["weight_decay"] == pytest.approx(0.1 * plan["lr"])
    n = plan["params"]["non_embedding"]
    assert plan["lr"] == pytest.approx(math.exp(-0.4214 * math.log(n) - 0.5535))


def test_paper_rule_at_the_papers_example():
    assert paper_peak_lr(3e10) == pytest.approx(2.2e-5, rel=0.01)


@pytest.mark.parametrize("preset", ["mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe64",
                                    "mm1-7b-moe32"])
def test_full_presets_use_vit_h_and_144_token_c_abstractor(preset):
    cfg = get_preset(preset)
    v = cfg.vision
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_layers) == (378, 14, 1280, 32)
    assert v.num_patches == 729
    assert cfg.connector.type == "c_abstractor" and cfg.connector.num_tokens == 144
    assert cfg.data.seq_length == 4096 and cfg.train.global_batch_size == 512
    assert cfg.data.max_images_per_sequence == 16


def test_moe_active_params_count_top2_experts():
    cfg = get_preset("mm1-3b-moe64")
    p = count_params(cfg)
    dense = count_params(get_preset("mm1-3b"))
    # 16 MoE layers; per MoE layer a token uses 2 experts + the router instead of one dense MLP.
    expert = 3 * cfg.llm.hidden_size * cfg.llm.ffn_hidden_size
    router = cfg.llm.moe.num_experts * cfg.llm.hidden_size
    assert p.active - dense.total == cfg.llm.num_moe_layers * (expert + router)
    assert p.non_embedding_active < p.non_embedding


def test_plan_json_has_the_documented_fields():
    plan = plan_json("--preset", "mm1-30b", "--nodes", "32")
    for key in ("total", "active", "non_embedding", "vision", "connector", "llm"):
        assert plan["params"][key] > 0
    assert plan["layout"]["world_size"] == 256 and plan["layout"]["dp"] == 256
    assert plan["layout"]["grad_accum_steps"] == 2
    flops = plan["flops_per_sequence"]
    assert flops["total"] == flops["llm"] + flops["vision"] + flops["connector"]
    # 6*N*T dominates the decoder's FLOPs; attention adds on top.
    six_nt = 6 * plan["params"]["llm"] * 4096
    assert 1.0 < flops["llm"] / six_nt < 1.3


def test_flops_scale_with_experts_used_not_experts_held():
    dense, moe = make_plan(load_config("mm1-3b")), make_plan(load_config("mm1-3b-moe64"))
    assert moe["params"]["total"] > 15 * dense["params"]["total"]
    assert moe["flops_per_sequence"]["llm"] < 1.5 * dense["flops_per_sequence"]["llm"]


def test_table_output_and_bad_layout():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--preset", "demo"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "params total" in out and "peak lr" in out
    bad = subprocess.run([sys.executable, str(ROOT / "tools" / "plan.py"), "--preset", "mm1-30b",
                          "parallel.tp=13"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "parallel.tp" in bad.stderr


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_plans(preset):
    plan = make_plan(load_config(preset))
    assert plan["lr"] > 0 and plan["flops_per_step"] > 0

"""Analytic parameter and FLOP counts equal what the built Megatron-Core modules hold and do."""

import json
import sys
from pathlib import Path

import pytest

from mm1_megatron.config import PRESETS, get_preset, set_field
from mm1_megatron.model.params import connector_params, count_params
from mm1_megatron.model.flops import (connector_forward_flops, llm_forward_flops,
                                      vision_forward_flops)
from tests import _procs

pytestmark = pytest.mark.mcore

SCRIPT = Path(__file__).with_name("_count_modules.py")


@pytest.fixture(scope="module")
def measured() -> dict:
    out = _procs.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                     timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_analytic_params_equal_built_modules(measured, preset):
    cfg = get_preset(preset)
    counts, built = count_params(cfg), measured["params"][preset]
    assert counts.llm == built["llm"]
    assert counts.vision == built["vision"]
    for kind in ("c_abstractor", "avg_pool", "attn_pool"):
        set_field(cfg, "connector.type", kind)
        assert connector_params(cfg.connector, cfg.vision, cfg.llm.hidden_size) == \
            built[f"connector.{kind}"], kind


def test_analytic_params_follow_kv_channels(measured):
    cfg = get_preset("tiny")
    set_field(cfg, "llm.kv_channels", 32)  # 4 heads x 32 on a 64-wide model
    set_field(cfg, "llm.num_query_groups", 2)
    assert cfg.llm.head_dim == 32
    assert count_params(cfg).llm == measured["params"]["tiny_kv_channels"]["llm"]
    assert count_params(cfg).llm > count_params(get_preset("tiny")).llm


def test_analytic_forward_flops_equal_measured_at_tiny_scale(measured):
    cfg = get_preset("tiny")
    flops = measured["flops"]
    assert llm_forward_flops(cfg.llm, cfg.data.seq_length) == flops["llm"]
    assert vision_forward_flops(cfg.vision) == flops["vision"]
    for kind in ("c_abstractor", "avg_pool", "attn_pool"):
        set_field(cfg, "connector.type", kind)
        assert connector_forward_flops(cfg.connector, cfg.vision, cfg.llm.hidden_size) == \
            flops[f"connector.{kind}"], kind

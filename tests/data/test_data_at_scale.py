"""benchmarks/data_at_scale.py in its quick mode: a real extended index, the real loader in
fresh processes; its JSON line carries what docs/performance.md reports (no timing is asserted)."""

import json
import sys
from pathlib import Path
from tests import _procs
import pytest

pytestmark = pytest.mark.slow

BENCHMARK = Path(__file__).parents[2] / "benchmarks" / "data_at_scale.py"


def test_quick_run_reports_cost_memory_startup_and_packing(tmp_path):
    out = _procs.run([sys.executable, str(BENCHMARK), "--quick", "--dir", str(tmp_path)],
                     capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "data_at_scale"
    assert set(result["candidate"]) == set(result["ratio"]) == {"1", "64"}
    assert result["baseline"]["modelled_step_s"] > 0
    for point in result["points"]:
        assert point["plan_s_per_step"] > 0 and point["build_s_per_step"] > 0
        assert point["peak_rss_mb"] > 0 and point["startup_s"] > 0
    for unit in ("sequences", "documents"):
        assert 0.3 < result["packing_efficiency"][unit] <= 1.0
    blend = result["blend"]  # ten datasets per kind, one loader stream each
    assert blend["datasets_per_kind"] == 10 and blend["dp"] == 64
    assert blend["cpu_s_per_step"] > 0 and blend["startup_s"] > 0
    assert not list(tmp_path.iterdir())  # the work directory is cleaned up

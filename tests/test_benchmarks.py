"""benchmarks/: the shared measuring code (benchmarks/measure.py) on known samples, and one
`python -m benchmarks --quick` run whose JSON lines, table, Markdown section and the
performance page's markers are checked (no timing is asserted: the machine's cores are shared)."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.measure import (compare, interleave, ratio_interval, summary, timed,
                                within_spread)
from benchmarks.run_all import BEGIN, END, replace_between_markers
from tests import _procs

REPO = Path(__file__).resolve().parents[1]
# data_at_scale: tests/data/
AB = ("trainer_overhead", "convert", "data_pipeline", "checkpoint_save", "prepare_in_place",
      "prepare_at_scale")


def test_interleave_runs_the_sides_in_turn_and_drops_warmup():
    calls: list[str] = []

    def side(name: str, value: float):
        return lambda: calls.append(name) or value

    values = interleave([side("A", 1.0), side("B", 2.0)], repeats=5, warmup=2)
    assert calls == ["A", "B"] * 7
    assert values == [[1.0] * 5, [2.0] * 5]
    with pytest.raises(ValueError):
        interleave([side("A", 1.0)], repeats=0)


def test_summary_of_a_known_sample():
    s = summary([4.0, 2.0, 5.0, 3.0, 8.0])
    assert (s["median"], s["min"], s["max"], s["spread"]) == (4.0, 2.0, 8.0, 4.0)


def test_compare_ratio_lies_in_its_interval_and_is_reproducible():
    base = [1.00, 1.10, 0.95, 1.05, 1.02, 0.98, 1.20]
    cand = [2.1, 2.0, 1.9, 2.3, 2.05, 1.95, 2.4]
    r = compare(base, cand, unit="s")
    assert r["ratio"] == pytest.approx(statistics.median(cand) / statistics.median(base))
    lo, hi = r["interval"]
    assert lo <= r["ratio"] <= hi
    boot = ratio_interval(base, cand)
    assert boot == ratio_interval(base, cand) and lo <= boot[0] <= boot[1] <= hi  # seeded
    assert r["spread"] == pytest.approx(max(1.20 / 0.95, 2.4 / 1.9))
    assert r["repeats"] == 7
    same = compare([1.0, 1.1, 0.9], [1.0, 1.1, 0.9], unit="s")
    assert same["interval"] == [1.0, 1.0] and within_spread(same)
    assert not within_spread(compare([1.0, 1.01, 1.0], [2.0, 2.0, 2.02], unit="s"))


def test_timed_returns_wall_and_keeps_cpu_seconds():
    cpu: list[float] = []
    assert timed(lambda: sum(range(10**5)), cpu) > 0 and len(cpu) == 1 and cpu[0] >= 0


def test_page_markers_are_replaced(tmp_path):
    page = tmp_path / "performance.md"
    page.write_text(f"# x\n\n## Benchmarks\n{BEGIN}\nold table\n{END}\n\nrest\n")
    replace_between_markers(page, "new table\n")
    assert page.read_text() == f"# x\n\n## Benchmarks\n{BEGIN}\nnew table\n{END}\n\nrest\n"
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(ValueError):
        replace_between_markers(tmp_path / "plain.md", "x")


def test_performance_page_holds_the_markers():
    """`python -m benchmarks --page docs/performance.md` has a section to replace."""
    text = (REPO / "docs" / "performance.md").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and text.index(BEGIN) < text.index(END)


# The quick run in two runner processes at once, each over half of AB (about the same time
# each): most of a quick benchmark is its process starting, single-threaded.
HALVES = (("checkpoint_save", "prepare_in_place", "prepare_at_scale"),
          ("trainer_overhead", "convert", "data_pipeline"))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`python -m benchmarks --quick` over the A/B benchmarks, once for the tests below: two
    runners side by side, each with its own table, Markdown section and page."""
    tmp = tmp_path_factory.mktemp("bench")
    procs = []
    for n, half in enumerate(HALVES):
        page = tmp / f"performance{n}.md"
        page.write_text(f"intro\n{BEGIN}\nstale\n{END}\nafter\n")
        procs.append(_procs.popen(
            [sys.executable, "-m", "benchmarks", "--quick", "--only", *half, "--markdown",
             str(tmp / f"RESULTS{n}.md"), "--page", str(page)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO)))
    outs, results = [], {}
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode in (0, 1), stderr[-3000:]  # 1: a benchmark said invalid
        outs.append(stdout)
        for line in stdout.splitlines():
            if line.startswith("{"):
                result = json.loads(line)
                results[result["benchmark"]] = result
    return outs, results, tmp


@pytest.mark.slow
@pytest.mark.parametrize("name", AB)
def test_quick_mode_json_line(quick_run, name):
    _, results, _ = quick_run
    r = results[name]
    for side in ("baseline", "candidate"):
        s = r[side]
        assert len(s["values"]) == r["repeats"] >= 5
        assert 0 < s["min"] <= s["median"] <= s["max"]
        assert s["spread"] == pytest.approx(s["max"] / s["min"])
    assert r["ratio"] == pytest.approx(r["candidate"]["median"] / r["baseline"]["median"])
    assert r["interval"][0] <= r["ratio"] <= r["interval"][1]
    assert r["spread"] >= 1.0 and isinstance(r["valid"], bool)
    assert len(r["load_avg"]["start"]) == len(r["load_avg"]["end"]) == 3
    assert r["date"] and r["baseline_is"] and r["candidate_is"]
    if name == "prepare_in_place":  # not one image byte copied: a small fraction written
        assert r["valid"] and r["bytes"]["in_place_fraction"] < 0.05
        assert r["bytes"]["rewrite"] > r["bytes"]["source"] / 2
    if name == "prepare_at_scale":  # every stage measured, and the cost model from them
        assert set(r["stages"]) == {"index", "tokenize", "interleaved", "convert"}
        assert r["stages"]["interleaved"]["tokens_per_sample"] > 100
        assert r["cost"]["total_core_hours"] == pytest.approx(
            sum(r["cost"]["core_hours"].values()), abs=2)
    if name == "trainer_overhead":  # the no-op self-check decides validity
        assert r["valid"] == all(r["checks"].values())
        assert r["self_check"]["repeats"] == r["repeats"]


@pytest.mark.slow
@pytest.mark.parametrize("n", range(len(HALVES)))
def test_runner_table_markdown_and_page(quick_run, n):
    outs, results, tmp = quick_run
    assert set(results) == set(AB)
    half = HALVES[n]
    assert all(name in outs[n].split("{")[0] for name in half)  # the table comes first
    section = (tmp / f"RESULTS{n}.md").read_text()
    # header + one row per benchmark (+ checkpoint_save's blocking-per-save row)
    assert section.count("\n| ") >= 2 + len(half) and "commit" in section
    if "checkpoint_save" in half:
        assert "| checkpoint_save blocking per save | " in section
        assert "- `checkpoint_save blocking per save`: seconds the step loop" in section
    page = (tmp / f"performance{n}.md").read_text()
    assert page == f"intro\n{BEGIN}\n{section}{END}\nafter\n"

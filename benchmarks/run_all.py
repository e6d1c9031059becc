"""Run every benchmark; print one table and each benchmark's JSON line.

    python -m benchmarks [--quick] [--only NAME ...] [--markdown FILE] [--page PATH]

Each benchmark runs in a fresh process, one after the other (they share the cores), and its
last line (JSON, benchmarks/measure.py) is collected. `--markdown FILE` writes the results
section (table, date, commit, machine); `--page docs/performance.md` puts that section between
the markers `<!-- benchmarks:begin -->` and `<!-- benchmarks:end -->` of the page, and
prepare_at_scale's cost table into docs/data.md beside it (its own markers).
data_at_scale always runs in its quick mode here (its full sweep over a 50M-sample index takes
far longer than the others; run it alone), and it is no A/B: its row is the loader's CPU
seconds per step at the largest DP size against the planner's modelled step of the fastest
preset, from a single measured step per point in quick mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.measure import machine  # noqa: E402

# name -> (arguments of a full run, what the ratio means)
BENCHMARKS: dict[str, tuple[list[str], str]] = {
    "trainer_overhead": ([], "mm1-train step / bare Megatron-Core step (time; lower is better)"),
    "convert": ([], "HF export / read+write of the same bytes (output B/s; higher is better)"),
    "data_pipeline": ([], "DALI CPU / PIL + torch (images/s; higher is better)"),
    "checkpoint_save": ([], "async / sync checkpoint saves, steps/s of demo with a save every "
                            "2 steps (higher is better)"),
    "prepare_in_place": ([], "img2dataset shards indexed in place / rewritten into our shards "
                             "(samples per CPU-s; higher is better)"),
    "prepare_at_scale": ([], "mm1-prepare-data tasks on 2 workers / 1 worker (samples/s; 2.0 "
                             "is linear on 2 cores)"),
    "data_at_scale": (["--quick"], "loader CPU-s per step / modelled H100 step (quick mode)"),
}
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def run(name: str, quick: bool, timeout: float) -> dict[str, Any]:
    args = list(BENCHMARKS[name][0])
    if quick and "--quick" not in args:
        args.append("--quick")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO), env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def row(result: dict[str, Any]) -> dict[str, Any]:
    """One table row from a benchmark's JSON line (data_at_scale has its own shape)."""
    if result["benchmark"] == "data_at_scale":
        dp = max(result["candidate"], key=int)
        point = max((p for p in result["points"] if str(p["dp"]) == dp),
                    key=lambda p: p["samples"])
        steps = point.get("cpu_s_values", [point["cpu_s_per_step"]])
        base = result["baseline"]["modelled_step_s"]
        return {"benchmark": f"data_at_scale (dp {dp}, {max(result['samples']):,} samples)",
                "unit": "s", "baseline": base, "candidate": result["candidate"][dp],
                "ratio": result["ratio"][dp], "interval": None,
                "baseline_spread": 1.0, "candidate_spread": max(steps) / min(steps),
                "repeats": len(steps), "load": (result.get("load_avg") or {}).get("end"),
                "valid": True}
    return _ab_row(result["benchmark"], result, result)


def _ab_row(name: str, ab: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    return {"benchmark": name, "unit": ab["unit"],
            "baseline": ab["baseline"]["median"], "candidate": ab["candidate"]["median"],
            "ratio": ab["ratio"], "interval": ab["interval"],
            "baseline_spread": ab["baseline"]["spread"],
            "candidate_spread": ab["candidate"]["spread"], "repeats": ab["repeats"],
            "load": result["load_avg"]["end"], "valid": result["valid"]}


# A second A/B comparison inside a benchmark's JSON line that earns a row of its own.
SUB_ROWS = {"checkpoint_save": ("blocking", "checkpoint_save blocking per save",
                                "seconds the step loop stood still per save, async / sync "
                                "(lower is better)")}


def rows_of(result: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """A benchmark's table rows, each with the sentence that explains it."""
    name = result["benchmark"]
    described = [(row(result), BENCHMARKS[name][1])]
    if name in SUB_ROWS and SUB_ROWS[name][0] in result:
        field, label, explanation = SUB_ROWS[name]
        described.append((_ab_row(label, result[field], result), explanation))
    return described


def _num(x: float, unit: str) -> str:
    if unit.startswith("B/"):
        return f"{x / 1e6:,.0f} MB/s"
    return f"{x:.3g} {unit}"


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["benchmark", "baseline", "candidate", "ratio [95% interval]", "spread base / cand",
            "repeats", "load avg 1/5/15 min", "valid"]
    body = []
    for r in rows:
        interval = "" if r["interval"] is None else \
            f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
        load = "-" if r["load"] is None else "/".join(f"{x:.1f}" for x in r["load"])
        body.append([r["benchmark"], _num(r["baseline"], r["unit"]),
                     _num(r["candidate"], r["unit"]), f"{r['ratio']:.3f}{interval}",
                     f"{r['baseline_spread']:.2f} / {r['candidate_spread']:.2f}"
                     if r["repeats"] > 1 else "- (one repeat)",
                     str(r["repeats"]), load, "yes" if r["valid"] else "NO"])
    if markdown:
        return "\n".join("| " + " | ".join(cells) + " |"
                         for cells in [head, ["---"] * len(head), *body])
    widths = [max(len(c[i]) for c in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths))
                     for cells in [head, *body])


def markdown_section(rows: list[dict[str, Any]], results: list[dict[str, Any]],
                     quick: bool, seconds: float) -> str:
    m = machine()
    lines = [f"Generated by `python -m benchmarks{' --quick' if quick else ''}` on "
             f"{m['date']} at commit `{m['commit']}` ({m['cpus']} CPU cores, {m['cpu']}, "
             f"Python {m['python']}; {seconds:.0f} s). Each A/B benchmark interleaves baseline "
             "and candidate in one process (A B A B ... after warm-up); figures are medians, "
             "spread = max / min of each side's repeats, the interval is a 95% paired bootstrap "
             "of the ratio of medians; the load average is the machine's at each benchmark's end.",
             "", table(rows, markdown=True), ""]
    for result in results:
        for position, (r, explanation) in enumerate(rows_of(result)):
            lines.append(f"- `{r['benchmark']}`: {explanation}."
                         + (f" Baseline: {result['baseline_is']}; candidate: "
                            f"{result['candidate_is']}."
                            if "baseline_is" in result and position == 0 else ""))
    return "\n".join(lines) + "\n"


def replace_between_markers(path: Path, section: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"{path}: no {BEGIN} ... {END} markers")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{section}{END}", text, count=1))


def cost_page(results: list[dict[str, Any]], page: Path) -> None:
    """With --page, prepare_at_scale's cost table goes into the data docs beside it (the same
    run's figures as the performance table)."""
    from benchmarks.prepare_at_scale import cost_table, write_page

    for result in results:
        if result["benchmark"] == "prepare_at_scale" and not result.get("quick"):
            write_page(page.parent / "data.md",
                       cost_table(result["cost"], result["stages"], result["ratio"]))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every benchmark's quick mode")
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="just these")
    ap.add_argument("--markdown", type=Path, help="write the results section to this file")
    ap.add_argument("--page", type=Path,
                    help="replace the section between the markers (docs/performance.md)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per benchmark, seconds")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    results = []
    for name in args.only or list(BENCHMARKS):
        t = time.perf_counter()
        print(f"running {name}{' (quick)' if args.quick else ''} ...", file=sys.stderr,
              flush=True)
        results.append(run(name, args.quick, args.timeout))
        print(f"  {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
    rows = [r for result in results for r, _ in rows_of(result)]
    print(table(rows, markdown=False))
    for result in results:
        print(json.dumps(result))
    if args.markdown or args.page:
        section = markdown_section(rows, results, args.quick, time.perf_counter() - start)
        if args.markdown:
            args.markdown.write_text(section)
        if args.page:
            replace_between_markers(args.page, section)
            cost_page(results, args.page)
    return 0 if all(r["valid"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What every benchmark measures with: interleaved repeats, their spread, the ratio's interval.

    values = interleave([baseline, candidate], repeats=7, warmup=2)   # A B A B ... in one process
    result = compare(values[0], values[1], unit="s")                 # medians, spreads, ratio
    emit("name", result, valid=..., extra={...})                       # the one JSON line

`interleave` calls the sides in turn (A B A B ..., or A B C A B C ... for three), so drift of
the machine (other processes, thermal state, page cache) reaches every side alike; warm-up
rounds are run the same way and dropped. Each side is a callable returning the figure of one
repeat (seconds, or a rate); `timed` gives wall-clock seconds and keeps the CPU seconds.
`compare` gives per side the median, min, max and spread (max / min), and the ratio
candidate / baseline of the medians with a 95% paired bootstrap interval (pairs resampled
together, seeded: the same values give the same interval).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
BOOTSTRAP_SAMPLES = 2000


def interleave(sides: Sequence[Callable[[], float]], repeats: int,
               warmup: int = 1) -> list[list[float]]:
    """Run `warmup` then `repeats` rounds, each calling every side once in the given order;
    the figures of the measured rounds, one list per side."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    values: list[list[float]] = [[] for _ in sides]
    for round_ in range(warmup + repeats):
        for out, side in zip(values, sides):
            value = side()
            if round_ >= warmup:
                out.append(float(value))
    return values


def timed(work: Callable[[], object], cpu_seconds: list[float]) -> float:
    """Run `work`; return its wall-clock seconds and append the CPU seconds this process spent
    on it (all threads) to `cpu_seconds`: a figure other processes on the cores disturb less
    (drop the warm-up rounds' entries: `cpu_seconds[warmup:]`)."""
    t0, c0 = time.perf_counter(), time.process_time()
    work()
    cpu_seconds.append(time.process_time() - c0)
    return time.perf_counter() - t0


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, spread (max / min) of one side's repeats, and the repeats."""
    lo, hi = min(values), max(values)
    return {"median": statistics.median(values), "min": lo, "max": hi,
            "spread": hi / lo if lo > 0 else float("inf"), "values": list(values)}


def ratio_interval(baseline: Sequence[float], candidate: Sequence[float],
                   samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of median(candidate) / median(baseline), resampling
    the interleaved pairs together (round i's baseline with round i's candidate)."""
    if len(baseline) != len(candidate):
        raise ValueError("baseline and candidate need one value per round each")
    rng = random.Random(seed)
    n = len(baseline)
    ratios = []
    for _ in range(samples):
        pick = [rng.randrange(n) for _ in range(n)]
        b = statistics.median(baseline[i] for i in pick)
        ratios.append(statistics.median(candidate[i] for i in pick) / b if b else float("inf"))
    ratios.sort()
    return ratios[int(0.025 * (samples - 1))], ratios[int(0.975 * (samples - 1))]


def compare(baseline: Sequence[float], candidate: Sequence[float], unit: str) -> dict[str, Any]:
    """Both sides' summaries, ratio = median(candidate) / median(baseline), its interval, and
    `spread`: the larger of the two sides' spreads (the run's own noise)."""
    base, cand = summary(baseline), summary(candidate)
    ratio = cand["median"] / base["median"] if base["median"] else float("inf")
    lo, hi = ratio_interval(baseline, candidate)
    return {"unit": unit, "baseline": base, "candidate": cand, "ratio": ratio,
            # With few repeats the bootstrap's percentiles may miss the ratio itself: widened.
            "interval": [min(lo, ratio), max(hi, ratio)],
            "interval_method": "95% paired bootstrap of the median ratio",
            "spread": max(base["spread"], cand["spread"]), "repeats": len(baseline)}


def within_spread(result: dict[str, Any], target: float = 1.0) -> bool:
    """The ratio differs from `target` by no more than the run's own relative spread."""
    return abs(result["ratio"] - target) <= result["spread"] - 1.0


def commit() -> Optional[str]:
    """The checkout's commit, read from .git without running git (None outside a checkout).
    Uncommitted changes are not detected."""
    git = REPO / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo): two 2-core machines of one architecture can differ
    twofold, so a figure names the model, not just x86_64."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Date, commit, host and load: what a figure needs to be compared run to run."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "cpus": os.cpu_count(), "cpu": cpu_model(),
            "python": platform.python_version()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def emit(benchmark: str, result: dict[str, Any], valid: bool = True,
         load_before: Optional[list[float]] = None, **extra: Any) -> dict[str, Any]:
    """Print the benchmark's one JSON line (DESIGN.md: the last line of its output) with the
    comparison, validity, load average at start and end, date and commit; return it."""
    line = {"benchmark": benchmark, **result, "valid": bool(valid),
            "load_avg": {"start": load_before, "end": load_average()}, **machine(), **extra}
    print(json.dumps(line), flush=True)
    return line


def describe(name: str, result: dict[str, Any], fmt: str = "{:.3f}") -> str:
    """One human line: both medians with their spreads, the ratio and its interval."""
    b, c = result["baseline"], result["candidate"]
    lo, hi = result["interval"]
    return (f"{name}: candidate {fmt.format(c['median'])} {result['unit']} (spread "
            f"{c['spread']:.3f}) vs baseline {fmt.format(b['median'])} (spread {b['spread']:.3f})"
            f" -> ratio {result['ratio']:.3f} [{lo:.3f}, {hi:.3f}], {result['repeats']} repeats")

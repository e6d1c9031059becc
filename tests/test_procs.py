"""The suite's process launcher (tests/_procs.py, tests/_forkserver.py): a process forked from
the warm server behaves as the fresh interpreter it stands in for, only started sooner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import _procs

pytestmark = pytest.mark.skipif(os.environ.get(_procs.FORK_ENV) == "0",
                                reason="MM1_TEST_FORK=0: every process starts fresh")

REPORT = textwrap.dedent("""
    import json, os, sys, warnings
    import torch
    print(json.dumps({
        "argv": sys.argv, "name": __name__, "cwd": os.getcwd(), "pid": os.getpid(),
        "session": os.getsid(0), "x": os.environ.get("MM1_X"),
        "threads": torch.get_num_threads(), "path0": sys.path[0],
        "warm": "megatron.core" in sys.modules,
        "ignore_all": any(f[0] == "ignore" and f[1] is None and f[2] is Warning
                          and f[3] is None for f in warnings.filters),
        "stdin": sys.stdin.read()}))
""")


def script(tmp_path: Path, body: str, name: str = "script.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_a_forked_script_sees_its_own_argv_env_cwd_threads_and_stdin(tmp_path):
    path = script(tmp_path, REPORT)
    env = {**os.environ, "MM1_X": "forked", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONWARNINGS", None)
    out = _procs.run([sys.executable, str(path), "a", "b"], env=env, cwd=tmp_path,
                     capture_output=True, text=True, input="from stdin", timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["warm"], "not forked from the server: Megatron-Core was not imported already"
    assert got["argv"] == [str(path), "a", "b"] and got["name"] == "__main__"
    assert got["cwd"] == str(tmp_path) and got["path0"] == str(tmp_path)
    assert got["pid"] != os.getpid() and got["x"] == "forked" and got["threads"] == 1
    assert got["stdin"] == "from stdin"
    assert not got["ignore_all"]  # no PYTHONWARNINGS: no catch-all "ignore" (none left by us)
    ignoring = _procs.run([sys.executable, str(path)], env={**env, "PYTHONWARNINGS": "ignore",
                                                            "OMP_NUM_THREADS": "2"},
                          capture_output=True, text=True, timeout=60)
    assert json.loads(ignoring.stdout)["ignore_all"]
    assert json.loads(ignoring.stdout)["threads"] == 2


def test_fresh_and_unseen_pythonpath_start_a_new_interpreter(tmp_path):
    path = script(tmp_path, REPORT)
    fresh = _procs.run([sys.executable, str(path)], capture_output=True, text=True,
                       timeout=120, fresh=True)
    assert not json.loads(fresh.stdout)["warm"]
    # A folder the server's imports never saw (a stray `apex`, say) would change them.
    other = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    unseen = _procs.run([sys.executable, str(path)], env=other, capture_output=True, text=True,
                        timeout=120)
    assert not json.loads(unseen.stdout)["warm"]
    # Read once at start-up: a process that asks for another hash seed gets an interpreter.
    seeded = _procs.run([sys.executable, str(path)], env={**os.environ, "PYTHONHASHSEED": "7"},
                        capture_output=True, text=True, timeout=120)
    assert not json.loads(seeded.stdout)["warm"]


@pytest.mark.parametrize("body, code, err", [
    ("import sys; sys.exit(7)", 7, ""),
    ("import sys; sys.exit('one line for the user')", 1, "one line for the user\n"),
    ("raise ValueError('boom')", 1, "ValueError: boom"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", -signal.SIGKILL, ""),
    ("print('done', flush=False)", 0, ""),
])
def test_exit_status_and_output_are_an_interpreters(tmp_path, body, code, err):
    out = _procs.run([sys.executable, str(script(tmp_path, body))], capture_output=True,
                     text=True, timeout=60)
    assert out.returncode == code
    assert err in out.stderr if err else out.stderr == ""
    if "print" in body:
        assert out.stdout == "done\n"  # flushed on the way out


def test_signals_pipes_and_sessions_reach_the_child(tmp_path):
    body = """
        import os, signal, sys, time
        signal.signal(signal.SIGUSR1, lambda *_: sys.exit(75))
        print("ready", os.getsid(0) == os.getpid(), flush=True)
        time.sleep(60)
    """
    proc = _procs.popen([sys.executable, str(script(tmp_path, body))], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().split() == ["ready", "True"]  # its own session
        assert proc.poll() is None
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=30) == 75
    finally:
        proc.kill()
        proc.stdout.close()


def test_console_scripts_fork_by_name_or_by_the_path_PATH_gives():
    import shutil

    for cmd in ("mm1-train", shutil.which("mm1-train")):
        assert _procs.fork_target([cmd, "--help"]) == ("entry_point", "mm1_megatron.cli:main")
    assert _procs.fork_target(["/elsewhere/bin/mm1-train"]) is None  # another installation
    assert _procs.fork_target(["bash", "-c", "true"]) is None
    assert _procs.fork_target([sys.executable, "-c", "pass"]) is None


def test_modules_and_console_scripts_run_as_main():
    bad = ["--preset", "nope", "--dry-run"]
    as_module = _procs.run([sys.executable, "-m", "mm1_megatron.cli", *bad],
                           capture_output=True, text=True, timeout=60)
    as_script = _procs.run(["mm1-train", *bad], capture_output=True, text=True, timeout=60)
    for out in (as_module, as_script):
        assert out.returncode == 2
        # one line: no notice from runpy about a module the server had imported already
        assert out.stderr.count("\n") == 1
        assert out.stderr.startswith("mm1-train: config error: preset: unknown preset 'nope'")


def test_ranks_of_one_world_all_reduce(tmp_path):
    assert _procs.run_ranks(__file__, "case_all_reduce", nprocs=2, timeout=120) == [3, 3]


def case_all_reduce() -> int:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    value = torch.tensor([int(os.environ["RANK"]) + 1])
    dist.all_reduce(value)
    dist.destroy_process_group()
    return int(value)

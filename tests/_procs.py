"""Start the suite's test processes: ranks of one gloo world, the CLIs, tools, torchrun.

Megatron-Core's parallel state and our compatibility patches are process-global, so every case
runs in its own processes. They start warm: ``tests/_forkserver.py`` (started by conftest) has
imported torch, Megatron-Core and the training stack, and forks each one from there (a real OS
process: own pid, environment, working directory, stdout/stderr, exit status and signals).
``popen`` / ``run`` take the same command lines and keyword arguments as ``subprocess`` and fork
whatever a fresh interpreter would run as Python (``python -m MOD``, ``python FILE.py``, a
console script such as ``mm1-train``); ``fresh=True`` (or ``MM1_TEST_FORK=0`` for the whole
suite) starts a new interpreter instead, for the tests where start-up itself is under test.

``run_ranks(__file__, "case_name", nprocs=2)`` runs ``case_name(**kwargs)`` from a test module
in ``nprocs`` processes with the torchrun variables set (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); each returns a JSON-able value, returned by rank. ``torchrun``
starts a script's ranks the same way. A hang fails the test at ``timeout`` (all ranks are
killed) instead of stalling the suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
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
FORKSERVER_ENV = "MM1_TEST_FORKSERVER"  # the server's socket path, set by conftest
FORK_ENV = "MM1_TEST_FORK"  # "0": every process is a fresh interpreter (debugging, A/B)
# What an interpreter reads from its environment once, at start-up or at its first import of a
# library (the server did both long ago): a process that asks for other values starts fresh.
STARTUP_VARS = ("PYTHONPATH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONIOENCODING",
                "PYTHONSAFEPATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "MKL_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def startup_env(environ: dict) -> dict:
    return {var: environ.get(var, "") for var in (*STARTUP_VARS, "OMP_NUM_THREADS")}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# popen / run: subprocess's interface, forked from the warm server where that is equivalent
# ---------------------------------------------------------------------------------------------

def fork_target(cmd: list[str]) -> Optional[tuple[str, str]]:
    """What a fresh interpreter would run for `cmd`, as (kind, name), or None if the server
    cannot stand in for it (not Python, `-c`, interpreter options, torchrun's agent)."""
    cmd = [str(c) for c in cmd]
    if not cmd:
        return None
    if cmd[0] == sys.executable and len(cmd) >= 2:
        if cmd[1] == "-m" and len(cmd) >= 3 and cmd[2] != "torch.distributed.run":
            return ("module", cmd[2])
        if cmd[1].endswith(".py") and not cmd[1].startswith("-"):
            return ("script", cmd[1])
        return None
    import shutil
    from importlib.metadata import entry_points

    name = os.path.basename(cmd[0])
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    # The script of this interpreter's installation: by name, as PATH finds it (a pyenv shim
    # included), or beside the interpreter.
    ours = {name, shutil.which(name), os.path.join(os.path.dirname(sys.executable), name)}
    if found and cmd[0] in ours:
        return ("entry_point", found[0].value)
    return None


def _server_path(env: dict) -> Optional[str]:
    """The server's socket, if this process may be forked from it: the suite did not turn
    forking off, `env` puts nothing on sys.path that the server's imports did not see (a stray
    `apex` folder, say, changes what Megatron-Core imports), and asks for the start-up
    settings the server has."""
    path = os.environ.get(FORKSERVER_ENV)
    if not path or os.environ.get(FORK_ENV) == "0":
        return None
    server = json.loads(os.environ.get(FORKSERVER_ENV + "_STARTUP", "{}"))
    served = set(server.get("PYTHONPATH", "").split(os.pathsep)) | {str(REPO), ""}
    if any(p not in served for p in env.get("PYTHONPATH", "").split(os.pathsep)):
        return None
    wanted = startup_env(env)
    if any(wanted[var] != server.get(var, "") for var in STARTUP_VARS if var != "PYTHONPATH"):
        return None
    if server.get("OMP_NUM_THREADS") and not env.get("OMP_NUM_THREADS"):
        return None  # a child sets its own count; the default it would then get is not ours
    return path


def popen(cmd: list, *, env: Optional[dict] = None, cwd: Any = None, stdin: Any = None,
          stdout: Any = None, stderr: Any = None, text: bool = False,
          start_new_session: bool = False, fresh: bool = False) -> Any:
    """`subprocess.Popen(cmd, ...)`, forked from the warm server when `cmd` is Python that it
    can run (see `fork_target`) and `fresh` is off."""
    cmd = [str(c) for c in cmd]
    env = dict(os.environ if env is None else env)
    target = None if fresh else fork_target(cmd)
    server = _server_path(env) if target else None
    if server is None:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout,
                                stderr=stderr, text=text, start_new_session=start_new_session)
    return ForkedProcess(server, cmd, target, env=env, cwd=str(cwd or os.getcwd()),
                         stdin=stdin, stdout=stdout, stderr=stderr, text=text,
                         start_new_session=start_new_session)


def run(cmd: list, *, capture_output: bool = False, check: bool = False,
        timeout: Optional[float] = None, input: Optional[str] = None,
        **kwargs: Any) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, ...)` through `popen`."""
    if capture_output:
        kwargs["stdout"] = kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    with popen(cmd, **kwargs) as proc:
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        except BaseException:
            proc.kill()
            raise
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done


class ForkedProcess:
    """The part of `subprocess.Popen` the tests use, for a child of the fork server."""

    def __init__(self, server: str, cmd: list[str], target: tuple[str, str], *, env: dict,
                 cwd: str, stdin: Any, stdout: Any, stderr: Any, text: bool,
                 start_new_session: bool) -> None:
        self.args = cmd
        self.returncode: Optional[int] = None
        self.stdin = self.stdout = self.stderr = None
        child_fds = []  # what the child gets as 0, 1, 2: ours to close once sent
        mine = {}  # our ends of the pipes
        for name, spec in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if spec is None:
                child_fds.append(os.dup({"stdin": 0, "stdout": 1, "stderr": 2}[name]))
            elif spec == subprocess.PIPE:
                read, write = os.pipe()
                ours, theirs = (write, read) if name == "stdin" else (read, write)
                mine[name] = ours
                child_fds.append(theirs)
            elif spec == subprocess.DEVNULL:
                child_fds.append(os.open(os.devnull, os.O_RDWR))
            elif spec == subprocess.STDOUT and name == "stderr":
                child_fds.append(os.dup(child_fds[1]))
            else:
                child_fds.append(os.dup(spec if isinstance(spec, int) else spec.fileno()))
        request = {"argv": _child_argv(cmd, target), "env": env, "cwd": cwd,
                   "target": list(target), "new_session": start_new_session}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._conn.connect(_wait_for_server(server))
            socket.send_fds(self._conn, [json.dumps(request).encode()], child_fds)
            reply = json.loads(self._conn.recv(1 << 16) or b"{}")
            if "pid" not in reply:
                raise RuntimeError(f"fork server refused {cmd}: {reply.get('error')}")
        except BaseException:
            self._conn.close()
            for fd in mine.values():
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)
        self.pid = reply["pid"]
        mode = {"stdin": "w", "stdout": "r", "stderr": "r"}
        for name, fd in mine.items():
            setattr(self, name, open(fd, mode[name] if text else mode[name] + "b",
                                     buffering=-1 if name != "stdin" or not text else 1))

    def poll(self) -> Optional[int]:
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], 0)
            if ready:
                self._read_status()
        return self.returncode

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            ready, _, _ = select.select([self._conn], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        message = self._conn.recv(1 << 16)
        self._conn.close()
        if not message:
            raise RuntimeError(f"fork server went away while {self.args} ran")
        self.returncode = json.loads(message)["returncode"]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, input: Any = None, timeout: Optional[float] = None) -> tuple:
        """Read stdout and stderr to their ends (feeding `input` first), then wait."""
        import selectors

        deadline = None if timeout is None else time.monotonic() + timeout
        if self.stdin is not None:
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass  # the child exited without reading it, as subprocess allows
        streams = {s: [] for s in (self.stdout, self.stderr) if s is not None}
        with selectors.DefaultSelector() as sel:
            for stream in streams:
                sel.register(stream.fileno(), selectors.EVENT_READ, stream)
            while sel.get_map():
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                events = sel.select(left)
                if not events and deadline is not None and time.monotonic() >= deadline:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if chunk:
                        streams[key.data].append(chunk)
                    else:
                        sel.unregister(key.fd)
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        results = []
        for stream in (self.stdout, self.stderr):
            if stream is None:
                results.append(None)
                continue
            data = b"".join(streams[stream])
            text = "b" not in stream.mode
            results.append(data.decode() if text else data)
            stream.close()
        return tuple(results)

    def __enter__(self) -> "ForkedProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        for stream in (self.stdout, self.stderr, self.stdin):
            if stream is not None and not stream.closed:
                stream.close()
        if self.returncode is None:
            self.wait()


def _child_argv(cmd: list[str], target: tuple[str, str]) -> list[str]:
    kind, _ = target
    if kind == "module":
        return ["-m", *cmd[3:]]  # runpy puts the module's file in argv[0]
    if kind == "script":
        return cmd[1:]
    return cmd


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for_server(path: str, timeout: float = 180.0) -> str:
    """The server binds its socket once its imports are done (seconds after the suite starts)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if os.path.exists(path + ".failed"):
            with open(path + ".failed") as f:
                raise RuntimeError(f"the fork server did not start: {f.read()} (its log: "
                                   f"{os.path.dirname(path)}/server.log)")
        pid = int(os.environ.get(FORKSERVER_ENV + "_PID", "0"))
        if pid and not _alive(pid):
            raise RuntimeError(f"the fork server (pid {pid}) died while starting (its log: "
                               f"{os.path.dirname(path)}/server.log)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"fork server socket {path} did not appear in {timeout:.0f} s")
        time.sleep(0.05)
    return path


# ---------------------------------------------------------------------------------------------
# Ranks of one gloo world
# ---------------------------------------------------------------------------------------------

def rank_env(rank: int, nprocs: int, port: int) -> dict:
    """The variables torchrun gives each of its ranks on one node."""
    return {"RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nprocs), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def run_ranks(module_file: str, case: str, nprocs: int = 1, timeout: float = 300.0,
              kwargs: Optional[dict] = None, env: Optional[dict] = None) -> list[Any]:
    """Run ``case`` from ``module_file`` in ``nprocs`` processes; return their results."""
    cmd = [sys.executable, __file__, str(module_file), case, json.dumps(kwargs or {})]
    _, logs = _run_world([cmd] * nprocs, case, timeout, env)
    results = []
    for rank, out in enumerate(logs):
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith(_RESULT)]
        if not lines:
            raise AssertionError(f"{case}: rank {rank} returned no result\n" + _tails(logs))
        results.append(json.loads(lines[-1][len(_RESULT):]))
    return results


def _run_world(cmds: list[list[str]], name: str, timeout: float, env: Optional[dict],
               stderr_apart: bool = False, check: bool = True) -> tuple[list[int], list]:
    """Start `cmds[r]` as rank r of one world; stop them all as soon as one fails or time runs
    out. Returns the exit codes and each rank's output file (stdout and stderr together), or
    with `stderr_apart` an (out, err) pair per rank. `check`: fail unless every rank exits 0."""
    port = free_port()
    base = {**os.environ, **(env or {})}
    base["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), base.get("PYTHONPATH")) if p)
    base.setdefault("OMP_NUM_THREADS", "1")  # ranks share 2 cores; oversubscription is slow
    base.setdefault("PYTHONWARNINGS", "ignore")  # Megatron's import-time warnings drown errors
    procs, logs = [], []
    try:
        for rank, cmd in enumerate(cmds):
            out = tempfile.TemporaryFile(mode="w+")
            err = tempfile.TemporaryFile(mode="w+") if stderr_apart else None
            logs.append((out, err) if stderr_apart else out)
            procs.append(popen(cmd, env={**base, **rank_env(rank, len(cmds), port)},
                               cwd=str(REPO), stdout=out,
                               stderr=err if stderr_apart else subprocess.STDOUT, text=True,
                               start_new_session=True))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"{name}: timed out after {timeout:.0f}s\n"
                                     + _tails(logs))
            if any(p.returncode not in (None, 0) for p in procs):
                # One rank died: the others would wait on it in a collective until timeout.
                time.sleep(2.0)
                if any(p.poll() is None for p in procs):
                    if check:
                        raise AssertionError(f"{name}: a rank failed\n" + _tails(logs))
                    break
            time.sleep(0.02)
    finally:
        # Each rank has its own session: helpers it started (checkpoint writers) go with it.
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    if check and any(codes):
        raise AssertionError(f"{name}: exit codes {codes}\n" + _tails(logs))
    return codes, logs


def _tails(logs: list, chars: int = 4000) -> str:
    parts = []
    for rank, outs in enumerate(logs):
        for out in outs if isinstance(outs, tuple) else (outs,):
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


def _load(module_file: str, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, module_file)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _main() -> None:
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "--main":
        # A worker script's main(), with this light file as __main__: dist_checkpointing's
        # writer starts a spawn-context Manager, whose child re-imports __main__ (here: the
        # standard library only, instead of the worker's torch and Megatron-Core).
        script, args = sys.argv[2], sys.argv[3:]
        sys.argv = [script, *args]
        sys.exit(_load(script, "_worker_module").main())
    module_file, case, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    result = getattr(_load(module_file, "_case_module"), case)(**kwargs)
    print(_RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    # The guard matters: dist_checkpointing.save starts a spawn-context Manager whose child
    # re-imports the main module.
    _main()


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 600.0,
             check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run `script`'s `main()` as `nproc` gloo ranks with torchrun's variables (forked from the
    warm server, without torchrun's agent); unless `check` is off, fail with their stderr when
    one does not exit 0. The result carries the ranks' stdout and stderr, rank after rank, and
    exit status 1 if any rank failed (as torchrun's). Each rank has its own session, killed
    whole at the end: a rank killed mid-save orphans dist_checkpointing's writers."""
    cmd = [sys.executable, __file__, "--main", str(script), *args]
    codes, logs = _run_world([cmd] * nproc, script.name, timeout, env, stderr_apart=True,
                             check=False)
    texts = []
    for out, err in logs:
        out.seek(0)
        err.seek(0)
        texts.append((out.read(), err.read()))
        out.close()
        err.close()
    run = subprocess.CompletedProcess(cmd, int(any(codes)), "".join(t[0] for t in texts),
                                      "".join(t[1] for t in texts))
    if check:
        assert run.returncode == 0, (f"{script.name} {' '.join(args)}: exit codes {codes}\n"
                                     f"{run.stderr[-4000:]}")
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

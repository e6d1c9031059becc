"""A warm parent for the suite's test processes: it imports torch, Megatron-Core and our
training stack once, then forks a child per request, already past those imports.

Started by ``tests/conftest.py`` before collection (``python tests/_forkserver.py SOCKET``);
``tests._procs`` is the only client. Each child is a real OS process with its own pid,
environment, working directory, stdout/stderr (file descriptors passed over the socket), exit
status and signals; it leaves with ``os._exit`` after running exit handlers and flushing, which
skips the 2.5-4 s of interpreter teardown. OLMo-core forks its gloo test ranks the same way.

Fork safety: the server only imports. It starts no Python thread, runs no torch op (so torch's
intra-op pool does not exist yet; each child sizes it from its OMP_NUM_THREADS) and opens no
DALI pipeline. The one native thread present, OpenBLAS's pool started by importing numpy,
registers pthread_atfork handlers. ``serve`` refuses to start if a Python thread exists.

Protocol (AF_UNIX SOCK_SEQPACKET, one connection per child): the client sends one JSON message
``{"argv", "env", "cwd", "target", "new_session"}`` with three file descriptors (stdin, stdout,
stderr); the server answers ``{"pid"}`` at once and ``{"returncode"}`` (negative: the signal)
when the child has been reaped.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import threading
import warnings

# The interpreter's own warning filters (the server starts without PYTHONWARNINGS). A child gets
# the filters the preloaded libraries added at import, then its PYTHONWARNINGS, then these: the
# order a fresh interpreter builds them in.
_DEFAULT_FILTERS = list(warnings.filters)
_LIBRARY_FILTERS: list = []
_SERVER_THREADS = os.environ.get("OMP_NUM_THREADS")  # what OpenMP read as torch loaded here

# What every test process would otherwise import itself (4-6 s on CI's machine). Nothing that
# reads the environment at import time for a behaviour a test sets per process (transformers /
# huggingface_hub read HF_HUB_OFFLINE then): those stay in the children.
PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.dist_checkpointing",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.pipeline_parallel",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "mm1_megatron.runtime",
    "mm1_megatron.train.loop",
    "mm1_megatron.cli",
    "mm1_megatron.evaluation.cli",
    "nvidia.dali",
    "tensorboard",
    "tests._procs",
)
_MAX_MESSAGE = 1 << 20


def preload() -> None:
    import importlib

    # Import-time warnings (Megatron-Core's "TE/apex not installed") go to the server's log.
    for name in PRELOAD:
        importlib.import_module(name)
    _LIBRARY_FILTERS[:] = [f for f in warnings.filters if f not in _DEFAULT_FILTERS]
    # What the docstring promises, checked: a child must import these with its own environment.
    early = [m for m in ("transformers", "huggingface_hub") if m in sys.modules]
    if early:
        raise SystemExit(f"forkserver: {early} imported by the preload; they read the "
                         "environment at import (HF_HUB_OFFLINE) and must load in the children")


def serve(path: str) -> None:
    if threading.active_count() != 1:
        raise SystemExit(f"forkserver: {threading.active_count()} Python threads before "
                         "serving; forking would copy them half-stopped")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # clients wait for the path: it appears when ready
    listener.listen(64)
    parent = os.getppid()
    children: dict[int, socket.socket] = {}
    while os.getppid() == parent:  # pytest gone (killed): so are we, and our children
        ready, _, _ = select.select([listener], [], [], 0.02)
        if ready:
            conn, _ = listener.accept()
            try:
                pid = _start(conn, listener, children)
            except Exception as err:  # noqa: BLE001 - the client gets the reason
                try:
                    conn.send(json.dumps({"error": f"{type(err).__name__}: {err}"}).encode())
                except OSError:
                    pass  # that client went away; the others must not lose their server
                conn.close()
            else:
                children[pid] = conn
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                try:
                    conn.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)})
                              .encode())
                except OSError:
                    pass  # the client went away; the child is reaped all the same
                conn.close()


def _start(conn: socket.socket, listener: socket.socket,
           children: dict[int, socket.socket]) -> int:
    data, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
    request = json.loads(data)
    if len(fds) != 3:
        raise ValueError(f"expected 3 file descriptors, got {len(fds)}")
    pid = os.fork()
    if pid == 0:
        try:
            # The server's ends of every connection stay with the server: a child (or the
            # checkpoint writers it forks) holding one would hide the server's exit.
            for sock in (listener, conn, *children.values()):
                sock.close()
            _child(request, fds)  # leaves with os._exit
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    try:
        conn.send(json.dumps({"pid": pid}).encode())
    except OSError:
        pass  # the client went away; the child runs and is reaped all the same
    return pid


def _child(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        code = _run_child(request, fds)
    except SystemExit as done:
        code = _exit_code(done.code)
    except BaseException:  # noqa: BLE001 - what a fresh interpreter would print
        import traceback

        traceback.print_exc()
    finally:
        _leave(code)


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)


def _run_child(request: dict, fds: list[int]) -> int:
    _die_with_parent()  # an orphan of the server would outlive the suite
    if request.get("new_session"):
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdin = sys.__stdin__ = open(0, closefd=False)
    sys.stdout = sys.__stdout__ = open(1, "w", closefd=False,
                                       buffering=1 if os.isatty(1) else -1)
    sys.stderr = sys.__stderr__ = open(2, "w", closefd=False, buffering=1)
    os.environ.clear()  # in place: modules hold the os.environ object itself
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    for entry in reversed(_pythonpath(request["env"])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    _apply_process_settings(request["env"])
    sys.argv = list(request["argv"])
    kind, name = request["target"]
    import runpy

    if kind == "module":  # python -m NAME: sys.path[0] is the working directory
        sys.path.insert(0, os.getcwd())
        with warnings.catch_warnings():
            # Preloaded here, not in a fresh interpreter: runpy's notice is about us.
            warnings.filterwarnings("ignore", message=".*found in sys.modules after import",
                                    category=RuntimeWarning)
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    elif kind == "script":  # python FILE: sys.path[0] is the file's folder, __file__ absolute
        # (runpy puts the absolute path in argv[0] too, where an interpreter keeps it as given)
        path = os.path.abspath(name)
        sys.path.insert(0, os.path.dirname(path))
        runpy.run_path(path, run_name="__main__")
    elif kind == "entry_point":  # a console script: MODULE:FUNCTION
        import importlib

        module, _, function = name.partition(":")
        return _exit_code(getattr(importlib.import_module(module), function)())
    else:
        raise ValueError(f"unknown target kind {kind!r}")
    return 0


def _pythonpath(env: dict) -> list[str]:
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _apply_process_settings(env: dict) -> None:
    """What a fresh interpreter reads from its environment at start-up, read again here."""
    import torch

    warnings.filters[:] = _DEFAULT_FILTERS
    for option in filter(None, env.get("PYTHONWARNINGS", "").split(",")):
        warnings._setoption(option)  # the same parser the interpreter uses for -W
    warnings.filters[:0] = _LIBRARY_FILTERS
    warnings._filters_mutated()
    # OpenMP read the server's OMP_NUM_THREADS when torch loaded; torch's pool does not exist
    # yet, so a child sized by its own variable gets exactly that (unset: the same default).
    threads = env.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and threads != _SERVER_THREADS:
        torch.set_num_threads(int(threads))
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # a fresh interpreter's numpy draws its own seed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"), as the interpreter does
    return 1


def _leave(code: int) -> None:
    import atexit

    try:
        threading._shutdown()  # as the interpreter does: join non-daemon threads first
        atexit._run_exitfuncs()  # multiprocessing's finalizers (Managers) among them
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not change the status
                pass
        os._exit(code)


if __name__ == "__main__":
    # Started as `python tests/_forkserver.py`: the repository, not tests/, goes on sys.path.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _die_with_parent()  # pytest killed: the server and its children go too
    try:
        preload()
        serve(sys.argv[1])
    except BaseException as err:
        # Clients wait for the socket; this tells them at once why it will not come.
        with open(sys.argv[1] + ".failed", "w") as f:
            f.write(f"{type(err).__name__}: {err}")
        raise

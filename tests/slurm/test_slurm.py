"""slurm/*.sh on a real one-node Slurm (Debian's slurmctld/slurmd on localhost, started here).

The 30B script runs the `tiny` preset on 2 CPU ranks (gloo) through `sbatch --wait`, with the
command-line options overriding its `#SBATCH` lines (32 nodes x 8 GPUs -> 1 node x 2 tasks, no
GPU): training, TensorBoard and checkpoints; SIGUSR1 preemption -> checkpoint -> `scontrol
requeue` -> resume; a hung rank -> hang watchdog -> requeue -> resume; a failing node health
check. The dry run of every script works without Slurm.

Needs root (apt-get install of slurmctld/slurmd when missing, daemons running as root): without
it the tests fail with the reason rather than skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests._procs import free_port

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SLURM = REPO / "slurm"

SCRIPTS = {"mm1_30b.sh": "mm1-30b", "mm1_3b.sh": "mm1-3b", "mm1_7b.sh": "mm1-7b",
           "mm1_3b_moe64.sh": "mm1-3b-moe64", "mm1_7b_moe32.sh": "mm1-7b-moe32"}
# 32 nodes x 8 H100 -> this machine: one node, 2 CPU tasks, no GPU (options beat #SBATCH lines).
SMALL_JOB = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"]
JOB_TIMEOUT = 240  # seconds for one sbatch --wait; a hang fails the test


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def run(self, *cmd: str, timeout: float = 30, check: bool = True
            ) -> subprocess.CompletedProcess:
        result = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {result.returncode}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` fields (kept by slurmctld for MinJobAge=300 s after the end)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted((self.root / "log").glob("*")))


@pytest.fixture(scope="module")
def slurm() -> Cluster:
    """A private one-node Slurm: own config dir and free ports; stops only its own daemons."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.fail("Slurm is not installed and installing it (apt-get) needs root")
    if (os.cpu_count() or 1) < 2:
        pytest.fail("the Slurm tests need 2 CPUs for 2 tasks on the one node")
    root = Path(tempfile.mkdtemp(prefix="mm1-slurm-"))  # short: slurmd puts sockets here
    env = {**os.environ, "SLURM_CI_DIR": str(root), "SLURMCTLD_PORT": str(free_port()),
           "SLURMD_PORT": str(free_port())}
    cluster = Cluster(root)
    try:
        setup = subprocess.run(["bash", str(HERE / "slurm_setup.sh")], env=env,
                               capture_output=True, text=True, timeout=600)
        if setup.returncode != 0:
            pytest.fail(f"could not start Slurm (slurm_setup.sh -> {setup.returncode}):\n"
                        f"{setup.stdout}\n{setup.stderr}\n{cluster.logs()}")
        yield cluster
    finally:
        _stop(cluster)


def _stop(cluster: Cluster) -> None:
    """Cancel what is left of our jobs, then stop the daemons we started (by pid file)."""
    if (cluster.root / "slurmctld.pid").exists():
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.run("scancel", *jobs, check=False)
            deadline = time.monotonic() + 30
            while (cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip()
                   and time.monotonic() < deadline):
                time.sleep(0.5)
    pids = []
    for name in ("slurmd", "slurmctld"):
        pid_file = cluster.root / f"{name}.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            pid = int(pid_file.read_text())
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 15
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
    shutil.rmtree(cluster.root, ignore_errors=True)


def job_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in cluster.env.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # tiny instead of the script's preset; the test interpreter in the tasks; the small disk.
    env.update({"MM1_PRESET": "tiny", "PYTHON": sys.executable, "MM1_MIN_FREE_GB": "1",
                "PYTHONWARNINGS": "ignore", **extra})
    return env


def tiny_overrides(data: Path, run_dir: Path, *more: str) -> list[str]:
    """The tiny model on the demo data (whose tokenizer has 2048 pieces)."""
    return [f"data.path={data}", f"data.tokenizer_model={data}/tokenizer.model",
            "llm.vocab_size=2048", f"run_dir={run_dir}", "logging.log_interval=1", *more]


# Jobs are submitted from the checkout itself, as a user types `sbatch slurm/mm1_30b.sh` in a
# fresh clone: the scripts write logs/%x-%j.{out,err}, and logs/ is part of the repository.
LOGS = REPO / "logs"


def job_log(workdir: Path, job_id: str) -> str:
    return _tail(LOGS / f"mm1-30b-{job_id}.out", 10**7)


def job_err(workdir: Path, job_id: str) -> str:
    return _tail(LOGS / f"mm1-30b-{job_id}.err")


def submit_and_wait(cluster: Cluster, workdir: Path, args: list[str], env: dict[str, str]
                    ) -> tuple[str, int]:
    assert LOGS.is_dir(), "logs/ must ship with the repository (sbatch cannot create it)"
    cmd = ["sbatch", "--wait", "--parsable", *SMALL_JOB, "slurm/mm1_30b.sh", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        job_id = out.split(";")[0].strip()
        pytest.fail(f"job {job_id} did not finish in {JOB_TIMEOUT} s\n{job_log(workdir, job_id)}"
                    f"\n{job_err(workdir, job_id)}\n{cluster.logs()}")
    job_id = out.split(";")[0].strip()
    assert job_id.isdigit(), err
    return job_id, proc.returncode


def tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss/lm" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("loss/lm")]
    return sorted(steps)


def logged_steps(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step +(\d+)/", log, flags=re.M)]


# ---------------------------------------------------------------------------------------------


def test_exit_status_and_port_agree_with_python() -> None:
    """common.sh / job_env.sh define the requeue status and the port rule once; they match
    the trainer's."""
    from mm1_megatron.runtime.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN
    from mm1_megatron.train.callbacks import EXIT_PREEMPTED

    common = (SLURM / "common.sh").read_text()
    assert re.search(r"^EXIT_PREEMPTED=(\d+)$", common, re.M).group(1) == str(EXIT_PREEMPTED)
    job_env_sh = (SLURM / "job_env.sh").read_text()  # the rendezvous, for training and eval
    assert (f"$(( {SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN} ))") in job_env_sh


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_dry_run_without_slurm(script: str, tmp_path: Path) -> None:
    """Plan (with the memory check) and srun commands from the #SBATCH lines, no Slurm needed."""
    from mm1_megatron.config import get_preset

    preset = SCRIPTS[script]
    text = (SLURM / script).read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    # the node count the preset's layout was planned (and memory-checked) for
    assert nodes == get_preset(preset).parallel.planned_nodes
    assert re.search(rf"^#SBATCH --job-name={preset}$", text, re.M)
    assert re.search(rf"^PRESET={preset}$", text, re.M)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable)
    result = subprocess.run(["bash", str(SLURM / script), "--dry-run", "train.train_steps=70000"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"preset={preset} nodes={nodes} tasks/node=8 gpus/node=8 world={nodes * 8}" in out
    plan = re.search(r"^mm1: plan: (.*)$", out, re.M).group(1)
    assert f"--preset {preset} --nodes {nodes} --gpus-per-node 8 --check " in plan
    assert re.search(rf"^layout +world_size={nodes * 8} tp=\d+ pp=\d+ cp=\d+ ep=\d+ dp=\d+",
                     out, re.M), out
    assert "params total" in out
    train = re.search(r"^mm1: train: (.*)$", out, re.M).group(1)
    assert train.startswith(f"srun --nodes={nodes} --ntasks-per-node=8 --kill-on-bad-exit=0 ")
    assert f"launch/train.py --preset {preset} run_dir={tmp_path}/runs/{preset} " in train
    assert train.rstrip().endswith(" train.train_steps=70000")  # user overrides come last
    assert re.search(rf"^mm1: node check: srun --nodes={nodes} --ntasks={nodes} "
                     r"--ntasks-per-node=1 .*node_check\.sh 8 ", out, re.M)
    assert "nothing launched" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_preset_override(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, DRY_RUN="1", RUN_DIR=str(tmp_path / "r"))
    result = subprocess.run(["bash", str(SLURM / "mm1_30b.sh"), "--preset", "tiny",
                             "train.global_batch_size=512"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"--preset tiny run_dir={tmp_path / 'r'} train.global_batch_size=512 \n"
            in result.stdout)
    assert re.search(r"^preset +tiny$", result.stdout, re.M)


def test_eval_script_dry_run_prints_the_srun_command(tmp_path: Path) -> None:
    """slurm/eval.sh: one node's 8 tasks run mm1-eval with the arguments as given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:26.01-py3")
    result = subprocess.run(["bash", str(SLURM / "eval.sh"), "--run-dir", "runs/mm1-30b",
                             "--tp", "8", "--dry-run", "--suite", "paper-fewshot"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nodes=1 tasks/node=8 gpus/node=8 world=8" in result.stdout
    srun = re.search(r"^mm1-eval: (srun .*)$", result.stdout, re.M).group(1).replace("\\", "")
    assert srun.startswith("srun --nodes=1 --ntasks-per-node=8 --kill-on-bad-exit=1 ")
    # the run's folder is mounted into the container beside the repository
    assert f"--container-mounts={REPO}:{REPO},{tmp_path}/runs/mm1-30b:{tmp_path}/runs/mm1-30b" \
        in srun
    assert srun.rstrip().endswith("-m mm1_megatron.evaluation.cli --run-dir runs/mm1-30b --tp 8 "
                                  "--suite paper-fewshot")
    refused = subprocess.run(["bash", str(SLURM / "eval.sh"), "--run-dir", "r"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not inside a Slurm job" in refused.stderr


def test_not_in_slurm_refuses_to_launch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SLURM / "mm1_3b.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not inside a Slurm job" in result.stderr


@pytest.mark.slow
@pytest.mark.multirank
def test_sbatch_trains_on_cpu_with_gloo(slurm: Cluster, demo_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    job_id, status = submit_and_wait(
        slurm, tmp_path, tiny_overrides(demo_data, run_dir, "train.train_steps=4",
                                        "checkpoint.save_interval=2"), job_env(slurm))
    log = job_log(tmp_path, job_id)
    assert status == 0, log + job_err(tmp_path, job_id)
    assert "comm=gloo" in log and "device=cpu" in log
    assert "node_check" in log and "ok (gpus -/0" in log
    assert logged_steps(log) == [1, 2, 3, 4]
    assert "mm1: training finished" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert tensorboard_steps(run_dir) == [1, 2, 3, 4]

    from mm1_megatron.runtime.distributed import dist_env_from_environ

    port = dist_env_from_environ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                                  "SLURM_JOB_ID": job_id}).master_port
    assert f"master={socket.gethostname().split('.')[0]}:{port}" in log
    info = slurm.job(job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"

    # slurm/eval.sh on the run: the 2 tasks hold the model at TP=2 and log its scores beside
    # the training's scalars, at the checkpoint's step.
    tasks = tmp_path / "tasks"
    subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_tasks.py"), "--data",
                    str(demo_data), "--output", str(tasks)], check=True, capture_output=True)
    cmd = ["sbatch", "--wait", "--parsable", *SMALL_JOB, "slurm/eval.sh", "--run-dir",
           str(run_dir), "--tp", "2", "--task", str(tasks / "caption.jsonl"), "--shots", "0",
           "--limit", "2", "--max-new-tokens", "3", "--tensorboard", str(run_dir / "tensorboard")]
    done = subprocess.run(cmd, cwd=REPO, env=job_env(slurm), capture_output=True, text=True,
                          timeout=JOB_TIMEOUT)
    eval_id = done.stdout.split(";")[0].strip()
    log = _tail(LOGS / f"mm1-eval-{eval_id}.out", 10**6)
    assert done.returncode == 0, log + _tail(LOGS / f"mm1-eval-{eval_id}.err")
    assert "TP=2 x EP=1" in log and "(step 4)" in log
    from tests._helpers.tensorboard import scalars

    assert [step for step, _ in scalars(run_dir, "eval/caption/0shot")] == [4]


def run_through_one_requeue(slurm: Cluster, tmp_path: Path, args: list[str],
                            env: dict[str, str], while_running=None) -> tuple[str, str, str]:
    """Submit with `sbatch --wait`, call `while_running(job_id, wait_for)` if given, wait for
    the job to exit for a requeue and be queued again, lift Slurm's hold, and wait for the
    requeued run to finish. Returns (job id, the first run's log, the requeued run's log)."""
    cmd = ["sbatch", "--wait", "--parsable", *SMALL_JOB, "slurm/mm1_30b.sh", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    job_id = ""
    try:
        job_id = proc.stdout.readline().split(";")[0].strip()
        assert job_id.isdigit(), proc.stderr.read()
        deadline = time.monotonic() + JOB_TIMEOUT

        def wait_for(what: str, ok) -> None:
            while not ok():
                assert proc.poll() is None, f"job ended while waiting for {what}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.3)

        if while_running is not None:
            while_running(job_id, wait_for)
        wait_for("the requeue", lambda: slurm.job(job_id).get("Restarts") == "1"
                 and slurm.job(job_id)["JobState"] == "PENDING")
        # Slurm holds a requeued job for ~2 minutes (its begin time); lift the hold.
        slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except BaseException:
        if job_id:
            print(job_log(tmp_path, job_id), job_err(tmp_path, job_id), slurm.logs(),
                  file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.kill()
            if job_id:
                slurm.run("scancel", job_id, check=False)
    log = job_log(tmp_path, job_id)
    assert proc.returncode == 0, log + job_err(tmp_path, job_id)
    first, _, second = log.partition("mm1: trainer exited for a requeue (status 75); "
                                     f"requeueing job {job_id}")
    assert second, log
    info = slurm.job(job_id)
    assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0")
    assert "restarts=1" in second and "mm1: training finished" in second
    return job_id, first, second


def assert_resumed_at(second: str, run_dir: Path, saved: int, last: int) -> None:
    resumed = re.search(r"^resumed from (\S+) at step (\d+)$", second, re.M)
    assert resumed, second
    assert resumed.group(1) == str(run_dir / "checkpoints" / f"step_{saved:08d}")
    assert int(resumed.group(2)) == saved
    assert logged_steps(second) == list(range(saved + 1, last + 1))  # first step logged: N+1
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"


@pytest.mark.slow
@pytest.mark.multirank
def test_usr1_checkpoints_requeues_and_resumes(slurm: Cluster, demo_data: Path,
                                               tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    def preempt(job_id: str, wait_for) -> None:
        wait_for("training steps", lambda: 2 in logged_steps(job_log(tmp_path, job_id)))
        # Like Slurm's --signal=USR1@600 before the time limit: to every job step (the
        # trainer's tasks), not to the batch shell.
        slurm.run("scancel", "--signal=USR1", job_id)

    job_id, first, second = run_through_one_requeue(
        slurm, tmp_path, tiny_overrides(demo_data, run_dir, "train.train_steps=60",
                                        "checkpoint.save_interval=1000"),
        job_env(slurm), while_running=preempt)
    assert "received SIGUSR1; checkpoint written, exit for requeue" in job_err(tmp_path, job_id)
    saved = int(re.findall(r"^saved checkpoint at step (\d+)$", first, re.M)[-1])
    assert 2 <= saved < 60
    assert_resumed_at(second, run_dir, saved, 60)
    assert tensorboard_steps(run_dir) == list(range(1, 61))


@pytest.mark.slow
@pytest.mark.multirank
def test_a_hung_rank_is_requeued_and_resumes(slurm: Cluster, demo_data: Path,
                                             tmp_path: Path) -> None:
    """Rank 1 stops before step 4's first collective (once: the marker file lets the requeued
    run past it); rank 0 waits in that collective. Both watchdogs fire, srun returns 75,
    common.sh requeues, and the requeued job resumes from step 2's checkpoint."""
    run_dir, once = tmp_path / "run", tmp_path / "hung-once"
    job_id, first, second = run_through_one_requeue(
        slurm, tmp_path, tiny_overrides(demo_data, run_dir, "train.train_steps=6",
                                        "checkpoint.save_interval=2", "train.hang_timeout_s=10",
                                        "train.hang_timeout_slow_s=120"),
        job_env(slurm, MM1_FAULT_HANG=f"1:4:{once}"))
    assert once.read_text() == "rank 1 hung before step 4\n"
    assert logged_steps(first) == [1, 2, 3]
    err = job_err(tmp_path, job_id)
    for rank, collective in enumerate(("waiting in gloo:", "in no collective; ")):
        line = next(ln for ln in err.splitlines() if f"mm1-train: rank {rank}: hang:" in ln)
        assert line.startswith(f"mm1-train: rank {rank}: hang: step 4 did not complete within "
                               f"10 s (last completed step 3); {collective}"), line
        assert line.endswith(f"; stacks in {run_dir / 'hang' / f'rank_{rank}.txt'}; exiting "
                             "75 for a requeue"), line
    assert "in hang_before_step" in (run_dir / "hang" / "rank_1.txt").read_text()
    assert "in train_step" in (run_dir / "hang" / "rank_0.txt").read_text()
    assert_resumed_at(second, run_dir, 2, 6)


@pytest.mark.slow
def test_failed_node_check_stops_the_job(slurm: Cluster, demo_data: Path,
                                         tmp_path: Path) -> None:
    job_id, status = submit_and_wait(slurm, tmp_path, tiny_overrides(demo_data, tmp_path / "run"),
                                     job_env(slurm, MM1_MIN_FREE_GB="100000000"))
    log, err = job_log(tmp_path, job_id), job_err(tmp_path, job_id)
    assert status != 0
    assert "node_check" in err and "FAILED" in err and "want at least 100000000" in err
    assert "node health check failed; not training" in err
    assert "step " not in log and not (tmp_path / "run" / "checkpoints").exists()


def _wait_gone(slurm: Cluster, job_ids: list[str], timeout: float = JOB_TIMEOUT) -> None:
    """Until none of `job_ids` (array jobs included) is queued or running."""
    deadline = time.monotonic() + timeout
    ids = ",".join(j for j in job_ids if j)
    while slurm.run("squeue", "-h", "-j", ids, check=False).stdout.strip():
        assert time.monotonic() < deadline, f"jobs {ids} still queued\n{slurm.logs()}"
        time.sleep(0.5)


@pytest.mark.slow
def test_prepare_data_on_slurm_reruns_only_a_failed_array_task(slurm: Cluster,
                                                               tmp_path: Path) -> None:
    """slurm/prepare_data.sh (mm1-prepare-data --slurm): the tasks as an array job, the merge
    as a job depending on it. Task 2 fails: the merge is cancelled, nothing is published; the same command again
    submits task 2 alone and the merge, and the index equals one process's."""
    import json

    from mm1_megatron.data.prepare_tasks import FAULT
    from mm1_megatron.data.sources.webdataset import index_in_place
    from tests._helpers.data import TEXT
    from tests._helpers.img2dataset import write_img2dataset

    source = write_img2dataset(tmp_path / "src", TEXT, shards=8, samples_per_shard=4,
                               failed=(5,))
    out = tmp_path / "out"
    cmd = ["bash", str(SLURM / "prepare_data.sh"), str(source.folder), str(out)]
    env = {**slurm.env, "PYTHONWARNINGS": "ignore", "PYTHON": sys.executable,
           "PARTITION": "debug", "TASKS": "4", "TIME": "00:10:00", "MEM_PER_CPU_GB": "1"}

    def submit(**extra: str) -> dict:
        done = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        jobs = json.loads(done.stdout.strip().splitlines()[-1])["submitted"]
        _wait_gone(slurm, list(jobs.values()))
        return jobs

    jobs = submit(**{FAULT: "2"})
    pending = out.with_name("out.incomplete")
    assert not out.exists()
    assert sorted(p.name for p in (pending / "logs" / "index" / "completions").iterdir()) == \
        ["00000", "00001", "00003"]
    assert "fault injection" in (pending / "logs" / "index" / "logs" /
                                 "task_00002.log").read_text()
    assert slurm.job(jobs["merge_job"])["JobState"] == "CANCELLED"  # its dependency failed

    again = submit()
    log = (out / "logs" / f"merge-{again['merge_job']}.out").read_text()
    summary = json.loads(log.strip().splitlines()[-1])
    assert (summary["tasks"], summary["samples"], summary["bad"]) == \
        (4, 31, {"failed_download": 1})
    assert json.loads((out / "logs" / "index" / "ranks_to_run.json").read_text()) == [2]
    assert slurm.job(again["merge_job"])["JobState"] == "COMPLETED"
    serial = tmp_path / "serial"
    serial.mkdir()
    index_in_place([source.folder], "caption", serial)
    for name in ("samples.npy", "images.npy"):
        assert (out / "index" / name).read_bytes() == (serial / "index" / name).read_bytes()

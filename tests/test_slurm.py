"""SLURM: the srun variables launch/train.py maps to RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, the command line
launch/slurm/train.sbatch builds from a fake SLURM environment, and a real one-host cluster (munge, slurmctld
and slurmd from Debian's slurm-wlm, started here on localhost) training the tiny model over gloo with
`srun -n 2 python launch/train.py` and with `sbatch launch/slurm/train.sbatch` (accelerate launch)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mip_dist.engine import distributed
from mip_dist.engine.distributed import (LaunchEnvError, first_slurm_host, free_port, launcher_env,
                                         slurm_env, slurm_master_addr, tasks_on_node)
from test_train_distributed import losses, make_tiny_shards

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
STANDARD = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
             "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_STEP_NODELIST": "gpu[07-08]"}


def _clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any launcher or SLURM variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in STANDARD and not k.startswith("SLURM_")}
    return {**env, **(extra or {})}


@pytest.fixture
def srun_task(monkeypatch):
    """Task 3 of a 4-task srun step on 2 nodes, as srun sets it; no scontrol (the parser answers)."""
    for k in [k for k in os.environ if k in STANDARD or k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    for k, v in SRUN_TASK.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed.shutil, "which", lambda name: None)
    return monkeypatch


def test_srun_task_gets_rank_world_and_master_from_slurm(srun_task):
    assert launcher_env() == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 123456 % 50000)}


def test_srun_keeps_a_set_master_and_launchers_win(srun_task):
    srun_task.setenv("MASTER_ADDR", "head")
    srun_task.setenv("MASTER_PORT", "29555")
    env = launcher_env()
    assert (env["RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("3", "head", "29555")
    launched = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    for k, v in launched.items():  # torchrun / accelerate / deepspeed inside an srun task
        srun_task.setenv(k, v)
    assert slurm_env() == {} and launcher_env() == launched


def test_batch_script_without_srun_stays_one_process(srun_task):
    """The batch step has SLURM_PROCID=0 and the job's SLURM_NTASKS but is no srun step: one process."""
    srun_task.delenv("SLURM_STEP_ID")
    srun_task.setenv("SLURM_PROCID", "0")
    env = launcher_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")


@pytest.mark.parametrize("name,value,match", [
    ("SLURM_PROCID", "x", "SLURM_PROCID='x' is not an integer"),
    ("SLURM_PROCID", "4", "SLURM_PROCID=4 is outside SLURM_NTASKS=4"),
    ("SLURM_STEP_NODELIST", "gpu[07", "SLURM_STEP_NODELIST='gpu\\[07' is not a SLURM host list"),
    ("SLURM_STEP_TASKS_PER_NODE", "2(x2", "SLURM_STEP_TASKS_PER_NODE='2\\(x2' is not"),
    ("SLURM_JOB_ID", "", "SLURM_JOB_ID='' is not an integer"),
])
def test_bad_slurm_variable_is_named(srun_task, name, value, match):
    srun_task.setenv(name, value)
    with pytest.raises(LaunchEnvError, match=match):
        launcher_env()


@pytest.mark.parametrize("nodelist,first", [
    ("node[01-03],gpu5", "node01"), ("gpu5,node[01-03]", "gpu5"), ("a[3,1-2]b[2-3]", "a3b2"),
    ("rack[1-2]-n[07-08]", "rack1-n07"), ("single", "single"), ("n[009-011]", "n009")])
def test_first_host_of_a_nodelist(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_scontrol_is_asked_first_where_it_answers(tmp_path, monkeypatch):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\necho realhost1; echo realhost2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_master_addr("n[1-2]") == "realhost1"
    fake.write_text("#!/bin/sh\nexit 1\n")  # no slurm.conf on this host
    assert slurm_master_addr("n[1-2]") == "n1"


def test_tasks_on_node():
    assert [tasks_on_node("2(x3),1", i) for i in range(4)] == [2, 2, 2, 1]
    with pytest.raises(LaunchEnvError, match="SLURM_NODEID=4 is outside"):
        tasks_on_node("2(x3),1", 4)


# ---- launch/slurm/train.sbatch on a fake SLURM environment --------------------------------------------

FAKE_SRUN = """#!/usr/bin/env bash
# srun as seen by one task per node: drop the options, run the command once per node with SLURM_NODEID
n=1
while [[ "$1" == --* ]]; do case "$1" in --nodes=*) n="${1#--nodes=}";; esac; shift; done
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i "$@" || exit; done
"""
FAKE_ACCELERATE = f"""#!/bin/sh
exec {sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@"
"""
FAKE_NVIDIA_SMI = "#!/bin/sh\nfor i in 0 1 2; do echo \"GPU $i: H100 (UUID: GPU-$i)\"; done\n"


def sbatch_script(tmp_path: Path, slurm: dict[str, str], args: list[str]) -> subprocess.CompletedProcess:
    """Run the sbatch script as SLURM would on the first node, with srun, accelerate, nvidia-smi faked
    and no scontrol answering (the script's own parser names the first host)."""
    fakes = tmp_path / "bin"
    fakes.mkdir(exist_ok=True)
    for name, text in {"srun": FAKE_SRUN, "accelerate": FAKE_ACCELERATE, "nvidia-smi": FAKE_NVIDIA_SMI,
                       "scontrol": "#!/bin/sh\nexit 1\n"}.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = _clean_env({"PATH": f"{fakes}{os.pathsep}{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO), **slurm})
    return subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)


def accelerate_args(nodes: int, procs: int, host: str, port: int, args: list[str]) -> list[str]:
    """What every node's accelerate should get after its --machine_rank."""
    return ["--config_file", "configs/accelerate/multi_node.yaml", "--num_machines", str(nodes),
            "--num_processes", str(nodes * procs), "--main_process_ip", host, "--main_process_port", str(port),
            "launch/train.py", *args]


@pytest.mark.parametrize("slurm,procs", [
    ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),
    ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
    ({}, 3),  # nvidia-smi's count
    ({"PROCS_PER_NODE": "2", "SLURM_GPUS_ON_NODE": "4"}, 2),
], ids=["gpus_on_node", "gpus_per_node", "nvidia_smi", "procs_per_node"])
def test_sbatch_runs_accelerate_once_per_node(tmp_path, slurm, procs):
    args = ["--config", "configs/tiny.yaml", "optim.lr=0.1", "train.run_name=a b"]
    r = sbatch_script(tmp_path, {"SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
                                 "SLURM_JOB_ID": "123456", **slurm}, args)
    assert r.returncode == 0, r.stderr
    per_node = [json.loads(line) for line in r.stdout.splitlines()]
    expected = accelerate_args(2, procs, "gpu07", 10000 + 123456 % 50000, args)
    assert per_node == [["launch", "--machine_rank", str(rank), *expected] for rank in (0, 1)]


def test_sbatch_dry_run_prints_the_srun_command(tmp_path):
    r = sbatch_script(tmp_path, {"SLURM_JOB_NODELIST": "node5,node[1-2]", "SLURM_NNODES": "3", "SLURM_JOB_ID": "7",
                                 "SLURM_CPUS_PER_TASK": "16", "MASTER_PORT": "29555", "DRY_RUN": "1",
                                 "SLURM_GPUS_ON_NODE": "8"}, ["--config", "c.yaml"])
    assert r.returncode == 0, r.stderr
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {r.stdout}"], capture_output=True, text=True).stdout
    words = out.splitlines()
    assert words[:6] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                         "--cpus-per-task=16"]
    assert words[6:8] == ["bash", "-c"] and words[9] == "accelerate"
    assert words[10:] == accelerate_args(3, 8, "node5", 29555, ["--config", "c.yaml"])


def test_sbatch_names_a_missing_or_bad_variable(tmp_path):
    r = sbatch_script(tmp_path, {"SLURM_NNODES": "2"}, [])
    assert r.returncode != 0 and "SLURM_JOB_NODELIST is unset" in r.stderr
    r = sbatch_script(tmp_path, {"SLURM_JOB_NODELIST": "n1", "SLURM_NNODES": "2", "PROCS_PER_NODE": "two"}, [])
    assert r.returncode == 2 and "'two'" in r.stderr and "PROCS_PER_NODE" in r.stderr


# ---- a real one-host SLURM cluster ---------------------------------------------------------------------

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
DAEMONS = {name: shutil.which(name, path=SBIN_PATH) for name in ("munged", "slurmctld", "slurmd")}
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _skip_reason() -> str | None:
    """Why this host cannot run a one-host SLURM cluster, or None."""
    missing = [n for n, path in DAEMONS.items() if path is None]
    missing += [n for n in ("srun", "sbatch", "scontrol", "sinfo") if shutil.which(n) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start job steps"
    return None


def _port_pair() -> int:
    """A free port p below 60000 with p + 1 free too (the cluster's two daemons)."""
    while True:
        p = free_port()
        if p < 59999:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 1))
                return p
            except OSError:
                pass


def _slurm_conf(root: Path, ctld_port: int, first_job_id: int) -> str:
    """A minimal one-node cluster on localhost: no cgroups, no accounting, state and spool under `root`."""
    return "\n".join([
        "ClusterName=mipci", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld_port}",
        f"SlurmdPort={ctld_port + 1}", "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
        "CredType=cred/munge", f"AuthInfo=socket={root}/munge/munge.socket", f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool", f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "MpiDefault=none", "ReturnToService=2", "SlurmdParameters=config_overrides",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "SchedulerType=sched/builtin", "MailProg=/bin/true", f"FirstJobId={first_job_id}",
        "NodeName=localhost NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES", ""])


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each daemon, newest first; SIGKILL what is still up after 10 s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    for p in reversed(procs):
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """munged, slurmctld and slurmd on localhost; yields the environment that talks to them. Jobs are
    cancelled and the daemons stopped at the end, whatever happened."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    for d in ("munge", "state", "spool"):
        (root / d).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    port = _port_pair()
    job_port = _port_pair()  # the first job's derived rendezvous port: 10000 + job id % 50000
    (root / "slurm.conf").write_text(_slurm_conf(root, port, job_port - 10000))
    env = _clean_env({"SLURM_CONF": str(root / "slurm.conf"), "PYTHONUNBUFFERED": "1",
                      "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    commands = {
        "munged": [DAEMONS["munged"], "-F", "-f", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                   f"--pid-file={root}/munged.pid", f"--seed-file={root}/munge/seed", f"--log-file={root}/munged.log"],
        "slurmctld": [DAEMONS["slurmctld"], "-D"],
        "slurmd": [DAEMONS["slurmd"], "-D", "-N", "localhost"],
    }
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in commands.items():
            with open(root / f"{name}.out", "w") as log:
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            if name == "munged":
                _wait_for(lambda: (root / "munge" / "munge.socket").exists(), 10, root, "munged's socket")
        _wait_for(lambda: _sinfo_state(env) == "idle", 30, root, "the node to come up idle")
        yield env, job_port
    finally:
        if procs:
            subprocess.run(["scancel", "--partition=debug"], env=env, capture_output=True, timeout=30)
            _wait_for(lambda: not _squeue(env), 15, root, None)
        _stop(procs)


def _daemon_logs(root: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(root.glob("*.out")))


def _wait_for(ready, seconds: float, root: Path, what: str | None) -> None:
    """Poll `ready` for `seconds`; fail naming `what` with the daemons' logs (or just return if None)."""
    deadline = time.time() + seconds
    while not ready():
        if time.time() > deadline:
            if what is None:
                return
            pytest.fail(f"no {what} after {seconds} s\n{_daemon_logs(root)}")
        time.sleep(0.2)


def _sinfo_state(env: dict[str, str]) -> str:
    r = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _squeue(env: dict[str, str]) -> str:
    r = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def _job_state(env: dict[str, str], job_id: str) -> str:
    r = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                       timeout=30)
    return next((w.split("=", 1)[1] for w in r.stdout.split() if w.startswith("JobState=")), "UNKNOWN")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Shards and overrides for 2 steps of the tiny model."""
    root = tmp_path_factory.mktemp("slurm_tiny")
    return root, make_tiny_shards(root) + ["data.steps_per_epoch=1", "train.epochs=2"]


@pytest.fixture(scope="module")
def srun_run(cluster, tiny) -> tuple[subprocess.CompletedProcess, Path]:
    """The cluster's first job: `srun -n 2 python launch/train.py` (its port derives from its job id)."""
    env, _ = cluster
    root, overrides = tiny
    r = subprocess.run(["srun", "-n", "2", "--time=5", sys.executable, "launch/train.py", "--config",
                        "configs/tiny.yaml", *overrides, "train.run_name=srun"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    return r, root / "runs" / "srun"


def test_srun_two_tasks_train_as_one_job(cluster, srun_run):
    """Old code: each task trained alone as rank 0 of 1, both into the same run directory."""
    _, job_port = cluster
    r, run_dir = srun_run
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert f"rank 0/2 (local 0) on cpu, backend gloo, master localhost:{job_port}" in out, out[-5000:]
    assert len(losses(run_dir)) == 2 and (run_dir / "FINISHED").is_file()


def test_sbatch_script_trains_with_accelerate(cluster, tiny, srun_run):
    """The #SBATCH lines overridden for this 2-CPU node: one node, no GPUs, 2 processes."""
    env, _ = cluster
    root, overrides = tiny
    log = root / "sbatch.out"
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
                             "--time=5", f"--output={log}", str(SBATCH), "--config", "configs/tiny.yaml",
                             *overrides, "train.run_name=sbatch"],
                            cwd=REPO, env={**env, "PROCS_PER_NODE": "2", "MASTER_PORT": str(free_port())},
                            capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    deadline = time.time() + 240
    while (state := _job_state(env, job_id)) not in DONE:
        assert time.time() < deadline, f"job {job_id} still {state}"
        time.sleep(0.5)
    text = log.read_text() if log.is_file() else ""
    assert state == "COMPLETED", f"job {job_id} {state}\n{text[-5000:]}"
    assert "1 node(s) x 2 process(es)" in text and "rank 0/2 (local 0)" in text, text[-5000:]
    assert losses(root / "runs" / "sbatch") == pytest.approx(losses(srun_run[1]), rel=1e-5, abs=1e-6)

"""Process-group setup for any launcher (python, deepspeed, accelerate/torchrun, SLURM's srun) and small
collectives."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job and which device/backend it uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, TensorBoard and exported models."""
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on this host (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """cfg.train.device -> torch.device; "auto" means this rank's GPU if CUDA is present, else CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' requested but CUDA is not available")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


class LaunchEnvError(RuntimeError):
    """A launcher variable is missing or malformed: the user's (or cluster's) to fix, reported in one line."""


def _slurm_int(environ: Mapping[str, str], name: str) -> int:
    """A SLURM count or id as an int, or a one-line error naming the variable."""
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def first_slurm_host(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> str:
    """The first host of a SLURM nodelist ('node[01-03],gpu5' -> 'node01') without asking SLURM: each
    bracket keeps its first name, then the list is cut at its first comma."""
    first = re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", nodelist.strip()).split(",")[0]
    if not first or "[" in first or "]" in first:
        raise LaunchEnvError(f"{var}={nodelist!r} is not a SLURM host list")
    return first


def slurm_master_addr(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> str:
    """Rank 0's host (SLURM starts task 0 on the first node): `scontrol show hostnames` where it answers
    within seconds (it knows every form SLURM writes), else first_slurm_host."""
    scontrol = shutil.which("scontrol") if "[" in nodelist else None
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):  # no config here: scontrol may retry for a minute
            out = []
        if out:
            return out[0]
    return first_slurm_host(nodelist, var)


def slurm_port(job_id: int) -> int:
    """The rendezvous port every task of a job derives alike, different for jobs sharing a node."""
    return 10000 + job_id % 50000


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of SLURM's compressed task counts ('2(x3),1': 2 on nodes 0-2, 1 on node 3)."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchEnvError(f"SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r} is not a SLURM task count list")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node_id < len(counts):
        raise LaunchEnvError(f"SLURM_NODEID={node_id} is outside SLURM_STEP_TASKS_PER_NODE={tasks_per_node!r}")
    return counts[node_id]


def slurm_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Under plain `srun python launch/train.py` (an srun step: SLURM_STEP_ID and SLURM_PROCID set, RANK and
    WORLD_SIZE not), the launcher variables SLURM implies; {} otherwise, so torchrun, deepspeed and
    accelerate (which set RANK) win, and a batch script's own `python` (no step) stays one process."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ or "SLURM_STEP_ID" not in environ \
            or "SLURM_PROCID" not in environ:
        return {}
    for name in ("SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID"):
        if name not in environ:
            raise LaunchEnvError(f"srun left {name} unset (SLURM_PROCID is set)")
    var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(v)), None)
    if var is None:
        raise LaunchEnvError("srun left SLURM_STEP_NODELIST and SLURM_JOB_NODELIST unset (SLURM_PROCID is set)")
    rank, world = _slurm_int(environ, "SLURM_PROCID"), _slurm_int(environ, "SLURM_NTASKS")
    if not 0 <= rank < world:
        raise LaunchEnvError(f"SLURM_PROCID={rank} is outside SLURM_NTASKS={world}")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(_slurm_int(environ, "SLURM_LOCALID"))}
    if "SLURM_STEP_TASKS_PER_NODE" in environ and "SLURM_NODEID" in environ:  # CPU ranks share the cores
        env["LOCAL_WORLD_SIZE"] = str(tasks_on_node(environ["SLURM_STEP_TASKS_PER_NODE"],
                                                    _slurm_int(environ, "SLURM_NODEID")))
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or slurm_master_addr(environ[var], var)
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(slurm_port(_slurm_int(environ, "SLURM_JOB_ID")))
    return env


def launcher_env(local_rank_arg: int = -1) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as set by the launcher (or implied by srun), with single-process
    defaults filled in."""
    env = {k: os.environ[k] for k in _LAUNCH_VARS if k in os.environ}
    env.update(slurm_env())
    if "LOCAL_RANK" not in env and local_rank_arg >= 0:
        env["LOCAL_RANK"] = str(local_rank_arg)
    if "RANK" not in env and "WORLD_SIZE" not in env:  # plain `python launch/train.py`
        env.setdefault("RANK", "0")
        env.setdefault("WORLD_SIZE", "1")
        env.setdefault("LOCAL_RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    missing = [k for k in _LAUNCH_VARS if k not in env]
    if missing:
        raise LaunchEnvError(f"launcher left {', '.join(missing)} unset; "
                           "start with python, srun, deepspeed or accelerate launch")
    return env


DEFAULT_COLLECTIVE_TIMEOUT_S = {"cpu": 300.0, "cuda": 600.0}
_timeout_s: Optional[float] = None  # this process group's collective timeout, for messages
# what gloo and NCCL say when a peer rank stops answering: it hung (timeout) or died (connection dropped)
_PEER_FAILURE = re.compile(r"timed out|timeout|connection (reset|closed) by peer|pair closure|broken pipe|"
                           r"communicator was aborted|remote process exited|socket closed", re.IGNORECASE)


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete because a peer rank did not answer; the message names the collective."""


def peer_failure(exc: BaseException) -> bool:
    """True if `exc` is a collective that failed for want of a peer rank (a timeout or a dropped connection),
    not an error of this rank's own work: torch's distributed errors, and gloo's RuntimeErrors by their text."""
    if isinstance(exc, OSError):
        return False
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and bool(_PEER_FAILURE.search(str(exc)))


def collective_failure(what: str, exc: BaseException) -> CollectiveTimeoutError:
    """The one-line error for a collective that a peer rank did not answer: which one, the timeout, what to read."""
    limit = f" within {_timeout_s:g} s (train.collective_timeout_s)" if _timeout_s else ""
    gist = " ".join(str(exc).split())[:160]
    grouped = dist.is_available() and dist.is_initialized()
    here = f"rank {dist.get_rank()} of {dist.get_world_size()}: " if grouped else ""
    return CollectiveTimeoutError(f"{here}{what}: a peer rank did not answer{limit}, so the collective timed out or "
                                  f"lost its connection ({type(exc).__name__}: {gist}); another rank crashed, hung or "
                                  "is still busy: read the other ranks' logs; the disk is not the cause")


@contextlib.contextmanager
def peers_named(what: str) -> Iterator[None]:
    """Collectives inside whose timeout or lost peer is raised as a one-line CollectiveTimeoutError naming
    `what` and this rank (a peer rank that did not answer), never as gloo's or NCCL's raw text or a disk error."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not isinstance(exc, CollectiveTimeoutError) and peer_failure(exc):
            raise collective_failure(what, exc) from exc
        raise


def collective_timeout(seconds: float, device: torch.device) -> timedelta:
    """How long a collective waits for a missing rank before the job fails: `seconds`, or for 0 the
    default of the device type (300 s on CPU, 600 s on GPU)."""
    return timedelta(seconds=seconds if seconds > 0 else DEFAULT_COLLECTIVE_TIMEOUT_S.get(device.type, 600.0))


def _default_group_timeout(timeout: timedelta) -> None:
    """Make `timeout` the default of every process group created later: torch gives a `new_group`
    without an explicit timeout its module default (30 min gloo, 10 min nccl), not the world group's,
    and DeepSpeed creates its data-parallel groups that way (a hung rank would block them for good)."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def _skip_inference_comm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory collective op on CPU ranks: only DeepSpeed's
    `inference_all_reduce` uses it (training's collectives go through torch.distributed), and a fresh
    machine spends about 40 s of C++ compile on it at the first start, more than the demo's data
    generation and evaluation together. DeepSpeed keeps one `deepspeed.ops.__compatible_ops__` dict
    whose edits persist; an op marked incompatible there is never built."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(device_preference: str = "auto", local_rank_arg: int = -1,
                     timeout_s: float = 0.0) -> DistEnv:
    """Start the process group through DeepSpeed: nccl on GPUs, gloo on CPUs; collectives time out
    after `timeout_s` (0: the device's default), so a hung rank ends the job instead of blocking it."""
    global _timeout_s
    import deepspeed

    env = launcher_env(local_rank_arg)
    os.environ.update(env)
    rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    device = resolve_device(device_preference, local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        _skip_inference_comm_op()
        if "OMP_NUM_THREADS" not in os.environ:  # CPU ranks on one host: share the cores, don't oversubscribe
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_size)))
    if not dist.is_initialized():
        timeout = collective_timeout(timeout_s, device)
        _timeout_s = timeout.total_seconds()
        _default_group_timeout(timeout)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False, timeout=timeout)
    log.info("rank %d/%d (local %d) on %s, backend %s, master %s:%s",
             rank, world, local, device, backend, env["MASTER_ADDR"], env["MASTER_PORT"])
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def barrier() -> None:
    """Wait for every rank (no-op outside a process group)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's object, in rank order."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def comm_device() -> torch.device:
    """The device the process group's backend takes tensors on: this rank's GPU for nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks, on t's device (no-op outside a process group). The reduction runs on
    the backend's device (NCCL rejects CPU tensors, gloo takes them), in place when t is already there."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t
    device = comm_device()
    on_backend = t if t.device == device else t.to(device)
    dist.all_reduce(on_backend, op=dist.ReduceOp.SUM)
    return on_backend if on_backend is t else on_backend.to(t.device)


def to_host(t: torch.Tensor) -> list[float]:
    """A small tensor's values on the host: the one device->host read a training step makes."""
    return [float(x) for x in t.detach().double().cpu().reshape(-1).tolist()]


def shutdown(wait: bool = True) -> None:
    """Destroy the process group so the process exits cleanly (gloo aborts at exit otherwise)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()

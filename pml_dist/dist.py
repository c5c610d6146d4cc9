"""Where this process sits in the job, and the process group. The only module that reads SLURM_*.

Resolution order (as torchtitan / dinov2 do):
1. a complete torchrun (or `deepspeed` launcher) environment: RANK, WORLD_SIZE, LOCAL_RANK,
   MASTER_ADDR, MASTER_PORT all set;
2. Slurm (`srun`, one task per rank): SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST;
   the master is the first host of the node list, the port is derived from the job id;
3. neither: one process.
A partial environment is an error naming what is missing, never a silent fallback to one process.
The five torch variables are exported before DeepSpeed initialises: it reads only those and
otherwise tries mpi4py.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

from pml_dist.errors import PmlError

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve(env: dict[str, str] | None = None) -> RankInfo:
    """Work out rank, world size and rendezvous from the environment (os.environ by default)."""
    env = dict(os.environ if env is None else env)
    present = [v for v in TORCH_VARS if v in env]
    if present:
        missing = [v for v in TORCH_VARS if v not in env]
        if missing:
            raise PmlError(
                f"incomplete torch distributed environment: {', '.join(present)} set but "
                f"{', '.join(missing)} missing"
            )
        world = _int(env, "WORLD_SIZE")
        return _checked(RankInfo(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK"),
            # torchrun sets LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE; the GPU choice needs it
            local_world_size=int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world),
            master_addr=env["MASTER_ADDR"],
            master_port=_int(env, "MASTER_PORT"),
            source="torchrun",
        ))
    if "SLURM_PROCID" in env:
        missing = [v for v in SLURM_VARS if v not in env]
        if "SLURM_JOB_ID" not in env:
            missing.append("SLURM_JOB_ID")
        if missing:
            raise PmlError(f"incomplete Slurm environment: {', '.join(missing)} missing")
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        ntasks = _int(env, "SLURM_NTASKS")
        return _checked(RankInfo(
            rank=_int(env, "SLURM_PROCID"),
            world_size=ntasks,
            local_rank=_int(env, "SLURM_LOCALID"),
            local_world_size=_tasks_on_this_node(env, ntasks, len(hosts)),
            master_addr=hosts[0],
            master_port=int(env.get("PML_DIST_MASTER_PORT", 0)) or job_port(_int(env, "SLURM_JOB_ID")),
            source="slurm",
        ))
    return RankInfo(0, 1, 0, 1, "127.0.0.1", _free_port(), "single")


# Rendezvous ports: one per job from its own id (an array task's SLURM_JOB_ID is its own), so two
# jobs sharing a master node never collide unless their ids differ by a multiple of PORT_SPAN; all
# below Linux's ephemeral range (32768-60999), where the kernel hands out ports to other programs.
PORT_BASE, PORT_SPAN = 17000, 15000


def job_port(job_id: int) -> int:
    return PORT_BASE + job_id % PORT_SPAN


def _checked(info: RankInfo) -> RankInfo:
    if not 0 <= info.rank < info.world_size:
        raise PmlError(f"rank {info.rank} is outside world size {info.world_size} ({info.source})")
    if not 0 <= info.local_rank < max(info.local_world_size, 1):
        raise PmlError(f"local rank {info.local_rank} is outside {info.local_world_size} ({info.source})")
    return info


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise PmlError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _tasks_on_this_node(env: dict[str, str], ntasks: int, nodes: int) -> int:
    """SLURM_TASKS_PER_NODE looks like '2(x3),1'; without it assume an even spread."""
    spec = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    first = re.match(r"(\d+)", spec)
    return int(first.group(1)) if first else max(1, ntasks // max(nodes, 1))


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: 'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(n).zfill(len(lo))}{suffix}")
    if not hosts:
        raise PmlError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return hosts


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_torch_env(info: RankInfo) -> None:
    """Set the five variables torch.distributed and DeepSpeed read (plus LOCAL_WORLD_SIZE)."""
    os.environ.update({
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    })


def export_submitit_env() -> RankInfo | None:
    """Inside a submitit job (Slurm or its local executor), export the torch variables from
    submitit's view of the job, so every launcher leads to the same complete environment.
    Returns None outside submitit."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):
        return None
    # The task's own SLURM_JOB_ID (an array task has one besides the array's id); the local
    # executor's job id is its process id.
    job_id = os.environ.get("SLURM_JOB_ID") or re.sub(r"\D", "", str(env.job_id)) or "0"
    info = RankInfo(
        rank=env.global_rank,
        world_size=env.num_tasks,
        local_rank=env.local_rank,
        local_world_size=max(1, env.num_tasks // max(1, env.num_nodes)),
        master_addr=env.hostnames[0] if env.hostnames else "127.0.0.1",
        master_port=int(os.environ.get("PML_DIST_MASTER_PORT") or 0) or job_port(int(job_id)),
        source="submitit",
    )
    export_torch_env(info)
    return info


def choose_device(requested: str, device_count: int, local_rank: int, local_world_size: int,
                  model: str = "", promised: int = 0) -> tuple[str, int | None]:
    """The one device choice of a rank, as ("cpu", None) or ("cuda", ordinal): training (which hands
    it to DeepSpeed) and inference both use it. Pure, so it is tested without GPUs.

    requested: train.device; device_count: the GPUs this process sees (CUDA_VISIBLE_DEVICES
    applied), 0 without CUDA; model: model.name (a torchvision ResNet does not fall back to CPU);
    promised: the GPUs Slurm gave this job on this node (promised_gpus), which must then be usable.
    The GPUs must match the local ranks: each rank sees all of the node's GPUs, one per local rank
    (cuda:LOCAL_RANK), or exactly the one bound to it (srun --gpus-per-task=1 / --gpu-bind: cuda:0).
    Anything else would give a rank an ordinal it cannot see, or two ranks one GPU (NCCL refuses).
    """
    from pml_dist.config import DEVICES, TORCHVISION_RESNETS

    if requested not in DEVICES:
        raise PmlError(f"config key 'train.device' must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return "cpu", None
    if device_count == 0:
        if promised:
            raise PmlError(f"local rank {local_rank}: Slurm gave this job {promised} GPU(s) on this node, "
                           f"but torch sees none (a CPU-only torch, or CUDA_VISIBLE_DEVICES "
                           f"changed by the job's setup lines); it would train on the CPU")
        if requested == "cuda":
            raise PmlError("train.device=cuda, but this process sees no CUDA GPU (check the node and "
                           "CUDA_VISIBLE_DEVICES); set train.device=cpu to run on the CPU")
        if model in TORCHVISION_RESNETS:
            raise PmlError(f"model.name={model} and no CUDA GPU is visible: it would run on the CPU in "
                           f"fp32, many times slower; use a GPU node, or set train.device=cpu to run "
                           f"on the CPU anyway")
        return "cpu", None
    if device_count == local_world_size:
        return "cuda", local_rank
    if device_count == 1:
        return "cuda", 0
    raise PmlError(f"{local_world_size} local ranks on this node but {device_count} visible GPUs "
                   f"(local rank {local_rank}): start one rank per GPU, or bind one GPU to each rank "
                   f"(srun --gpus-per-task=1 or --gpu-bind, CUDA_VISIBLE_DEVICES)")


def promised_gpus(env: dict[str, str] | None = None) -> int:
    """GPUs Slurm allocated to this job on this node (SLURM_GPUS_ON_NODE, else the index list
    SLURM_STEP_GPUS / SLURM_JOB_GPUS); 0 outside Slurm or without a GPU request."""
    env = os.environ if env is None else env
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    ids = env.get("SLURM_STEP_GPUS") or env.get("SLURM_JOB_GPUS") or ""
    return len([i for i in ids.split(",") if i.strip()])


def compute_device(info: RankInfo, requested: str = "auto", model: str = ""):
    """choose_device for this process, as a torch.device. train.device=cpu does not touch CUDA."""
    import torch

    count = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
    kind, index = choose_device(requested, count, info.local_rank, info.local_world_size, model,
                                promised=promised_gpus() if requested != "cpu" else 0)
    return torch.device(kind) if index is None else torch.device(kind, index)


def init_process_group(info: RankInfo, timeout_s: float = 600.0, device=None, store=None):
    """Export the environment, make `device` (compute_device's choice by default) this process's
    current GPU, pick the backend (nccl on GPUs, gloo on CPU) and initialise torch's process group,
    on `store` when given (the launch's, which start_gate.StartGate already opened), else by env://.
    Returns the device this rank computes on."""
    import datetime

    import torch
    import torch.distributed as tdist

    export_torch_env(info)
    device = compute_device(info) if device is None else device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        if store is not None:  # keyed apart from the store's other users, as env:// does it
            store = tdist.PrefixStore("default_pg", store)
        tdist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s), store=store,
        )
        if device.type == "cuda" and info.world_size > 1:
            check_distinct_gpus(info, device)
    return device


def destroy_process_group() -> None:
    """The end of a process's collectives: NCCL's communicators are freed (torch warns at exit about a
    group never destroyed, and leaks its resources where a process goes on after training)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def check_distinct_gpus(info: RankInfo, device) -> None:
    """Collective: an error naming the ranks when two of them compute on one GPU. Counting visible
    GPUs cannot tell "one GPU bound to each task" from "two tasks on a one-GPU node" (each sees one
    GPU either way); the GPUs' UUIDs can. Exchanged over a gloo group (the TCP store), before NCCL
    builds a communicator, which would fail with "Duplicate GPU detected" mid-traceback."""
    import socket

    import torch
    import torch.distributed as tdist

    group = tdist.new_group(backend="gloo")
    mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
    everyone: list = [None] * info.world_size
    tdist.all_gather_object(everyone, mine, group=group)
    tdist.destroy_process_group(group)
    first: dict = {}
    for rank, key in enumerate(everyone):
        if key in first:
            raise PmlError(f"ranks {first[key]} and {rank} both compute on GPU {key[1]} of {key[0]} "
                           f"(NCCL needs one GPU per rank): start one rank per GPU on each node")
        first[key] = rank


# The variables a rank's start line shows (besides slurm.env's): what steers communication and threads.
ENV_PREFIXES = ("NCCL_", "GLOO_", "TORCH_NCCL_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "PML_DIST_")


def rank_summary(info: RankInfo, device, threads: int, backend: str, env_names=()) -> str:
    """One line each rank logs at start: where it runs and on what, so a wrong binding or a shared
    GPU is visible in the first lines of every rank's log; with the communication variables and
    `env_names` (slurm.env's) as this process sees them."""
    import socket

    import torch

    mask = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    gpu = "no GPU"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"GPU {device} {props.name} {props.uuid}"
    env = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                   if k.startswith(ENV_PREFIXES) or k in set(env_names))
    return (f"rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
            f"({info.source}) on {socket.gethostname()}: CPUs {_ranges(mask)} ({len(mask)}), "
            f"{threads} threads; {gpu}; backend {backend}, master {info.master_addr}:{info.master_port} "
            f"via {_interface(info.master_addr)}" + (f"; {env}" if env else ""))



def _ranges(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, start = [], None
    for i, c in enumerate(cpus):
        if start is None:
            start = c
        if i + 1 == len(cpus) or cpus[i + 1] != c + 1:
            out.append(f"{start}-{c}" if c != start else str(c))
            start = None
    return ",".join(out) or "?"


def _interface(master_addr: str) -> str:
    """The network interface this host reaches the master through (NCCL/gloo pick theirs from
    NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME when set, which the summary's env part shows)."""
    import fcntl
    import socket
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master_addr, 9))  # UDP: no packet is sent, only a route is chosen
            local = s.getsockname()[0]
            for _, name in socket.if_nameindex():
                req = struct.pack("256s", name.encode()[:15])
                try:
                    addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
                except OSError:
                    continue
                if addr == local:
                    return f"{name} ({local})"
            return local
    except OSError as exc:
        return f"unknown ({exc.strerror or exc})"


# ------------------------------------------------------------------ one rank's failure, told to the others

FAILED_FILE = "failed-rank-{rank}.txt"  # in the stage's logs/ folder, beside rank-R.log
_COLLECTIVE_WORDS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "timed out",
                     "timeout")


def stopped_because(rank: int, failed: int, line: str) -> str:
    """The one line rank `rank` stops with when rank `failed` stopped with `line` first."""
    return f"rank {rank}: stopped because rank {failed} failed: {line}"


def is_collective_failure(exc: BaseException) -> bool:
    """True when `exc` is a collective (or the store) failing because another rank went away:
    torch's DistError family, or the RuntimeError gloo raises ("Connection closed by peer")."""
    import torch.distributed as tdist

    if isinstance(exc, getattr(tdist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in _COLLECTIVE_WORDS)


class PeerFailures:
    """The one line a rank stopped with, where the other ranks of its run can read it: a rank that
    stops with a user error writes `logs/failed-rank-R.txt`, then exits; the others, whose next
    collective then fails, find it and stop with one line naming it instead of a gloo traceback.

    Where a peer's exit does not fail the collectives (NCCL), `watch` ends the waiting ranks.

    A file, not the process group's store: rank 0 hosts the store, which dies with it. Each rank
    deletes its own file as it passes the start gate (pml_dist/start_gate.py), rank 0 last; a rank
    reads the others' only once past it: so a line it finds is this run's, never a stale one of an
    earlier attempt."""

    def __init__(self, folder, rank: int, world_size: int, release=None):
        from pathlib import Path

        self.folder, self.rank, self.world_size = Path(folder), rank, world_size
        self.release = release  # what `watch` calls before it ends the process (a lock's release)
        self._stopped = None  # set by `unwatch`

    def _file(self, rank: int):
        return self.folder / FAILED_FILE.format(rank=rank)

    def clear(self) -> None:
        """Before joining the process group: this rank's line of an earlier attempt goes."""
        try:
            self._file(self.rank).unlink(missing_ok=True)
        except OSError:
            pass

    def publish(self, line: str) -> None:
        """This rank stops with `line` (one line). Best effort: a full disk may refuse even this
        (a checkpoint save that ran out of space has deleted its half-written folder first)."""
        path = self._file(self.rank)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(" ".join(line.split()) + "\n")
            os.replace(tmp, path)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass

    def watch(self, prefix: str, interval_s: float = 5.0) -> None:
        """From now on (every rank has joined, so has passed the gate), a daemon thread looks for a
        peer's published failure every `interval_s` and, finding one, ends this process with
        `<prefix>rank R: stopped because rank Q failed: <line>` on stderr, exit 2, after calling
        `release`. For NCCL, whose collectives do not fail when a peer exits but wait for
        dist.timeout_s: the main thread, blocked inside one, cannot act. Gloo's collectives fail at
        once, and the main thread says the same line first. One directory listing per poll, not
        one stat per rank: a large job's shared file system sees one request per rank every
        `interval_s`."""
        import sys
        import threading

        self._stopped = threading.Event()

        def poll() -> None:
            while not self._stopped.wait(interval_s):
                try:
                    names = [e.name for e in os.scandir(self.folder) if e.name.startswith("failed-rank-")]
                except OSError:
                    continue
                if any(n != self._file(self.rank).name for n in names):
                    found = self.first(wait_s=0)
                    if found is not None and not self._stopped.is_set():
                        break
            else:
                return  # unwatched: the training ended, or its main thread handles the failure
            line = stopped_because(self.rank, *found)
            logging.getLogger(__name__).error("%s", line)
            print(prefix + line, file=sys.stderr, flush=True)
            try:
                if self.release is not None:
                    self.release()
            finally:
                os._exit(2)

        threading.Thread(target=poll, name="peer-failures", daemon=True).start()

    def unwatch(self) -> None:
        """Stop watching: the training ended (a process may go on to train another stage), or its
        main thread is handling a failure and says the line itself (once, not twice)."""
        if self._stopped is not None:
            self._stopped.set()

    def first(self, wait_s: float = 2.0) -> tuple[int, str] | None:
        """(rank, line) of the lowest other rank that published a failure, waiting up to `wait_s`
        for one (a shared file system may show a file a moment after its writer's exit closed the
        connections); None when no rank did (a crash: its traceback stands)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank in range(self.world_size):
                if rank == self.rank:
                    continue
                try:
                    line = self._file(rank).read_text().strip()
                except OSError:
                    continue
                if line:
                    return rank, line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

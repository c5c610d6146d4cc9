"""The rank resolver under each launcher's environment (patched variables), and the thread counts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pml_dist.dist import choose_device, compute_device, expand_nodelist, promised_gpus, resolve
from pml_dist.errors import PmlError

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node-a", "MASTER_PORT": "29400"}
SLURM = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8",
         "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_JOB_ID": "123456", "SLURM_TASKS_PER_NODE": "2(x4)"}


def test_torchrun_environment():
    info = resolve(TORCHRUN)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 8, 1, 2)
    assert (info.master_addr, info.master_port, info.source) == ("node-a", 29400, "torchrun")


def test_complete_torchrun_environment_wins_over_slurm():
    """torchrun inside a Slurm allocation: its variables describe the real process layout."""
    assert resolve({**SLURM, **TORCHRUN}).source == "torchrun"


def test_slurm_environment_master_is_the_first_node_and_port_follows_the_job():
    info = resolve(SLURM)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 2)
    assert info.master_addr == "gpu07" and info.source == "slurm"
    # consecutive jobs (which may share a master node) get different ports, and none is in Linux's
    # ephemeral range (32768-60999), where the kernel may have handed it to another program
    ports = [resolve({**SLURM, "SLURM_JOB_ID": str(job)}).master_port for job in range(123456, 133456)]
    assert len(set(ports)) == len(ports) and info.master_port == ports[0]
    assert 1024 < min(ports) and max(ports) < 32768


def test_threads_per_rank_follow_what_slurm_gave_each_task(monkeypatch):
    """Under CPU binding a task's mask is already its own (do not divide it again by the local
    ranks); without binding the local ranks share the node's mask; SLURM_CPUS_PER_TASK caps both."""
    from ffcv_data import loaders

    monkeypatch.setattr(loaders, "usable_cores", lambda: 8)
    bound = {"SLURM_CPUS_ON_NODE": "32", "SLURM_CPUS_PER_TASK": "8"}  # 4 tasks x 8, each bound
    assert loaders.threads_per_rank(0, 4, bound) == 8
    shared = {"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "2"}  # 4 tasks x 2, no binding
    assert loaders.threads_per_rank(0, 4, shared) == 2
    assert loaders.threads_per_rank(0, 4, {}) == 2  # torchrun: 4 ranks share the 8 cores
    assert loaders.threads_per_rank(0, 1, {"SLURM_CPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "4"}) == 4
    assert loaders.threads_per_rank(3, 4, bound) == 3  # data.loader_workers, as given


def test_thread_counts_ignore_omp_num_threads():
    """HPC login nodes often export OMP_NUM_THREADS=1: the cores a rank uses are its CPU mask (and
    Slurm's allocation), never what that variable says."""
    probe = ("import os, torch; from ffcv_data.loaders import threads_per_rank; "
             "print(threads_per_rank(0, 1, {}), len(os.sched_getaffinity(0)))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for key in [k for k in env if k.startswith("SLURM_")]:
        del env[key]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    threads, cores = map(int, out.stdout.split())
    assert threads == cores


def test_no_launcher_is_one_process():
    info = resolve({})
    assert (info.rank, info.world_size, info.local_rank, info.source) == (0, 1, 0, "single")


@pytest.mark.parametrize("missing", ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK"])
def test_partial_torchrun_environment_names_what_is_missing(missing):
    env = {k: v for k, v in TORCHRUN.items() if k != missing}
    with pytest.raises(PmlError, match=f"incomplete torch distributed environment: .* {missing} missing"):
        resolve(env)


@pytest.mark.parametrize("missing", ["SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID"])
def test_partial_slurm_environment_names_what_is_missing(missing):
    env = {k: v for k, v in SLURM.items() if k != missing}
    with pytest.raises(PmlError, match=f"incomplete Slurm environment: {missing} missing"):
        resolve(env)


def test_inconsistent_values_are_errors():
    with pytest.raises(PmlError, match="rank 8 is outside world size 8"):
        resolve({**TORCHRUN, "RANK": "8"})
    with pytest.raises(PmlError, match="RANK='x' is not an integer"):
        resolve({**TORCHRUN, "RANK": "x"})


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-10],b7,c[1,3]", ["a8", "a9", "a10", "b7", "c1", "c3"]),
        ("rack1-n[001-002]", ["rack1-n001", "rack1-n002"]),
        ("localhost,myhost", ["localhost", "myhost"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_the_deepspeed_launcher_names_the_local_world_size_local_size():
    env = {k: v for k, v in TORCHRUN.items() if k != "LOCAL_WORLD_SIZE"}
    assert resolve({**env, "LOCAL_SIZE": "4"}).local_world_size == 4
    assert resolve(env).local_world_size == 8  # neither: every rank on this node


# ------------------------------------------------------------------------------ the device choice


@pytest.mark.parametrize("requested, gpus, local_rank, local_world, expected", [
    ("auto", 4, 2, 4, ("cuda", 2)),  # each rank sees the node's GPUs: one per local rank
    ("cuda", 4, 3, 4, ("cuda", 3)),
    ("auto", 1, 3, 4, ("cuda", 0)),  # --gpus-per-task=1 / --gpu-bind: the one GPU bound to the task
    ("auto", 1, 0, 1, ("cuda", 0)),
    ("auto", 0, 1, 2, ("cpu", None)),  # no CUDA, a small model: today's CPU runs
    ("cpu", 8, 5, 8, ("cpu", None)),  # asked for: CUDA is never touched
    ("cpu", 0, 0, 1, ("cpu", None)),
])
def test_device_choice(requested, gpus, local_rank, local_world, expected):
    assert choose_device(requested, gpus, local_rank, local_world, "small_resnet") == expected


@pytest.mark.parametrize("gpus, local_world", [(2, 3), (8, 4), (2, 1)])
def test_ranks_and_gpus_that_do_not_match_are_one_line_errors(gpus, local_world):
    message = f"{local_world} local ranks on this node but {gpus} visible GPUs"
    with pytest.raises(PmlError, match=message) as err:
        choose_device("auto", gpus, 0, local_world)
    assert "\n" not in str(err.value) and "--gpus-per-task" in str(err.value)


def test_no_silent_cpu_for_gpu_models_or_when_cuda_is_asked_for():
    with pytest.raises(PmlError, match="train.device=cuda, but this process sees no CUDA GPU"):
        choose_device("cuda", 0, 0, 1, "small_resnet")
    for model in ("resnet18", "resnet50"):
        with pytest.raises(PmlError, match=f"model.name={model} and no CUDA GPU .* set train.device=cpu"):
            choose_device("auto", 0, 0, 1, model)
        assert choose_device("cpu", 0, 0, 1, model) == ("cpu", None)
    with pytest.raises(PmlError, match="'train.device' must be one of auto, cuda, cpu, got 'gpu'"):
        choose_device("gpu", 1, 0, 1)


def test_a_gpu_slurm_gave_but_torch_cannot_see_is_an_error():
    """A CPU-only torch in a GPU job (or setup lines that reset CUDA_VISIBLE_DEVICES) must not train
    on the CPU for days: the rank names what it was promised."""
    assert promised_gpus({"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_GPUS": "0,1"}) == 4
    assert promised_gpus({"SLURM_STEP_GPUS": "2,3"}) == 2 and promised_gpus({}) == 0
    with pytest.raises(PmlError, match="local rank 1: Slurm gave this job 2 GPU.* torch sees none"):
        choose_device("auto", 0, 1, 2, "small_resnet", promised=2)
    assert choose_device("cpu", 0, 1, 2, "small_resnet", promised=2) == ("cpu", None)  # as asked


def test_compute_device_on_cpu_does_not_ask_cuda(monkeypatch):
    import torch

    def no_cuda():
        raise AssertionError("train.device=cpu must not touch CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    assert compute_device(resolve(TORCHRUN), "cpu", "resnet50") == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_choice_on_the_real_gpu():
    """One visible GPU: cuda:0 for a single process and for any rank bound to that GPU (the
    ordinal DeepSpeed would have taken, cuda:LOCAL_RANK, does not exist for local rank 1)."""
    if torch.cuda.device_count() != 1:
        pytest.skip(f"needs exactly one visible GPU, this process sees {torch.cuda.device_count()}")
    single = resolve({})
    bound = resolve({**TORCHRUN, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    for info in (single, bound):
        device = compute_device(info, "auto", "resnet50")
        assert device == torch.device("cuda", 0)
        assert torch.ones(2, device=device).sum().item() == 2.0  # a real, usable device
    assert compute_device(bound, "cpu") == torch.device("cpu")

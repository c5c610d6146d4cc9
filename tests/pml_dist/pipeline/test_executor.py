"""The `slurm` section as sbatch scripts (submitit's own text, no Slurm needed): training stages and
CPU stages get their own partition, QOS, memory and extra options, GPUs only where training runs,
and every job the site's setup lines and environment."""

from __future__ import annotations

import re

import pytest

from pml_dist.config import load_config
from pml_dist.errors import ConfigError
from pml_dist.pipeline.executor import make_executor, resources, script_text

SITE = ["slurm.partition=gpu", "slurm.qos=gpu-normal", "slurm.gres=gpu:a100:2", "slurm.mem_gb=200",
        "slurm.cpus_per_task=8", "slurm.extra=[exclusive,constraint=a100]",
        "slurm.srun_extra=[--cpu-bind=cores]", "slurm.cpu_partition=cpu", "slurm.cpu_qos=cpu-normal",
        "slurm.cpu_mem_gb=16", "slurm.cpu_cpus_per_task=4", "slurm.cpu_extra=[constraint=skylake]",
        "slurm.account=proj42",
        "slurm.setup=[module load cuda/12.4, source /opt/pml/bin/activate]",
        "slurm.env=[NCCL_SOCKET_IFNAME=ib0, NCCL_DEBUG=WARN]",
        "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=2", "slurm.student_tasks_per_node=2"]


def script(tmp_path, kind: str, overrides=(), after=()) -> tuple[dict[str, str], str]:
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", *SITE, *overrides])
    text = script_text(make_executor(cfg, "slurm", kind, resources(cfg, kind), after=list(after)))
    options = dict(re.findall(r"(?m)^#SBATCH --([\w-]+)(?:=(.*))?$", text))
    return options, text


def test_training_and_cpu_stages_each_get_their_own_site_options(tmp_path):
    teacher, text = script(tmp_path, "teacher", after=["41"])
    assert {k: teacher[k] for k in ("partition", "qos", "gres", "mem", "cpus-per-task", "constraint",
                                    "account", "ntasks-per-node", "dependency")} == {
        "partition": "gpu", "qos": "gpu-normal", "gres": "gpu:a100:2", "mem": "200G", "cpus-per-task": "8",
        "constraint": "a100", "account": "proj42", "ntasks-per-node": "2", "dependency": "afterok:41"}
    assert "exclusive" in teacher and "requeue" in teacher
    assert re.search(r"(?m)^srun .*--cpu-bind=cores", text)

    cpu, text = script(tmp_path, "cpu")
    assert {k: cpu[k] for k in ("partition", "qos", "mem", "cpus-per-task", "constraint", "account")} == {
        "partition": "cpu", "qos": "cpu-normal", "mem": "16G", "cpus-per-task": "4", "constraint": "skylake",
        "account": "proj42"}
    assert not {"gres", "gpus-per-node", "exclusive"} & set(cpu)  # nothing of the GPU request
    assert "--cpu-bind" not in text


def test_every_job_runs_the_setup_lines_and_the_environment_before_python(tmp_path):
    for kind in ("teacher", "cpu"):
        _, text = script(tmp_path, kind)
        setup = text.index("module load cuda/12.4")
        assert setup < text.index("source /opt/pml/bin/activate") < text.index("-m submitit.core._submit")
        assert "export NCCL_SOCKET_IFNAME=ib0" in text and "export NCCL_DEBUG=WARN" in text
        # srun (Slurm >= 22.05) does not inherit sbatch's --cpus-per-task: handed on explicitly
        assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text


def test_site_defaults_leave_partition_and_gpus_to_the_cluster(tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}"])
    options = dict(re.findall(r"(?m)^#SBATCH --([\w-]+)(?:=(.*))?$", script_text(
        make_executor(cfg, "slurm", "teacher", resources(cfg, "teacher")))))
    assert not {"partition", "qos", "account", "gres", "gpus-per-node", "mem"} & set(options)


@pytest.mark.parametrize("override, message", [
    (["slurm.gpus_per_node=2", "slurm.infer_tasks_per_node=2", "slurm.student_tasks_per_node=1"],
     "'slurm.student_tasks_per_node' is 1 but each node gets 2 GPUs"),
    (["slurm.gres=gpu:a100:2"], "'slurm.infer_tasks_per_node' is 1 but each node gets 2 GPUs"),
    (["slurm.gres=gpu:2", "slurm.gpus_per_node=2"], "'slurm.gres' and slurm.gpus_per_node both"),
    (["slurm.env=[NCCL DEBUG=1]"], "'slurm.env' entries must look like NAME=value"),
    (["slurm.extra=[--exclusive]"], "'slurm.extra' entries must look like key=value or flag"),
    (["slurm.srun_extra=[cpu-bind=cores]"], "'slurm.srun_extra' entries must be srun options"),
])
def test_site_keys_that_cannot_work_are_one_line_errors(tmp_path, override, message):
    base = [f"run.dir={tmp_path / 'run'}", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=1",
            "slurm.student_tasks_per_node=2"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*base, *override])


def local_parameters(tmp_path, monkeypatch, kind: str, overrides=(), device_count=1) -> dict:
    """What submitit's local executor receives for one stage, with `device_count` GPUs visible here."""
    from pml_dist.pipeline import executor as module

    monkeypatch.setattr(module, "visible_gpu_count", lambda: device_count)
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", *overrides])
    return dict(make_executor(cfg, "local", kind, resources(cfg, kind))._executor.parameters)


def test_local_gpu_stages_get_one_gpu_per_training_rank_and_cpu_stages_none(tmp_path, monkeypatch, caplog):
    # submitit's local executor sets CUDA_VISIBLE_DEVICES="" unless gpus_per_node is given: training
    # gets one GPU per local rank (NCCL), inference every visible GPU, a CPU stage none.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def gpus(kind: str, device: str, visible: int, ranks: int = 2):
        tasks = [f"slurm.{k}_tasks_per_node={ranks}" for k in ("teacher", "infer", "student")]
        params = local_parameters(tmp_path, monkeypatch, kind, [f"train.device={device}", *tasks], visible)
        return params.get("gpus_per_node")

    for kind in ("teacher", "student"):
        assert gpus(kind, "auto", 8) == gpus(kind, "cuda", 8) == 2
        assert gpus(kind, "auto", 1, ranks=1) == 1
        assert gpus(kind, "cuda", 1) == 1  # the rank's device check then names 2 ranks and 1 GPU
    assert gpus("infer", "auto", 8) == 8 and gpus("infer", "auto", 1) == 1  # ranks may share a GPU
    for kind in ("teacher", "infer", "student"):
        assert gpus(kind, "cpu", 2) is None
        assert gpus(kind, "auto", 0) is None
    assert gpus("cpu", "cuda", 2) is None

    # the demo preset's 2 training ranks on a one-GPU workstation: auto trains on the CPU and says so
    with caplog.at_level("INFO"):
        assert gpus("teacher", "auto", 1) is None
    assert "set slurm.teacher_tasks_per_node=1 to train on the GPUs" in caplog.text


def test_local_gpu_stages_keep_a_narrowed_cuda_visible_devices(tmp_path, monkeypatch):
    # submitit counts from physical GPU 0; a user who chose GPUs 3 and 5 (or by UUID) must keep them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-5e1f,3,5")
    params = local_parameters(tmp_path, monkeypatch, "teacher",
                              ["train.device=cuda", "slurm.teacher_tasks_per_node=2"], device_count=3)
    assert params["gpus_per_node"] == 2
    assert params["setup"] == ["export CUDA_VISIBLE_DEVICES=GPU-5e1f,3"]

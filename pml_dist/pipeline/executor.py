"""submitit executors with a stage's resources: the `slurm` config section turned into sbatch
parameters and job setup lines in one place (the plain sbatch scripts read the same lines through
`pml-dist job-env`)."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass

from pml_dist.config import Config
from pml_dist.layout import RunLayout

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    tasks_per_node: int = 1
    time_min: int = 60
    gpus: bool = False  # a training stage: the plain slurm keys and the GPUs; else the cpu_ keys
    kind: str = "cpu"  # teacher, infer, student or cpu


def resources(cfg: Config, kind: str) -> Resources:
    """`teacher`, `infer` and `student` read slurm.<kind>_nodes / _tasks_per_node / _time_min and get
    GPUs; `cpu` (prepare, selection, merge, report) is one task for slurm.cpu_time_min."""
    s = cfg.slurm
    if kind == "cpu":
        return Resources(1, 1, s.cpu_time_min)
    return Resources(getattr(s, f"{kind}_nodes"), getattr(s, f"{kind}_tasks_per_node"),
                     getattr(s, f"{kind}_time_min"), gpus=True, kind=kind)


def job_setup_lines(cfg: Config) -> list[str]:
    """Shell lines every Slurm job runs before Python starts: the site's slurm.setup (module load,
    conda activate), slurm.env exported, and for srun: cpus-per-task handed on (since Slurm 22.05
    srun no longer inherits it from sbatch, and its tasks would get one CPU each), and the job's
    environment passed to the tasks even under `sbatch --export=NONE` (which sets
    SLURM_EXPORT_ENV=NONE for srun too, and the tasks would lose everything set up here)."""
    lines = list(cfg.slurm.setup)
    for item in cfg.slurm.env:
        name, _, value = item.partition("=")
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append('[ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK')
    lines.append("unset SLURM_EXPORT_ENV")
    return lines


def sbatch_options(cfg: Config, res: Resources) -> dict[str, str | bool]:
    """The site keys of one job as sbatch long options (name without dashes -> value, True for a
    flag): partition, qos, account, memory, CPUs and GPUs of a training or a CPU stage."""
    s = cfg.slurm
    if res.gpus:
        opts = {"partition": s.partition, "qos": s.qos, "cpus-per-task": s.cpus_per_task,
                "mem": f"{s.mem_gb}G" if s.mem_gb else "", "gres": s.gres,
                "gpus-per-node": s.gpus_per_node or ""}
        extra = s.extra
    else:
        opts = {"partition": s.cpu_partition, "qos": s.cpu_qos,
                "cpus-per-task": s.cpu_cpus_per_task or s.cpus_per_task,
                "mem": f"{s.cpu_mem_gb}G" if s.cpu_mem_gb else ""}
        extra = s.cpu_extra
    opts["account"] = s.account
    if s.requeue:
        opts["requeue"] = True
    opts = {k: v for k, v in opts.items() if v not in ("", 0)}
    for item in extra:
        key, sep, value = item.partition("=")
        opts[key] = value if sep else True
    return opts


def visible_gpu_count() -> int:
    """The CUDA GPUs this process sees (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_gpu_parameters(cfg: Config, res: Resources, environ=None, device_count=None) -> dict:
    """submitit's local executor starts every job with CUDA_VISIBLE_DEVICES set to the ordinals
    0..gpus_per_node-1, and to "" (no GPU at all) when gpus_per_node is not given. So a stage that
    trains or scores on CUDA (a GPU stage, train.device not cpu) is given GPUs of those this process
    sees: training one per local rank (NCCL wants that), inference all of them (its ranks may share
    one). Where CUDA_VISIBLE_DEVICES already narrows them (a workstation's second GPU, UUIDs), the
    job's setup line exports the chosen entries of it, since submitit would count from physical GPU 0.

    Without a visible GPU nothing is set: the stage itself then says what is missing (cuda) or runs on
    the CPU (auto). With fewer GPUs than training ranks (the demo preset's 2 ranks on a one-GPU
    workstation), auto trains on the CPU, as it promises, with a line saying how to use the GPU;
    cuda is given every GPU and the rank's own device check names the mismatch."""
    if not res.gpus or cfg.train.device == "cpu":
        return {}
    count = visible_gpu_count() if device_count is None else device_count
    if count == 0:
        return {}
    n = count
    if res.kind != "infer":
        if count >= res.tasks_per_node:
            n = res.tasks_per_node
        elif cfg.train.device == "auto":
            log.info("%s: %d training ranks and %d visible GPU(s): training on the CPU (train.device=auto); "
                     "set slurm.%s_tasks_per_node=%d to train on the GPUs", res.kind, res.tasks_per_node,
                     count, res.kind, count)
            return {}
    params: dict = {"gpus_per_node": n}
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        chosen = ",".join(visible.split(",")[:n])
        params["local_setup"] = [f"export CUDA_VISIBLE_DEVICES={shlex.quote(chosen)}"]
    return params


def make_executor(cfg: Config, kind: str, name: str, res: Resources, after: list[str] = ()):
    """A submitit executor (`kind`: slurm or local) for job `name`, `afterok` on the job ids `after`."""
    import submitit

    from pml_dist.training.stop import deferred_python

    s = cfg.slurm
    # a Slurm job's Python starts with the stop signals deferred (training/stop.py, pipeline/jobs.py)
    requeues = {"slurm_max_num_timeout": s.max_requeues,
                "slurm_python": deferred_python(shlex.quote(sys.executable))} if kind == "slurm" else {}
    executor = submitit.AutoExecutor(folder=RunLayout.of(cfg).submitit_logs / "%j", cluster=kind, **requeues)
    params = {"name": f"pml-{name.replace('/', '-')}", "timeout_min": res.time_min,
              "tasks_per_node": res.tasks_per_node, "nodes": res.nodes}
    if kind == "slurm":
        opts = sbatch_options(cfg, res)  # as additional parameters: submitit writes them verbatim
        if after:
            opts["dependency"] = "afterok:" + ":".join(after)
            opts["kill-on-invalid-dep"] = "yes"  # a failed upstream cancels, never strands, this job
        params.update(
            slurm_signal_delay_s=s.signal_delay_s,
            slurm_setup=job_setup_lines(cfg),
            slurm_srun_args=list(s.srun_extra) if res.gpus else [],
            slurm_additional_parameters=opts,
        )
        if s.array_parallelism:
            params["slurm_array_parallelism"] = s.array_parallelism
    elif kind == "local":
        params.update(local_gpu_parameters(cfg, res))
    executor.update_parameters(**params)
    return executor


def script_text(executor, array_size: int = 0) -> str:
    """The sbatch script submitit would submit for this executor (an array of `array_size` tasks
    when > 0), for `pml-dist run --dry-run` and its `sbatch --test-only` check."""
    slurm = executor._executor  # submitit's SlurmExecutor inside the AutoExecutor
    params = dict(slurm.parameters)
    if array_size:
        params["map_count"] = array_size
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command=slurm._submitit_command_str, folder=slurm.folder, **params)

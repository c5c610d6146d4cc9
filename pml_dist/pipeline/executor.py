"""submitit executors with a stage's resources: the `slurm` config section turned into sbatch
parameters in one place."""

from __future__ import annotations

from dataclasses import dataclass

from pml_dist.config import Config
from pml_dist.layout import RunLayout


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    tasks_per_node: int = 1
    time_min: int = 60
    gpus: bool = False  # ask for slurm.gpus_per_node GPUs per node


def resources(cfg: Config, kind: str) -> Resources:
    """`teacher`, `infer` and `student` read slurm.<kind>_nodes / _tasks_per_node / _time_min and get
    GPUs; `cpu` (prepare, merge, report) is one task for slurm.cpu_time_min."""
    s = cfg.slurm
    if kind == "cpu":
        return Resources(1, 1, s.cpu_time_min)
    return Resources(getattr(s, f"{kind}_nodes"), getattr(s, f"{kind}_tasks_per_node"),
                     getattr(s, f"{kind}_time_min"), gpus=True)


def make_executor(cfg: Config, kind: str, name: str, res: Resources, after: list[str] = ()):
    """A submitit executor (`kind`: slurm or local) for job `name`, `afterok` on the job ids `after`."""
    import submitit

    s = cfg.slurm
    requeues = {"slurm_max_num_timeout": s.max_requeues} if kind == "slurm" else {}
    executor = submitit.AutoExecutor(folder=RunLayout.of(cfg).submitit_logs / "%j", cluster=kind, **requeues)
    params = {"name": f"pml-{name.replace('/', '-')}", "timeout_min": res.time_min,
              "tasks_per_node": res.tasks_per_node, "nodes": res.nodes}
    if res.gpus and s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if kind == "slurm":
        extra = dict(e.split("=", 1) for e in s.extra)
        if after:
            extra["dependency"] = "afterok:" + ":".join(after)
            extra["kill-on-invalid-dep"] = "yes"  # a failed upstream cancels, never strands, this job
        for key in ("account", "qos"):
            if getattr(s, key):
                extra[key] = getattr(s, key)
        params.update(
            cpus_per_task=s.cpus_per_task,
            slurm_signal_delay_s=s.signal_delay_s,
            slurm_additional_parameters=extra,
        )
        if s.partition:
            params["slurm_partition"] = s.partition
        if s.mem_gb:
            params["mem_gb"] = s.mem_gb
        if s.array_parallelism:
            params["slurm_array_parallelism"] = s.array_parallelism
    executor.update_parameters(**params)
    return executor

"""`pml-dist run`: the pipeline as one dependency graph of submitit jobs; `pml-dist status`.

    prepare (CPU) -> teacher (N nodes x T tasks) -> infer (its own nodes/tasks) -> merge (CPU)
        -> students (one job array, one task per pseudo-label target)

On Slurm everything is submitted at once, each job `afterok` on the previous one, and the command
returns (or waits with --wait). Locally (submitit's local executor, the default without Slurm) the
same jobs run one after the other. Finished stages are not submitted again: resubmitting a config
skips done students and resumes unfinished ones. Job ids and log paths go to `<run>/jobs.json`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import time

from pml_dist import layout
from pml_dist.atomic import write_json
from pml_dist.config import Config
from pml_dist.errors import PmlError
from pml_dist.jobs import InferJob, MergeJob, PrepareJob, ReportJob, TrainJob

log = logging.getLogger(__name__)
TERMINAL_OK = {"COMPLETED"}
TERMINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def slurm_available() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def students(cfg: Config) -> list[str]:
    from pml_dist.pseudo import target_names

    return target_names(cfg.pseudo.taus, cfg.pseudo.modes)


def done(cfg: Config, stage: str, target: str | None = None) -> bool:
    """Whether a stage's output is complete, from the run directory alone."""
    run = cfg.run_dir
    if stage == "prepare":
        return (run / "data" / "stats.json").is_file()
    if stage == "teacher":
        return (layout.teacher_dir(run) / "result.json").is_file()
    if stage in ("infer", "merge"):
        merged = layout.pseudo_dir(run) / "merge.json"
        if not (merged.is_file() and (layout.pseudo_dir(run) / "stats.json").is_file()):
            return False
        from pml_dist.infer import teacher_id

        return json.loads(merged.read_text()).get("teacher_id") == teacher_id(cfg)
    if stage == "student":
        return (layout.student_dir(run, target) / "result.json").is_file()
    if stage == "reference":
        return (layout.reference_dir(run, target) / "result.json").is_file()
    raise ValueError(stage)


def max_array_size() -> int:
    """The cluster's MaxArraySize (an array may hold indices 0..MaxArraySize-1)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    for line in out.splitlines():
        if line.split("=")[0].strip() == "MaxArraySize":
            return int(line.split("=")[1])
    return 1001


class Submitter:
    """Builds one executor per stage with that stage's resources (from the `slurm` section)."""

    def __init__(self, cfg: Config, kind: str):
        self.cfg, self.kind = cfg, kind
        self.folder = cfg.run_dir / "logs" / "submitit"

    def executor(self, name: str, nodes: int, tasks: int, time_min: int, after: list[str] = (),
                 gpus: bool = False):
        import submitit

        s = self.cfg.slurm
        requeues = {"slurm_max_num_timeout": s.max_requeues} if self.kind == "slurm" else {}
        executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster=self.kind, **requeues)
        params = {"name": f"pml-{name}", "timeout_min": time_min, "tasks_per_node": tasks, "nodes": nodes}
        if gpus and s.gpus_per_node:
            params["gpus_per_node"] = s.gpus_per_node
        if self.kind == "slurm":
            extra = dict(e.split("=", 1) for e in s.extra)
            if after:
                extra["dependency"] = "afterok:" + ":".join(after)
                extra["kill-on-invalid-dep"] = "yes"  # a failed upstream cancels, never strands, this job
            for key in ("account", "qos"):
                if getattr(s, key):
                    extra[key] = getattr(s, key)
            params.update(cpus_per_task=s.cpus_per_task, slurm_signal_delay_s=s.signal_delay_s,
                          slurm_additional_parameters=extra)
            if s.partition:
                params["slurm_partition"] = s.partition
            if s.mem_gb:
                params["mem_gb"] = s.mem_gb
            if s.array_parallelism:
                params["slurm_array_parallelism"] = s.array_parallelism
        executor.update_parameters(**params)
        return executor


def run_pipeline(cfg: Config, kind: str, wait: bool) -> dict:
    """Submit (slurm) or run (local) every unfinished stage; returns the jobs record.
    The jobs read the run's resolved config (`write_resolved` must have written it)."""
    if kind == "slurm" and not slurm_available():
        raise PmlError("--executor slurm: no working Slurm here (sbatch/sinfo failed); use --executor local")
    sub = Submitter(cfg, kind)
    s = cfg.slurm
    record: dict = {"executor": kind, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {}}
    jobs: dict = {}
    after: list[str] = []
    local = kind == "local"
    # Which stages to (re)submit is decided from the run directory as it is now; on Slurm the later
    # stages cannot know yet, so a stage is submitted when it or any stage before it is unfinished.
    pending = False

    def submit(stage, job, nodes, tasks, time_min, gpus=False):
        nonlocal after
        executor = sub.executor(stage, nodes, tasks, time_min, after=after, gpus=gpus)
        j = executor.submit(job)
        jobs[stage] = j
        record["stages"][stage] = _job_record(j)
        log.info("%-8s job %s  log %s", stage, j.job_id, j.paths.stdout)
        _save_record(cfg, record)
        if local:
            _wait_one(stage, j)
            after = []
        else:
            after = [str(j.job_id)]

    args = (str(cfg.run_dir / "config.yaml"),)
    if not done(cfg, "prepare"):
        pending = True
        submit("prepare", PrepareJob(*args), 1, 1, s.cpu_time_min)
    after_prepare = list(after)
    if pending or not done(cfg, "teacher"):
        pending = True
        submit("teacher", TrainJob(*args, stage="teacher"), s.teacher_nodes, s.teacher_tasks_per_node,
               s.teacher_time_min, gpus=True)
    if pending or not done(cfg, "merge"):
        submit("infer", InferJob(*args), s.infer_nodes, s.infer_tasks_per_node, s.infer_time_min, gpus=True)
        submit("merge", MergeJob(*args), 1, 1, s.cpu_time_min)
    todo = [t for t in students(cfg) if not done(cfg, "student", t)]
    record["stages"]["students"] = {}
    if local:
        for target in todo:  # one at a time: each student uses every core of this machine
            submit_student = sub.executor(f"student-{target}", s.student_nodes, s.student_tasks_per_node,
                                          s.student_time_min, gpus=True)
            j = submit_student.submit(TrainJob(*args, stage="student"), target)
            record["stages"]["students"][target] = _job_record(j)
            _save_record(cfg, record)
            log.info("student %-12s job %s  log %s", target, j.job_id, j.paths.stdout)
            _wait_one(f"student {target}", j)
    elif todo:
        chunk = max_array_size()
        for start in range(0, len(todo), chunk):  # arrays above MaxArraySize are split
            part = todo[start:start + chunk]
            executor = sub.executor("students", s.student_nodes, s.student_tasks_per_node,
                                    s.student_time_min, after=after, gpus=True)
            array = executor.map_array(TrainJob(*args, stage="student"), part)
            for target, j in zip(part, array, strict=True):
                jobs[f"student:{target}"] = j
                record["stages"]["students"][target] = _job_record(j)
                log.info("student %-12s job %s  log %s", target, j.job_id, j.paths.stdout)
        _save_record(cfg, record)
    # Reference teachers (full BCE, EM, ...) need only the data: on Slurm they run beside the chain.
    record["stages"]["references"] = {}
    refs_after = []
    for loss in cfg.report.references:
        if loss == cfg.loss.name or done(cfg, "reference", loss):
            continue
        executor = sub.executor(f"reference-{loss}", s.teacher_nodes, s.teacher_tasks_per_node,
                                s.teacher_time_min, after=[] if local else after_prepare, gpus=True)
        j = executor.submit(TrainJob(*args, stage="reference", target=loss))
        jobs[f"reference:{loss}"] = j
        record["stages"]["references"][loss] = _job_record(j)
        _save_record(cfg, record)
        log.info("reference %-10s job %s  log %s", loss, j.job_id, j.paths.stdout)
        if local:
            _wait_one(f"reference {loss}", j)
        else:
            refs_after.append(str(j.job_id).split("_")[0])
    student_ids = sorted({str(j.job_id).split("_")[0] for n, j in jobs.items() if n.startswith("student:")})
    after = [*after, *refs_after, *student_ids] if not local else []
    submit("report", ReportJob(*args), 1, 1, s.cpu_time_min)
    if wait and not local:
        wait_for(cfg, jobs)
    return record


def _job_record(job) -> dict:
    return {"job_id": str(job.job_id), "stdout": str(job.paths.stdout), "stderr": str(job.paths.stderr)}


def _save_record(cfg: Config, record: dict) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_json(cfg.run_dir / "jobs.json", record)


def _wait_one(name: str, job) -> None:
    """Wait for a job and turn its failure into an error that names the stage and the log."""
    try:
        results = job.results()  # one result per task (multi-task jobs refuse .result())
    except Exception as exc:  # submitit wraps the job's traceback: name its last exception line
        errors = [ln.strip() for ln in str(exc).splitlines()
                  if re.match(r"\s*[\w.]+(Error|Exception): ", ln)]
        cause = errors[-1] if errors else type(exc).__name__
        raise PmlError(f"{name} (job {job.job_id}) failed: {cause}; log: {job.paths.stderr}") from None
    log.info("%-20s done: %s", name, results[0])


def wait_for(cfg: Config, jobs: dict, poll_s: float = 2.0) -> None:
    """Wait for every Slurm job, printing each state change; on the first failure cancel what
    depends on it and report the stage (the student's target) and its log."""
    states: dict[str, str] = {}
    while True:
        for name, job in jobs.items():
            state = job.state.split()[0] if job.state else "UNKNOWN"
            if states.get(name) != state:
                states[name] = state
                log.info("%-20s %s", name, state)
            if state in TERMINAL_BAD:
                rest = [j.job_id for n, j in jobs.items()
                        if states.get(n) not in TERMINAL_OK and j is not job]
                if rest:
                    subprocess.run(["scancel", *map(str, rest)], capture_output=True)
                raise PmlError(f"{name} (job {job.job_id}) ended {state}; log: {job.paths.stderr}")
        if all(states.get(n) in TERMINAL_OK for n in jobs):
            return
        time.sleep(poll_s)


def status(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage, state, detail) rows from the run directory and, for unfinished stages, Slurm."""
    jobs_file = cfg.run_dir / "jobs.json"
    record = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {"stages": {}}
    rows = []
    entries = [("prepare", None), ("teacher", None), ("merge", None)]
    entries += [("student", t) for t in students(cfg)]
    for stage, target in entries:
        name = target if target else stage
        job = record["stages"].get("students", {}).get(target) if target else record["stages"].get(stage)
        try:
            finished = done(cfg, stage, target)
        except PmlError:
            finished = False
        if finished:
            rows.append((name, "done", ""))
        elif job is None:
            rows.append((name, "not submitted", ""))
        else:
            state = _slurm_state(job["job_id"]) if record.get("executor") == "slurm" else "not done"
            detail = f"job {job['job_id']}"
            if state in TERMINAL_BAD or state == "not done":
                detail += f", log {job['stderr']}"
                if target:
                    detail += f", retry: pml-dist train --stage student {_student_flag(target)}"
            rows.append((name, state.lower() if state in TERMINAL_BAD else state, detail))
    return rows


def _student_flag(target: str) -> str:
    return f"--tau {target[4:]}" if target.startswith("tau-") else f"--pseudo {target}"


def _slurm_state(job_id: str) -> str:
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"],
                ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[0].upper()
    return "UNKNOWN"


def default_executor() -> str:
    return "slurm" if slurm_available() else "local"

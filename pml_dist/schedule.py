"""`pml-dist run`: the pipeline as one dependency graph of submitit jobs; `pml-dist status`.

    prepare (CPU) -> teacher (N nodes x T tasks) -> infer (its own nodes/tasks) -> merge (CPU)
        -> students (one job array, one task per pseudo-label target) -> report
    reference teachers beside the chain; the beyond chain (subruns.beyond_run) and each seed
    (subruns.seed_runs) are the same graph again in their own run directories

On Slurm everything is submitted at once, each job `afterok` on what it needs, and the command
returns (or waits with --wait, see `wait_for`). Locally (submitit's local executor, the default
without Slurm) the same jobs run one after the other. Finished stages are not submitted again, nor
are jobs Slurm still has queued or running: resubmitting a config retries what failed, skips done
students and resumes unfinished ones. Job ids and log paths go to `<run>/jobs.json`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import subprocess
import sys
import time

from pml_dist import layout
from pml_dist.atomic import write_json
from pml_dist.config import Config, write_resolved
from pml_dist.errors import PmlError
from pml_dist.jobs import InferJob, MergeJob, PrepareJob, ReportJob, TrainJob

log = logging.getLogger(__name__)
TERMINAL_OK = {"COMPLETED"}
TERMINAL_BAD = {
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


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
        return (cfg.data_dir / "stats.json").is_file()
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
        out = subprocess.run(
            ["scontrol", "show", "config"], capture_output=True, text=True, timeout=10
        ).stdout
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

    def executor(
        self, name: str, nodes: int, tasks: int, time_min: int, after: list[str] = (), gpus: bool = False
    ):
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


class Graph:
    """Submits (Slurm) or runs (local) the stages of one experiment and its sub-runs, each stage
    after the jobs it needs. A stage whose output is complete is skipped; on Slurm so is one whose
    job from an earlier submission is still queued or running (its id becomes the dependency), so
    resubmitting a config never starts a second copy of a job.

    Jobs are named by the folder they fill, relative to the run directory: `data`, `teacher`,
    `pseudo` (merge), `students/tau-0.75`, `references/bce`, `seed-1/beyond-em/teacher`, `report`."""

    def __init__(self, cfg: Config, kind: str):
        self.root, self.kind, self.local = cfg, kind, kind == "local"
        self.sub = Submitter(cfg, kind)
        self.previous = _load_record(cfg).get("jobs", {})
        self.record: dict = {
            "executor": kind,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": dict(self.previous),
        }
        self.jobs: dict = {}  # name -> submitit job, for --wait

    def name(self, cfg: Config, what: str) -> str:
        return job_name(self.root, cfg, what)

    def active(self, name: str) -> str | None:
        """The job id of `name` from an earlier submission if Slurm still has it queued or running
        (then --wait follows that job too)."""
        job = self.previous.get(name)
        if self.local or job is None:
            return None
        state = _slurm_state(job["job_id"], queue_only=True)
        if state in ("UNKNOWN", *TERMINAL_OK, *TERMINAL_BAD):
            return None
        import submitit

        self.jobs[name] = submitit.SlurmJob(self.sub.folder / "%j", job["job_id"])
        log.info("%-24s job %s still queued or running: not submitted again", name, job["job_id"])
        return job["job_id"]

    def submit(
        self,
        cfg: Config,
        what: str,
        job,
        nodes: int,
        tasks: int,
        time_min: int,
        after: list[str],
        gpus: bool = False,
    ) -> list[str]:
        """One job; returns the ids later stages must wait for ([] locally: it has finished)."""
        name = self.name(cfg, what)
        running = self.active(name)
        if running:
            return [running]
        executor = self.sub.executor(
            name.replace("/", "-"), nodes, tasks, time_min, after=[] if self.local else after, gpus=gpus
        )
        j = executor.submit(job)
        self._submitted(name, j)
        if self.local:
            _wait_one(name, j)
            return []
        return [str(j.job_id)]

    def submit_array(self, cfg: Config, job, targets: list[str], after: list[str]) -> list[str]:
        """One student per target: locally one after the other (each uses every core), on Slurm one
        job array, split in parts of at most MaxArraySize tasks when it is larger."""
        s = self.root.slurm
        names = {t: self.name(cfg, f"students/{t}") for t in targets}
        running = {t: self.active(n) for t, n in names.items()}
        ids = [r for r in running.values() if r]
        targets = [t for t in targets if not running[t]]
        if self.local:
            for target in targets:
                self.submit(cfg, f"students/{target}", functools.partial(job, target), s.student_nodes,
                            s.student_tasks_per_node, s.student_time_min, after, gpus=True)
            return []
        chunk = max_array_size()
        for start in range(0, len(targets), chunk):
            part = targets[start : start + chunk]
            executor = self.sub.executor(
                self.name(cfg, "students").replace("/", "-"),
                s.student_nodes,
                s.student_tasks_per_node,
                s.student_time_min,
                after=after,
                gpus=True,
            )
            for target, j in zip(part, executor.map_array(job, part), strict=True):
                self._submitted(names[target], j)
                ids.append(str(j.job_id).split("_")[0])
        return sorted(set(ids))

    def _submitted(self, name: str, job) -> None:
        self.jobs[name] = job
        self.record["jobs"][name] = {
            "job_id": str(job.job_id),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        }
        log.info("%-24s job %-10s log %s", name, job.job_id, job.paths.stdout)
        write_json(self.root.run_dir / "jobs.json", self.record)

    def experiment(self, cfg: Config, after: list[str]) -> list[str]:
        """teacher -> infer -> merge -> students, references beside them, and the beyond chain;
        returns what the experiment's report waits for."""
        from pml_dist.subruns import beyond_run, references_to_train

        s = self.root.slurm
        resolved = str(write_resolved(cfg))
        chain = list(after)
        # Which stages to (re)submit is decided from the run directory as it is now; on Slurm the later
        # stages cannot know yet, so a stage is submitted when it or any stage before it is unfinished.
        pending = bool(after)
        if pending or not done(cfg, "teacher"):
            pending = True
            chain = self.submit(
                cfg,
                "teacher",
                TrainJob(resolved, stage="teacher"),
                s.teacher_nodes,
                s.teacher_tasks_per_node,
                s.teacher_time_min,
                chain,
                gpus=True,
            )
        if pending or not done(cfg, "merge"):
            chain = self.submit(
                cfg,
                "teacher/probs",
                InferJob(resolved),
                s.infer_nodes,
                s.infer_tasks_per_node,
                s.infer_time_min,
                chain,
                gpus=True,
            )
            chain = self.submit(cfg, "pseudo", MergeJob(resolved), 1, 1, s.cpu_time_min, chain)
        todo = [t for t in students(cfg) if not done(cfg, "student", t)]
        ends = list(chain)
        if todo:
            ends += self.submit_array(cfg, TrainJob(resolved, stage="student"), todo, chain)
        # Reference teachers (full BCE, EM, ...) need only the data: on Slurm they run beside the chain.
        for loss in references_to_train(cfg):
            if done(cfg, "reference", loss):
                continue
            job = TrainJob(resolved, stage="reference", target=loss)
            ends += self.submit(
                cfg,
                f"references/{loss}",
                job,
                s.teacher_nodes,
                s.teacher_tasks_per_node,
                s.teacher_time_min,
                after,
                gpus=True,
            )
        beyond = beyond_run(cfg)
        if beyond is not None:
            ends += self.experiment(beyond, after)
        return sorted(set(ends))


def run_pipeline(cfg: Config, kind: str, wait: bool) -> dict:
    """Submit (slurm) or run (local) every unfinished stage; returns the jobs record.
    The jobs read the run's resolved config (`write_resolved` must have written it)."""
    from pml_dist.subruns import seed_runs

    if kind == "slurm" and not slurm_available():
        raise PmlError("--executor slurm: no working Slurm here (sbatch/sinfo failed); use --executor local")
    graph = Graph(cfg, kind)
    s = cfg.slurm
    resolved = str(cfg.run_dir / "config.yaml")
    after = (
        []
        if done(cfg, "prepare")
        else graph.submit(cfg, "data", PrepareJob(resolved), 1, 1, s.cpu_time_min, [])
    )
    runs = seed_runs(cfg)
    reports = []
    for run in runs:
        ends = graph.experiment(run, after)
        if len(runs) > 1:  # each seed's own report, then the summary over seeds
            reports += graph.submit(
                run,
                "report",
                ReportJob(str(run.run_dir / "config.yaml")),
                1,
                1,
                s.cpu_time_min,
                [*after, *ends],
            )
        else:
            reports = [*after, *ends]
    graph.submit(cfg, "report", ReportJob(resolved), 1, 1, s.cpu_time_min, reports)
    if wait and not graph.local:
        wait_for(cfg, graph.jobs)
    return graph.record


def job_name(root: Config, cfg: Config, what: str) -> str:
    """`what` (a folder of a run) named relative to the root run: `teacher`, `seed-1/beyond-em/pseudo`."""
    prefix = cfg.run_dir.relative_to(root.run_dir).as_posix()
    return what if prefix == "." else f"{prefix}/{what}"


def _retry_command(cfg: Config, executor: str) -> str:
    return f"pml-dist run --executor {executor} --config {cfg.run_dir / 'config.yaml'}"


def _load_record(cfg: Config) -> dict:
    path = cfg.run_dir / "jobs.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _cause(text: str) -> str | None:
    """The last `SomethingError: message` line of a traceback (submitit's or a log's)."""
    errors = [ln.strip() for ln in text.splitlines() if re.match(r"\s*[\w.]+(Error|Exception): ", ln)]
    return errors[-1] if errors else None


def _wait_one(name: str, job) -> None:
    """Wait for a local job and turn its failure into an error that names the stage and the log."""
    _follow_progress(name, job)
    try:
        results = job.results()  # one result per task (multi-task jobs refuse .result())
    except Exception as exc:  # submitit wraps the job's traceback: name its last exception line
        cause = _cause(str(exc)) or type(exc).__name__
        raise PmlError(f"{name} (job {job.job_id}) failed: {cause}; log: {job.paths.stderr}") from None
    log.info("%-24s done: %s", name, results[0])


def _follow_progress(name: str, job, poll_s: float = 1.0, every_s: float = 30.0) -> None:
    """A local job's progress bars go to its log file: show the newest one here while it runs, as one
    updating line on a terminal, else as a log line every `every_s` seconds."""
    tty = sys.stderr.isatty()
    shown, last = "", 0.0
    while not job.done():
        time.sleep(poll_s)
        line = _last_progress_line(job.paths.stderr)
        if not line or line == shown or (not tty and time.time() - last < every_s):
            continue
        shown, last = line, time.time()
        if tty:
            width = shutil.get_terminal_size().columns - 1
            sys.stderr.write(f"\r\033[K{name}: {line}"[: width + 4])
            sys.stderr.flush()
        else:
            log.info("%-24s %s", name, line)
    if tty and shown:
        sys.stderr.write("\r\033[K")


def _last_progress_line(path) -> str:
    """The newest tqdm bar (`desc: 40%|####  | 10/25 [...]`) at the end of a log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    bars = [part.strip() for part in re.split(r"[\r\n]", tail) if "%|" in part]
    return bars[-1] if bars else ""


def wait_for(
    cfg: Config, jobs: dict, poll_s: float = 2.0, result_grace_s: float = 15.0, unknown_s: float = 300.0
) -> None:
    """Wait until every Slurm job has ended, logging each state change, then report every failure.

    Nothing is waited on forever: a failed job's dependants are cancelled by Slurm
    (--kill-on-invalid-dep); a failed student or reference leaves the others running, since each
    can be retried alone; a job that ends COMPLETED without submitit's result file (killed after
    its last line, or by a node dying) is a failure once `result_grace_s` have passed (shared file
    systems can lag); a job that neither squeue nor sacct knows for `unknown_s` is reported."""
    states: dict[str, str] = {}
    first_seen: dict[str, float] = {}
    failed: dict[str, str] = {}
    cancelled: list[str] = []
    while True:
        now = time.time()
        for name, job in jobs.items():
            if name in failed or name in cancelled or states.get(name) == "OK":
                continue
            state = job.state.split()[0] if job.state else "UNKNOWN"
            if states.get(name) != state:
                states[name] = state
                first_seen[name] = now
                log.info("%-24s %s", name, state)
            if state in TERMINAL_OK:
                if job.paths.result_pickle.exists():
                    states[name] = "OK"
                elif now - first_seen[name] > result_grace_s:
                    failed[name] = "ended COMPLETED without a result (the job died after its last line)"
            elif state.startswith("CANCELLED") and not job.paths.result_pickle.exists():
                cancelled.append(name)
            elif state in TERMINAL_BAD:
                cause = _cause(_read(job.paths.stderr)) or "no Python error in the log"
                failed[name] = f"ended {state} ({cause})"
            elif state == "UNKNOWN" and now - first_seen[name] > unknown_s:
                failed[name] = f"unknown to Slurm (neither squeue nor sacct) for {unknown_s:.0f} s"
        if len(failed) + len(cancelled) + sum(v == "OK" for v in states.values()) == len(jobs):
            break
        time.sleep(poll_s)
    if failed or cancelled:
        lines = [
            f"{name} (job {jobs[name].job_id}) {why}; log: {jobs[name].paths.stderr}"
            for name, why in failed.items()
        ]
        if cancelled:
            named = ", ".join(f"{name} (job {jobs[name].job_id})" for name in cancelled)
            lines.append(f"cancelled (a job they depend on failed, or scancel): {named}")
        lines.append(
            "retry what failed (finished, queued and running jobs are not resubmitted): "
            + _retry_command(cfg, "slurm")
        )
        raise PmlError("\n".join(lines))


def _read(path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def status(cfg: Config) -> list[tuple[str, str, str]]:
    """(job name, state, detail) rows from the run directory and, for unfinished stages, Slurm;
    when something failed, a last row with the command that retries just that."""
    record = _load_record(cfg)
    jobs = record.get("jobs", {})
    rows, failed = [], False
    for name, finished in _outputs(cfg):
        job = jobs.get(name)
        if finished:
            rows.append((name, "done", ""))
        elif job is None:
            rows.append((name, "not submitted", ""))
        else:
            state = _slurm_state(job["job_id"]) if record.get("executor") == "slurm" else "NOT DONE"
            bad = state in TERMINAL_BAD or state == "NOT DONE"
            failed |= bad
            rows.append(
                (
                    name,
                    state.lower() if bad else state,
                    f"job {job['job_id']}" + (f", log {job['stderr']}" if bad else ""),
                )
            )
    if failed:
        rows.append(("retry", "", _retry_command(cfg, record["executor"])))
    return rows


def _outputs(cfg: Config):
    """(job name, finished) for every stage of the experiment, its seeds and beyond chains."""
    from pml_dist.subruns import beyond_run, references_to_train, seed_runs

    yield "data", done(cfg, "prepare")
    runs = seed_runs(cfg)
    for run in runs:
        for sub in filter(None, (run, beyond_run(run))):
            entries = [("teacher", "teacher", None), ("pseudo", "merge", None)]
            entries += [(f"students/{t}", "student", t) for t in students(sub)]
            entries += [(f"references/{loss}", "reference", loss) for loss in references_to_train(sub)]
            for what, stage, target in entries:
                try:
                    finished = done(sub, stage, target)
                except PmlError:  # e.g. a merge record whose teacher is gone
                    finished = False
                yield job_name(cfg, sub, what), finished
        if len(runs) > 1:
            yield f"{run.run_dir.name}/report", (run.run_dir / "report.json").is_file()
    yield "report", (cfg.run_dir / "report.json").is_file()


def _slurm_state(job_id: str, queue_only: bool = False) -> str:
    """A job's state from squeue, else (it has left the queue) from sacct; UNKNOWN when neither has it."""
    cmds = [
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
    ]
    for cmd in cmds[:1] if queue_only else cmds:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out:
            return out[0].upper()
    return "UNKNOWN"


def default_executor() -> str:
    return "slurm" if slurm_available() else "local"

"""`pml-dist run`: the stage list (stage_list.py) as submitit jobs.

On Slurm every entry that must run is submitted at once, each `afterok` on the jobs of the entries it
consumes, and the command returns (or follows them with --wait, see wait.py). Locally (submitit's
local executor, the default without Slurm) the same entries run one after the other.

Which entries run: on Slurm, an entry whose output is not up to date, or whose upstream is being
submitted (its new output cannot be known yet); locally, an entry whose output is not up to date
once its upstream has finished. Jobs Slurm still has queued or running from an earlier submission
are never submitted twice: their id becomes the dependency. So resubmitting a config retries what
failed, skips what is done and resumes what is unfinished. Job ids and logs go to `<run>/jobs.json`.

One `pml-dist run` at a time owns a run directory: it holds `<run>/logs/run.lock` (pml_dist/lock.py)
while it submits (Slurm) or runs (local), and reads and writes jobs.json only under it, so two
submissions never both submit a stage. A second one stops with one line naming the holder, or with
--wait waits for it (showing the stages it runs) and then goes on: it finds done what the first did
and, on Slurm, follows the jobs the first submitted.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time

from ffcv_data.atomic import write_json
from pml_dist.config import Config, write_resolved
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.lock import Holder, Lock, LockHeld, holder_of
from pml_dist.pipeline.executor import make_executor, script_text
from pml_dist.pipeline.progress import last_progress_line, wait_local
from pml_dist.pipeline.slurm import SlurmUnreachable, is_active, max_array_size, require_slurm, test_only
from pml_dist.pipeline.stage_list import Entry, stage_list
from pml_dist.pipeline.wait import wait_for

log = logging.getLogger(__name__)


def load_jobs_record(cfg: Config) -> dict:
    path = RunLayout.of(cfg).jobs
    return json.loads(path.read_text()) if path.is_file() else {}


class Graph:
    """Submits (Slurm) or runs (local) entries, each after the jobs it needs. A dry graph submits
    nothing: it keeps each job's sbatch script in `scripts` after `sbatch --test-only` accepted it
    (run_pipeline makes one before every Slurm submission, so a job Slurm would refuse stops the
    pipeline before its first job is queued)."""

    def __init__(self, cfg: Config, kind: str, dry: bool = False):
        self.root, self.kind, self.local, self.dry = cfg, kind, kind == "local", dry
        self.scripts: dict[str, str] = {}  # job name -> sbatch script (dry graphs)
        self.submitted: list[str] = []  # names submitted by this graph
        self.previous = load_jobs_record(cfg).get("jobs", {})
        self.record: dict = {
            "executor": kind,
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "jobs": dict(self.previous),
        }
        self.jobs: dict = {}  # name -> submitit job, for --wait
        self.ids: dict[str, list[str]] = {}  # name -> Slurm job ids its dependants wait for

    def run(self, entries: list[Entry]) -> None:
        """Every entry that must run, in order; the students of one run as one array."""
        handled: set[str] = set()
        for entry in entries:
            if entry.name in handled:
                continue
            group = [e for e in entries if e.array and e.array == entry.array] or [entry]
            handled.update(e.name for e in group)
            todo = [e for e in group if self._must_run(e)]
            if not todo:
                continue
            if entry.array and not self.local:
                self.submit_array(todo)
            else:
                for e in todo:
                    self.submit(e)

    def _must_run(self, entry: Entry) -> bool:
        if self.local:  # upstream has finished: its output is known
            return not entry.is_done()
        return any(dep in self.ids for dep in entry.after) or not entry.is_done()

    def _after(self, entry: Entry) -> list[str]:
        return sorted({i for dep in entry.after for i in self.ids.get(dep, [])})

    def active(self, name: str) -> str | None:
        """The job id of `name` from an earlier submission if Slurm still has it queued or running
        (then --wait follows that job too, and dependants wait for it). When squeue does not answer
        nothing is submitted: the job may still run, and a second one would share its folders."""
        job = self.previous.get(name)
        if self.local or job is None:
            return None
        try:
            active = is_active(job["job_id"])
        except SlurmUnreachable as exc:
            raise PmlError(f"{name}: cannot tell whether its job {job['job_id']} is still queued or "
                           f"running ({exc}); nothing was submitted: retry when Slurm answers") from None
        if not active:
            return None
        self.ids[name] = [job["job_id"]]
        log.info("%-24s job %s still queued or running: not submitted again", name, job["job_id"])
        if not self.dry:
            import submitit

            self.jobs[name] = submitit.SlurmJob(RunLayout.of(self.root).submitit_logs / "%j", job["job_id"])
        return job["job_id"]

    def submit(self, entry: Entry) -> None:
        """One job; locally it has finished when this returns."""
        if self.active(entry.name):
            return
        executor = make_executor(self.root, self.kind, entry.name, entry.resources,
                                 after=[] if self.local else self._after(entry))
        if self.dry:
            return self._check(entry.name, executor)
        job = entry.job if not entry.array else functools.partial(entry.job, *entry.task_args)
        j = self._sbatch(entry.name, executor.submit, job)
        self._submitted(entry.name, j)
        if self.local:
            wait_local(entry.name, j)
        else:
            self.ids[entry.name] = [str(j.job_id)]

    def submit_array(self, entries: list[Entry]) -> None:
        """One Slurm job array (map_array, each task gets its `Entry.task_args`), split in parts of at
        most MaxArraySize tasks when it is larger."""
        entries = [e for e in entries if not self.active(e.name)]
        chunk = max_array_size()
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            first = part[0]
            executor = make_executor(self.root, self.kind, first.array, first.resources,
                                     after=self._after(first))
            if self.dry:
                self._check(f"{first.array}[{start}-{start + len(part) - 1}]", executor, len(part))
                for entry in part:
                    self.ids[entry.name] = [f"<{first.array}>"]
                continue
            tasks = self._sbatch(first.array, executor.map_array, first.job,
                                 *zip(*(e.task_args for e in part), strict=True))
            for entry, j in zip(part, tasks, strict=True):
                self._submitted(entry.name, j)
                self.ids[entry.name] = [str(j.job_id).split("_")[0]]

    def _check(self, name: str, executor, array_size: int = 0) -> None:
        """Dry: the job's script, accepted by `sbatch --test-only` (without its dependency on jobs
        that do not exist yet); dependants wait for `<name>`."""
        script = script_text(executor, array_size)
        test_only(re.sub(r"(?m)^#SBATCH --(dependency|kill-on-invalid-dep)=.*\n", "", script), name)
        self.scripts[name] = script
        self.ids.setdefault(name, [f"<{name}>"])

    def _sbatch(self, name: str, submit, *args):
        """submit(*args), with sbatch's refusal (a limit reached since the test-only check: jobs per user)
        as one line naming the job and what is already queued."""
        from submitit.core.utils import FailedJobError

        try:
            return submit(*args)
        except FailedJobError as exc:
            why = (str(exc).strip().splitlines() or ["no message"])[-1].removeprefix("sbatch: error: ")
            queued = ", ".join(self.submitted)
            raise PmlError(f"{name}: sbatch refused the job: {why}"
                           + (f"; already queued (see {RunLayout.of(self.root).jobs}, `pml-dist cancel` "
                              f"cancels them): {queued}" if queued else "")) from None

    def _submitted(self, name: str, job) -> None:
        self.jobs[name] = job
        self.submitted.append(name)
        self.record["jobs"][name] = {
            "job_id": str(job.job_id),
            "stdout": str(job.paths.stdout),
            "stderr": str(job.paths.stderr),
        }
        log.info("%-24s job %-10s log %s", name, job.job_id, job.paths.stdout)
        write_json(RunLayout.of(self.root).jobs, self.record)


def run_pipeline(cfg: Config, kind: str, wait: bool, dry_run: bool = False, poll_s: float = 2.0) -> dict:
    """Submit (slurm) or run (local) every stage that must run; returns the jobs record, or with
    dry_run the sbatch script of every job that would be submitted (`{"scripts": {name: text}}`).
    On Slurm every script passes `sbatch --test-only` before the first job is submitted. The jobs
    read their run's resolved config, written here for every sub-run.

    All of it (but a dry run, which writes nothing) under the run directory's lock; when another
    `pml-dist run` holds it: LockHeld naming it, or with `wait` wait for it (polling every
    `poll_s`), then go on."""
    if kind == "slurm":
        require_slurm()
    entries = stage_list(cfg)
    if dry_run:
        if kind != "slurm":
            raise PmlError("--dry-run shows the sbatch scripts of --executor slurm; there is no Slurm here")
        plan = Graph(cfg, kind, dry=True)
        plan.run(entries)
        return {"scripts": plan.scripts}
    lock = Lock(RunLayout.of(cfg).run_lock, f"run directory {cfg.run_dir}")
    try:
        lock.acquire(wait=wait, poll_s=poll_s, waiting=_Follow(cfg, entries))
    except LockHeld as exc:
        raise LockHeld(f"{exc}; `pml-dist run --wait` waits for it, `pml-dist status` shows its "
                       f"progress", exc.holder) from None
    try:
        for run in {e.run.run.dir: e.run for e in entries}.values():  # the run and each sub-run, once
            write_resolved(run)
        if kind == "slurm":
            Graph(cfg, kind, dry=True).run(entries)
        graph = Graph(cfg, kind)  # reads jobs.json: under the lock
        graph.run(entries)
    finally:
        lock.release()
    if wait and not graph.local:
        wait_for(cfg, graph.jobs)
    return graph.record


class _Follow:
    """`run --wait` while another `pml-dist run` owns the run directory: who it is, then each stage
    it starts and ends (from the stages' own locks), with the newest progress line of its log every
    `every_s` seconds."""

    def __init__(self, cfg: Config, entries: list[Entry], every_s: float = 30.0):
        self.cfg, self.every_s = cfg, every_s
        self.entries = [e for e in entries if e.lock is not None]
        self.owner = ""
        self.running: dict[str, Holder] = {}
        self.shown = 0.0

    def __call__(self, owner: Holder) -> None:
        if owner.token != self.owner:
            self.owner = owner.token
            log.info("waiting for %s, which owns %s", owner.describe(), self.cfg.run_dir)
        running = {}
        for entry in self.entries:
            holder = holder_of(entry.lock)
            if holder is not None and holder.gone() is None:
                running[entry.name] = holder
        for name in running.keys() - self.running.keys():
            log.info("%-24s running: %s", name, running[name].describe())
        for name in self.running.keys() - running.keys():
            log.info("%-24s ended", name)
        self.running = running
        if running and time.time() - self.shown >= self.every_s:
            self.shown = time.time()
            jobs = load_jobs_record(self.cfg).get("jobs", {})
            for name in running:
                line = last_progress_line(jobs[name]["stderr"]) if name in jobs else ""
                if line:
                    log.info("%-24s %s", name, line)

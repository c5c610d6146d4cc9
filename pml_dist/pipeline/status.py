"""`pml-dist status`: one row per entry of the stage list, from the run directory and, for what is
not done, the job record and Slurm, and who holds the run's and each stage's lock (pml_dist/lock.py);
`pml-dist cancel` cancels what that record still has queued."""

from __future__ import annotations

from pml_dist.config import Config
from pml_dist.layout import RunLayout
from pml_dist.lock import Holder, holder_of
from pml_dist.pipeline.graph import load_jobs_record
from pml_dist.pipeline.slurm import (
    STUCK_REASONS,
    TERMINAL_BAD,
    TERMINAL_OK,
    Accounting,
    SlurmUnreachable,
    accounting,
    cancel,
    is_active,
    pending_reasons,
    slurm_state,
)
from pml_dist.pipeline.stage_list import Entry, stage_list
from pml_dist.pipeline.wait import retry_command


def status(cfg: Config) -> list[tuple[str, str, str]]:
    """(job name, state, detail) rows: done with its result; stale with why (an input changed since
    it ran); not submitted; pending/running; failed with its log. On Slurm each submitted job also
    shows its elapsed time and restarts (requeues), and a pending job that cannot start while the
    cluster stays as it is (its nodes are down or drained: a lost node) says so with Slurm's reason.
    When something failed or is stale, a last row with the command that reruns just that.

    Locks: a first row `run` while a `pml-dist run` owns the run directory (or left its lock behind:
    the next one takes it over); an entry whose process holds its folder's lock shows it (host, PID,
    heartbeat age): `running` where no Slurm job tells (local runs, `pml-dist train` by hand)."""
    record = load_jobs_record(cfg)
    jobs = record.get("jobs", {})
    on_slurm = record.get("executor") == "slurm"
    entries = [e for e in stage_list(cfg) if e.listed]
    acct = _accounting([jobs[e.name]["job_id"] for e in entries if e.name in jobs]) if on_slurm else {}
    rows, rerun = [], False
    owner = holder_of(RunLayout.of(cfg).run_lock)
    if owner is not None:
        gone = owner.gone()
        rows.append(("run", "locked", f"by {owner.describe()}") if gone is None else
                    ("run", "stale lock", f"left by {owner.describe()}: {gone}; the next `pml-dist run` "
                                          "takes it over"))
    for entry in entries:
        why = entry.outdated()
        job = jobs.get(entry.name)
        ran = _ran(job, acct)
        stale = why is not None and why.startswith("stale")
        held, lock = _lock(entry)
        if why is None:
            rows.append((entry.name, "done", _join(result_of(entry), ran)))
            continue
        if held is not None and not (job is not None and on_slurm):  # its process runs: no job to ask
            rows.append((entry.name, "running", _join(ran, lock)))
            continue
        state = "NOT DONE"  # a local job that ended without its output
        if job is not None and on_slurm:
            try:
                state = slurm_state(job["job_id"])
            except SlurmUnreachable as exc:
                rows.append((entry.name, "unknown", f"job {job['job_id']}: {exc}"))
                continue
        if job is not None and state not in (*TERMINAL_OK, *TERMINAL_BAD, "NOT DONE", "UNKNOWN"):
            cannot = _stuck(job["job_id"]) if state == "PENDING" else None  # pending for good: say why
            cannot = cannot and f"cannot start: {cannot} (`sinfo -R` lists nodes that are down or drained)"
            rows.append((entry.name, state, _join(ran or f"job {job['job_id']}", cannot or "", lock)))
        elif stale:
            rerun = True
            rows.append((entry.name, "stale", why.removeprefix("stale: ")))
        elif job is None:
            rows.append((entry.name, "not submitted", ""))
        else:
            rerun = True
            rows.append((entry.name, state.lower() if state in TERMINAL_BAD else "not done",
                         _join(ran or f"job {job['job_id']}", f"log {job['stderr']}", lock)))
    if rerun:
        rows.append(("retry", "", retry_command(cfg, record.get("executor", "local"))))
    return rows


def _lock(entry: Entry) -> tuple[Holder | None, str]:
    """The live holder of the entry's lock, and a few words on the lock (also one left behind)."""
    holder = holder_of(entry.lock) if entry.lock is not None else None
    if holder is None:
        return None, ""
    gone = holder.gone()
    if gone is None:
        return holder, f"locked by {holder.describe()}"
    return None, f"lock left by {holder.describe()}: {gone}"


def result_of(entry: Entry) -> str:
    """What a finished stage produced, in a few words."""
    layout = RunLayout.of(entry.run)
    if entry.stage is not None:
        result = entry.stage.files(layout).read_result()
        return f"test mAP {result.test_map:.2f}, val {result.val_map:.2f}" if result else ""
    if entry.role == "pseudo":
        targets = (layout.pseudo.read_stats() or {}).get("targets", {})
        return ", ".join(f"{n} {t['mean_positives_per_image']:.2f}/image" for n, t in targets.items())
    if entry.role == "report":
        return str(layout.report_md)
    return ""


def _accounting(job_ids: list[str]) -> dict[str, Accounting]:
    try:
        return accounting(job_ids)
    except SlurmUnreachable:
        return {}  # status still shows what the run directory knows


def _stuck(job_id: str) -> str | None:
    """Why squeue has the job PENDING, when that reason does not clear by waiting (a lost node)."""
    try:
        reason = pending_reasons([job_id]).get(job_id)
    except SlurmUnreachable:
        return None
    return reason if reason and reason.startswith(STUCK_REASONS) else None


def _ran(job: dict | None, acct: dict[str, Accounting]) -> str:
    a = acct.get(job["job_id"]) if job else None
    if a is None:
        return ""
    restarts = f", {a.restarts} restart{'s' * (a.restarts != 1)}" if a.restarts else ""
    return f"job {job['job_id']} {a.elapsed}{restarts}"


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def cancel_jobs(cfg: Config) -> list[tuple[str, str]]:
    """scancel every job of the run's record that Slurm still has queued or running; returns
    (name, job id) of each cancelled."""
    record = load_jobs_record(cfg)
    if record.get("executor") != "slurm":
        return []
    jobs = record.get("jobs", {})
    active = [(name, job["job_id"]) for name, job in jobs.items() if is_active(job["job_id"])]
    cancel([job_id for _, job_id in active])
    return active

"""One owner per run directory and stage folder (pml_dist/lock.py), on real processes: a lock whose
holder was SIGKILLed is taken over, one held by a live process of another (simulated) host is not,
nor is it once its heartbeat is fresh, but it is once the heartbeat times out; a requeued Slurm job
takes over its previous incarnation's lock; of several processes racing for one stale lock exactly
one wins. Then two concurrent `pml-dist run --executor local` on one run directory: the second
stops with one line naming the first, `--wait` waits for it and finds everything done, and every
stage ran once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pml_dist.cli import main
from pml_dist.lock import Holder, Lock, LockHeld, holder_of

REPO = Path(__file__).resolve().parents[3]

# A process that takes the lock at argv[1] (as host argv[2] when given), says so, and holds it.
HOLD = textwrap.dedent("""
    import socket, sys, time
    if len(sys.argv) > 2:
        socket.gethostname = lambda: sys.argv[2]
    from pml_dist.lock import Lock
    with Lock(sys.argv[1], "test folder"):
        print("held", flush=True)
        time.sleep(600)
""")


def _hold(path: Path, host: str | None = None, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), *([host] if host else [])],
                            stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_lock(path: Path, age_s: float = 0.0, **fields) -> None:
    """A lock file as another process would have written it (another host: a simulated one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"what": "test folder", "host": "node-17", "pid": os.getpid(), "command": "pml-dist run",
               "started": time.time() - age_s, "token": "0123abcd", **fields}
    path.write_text(json.dumps(content))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_sigkilled_holders_lock_is_taken_over(tmp_path):
    """The holder gets no chance to clean up; its PID on this host no longer runs (a zombie, not
    reaped yet, counts as gone), so the lock is taken over at once, not after the timeout."""
    path = tmp_path / "logs" / "stage.lock"
    proc = _hold(path)
    holder = holder_of(path)
    assert holder.pid == proc.pid and holder.host == socket.gethostname() and holder.gone() is None
    with pytest.raises(LockHeld, match=rf"test folder is in use by .*\(pid {proc.pid} on "):
        Lock(path, "test folder").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    time.sleep(0.5)  # not reaped: a zombie
    with Lock(path, "test folder") as lock:
        assert lock.took_over == f"its process {proc.pid} on {socket.gethostname()} no longer runs"
        assert holder_of(path).pid == os.getpid()
    assert not path.exists()
    proc.wait()


def test_a_live_lock_of_another_host_is_not_taken_over_and_an_old_heartbeat_is(tmp_path):
    """The PID of another host says nothing here (it is dead on this host): only the heartbeat
    decides. A fresh one: refused with one line naming host and PID; older than the timeout
    (120 s by default): taken over."""
    path = tmp_path / "stage.lock"
    pid = _dead_pid()
    _write_lock(path, pid=pid, age_s=100)
    with pytest.raises(LockHeld) as held:
        Lock(path, "stage teacher").acquire()
    message = str(held.value)
    assert "\n" not in message and message.startswith("stage teacher is in use by `pml-dist run` ")
    assert f"pid {pid} on node-17" in message and "heartbeat 100 s ago" in message
    assert holder_of(path).token == "0123abcd"  # left as it was

    _write_lock(path, pid=pid, age_s=130)
    with Lock(path, "stage teacher") as lock:
        assert lock.took_over == "no heartbeat for 130 s (timeout 120 s)"
    assert not path.exists()


def test_a_heartbeat_keeps_a_live_lock_of_another_host_and_a_dead_one_times_out(tmp_path, monkeypatch):
    """A real holder on a simulated host (its own process, heartbeat every 0.1 s) outlives the
    timeout (1 s); killed, its lock is taken over once its heartbeat is 1 s old."""
    monkeypatch.setenv("PML_DIST_LOCK_HEARTBEAT_S", "0.1")
    monkeypatch.setenv("PML_DIST_LOCK_TIMEOUT_S", "1")
    path = tmp_path / "run.lock"
    proc = _hold(path, host="node-9")
    time.sleep(2)
    with pytest.raises(LockHeld, match=rf"pid {proc.pid} on node-9"):
        Lock(path, "test folder").acquire()
    assert holder_of(path).age < 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with pytest.raises(LockHeld):  # another host: its dead PID is not seen, the heartbeat is fresh
        Lock(path, "test folder").acquire()
    time.sleep(1.5)
    with Lock(path, "test folder") as lock:
        assert lock.took_over.startswith("no heartbeat for ")


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path, monkeypatch):
    """Same Slurm job id, an earlier restart count: the previous incarnation (Slurm ended it before
    the requeue, on whichever node) at once; the same incarnation on another node is not."""
    path = tmp_path / "stage.lock"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    _write_lock(path, slurm_job_id="4242", slurm_restart_count=1)
    with pytest.raises(LockHeld, match="Slurm job 4242"):
        Lock(path, "stage teacher").acquire()
    _write_lock(path, slurm_job_id="4242", slurm_restart_count=0)
    with Lock(path, "stage teacher") as lock:
        assert lock.took_over == "it is an earlier run of Slurm job 4242, which was requeued"
        assert holder_of(path).slurm_job_id == "4242" and holder_of(path).slurm_restart_count == 1


# Waits for the start time argv[2], then tries the lock at argv[1] once: prints "won" and holds it
# until argv[3] exists, or prints "lost <message>".
CONTENDER = textwrap.dedent("""
    import os, sys, time
    from pml_dist.lock import Lock, LockHeld
    lock = Lock(sys.argv[1], "test folder")
    time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
    try:
        lock.acquire()
    except LockHeld as exc:
        print("lost", exc, flush=True)
        sys.exit(0)
    print("won", os.getpid(), flush=True)
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.05)
    lock.release()
""")


@pytest.mark.parametrize("round_", range(3))
def test_of_processes_racing_for_a_stale_lock_exactly_one_wins(tmp_path, round_):
    path, done = tmp_path / "run.lock", tmp_path / "done"
    _write_lock(path, age_s=1000)
    start = time.time() + 2.0
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), str(start), str(done)],
                              stdout=subprocess.PIPE, text=True, cwd=REPO) for _ in range(6)]
    lines = [p.stdout.readline().strip() for p in procs]
    done.touch()
    for p in procs:
        assert p.wait(timeout=30) == 0
    winners = [ln for ln in lines if ln.startswith("won")]
    assert len(winners) == 1, lines
    winner = winners[0].split()[1]
    assert all(f"(pid {winner} on " in ln for ln in lines if ln.startswith("lost")), lines
    assert not path.exists()  # released by the winner; nothing else left there
    assert not list(tmp_path.glob("run.lock.*"))  # no set-aside file, no takeover marker


def test_a_contender_whose_stale_judgment_is_outdated_never_moves_the_new_owners_lock(tmp_path, monkeypatch):
    """Seen in CI with 6 contenders on 2 cores: B judged the lock stale, A then took it over and
    made its own, and only then B got the takeover mutex and moved A's new lock aside to check it;
    putting it back left the name free for a moment, and a third contender took it: two owners.
    Under the mutex the lock must still be the very file judged stale before anything is moved."""
    import pml_dist.lock as lock_module

    path = tmp_path / "run.lock"
    _write_lock(path, age_s=1000)
    judged = holder_of(path)
    assert judged.gone() is not None
    owner = _hold(path)  # takes the stale lock over and holds its own
    try:
        new = holder_of(path)
        assert new.pid == owner.pid and new.token != judged.token
        renames = []
        monkeypatch.setattr(lock_module.os, "rename", lambda *a: renames.append(a))
        late = Lock(path, "test folder")
        assert late._set_aside(judged) is False
        assert renames == []  # not moved, not even for a moment
        assert holder_of(path) == new and not list(tmp_path.glob("run.lock.*"))
    finally:
        owner.kill()
        owner.wait()


def test_release_removes_the_folders_it_made_and_leaves_a_lock_no_longer_its_own(tmp_path):
    """A command that fails early leaves the folder as it found it (no empty logs/)."""
    with Lock(tmp_path / "pseudo" / "logs" / "stage.lock", "stage pseudo"):
        assert (tmp_path / "pseudo" / "logs" / "stage.lock").is_file()
    assert not (tmp_path / "pseudo").exists()

    path = tmp_path / "stage.lock"
    lock = Lock(path, "test folder").acquire()
    other = tmp_path / "other"
    _write_lock(other, token="feedbeef")
    os.replace(other, path)  # taken over while this process was frozen
    lock.release()
    assert Holder.read(path).token == "feedbeef"


@pytest.mark.parametrize("command, lock, rank", [
    (["prepare"], "data/logs/prepare.lock", None),
    (["train", "--stage", "teacher"], "teacher/logs/stage.lock", None),
    (["infer"], "teacher/logs/infer-rank-0.lock", None),
    (["infer"], "teacher/logs/infer-rank-1.lock", 1),  # inference ranks are independent: each its own
    (["merge"], "pseudo/logs/stage.lock", None),
])
def test_a_stage_another_process_writes_is_refused_in_one_line(synthetic_overrides, tmp_path, capsys,
                                                                monkeypatch, command, lock, rank):
    """Each stage's process holds its folder's lock: a second one stops before touching it."""
    if rank is not None:
        for key, value in {"RANK": rank, "WORLD_SIZE": 2, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1,
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
            monkeypatch.setenv(key, str(value))
    path = tmp_path / "run" / lock
    holder = _hold(path)
    try:
        assert main([*command, *synthetic_overrides]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"pml-dist {command[0]}: error: ") and " is in use by `" in err
        assert f"(pid {holder.pid} on {socket.gethostname()}, since " in err
        assert holder_of(path).pid == holder.pid  # left alone
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------ two `pml-dist run`

TINY = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "model.width=16", "train.epochs=1",
        "train.micro_batch=16", "slurm.teacher_tasks_per_node=2", "slurm.infer_tasks_per_node=1",
        "pseudo.taus=[0.5]", "pseudo.modes=[hard]", "report.references=[]", "pseudo.teachers=[]"]
STAGES = {"data", "teacher", "teacher/probs", "pseudo", "students/tau-0.5", "report"}


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_concurrent_local_runs_run_every_stage_once(synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *TINY]
    command = [sys.executable, "-m", "pml_dist", "run", "--executor", "local", *overrides]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _wait_for(run / "logs" / "run.lock", first)

    second = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert second.returncode == 2, second.stderr
    error = second.stderr.strip().splitlines()
    assert len(error) == 1, second.stderr
    assert error[0].startswith(f"pml-dist run: error: run directory {run} is in use by `")
    assert f"(pid {first.pid} on {socket.gethostname()}, since " in error[0]
    assert "pml-dist run --wait" in error[0]

    waiter = subprocess.Popen([*command, "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=REPO)
    _wait_for(run / "teacher" / "logs" / "stage.lock", first, timeout=300)
    capsys.readouterr()
    assert main(["status", *overrides]) == 0
    rows = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert rows["run"].split()[1] == "locked" and f"pid {first.pid} on " in rows["run"]
    if "teacher" in rows and "done" not in rows["teacher"]:  # still training (rank 0 holds the lock)
        assert rows["teacher"].split()[1] == "running" and "locked by " in rows["teacher"]

    out, err = first.communicate(timeout=800)
    assert first.returncode == 0, err[-3000:]
    jobs = json.loads((run / "jobs.json").read_text())
    waited_out, waited_err = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, waited_err[-3000:]
    assert "waiting for `" in waited_out and f"(pid {first.pid} on " in waited_out  # log lines: stdout
    assert "running: " in waited_out  # it followed the first one's stages
    assert "| AN -> tau-0.5 |" in waited_out  # it found everything done and printed the report

    # every stage ran once: one job each in jobs.json, and no other job was ever started
    assert json.loads((run / "jobs.json").read_text()) == jobs  # the waiter submitted nothing
    assert set(jobs["jobs"]) == STAGES
    started = {p.name for p in (run / "logs" / "submitit").iterdir() if p.is_dir() and p.name != "%j"}
    assert started == {job["job_id"] for job in jobs["jobs"].values()}
    assert not list(run.rglob("*.lock")) and not list(run.rglob("*.lock.stale-*"))

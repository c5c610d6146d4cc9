"""A throw-away real Slurm cluster for the tests (used by the ``slurm_cluster`` fixture in conftest.py).

``SlurmCluster.start()`` runs ``slurm/testcluster/start.sh --foreground --stop-on-eof`` under
``subprocess.Popen``: that shell starts munged, MariaDB, slurmdbd, slurmctld and one slurmd per node in
the foreground as its own children, reports the cluster up by writing a token to ``<dir>/ready``, and
then waits for them, so stopped daemons are reaped at once (this machine's PID 1 reaps orphans late).
Its stdin is a pipe from this process: if this process dies, even by SIGKILL, the shell stops the
cluster. ``stop()`` runs ``stop.sh`` (cancel every job, SIGTERM each daemon by PID file, SIGKILL
after a bounded wait) and then waits for that shell, killing its process group as the last resort.

The cluster looks like a site (slurm/testcluster/README.md has the measured behaviour): CPU binding
(task/affinity), partitions ``cpu`` (default), ``gpu``, ``debug``, ``short`` (MaxTime 10 min, refused at
submission above it), ``low`` (preemptible: requeued when ``urgent`` needs its CPUs, GraceTime 5 s) and
``urgent``; two fake GPUs per node (gres gpu, CUDA_VISIBLE_DEVICES set); enforced accounting: account
``pml`` (root's default), account ``other`` (refused), QOS ``normal`` (default) and ``tight``
(MaxSubmitJobsPerUser=2, MaxWall 5 min, refused at submission). ``site`` has these names as start.sh
wrote them to ``<dir>/site``; ``preempt()`` preempts a job running in ``low``.

When neither a directory nor a port is given (arguments or SLURM_TEST_DIR / SLURM_TEST_PORT), a busy
slot (another session's cluster, or a port in use) makes ``start()`` try the next one: directory
suffix ``-1``, ``-2``, ... and ports 100 higher each, so concurrent test sessions on one machine work.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "slurm" / "testcluster"
DEFAULT_PORT = 26817
SLOTS = 4
BUSY = 75  # start.sh's exit status when the directory or a port is taken
DAEMONS = ("munged", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sacct", "sinfo", "scontrol", "scancel")
SYSTEM_PACKAGES = "slurmctld slurmd slurm-client munge slurmdbd mariadb-server"
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# Job states after which a job never runs again (``squeue --states`` / ``sacct`` spelling).
TERMINAL_STATES = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "TIMEOUT",
})
# Variables from an enclosing Slurm job or a user's shell that would steer sbatch/srun/submitit away
# from the test cluster (SLURM_JOB_ID makes submitit and srun believe they run inside a job).
FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SACCT_", "SINFO_")


def is_foreign_slurm_var(name: str) -> bool:
    return name.startswith(FOREIGN_PREFIXES)


def _which(program: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(program, path=path)


def _alive(pid: int) -> bool:
    """Running and not a zombie (this machine's PID 1 reaps orphans late)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def _state_word(state: str) -> str:
    """``CANCELLED by 0`` -> ``CANCELLED``."""
    return state.split()[0].upper() if state.strip() else ""


class SlurmCluster:
    """Start with ``start()`` (or ``with SlurmCluster() as c:``); stop with ``stop()``."""

    def __init__(self, directory: str | os.PathLike | None = None, port: int | None = None) -> None:
        env_dir, env_port = os.environ.get("SLURM_TEST_DIR"), os.environ.get("SLURM_TEST_PORT")
        self._fixed = directory is not None or port is not None or bool(env_dir) or bool(env_port)
        base = directory or env_dir or Path(os.environ.get("TMPDIR") or "/tmp") / "pml-dist-slurm"
        self._base_dir = Path(base)
        self._base_port = int(port or env_port or DEFAULT_PORT)
        self.directory = self._base_dir
        self.port = self._base_port
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._restarted: list = []  # (slurmd Popen, log file) started by start_node
        self._log = None

    # ------------------------------------------------------------------ availability
    @classmethod
    def available(cls) -> tuple[bool, str]:
        """(True, "") when this machine can run the cluster, else (False, why not)."""
        if os.name != "posix" or not Path("/proc/self/stat").exists():
            return False, "the Slurm test cluster needs Linux"
        if os.geteuid() != 0:
            return False, "the Slurm test cluster needs root (its daemons and jobs run as root)"
        missing = [p for p in (*DAEMONS, *CLIENTS, "bash", "flock", "setsid") if _which(p) is None]
        if missing:
            return False, (f"Slurm test cluster programs not installed: {' '.join(missing)} "
                           f"(apt-get install {SYSTEM_PACKAGES}; `make setup` does it as root)")
        for script in ("start.sh", "stop.sh"):
            if not (SCRIPTS / script).is_file():
                return False, f"{SCRIPTS / script} is missing"
        return True, ""

    # ------------------------------------------------------------------ what tests use
    @property
    def conf(self) -> Path:
        return self.directory / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a test process or subprocess needs to use this cluster."""
        path = os.environ.get("PATH", os.defpath)
        dirs = path.split(os.pathsep)
        for program in CLIENTS:
            found = _which(program)
            if found and str(Path(found).parent) not in dirs:
                dirs.append(str(Path(found).parent))
        return {"SLURM_CONF": str(self.conf), "PATH": os.pathsep.join(dirs)}

    @property
    def nodes(self) -> list[str]:
        """Node names, in slurm.conf order (they resolve to this machine)."""
        return (self.directory / "nodes").read_text().split()

    @property
    def site(self) -> dict[str, str]:
        """What start.sh set up, from ``<dir>/site``: partitions, default_partition,
        preemptible_partition (low), preemptor_partition (urgent), grace_time_s, short_partition,
        short_max_time_min, account (root's default), other_account (root may not use it), qos,
        tight_qos, tight_max_submit_jobs, tight_max_wall_min, gpus_per_node, cpus_per_node."""
        lines = (self.directory / "site").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    @property
    def partitions(self) -> list[str]:
        """Partition names, default first (all partitions span every node)."""
        return self.site["partitions"].split()

    def subprocess_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not is_foreign_slurm_var(k)}
        env.update(self.env)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30,
            **kwargs) -> subprocess.CompletedProcess:
        """Run a Slurm client (``cluster.run("squeue", "-h")``) against this cluster; text output."""
        res = subprocess.run(list(args), env=self.subprocess_env(), capture_output=True, text=True,
                             check=False, timeout=timeout, **kwargs)
        if check and res.returncode != 0:
            err = subprocess.CalledProcessError(res.returncode, list(args), res.stdout, res.stderr)
            err.add_note(f"stderr: {res.stderr.strip()}")
            raise err
        return res

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None) -> str:
        """``sbatch --parsable ARGS``; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job_ids(self) -> set[str]:
        """Every job slurmctld knows, in any state (ended ones for MinJobAge=600 s): a command that
        must submit nothing leaves this set as it found it. (Not "the queue is empty": a job an
        earlier test cancelled can stay COMPLETING for a while.)"""
        return set(self.run("squeue", "-h", "-t", "all", "-o", "%i").stdout.split())

    def squeue_states(self, job_id: str) -> list[str]:
        """States squeue knows for JOB_ID (one per array element); [] once purged (MinJobAge=600)."""
        res = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
        return [_state_word(s) for s in res.stdout.split()] if res.returncode == 0 else []

    def sacct_states(self, job_id: str) -> list[str]:
        """States in the accounting database (one per job or array element, no steps)."""
        res = self.run("sacct", "-X", "-n", "-P", "-o", "State", "-j", str(job_id), check=False)
        return [_state_word(s) for s in res.stdout.splitlines() if s.strip()] if res.returncode == 0 else []

    def restarts(self, job_id: str) -> int:
        """How often JOB_ID was requeued (``scontrol show job``'s Restarts=; sacct has no such field,
        but ``sacct -D`` lists one record per run); -1 once slurmctld has purged the job."""
        res = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        for word in res.stdout.split():
            if word.startswith("Restarts="):
                return int(word.split("=", 1)[1])
        return -1

    def stop_node(self, name: str, timeout: float = 15) -> None:
        """Stop node NAME's slurmd (a lost node: slurmctld marks it DOWN after SlurmdTimeout and
        fails or requeues its jobs); `start_node` brings it back."""
        pid = int((self.directory / "run" / f"slurmd-{name}.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)

    def start_node(self, name: str, timeout: float = 60) -> None:
        """Start node NAME's slurmd again (a child of this process; stop.sh stops it by its pid file
        as before) and wait until slurmctld has it idle (ReturnToService=2)."""
        log = open(self.directory / "log" / f"slurmd-{name}.restart.out", "ab")  # noqa: SIM115 (the daemon's)
        proc = subprocess.Popen([_which("slurmd"), "-D", "-f", str(self.conf), "-N", name],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self._script_env())
        self._restarted.append((proc, log))
        (self.directory / "run" / f"slurmd-{name}.pid").write_text(f"{proc.pid}\n")
        self.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)  # if set DOWN
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "-h", "-n", name, "-N", "-o", "%T", check=False).stdout.split()
            if states and set(states) <= {"idle", "mixed", "allocated"}:
                return
            time.sleep(0.5)
        raise TimeoutError(f"node {name} not back after {timeout}s")

    def preempt(self, job_id: str, seconds: float = 1, timeout: float = 60) -> str:
        """Preempt JOB_ID, running in the preemptible partition (``low``): submit a job to ``urgent``
        that wants the victim's nodes exclusively and runs ``sleep SECONDS``; wait until the victim
        is no longer RUNNING; return the urgent job's id. Other jobs on those nodes must be
        preemptible too, else the urgent job just waits. Measured: the victim's srun steps get SIGCONT
        and SIGTERM at once (a step that dies of it usually ends the job FAILED, not requeued: `--wrap
        "srun sleep 100"` does), the whole job (batch script too) 7-16 s later; it is requeued
        (PENDING, reason BeginTime) about 5 s after that and runs again 10 s later (cred_expire)."""
        nodes = self.run("squeue", "-h", "-j", str(job_id), "-o", "%N").stdout.strip()
        count = len(self.run("scontrol", "show", "hostnames", nodes).stdout.split())
        urgent = self.sbatch("-p", self.site["preemptor_partition"], "--nodelist", nodes, "-N", str(count),
                             "--exclusive", "--output", "/dev/null", "--wrap", f"sleep {seconds}")
        deadline = time.monotonic() + timeout
        while "RUNNING" in self.squeue_states(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running {timeout}s after urgent job {urgent}")
            time.sleep(0.2)
        return urgent

    def wait_for_job(self, job_id: str, timeout: float = 60, source: str = "squeue") -> str:
        """Wait until JOB_ID (all its array elements) has ended; return its state.

        ``source`` is "squeue" (slurmctld: immediate; falls back to sacct for a purged job) or
        "sacct" (the accounting database: a second or so later). For an array the result is the
        first state that is not COMPLETED, else COMPLETED. A job that sacct calls PREEMPTED but
        that squeue still has pending or running (requeued after preemption) is not over yet.
        Raises TimeoutError.
        """
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while True:
            states = self.sacct_states(job_id) if source == "sacct" else (
                self.squeue_states(job_id) or self.sacct_states(job_id))
            if "PREEMPTED" in states and source == "sacct" and any(
                    s not in TERMINAL_STATES for s in self.squeue_states(job_id)):
                states = [*states, "REQUEUED"]  # PreemptMode=REQUEUE: it will run again
            if states and all(s in TERMINAL_STATES for s in states):
                return next((s for s in states if s != "COMPLETED"), "COMPLETED")
            if time.monotonic() > deadline:
                queue = self.run("squeue", "-t", "all", "-o", "%i %T %r %N", check=False).stdout
                raise TimeoutError(f"job {job_id} not finished after {timeout}s ({source} states: "
                                   f"{states or 'none'}); squeue:\n{queue}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for f in sorted((self.directory / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            if text:
                parts.append(f"---- {f}\n" + "\n".join(text))
        return "\n".join(parts)

    # ------------------------------------------------------------------ start / stop
    def _script_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not is_foreign_slurm_var(k) or k.startswith("SLURM_TEST_")}
        env["PATH"] = os.pathsep.join([env.get("PATH", os.defpath), *SBIN_DIRS])
        env["SLURM_TEST_DIR"] = str(self.directory)
        env["SLURM_TEST_PORT"] = str(self.port)
        return env

    def start(self, timeout: float = 180) -> Self:
        if self._proc is not None:
            raise RuntimeError("cluster already started")
        slots = 1 if self._fixed else SLOTS
        t0 = time.monotonic()
        for slot in range(slots):
            self.directory = self._base_dir.with_name(self._base_dir.name + (f"-{slot}" if slot else ""))
            self.port = self._base_port + 100 * slot
            if self._start_one(t0 + timeout):
                self.start_seconds = time.monotonic() - t0
                atexit.register(self.stop)
                return self
        raise RuntimeError(f"no free Slurm test cluster slot (tried {slots}):\n{self._read_log()}")

    def _start_one(self, deadline: float) -> bool:
        """True once up, False when the slot is busy; raises on failure."""
        token = uuid.uuid4().hex
        if self._log is not None:
            self._log.close()
        # start.sh's output; kept open (and read on failure) until stop()
        self._log = tempfile.TemporaryFile(mode="w+", prefix="pml-dist-slurm-start-")  # noqa: SIM115
        env = self._script_env()
        env["SLURM_TEST_TOKEN"] = token
        # stdin is a pipe nobody writes to: when this process dies, even by SIGKILL, start.sh sees
        # end of file and stops the cluster (--stop-on-eof)
        self._proc = subprocess.Popen(["bash", str(SCRIPTS / "start.sh"), "--foreground", "--stop-on-eof"],
                                      env=env, stdin=subprocess.PIPE, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        ready = self.directory / "ready"
        while True:
            try:
                if ready.read_text().strip() == token:
                    return True
            except OSError:
                pass
            rc = self._proc.poll()
            if rc is not None:
                self._proc.stdin.close()
                self._proc = None
                if rc == BUSY and not self._fixed:
                    return False
                raise RuntimeError(f"start.sh failed (exit {rc}):\n{self._read_log()}")
            if time.monotonic() > deadline:
                self._terminate(15)
                raise RuntimeError(f"Slurm test cluster not up in time:\n{self._read_log()}")
            time.sleep(0.1)

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()

    def _terminate(self, timeout: float) -> None:
        """SIGTERM start.sh (its trap runs stop.sh), then SIGKILL its process group."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.stdin.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)

    def stop(self, timeout: float = 60) -> None:
        """Stop every daemon; bounded by about timeout + 30 s. Safe to call twice."""
        atexit.unregister(self.stop)
        proc = self._proc
        if proc is None:
            return
        t0 = time.monotonic()
        try:
            res = subprocess.run(["bash", str(SCRIPTS / "stop.sh")], env=self._script_env(), check=False,
                                 capture_output=True, text=True, timeout=timeout)
            self._log.write(res.stdout + res.stderr)
            proc.stdin.close()
            proc.wait(15)
            self._proc = None
        except subprocess.TimeoutExpired:
            self._terminate(15)
        for daemon, log in self._restarted:  # stop.sh stopped them; reap them
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
            log.close()
        self._restarted = []
        self.stop_seconds = time.monotonic() - t0
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

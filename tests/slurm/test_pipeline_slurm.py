"""The pipeline on the real two-node Slurm test cluster: the dependency graph, the students array,
a two-node teacher, afterok on failure, preemption / timeout requeue, and the plain sbatch scripts."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pml_dist.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "data.image_size=32",
    "data.max_resolution=48",
    "data.jit=false",
    "data.loader_workers=1",
    "model.width=16",
    "train.epochs=1",
    "train.micro_batch=16",
    "pseudo.taus=[0.5, 0.7]",
    "pseudo.modes=[hard]",
    "report.references=[]",
    "pseudo.teachers=[]",
    "slurm.teacher_nodes=2",
    "slurm.teacher_tasks_per_node=1",
    "slurm.infer_tasks_per_node=2",
    "slurm.cpu_time_min=10",
    "slurm.teacher_time_min=20",
    "slurm.infer_time_min=10",
    "slurm.student_time_min=20",
]


def sacct(job_id: str) -> dict[str, str]:
    """JobID -> State for a job and its array tasks (steps left out)."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("|")[:2] for line in out.splitlines() if line)


def test_whole_graph_on_slurm_with_a_two_node_teacher(slurm_cluster, synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *SMALL]
    # One student's folder is a file: its array task fails (as on a full or broken disk), the
    # other student still finishes, and the report, which needs both, is cancelled.
    (run / "students").mkdir(parents=True)
    (run / "students" / "tau-0.7").write_text("in the way")
    assert main(["run", "--executor", "slurm", "--wait", *overrides]) == 2
    err = capsys.readouterr().err
    failed_line = next(line for line in err.splitlines() if "students/tau-0.7 (job" in line)
    assert "ended FAILED" in failed_line and "Error" in failed_line and ".err" in failed_line
    assert "report (job" in err and "retry what failed" in err

    jobs = json.loads((run / "jobs.json").read_text())
    assert jobs["executor"] == "slurm"
    students = {t: jobs["jobs"][f"students/{t}"]["job_id"] for t in ("tau-0.5", "tau-0.7")}
    array_id = students["tau-0.5"].split("_")[0]
    assert students["tau-0.7"].split("_")[0] == array_id  # one array, one task per tau
    assert sacct(array_id) == {students["tau-0.5"]: "COMPLETED", students["tau-0.7"]: "FAILED"}
    assert json.loads((run / "students" / "tau-0.5" / "result.json").read_text())["target"] == "tau-0.5"
    teacher = json.loads((run / "teacher" / "result.json").read_text())
    assert teacher["world_size"] == 2 and len(set(teacher["rank_weight_digests"])) == 1
    # afterok order: each stage started after the one before it ended
    times = {}
    order = ["data", "teacher", "teacher/probs", "pseudo"]
    for stage in order:
        out = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-o", "Start,End", "-j", jobs["jobs"][stage]["job_id"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("|")
        times[stage] = (out[0], out[1].strip())
    for a, b in zip(order, order[1:], strict=False):
        assert times[a][1] <= times[b][0], (a, b, times)

    # status names the failed task with its log and the command that retries it alone
    assert main(["status", *overrides]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["students/tau-0.5"].split()[1] == "done"
    # a finished stage shows its result and, from sacct, its job's elapsed time
    assert re.search(r"^data +done +job \d+ \d\d:\d\d:\d\d$", rows["data"])
    assert re.search(r"done +test mAP \d+\.\d\d, val \d+\.\d\d; job \d+ ", rows["teacher"])
    assert rows["students/tau-0.7"].split()[1] == "failed" and ".err" in rows["students/tau-0.7"]
    retry = rows["retry"].split(None, 1)[1].split()
    assert retry[:4] == ["pml-dist", "run", "--executor", "slurm"]

    (run / "students" / "tau-0.7").unlink()
    done_before = (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns
    assert main([*retry[1:], "--wait"]) == 0
    again = json.loads((run / "jobs.json").read_text())["jobs"]
    resubmitted = {name for name, job in again.items() if jobs["jobs"].get(name) != job}
    assert resubmitted == {"students/tau-0.7", "report"}
    assert (run / "students" / "tau-0.7" / "result.json").is_file() and (run / "report.md").is_file()
    assert (run / "students" / "tau-0.5" / "result.json").stat().st_mtime_ns == done_before


def test_a_swept_reference_is_one_array_and_the_best_point_is_kept(slurm_cluster, synthetic_root, tmp_path,
                                                                   capsys):
    """Cole et al.'s model selection: a 2 x 2 grid of lr x micro batch for the full-BCE reference,
    one array task per point, then the point with the best validation mAP becomes the reference."""
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *SMALL, "slurm.teacher_nodes=1",
                 "pseudo.taus=[0.5]", "report.references=[bce]", "sweep.losses=[bce]",
                 "sweep.lr=[1e-3, 1e-2]", "sweep.micro_batch=[8, 16]"]
    assert main(["run", "--executor", "slurm", "--wait", *overrides]) == 0
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    points = {(lr, mb): f"sweep/references/bce/lr-{lr:g}_mb-{mb}/references/bce"
              for mb in (8, 16) for lr in (1e-3, 1e-2)}
    arrays = {jobs[name]["job_id"].split("_")[0] for name in points.values()}
    assert len(arrays) == 1 and all("_" in jobs[name]["job_id"] for name in points.values())
    assert set(sacct(arrays.pop()).values()) == {"COMPLETED"}

    results = {}
    for (lr, mb), name in points.items():
        results[(lr, mb)] = json.loads((run / name / "result.json").read_text())
        derived = json.loads((run / name / "derived.json").read_text())
        assert (derived["global_batch"], derived["lr"]) == (mb, lr)  # the grid's values, unscaled
    best = max(points, key=lambda p: results[p]["val_map"])
    chosen = json.loads((run / "references" / "bce" / "result.json").read_text())
    assert chosen["val_map"] == results[best]["val_map"] and chosen["test_map"] == results[best]["test_map"]
    grid = chosen["sweep"]["grid"]
    assert [(p["lr"], p["micro_batch"]) for p in grid] == list(points)
    assert (grid[chosen["sweep"]["chosen"]]["lr"], grid[chosen["sweep"]["chosen"]]["micro_batch"]) == best
    assert ((run / "references" / "bce" / "best.pt").read_bytes()
            == (run / points[best] / "best.pt").read_bytes())
    end = max(_end(jobs[name]["job_id"]) for name in points.values())
    assert end <= _start(jobs["references/bce"]["job_id"])  # the selection waited for every point

    table = (run / "report.md").read_text().split("Model selection")[1]
    chosen_row = next(line for line in table.splitlines() if line.endswith("| chosen |"))
    assert f"| {best[0]:g} | {best[1]} |" in chosen_row
    capsys.readouterr()
    assert main(["status", *overrides]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert all(rows[name] == "done" for name in [*points.values(), "references/bce"]), rows


def _sacct_time(job_id: str, field: str) -> str:
    return subprocess.run(["sacct", "-n", "-X", "-P", "-o", field, "-j", job_id], capture_output=True,
                          text=True, check=True).stdout.split()[0]


def _start(job_id: str) -> str:
    return _sacct_time(job_id, "Start")


def _end(job_id: str) -> str:
    return _sacct_time(job_id, "End")


def test_a_failing_teacher_starts_nothing_downstream(slurm_cluster, synthetic_root, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [
        f"run.dir={run}",
        f"data.root={synthetic_root}",
        *SMALL,
        f"model.pretrained={tmp_path / 'no-such-weights.pth'}",
    ]  # fails inside the teacher job
    assert main(["run", "--executor", "slurm", "--wait", *overrides]) == 2
    err = capsys.readouterr().err
    assert "teacher (job" in err and "FAILED" in err and ".err" in err
    jobs = json.loads((run / "jobs.json").read_text())["jobs"]
    assert sacct(jobs["data"]["job_id"]) == {jobs["data"]["job_id"]: "COMPLETED"}
    deadline = time.time() + 60
    while time.time() < deadline:  # dependants are cancelled, never run
        states = {s: sacct(jobs[s]["job_id"]).get(jobs[s]["job_id"], "") for s in ("teacher/probs", "pseudo")}
        if all(v.startswith("CANCELLED") for v in states.values()):
            break
        time.sleep(1)
    assert all(v.startswith("CANCELLED") for v in states.values()), states
    assert not (run / "teacher" / "probs").exists() and not (run / "students").exists()
    assert main(["status", *overrides]) == 0
    status = capsys.readouterr().out
    assert "teacher" in status and "failed" in status and "log" in status


@pytest.mark.faults
def test_interrupted_training_requeues_and_matches_an_uninterrupted_run(slurm_cluster, synthetic_root,
                                                                        tmp_path):
    """Three ways a 2-rank teacher is stopped and requeued, each resuming to the weights of the
    uninterrupted run: submitit at its time limit (USR2), submitit on the preemptible partition
    preempted twice for real (an urgent job wants its node: Slurm SIGTERMs the ranks, they save at
    the next step boundary, the job is requeued and resumes, and again from the second resume), and
    the plain teacher.sbatch stopped with USR2 while one rank's teardown outlasts KillWait, so srun
    kills it and exits 137, not 3 (the script must requeue on the ranks' stop file anyway)."""
    import sys

    import submitit

    from pml_dist.config import load_config, write_resolved
    from pml_dist.pipeline.jobs import TrainJob
    from pml_dist.stages import Teacher
    from pml_dist.training.checkpoint import complete_steps

    # 10 epochs of 3 steps of a wider model at 48 px: after the first checkpoint (step 2) the job
    # trains for many more seconds, so the signal lands inside training, not after its last step
    # (a stop request during the final evaluation is rightly ignored: the job is finishing anyway).
    common = [f"data.root={synthetic_root}", *SMALL[:-7], "train.epochs=10", "train.ckpt_every=2",
              "train.log_every=1", "model.width=32", "data.image_size=48"]
    slow = tmp_path / "slow-teardown"  # a rank whose exit takes 12 s (KillWait is 5 s)
    slow.mkdir()
    (slow / "sitecustomize.py").write_text("import atexit, os, time\n"
                                           "if os.environ.get('SLURM_PROCID') == '1':\n"
                                           "    atexit.register(time.sleep, 12)\n")
    setup = tmp_path / "setup.sh"
    setup.write_text(f"export PATH={Path(sys.executable).parent}:$PATH PYTHONPATH={slow}\n")
    jobs = {}
    for name in ("whole", "usr2", "preempted", "plain"):
        run = tmp_path / name
        write_resolved(load_config(None, [f"run.dir={run}", *common]))
        assert main(["prepare", f"run.dir={run}", *common]) == 0
        if name == "plain":
            jobs[name] = slurm_cluster.sbatch("--nodes=1", "--ntasks-per-node=2", f"--output={run}/slurm.out",
                                              str(REPO / "slurm" / "teacher.sbatch"), "--setup", str(setup),
                                              str(run / "config.yaml"))
            continue
        executor = submitit.AutoExecutor(folder=run / "submitit", cluster="slurm")
        executor.update_parameters(timeout_min=20, tasks_per_node=2, nodes=1, slurm_signal_delay_s=30)
        if name == "preempted":
            executor.update_parameters(slurm_partition=slurm_cluster.site["preemptible_partition"])
        jobs[name] = executor.submit(TrainJob(str(run / "config.yaml"), stage=Teacher()))
    # Slurm's time limit: USR2 (signal_delay_s early), sent with scancel --signal (it reaches every
    # rank of the job's steps); preemption: a real one (SIGTERM to the steps at once).
    for name, signal in (("usr2", "USR2"), ("preempted", None), ("plain", "USR2")):
        marker = tmp_path / name / "teacher" / "ckpt" / "step-2" / "COMPLETE"
        deadline = time.time() + 400
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        job_id = jobs[name] if name == "plain" else jobs[name].job_id
        if signal is None:
            slurm_cluster.preempt(job_id)
        else:
            subprocess.run(["scancel", "--signal", signal, job_id], check=True)
    # The second preemption: once the requeued run has resumed and written a checkpoint of its own
    # (its handlers are in place and it is inside training, not starting up or finishing).
    ckpt, log0 = (tmp_path / "preempted" / "teacher" / p for p in ("ckpt", "logs/rank-0.log"))
    deadline = time.time() + 400
    while "resumed from" not in log0.read_text() and time.time() < deadline:
        time.sleep(0.1)
    before = set(complete_steps(ckpt))
    while not set(complete_steps(ckpt)) - before and time.time() < deadline:
        time.sleep(0.05)
    slurm_cluster.preempt(jobs["preempted"].job_id)
    results = {name: job.results()[0] for name, job in jobs.items() if name != "plain"}
    assert slurm_cluster.wait_for_job(jobs["plain"], timeout=600) == "COMPLETED"
    results["plain"] = {k: json.loads((tmp_path / "plain" / "teacher" / "result.json").read_text())[k]
                        for k in ("test_map", "val_map")}
    # (a killed rank can cut a progress bar's character in half)
    plain_log = (tmp_path / "plain" / "logs" / "slurm" / f"teacher-{jobs['plain']}.out").read_text(
        errors="replace")
    requeued = re.search(r"every rank saved a checkpoint \(srun status (\d+)\); requeueing", plain_log)
    assert requeued and requeued.group(1) != "3", plain_log[-3000:]  # the slow rank was killed
    resumes = {name: (tmp_path / name / "teacher" / "logs" / "rank-0.log").read_text().count("resumed from")
               for name in ("usr2", "preempted", "plain")}
    assert resumes == {"usr2": 1, "preempted": 2, "plain": 1}
    assert slurm_cluster.restarts(jobs["preempted"].job_id) >= 2
    # each time, every rank saved at a step boundary first, then submitit's handler requeued the job
    # (not Slurm killing it at the end of GraceTime and resuming from an older checkpoint)
    assert jobs["preempted"].paths.stderr.read_text().count("this job is preempted") == 2
    for name in ("usr2", "preempted", "plain"):
        assert {k: results[name][k] for k in ("test_map", "val_map")} == {
            k: results["whole"][k] for k in ("test_map", "val_map")}, name
    last = {name: max((tmp_path / name / "teacher" / "ckpt").glob("step-*"), key=lambda p: int(p.name[5:]))
            for name in jobs}
    weights = {name: torch.load(c / "mp_rank_00_model_states.pt", weights_only=False)["module"]
               for name, c in last.items()}
    for name in ("usr2", "preempted", "plain"):
        assert all(torch.equal(weights["whole"][k], weights[name][k]) for k in weights["whole"]), name


def _starting_task(job_id: str, timeout: float = 120) -> int:
    """The pid of JOB_ID's Python task once it has blocked SIGTERM (stop.DEFERRED_START, its first
    statement): from then on until its StopFlag is installed, seconds later, a SIGTERM used to kill
    it. The test cluster's nodes are this machine, so the task is a local process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                args = (proc / "cmdline").read_bytes().split(b"\0")
                python = Path(args[0].decode()).name.startswith("python")
                if not python or b"submitit.core._submit" not in args:
                    continue
                if f"SLURM_JOB_ID={job_id}".encode() not in (proc / "environ").read_bytes().split(b"\0"):
                    continue
                blocked = re.search(r"^SigBlk:\s*([0-9a-f]+)$", (proc / "status").read_text(), re.M)
            except (OSError, UnicodeDecodeError, IndexError):
                continue
            if blocked and int(blocked.group(1), 16) & (1 << (15 - 1)):
                return int(proc.name)
        time.sleep(0.01)
    raise TimeoutError(f"job {job_id}'s task did not start within {timeout}s")


@pytest.mark.faults
def test_a_job_signalled_as_it_starts_defers_the_signal_stops_at_the_first_step_and_is_requeued(
        slurm_cluster, synthetic_root, tmp_path):
    """`pml-dist run`'s teacher job on the preemptible partition gets SIGTERM (what a preemption
    sends the job's steps at once) the moment its task's Python has started: before any import and
    any handler, where it used to die of it and the job ended FAILED without a requeue. The signal
    waits (blocked) until the StopFlag is in, which takes it as a request: the rank saves at the
    first step boundary, submitit requeues the job, and the rerun resumes and finishes."""
    from pml_dist.config import load_config, write_resolved
    from pml_dist.pipeline.executor import make_executor, resources
    from pml_dist.pipeline.jobs import TrainJob
    from pml_dist.stages import Teacher

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *SMALL[:-7], "train.log_every=1",
                 "slurm.teacher_nodes=1", "slurm.teacher_tasks_per_node=1", "slurm.teacher_time_min=20",
                 f"slurm.partition={slurm_cluster.site['preemptible_partition']}"]
    cfg = load_config(None, overrides)
    write_resolved(cfg)
    assert main(["prepare", *overrides]) == 0
    job = make_executor(cfg, "slurm", "teacher", resources(cfg, "teacher")).submit(
        TrainJob(str(run / "config.yaml"), stage=Teacher()))
    _starting_task(job.job_id)
    slurm_cluster.run("scancel", "--signal=TERM", job.job_id)
    assert job.results()[0]["test_map"] > 0
    assert slurm_cluster.restarts(job.job_id) == 1
    err = job.paths.stderr.read_text()
    assert "SIGTERM arrived while this process was starting (deferred)" in err
    # submitit's requeue, after the save (20 min: submitit calls a job "timed-out" in its last 10)
    assert err.count("this job is preempted") == 1
    log0 = (run / "teacher" / "logs" / "rank-0.log").read_text()
    assert re.findall(r"resumed from \S*/(step-\d+)", log0) == ["step-1"]
    assert (run / "teacher" / "result.json").is_file()


def test_plain_sbatch_scripts_from_another_directory_with_a_clean_environment(
    slurm_cluster, synthetic_root, tmp_path
):
    """As on a site that demands it: submitted from a scratch folder (not the repository) with
    --export=NONE, so the job sees nothing of this shell; a setup file makes `python3 -m pml_dist`
    work, the preset's slurm.env reaches every rank, and the logs land in the run directory."""
    import sys

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *SMALL, "slurm.env=[SITE_VAR=42]"]
    assert main(["prepare", *overrides]) == 0
    config = str(run / "config.yaml")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    setup = scratch / "setup.sh"  # what `module load` / `conda activate` do on a site
    setup.write_text(f"export PATH={Path(sys.executable).parent}:$PATH\n")

    def sbatch(*args: str) -> str:
        out = subprocess.run(
            ["sbatch", "--parsable", "--wait", "--export=NONE", *args, "--setup", str(setup), config],
            cwd=scratch, capture_output=True, text=True, timeout=600, env=slurm_cluster.subprocess_env(),
        )
        logs = "".join(p.read_text() for p in [*scratch.glob("slurm-*.out"), *run.glob("logs/slurm/*.out")])
        assert out.returncode == 0, out.stderr + logs
        return out.stdout.strip().split(";")[0]

    teacher = sbatch("--nodes=2", "--ntasks-per-node=1", str(REPO / "slurm" / "teacher.sbatch"))
    assert sacct(teacher)[teacher] == "COMPLETED"
    assert json.loads((run / "teacher" / "result.json").read_text())["world_size"] == 2
    assert "rank 0/2 local 0/1 (slurm)" in (run / "logs" / "slurm" / f"teacher-{teacher}.out").read_text()
    for rank in (0, 1):  # each rank's start line shows the site's variable: it reached every task
        assert "SITE_VAR=42" in (run / "teacher" / "logs" / f"rank-{rank}.log").read_text()
    infer = sbatch(str(REPO / "slurm" / "infer.sbatch"))
    assert sacct(infer)[infer] == "COMPLETED"
    assert "tau-0.7" in json.loads((run / "pseudo" / "stats.json").read_text())["targets"]
    students = sbatch("--array=0-1", str(REPO / "slurm" / "students.sbatch"))
    assert set(sacct(students).values()) == {"COMPLETED"}
    for target in ("tau-0.5", "tau-0.7"):
        assert (run / "students" / target / "result.json").is_file()
    assert sorted(p.name for p in (run / "logs" / "slurm").glob("students-*.out")) == [
        f"students-{students}_0.out", f"students-{students}_1.out"]

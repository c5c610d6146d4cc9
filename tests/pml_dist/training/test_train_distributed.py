"""Real DeepSpeed engines on gloo, 2 processes, launched as torchrun would (the five variables set
by hand), on a small generated data set."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pml_dist.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[3]
BASE = [
    "data.image_size=32", "data.max_resolution=48", "data.jit=false",
    "data.loader_workers=1", "model.width=8", "train.micro_batch=8", "train.eval_batch=64",
    "train.log_every=1", "train.keep_last=100",
]


@pytest.fixture
def run(synthetic_root, tmp_path):
    """A prepared run directory; returns (overrides, run_dir)."""

    def make(*extra: str) -> tuple[list[str], Path]:
        run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        overrides = [f"run.dir={run_dir}", f"data.root={synthetic_root}", *BASE, *extra]
        assert main(["prepare", *overrides]) == 0
        return overrides, run_dir

    return make


RESUMABLE = ("train.epochs=5", "train.ckpt_every=2")  # 5 epochs of 7 steps, a checkpoint every 2


@pytest.fixture(scope="module")
def whole(synthetic_root, tmp_path_factory) -> Path:
    """One uninterrupted 2-rank run, the reference of every interrupted one in this module."""
    run_dir = tmp_path_factory.mktemp("whole") / "run"
    overrides = [f"run.dir={run_dir}", f"data.root={synthetic_root}", *BASE, *RESUMABLE]
    assert main(["prepare", *overrides]) == 0
    assert wait(launch(2, overrides)) == [0, 0]
    return run_dir


def launch(world: int, overrides: list[str], stage: str = "teacher") -> list[subprocess.Popen]:
    port = 29500 + os.getpid() % 1000 + world
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "train.py"), "--stage", stage, *overrides],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    return procs


def wait(procs, timeout=400) -> list[int]:
    codes = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        codes.append(p.returncode)
        if p.returncode not in (0, 3):
            print(out[-4000:])
    return codes


def weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """The model weights in a ZeRO checkpoint (the last one by default)."""
    ckpt = run_dir / "teacher" / "ckpt"
    step = step if step is not None else max(int(p.name[5:]) for p in ckpt.glob("step-*"))
    state = torch.load(ckpt / f"step-{step}" / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which differ between any two runs."""
    out = []
    for line in (run_dir / "teacher" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("samples_per_s", None)
        out.append(rec)
    return out


def wait_for(path: Path, poll: float = 0.05, timeout: float = 300) -> None:
    """Until `path` exists (a checkpoint's marker: the moment to interrupt a run), at most `timeout` s."""
    deadline = time.time() + timeout
    while not path.exists() and time.time() < deadline:
        time.sleep(poll)


def assert_same_run(whole: Path, parts: Path) -> None:
    """The interrupted-and-resumed run ended exactly where the uninterrupted one did: every weight
    bit for bit, every metrics record."""
    final_whole, final_parts = weights(whole), weights(parts)
    assert final_whole.keys() == final_parts.keys()
    for name in final_whole:
        assert torch.equal(final_whole[name], final_parts[name]), name
    assert records(whole) == records(parts)


def test_two_ranks_agree_and_a_stopped_run_resumes_exactly(run, whole):
    """Uninterrupted vs stopped (SIGUSR2 to one rank only) + resumed: same weights, same metrics."""
    # 5 epochs of 7 steps: the signal sent at the first checkpoint (step 2) finds the run mid-way
    result = json.loads((whole / "teacher" / "result.json").read_text())
    assert len(result["rank_weight_digests"]) == 2
    assert len(set(result["rank_weight_digests"])) == 1, "ranks ended with different weights"
    # the decision thresholds, chosen on the validation split with the best epoch's weights: that
    # pass reproduces the best epoch's validation mAP exactly
    thresholds = json.loads((whole / "teacher" / "thresholds.json").read_text())
    assert (thresholds["val_map"], thresholds["best_epoch"]) == (result["val_map"], result["best_epoch"])
    num_classes = len(result["test_ap"])
    assert len(thresholds["threshold"]) == len(thresholds["f1"]) == num_classes
    assert all(0 <= t <= 1 for t in thresholds["threshold"])
    for c in thresholds["classes_without_positives"]:
        assert thresholds["threshold"][c] == thresholds["global"]["threshold"] and thresholds["f1"][c] is None

    overrides2, parts = run(*RESUMABLE)
    procs = launch(2, overrides2)
    wait_for(parts / "teacher" / "ckpt" / "step-2" / "COMPLETE")
    procs[1].send_signal(signal.SIGUSR2)  # one rank is preempted; both must stop together
    assert wait(procs) == [3, 3]
    assert not (parts / "teacher" / "result.json").exists()
    stopped_at = max(int(p.name[5:]) for p in (parts / "teacher" / "ckpt").glob("step-*"))
    total = json.loads((whole / "teacher" / "derived.json").read_text())["total_steps"]
    assert 2 <= stopped_at < total  # stopped part way, so the rerun really resumes

    assert wait(launch(2, overrides2)) == [0, 0]
    assert_same_run(whole, parts)
    assert (parts / "teacher" / "thresholds.json").read_text() == \
        (whole / "teacher" / "thresholds.json").read_text()
    # the resumed run's TensorBoard (two event files, the first purged after the checkpoint) shows
    # what the uninterrupted one does; throughput aside
    assert _board(parts) == _board(whole)


def _board(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "teacher" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if tag != "train/samples_per_s"}


@pytest.mark.faults
def test_a_rank_killed_mid_epoch_fails_the_run_and_the_rerun_resumes_from_a_complete_checkpoint(run, whole):
    """SIGKILL to one rank mid-epoch (no chance to save): both ranks exit with an error (the other
    one's collective fails), nothing is marked done, and the rerun resumes from the newest
    checkpoint that has its COMPLETE marker, never from a half-written folder (one is left beside
    it: a later step, no marker, a truncated weights file), and ends where the uninterrupted run
    ends (resize transform, no JIT: bit-reproducible)."""
    overrides, parts = run(*RESUMABLE)
    procs = launch(2, overrides)
    ckpt = parts / "teacher" / "ckpt"
    wait_for(ckpt / "step-2" / "COMPLETE")
    procs[1].send_signal(signal.SIGKILL)
    codes = wait(procs, timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] not in (0, 3), codes  # rank 0 noticed, and failed
    assert not (parts / "teacher" / "result.json").exists()
    complete = max(int(p.parent.name[5:]) for p in ckpt.glob("step-*/COMPLETE"))
    total = json.loads((whole / "teacher" / "derived.json").read_text())["total_steps"]
    assert 2 <= complete < total
    half = ckpt / f"step-{total - 1}"  # a save cut short: DeepSpeed's files, no marker
    shutil.copytree(ckpt / f"step-{complete}", half, dirs_exist_ok=True)
    (half / "COMPLETE").unlink()
    model_file = half / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:100])

    assert wait(launch(2, overrides)) == [0, 0]
    log0 = (parts / "teacher" / "logs" / "rank-0.log").read_text()
    resumed = re.findall(r"resumed from \S*/(step-\d+)", log0)
    assert resumed == [f"step-{complete}"]
    assert_same_run(whole, parts)


@pytest.mark.faults
def test_a_full_disk_stops_a_checkpoint_save_with_one_line_and_keeps_the_last_complete_one(run, small_disk,
                                                                                              fill_disk):
    """teacher/ckpt on a small real tmpfs. Once step 2's checkpoint is complete the rank is paused
    (SIGSTOP), the disk filled, and the rank resumed (SIGCONT): the save of step 4 fails with one
    line naming its folder and ENOSPC (exit 2), the folder is gone (nothing half-written under a
    checkpoint's name), step 2's checkpoint is intact, and with space again the rerun resumes from
    it and finishes."""
    from pml_dist.training.checkpoint import complete_steps

    overrides, parts = run("train.epochs=1", "train.ckpt_every=2")
    ckpt = parts / "teacher" / "ckpt"
    with small_disk(ckpt, "32m"):
        (proc,) = launch(1, overrides)
        wait_for(ckpt / "step-2" / "COMPLETE", poll=0.02)
        proc.send_signal(signal.SIGSTOP)
        try:
            fill_disk(ckpt)
        finally:
            proc.send_signal(signal.SIGCONT)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, out[-3000:]
        error = [line for line in out.splitlines() if "error:" in line]
        assert len(error) == 1 and "Traceback" not in out, out[-3000:]
        named = rf"^pml-dist train: error: {re.escape(str(ckpt))}/step-\d+: .*\(ENOSPC"
        assert re.search(named, error[0]), error
        assert "step-2" in error[0] and "is intact" in error[0]
        assert complete_steps(ckpt) == [2]
        # (`latest`: DeepSpeed's own pointer, written after a tag's files; resume reads the markers)
        assert sorted(p.name for p in ckpt.iterdir()) == ["filler", "latest", "step-2"]
        assert (ckpt / "latest").read_text().strip() == "step-2"
        (ckpt / "filler").unlink()
        assert wait(launch(1, overrides)) == [0]
    log0 = (parts / "teacher" / "logs" / "rank-0.log").read_text()
    assert re.findall(r"resumed from \S*/(step-\d+)", log0) == ["step-2"]
    assert (parts / "teacher" / "result.json").is_file()


@pytest.mark.faults
def test_a_full_disk_on_rank_0_stops_every_rank_with_one_line(run, small_disk, fill_disk):
    """Two ranks, teacher/ckpt on a small tmpfs filled (both ranks paused) once step 2's checkpoint
    is complete: rank 0, which writes the weights, fails its next save with the disk-full line; rank
    1, waiting for it in the save's collective, sees gloo's connection close and stops with one line
    naming rank 0's, not a traceback. Both exit 2, and each output ends with its line."""
    overrides, parts = run("train.epochs=1", "train.ckpt_every=2")
    ckpt = parts / "teacher" / "ckpt"
    with small_disk(ckpt, "32m"):
        procs = launch(2, overrides)
        wait_for(ckpt / "step-2" / "COMPLETE", poll=0.02)
        for proc in procs:
            proc.send_signal(signal.SIGSTOP)
        try:
            fill_disk(ckpt)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGCONT)
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], [out[-3000:] for out in outs]
    for out in outs:
        assert "Traceback" not in out, out[-3000:]
    last = [out.strip().splitlines()[-1] for out in outs]
    prefix = "pml-dist train: error: "
    assert re.match(rf"^{prefix}{re.escape(str(ckpt))}/step-\d+: .*\(ENOSPC.*\(rank 0\)", last[0]), last
    line0 = last[0].removeprefix(prefix)
    assert last[1] == f"{prefix}rank 1: stopped because rank 0 failed: {line0}"
    assert (parts / "teacher" / "logs" / "failed-rank-0.txt").read_text() == line0 + "\n"
    assert not (parts / "teacher" / "logs" / "failed-rank-1.txt").exists()


def hold(lock: Path) -> subprocess.Popen:
    """Another process holding `lock` (pml_dist/lock.py) until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pml_dist.lock import Lock\n"
         "with Lock(sys.argv[1], 'test'):\n    print('held', flush=True)\n    time.sleep(600)", str(lock)],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_stage_held_by_another_process_stops_every_rank_at_once_with_one_line(run):
    """Another live process holds teacher/logs/stage.lock. Rank 0 of a 2-rank training is refused by
    it, and rank 1, which takes no lock, hears why from rank 0 before the ranks meet (StartGate):
    both stop within seconds, far inside dist.timeout_s, each with one line, exit 2."""
    overrides, parts = run("train.epochs=1", "dist.timeout_s=300")
    holder = hold(parts / "teacher" / "logs" / "stage.lock")
    try:
        started = time.monotonic()
        procs = launch(2, overrides)
        outs = [proc.communicate(timeout=200)[0] for proc in procs]
        elapsed = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    assert [proc.returncode for proc in procs] == [2, 2], [out[-3000:] for out in outs]
    assert elapsed < 120, elapsed
    for out in outs:
        assert "Traceback" not in out and "frame #" not in out, out[-3000:]
    last = [out.strip().splitlines()[-1] for out in outs]
    prefix = "pml-dist train: error: "
    assert last[0].startswith(f"{prefix}stage {parts / 'teacher'} is in use by `"), last
    assert f"(pid {holder.pid} on " in last[0]
    assert last[1] == f"{prefix}rank 1: stopped because rank 0 failed: {last[0].removeprefix(prefix)}"
    assert not (parts / "teacher" / "ckpt").exists()


def test_torchrun_itself_refuses_a_held_stage_on_every_rank_then_trains(run):
    """Under torchrun its agent serves the rendezvous store (TORCHELASTIC_USE_AGENT_STORE) and every
    rank is a client of it: the start gate works there too. Refused while another process holds the
    stage (each rank's line in the output), then, the holder gone, the same command trains."""
    overrides, parts = run("train.epochs=1", "dist.timeout_s=300")
    holder = hold(parts / "teacher" / "logs" / "stage.lock")
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
               str(REPO / "launch" / "train.py"), "--stage", "teacher", *overrides]
    launcher_vars = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env["OMP_NUM_THREADS"] = "1"
    try:
        refused = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    finally:
        holder.kill()
        holder.wait()
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0
    line0 = re.search(r"pml-dist train: error: (stage \S+ is in use by .*)$", out, re.M)
    assert line0, out[-3000:]
    assert f"pml-dist train: error: rank 1: stopped because rank 0 failed: {line0.group(1)}" in out, \
        out[-3000:]
    trained = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    assert (parts / "teacher" / "result.json").is_file()


def test_one_step_is_the_same_at_any_world_size_and_accumulation(run):
    """With no batch statistics (GroupNorm), world 2 x micro 4 = world 1 x micro 8 =
    world 1 x accumulation 2 x micro 4: data parallelism is exact. SGD, not Adam: Adam's first step
    is about lr x sign(g), so a gradient near zero that differs in its last bits (summation order)
    flips a whole lr-sized update, while SGD's update is linear in the gradient."""
    common = ("model.norm=group", "train.epochs=1", "train.ckpt_every=1", "optim.name=sgd",
              "optim.momentum=0", "optim.lr=0.5")
    results = {}
    for name, world, extra in [("w2m4", 2, ("train.micro_batch=4",)),
                               ("w1m8", 1, ("train.micro_batch=8",)),
                               ("w1a2m4", 1, ("train.micro_batch=4", "train.grad_accum=2"))]:
        overrides, run_dir = run(*common, *extra)
        assert wait(launch(world, overrides)) == [0] * world
        results[name] = weights(run_dir, step=1)
    reference = results["w1m8"]
    for name in ("w2m4", "w1a2m4"):
        for key, value in reference.items():
            assert torch.allclose(results[name][key], value, rtol=1e-5, atol=1e-6), (name, key)
    # the step did move the weights away from their (seeded) initial values
    from pml_dist.training.models import build_model

    torch.manual_seed(0)
    initial = build_model("small_resnet", 20, width=8, norm="group").state_dict()
    assert not torch.allclose(reference["model.fc.weight"], initial["fc.weight"])


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_stages_train_on_two_ranks_and_refuse_another_world_size(run, zero):
    overrides, run_dir = run(f"dist.deepspeed_config=configs/deepspeed/zero{zero}.json", "train.epochs=1")
    assert wait(launch(2, overrides)) == [0, 0]
    result = json.loads((run_dir / "teacher" / "result.json").read_text())
    assert len(set(result["rank_weight_digests"])) == 1
    (run_dir / "teacher" / "result.json").unlink()  # pretend the job died after its last checkpoint
    proc = subprocess.run([sys.executable, "-m", "pml_dist", "train", "--stage", "teacher", *overrides],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert proc.returncode == 2
    assert f"a ZeRO-{zero} checkpoint from 2 ranks cannot load on 1" in proc.stderr
    assert "ds_to_universal" in proc.stderr

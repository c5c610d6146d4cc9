"""How one rank's failure reaches the others, on real processes. Before the ranks meet, rank 0's
word (pml_dist/start_gate.py) over a real TCPStore: its refusal stops the others with its line, its
death before a word stops them with one line at once, and after "go" the process group is built on
the same store and works. After they met, dist.PeerFailures.watch: a rank blocked in a collective
whose peer published its failure but does not close the connection (as NCCL behaves when a peer
exits) is ended with one line within seconds, not after dist.timeout_s."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# argv: rank, world, port, what rank 0 does ("go", "stop", "die"), timeout_s
RANK = textwrap.dedent("""
    import os, sys, time
    from pml_dist import dist
    from pml_dist.errors import PmlError
    from pml_dist.start_gate import StartGate

    rank, world, port, act, timeout = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \\
        float(sys.argv[5])
    info = dist.RankInfo(rank, world, 0, 1, "127.0.0.1", port, "test")
    try:
        gate = StartGate(info, timeout)
        if rank > 0:  # connected: a rank 0 told to die waits for this
            open(os.environ["CONNECTED"] + str(rank), "w").close()
        with gate.decided_by_rank0((PmlError,), on_go=lambda: print("on_go", flush=True)):
            if rank == 0 and act == "stop":
                raise PmlError("stage x is in use by `pml-dist train` (pid 1 on node-3)")
            if rank == 0 and act == "die":
                while not all(os.path.exists(os.environ["CONNECTED"] + str(r)) for r in range(1, world)):
                    time.sleep(0.05)
                os._exit(7)
            gate.go()
        import torch
        dist.init_process_group(info, timeout, torch.device("cpu"), gate.store)
        t = torch.tensor([rank + 1.0])
        torch.distributed.all_reduce(t)
        print("sum", int(t.item()), flush=True)
        dist.destroy_process_group()
    except PmlError as exc:
        print("error:", exc, flush=True)
        sys.exit(2)
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp_path, world: int, act: str, timeout_s: float = 60) -> tuple[list[int], list[str], float]:
    port, started = _port(), time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONNECTED": str(tmp_path / "connected-")}
    procs = [subprocess.Popen([sys.executable, "-c", RANK, *map(str, (r, world, port, act, timeout_s))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
             for r in range(world)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    return [p.returncode for p in procs], outs, time.monotonic() - started


def test_after_go_every_rank_meets_on_the_gates_store(tmp_path):
    codes, outs, _ = _ranks(tmp_path, 3, "go")
    assert codes == [0, 0, 0], outs
    assert all(out.strip().splitlines()[-2:] == ["on_go", "sum 6"] for out in outs), outs


def test_rank_0s_refusal_stops_the_others_with_its_line(tmp_path):
    codes, outs, elapsed = _ranks(tmp_path, 3, "stop")
    assert codes == [2, 2, 2], outs
    line = "stage x is in use by `pml-dist train` (pid 1 on node-3)"
    assert outs[0].strip() == f"error: {line}"  # no on_go anywhere
    for rank in (1, 2):
        assert outs[rank].strip() == f"error: rank {rank}: stopped because rank 0 failed: {line}", outs
    assert elapsed < 30


def test_rank_0_dying_before_its_word_stops_the_others_in_one_line_at_once(tmp_path):
    codes, outs, elapsed = _ranks(tmp_path, 2, "die", timeout_s=300)
    assert codes == [7, 2], outs
    last = outs[1].strip().splitlines()[-1]
    assert last.startswith("error: rank 1: stopped because rank 0 ended before the start: the rendezvous "
                           "store at 127.0.0.1:"), outs[1]
    assert "Traceback" not in outs[1]
    assert elapsed < 60  # not dist.timeout_s


@pytest.mark.timeout(120)
def test_a_one_process_job_has_no_gate():
    from pml_dist import dist
    from pml_dist.errors import PmlError
    from pml_dist.start_gate import StartGate

    gate = StartGate(dist.RankInfo(0, 1, 0, 1, "127.0.0.1", 1, "single"), 5)
    with pytest.raises(PmlError, match="boom"), gate.decided_by_rank0((PmlError,)):
        gate.go()
        raise PmlError("boom")
    assert gate.store is None


# argv: rank, folder, port. Rank 0 publishes a failure and stays alive without joining the
# all_reduce; rank 1 waits in it, watched.
WATCHED = textwrap.dedent("""
    import sys, time, datetime, torch, torch.distributed as tdist
    from pml_dist import dist

    rank, folder, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tdist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}",
                             timeout=datetime.timedelta(seconds=300))
    peers = dist.PeerFailures(folder, rank, 2, release=lambda: print("released", flush=True))
    if rank == 0:
        peers.publish("teacher/ckpt/step-4: No space left on device (ENOSPC)")
        time.sleep(120)
    else:
        peers.watch(prefix="pml-dist train: error: ", interval_s=0.5)
        tdist.all_reduce(torch.ones(1))
        print("all_reduce returned", flush=True)
""")


def test_a_rank_blocked_in_a_collective_is_ended_by_its_peers_published_failure(tmp_path):
    port = _port()
    procs = [subprocess.Popen([sys.executable, "-c", WATCHED, str(r), str(tmp_path), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(2)]
    try:
        started = time.monotonic()
        out, err = procs[1].communicate(timeout=120)
        elapsed = time.monotonic() - started
    finally:
        procs[0].kill()
        procs[0].wait()
    assert procs[1].returncode == 2, err[-2000:]
    assert out == "released\n"
    assert err.strip().splitlines()[-1] == ("pml-dist train: error: rank 1: stopped because rank 0 failed: "
                                            "teacher/ckpt/step-4: No space left on device (ENOSPC)")
    assert elapsed < 60  # the collective's timeout is 300 s


def test_an_unwatched_rank_is_left_alone(tmp_path):
    from pml_dist import dist

    peers = dist.PeerFailures(tmp_path, 1, 2)
    peers.watch(prefix="", interval_s=0.05)
    peers.unwatch()
    time.sleep(0.2)  # the thread has seen the stop
    dist.PeerFailures(tmp_path, 0, 2).publish("late line")
    time.sleep(0.3)  # a watching thread would have ended this process by now
    assert (tmp_path / "failed-rank-0.txt").read_text() == "late line\n"

"""prepare on a full disk: one line naming the .beton and ENOSPC, what was complete kept, nothing
half-written under a final name. The disk is a small real tmpfs (root only; else the test skips)."""

from __future__ import annotations

import pytest

from pml_dist.cli import main

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


@pytest.mark.parametrize("leave", [
    0,  # full before the write: the writer's first bytes (the header, in this process) fail
    65536,  # full part way: the ENOSPC hits an FFCV writer process, which leaves it to the parent
])
def test_a_full_disk_stops_prepare_with_one_line_and_keeps_the_complete_betons(synthetic_root, tmp_path,
                                                                               capsys, leave, small_disk,
                                                                               fill_disk):
    """data/ on a small tmpfs: a prepared run loses its test.beton, the disk fills up (but for
    `leave` bytes), and prepare again must stop with one line naming test.beton (with no byte left:
    its lock) and ENOSPC (exit
    2), leave train.beton and val.beton byte for byte (and stats.json), and leave no test.beton
    nor a temporary file."""
    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", "data.max_resolution=48",
                 "data.image_size=48", "data.write_workers=2"]
    data = run / "data"
    with small_disk(data, "16m"):
        assert main(["prepare", *overrides]) == 0
        (data / "test.beton").unlink()  # (prepare drops its side file test.labels.npz as stale)
        before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file() and p.name[:5] != "test."}
        side = (data / "test.labels.npz").read_bytes()
        fill_disk(data, leave)
        capsys.readouterr()
        assert main(["prepare", *overrides]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        last = err.strip().splitlines()[-1]  # after FFCV's progress bar
        assert last.startswith("pml-dist prepare: error: ") and "(ENOSPC)" in last, err
        # with no byte left, writing prepare's lock (data/logs/prepare.lock) fails first
        assert str(data / "logs" / "prepare.lock" if leave == 0 else data / "test.beton") in last, err
        after = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
        if leave == 0:  # stopped before anything was touched: test.beton's stale side file is still there
            assert after.pop("test.labels.npz") == side
        assert after.pop("filler") is not None and after == before  # no test.beton, no temporary file


@pytest.mark.timeout(120)
def test_a_disk_that_fills_at_the_workers_last_page_is_reported_not_waited_for(synthetic_root, tmp_path,
                                                                              capsys, monkeypatch):
    """A writer process counts its samples done before it writes its last page, so the disk can fill
    up after the count is complete (what the 65536 case above hits now and then). The writer
    processes (forked, so they carry the patch) fail there, late, with ENOSPC: prepare must stop with
    the one line naming the .beton, not wait forever for their page lists."""
    import errno
    import multiprocessing
    import time

    from ffcv.memory_allocator import MemoryAllocator

    if multiprocessing.get_start_method() != "fork":
        pytest.skip("the fault is patched into forked writer processes")

    def last_page_fails(self, *exc):
        time.sleep(0.5)  # the parent has seen every sample counted by now
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MemoryAllocator, "__exit__", last_page_fails)
    run = tmp_path / "run"
    assert main(["prepare", f"run.dir={run}", f"data.root={synthetic_root}", "data.max_resolution=48",
                 "data.write_workers=2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("pml-dist prepare: error: ") and "(ENOSPC)" in last, err
    assert str(run / "data" / "train.beton") in last, last
    assert not any((run / "data").glob("train.beton*"))

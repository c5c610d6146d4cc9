"""prepare against changed inputs, leftovers of killed runs, and Ctrl-C / SIGKILL of a real process."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ffcv.reader import Reader

from ffcv_data import atomic
from ffcv_data.errors import DataError
from ffcv_data.prepare import remove_stale_files
from ffcv_data.prepared import PreparedData
from pml_dist.config import load_config
from pml_dist.data_stage import prepare

pytestmark = pytest.mark.timeout(300)  # FFCV's writer hangs on some failures: never wait forever


@pytest.fixture
def own_copy(synthetic_root, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(synthetic_root, root)
    return root


def _overrides(root, run, *extra):
    return [f"run.dir={run}", f"data.root={root}", "data.max_resolution=48", "data.write_workers=2", *extra]


@pytest.mark.faults
def test_annotations_edited_after_prepare_are_an_error_naming_the_file(own_copy, tmp_path):
    cfg = load_config(None, _overrides(own_copy, tmp_path / "run"))
    prepare(cfg)
    before = {p.name: p.read_bytes() for p in cfg.data_dir.iterdir()}
    assert "inputs.json" in before
    ann = own_copy / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["category_id"] = data["categories"][-1]["id"]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as err:
        prepare(cfg)
    msg = str(err.value)
    assert "annotations/instances_train.json changed" in msg and f"delete {cfg.data_dir}" in msg
    assert "test" not in msg.split(":", 1)[1].split(";")[0]  # names the changed input only
    assert "\n" not in msg
    assert {p.name: p.read_bytes() for p in cfg.data_dir.iterdir()} == before  # stats.json untouched


@pytest.mark.faults
def test_other_encoding_keys_or_images_are_an_error_naming_them(own_copy, tmp_path):
    cfg = load_config(None, _overrides(own_copy, tmp_path / "run"))
    prepare(cfg)
    other = load_config(None, _overrides(own_copy, tmp_path / "run", "data.jpeg_quality=80",
                                         "data.val_seed=5"))
    with pytest.raises(DataError,
                       match=r"prepared from other inputs: val_seed 0 -> 5; jpeg_quality 90 -> 80; delete "):
        prepare(other)
    other_workers = load_config(None, [*_overrides(own_copy, tmp_path / "run"), "data.write_workers=1"])
    prepare(other_workers)  # how it is written is no input of the content
    image = sorted((own_copy / "test").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes() + b"\0")
    with pytest.raises(DataError, match=r"the test image list changed \(file names or sizes differ\)"):
        prepare(cfg)


@pytest.mark.faults
def test_a_folder_prepared_before_the_input_record_is_adopted(own_copy, tmp_path, caplog):
    """Folders an older version prepared keep working: the current inputs are recorded (with a
    warning that earlier changes cannot be seen), and from then on a change is an error."""
    cfg = load_config(None, _overrides(own_copy, tmp_path / "run"))
    prepare(cfg)
    record = (cfg.data_dir / "inputs.json").read_text()
    (cfg.data_dir / "inputs.json").unlink()
    betons = {p.name: p.stat().st_mtime_ns for p in cfg.data_dir.glob("*.beton")}
    prepare(cfg)
    assert "no inputs.json (an older version prepared it)" in caplog.text
    assert (cfg.data_dir / "inputs.json").read_text() == record
    assert {p.name: p.stat().st_mtime_ns for p in cfg.data_dir.glob("*.beton")} == betons
    annotations = own_copy / "annotations" / "instances_train.json"
    annotations.write_text(annotations.read_text() + "\n")
    with pytest.raises(DataError, match="instances_train.json changed"):
        prepare(cfg)


@pytest.mark.faults
def test_a_beton_whose_side_file_is_missing_gets_it_back_without_being_rewritten(own_copy, tmp_path):
    """Killed between the .beton's rename and its side file's: the rerun writes only the side file."""
    cfg = load_config(None, _overrides(own_copy, tmp_path / "run"))
    prepare(cfg)
    meta, beton = cfg.data_dir / "val.labels.npz", cfg.data_dir / "val.beton"
    with np.load(meta) as m:
        content = {k: m[k] for k in m.files}
    mtime = beton.stat().st_mtime_ns
    meta.unlink()
    prepare(cfg)
    assert beton.stat().st_mtime_ns == mtime
    with np.load(meta) as m:
        assert m.files == list(content) and all(np.array_equal(m[k], v) for k, v in content.items())


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.faults
def test_stale_files_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    out = PreparedData(tmp_path / "data")
    out.folder.mkdir()
    dead, live = _dead_pid(), os.getppid()
    stale = [f".train.beton.tmp-{dead}.beton", f".val.labels.npz.tmp-{dead}.npz", f"test.beton.errors-{dead}",
             f".stats.json.tmp-{dead}.json", "test.labels.npz"]  # the last: a side file without its .beton
    kept = [f".train.beton.tmp-{live}.beton", f".test.beton.tmp-{os.getpid()}.beton", "val.beton",
            "val.labels.npz", f".notes.txt.tmp-{dead}.txt", "inputs.json"]
    for name in stale + kept:
        (out.folder / name).write_bytes(b"x")
    removed = remove_stale_files(out)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in out.folder.iterdir()) == sorted(kept)


def _crashed_writer(path, host: str) -> int:
    """A process that names itself `host` and dies (os._exit) inside atomic.save_with's write of
    `path`, leaving its temporary as a killed writer does; returns its (now dead) PID."""
    code = ("import os, sys\nfrom ffcv_data import atomic\natomic.host_name = lambda: sys.argv[2]\n"
            "atomic.save_with(sys.argv[1], lambda tmp: (tmp.write_bytes(b'x'), os._exit(0)))\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), host])
    assert proc.wait(timeout=60) == 0
    return proc.pid


@pytest.mark.faults
def test_a_sweep_removes_only_dead_temporaries_of_its_own_host(tmp_path, monkeypatch, caplog):
    """Two hosts write one shared data folder (NFS, Lustre): a PID says whether a process runs only
    on its own host, so host A's sweep removes A's temporary of a dead process, keeps A's live one,
    and leaves B's alone (logged once) however dead its PID looks here; B's own sweep removes it."""
    out = PreparedData(tmp_path / "data")
    out.folder.mkdir()
    host_a, host_b = "node-a", "gpu-node-12.cluster"  # dashes and dots: the name still parses
    dead_a = _crashed_writer(out.beton("train"), host_a)
    dead_b = _crashed_writer(out.beton("val"), host_b)
    monkeypatch.setattr(atomic, "host_name", lambda: host_a)
    live_a = atomic.temporary_path(out.beton("test"))  # this process: alive
    live_a.write_bytes(b"x")
    mine, theirs = f".train.beton.tmp-{host_a}-{dead_a}.beton", f".val.beton.tmp-{host_b}-{dead_b}.beton"
    assert sorted(p.name for p in out.folder.iterdir()) == sorted([mine, theirs, live_a.name])

    logger = logging.getLogger("ffcv_data.prepare")  # caplog's handler on it, whether the CLI's
    monkeypatch.setattr(logger, "propagate", False)   # setup turned propagation off or not
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="ffcv_data.prepare"):
            removed = remove_stale_files(out)
            assert remove_stale_files(out) == []
    finally:
        logger.removeHandler(caplog.handler)
    assert [p.name for p in removed] == [mine]
    assert sorted(p.name for p in out.folder.iterdir()) == sorted([theirs, live_a.name])
    assert sum(theirs in r.getMessage() for r in caplog.records) == 1  # logged once, not per sweep

    monkeypatch.setattr(atomic, "host_name", lambda: host_b)  # host B's sweep: A's live one is foreign
    assert [p.name for p in remove_stale_files(out)] == [theirs]
    assert [p.name for p in out.folder.iterdir()] == [live_a.name]


def test_the_host_part_of_a_name_is_a_file_name(monkeypatch):
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: "lab pc/7:ü")
    assert atomic.host_name() == "lab_pc_7__"
    assert atomic.temporary_path(Path("/d/x.npz")).name == f".x.npz.tmp-lab_pc_7__-{os.getpid()}.npz"
    monkeypatch.setattr(atomic.socket, "gethostname", lambda: "")
    assert atomic.host_name() == "localhost"


# ---------------------------------------------------------------- real processes, real signals
@pytest.fixture(scope="module")
def slow_root(tmp_path_factory):
    """Enough images that writing a split takes a moment (re-encoded, keep_original_jpegs=false)."""
    from ffcv_data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("signals") / "coco"
    make_synthetic(root, seed=0, n_train=400, n_test=60, image_size=48)
    return root


SIGNAL_OVERRIDES = ("data.keep_original_jpegs=false",)


@pytest.fixture(scope="module")
def undisturbed(slow_root, tmp_path_factory):
    cfg = load_config(None, _overrides(slow_root, tmp_path_factory.mktemp("ref") / "run", *SIGNAL_OVERRIDES))
    prepare(cfg)
    return cfg.data_dir


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".errors-" in p.name)


def _same_records(folder, reference):
    ref_stats, stats = (json.loads((f / "stats.json").read_text()) for f in (reference, folder))
    for s in (ref_stats, stats):
        s.pop("seconds"), s.pop("image_check_seconds")
    assert stats == ref_stats
    for split in ("train", "val", "test"):
        got, want = (Reader(str(f / f"{split}.beton")) for f in (folder, reference))
        assert got.num_samples == want.num_samples
        assert np.array_equal(got.metadata["f1"], want.metadata["f1"])  # the index field
        with np.load(folder / f"{split}.labels.npz") as a, np.load(reference / f"{split}.labels.npz") as b:
            assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in b.files)


def _gone(pgid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_interrupted_or_killed_prepare_leaves_nothing_and_resumes(slow_root, undisturbed, tmp_path, sig):
    """Ctrl-C goes to the whole foreground process group (the terminal's way); SIGKILL to the main
    process only (the OOM killer's way): its writer processes must not outlive it."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "pml_dist", "prepare", *_overrides(slow_root, run, *SIGNAL_OVERRIDES)]
    # Each record takes 10 ms more to encode (in the writer processes, which inherit the patch), so
    # the split is still being written when the signal lands, however busy the machine is.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\nfrom ffcv_data import beton\n_get = beton._SplitSource.__getitem__\n"
        "def slow(self, i):\n    time.sleep(0.01)\n    return _get(self, i)\n"
        "beton._SplitSource.__getitem__ = slow\n")
    path = os.pathsep.join(filter(None, (str(hook), os.environ.get("PYTHONPATH"))))
    env = {**os.environ, "PYTHONPATH": path}
    # SIGINT as in a terminal's foreground job: a shell starts background jobs (a CI runner's, say)
    # with SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    data = run / "data"
    deadline = time.monotonic() + 120
    while not (data.is_dir() and any(n.startswith(".train.beton.tmp-") for n in _temporaries(data))):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare never started writing"
        time.sleep(0.002)
    time.sleep(0.3)  # its writer processes are running (the split takes at least 340 x 10 ms / 2)
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)
    err = proc.communicate(timeout=60)[1]
    assert _gone(proc.pid), "a process of the interrupted prepare is still running"
    assert not (data / "train.beton").exists()
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
        assert err.rstrip().splitlines()[-1] == "pml-dist prepare: interrupted"
        assert len([line for line in err.splitlines() if "it/s]" not in line and line.strip()]) <= 6
        assert _temporaries(data) == []  # cleaned up by the interrupted process itself
    else:
        assert proc.returncode == -signal.SIGKILL
        assert _temporaries(data) == [f".train.beton.tmp-{atomic.host_name()}-{proc.pid}.beton"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _temporaries(data) == []
    _same_records(data, undisturbed)

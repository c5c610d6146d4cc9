"""Sharded inference + merge: exact coverage at any world size, and every kind of bad shard refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pml_dist.cli import main
from pml_dist.config import load_config
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.provenance import data_id, teacher_id
from pml_dist.pseudo.infer import infer
from pml_dist.pseudo.make import make_pseudo_labels
from pml_dist.pseudo.shards import SHARD_ARRAYS, npz_checksum
from pml_dist.stored_probs import read_stored_probs

pytestmark = pytest.mark.timeout(600)
REPO = Path(__file__).resolve().parents[3]
# 150 generated images -> 120 training samples: divides by neither 7 nor 9 (uneven shards).
OVERRIDES = ["data.image_size=32", "data.max_resolution=48", "data.jit=false", "data.loader_workers=1",
             "model.width=8", "infer.batch=16", "pseudo.store_min_prob=0"]  # keep every p: compared dense


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory):
    """A run directory with data and a teacher (seeded random weights: inference does not care)."""
    from pml_dist.training.models import build_model

    run = tmp_path_factory.mktemp("infer") / "run"
    overrides = [f"run.dir={run}", f"data.root={synthetic_root}", *OVERRIDES]
    assert main(["prepare", *overrides]) == 0
    torch.manual_seed(0)
    model = build_model("small_resnet", 20, width=8)
    for module in model.modules():  # non-trivial BatchNorm statistics, as a trained teacher has
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
    (run / "teacher").mkdir()
    torch.save(model.state_dict(), run / "teacher" / "best.pt")
    return run, overrides


def merged(run: Path) -> np.ndarray:
    """The merged probabilities as an N x L float16 matrix (the default targets keep every one)."""
    stored = read_stored_probs(run / "pseudo" / "probs.npz")
    assert stored.rule.min_prob == 0.0 and stored.rule.top_k is None
    return stored.dense()


def clone(prepared, tmp_path) -> tuple[Path, list[str]]:
    run, overrides = prepared
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.yaml").unlink()
    return copy, [o if not o.startswith("run.dir=") else f"run.dir={copy}" for o in overrides]


def run_ranks(overrides, world: int, monkeypatch, ranks=None) -> None:
    """Each rank as the launchers would start it (ranks are independent: no process group)."""
    cfg = load_config(None, overrides)
    for rank in ranks if ranks is not None else range(world):
        for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1,
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
            monkeypatch.setenv(key, str(value))
        infer(cfg)


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    """Single-process inference: the reference every sharded run must reproduce."""
    run, overrides = prepared
    cfg = load_config(None, overrides)
    mp = pytest.MonkeyPatch()
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        mp.delenv(key, raising=False)
    infer(cfg)
    mp.undo()
    make_pseudo_labels(cfg)
    probs = merged(run)
    shutil.rmtree(run / "teacher" / "probs")
    shutil.rmtree(run / "pseudo")
    return probs


@pytest.mark.parametrize("world", [2, 3, 7])
def test_sharded_inference_merges_to_the_single_process_result(prepared, single, tmp_path, monkeypatch,
                                                               world):
    run, overrides = clone(prepared, tmp_path)
    run_ranks(overrides, world, monkeypatch)
    result = make_pseudo_labels(load_config(None, overrides))
    probs = merged(run)
    assert probs.dtype == np.float16 and probs.shape == (120, 20)
    np.testing.assert_array_equal(probs, single)
    assert result["merge"]["padding_duplicates"] == (-120) % world
    assert result["merge"]["entries"] == 120 * 20
    stored = read_stored_probs(run / "pseudo" / "probs.npz")
    assert (stored.hist.sum(axis=1) == 120).all()  # every sample once: padding left out
    np.testing.assert_allclose(stored.sums, single.astype(np.float64).sum(axis=0), rtol=1e-9)
    record = json.loads((run / "pseudo" / "merge.json").read_text())
    assert record == json.loads(json.dumps(result["merge"]))
    layout = RunLayout(run)
    assert {k: record["inputs"][k] for k in ("teacher", "data")} == {"teacher": teacher_id(layout),
                                                                      "data": data_id(layout)}
    assert (record["teacher_id"], record["data_id"]) == (teacher_id(layout), data_id(layout))


def test_a_store_rule_keeps_the_largest_probabilities_above_min_prob_at_any_world_size(
        prepared, single, tmp_path, monkeypatch):
    """store_min_prob 0.5, store_top_k 3, over 7 ranks (padding): each row keeps its 3 largest p
    >= 0.5 of the single-process scores; the histograms still count every p, once per sample."""
    run, overrides = clone(prepared, tmp_path)
    overrides = [*overrides, "pseudo.store_min_prob=0.5", "pseudo.store_top_k=3", "pseudo.taus=[0.5, 0.7]"]
    run_ranks(overrides, 7, monkeypatch)
    make_pseudo_labels(load_config(None, overrides))
    stored = read_stored_probs(run / "pseudo" / "probs.npz")
    assert stored.rule.min_prob == 0.5 and stored.rule.top_k == 3
    third = np.sort(single.astype(np.float32), axis=1)[:, -3:-2]
    want = np.where((single >= np.float16(0.5)) & (single >= third), single, 0).astype(np.float16)
    np.testing.assert_array_equal(stored.dense(), want)
    assert (stored.hist.sum(axis=1) == 120).all()


@pytest.mark.slow
def test_two_real_processes(prepared, single, tmp_path):
    """The same through two OS processes started with the launcher variables."""
    run, overrides = clone(prepared, tmp_path)
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "pml_dist", "infer", *overrides], env=env))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert main(["merge", *overrides]) == 0
    np.testing.assert_array_equal(merged(run), single)


def test_rerun_skips_complete_shards(prepared, tmp_path, monkeypatch):
    run, overrides = clone(prepared, tmp_path)
    run_ranks(overrides, 3, monkeypatch)
    shard = run / "teacher" / "probs" / "shard-00001-of-00003.npz"
    before = shard.stat().st_mtime_ns
    run_ranks(overrides, 3, monkeypatch)
    assert shard.stat().st_mtime_ns == before


@pytest.mark.faults
def test_a_rank_killed_mid_write_leaves_no_shard_and_a_rerun_fills_it(prepared, single, tmp_path,
                                                                      monkeypatch):
    """Rank 1 of 3, a real process, dies of SIGKILL after writing its shard under the temporary name
    and before the rename (the worst moment): no shard under the final name, the merge refuses
    naming the missing rank, a rerun of every rank computes only the missing shard (the others are
    kept, untouched), and the merge equals the single-process result."""
    run, overrides = clone(prepared, tmp_path)
    run_ranks(overrides, 3, monkeypatch, ranks=[0, 2])
    folder = run / "teacher" / "probs"
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*")}
    hook = tmp_path / "hook"  # imported at start-up: os.replace of a shard kills the process
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, signal\n_replace = os.replace\n"
        "def replace(src, dst, *args, **kwargs):\n"
        "    if os.path.basename(str(dst)).startswith('shard-'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return _replace(src, dst, *args, **kwargs)\n"
        "os.replace = replace\n")
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "pml_dist", "infer", *overrides], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(folder.glob(".shard-00001-of-00003.npz.tmp-*"))  # it died holding the written file
    assert not (folder / "shard-00001-of-00003.npz").exists()
    assert not (folder / "shard-00001-of-00003.json").exists()
    with pytest.raises(PmlError, match=r"rank\(s\) \[1\] are missing"):
        make_pseudo_labels(load_config(None, overrides))
    assert not (run / "pseudo" / "probs.npz").exists()
    run_ranks(overrides, 3, monkeypatch)  # the whole job again
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("shard-*") if p.name in kept} == kept
    assert (folder / "shard-00001-of-00003.json").is_file()
    make_pseudo_labels(load_config(None, overrides))
    np.testing.assert_array_equal(merged(run), single)


def _one_line_enospc(err: str, path: Path) -> None:
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "(ENOSPC)" in err and str(path) in err, err


@pytest.mark.faults
def test_a_full_disk_stops_a_shard_write_with_one_line_and_keeps_what_was_complete(prepared, single, tmp_path,
                                                                                   monkeypatch, capsys,
                                                                                   small_disk, fill_disk):
    """teacher/probs on a small real tmpfs: rank 0 writes its shard, then the disk is full. Rank 1's
    `pml-dist infer` stops with one line naming its shard and ENOSPC (exit 2), leaves nothing under
    its names (nor a temporary file), and rank 0's shard is intact; with space again, the rerun
    fills the gap and the merge equals the single-process result."""
    run, overrides = clone(prepared, tmp_path)
    folder = run / "teacher" / "probs"
    with small_disk(folder, "1m"):
        run_ranks(overrides, 3, monkeypatch, ranks=[0])
        before = {p.name: p.read_bytes() for p in folder.glob("shard-*")}
        fill_disk(folder)
        for key, value in {"RANK": 1, "WORLD_SIZE": 3, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}.items():
            monkeypatch.setenv(key, str(value))
        capsys.readouterr()
        assert main(["infer", *overrides]) == 2
        _one_line_enospc(capsys.readouterr().err, folder / "shard-00001-of-00003.npz")
        assert sorted(p.name for p in folder.iterdir()) == ["filler", *sorted(before)]
        assert {p.name: p.read_bytes() for p in folder.glob("shard-*")} == before
        (folder / "filler").unlink()
        run_ranks(overrides, 3, monkeypatch)
        assert {p.name: p.read_bytes() for p in folder.glob("shard-00000-*")} == before
        make_pseudo_labels(load_config(None, overrides))
    np.testing.assert_array_equal(merged(run), single)


@pytest.mark.faults
def test_a_full_disk_stops_the_merge_with_one_line_and_keeps_the_previous_matrix(prepared, tmp_path,
                                                                                monkeypatch, capsys,
                                                                                small_disk, fill_disk):
    """pseudo/ on a small real tmpfs holding a finished merge; the disk is then full but for one
    page, less than the merged file. `pml-dist merge` again: one line naming probs.npz and ENOSPC
    (exit 2), the previous files byte for byte, no temporary file left."""
    run, overrides = clone(prepared, tmp_path)
    run_ranks(overrides, 3, monkeypatch)
    pseudo = run / "pseudo"
    with small_disk(pseudo, "1m"):
        assert main(["merge", *overrides]) == 0
        before = {p.relative_to(pseudo): p.read_bytes() for p in pseudo.rglob("*") if p.is_file()}
        fill_disk(pseudo, leave=4096)
        capsys.readouterr()
        assert main(["merge", *overrides]) == 2
        _one_line_enospc(capsys.readouterr().err, pseudo / "probs.npz")
        after = {p.relative_to(pseudo): p.read_bytes() for p in pseudo.rglob("*") if p.is_file()}
        assert after.pop(Path("filler")) and after == before


def _rewrite(npz: Path, change) -> None:
    """Change a shard's arrays and keep its manifest consistent, so only the intended check fails."""
    with np.load(npz) as data:
        arrays = change({k: data[k].copy() for k in SHARD_ARRAYS})
    np.savez(npz, **arrays)
    manifest = npz.with_suffix(".json")
    info = json.loads(manifest.read_text())
    info.update(count=len(arrays["indices"]), entries=len(arrays["values"]), checksum=npz_checksum(npz))
    manifest.write_text(json.dumps(info))


def _missing(folder):
    (folder / "shard-00002-of-00003.npz").unlink()
    (folder / "shard-00002-of-00003.json").unlink()


def _truncated(folder):
    npz = folder / "shard-00001-of-00003.npz"
    npz.write_bytes(npz.read_bytes()[:300])


def _other_teacher(folder):
    manifest = folder / "shard-00000-of-00003.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "teacher_id": "0123456789abcdef"}))


def _duplicate_differs(folder):
    # world 3 over 120 samples has no padding: give rank 2 a copy of sample 0 with other values
    with np.load(folder / "shard-00000-of-00003.npz") as rank0:
        classes, values = rank0["classes"][:rank0["indptr"][1]], rank0["values"][:rank0["indptr"][1]]
    values = np.clip(values.astype(np.float32) + 0.25, 0, 1).astype(np.float16)

    def change(a):
        return {**a, "indices": np.append(a["indices"], 0), "indptr": np.append(a["indptr"], a["indptr"][-1]
                                                                                + len(classes)),
                "classes": np.append(a["classes"], classes), "values": np.append(a["values"], values)}

    _rewrite(folder / "shard-00002-of-00003.npz", change)


def _wrong_world(folder):
    manifest = folder / "shard-00001-of-00003.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "world_size": 4}))


def _stale_world(folder):  # leftovers of an older 2-rank job beside the 3-rank shards
    for suffix in (".npz", ".json"):
        shutil.copy(folder / f"shard-00000-of-00003{suffix}", folder / f"shard-00000-of-00002{suffix}")
    info = json.loads((folder / "shard-00000-of-00002.json").read_text())
    (folder / "shard-00000-of-00002.json").write_text(json.dumps({**info, "world_size": 2}))


def _checksum(folder):
    npz = folder / "shard-00001-of-00003.npz"
    with np.load(npz) as data:
        arrays = {k: data[k] for k in SHARD_ARRAYS}
    np.savez(npz, **{**arrays, "values": arrays["values"] * np.float16(0.5)})


def _other_store(folder):  # a rank that kept by another rule (another store_min_prob)
    manifest = folder / "shard-00001-of-00003.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "store": {"min_prob": 0.5, "top_k": None}}))


def _class_out_of_range(folder):
    _rewrite(folder / "shard-00000-of-00003.npz", lambda a: {**a, "classes": a["classes"] + 1})


@pytest.mark.faults
@pytest.mark.parametrize("damage, message", [
    (_missing, r"rank\(s\) \[2\] are missing"),
    (_truncated, r"shard-00001-of-00003.npz: unreadable shard"),
    (_other_teacher, r"shard\(s\) \['shard-00000-of-00003.json'\] come from another teacher"),
    (_duplicate_differs, r"shard-00002-of-00003.npz and .*shard-00000-of-00003.npz: sample 0 scored "
                         r"twice with different probabilities"),
    (_wrong_world, r"shard-00001-of-00003.json: manifest says rank 1 of world size 4"),
    (_stale_world, r"shards from different world sizes"),
    (_checksum, r"shard-00001-of-00003.npz: checksum does not match"),
    (_other_store, r"shard\(s\) \['shard-00001-of-00003.json'\] come from another store rule"),
    (_class_out_of_range, r"shard-00000-of-00003.npz: classes outside 0..19"),
])
def test_bad_shards_are_refused_and_nothing_is_written(prepared, tmp_path, monkeypatch, damage, message):
    run, overrides = clone(prepared, tmp_path)
    run_ranks(overrides, 3, monkeypatch)
    damage(run / "teacher" / "probs")
    assert main(["merge", *overrides]) == 2
    with pytest.raises(PmlError, match=message):
        make_pseudo_labels(load_config(None, overrides))
    assert not (run / "pseudo").exists() or not any((run / "pseudo").iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision, atol", [("fp32", 5e-3), ("bf16", 4e-2)])
def test_sharded_inference_on_the_gpu_merges_to_the_cpu_result(prepared, single, tmp_path, monkeypatch,
                                                               precision, atol):
    """Two ranks on the GPU (both bound to the one GPU the machine has, or one GPU each), merged,
    against the single CPU process in fp32. Tolerances, on float16 probabilities: fp32 on the GPU
    (TF32 convolutions and matmuls) 5e-3; bf16 autocast (8 mantissa bits) 4e-2."""
    world = 2
    if torch.cuda.device_count() not in (1, world):
        pytest.skip(f"needs 1 or {world} visible GPUs, this process sees {torch.cuda.device_count()}")
    run, overrides = clone(prepared, tmp_path)
    overrides = [*overrides, "train.device=cuda", f"dist.precision={precision}"]
    cfg = load_config(None, overrides)
    torch.cuda.reset_peak_memory_stats()
    for rank in range(world):
        for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world,
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}.items():
            monkeypatch.setenv(key, str(value))
        infer(cfg)
    assert torch.cuda.max_memory_allocated() > 0  # the teacher ran on the GPU
    result = make_pseudo_labels(load_config(None, overrides))
    probs = merged(run)
    assert probs.dtype == np.float16 and probs.shape == single.shape == (120, 20)
    assert result["merge"]["padding_duplicates"] == 0
    np.testing.assert_allclose(probs.astype(np.float32), single.astype(np.float32), rtol=0, atol=atol)
    assert not np.array_equal(probs, np.zeros_like(probs))

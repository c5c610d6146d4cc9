"""Sparse labels (ffcv_data/sparse.py, prepared.py's labels file) against the dense matrices they
replace: every operation on random rows, empty rows included, and the lookup on the device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffcv_data.errors import DataError
from ffcv_data.prepared import read_split_labels, write_split_labels
from ffcv_data.protocol import NONE, one_hot
from ffcv_data.sparse import DeviceRows, LabelRows


@pytest.fixture
def dense():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 37)) < 0.08).astype(np.uint8)
    y[::7] = 0  # rows without a positive
    return y


def test_rows_round_trip_and_take_like_dense_indexing(dense):
    rows = LabelRows.from_dense(dense)
    assert np.array_equal(rows.dense(), dense)
    assert rows.equals(LabelRows.from_sets([np.flatnonzero(r)[::-1].tolist() * 2 for r in dense], 37))
    assert np.array_equal(rows.counts(), dense.sum(axis=1))
    assert np.array_equal(rows.per_class(), dense.sum(axis=0))
    pick = np.random.default_rng(1).integers(0, 300, 500)  # any order, repeats
    assert np.array_equal(rows.take(pick).dense(), dense[pick])
    assert np.array_equal(rows.dense(pick[:10]), dense[pick[:10]])
    part = np.unique(pick)  # a subset in order, as a train/val part is taken
    assert np.array_equal(rows.take(part).dense(), dense[part])
    assert rows.take(part).equals(LabelRows.from_dense(dense[part]))
    assert len(rows.take(np.zeros(0, np.int64))) == 0


def test_the_labels_file_is_memory_mapped_and_reads_back(dense, tmp_path):
    rows = LabelRows.from_dense(dense)
    observed = np.where(dense.sum(axis=1) > 0, dense.argmax(axis=1), NONE)
    files = [f"dir/{i}-é.jpg" for i in range(300)]
    path = write_split_labels(tmp_path / "train.labels.npz", np.arange(300) * 3, rows, observed, files)
    got = read_split_labels(path)
    assert isinstance(got.labels.classes, np.memmap) and isinstance(got.keys, np.memmap)
    assert got.labels.equals(rows) and np.array_equal(got.observed, observed)
    assert list(got.files()) == files and np.array_equal(got.keys, np.arange(300) * 3)
    with np.load(path) as plain:  # a plain numpy file for anyone else
        assert np.array_equal(plain["indptr"], rows.indptr)


def test_an_old_or_damaged_labels_file_is_one_line(tmp_path):
    (tmp_path / "train.meta.npz").write_bytes(b"old")
    with pytest.raises(DataError, match="prepared by an older version .*train.meta.npz.*prepare` again"):
        read_split_labels(tmp_path / "train.labels.npz")
    (tmp_path / "val.labels.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="val.labels.npz: unreadable"):
        read_split_labels(tmp_path / "val.labels.npz")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_device_lookup_gives_the_dense_rows(dense, device):
    observed = np.where(dense.sum(axis=1) > 0, dense.argmax(axis=1), NONE)
    lookup = DeviceRows(LabelRows.from_dense(dense), observed, 37, device)
    index = torch.as_tensor(np.random.default_rng(2).integers(0, 300, 64), device=device)
    labels, seen = lookup.labels(index), lookup.observed(index)
    assert labels.device.type == seen.device.type == device and labels.dtype == torch.float32
    assert np.array_equal(labels.cpu().numpy(), dense[index.cpu().numpy()])
    assert np.array_equal(seen.cpu().numpy(), one_hot(observed, 37)[index.cpu().numpy()])
    empty = DeviceRows(LabelRows.from_dense(np.zeros((4, 5), np.uint8)), None, 5, device)
    assert empty.labels(torch.arange(4, device=device)).sum() == 0

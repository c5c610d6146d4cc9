"""Parts of the training step that must not wait for the GPU, and the RNG state of checkpoints: the
CPU behaviour they keep, and (marker gpu) the same on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pml_dist.training.checkpoint import _load_rng, _save_rng
from pml_dist.training.targets import _lookup
from pml_dist.training.trainer import _Window

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_window_sums_device_tensors_to_the_floats_it_summed_before():
    """The loss stays a tensor until a log step; in float64 its mean is bit for bit the mean of the
    float() values each step used to read, so CPU metrics and resume comparisons are unchanged."""
    losses = torch.rand(37, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 3
    as_tensors, as_floats = _Window(), _Window()
    for loss in losses:
        as_tensors.add(loss, 8)
        as_floats.add(float(loss), 8)
    assert isinstance(as_tensors.mean_loss, torch.Tensor) and as_tensors.mean_loss.dtype == torch.float64
    assert as_tensors.mean_loss.item() == as_floats.mean_loss
    assert as_tensors.samples == 37 * 8


def test_label_tables_are_looked_up_on_the_batch_device_without_a_host_copy():
    table = np.arange(12, dtype=np.float32).reshape(6, 2)
    lookup = _lookup(table)
    rows = lookup({"index": torch.tensor([4, 1, 4], dtype=torch.int32), "image": torch.zeros(3)})
    assert torch.equal(rows, torch.tensor([[8.0, 9.0], [2.0, 3.0], [8.0, 9.0]]))


def test_rng_state_round_trip_on_cpu(tmp_path):
    path = tmp_path / "rng.pt"
    torch.manual_seed(3)
    np.random.seed(3)
    _save_rng(path, torch.device("cpu"))
    assert set(torch.load(path, weights_only=False)) == {"torch", "numpy"}  # no GPU state on CPU
    expected = torch.rand(3), np.random.rand(3)
    torch.manual_seed(99)
    np.random.seed(99)
    _load_rng(path, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.gpu
@needs_cuda
def test_rng_state_of_the_gpu_is_checkpointed(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    path = tmp_path / "rng.pt"
    torch.cuda.manual_seed(5)
    _save_rng(path, device)
    assert "cuda" in torch.load(path, weights_only=False)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed(77)
    _load_rng(path, device)
    assert torch.equal(torch.rand(4, device=device), expected)


@pytest.mark.gpu
@needs_cuda
def test_label_table_lives_on_the_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    lookup = _lookup(np.eye(5, dtype=np.float32), device)
    index = torch.tensor([3, 0], device=device, dtype=torch.int32)  # as FFCV's IntDecoder gives them
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = lookup({"index": index, "image": torch.zeros(2, device=device)})
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.device == device
    assert torch.equal(rows.cpu(), torch.eye(5)[[3, 0]])

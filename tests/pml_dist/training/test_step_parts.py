"""Parts of the training step that must not wait for the GPU, and the RNG state of checkpoints: the
CPU behaviour they keep, and (marker gpu) the same on CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffcv_data.sparse import LabelRows
from pml_dist.stored_probs import HIST_BINS, StoredProbs, StoreRule
from pml_dist.training.checkpoint import _load_rng, _save_rng
from pml_dist.training.targets import Target, pseudo_lookup
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


PROBS = np.array([[0.5, 0.0, 0.25], [0.0, 0.75, 0.0], [0.0, 0.0, 0.0], [1.0, 0.5, 0.125]], np.float16)


def stored(probs: np.ndarray) -> StoredProbs:
    """The nonzero probabilities kept (row-major, as inference keeps them)."""
    num_classes = probs.shape[1]
    return StoredProbs(LabelRows.from_dense(probs > 0), probs[probs > 0], np.zeros((num_classes, HIST_BINS)),
                       np.zeros(num_classes), StoreRule(0.0, None))


def batch(index: list[int], observed: list[int], device=None) -> dict:
    return {"index": torch.tensor(index, dtype=torch.int32, device=device),  # as FFCV's IntDecoder gives
            "observed": torch.nn.functional.one_hot(torch.tensor(observed, device=device), 3).float()}


def test_pseudo_labels_are_the_rule_on_the_kept_probabilities_with_the_observed_positive():
    soft = pseudo_lookup(stored(PROBS), Target("soft", "soft"))
    rows = soft(batch([3, 1, 3, 2], [2, 0, 1, 1]))
    assert torch.equal(rows, torch.tensor([[1.0, 0.5, 1.0], [1.0, 0.75, 0.0], [1.0, 1.0, 0.125],
                                           [0.0, 1.0, 0.0]]))
    hard = pseudo_lookup(stored(PROBS), Target("tau-0.5", "hard", 0.5))
    assert torch.equal(hard(batch([0, 3], [1, 1])), torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]))


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
    lookup = pseudo_lookup(stored(PROBS), Target("soft", "soft"), device)
    on_gpu = batch([3, 1], [2, 0], device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = lookup(on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert rows.device == device
    assert torch.equal(rows.cpu(), torch.tensor([[1.0, 0.5, 1.0], [1.0, 0.75, 0.0]]))

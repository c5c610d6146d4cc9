"""Loader behaviour a trainer relies on: fields, sharding, epoch orders, resume, no silent hangs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ffcv_data.loaders import _build, eval_loader, per_rank_order, train_loader
from ffcv_data.prepared import labels_beside, read_split_labels
from ffcv_data.protocol import one_hot

pytestmark = pytest.mark.timeout(300)


def _size(beton) -> int:
    return len(read_split_labels(labels_beside(beton)))


def _indices(loader) -> np.ndarray:
    # .copy(): FFCV batches are views into buffers it reuses a few batches later
    return np.concatenate([b["index"].numpy().reshape(-1).copy() for b in loader])


def test_training_batches_cannot_carry_full_labels(betons):
    """SPML training must not see the full labels: the .beton has none, and the training loader looks
    up only the observed positives."""
    loader = train_loader(betons["train"], 16, 32, jit=False)
    assert set(loader.loader.pipeline_specs) == {"image", "index"}
    assert list(loader.lookups) == ["observed"]
    batch = next(iter(loader))
    assert set(batch) == {"image", "observed", "index"}
    assert batch["image"].shape == (16, 3, 32, 32) and batch["image"].dtype == torch.float32
    # NCHW on CPU: channels_last input crashes torch 2.14.1's CPU backward of narrow convolutions
    assert batch["image"].is_contiguous()
    assert batch["observed"].shape == (16, 20) and batch["index"].shape == (16,)
    # what the batch carries is the single observed positive of each index, nothing more
    split = read_split_labels(labels_beside(betons["train"]))
    observed = one_hot(split.observed, split.num_classes)
    assert np.array_equal(batch["observed"].numpy(), observed[batch["index"].numpy()])
    assert (batch["observed"].sum(dim=1) == 1).all()


def test_images_are_normalised(betons):
    images = torch.cat([b["image"].clone() for b in eval_loader(betons["test"], 25, 48, jit=False)])
    assert abs(images.mean().item()) < 1.0 and 0.3 < images.std().item() < 2.0


@pytest.mark.parametrize("world", [2, 3])
def test_training_shards_cover_every_sample_each_epoch(betons, world):
    n = _size(betons["train"])
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world):
            loader = train_loader(betons["train"], 8, 32, rank=rank, world_size=world, seed=3,
                                  drop_last=False, start_epoch=epoch, jit=False)
            per_rank.append(_indices(loader))
        lengths = {len(p) for p in per_rank}
        assert lengths == {-(-n // world)}  # equal per rank, padded like DistributedSampler
        allidx = np.concatenate(per_rank)
        assert set(allidx) == set(range(n))
        assert len(allidx) - n == (-n) % world  # only the padding repeats
        expected = [np.asarray(per_rank_order(n, epoch, 3, r, world, True)) for r in range(world)]
        assert all(np.array_equal(p, e) for p, e in zip(per_rank, expected, strict=True))


def test_epochs_reshuffle_and_seed_fixes_the_order(betons):
    a = train_loader(betons["train"], 8, 32, seed=1, drop_last=False, jit=False)
    first, second = _indices(a), _indices(a)
    assert not np.array_equal(first, second)
    b = train_loader(betons["train"], 8, 32, seed=1, drop_last=False, jit=False)
    assert np.array_equal(_indices(b), first)
    seq = train_loader(betons["train"], 8, 32, order="sequential", drop_last=False, jit=False)
    assert np.array_equal(_indices(seq), np.arange(len(first)))


def test_resume_starts_inside_the_epoch(betons):
    """A resumed run continues with the samples it had not seen, then ordinary epochs follow."""
    full = train_loader(betons["train"], 8, 32, rank=1, world_size=2, seed=4,
                        drop_last=False, start_epoch=2, jit=False)
    epoch2, epoch3 = _indices(full), _indices(full)
    # 24 samples per rank done = 48 global positions
    resumed = train_loader(betons["train"], 8, 32, rank=1, world_size=2, seed=4,
                           drop_last=False, start_epoch=2, skip_samples=48, jit=False)
    assert np.array_equal(_indices(resumed), epoch2[24:])
    assert np.array_equal(_indices(resumed), epoch3)
    # resuming inside the first epoch must not shorten the epochs after it
    first = train_loader(betons["train"], 8, 32, seed=4, drop_last=True, jit=False)
    whole0, whole1 = _indices(first), _indices(first)
    early = train_loader(betons["train"], 8, 32, seed=4, drop_last=True,
                         skip_samples=16, jit=False)
    assert np.array_equal(_indices(early), whole0[16:])
    assert np.array_equal(_indices(early), whole1)


def test_resume_at_another_world_size_continues_the_same_global_order():
    n, done = 103, 40  # 40 global positions consumed at world 2
    before = np.concatenate([per_rank_order(n, 1, 7, r, 2, True) for r in range(2)])
    after = np.concatenate([per_rank_order(n, 1, 7, r, 3, True, skip=done) for r in range(3)])
    full2 = np.stack([per_rank_order(n, 1, 7, r, 2, True) for r in range(2)], axis=1).reshape(-1)
    seen = set(full2[:done])
    assert seen | set(after) == set(range(n)) == set(before)
    # only world-3 padding (the epoch order's first two samples, repeated) is seen twice
    assert seen & set(after) <= set(full2[:2]) and len(after) == 105 - done


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_shards_are_exact(betons, world):
    meta_n = _size(betons["val"])
    shards = [_indices(eval_loader(betons["val"], 7, 32, rank=r, world_size=world, jit=False))
              for r in range(world)]
    joined = np.concatenate(shards)
    assert len(joined) == meta_n and set(joined) == set(range(meta_n))


def test_quasi_random_is_single_process_only(betons):
    with pytest.raises(ValueError, match="quasi_random"):
        train_loader(betons["train"], 8, 32, order="quasi_random", world_size=2, jit=False)
    assert len(_indices(train_loader(betons["train"], 8, 32, order="quasi_random", jit=False))) > 0


@pytest.mark.faults
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death we cause
def test_a_dying_loader_thread_raises_instead_of_hanging(betons):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption

    # float indices make FFCV's decoder raise inside its worker thread (seen with Reader.num_samples)
    loader = _build(betons["test"], 4, {"index": [IntDecoder()], "image": None},
                    OrderOption.SEQUENTIAL, workers=1, drop_last=False, indices=np.arange(5.0),
                    jit=False)
    with pytest.raises(RuntimeError, match="loader thread died"):
        next(iter(loader))


def test_missing_beton_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `pml-dist prepare` first"):
        train_loader(tmp_path / "train.beton", 8, 32, jit=False)


def test_resize_flip_mirrors_a_seeded_half_of_the_whole_images(betons):
    """Cole et al.'s training transform: the whole image (what `resize` evaluates on), mirrored for a
    fair coin per (seed, epoch, index), the same in every run of the same command."""
    from ffcv_data.transforms import flip_mask

    def epochs(loader, n):
        out = []
        for _ in range(n):
            pairs = [(b["index"].clone(), b["image"].clone()) for b in loader]
            out.append((torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])))
        return out

    whole = torch.cat([b["image"].clone() for b in eval_loader(betons["train"], 64, 48, transform="resize",
                                                                 jit=False)])
    loader = train_loader(betons["train"], 64, 48, seed=5, order="sequential", transform="resize_flip",
                          drop_last=False, jit=False)
    (idx0, img0), (idx1, img1) = epochs(loader, 2)
    assert torch.equal(idx0, torch.arange(len(whole))) and torch.equal(idx1, idx0)
    for epoch, images in ((0, img0), (1, img1)):
        mirrored = torch.from_numpy(flip_mask(5, epoch, idx0.numpy()))
        assert 0.4 < mirrored.float().mean() < 0.6
        assert torch.equal(images[mirrored], whole[mirrored].flip(3))
        assert torch.equal(images[~mirrored], whole[~mirrored])
    assert not torch.equal(img0, img1)  # another coin each epoch
    again = train_loader(betons["train"], 64, 48, seed=5, order="sequential", transform="resize_flip",
                         drop_last=False, jit=False)
    assert torch.equal(epochs(again, 1)[0][1], img0)


def test_epochs_reuse_the_buffers_and_an_abandoned_epoch_stops_first(betons):
    """Every epoch decodes into the first one's buffers; an epoch abandoned after one batch, its
    thread still decoding ahead, is stopped before the next starts, whose batches are then those of a
    loader that never stopped."""
    def loader():
        return train_loader(betons["train"], 16, 48, seed=3, transform="resize_flip", drop_last=False,
                            jit=False)

    reference = loader()
    reference.set_epoch(1)
    expected = torch.cat([b["image"].clone() for b in reference])
    stopped = loader()
    abandoned = iter(stopped)
    first = next(abandoned)["image"]
    stopped.set_epoch(1)
    assert torch.equal(torch.cat([b["image"].clone() for b in stopped]), expected)
    assert stopped._epoch is None  # the finished epoch's thread is joined, the abandoned one's too
    buffers = stopped._buffers[1]
    stopped.set_epoch(1)
    assert torch.equal(torch.cat([b["image"].clone() for b in stopped]), expected)
    assert stopped._buffers[1] is buffers
    assert first.data_ptr() == next(iter(stopped))["image"].data_ptr()  # slot 0, both times


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transforms_on_cuda_give_the_cpu_pixels(betons):
    """The whole-image decoder and the seeded flip run in the CUDA pipeline too (ToDevice, then the
    flip and the normalisation on the device, channels_last), with the same output as on CPU."""
    device = torch.device("cuda", 0)
    for transform in ("resize_flip", "resize"):
        cpu = train_loader(betons["train"], 64, 48, seed=5, order="sequential", transform=transform,
                           drop_last=False, jit=True)
        gpu = train_loader(betons["train"], 64, 48, seed=5, order="sequential", transform=transform,
                           drop_last=False, jit=True, device=device)
        a = torch.cat([b["image"].clone() for b in cpu])
        observed = torch.cat([b["observed"] for b in cpu])
        parts, looked_up = [], []
        for batch in gpu:
            image = batch["image"]
            assert image.is_cuda and image.dtype == torch.float32
            assert image.is_contiguous(memory_format=torch.channels_last)
            assert batch["observed"].is_cuda  # looked up on the device by the batch's index
            parts.append(image.clone().cpu())
            looked_up.append(batch["observed"].cpu())
        b = torch.cat(parts)
        assert torch.allclose(a, b, atol=1e-5), transform
        assert torch.equal(observed, torch.cat(looked_up)), transform


def test_a_process_bound_to_one_cpu_exits_after_parallel_loops_in_a_thread(tmp_path):
    """Slurm binds a 1-CPU task to one core. numba's TBB layer then hung at exit after a parallel
    loop launched from a non-main thread (FFCV's loader thread does that): the job's last line
    printed, the process never ended, and the job ran into its time limit."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import threading\nimport numpy as np\nimport ffcv_data  # noqa: F401 (what every process imports)\n"
        "def work():\n    import numba\n"
        "    @numba.vectorize(['int32(int32, int32)'], nopython=True, target='parallel')\n"
        "    def add(x, y):\n        return x + y\n"
        "    add(np.arange(100000, dtype=np.int32), np.ones(100000, dtype=np.int32))\n"
        "    print(numba.threading_layer())\n"
        "t = threading.Thread(target=work)\nt.start()\nt.join()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env,
                         preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() != "tbb"


def test_a_labels_file_of_another_split_is_one_line_naming_both(betons, tmp_path):
    """A .beton beside labels with another row count (a copied or half-replaced folder) is refused
    before any batch, naming the labels file and the .beton."""
    import shutil

    from ffcv_data.errors import DataError

    shutil.copy(betons["train"], tmp_path / "train.beton")
    shutil.copy(labels_beside(betons["val"]), tmp_path / "train.labels.npz")
    with pytest.raises(DataError, match=r"train.labels.npz: \d+ rows, but .*train.beton holds \d+ samples "
                                        r"\(prepare the data again\)"):
        train_loader(tmp_path / "train.beton", 8, 32, jit=False)

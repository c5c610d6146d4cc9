"""FFCV loaders for training and evaluation, single-process or one slice per rank, CPU or CUDA.

Batches are dicts keyed by field name: `image` and `index` from the .beton, and the label fields
looked up by index in the split's sparse labels (prepared.py), on the batch's device: `observed` (the
one observed positive) and, for evaluation only, `labels` (the full label set), each (B, L) float32.
The training loader never looks up `labels`, so SPML training code cannot see them even by mistake.

Sharding does not need a process group: rank and world size are arguments. Training uses
`RankOrder` (the DistributedSampler scheme: one seeded permutation per epoch, padded to a multiple of
the world size by repeating its head, rank r takes positions r, r+W, ...) which can also start part
way into an epoch, so a resumed run continues where it stopped instead of replaying the epoch.
Evaluation shards are `indices[rank::world]` with no padding, so every sample is scored exactly once.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ffcv_data.cores import usable_cores
from ffcv_data.errors import DataError
from ffcv_data.prepared import labels_beside, read_split_labels
from ffcv_data.sparse import DeviceRows
from ffcv_data.transforms import MEAN, STD, image_ops

LABEL_FIELDS = ("labels", "observed")


class Normalize(torch.nn.Module):
    """uint8 NCHW -> normalised float32, on whatever device the batch is on.

    Done in torch rather than with FFCV's NormalizeImage: on CPU that op must come before ToTensor
    (placed after, the Loader constructor spins forever in FFCV 1.0.2) and on GPU it needs cupy.
    Transferring uint8 and normalising on the device is also 4x less host-to-device traffic.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean.device != x.device:
            # Once, not per batch: copying the statistics from pageable host memory waits for the
            # GPU (a host sync on every batch of FFCV's loading thread otherwise).
            self.mean, self.std = self.mean.to(x.device), self.std.to(x.device)
        # in place: one new tensor per batch, not three (at 448 px a batch of 64 is 154 MB of float32)
        return x.float().sub_(self.mean).div_(self.std)


def per_rank_order(n: int, epoch: int, seed: int, rank: int, world: int, shuffle: bool,
                   skip: int = 0) -> np.ndarray:
    """Positions (into the loader's indices) that `rank` visits in `epoch`, padded like
    torch's DistributedSampler(drop_last=False) so every rank has ceil(n / world) samples.

    skip: positions of the epoch's global order already consumed by all ranks together. Rank r
    visits global positions r, r+W, ..., so after k samples per rank the first k*W are done; a
    resumed run (at the same or, with ZeRO 0, another world size) continues from there.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    total = -(-n // world) * world
    if total > n:
        order = np.concatenate([order, np.resize(order, total - n)])
    mine = np.arange(rank, total, world)
    return order[mine[mine >= skip]]


def _rank_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class RankOrder(TraversalOrder):
        """FFCV traversal order for one rank; in epoch `skip_epoch` the first `skip` global positions
        are left out (see per_rank_order).

        FFCV 1.0.2 accepts a custom order only as an *instance* of TraversalOrder which it then calls
        with the loader, so the instance binds itself in `__call__`.
        """

        def __init__(self, rank: int, world: int, seed: int, shuffle: bool, skip_epoch: int, skip: int):
            self.rank, self.world, self.order_seed, self.shuffle = rank, world, seed, shuffle
            self.skip_epoch, self.skip = skip_epoch, skip
            # FFCV sizes every epoch (len(loader)) from the order it draws in its constructor; that
            # one must be a full epoch, so skipping starts only once the loader is built.
            self.skipping = False

        def __call__(self, loader):
            super().__init__(loader)
            return self

        def sample_order(self, epoch: int) -> Sequence[int]:
            skip = self.skip if self.skipping and epoch == self.skip_epoch else 0
            positions = per_rank_order(
                len(self.indices), epoch, self.order_seed, self.rank, self.world, self.shuffle, skip
            )
            return self.indices[positions]

    return RankOrder


class BatchLoader:
    """Wraps an FFCV Loader: yields dicts {field: tensor}; `len()` is batches per epoch.

    The tensors are views into buffers FFCV reuses a few batches later: `.clone()` what you keep.
    """

    def __init__(self, loader, fields: tuple[str, ...], epoch_ops: Sequence = (),
                 lookups: dict[str, Callable] | None = None):
        self.loader = loader
        self.fields = fields
        self.lookups = lookups or {}  # field -> index tensor -> that field's (B, L) rows
        self.epoch_ops = epoch_ops  # ops whose output depends on the epoch (the seeded flip)
        self._epoch = None  # the running FFCV EpochIterator (a thread writing into the buffers)
        self._buffers = None
        # FFCV allocates every buffer of the pipeline afresh for each epoch (batch 64 at 448 px: about
        # 1.4 GB); touching new pages cost 28% of the loader's rate in the 10-batch epochs of
        # bench_loader. Each epoch reuses the first one's; _stop makes sure no thread still writes.
        allocate = loader.graph.allocate_memory

        def allocate_once(batch_size, slots):
            if self._buffers is None or self._buffers[0] != (batch_size, slots):
                self._buffers = (batch_size, slots), allocate(batch_size, slots)
            return self._buffers[1]

        loader.graph.allocate_memory = allocate_once

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # FFCV's EpochIterator.__next__ waits forever when its worker thread dies of an exception
        # (a bad index, a corrupt record): this loop does what __next__ does, but notices the death.
        if self._epoch is not None:  # an earlier iteration not run to its end nor closed yet
            self._stop(self._epoch)
        if torch.cuda.is_initialized():  # copies and kernels of the last epoch may still use the buffers
            torch.cuda.synchronize()
        for op in self.epoch_ops:
            op.epoch = self.loader.next_epoch  # the epoch iter() is about to traverse
        epoch = self._epoch = iter(self.loader)
        try:
            while True:
                try:
                    item = epoch.output_queue.get(timeout=1.0)
                except queue.Empty:
                    if epoch.is_alive():
                        continue
                    try:  # the thread may have put its end marker just before exiting
                        item = epoch.output_queue.get_nowait()
                    except queue.Empty:
                        raise RuntimeError(
                            "the FFCV loader thread died (its traceback is printed above)"
                        ) from None
                if item is None:
                    return
                slot, batch = item
                if torch.cuda.is_available():  # FFCV's own __next__ waits for the copy stream too
                    epoch.current_stream.wait_stream(epoch.cuda_streams[slot])
                out = dict(zip(self.fields, batch, strict=True))
                # (B, 1) -> (B,); FFCV's Squeeze would make a last batch of one 0-d
                out["index"] = out["index"].reshape(-1)
                for name, lookup in self.lookups.items():
                    out[name] = lookup(out["index"])
                yield out
        finally:  # also when the consumer stops early: the thread must not keep decoding
            self._stop(epoch)

    def _stop(self, epoch) -> None:
        epoch.close()
        # it notices within one batch and 0.5 s (its queue timeout); one still running after that
        # keeps its buffers, and the next epoch gets new ones
        epoch.join(timeout=60)
        if epoch.is_alive():
            self._buffers = None
        if self._epoch is epoch:
            self._epoch = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration traverses (after a resume, the epoch being resumed)."""
        self.loader.next_epoch = epoch


def threads_per_rank(requested: int, local_world_size: int = 1, env: dict[str, str] | None = None) -> int:
    """FFCV's numba threads also set torch's thread count; oversubscribing cores made steps 11x slower.

    0 = the cores this rank has: the CPUs this process may run on (Slurm's binding and taskset
    restrict them), shared by the node's local ranks unless Slurm already bound each task to its
    own (its mask is then smaller than the job's CPUs on the node), and at most the
    SLURM_CPUS_PER_TASK asked for."""
    if requested > 0:
        return requested
    env = os.environ if env is None else env
    cores = usable_cores()
    job_cpus = env.get("SLURM_CPUS_ON_NODE", "")
    bound = job_cpus.isdigit() and cores < int(job_cpus)
    threads = cores if bound else cores // max(1, local_world_size)
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        threads = min(threads, int(per_task))
    return max(1, threads)


def _field_ops(device: torch.device | None) -> list:
    from ffcv.transforms import ToDevice, ToTensor

    ops = [ToTensor()]
    if device is not None and device.type == "cuda":
        ops.append(ToDevice(device, non_blocking=True))
    return ops


def _image_ops(transform: str, image_size: int, device: torch.device | None, seed: int = 0) -> list:
    from ffcv.transforms import ToDevice, ToTorchImage

    on_gpu = device is not None and device.type == "cuda"
    ops, normalised = image_ops(transform, image_size, seed, on_gpu)
    if on_gpu:
        ops.append(ToDevice(device, non_blocking=True))
    if not normalised:
        # channels_last helps GPU convolutions; on CPU, torch 2.14.1 segfaults in the backward pass of
        # narrow convolutions (small_resnet width 8, 64 px) fed channels_last input: use NCHW there.
        ops += [ToTorchImage(channels_last=on_gpu), Normalize()]
    return ops


def _build(path, batch_size, pipelines, order, *, workers, drop_last, indices, jit, seed=0,
           label_fields: Sequence[str] = (), device=None):
    """The FFCV Loader as a BatchLoader that adds `label_fields` (LABEL_FIELDS) by index lookup."""
    from ffcv.loader import Loader
    from ffcv.pipeline.compiler import Compiler

    # Numba compilation costs ~20 s per Loader; off, the same pipeline runs at about half speed.
    Compiler.set_enabled(jit)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no .beton at {path} (run `pml-dist prepare` first)")
    # before the Loader: it takes the decoders out of these lists
    epoch_ops = [op for ops in pipelines.values() if ops for op in ops if hasattr(op, "epoch")]
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=workers,
        order=order,
        os_cache=True,
        drop_last=drop_last,
        pipelines=pipelines,
        indices=indices,
        seed=seed,
    )
    fields = tuple(name for name, spec in loader.pipeline_specs.items() if spec is not None)
    lookups = {}
    if label_fields:
        split = read_split_labels(labels_beside(Path(path)))
        if len(split) != loader.reader.num_samples:
            raise DataError(f"{labels_beside(Path(path))}: {len(split)} rows, but {path} holds "
                            f"{int(loader.reader.num_samples)} samples (prepare the data again)")
        rows = DeviceRows(split.labels if "labels" in label_fields else None,
                          split.observed if "observed" in label_fields else None, split.num_classes, device)
        lookups = {name: getattr(rows, name) for name in label_fields}
    return BatchLoader(loader, fields, epoch_ops, lookups)


def train_loader(
    path: str | Path,
    batch_size: int,
    image_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    order: str = "random",
    transform: str = "resize_flip",
    device: torch.device | None = None,
    workers: int = 0,
    local_world_size: int = 1,
    drop_last: bool = True,
    start_epoch: int = 0,
    skip_samples: int = 0,
    jit: bool = True,
) -> BatchLoader:
    """Batches of image (normalised float), observed (float one-hot) and index for SPML training.

    transform: a training transform of transforms.py (resize_flip is seeded by `seed`; FFCV's
    random_resized_crop is not seeded). start_epoch/skip_samples resume part way into an epoch
    (skip_samples counts samples consumed by all ranks together).
    """
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption

    pipelines = {
        "image": _image_ops(transform, image_size, device, seed),
        "index": [IntDecoder(), *_field_ops(device)],  # (B, 1); BatchLoader yields (B,)
    }
    if order == "quasi_random":
        if world_size > 1 or skip_samples:
            raise ValueError("data.order=quasi_random works only on one process without mid-epoch resume")
        ffcv_order = OrderOption.QUASI_RANDOM
    elif order in ("random", "sequential"):
        ffcv_order = _rank_order_class()(
            rank, world_size, seed, order == "random", start_epoch, skip_samples
        )
    else:
        raise ValueError(f"unknown order {order!r}")
    loader = _build(
        path,
        batch_size,
        pipelines,
        ffcv_order,
        workers=threads_per_rank(workers, local_world_size),
        drop_last=drop_last,
        indices=None,
        jit=jit,
        seed=seed,
        label_fields=("observed",),  # full labels never reach SPML training
        device=device,
    )
    if order != "quasi_random":
        ffcv_order.skipping = True
    loader.set_epoch(start_epoch)
    return loader


def eval_loader(
    path: str | Path,
    batch_size: int,
    image_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    label_fields: Sequence[str] = LABEL_FIELDS,
    transform: str = "resize",
    device: torch.device | None = None,
    workers: int = 0,
    local_world_size: int = 1,
    indices: np.ndarray | None = None,
    padded: bool = False,
    jit: bool = True,
) -> BatchLoader:
    """Batches in file order through an evaluation transform (transforms.py); rank r gets
    `indices[r::world]`.

    indices: the subset to shard (default: the whole file). label_fields: which of LABEL_FIELDS the
    batches carry (() for scoring without labels). padded: pad like DistributedSampler so every
    rank gets ceil(n / world) samples (the padding repeats the first ones; whoever merges drops it).
    """
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import OrderOption
    from ffcv.reader import Reader

    unknown = set(label_fields) - set(LABEL_FIELDS)
    if unknown:
        raise ValueError(f"unknown label field(s) {sorted(unknown)} (known: {', '.join(LABEL_FIELDS)})")
    if indices is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no .beton at {path} (run `pml-dist prepare` first)")
        indices = np.arange(int(Reader(str(path)).num_samples))  # num_samples is not always an int
    pipelines = {
        "image": _image_ops(transform, image_size, device),
        "index": [IntDecoder(), *_field_ops(device)],  # (B, 1); BatchLoader yields (B,)
    }
    return _build(
        path,
        batch_size,
        pipelines,
        OrderOption.SEQUENTIAL,
        workers=threads_per_rank(workers, local_world_size),
        drop_last=False,
        indices=np.asarray(indices, dtype=np.uint64)[
            per_rank_order(len(indices), 0, 0, rank, world_size, shuffle=False)
            if padded else slice(rank, None, world_size)
        ],
        jit=jit,
        label_fields=tuple(label_fields),
        device=device,
    )

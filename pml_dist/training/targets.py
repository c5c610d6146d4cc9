"""What a stage's loss is trained against, as a function of the batch (`Stage.trains_on`):

    observed   the single observed positive, which the training loader carries (SPML losses)
    full       the full labels, looked up by index in the split's sparse labels (only the bce upper bound)
    pseudo     a student's pseudo labels, read by index from its labels.npy

Full labels never pass through the training loader (ffcv_data.loaders leaves them out), so the only
way a stage sees them is `full`, which only a bce teacher or reference asks for.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ffcv_data.sparse import DeviceRows
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout

TargetsOf = Callable[[dict], torch.Tensor]


def training_targets(cfg, run: RunLayout, stage, num_train: int, device=None) -> tuple[str, TargetsOf]:
    """(a description for the log, batch -> target tensor) of `stage` (pml_dist.stages); a label
    table lives on `device` (the batches' device; default CPU)."""
    kind = stage.trains_on(cfg)
    if kind == "observed":
        return "observed", lambda batch: batch["observed"].float()
    if kind == "full":
        split = run.data.labels("train")
        where, rows = run.data.labels_file("train"), len(split)
        source = "full labels (loss.name=bce: the full-label upper bound)"
        table = DeviceRows(split.labels, None, split.num_classes, device)

        def lookup(batch):
            return table.labels(batch["index"])
    else:
        where = run.pseudo.labels(stage.target)
        if not where.is_file():
            raise PmlError(f"no pseudo labels at {where} (run `pml-dist merge` first)")
        matrix = np.load(where)
        source, rows, lookup = f"pseudo labels {where}", matrix.shape[0], _lookup(matrix, device)
    if rows != num_train:
        raise PmlError(f"{where}: {rows} rows, but the training split has {num_train}")
    return source, lookup


def _lookup(matrix: np.ndarray, device=None) -> TargetsOf:
    """Rows by sample index. The table lives where the batches do, so a lookup by the batch's index
    (on the GPU, there) needs no copy to the host and back, which would wait for the GPU at every
    step. N x L float32 is small next to a GPU's memory (COCO: 82,081 x 80, 26 MB)."""
    table = torch.from_numpy(np.asarray(matrix, dtype=np.float32)).to(device or "cpu")
    return lambda batch: table[batch["index"].to(table.device)]

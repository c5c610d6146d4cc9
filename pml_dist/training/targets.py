"""What a stage's loss is trained against, as a function of the batch (`Stage.trains_on`):

    observed   the single observed positive, which the training loader carries (SPML losses)
    full       the full labels, looked up by index in the split's sparse labels (only the bce upper bound)
    pseudo     a student's pseudo labels: its target's rule (`Target`, below) applied to
               the teacher's kept probabilities (pseudo/probs.npz), looked up by index on the batch's
               device, with the batch's observed positive set to 1

Full labels never pass through the training loader (ffcv_data.loaders leaves them out), so the only
way a stage sees them is `full`, which only a bce teacher or reference asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ffcv_data.sparse import DeviceRows
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout
from pml_dist.stored_probs import StoredProbs, read_stored_probs

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
        where, stats = run.pseudo.probs, run.pseudo.read_stats()
        if stats is None or stage.target not in stats.get("targets", {}):
            raise PmlError(f"no pseudo-label target {stage.target!r} in {run.pseudo.stats} (run "
                           "`pml-dist merge` with it among pseudo.taus / pseudo.modes)")
        stored = read_stored_probs(where)
        target = Target.from_record(stage.target, stats["targets"][stage.target])
        source, rows = f"pseudo labels {target.record()['mode']} {stage.target} of {where}", len(stored)
        lookup = pseudo_lookup(stored, target, device)
    if rows != num_train:
        raise PmlError(f"{where}: {rows} rows, but the training split has {num_train}")
    return source, lookup


def pseudo_lookup(stored: StoredProbs, target: Target, device=None) -> TargetsOf:
    """A student's targets: `target`'s rule on the kept probabilities `stored`
    (pml_dist/stored_probs.py) of the batch's indices, with the batch's observed positive
    at 1. The table lives where the batches do, so the lookup never waits for the GPU."""
    table = DeviceRows(stored.rows, None, stored.num_classes, device, values=stored.values)
    rule = target.on(device)
    return lambda batch: torch.maximum(table.labels(batch["index"], rule), batch["observed"].float())


@dataclass(frozen=True)
class Target:
    """One target's rule (pml_dist/pseudo/labels.py makes them; pseudo/stats.json keeps them).
    `on(device)` applies it to kept probabilities; a probability that was not kept gives 0 (below
    every tau; what a soft or class-prior target loses when store_min_prob > 0)."""

    name: str
    mode: str  # hard | soft | class_prior
    tau: float | None = None
    thresholds: np.ndarray | None = None  # class_prior: float16 (L,), t_c
    last_rows: np.ndarray | None = None  # class_prior: int64 (L,), i_c
    extra: dict = field(default_factory=dict)  # what made it (k, classes it could not fill)

    def record(self) -> dict:
        """The rule as pseudo/stats.json keeps it (`from_record` reads it back)."""
        if self.mode == "hard":
            return {"mode": "hard", "tau": self.tau}
        if self.mode == "soft":
            return {"mode": "soft"}
        return {"mode": "class_prior", **self.extra, "thresholds": self.thresholds.astype(float).tolist(),
                "last_rows": self.last_rows.tolist()}

    @classmethod
    def from_record(cls, name: str, record: dict) -> Target:
        if record["mode"] != "class_prior":
            return cls(name, record["mode"], record.get("tau"))
        return cls(name, "class_prior", None, np.asarray(record["thresholds"], np.float16),
                   np.asarray(record["last_rows"], np.int64))

    def on(self, device=None):
        """The rule as a function of torch tensors on `device`: (values float16, rows int64,
        classes int64), broadcastable, -> float32 targets."""
        import torch

        if self.mode == "hard":
            tau = torch.tensor(self.tau, dtype=torch.float16, device=device)
            return lambda values, rows, classes: (values > tau).float()
        if self.mode == "soft":
            return lambda values, rows, classes: values.float()
        t = torch.as_tensor(self.thresholds, device=device)
        last = torch.as_tensor(self.last_rows, device=device)

        def class_prior(values, rows, classes):
            tc = t[classes]
            return ((values > tc) | ((values == tc) & (rows <= last[classes]))).float()

        return class_prior


def positives_per_image(cfg, run: RunLayout, stage) -> float | None:
    """A student's mean positives per training image in its targets (observed positive included),
    as `pml-dist merge` counted them for its target's rule (pseudo/stats.json); None for a stage
    that trains on the observed positive or the full labels."""
    if stage.trains_on(cfg) != "pseudo":
        return None
    stats = run.pseudo.read_stats() or {}
    return stats.get("targets", {}).get(stage.target, {}).get("mean_positives_per_image")

"""Which epoch's weights a stage keeps (best.pt): the best by validation mAP, or the last one when
the validation split is not fully labelled (config.DataSection.full_validation). Validation
mAP against one positive per image does not measure what the full-label test mAP does, so choosing
by it is not model selection; the last epoch is kept, and said so."""

from __future__ import annotations

BY_VALIDATION = "best validation mAP"
LAST_EPOCH = "last epoch (no fully labelled validation split)"


def model_selection(full_validation: bool) -> str:
    """result.json's `model_selection`."""
    return BY_VALIDATION if full_validation else LAST_EPOCH


def keeps(selection: str, val_map: float | None, best: dict | None) -> bool:
    """Whether the epoch just validated (`val_map`) replaces `best` (None: nothing kept yet)."""
    if best is None or selection == LAST_EPOCH:
        return True
    return val_map > best["val_map"]

# What `pml-dist run` / `train` warn, in one line: what a run without it gives up.
NO_SELECTION_WARNING = (
    "no fully labelled validation split (data.val_split) beside a single-positive training CSV: every "
    "stage keeps its last epoch, not its best by validation mAP (still logged, against single "
    "positives), and early stopping, learning-rate sweeps and self-training rounds are unavailable")

"""`pml-dist predict`: score image files with a trained stage, one record per image.

The pixels go through the very Classifier module `export` scripts (classifier.py): decoded with PIL
(images.py; a JPEG at the reduced scale the evaluation loader decodes it at), resized one by one
with Classifier.resize so a batch stacks (its forward's resize is then the identity), scored in
fp32. Unreadable images are reported by name on stderr and skipped; the caller learns how many failed.

    jsonl   {"file", "labels": names with p >= the class's threshold (thresholds.json), in output
            order, "scores": {name: p} of the top-k classes, highest first}
    labels  CSV `file,labels`, names joined by | : the fully labelled format data.format csv reads
            (ffcv_data/csv_lists.py), so a teacher can label a new pool of images
"""

from __future__ import annotations

import csv
import json
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from ffcv_data.atomic import save_with
from ffcv_data.cores import usable_cores
from pml_dist import dist
from pml_dist.stages import Stage
from pml_dist.use.classifier import Classifier, build_classifier
from pml_dist.use.images import ImageRef, decode, image_refs, loader_max_denominator
from pml_dist.use.trained import TrainedStage, open_stage

FORMATS = ("jsonl", "labels")
LABELS_HEADER = ("file", "labels")  # csv_lists.LABEL_SETS, the header of a fully labelled split
SEPARATOR = "|"  # csv_lists.SEPARATOR, between the class names of a labels field


@dataclass(frozen=True)
class PredictSummary:
    images: int  # named by the arguments
    failed: int  # could not be read (reported on stderr)


def predict(cfg, stage: Stage, arguments: list[str], out: Path | None = None, top_k: int = 5,
            fmt: str = "jsonl", batch_size: int = 64,
            report: Callable[[str], None] | None = None) -> PredictSummary:
    """Score every image `arguments` name; write the records to `out` (atomically) or stdout."""
    trained = open_stage(cfg, stage)
    refs = image_refs(arguments)
    device = inference_device(cfg)
    classifier = build_classifier(cfg, len(trained.class_names), trained.weights()).to(device)
    writer = _Writer(trained, fmt, top_k)
    say = report or _stderr

    def run(stream: TextIO) -> int:
        writer.begin(stream)
        failed = 0
        for ref, probs, error in score(classifier, refs, device, batch_size):
            if error is not None:
                failed += 1
                say(f"cannot read {ref.name}: {error}")
            else:
                writer.write(stream, ref, probs)
        return failed

    if out is None:
        failed = run(sys.stdout)
        sys.stdout.flush()
    else:
        counted: list[int] = []
        save_with(out, lambda tmp: counted.append(_write_file(tmp, run)))
        failed = counted[0]
    return PredictSummary(len(refs), failed)


def _write_file(path: Path, run: Callable[[TextIO], int]) -> int:
    with open(path, "w", encoding="utf-8", newline="") as stream:
        return run(stream)


def inference_device(cfg) -> torch.device:
    """dist.choose_device for one process: the first visible GPU unless train.device=cpu. A
    torchvision ResNet may run on the CPU here (model="" below): scoring a folder there is slow,
    not wrong, unlike training."""
    count = torch.cuda.device_count() if cfg.train.device != "cpu" and torch.cuda.is_available() else 0
    kind, index = dist.choose_device(cfg.train.device, min(count, 1), 0, 1)
    return torch.device(kind) if index is None else torch.device(kind, index)


@torch.inference_mode()
def score(classifier: Classifier, refs: list[ImageRef], device: torch.device, batch_size: int,
          progress: bool = True) -> Iterator[tuple[ImageRef, np.ndarray | None, str | None]]:
    """(image, float32 probabilities or None, why it could not be read or None) of every image, in
    order. Decoding and resizing run in threads (PIL and torch release the GIL), one batch ahead
    of the one being scored."""
    from tqdm import tqdm

    classifier.eval()
    max_denominator = loader_max_denominator(classifier.center_crop)

    def load(ref: ImageRef) -> tuple[torch.Tensor | None, str | None]:
        try:
            pixels = decode(ref.path, classifier.image_size, max_denominator)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is reported by name, never fatal
            return None, f"{type(exc).__name__}: {exc}".replace("\n", " ")
        return classifier.resize(pixels[None])[0], None

    chunks = [refs[i:i + batch_size] for i in range(0, len(refs), batch_size)]
    with ThreadPoolExecutor(max_workers=usable_cores()) as pool, \
            tqdm(total=len(refs), unit="img", desc="predict", file=sys.stderr, disable=not progress,
                 leave=False, dynamic_ncols=True) as bar:
        ahead: deque = deque()
        for chunk in chunks[:2]:
            ahead.append([pool.submit(load, ref) for ref in chunk])
        for k, chunk in enumerate(chunks):
            loaded = [f.result() for f in ahead.popleft()]
            if k + 2 < len(chunks):
                ahead.append([pool.submit(load, ref) for ref in chunks[k + 2]])
            good = [pixels for pixels, _ in loaded if pixels is not None]
            probs = iter(classifier(torch.stack(good).to(device)).cpu().numpy() if good else [])
            for ref, (pixels, error) in zip(chunk, loaded, strict=True):
                yield ref, (next(probs) if pixels is not None else None), error
            bar.update(len(chunk))


class _Writer:
    """One output record per scored image, in the chosen format."""

    def __init__(self, trained: TrainedStage, fmt: str, top_k: int):
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}")
        self.names, self.fmt = trained.class_names, fmt
        # compared in float64: the rule p >= threshold exactly as a reader of thresholds.json applies it
        self.threshold = np.asarray(trained.threshold, np.float64)
        self.top_k = top_k if 0 < top_k < len(self.names) else len(self.names)  # 0: all
        self.csv = None

    def begin(self, stream: TextIO) -> None:
        if self.fmt == "labels":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(LABELS_HEADER)

    def write(self, stream: TextIO, ref: ImageRef, probs: np.ndarray) -> None:
        labels = [self.names[c] for c in np.flatnonzero(probs.astype(np.float64) >= self.threshold)]
        if self.fmt == "labels":
            self.csv.writerow((ref.name, SEPARATOR.join(labels)))
            return
        top = np.argsort(-probs, kind="stable")[:self.top_k]
        record = {"file": ref.name, "labels": labels, "scores": {self.names[c]: float(probs[c]) for c in top}}
        stream.write(json.dumps(record) + "\n")


def _stderr(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"pml-dist predict: {message}", file=sys.stderr)

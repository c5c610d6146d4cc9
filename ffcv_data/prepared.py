"""The folder `prepare` writes, and the one reader of its stats.json. The data package owns these
names; the run layout (pml_dist/layout.py) points at such a folder as `<run>/data/`.

    <folder>/{train,val,test}.beton       fields image (JPEG), labels, observed (uint8 L), index
    <folder>/{train,val,test}.meta.npz    image_ids (source.py's keys), files (relative to the image
                                          root), labels, observed by index (for analysis, `pml-dist labels`)
    <folder>/inputs.json                  digests of what the folder was prepared from (prepare.py):
                                          written before the first .beton, checked by every rerun
    <folder>/stats.json                   counts, dropped images, label statistics; written last
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.errors import DataError


@dataclass(frozen=True)
class DataStats:
    """stats.json of a prepared folder, read once; `raw` is the whole record."""

    raw: dict

    @property
    def num_classes(self) -> int:
        return self.raw["num_classes"]

    def images(self, split: str) -> int:
        return self.raw["splits"][split]["images"]

    def labels_per_image(self, split: str) -> float:
        return self.raw["splits"][split]["labels_per_image"]["mean"]

    @property
    def seconds(self) -> float | None:
        return self.raw.get("seconds")


@dataclass(frozen=True)
class PreparedData:
    folder: Path

    def beton(self, split: str) -> Path:
        return Path(self.folder) / f"{split}.beton"

    def meta(self, split: str) -> Path:
        return Path(self.folder) / f"{split}.meta.npz"

    @property
    def inputs_file(self) -> Path:
        return Path(self.folder) / "inputs.json"

    @property
    def stats_file(self) -> Path:
        return Path(self.folder) / "stats.json"

    def is_complete(self) -> bool:
        return self.stats_file.is_file()

    def stats(self) -> DataStats:
        if not self.stats_file.is_file():
            raise DataError(f"no {self.stats_file} (run `pml-dist prepare` first)")
        return DataStats(json.loads(self.stats_file.read_text()))

    def read_meta(self, split: str, field: str) -> np.ndarray:
        """One array of a split's side file: image_ids, files, labels (full) or observed."""
        path = self.meta(split)
        if not path.is_file():
            raise DataError(f"no {path} (run `pml-dist prepare` first)")
        with np.load(path) as meta:
            return meta[field]

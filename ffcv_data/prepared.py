"""The folder `prepare` writes, and the one reader of its stats.json. The data package owns these
names; the run layout (pml_dist/layout.py) points at such a folder as `<run>/data/`.

    <folder>/{train,val,test}.beton       fields image (JPEG) and index
    <folder>/{train,val,test}.labels.npz  row `index` of the split, sparse (`SplitLabels`): keys
                                          (source.py's), the label sets as CSR (indptr, classes), the
                                          observed class (-1: none), the file relative to the image
                                          root, the verified negatives as CSR (Open Images; else
                                          empty); stored uncompressed, so each array is memory-mapped
    <folder>/inputs.json                  digests of what the folder was prepared from (prepare.py):
                                          written before the first .beton, checked by every rerun
    <folder>/stats.json                   counts, dropped images, label statistics; written last
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with
from ffcv_data.errors import DataError
from ffcv_data.sparse import LabelRows


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

    def complete_labels(self, split: str) -> bool:
        """Whether `split`'s label sets hold every class present (False: a single-positive CSV's one
        label per image, so precision and recall against them mean nothing). Folders prepared before
        the record existed came from complete annotations."""
        return self.raw.get("complete_labels", {}).get(split, True)

    @property
    def seconds(self) -> float | None:
        return self.raw.get("seconds")


@dataclass(frozen=True)
class PreparedData:
    folder: Path

    def beton(self, split: str) -> Path:
        return Path(self.folder) / f"{split}.beton"

    def labels_file(self, split: str) -> Path:
        return labels_beside(self.beton(split))

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

    def labels(self, split: str) -> SplitLabels:
        """A split's labels, memory-mapped."""
        return read_split_labels(self.labels_file(split))


@dataclass(frozen=True)
class SplitLabels:
    """One prepared split's rows, by sample index (the .beton's `index` field)."""

    keys: np.ndarray  # int64 (N,): the image's key (COCO's image id, a hash of its name)
    labels: LabelRows  # the full label sets
    observed: np.ndarray  # int32 (N,): the one observed positive, -1 where none is observed
    file_offsets: np.ndarray  # int64 (N + 1,): row i's file is file_bytes[off[i]:off[i + 1]], UTF-8
    file_bytes: np.ndarray  # uint8
    negatives: LabelRows  # the verified negatives (Open Images' confidence 0); empty rows elsewhere

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int:
        return self.labels.num_classes

    def file(self, i: int) -> str:
        return bytes(self.file_bytes[self.file_offsets[i]:self.file_offsets[i + 1]]).decode()

    def files(self) -> Iterator[str]:
        return (self.file(i) for i in range(len(self)))


def labels_beside(beton: Path) -> Path:
    """The labels file of the split whose .beton is `beton` (train.beton -> train.labels.npz)."""
    return Path(beton).with_suffix(".labels.npz")


def write_split_labels(path: Path, keys: np.ndarray, labels: LabelRows, observed: np.ndarray,
                       files: list[str], negatives: LabelRows | None = None) -> Path:
    """Write a SplitLabels file atomically (uncompressed .npz, so `read_split_labels` maps it)."""
    if negatives is None:
        negatives = LabelRows(np.zeros(len(keys) + 1, np.int64), np.zeros(0, np.int32), labels.num_classes)
    encoded = [f.encode() for f in files]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    if not len(keys) == len(labels) == len(observed) == len(files) == len(negatives):
        raise ValueError(f"{path}: {len(keys)} keys, {len(labels)} label rows, {len(observed)} observed, "
                         f"{len(files)} files, {len(negatives)} negative rows")
    return save_with(path, lambda tmp: np.savez(
        tmp, keys=np.asarray(keys, np.int64), indptr=labels.indptr, classes=labels.classes,
        num_classes=np.int64(labels.num_classes), observed=np.asarray(observed, np.int32),
        file_offsets=offsets, file_bytes=np.frombuffer(b"".join(encoded), dtype=np.uint8),
        negatives_indptr=negatives.indptr, negatives=negatives.classes,
    ))


def read_split_labels(path: Path) -> SplitLabels:
    path = Path(path)
    if not path.is_file():
        older = path.with_name(path.name.replace(".labels.npz", ".meta.npz"))
        if older.is_file():
            raise DataError(f"{path.parent} was prepared by an older version of pml-dist (it holds "
                            f"{older.name}, not {path.name}): delete it and run `pml-dist prepare` again")
        raise DataError(f"no {path} (run `pml-dist prepare` first)")
    try:
        a = mapped_npz(path)
        num_classes = int(a["num_classes"])
        return SplitLabels(a["keys"], LabelRows(a["indptr"], a["classes"], num_classes), a["observed"],
                           a["file_offsets"], a["file_bytes"],
                           LabelRows(a["negatives_indptr"], a["negatives"], num_classes))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable ({type(exc).__name__}: {exc}); delete the prepared folder "
                        f"and run `pml-dist prepare` again") from None


def mapped_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an uncompressed .npz, each memory-mapped where it lies in the zip (np.load
    would read them all into memory)."""
    out = {}
    with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"member {info.filename} is compressed")
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])
            f.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            name = info.filename.removesuffix(".npy")
            if int(np.prod(shape)) == 0 or shape == ():  # nothing to map (mmap refuses zero bytes)
                out[name] = np.fromfile(f, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
            else:
                out[name] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                                      order="F" if fortran else "C")
    return out

"""The inference shard format: what one rank of `pml-dist infer` leaves in `teacher/probs/`, and the
only code that writes or reads it. The file names come from pml_dist/layout.py (`RunLayout.shard`).

    <shard>.npz    indices (int64, the sample indices scored, in scoring order), and the rank's
                   scores as pml_dist/stored_probs.py keeps them: indptr, classes, values (the
                   kept probabilities of each scored row, CSR), hist and sums (over the rows that
                   are not sampler padding)
    <shard>.json   the manifest: rank, world_size, count, index_min, index_max, num_classes,
                   entries, store (the rule of what is kept), checksum of the arrays, teacher_id,
                   data_id (pml_dist/provenance.py), seconds

The .npz (uncompressed, so the merge can memory-map it) is written first and the manifest last,
each under a temporary name and renamed (ffcv_data/atomic.py), so a manifest means a complete shard.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with, write_json
from ffcv_data.prepared import mapped_npz
from pml_dist.errors import PmlError
from pml_dist.layout import RunLayout


def manifest_of(npz: Path) -> Path:
    """A shard's manifest: the .npz's name with .json (the rule of `RunLayout.shard`)."""
    return Path(npz).with_suffix(".json")


def npz_of(manifest: Path) -> Path:
    return Path(manifest).with_suffix(".npz")


def npz_checksum(npz: Path) -> str:
    """The CRC-32 of each array as the .npz (a zip) records it, e.g. 'indices:1a2b3c4d,probs:...'.

    Costs nothing to compute (it is in the zip's directory) and nothing to verify: zipfile checks
    every member's CRC while np.load reads it, and a mismatch raises. Comparing it with the manifest
    also catches a whole shard replaced by another, valid one.
    """
    with zipfile.ZipFile(npz) as z:
        return _checksum_of(z.infolist())


def _checksum_of(infos: list[zipfile.ZipInfo]) -> str:
    return ",".join(f"{i.filename.removesuffix('.npy')}:{i.CRC:08x}" for i in sorted(
        infos, key=lambda i: i.filename))


SHARD_ARRAYS = ("indices", "indptr", "classes", "values", "hist", "sums")


def write_shard(run: RunLayout, rank: int, world: int, indices: np.ndarray, scores: dict,
                num_classes: int, store: dict, ids: dict, seconds: float | None = None) -> Path:
    """Write rank `rank`'s shard of a `world`-rank job (npz, then manifest); returns the .npz path.
    `scores`: ScoreKeeper.arrays(); `store`: its StoreRule.as_dict(); `ids`: teacher_id and data_id
    of what was scored; `seconds`: scoring wall time, for the report."""
    npz = run.shard(rank, world)
    npz.parent.mkdir(parents=True, exist_ok=True)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    arrays = {"indices": indices, **{k: np.ascontiguousarray(scores[k]) for k in SHARD_ARRAYS[1:]}}
    checksum = ""

    def write(tmp: Path) -> None:
        nonlocal checksum
        np.savez(tmp, **arrays)
        checksum = npz_checksum(tmp)  # of the bytes that are renamed into place

    save_with(npz, write)
    write_json(manifest_of(npz), {
        "rank": rank, "world_size": world, "count": int(len(indices)),
        "index_min": int(indices.min()) if len(indices) else None,
        "index_max": int(indices.max()) if len(indices) else None,
        "num_classes": int(num_classes), "entries": int(len(arrays["values"])), "store": store,
        "checksum": checksum, **ids, "seconds": seconds,
    })
    return npz


def read_shard(npz: Path, checksum: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of one shard file, memory-mapped, after checking every byte against the zip's
    CRC-32s (and those against `checksum`, when given), straight from the mapped file: a missing,
    truncated, corrupt or substituted file is a PmlError naming it."""
    try:
        with zipfile.ZipFile(npz) as z:
            infos = z.infolist()
        if checksum is not None and _checksum_of(infos) != checksum:
            raise PmlError(f"{npz}: checksum does not match its manifest (corrupt or overwritten)")
        raw = np.memmap(npz, dtype=np.uint8, mode="r")
        for info in infos:
            head = info.header_offset
            local = _LOCAL_HEADER.unpack(bytes(raw[head:head + _LOCAL_HEADER.size]))
            start = head + _LOCAL_HEADER.size + local[zipfile._FH_FILENAME_LENGTH] \
                + local[zipfile._FH_EXTRA_FIELD_LENGTH]
            if info.compress_type != zipfile.ZIP_STORED or start + info.file_size > len(raw):
                raise zipfile.BadZipFile(f"{info.filename} is compressed or cut short")
            crc = 0
            for at in range(start, start + info.file_size, 1 << 26):
                crc = zlib.crc32(raw[at:min(at + (1 << 26), start + info.file_size)], crc)
            if crc != info.CRC:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
        del raw
        arrays = mapped_npz(npz)
        missing = [k for k in SHARD_ARRAYS if k not in arrays]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise PmlError(f"{npz}: unreadable shard ({type(exc).__name__}: {exc})") from None


_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


def read_manifest(path: Path) -> dict:
    """One manifest, checked against its file name: a name that is not a shard's, a file that is
    not JSON, or a rank / world size other than the name's is a PmlError naming the file."""
    named = RunLayout.shard_rank(path)
    if named is None:
        raise PmlError(f"{path}: not a shard manifest name (shard-RRRRR-of-WWWWW.json)")
    try:
        info = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise PmlError(f"{path}: malformed manifest ({exc})") from None
    if (info.get("rank"), info.get("world_size")) != named:
        raise PmlError(
            f"{path}: manifest says rank {info.get('rank')} of world size {info.get('world_size')}, "
            f"its name says rank {named[0]} of {named[1]}"
        )
    return info


def read_manifests(run: RunLayout) -> list[tuple[Path, dict]]:
    """Every manifest in the run's probs folder, in file-name order, each checked by `read_manifest`."""
    return [(path, read_manifest(path)) for path in run.shard_manifests()]


def shard_is_complete(npz: Path, expected: dict) -> bool:
    """Whether the shard at `npz` may be kept: its manifest exists and matches `expected` (the
    job's teacher, data, rank and world size), and its arrays check out."""
    manifest = manifest_of(npz)
    if not manifest.is_file():
        return False
    try:
        info = json.loads(manifest.read_text())
        if any(info.get(k) != v for k, v in expected.items()):
            return False
        read_shard(npz, info.get("checksum"))
    except (PmlError, json.JSONDecodeError):
        return False
    return True

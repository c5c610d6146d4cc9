"""The inference shard format: what one rank of `pml-dist infer` leaves in `teacher/probs/`, and the
only code that writes or reads it. The file names come from pml_dist/layout.py (`RunLayout.shard`).

    <shard>.npz    indices (int64, the sample indices scored) and probs (float16, N_r x L)
    <shard>.json   the manifest: rank, world_size, count, index_min, index_max, num_classes,
                   checksum of the arrays, teacher_id, data_id (pml_dist/provenance.py), seconds

The .npz is written first and the manifest last, each under a temporary name and renamed
(ffcv_data/atomic.py), so a manifest means a complete shard.
"""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with, write_json
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


def write_shard(run: RunLayout, rank: int, world: int, indices: np.ndarray, probs: np.ndarray,
                ids: dict, seconds: float | None = None) -> Path:
    """Write rank `rank`'s shard of a `world`-rank job (npz, then manifest); returns the .npz path.
    `ids`: teacher_id and data_id of what was scored; `seconds`: scoring wall time, for the report."""
    npz = run.shard(rank, world)
    npz.parent.mkdir(parents=True, exist_ok=True)
    indices = np.ascontiguousarray(indices, dtype=np.int64)
    probs = np.ascontiguousarray(probs, dtype=np.float16)
    checksum = _save_arrays(npz, indices, probs)
    write_json(manifest_of(npz), {
        "rank": rank, "world_size": world, "count": int(len(indices)),
        "index_min": int(indices.min()) if len(indices) else None,
        "index_max": int(indices.max()) if len(indices) else None,
        "num_classes": int(probs.shape[1]), "checksum": checksum, **ids,
        "seconds": seconds,
    })
    return npz


def _save_arrays(npz: Path, indices: np.ndarray, probs: np.ndarray) -> str:
    """Atomically write the .npz; returns its checksum, taken from the temporary file so that it
    describes exactly the bytes that were renamed into place."""
    checksum = ""

    def write(tmp: Path) -> None:
        nonlocal checksum
        np.savez(tmp, indices=indices, probs=probs)
        checksum = npz_checksum(tmp)

    save_with(npz, write)
    return checksum


def read_shard(npz: Path, checksum: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probs) of one shard file, verified against `checksum` when given; a missing,
    truncated, corrupt or substituted file is a PmlError naming it."""
    try:
        if checksum is not None and npz_checksum(npz) != checksum:
            raise PmlError(f"{npz}: checksum does not match its manifest (corrupt or overwritten)")
        with np.load(npz) as data:
            return data["indices"], data["probs"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise PmlError(f"{npz}: unreadable shard ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class StoredRows:
    """Where one array of a shard lies in its .npz, which np.savez writes uncompressed: the member
    (its .npy header, then the values, C order) starts at byte `offset` of the file; `crc` is the
    member's CRC-32 from the zip directory (the one the manifest's checksum names). Whoever reads the
    values straight from the file (pml_dist/pseudo/merge.py) must check that CRC itself."""

    name: str
    offset: int
    header: bytes
    shape: tuple[int, ...]
    dtype: np.dtype
    crc: int

    @property
    def size(self) -> int:
        """The member's bytes: header and values."""
        return len(self.header) + self.dtype.itemsize * int(np.prod(self.shape))


_LOCAL_HEADER = struct.Struct(zipfile.structFileHeader)


def open_shard(npz: Path, checksum: str) -> tuple[np.ndarray, StoredRows | None]:
    """A shard's indices (read, their CRC checked) and where its probs lie, after comparing the
    file's checksum with the manifest's `checksum`: one read of the zip directory. The probs are
    None where they cannot be read in place (compressed, not float16, Fortran order): read_shard
    then reads them. Errors as read_shard's."""
    try:
        with zipfile.ZipFile(npz) as z, open(npz, "rb") as f:
            infos = z.infolist()
            if _checksum_of(infos) != checksum:
                raise PmlError(f"{npz}: checksum does not match its manifest (corrupt or overwritten)")
            where = _stored(f, z.getinfo("indices.npy"))
            if where is None or where.dtype.kind not in "iu" or len(where.shape) != 1:
                with z.open("indices.npy") as member:
                    indices = np.lib.format.read_array(member, allow_pickle=False)
            else:
                indices = _read_checked(f, where)
            probs = _stored(f, z.getinfo("probs.npy"))
        if probs is not None and (probs.dtype != np.float16 or len(probs.shape) != 2):
            probs = None
        return indices, probs
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, struct.error) as exc:
        raise PmlError(f"{npz}: unreadable shard ({type(exc).__name__}: {exc})") from None


def _stored(f, info: zipfile.ZipInfo) -> StoredRows | None:
    """Where member `info` of the open .npz `f` lies, or None unless stored, C order, as declared."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:  # compressed or encrypted
        return None
    f.seek(info.header_offset)
    local = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if local[0] != zipfile.stringFileHeader:
        raise zipfile.BadZipFile(f"bad local header of {info.filename}")
    start = info.header_offset + _LOCAL_HEADER.size + local[zipfile._FH_FILENAME_LENGTH] \
        + local[zipfile._FH_EXTRA_FIELD_LENGTH]
    f.seek(start)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        return None
    header_len = f.tell() - start
    f.seek(start)
    where = StoredRows(info.filename, start, f.read(header_len), tuple(shape), dtype, info.CRC)
    if fortran or dtype.hasobject or where.size != info.file_size:
        return None
    return where


def _read_checked(f, where: StoredRows) -> np.ndarray:
    """The whole array of `where`, read from the open file `f`, its CRC-32 checked (zipfile's error)."""
    values = np.empty(where.shape, dtype=where.dtype)
    f.seek(where.offset + len(where.header))
    if f.readinto(memoryview(values).cast("B")) != values.nbytes:
        raise EOFError(f"the file ends inside {where.name}")
    if zlib.crc32(values, zlib.crc32(where.header)) != where.crc:
        raise zipfile.BadZipFile(f"Bad CRC-32 for file {where.name!r}")
    return values


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

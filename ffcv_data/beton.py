"""Write one split into an FFCV `.beton` with the fields image and index.

Labels are not in the .beton: they live beside it, sparse, in `<split>.labels.npz` (prepared.py), and
the loaders look a batch's labels up by its indices (2 x L bytes per sample here would be 40 kB at
OpenImages' 20k classes, more than the image).

Images are stored as the original JPEG bytes wherever FFCV's decoder (libjpeg-turbo to RGB) reads
them as PIL does: baseline or progressive JPEGs in RGB or grayscale no larger than `max_resolution`,
which is every COCO image but a few CMYK ones. FFCV's own writer decodes and re-encodes every image
(OpenCV, 4:2:0 chroma), which alone moved COCO pixels by about 2 levels of 255 at quality 90-95.
The rest are converted to RGB, shrunk to `max_resolution` and re-encoded at `jpeg_quality`.

The file appears under its final name only when complete (written to a temporary name, then
renamed). FFCV's writer hangs forever when a worker's `__getitem__` raises, so image decoding never
raises here: a failure is recorded in a side file and a placeholder is written; the parent then
reports every bad image by name and deletes the temporary file (prepare.py decode-checks every image
before the first .beton, so this is the fallback for a file changed in between).

FFCV's writer is used through `_Writer`, which runs its worker processes so that a Ctrl-C prints
nothing from them (they ignore SIGINT; the parent kills them and frees the shared memory), a killed
parent takes them with it (PR_SET_PDEATHSIG), and a worker that dies is an error instead of a hang.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import time
from pathlib import Path

import numpy as np

from ffcv_data.atomic import FULL, save_with, side_path
from ffcv_data.cores import usable_cores
from ffcv_data.errors import DataError

# 2 MiB pages: a .beton 1.03x the JPEG folder instead of 1.28x with FFCV's 8 MiB default (measured
# on the generated set); still far above one encoded image at max_resolution <= 1024.
PAGE_SIZE = 1 << 21


class OriginalJpeg:
    """A JPEG file's bytes, stored as they are (`_KeepOriginalJpegs`)."""

    def __init__(self, data: bytes, height: int, width: int):
        self.data, self.height, self.width = np.frombuffer(data, dtype=np.uint8), height, width


class _KeepOriginalJpegs:
    """RGBImageField.encode, except that an `OriginalJpeg` is written as it is. Installed on the
    field instance (FFCV records a field's type by its exact class, so a subclass would not read
    back); a callable object rather than a closure so that the field still pickles."""

    def __init__(self, field):
        self.field = field

    def __call__(self, destination, value, malloc):
        from ffcv.fields.rgb_image import IMAGE_MODES, RGBImageField

        if not isinstance(value, OriginalJpeg):
            return RGBImageField.encode(self.field, destination, value, malloc)
        destination["mode"] = IMAGE_MODES["jpg"]
        destination["height"], destination["width"] = value.height, value.width
        destination["data_ptr"], storage = malloc(value.data.nbytes)
        storage[:] = value.data


def _worker(parent: int, full, work_fn, *args) -> None:
    """One FFCV writer process: Ctrl-C is the parent's to handle; it dies when the parent dies; a
    full disk is left in `full` (its errno) for the parent to report as one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    try:
        work_fn(*args)
    except OSError as exc:
        if exc.errno not in FULL:
            raise
        full.value = exc.errno
        os._exit(1)


def _raise_if_one_died(processes: list, full, fname: str, when: str) -> None:
    """A worker that exited with an error is the write's failure: a full disk (its errno in `full`)
    as an OSError that save_with reports as one line naming the .beton, anything else as its exit
    status."""
    dead = [proc.exitcode for proc in processes if proc.exitcode]
    if dead and full.value:
        raise OSError(full.value, os.strerror(full.value), fname)
    if dead:
        raise RuntimeError(f"{fname}: an FFCV writer process died (exit status {dead[0]}) {when}")


def _writer_class():
    from ffcv.writer import DatasetWriter

    class _Writer(DatasetWriter):
        """FFCV 1.0.2's DatasetWriter._write_common with its workers run by `_worker`, stopped with
        their queues and shared memory released when the write fails or is interrupted, and checked
        for death while the parent waits (FFCV waits forever for a dead worker's samples)."""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            from multiprocessing import Process, Queue, Value

            from ffcv.memory_allocator import MemoryAllocator
            from tqdm import tqdm

            self.num_samples = num_samples
            self.prepare()
            workqueue, allocations_queue = Queue(), Queue()
            processes: list = []
            try:
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)
                done_number, full = Value(ctypes.c_uint64, 0), Value(ctypes.c_int, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                               done_number, allocations_queue, *extra_worker_args)
                processes = [Process(target=_worker, args=(os.getpid(), full, work_fn, *worker_args))
                             for _ in range(self.num_workers)]
                for proc in processes:
                    proc.start()
                with tqdm(total=self.num_samples) as progress:
                    previous = 0
                    while previous != self.num_samples:
                        _raise_if_one_died(processes, full, self.fname, f"after {previous} of "
                                           f"{self.num_samples} samples")
                        val = done_number.value
                        progress.update(val - previous)
                        previous = val
                        time.sleep(0.1)
                # A worker counts its samples done before it writes its last page, so the disk can
                # still fill up (and the worker die) after the count is complete: wait with checks.
                allocation_list = []
                for _ in processes:
                    while True:
                        try:
                            allocation_list.extend(allocations_queue.get(timeout=0.1))
                            break
                        except queue.Empty:
                            _raise_if_one_died(processes, full, self.fname,
                                               "while writing its last page")
                self.finalize(allocation_list)
            except BaseException:
                for proc in processes:
                    if proc.is_alive():
                        proc.kill()
                for proc in processes:
                    if proc.pid is not None:
                        proc.join()
                # Their unread items would make the exiting interpreter wait for the feeder threads.
                workqueue.cancel_join_thread()
                allocations_queue.cancel_join_thread()
                raise
            finally:
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return _Writer


class _SplitSource:
    """Indexable (image, index) records for FFCV's DatasetWriter."""

    def __init__(self, files: list[Path], error_log: Path, keep_jpegs_up_to: int):
        self.files = [str(f) for f in files]
        self.error_log = str(error_log)
        self.keep_jpegs_up_to = keep_jpegs_up_to  # longest side of originals stored as they are; 0 = none

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self._image(i), i

    def _image(self, i: int) -> np.ndarray | OriginalJpeg:
        from PIL import Image

        try:
            with Image.open(self.files[i]) as img:
                if (img.format == "JPEG" and img.mode in ("RGB", "L")
                        and max(img.size) <= self.keep_jpegs_up_to):
                    img.load()  # decodes: a corrupt file fails here, not in the loader
                    return OriginalJpeg(Path(self.files[i]).read_bytes(), img.height, img.width)
                # COCO has grayscale and CMYK JPEGs; RGBImageField wants H x W x 3 uint8.
                return np.asarray(img.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - any failure must be reported, never raised here
            line = f"{self.files[i]}: {type(exc).__name__}: {exc}".replace("\n", " ")
            with open(self.error_log, "a") as log:  # O_APPEND: one short line per write is atomic
                log.write(line + "\n")
            return np.zeros((8, 8, 3), dtype=np.uint8)


def _decode_error(file: Path) -> str | None:
    """What `_SplitSource` would fail on for this file (a full decode), as one line; None if none."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            img.load()
        return None
    except Exception as exc:  # noqa: BLE001 - every failure is reported by name
        return f"{file}: {type(exc).__name__}: {exc}".replace("\n", " ")


def unreadable_images(files: list[Path], workers: int = 0) -> list[str]:
    """Decode every file fully (header and pixels), in threads (PIL decodes without the GIL), one per
    usable core unless `workers` > 0; returns one line per file that fails, in the files' order."""
    from concurrent.futures import ThreadPoolExecutor

    if not files:
        return []
    pool = ThreadPoolExecutor(max_workers=min(len(files), workers if workers > 0 else usable_cores()))
    try:
        return [e for e in pool.map(_decode_error, files) if e is not None]
    finally:  # on Ctrl-C too: drop what has not started; each running decode takes milliseconds
        pool.shutdown(wait=True, cancel_futures=True)


def write_beton(
    path: str | Path,
    files: list[Path],
    *,
    max_resolution: int,
    jpeg_quality: int,
    keep_original_jpegs: bool = True,
    workers: int = 0,
) -> Path:
    """Encode one split: record i is image `files[i]` with index i.
    keep_original_jpegs: store JPEGs FFCV decodes like PIL as they are (see above)."""
    from ffcv.fields import IntField, RGBImageField

    path = Path(path)
    if len(files) == 0:
        raise DataError(f"{path}: refusing to write an empty split")
    path.parent.mkdir(parents=True, exist_ok=True)
    error_log = side_path(path, "errors")  # NAME.errors-HOST-PID
    error_log.unlink(missing_ok=True)
    image_field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    image_field.encode = _KeepOriginalJpegs(image_field)
    fields = {
        "image": image_field,
        "index": IntField(),
    }
    source = _SplitSource(files, error_log, keep_jpegs_up_to=max_resolution if keep_original_jpegs else 0)

    def encode(tmp: Path) -> None:
        writer = _writer_class()(str(tmp), fields, page_size=PAGE_SIZE,
                                 num_workers=workers if workers > 0 else usable_cores())
        writer.from_indexed_dataset(source)
        if error_log.exists() and error_log.stat().st_size:  # raising here leaves no file behind
            lines = error_log.read_text().splitlines()
            shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
            raise DataError(f"{path}: {len(lines)} image(s) could not be read: {shown}")

    try:
        save_with(path, encode)
    finally:
        error_log.unlink(missing_ok=True)
    return path

"""Write one split into an FFCV `.beton` with the fields image, labels, observed and index.

Images are stored as the original JPEG bytes wherever FFCV's decoder (libjpeg-turbo to RGB) reads
them as PIL does: baseline or progressive JPEGs in RGB or grayscale no larger than `max_resolution`,
which is every COCO image but a few CMYK ones. FFCV's own writer decodes and re-encodes every image
(OpenCV, 4:2:0 chroma), which alone moved COCO pixels by about 2 levels of 255 at quality 90-95.
The rest are converted to RGB, shrunk to `max_resolution` and re-encoded at `jpeg_quality`.

The file appears under its final name only when complete (written to a temporary name, then
renamed). FFCV's writer hangs forever when a worker's `__getitem__` raises, so image decoding never
raises here: a failure is recorded in a side file and a placeholder is written; the parent then
reports every bad image by name and deletes the temporary file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ffcv_data.atomic import save_with
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


class _SplitSource:
    """Indexable (image, labels, observed, index) records for FFCV's DatasetWriter."""

    def __init__(self, files: list[Path], labels: np.ndarray, observed: np.ndarray, error_log: Path,
                 keep_jpegs_up_to: int):
        self.files = [str(f) for f in files]
        self.labels = labels
        self.observed = observed
        self.error_log = str(error_log)
        self.keep_jpegs_up_to = keep_jpegs_up_to  # longest side of originals stored as they are; 0 = none

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self._image(i), self.labels[i], self.observed[i], i

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


def write_beton(
    path: str | Path,
    files: list[Path],
    labels: np.ndarray,
    observed: np.ndarray,
    *,
    max_resolution: int,
    jpeg_quality: int,
    keep_original_jpegs: bool = True,
    workers: int = 0,
) -> Path:
    """Encode one split; `labels` and `observed` are (N, L) uint8, row i is image `files[i]`.
    keep_original_jpegs: store JPEGs FFCV decodes like PIL as they are (see above)."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = Path(path)
    n, num_classes = labels.shape
    if n == 0:
        raise DataError(f"{path}: refusing to write an empty split")
    if observed.shape != labels.shape or len(files) != n:
        raise ValueError(f"{path}: {len(files)} files, labels {labels.shape}, observed {observed.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    error_log = path.with_name(f"{path.name}.errors-{os.getpid()}")
    error_log.unlink(missing_ok=True)
    image_field = RGBImageField(write_mode="jpg", max_resolution=max_resolution, jpeg_quality=jpeg_quality)
    image_field.encode = _KeepOriginalJpegs(image_field)
    fields = {
        "image": image_field,
        "labels": NDArrayField(np.dtype("uint8"), (num_classes,)),
        "observed": NDArrayField(np.dtype("uint8"), (num_classes,)),
        "index": IntField(),
    }
    source = _SplitSource(files, np.ascontiguousarray(labels), np.ascontiguousarray(observed), error_log,
                          keep_jpegs_up_to=max_resolution if keep_original_jpegs else 0)

    def encode(tmp: Path) -> None:
        writer = DatasetWriter(str(tmp), fields, page_size=PAGE_SIZE,
                               num_workers=workers if workers > 0 else usable_cores())
        writer.from_indexed_dataset(source)
        if error_log.exists() and error_log.stat().st_size:  # raising here leaves no file behind
            lines = error_log.read_text().splitlines()
            shown = "\n  ".join(lines[:5]) + (f"\n  ... {len(lines) - 5} more" if len(lines) > 5 else "")
            raise DataError(f"{path}: {len(lines)} image(s) could not be read:\n  {shown}")

    try:
        save_with(path, encode)
    finally:
        error_log.unlink(missing_ok=True)
    return path

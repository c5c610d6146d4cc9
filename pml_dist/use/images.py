"""predict's inputs: the image files its PATH arguments name, and their pixels, read without FFCV.

    a file       itself, named as given
    a folder     every image below it (IMAGE_SUFFIXES, any case), sorted; named relative to it, so
                 a `--format labels` CSV has the `file` column data.images=<folder> reads
    a .txt file  one image path a line (blank lines and # comments skipped), relative to the
                 .txt's folder unless absolute; named as written
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pml_dist.errors import PmlError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ImageRef:
    path: Path  # what is opened
    name: str  # what the output calls it


def image_refs(arguments: list[str]) -> list[ImageRef]:
    """Every image the arguments name, in argument order; a missing argument is a one-line error
    before anything is scored (a missing file inside a list is an unreadable image instead)."""
    refs: list[ImageRef] = []
    for text in arguments:
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            refs += [ImageRef(p, p.relative_to(path).as_posix()) for p in found]
        elif path.suffix.lower() == ".txt" and path.is_file():
            refs += _listed(path)
        elif path.is_file():
            refs.append(ImageRef(path, text))
        else:
            raise PmlError(f"{text}: no such file or folder")
    if not refs:
        raise PmlError(f"no images in {', '.join(arguments)} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return refs


def _listed(listing: Path) -> list[ImageRef]:
    try:
        lines = listing.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise PmlError(f"{listing}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [ImageRef(listing.parent / name, name) for name in names]


def decode(path: Path) -> torch.Tensor:
    """float32 (3, H, W) RGB in [0, 1], as prepare reads an image (PIL, convert("RGB"): grayscale,
    CMYK and palette images too; no EXIF rotation, which prepare does not apply either). Raises
    whatever PIL raises for a file it cannot read."""
    from PIL import Image

    with Image.open(path) as img:
        pixels = np.array(img.convert("RGB"))  # a copy: writable, as torch.from_numpy wants
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255

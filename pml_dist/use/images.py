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

from ffcv_data.decode_scale import MAX_DENOMINATOR, scale_denominator
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


def loader_max_denominator(center_crop: bool) -> int:
    """The smallest JPEG scale (1/d) the evaluation loader decodes at for data.eval_transform: `resize`
    (ffcv_data/whole_image.py) down to 1/8; `center_crop` (FFCV's CenterCropRGBImageDecoder) always at
    full size."""
    return 1 if center_crop else MAX_DENOMINATOR


def draft_request(width: int, height: int, d: int) -> tuple[int, int]:
    """The size to ask PIL's Image.draft for so that it decodes at exactly 1/d (d in 1, 2, 4, 8, at most
    the shorter side): PIL takes the largest of 8, 4, 2, 1 that is <= min(W // w, H // h), and for
    w = W // d that quotient W // (W // d) = d + (W mod d) // (W // d) lies in [d, 2d)."""
    return width // d, height // d


def decode(path: Path, out_size: int = 0, max_denominator: int = MAX_DENOMINATOR) -> torch.Tensor:
    """float32 (3, H, W) RGB in [0, 1], as prepare reads an image (PIL, convert("RGB"): grayscale,
    CMYK and palette images too; no EXIF rotation, which prepare does not apply either). Raises
    whatever PIL raises for a file it cannot read.

    out_size > 0: a JPEG is decoded at the reduced scale the evaluation loader decodes it at for an
    out_size square (libjpeg's DCT scaling, through PIL's Image.draft): 1/d of its size, rounded up,
    d = ffcv_data.decode_scale.scale_denominator(H, W, out_size, out_size, max_denominator). Other
    images are decoded at full size."""
    from PIL import Image

    with Image.open(path) as img:
        if out_size > 0 and img.format == "JPEG":
            width, height = img.size
            d = scale_denominator(height, width, out_size, out_size, max_denominator)
            if d > 1:
                img.draft("RGB", draft_request(width, height, d))
                expected = (-(-width // d), -(-height // d))
                if img.size != expected:  # PIL chose another scale: its rule has changed
                    raise RuntimeError(f"PIL decoded {width} x {height} at {img.size}, not 1/{d}: {expected}")
        pixels = np.array(img.convert("RGB"))  # a copy: writable, as torch.from_numpy wants
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255

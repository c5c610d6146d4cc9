"""The whole-image decoder (ffcv_data/whole_image.py) against the procedure it replaces, re-done here
from FFCV's own Python wrappers of libffcv: decode each stored JPEG (at 1/d of its size, d the
largest of 8, 4, 2, 1 that still covers the output square), resize with INTER_AREA, normalise in torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ffcv_data.loaders import MEAN, STD, eval_loader

OUT = 24  # from the 48 px records: every JPEG decodes at 1/2 (24 px), not 1/4 (12 px)


@pytest.fixture(scope="module")
def beton(betons):
    return betons["train"]


def reference(path, out: int, scaled: bool) -> torch.Tensor:
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta = reader.metadata[f"f{list(reader.handlers).index('image')}"]
    table = reader.alloc_table
    size_at = dict(zip(table["ptr"].tolist(), table["size"].tolist(), strict=True))
    storage = np.memmap(str(path), "uint8", mode="r")
    images = []
    for record in meta:
        assert record["mode"] == 0  # jpg
        h, w, ptr = int(record["height"]), int(record["width"]), int(record["data_ptr"])
        d = next(d for d in (8, 4, 2, 1) if -(-h // d) >= out and -(-w // d) >= out) if scaled else 1
        decoded = np.empty((-(-h // d), -(-w // d), 3), np.uint8)
        imdecode(np.ascontiguousarray(storage[ptr:ptr + size_at[ptr]]), decoded, h, w, h, w, 0, 0, 1, d,
                 False, False)
        resized = np.empty((out, out, 3), np.uint8)
        resize_crop(decoded, 0, decoded.shape[0], 0, decoded.shape[1], resized)
        images.append(resized)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _all(loader) -> torch.Tensor:
    return torch.cat([b["image"].clone() for b in loader])


@pytest.mark.parametrize("jit", [False, True])
def test_decodes_at_reduced_scale_bit_for_bit_as_the_reference(beton, jit):
    """jit on: the decoder inside FFCV's compiled stage (its flip mask read through object mode)."""
    loaded = _all(eval_loader(beton, 64, OUT, transform="resize", jit=jit, label_fields=()))
    expected = reference(beton, OUT, scaled=True)
    assert loaded.dtype == torch.float32 and loaded.shape == expected.shape
    assert torch.equal(loaded, expected)


def test_reduced_scale_stays_close_to_the_full_decode(beton):
    """What scaled decoding changes: a few levels of 255 on average, against decoding at full size."""
    full, scaled = reference(beton, OUT, scaled=False), reference(beton, OUT, scaled=True)
    difference = ((full - scaled) * torch.tensor(STD).view(1, 3, 1, 1)).abs()  # back to 0-255
    assert 0 < difference.mean() < 3.0, difference.mean()


def test_the_scale_is_the_smallest_image_covering_the_output():
    from ffcv_data.whole_image import scale_denominator

    assert scale_denominator(480, 640, 48, 48, 8) == 8  # 60 x 80
    assert scale_denominator(480, 640, 61, 48, 8) == 4  # 1/8 would give 60 rows
    assert scale_denominator(480, 640, 448, 448, 8) == 1  # the COCO preset: full size
    assert scale_denominator(100, 100, 24, 24, 8) == 4
    assert scale_denominator(48, 48, 24, 24, 8) == 2  # the records of the tests above
    assert scale_denominator(100, 100, 24, 24, 1) == 1  # scaled_decode off

"""resize.py against the resize the evaluation loader really calls: libffcv's `resize` (OpenCV
INTER_AREA on uint8), on random pixels (the worst case: no smooth areas), shrinking by integer and
fractional factors, enlarging, and both at once; and Classifier's center crop against FFCV's."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from pml_dist.use.classifier import Classifier
from pml_dist.use.resize import area_resize


def _libffcv_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    import ffcv._libffcv

    lib = ctypes.CDLL(ffcv._libffcv.__file__)
    lib.resize.argtypes = [ctypes.c_int64] * 11
    image = np.ascontiguousarray(image)
    h, w = image.shape[:2]
    out = np.zeros((out_h, out_w, 3), np.uint8)
    lib.resize(0, image.ctypes.data, h, w, 0, h, 0, w, out.ctypes.data, out_h, out_w)
    return out


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("h, w, out_h, out_w", [
    (48, 48, 32, 32), (48, 48, 24, 24), (64, 48, 32, 32), (37, 53, 32, 32), (640, 480, 448, 448),
    (20, 20, 32, 32), (48, 20, 32, 32), (32, 32, 32, 32)])
def test_area_resize_is_opencv_inter_area_up_to_its_uint8_rounding(h, w, out_h, out_w):
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    ours = area_resize(x, out_h, out_w)[0].permute(1, 2, 0).numpy()
    theirs = _libffcv_resize(image, out_h, out_w) / 255
    # OpenCV rounds to uint8 (half a level) and enlarges in fixed point: measured max 0.0020 when
    # shrinking, 0.0029 when enlarging; F.interpolate(bilinear, antialias) differs by 0.11-0.28 here
    assert np.abs(ours - theirs).max() <= 1 / 255
    scripted = torch.jit.script(area_resize)
    assert torch.equal(scripted(x, out_h, out_w), area_resize(x, out_h, out_w))


def test_center_crop_takes_ffcvs_central_square():
    x = torch.rand(1, 3, 41, 60)
    classifier = Classifier(torch.nn.Identity(), 41, center_crop=True)
    # ffcv.fields.rgb_image.get_center_crop(41, 60, _, 1.0): rows 0..40, columns (60 - 41) // 2 = 9..49
    assert torch.equal(classifier.resize(x), x[:, :, :, 9:50])
    assert torch.equal(Classifier(torch.nn.Identity(), 41).resize(x[:, :, :, 9:50]), x[:, :, :, 9:50])

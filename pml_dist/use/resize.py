"""The evaluation path's resize, in torch: OpenCV's INTER_AREA (what FFCV's `resize`, and so
ffcv_data/whole_image.py, calls) written as one weight matrix per axis, so a scripted model resizes
any input the way the loaders resized the images it was trained and evaluated on.

Why not F.interpolate: bilinear with antialias=True filters with a triangle twice the scale wide,
INTER_AREA with a box exactly the scale wide. On random pixels its output differs from OpenCV's by
0.11-0.28 (of 1), this one's by OpenCV's uint8 rounding only (<= 1/255); on the generated test split
(48 -> 32 px) predict's probabilities then differ from the loader's by at most 0.0025 instead of
0.0067 (tests/pml_dist/use).

INTER_AREA, per OpenCV's resize: when neither side grows, each output pixel is the mean of the
input area it covers (pixels cut by its edges weighted by the part inside); otherwise both axes use
its linear interpolation whose weights snap to whole pixels near the input's pixel edges.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def axis_weights(n_in: int, n_out: int, shrink: bool) -> torch.Tensor:
    """(n_out, n_in) float64: output pixel j = sum_i w[j, i] * input pixel i along one axis."""
    scale = n_in / n_out
    j = torch.arange(n_out, dtype=torch.float64)
    if shrink:
        i = torch.arange(n_in, dtype=torch.float64)
        lo = (j * scale)[:, None]
        overlap = torch.minimum(lo + scale, i[None, :] + 1) - torch.maximum(lo, i[None, :])
        return overlap.clamp(min=0.0) / scale
    # OpenCV's area-mode linear coefficients: sx = floor(j * scale), fx = (j + 1) - (sx + 1) / scale,
    # fx = 0 where that is <= 0 else its fractional part; the last input pixel is clamped
    sx = torch.floor(j * scale)
    fx = (j + 1) - (sx + 1) / scale
    fx = torch.where(fx <= 0, torch.zeros_like(fx), fx - torch.floor(fx))
    last = sx >= n_in - 1
    fx = torch.where(last, torch.zeros_like(fx), fx)
    sx = sx.clamp(max=n_in - 1).long()
    nxt = (sx + 1).clamp(max=n_in - 1)
    return (F.one_hot(sx, n_in).double() * (1 - fx)[:, None]
            + F.one_hot(nxt, n_in).double() * fx[:, None])


def area_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, H, W) float -> (N, C, height, width), as cv2.resize(..., INTER_AREA) without its uint8
    rounding; the input itself when the size already matches (exactly: no arithmetic)."""
    h, w = x.shape[-2], x.shape[-1]
    if h == height and w == width:
        return x
    shrink = h >= height and w >= width
    rows = axis_weights(h, height, shrink).to(device=x.device, dtype=x.dtype)
    cols = axis_weights(w, width, shrink).to(device=x.device, dtype=x.dtype)
    return torch.matmul(torch.matmul(rows, x), cols.t())

"""The decoder of the whole-image transforms (`resize`, `resize_flip`): one compiled kernel per batch
that decodes each JPEG, resizes it to the output square and, on CPU, also flips, normalises and lays
it out as float32 CHW, so a batch leaves the loader in one pass over its pixels.

Why a kernel of our own rather than FFCV's decoder + ToTorchImage + a flip + Normalize:
- one pass instead of four over a batch (at 448 px a batch of 64 is 154 MB of float32), spread over
  the loader's threads; FFCV runs the ops after its decoder on one thread, one after another;
- the kernel is compiled once per process (and cached on disk) whether or not `data.jit` switches
  FFCV's code generation on: with it off FFCV decoded a batch's images one after another;
- JPEG decoding at reduced scale: libjpeg-turbo decodes at 1/2, 1/4 or 1/8 of the size directly from
  the DCT coefficients (the scale arguments FFCV's imdecode has and its decoders never use); the
  kernel takes the smallest scale whose image still covers the output square, so the resize that
  follows still only shrinks. COCO images (640 px) at 448 px decode at full scale, as before.

The flip is `flip_mask(seed, epoch, index)` (transforms.py); the epoch changes between epochs while
FFCV compiles the pipeline once, so compiled code reads the mask through numba's object mode.
The kernels call libffcv's own C functions (libjpeg-turbo decode, OpenCV INTER_AREA resize) by symbol,
which lets numba cache them across processes; FFCV calls the same functions through ctypes.
"""

from __future__ import annotations

import ctypes
import warnings
from dataclasses import replace

import ffcv._libffcv
import numba
import numpy as np
from ffcv.fields.rgb_image import SimpleRGBImageDecoder
from ffcv.pipeline.allocation_query import AllocationQuery
from llvmlite import binding
from numba import njit, prange, types

from ffcv_data.decode_scale import MAX_DENOMINATOR
from ffcv_data.decode_scale import scale_denominator as _scale_rule
from ffcv_data.transforms import MEAN, STD, flip_mask

JPEG_MODE = 0  # ffcv.fields.rgb_image.IMAGE_MODES['jpg']; other records are raw HxWx3 pixels


def _bind_libffcv():
    binding.load_library_permanently(ffcv._libffcv.__file__)
    lib = ctypes.CDLL(ffcv._libffcv.__file__)
    for name in ("imdecode", "resize"):  # the symbol numba links must be libffcv's, not a namesake
        if binding.address_of_symbol(name) != ctypes.cast(getattr(lib, name), ctypes.c_void_p).value:
            raise ImportError(f"another library in this process exports {name!r} before libffcv")


_bind_libffcv()
# int imdecode(src, src_size, src_h, src_w, dst, crop_h, crop_w, off_x, off_y, scale_num, scale_denom,
#              enable_crop, hflip); pointers as integers, C bools as bytes
_imdecode = types.ExternalFunction("imdecode", types.int32(
    types.uintp, types.uint64, types.uint32, types.uint32, types.uintp, types.uint32, types.uint32,
    types.uint32, types.uint32, types.uint32, types.uint32, types.uint8, types.uint8))
# void resize(interpolation (unused), src, src_h, src_w, row0, row1, col0, col1, dst, dst_h, dst_w)
_resize = types.ExternalFunction("resize", types.void(*[types.int64] * 11))


# the rule itself is plain Python in decode_scale.py, which predict imports without numba
scale_denominator = njit(nogil=True, cache=True)(_scale_rule)


# inlined: as a cached function of its own, its first compilation from inside FFCV's compiled stage
# failed (a KeyError in numba's dispatcher) and killed the loader thread
@njit(nogil=True, inline="always")
def _decode_resize_one(field, storage, ptrs, sizes, temp, dst, max_denominator):
    """One record into dst (out_h, out_w, 3) uint8; temp holds the decoded image."""
    ptr = field["data_ptr"]
    size = sizes[np.searchsorted(ptrs, ptr)]  # what FFCV's os-cache reader does
    h, w = np.int64(field["height"]), np.int64(field["width"])
    out_h, out_w = dst.shape[0], dst.shape[1]
    if field["mode"] == JPEG_MODE:
        d = scale_denominator(h, w, out_h, out_w, max_denominator)
        src_h, src_w = (h + d - 1) // d, (w + d - 1) // d
        # return value ignored, as FFCV's decoders do: libjpeg-turbo reports warnings (a truncated
        # original COCO JPEG) the same way as errors, and prepare already refused unreadable images
        _imdecode(storage.ctypes.data + ptr, size, h, w, temp.ctypes.data, h, w, 0, 0, 1, d, 0, 0)
        src = temp.ctypes.data
    else:
        src_h, src_w, src = h, w, storage.ctypes.data + ptr
    _resize(0, src, src_h, src_w, 0, src_h, 0, src_w, dst.ctypes.data, out_h, out_w)


@njit(nogil=True, parallel=True, cache=True, fastmath=False)  # also when called from FFCV's fastmath code
def decode_resize(indices, metadata, storage, ptrs, sizes, temp, resized, flips, out, max_denominator):
    """uint8 (n, out_h, out_w, 3): decoded, resized, mirrored where flips[k] (for a GPU, which
    normalises on the device)."""
    width = out.shape[2]
    for k in prange(len(indices)):
        _decode_resize_one(metadata[indices[k]], storage, ptrs, sizes, temp[k], resized[k], max_denominator)
        if flips[k]:
            for x in range(width):
                out[k, :, x] = resized[k, :, width - 1 - x]
        else:
            out[k] = resized[k]
    return out[: len(indices)]


def normalisation_table(mean, std) -> np.ndarray:
    """(3, 256) float32: (v - mean[c]) / std[c] for every pixel value v, computed in float32 exactly
    as `x.float().sub_(mean).div_(std)` is; looking it up is 1.7x faster than the arithmetic."""
    values = np.arange(256, dtype=np.float32)[None, :]
    return (values - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


@njit(nogil=True, parallel=True, cache=True, fastmath=False)  # also when called from FFCV's fastmath code
def decode_resize_normalise(indices, metadata, storage, ptrs, sizes, temp, resized, flips, table, out,
                            max_denominator):
    """float32 (n, 3, out_h, out_w): decoded, resized, mirrored where flips[k], normalised per channel
    through `table` (normalisation_table)."""
    height, width = out.shape[2], out.shape[3]
    for k in prange(len(indices)):
        image = resized[k]
        _decode_resize_one(metadata[indices[k]], storage, ptrs, sizes, temp[k], image, max_denominator)
        for y in range(height):
            row = image[y]
            for c in range(3):
                lookup, dst = table[c], out[k, c, y]
                if flips[k]:
                    for x in range(width):
                        dst[x] = lookup[row[width - 1 - x, c]]
                else:
                    for x in range(width):
                        dst[x] = lookup[row[x, c]]
    return out[: len(indices)]


class WholeImageDecoder(SimpleRGBImageDecoder):
    """FFCV decoder: the whole image resized to `output_size` (aspect not kept), mirrored by
    `flip_mask(flip_seed, epoch, index)` when flip_seed is not None, and with normalise=True
    normalised float32 CHW (else uint8 HWC). `epoch` is set by the loader before each epoch.

    scaled_decode=False decodes every JPEG at full size (FFCV's own decoders' pixels).
    """

    def __init__(self, output_size, *, normalise: bool, flip_seed: int | None = None,
                 scaled_decode: bool = True):
        super().__init__()
        self.output_size = tuple(output_size)
        self.normalise, self.flip_seed, self.epoch = normalise, flip_seed, 0
        self.max_denominator = MAX_DENOMINATOR if scaled_decode else 1

    def flips(self, indices: np.ndarray) -> np.ndarray:
        if self.flip_seed is None:
            return np.zeros(len(indices), dtype=np.bool_)
        return flip_mask(self.flip_seed, self.epoch, indices)

    def declare_state_and_memory(self, previous_state):
        h, w = self.output_size
        largest = int(self.metadata["height"].astype(np.int64).max()
                      * self.metadata["width"].astype(np.int64).max())
        shape, dtype = ((3, h, w), np.dtype("<f4")) if self.normalise else ((h, w, 3), np.dtype("<u1"))
        return replace(previous_state, jit_mode=True, shape=shape, dtype=dtype), (
            AllocationQuery(shape, dtype),
            AllocationQuery((largest * 3,), np.dtype("<u1")),  # a decoded image
            AllocationQuery((h, w, 3), np.dtype("<u1")),  # it resized
        )

    def generate_code(self):
        table = normalisation_table(MEAN, STD)
        normalise, max_denominator, op = self.normalise, self.max_denominator, self

        def decode(batch_indices, buffers, metadata, storage_state):
            out, temp, resized = buffers
            storage, ptrs, sizes = storage_state  # FFCV's os-cache state (the loaders use os_cache)
            with numba.objmode(flips="boolean[::1]"):  # Python, also inside FFCV's compiled stage
                flips = op.flips(batch_indices)
            if normalise:
                return decode_resize_normalise(batch_indices, metadata, storage, ptrs, sizes, temp,
                                               resized, flips, table, out, max_denominator)
            return decode_resize(batch_indices, metadata, storage, ptrs, sizes, temp, resized, flips,
                                 out, max_denominator)

        return decode


# numba notes that the object-mode block cannot run in parallel: it is one call per batch, on purpose
warnings.filterwarnings("ignore", message="Code running in object mode won't allow parallel execution")

"""The image transforms of the loaders (`data.train_transform`, `data.eval_transform`), as FFCV ops.

    train  resize_flip          the whole image resized to a square, then a seeded horizontal flip
                                (Cole et al. 2021: Resize((448, 448)) + RandomHorizontalFlip(0.5))
           random_resized_crop  FFCV's random-resized crop (scale 0.08-1) + its unseeded flip
           resize               no augmentation: the evaluation transform of the same name
    eval   resize               the whole image resized to a square (Cole et al.'s val and test)
           center_crop          the central square of the short side, resized

The whole-image transforms use `whole_image.py`'s decoder (decode, resize, flip and, on CPU,
normalisation in one compiled pass); the crop transforms FFCV's own decoders. The flip of
`resize_flip` is a function of (seed, epoch, sample index), so two runs of one command see the same
images and a resumed epoch flips what the interrupted one would have; FFCV's own flip draws from
numpy's global generator.
"""

from __future__ import annotations

import numpy as np

TRAIN_TRANSFORMS = ("resize_flip", "random_resized_crop", "resize")
EVAL_TRANSFORMS = ("resize", "center_crop")
# ImageNet statistics (torchvision's pretrained ResNets expect them), on the 0-255 scale.
MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def flip_mask(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Which samples are mirrored in `epoch`: a fair coin per (seed, epoch, index), splitmix64-hashed."""
    def mix(z: np.ndarray) -> np.ndarray:
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash intends
        key = mix(np.uint64(seed) * golden + np.uint64(epoch)) * golden
        z = mix(np.asarray(indices, dtype=np.uint64) + key)
    return (z >> np.uint64(63)).astype(bool)


def image_ops(name: str, image_size: int, seed: int, on_gpu: bool) -> tuple[list, bool]:
    """A transform's FFCV ops from the record to a tensor on the host, and whether that tensor is
    already the normalised float32 NCHW batch (the whole-image transforms on CPU); otherwise it is
    uint8 NHWC, which the loader moves to its device before ToTorchImage and Normalize (on a GPU:
    4x less host-to-device traffic)."""
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, ToTensor

    from ffcv_data.whole_image import WholeImageDecoder

    size = (image_size, image_size)
    if name in ("resize", "resize_flip"):
        flip_seed = seed if name == "resize_flip" else None
        return [WholeImageDecoder(size, normalise=not on_gpu, flip_seed=flip_seed), ToTensor()], not on_gpu
    if name == "center_crop":
        return [CenterCropRGBImageDecoder(size, ratio=1.0), ToTensor()], False
    if name == "random_resized_crop":
        return [RandomResizedCropRGBImageDecoder(size), RandomHorizontalFlip(), ToTensor()], False
    raise ValueError(f"unknown image transform {name!r} (train: {', '.join(TRAIN_TRANSFORMS)}; "
                     f"eval: {', '.join(EVAL_TRANSFORMS)})")

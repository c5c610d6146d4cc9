"""The image transforms of the loaders (`data.train_transform`, `data.eval_transform`), as FFCV ops.

    train  resize_flip          the whole image resized to a square, then a seeded horizontal flip
                                (Cole et al. 2021: Resize((448, 448)) + RandomHorizontalFlip(0.5))
           random_resized_crop  FFCV's random-resized crop (scale 0.08-1) + its unseeded flip
           resize               no augmentation: the evaluation transform of the same name
    eval   resize               the whole image resized to a square (Cole et al.'s val and test)
           center_crop          the central square of the short side, resized

FFCV has no whole-image decoder: `WholeImageDecoder` is its resized-crop decoder with a crop that is
the whole image, so it is compiled with the rest of the pipeline like the other decoders (JPEG
decode and OpenCV INTER_AREA resize in one pass). The flip of `resize_flip` is a function of
(seed, epoch, sample index), so two runs of one command see the same images and a resumed epoch
flips what the interrupted one would have; FFCV's own flip draws from numpy's global generator.
"""

from __future__ import annotations

import numpy as np

TRAIN_TRANSFORMS = ("resize_flip", "random_resized_crop", "resize")
EVAL_TRANSFORMS = ("resize", "center_crop")


def _whole_image(height, width, scale, ratio):
    """FFCV crop generator (compiled by numba): top, left, height, width of the crop."""
    return 0, 0, height, width


def _whole_image_decoder_class():
    from ffcv.fields.rgb_image import ResizedCropRGBImageDecoder

    class WholeImageDecoder(ResizedCropRGBImageDecoder):
        """Decode and resize the whole image to `output_size` (aspect not kept)."""

        def __init__(self, output_size):
            super().__init__(output_size)
            self.scale, self.ratio = None, 1.0  # unused by the crop generator; compiled as constants

        @property
        def get_crop_generator(self):
            return _whole_image

    return WholeImageDecoder


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


def _flip_class():
    from dataclasses import replace

    from ffcv.pipeline.operation import Operation

    class SeededHorizontalFlip(Operation):
        """Mirror the samples `flip_mask` picks, in place, on the batch tensor (N, C, H, W) wherever
        it lives (CPU or CUDA). Runs after ToTorchImage; `epoch` is set by the loader each epoch."""

        def __init__(self, seed: int):
            super().__init__()
            self.seed, self.epoch = seed, 0

        def generate_code(self):
            def flip(images, _, indices):
                import torch

                mask = torch.from_numpy(flip_mask(self.seed, self.epoch, indices[: images.shape[0]]))
                if mask.any():
                    chosen = mask.nonzero().view(-1).to(images.device)
                    images[chosen] = images[chosen].flip(3)
                return images

            flip.with_indices = True
            return flip

        def declare_state_and_memory(self, previous_state):
            return replace(previous_state, jit_mode=False), None

    return SeededHorizontalFlip


def transform_ops(name: str, image_size: int, seed: int = 0) -> tuple:
    """A transform's ops: (the decoder, ops on the decoded uint8 NHWC arrays before ToTensor, ops
    on the NCHW tensor after ToTorchImage, on the loader's device)."""
    from ffcv.fields.decoders import (
        CenterCropRGBImageDecoder,
        RandomResizedCropRGBImageDecoder,
    )
    from ffcv.transforms import RandomHorizontalFlip

    size = (image_size, image_size)
    if name == "resize":
        return _whole_image_decoder_class()(size), [], []
    if name == "resize_flip":
        return _whole_image_decoder_class()(size), [], [_flip_class()(seed)]
    if name == "center_crop":
        return CenterCropRGBImageDecoder(size, ratio=1.0), [], []
    if name == "random_resized_crop":
        return RandomResizedCropRGBImageDecoder(size), [RandomHorizontalFlip()], []
    raise ValueError(f"unknown image transform {name!r} (train: {', '.join(TRAIN_TRANSFORMS)}; "
                     f"eval: {', '.join(EVAL_TRANSFORMS)})")

"""The scale a JPEG is decoded at for an output square: libjpeg-turbo decodes at 1/2, 1/4 or 1/8 of
the size directly from the DCT coefficients, and the whole-image decoder (whole_image.py, which
compiles this rule into its kernel) takes the smallest scale whose image still covers the output,
so the resize that follows only shrinks. Plain Python with no imports, so that `pml-dist predict`
(pml_dist/use/images.py) decodes at the same scale without loading FFCV or numba."""

MAX_DENOMINATOR = 8  # libjpeg-turbo's smallest scale: 1/8


def scale_denominator(height, width, out_h, out_w, max_denominator):
    """The largest d in (8, 4, 2, 1), at most max_denominator, with ceil(h / d) x ceil(w / d)
    still at least the output size."""
    d = max_denominator
    while d > 1 and ((height + d - 1) // d < out_h or (width + d - 1) // d < out_w):
        d //= 2
    return d

"""The conventional lossless codes beside bits-back: PNG and WebP-lossless (Pillow, no TensorFlow).

They code the seed (the first image's top rows, the bottom of the ANS stack) and, in mode
`CONVENTIONAL`, every image of a message that bits-back would code larger.
"""

import io

import numpy as np

from vdm_tf.compression.container import CompressionError
from vdm_tf.image_files import MODES, to_pil

_CONVENTIONAL_FORMATS = ("PNG", "WEBP")  # the lossless codes of seeds and conventional files (Pillow)
_WEBP_LOSSLESS = {"lossless": True, "quality": 100, "method": 6, "exact": True}
FORMAT_NAMES = {"PNG": "PNG", "WEBP": "WebP-lossless"}


def lossless_bytes(image, formats=_CONVENTIONAL_FORMATS):
    """The smallest conventional lossless file of a uint8 image [H, W, C]: (bytes, format name).

    PNG (Pillow, optimize=True) or WebP-lossless (Pillow, method 6), whichever is smaller and
    decodes back to exactly these pixels (`decode_lossless`).
    """
    picture = to_pil(image)
    best = None
    for kind in formats:
        buffer = io.BytesIO()
        picture.save(buffer, format=kind, **({"optimize": True} if kind == "PNG" else _WEBP_LOSSLESS))
        data = buffer.getvalue()
        if (best is None or len(data) < len(best[0])) and np.array_equal(decode_lossless(data, image.shape), image):
            best = data, kind
    return best


def decode_lossless(data, shape):
    """The uint8 image [H, W, C] of a PNG or WebP file from `lossless_bytes`; CompressionError if it is not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as picture:
            picture.load()
            array = np.asarray(picture.convert(MODES[shape[-1]]))
    except Exception as error:  # Pillow reports broken files with many exception types
        raise CompressionError(f"Corrupted data: a conventionally coded image does not decode ({error}).") from None
    array = array.reshape(array.shape[0], array.shape[1], -1)
    if array.shape != tuple(shape):
        raise CompressionError(f"Corrupted data: a conventionally coded image of {array.shape}, expected {shape}.")
    return array


def image_file_bytes(image, **options):
    """The size of one uint8 image [H, W, C] as a file written by Pillow (`Image.save` options; PNG by default)."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, **({"format": "PNG"} | options))
    return len(buffer.getvalue())

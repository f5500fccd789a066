"""Image files in and out: the one place that reads and writes them (Pillow; no TensorFlow).

The command lines (`python -m vdm_tf.compression`, `python -m export.client`) and the trainer's
sample grids read and write images here, so that every one refuses the same files with the same
one-line message and writes each file whole or not at all (`vdm_tf.files`).

What is read: a grey (mode L, C = 1) or RGB (C = 3) image as uint8 [H, W, C], its pixels as
stored: nothing is converted. A palette, alpha, 16-bit or CMYK image is refused with its mode
named (a conversion would make "lossless" untrue of the file the user gave), and so is a file
holding several images (a multi-page TIFF, an animated GIF, PNG or WebP): only its first frame
would be read, and the others silently lost.
"""

import os

import numpy as np

from vdm_tf import files

MODES = {1: "L", 3: "RGB"}  # Pillow's mode of an image of C channels


class ImageFileError(ValueError):
    """An input file that is not a readable single grey or RGB image; the message is one line."""


def read_image(path, modes=("L", "RGB"), expected=None):
    """One image file as (uint8 [H, W, C], format): Pillow's format name (PNG, JPEG, TIFF, ...).

    Args:
        path: the file.
        modes: the Pillow modes accepted; nothing is converted (a bilevel image, mode "1",
            reads as 0 / 255).
        expected: the end of every message (default: "expected a grey (mode L) or RGB image").

    Raises:
        ImageFileError: missing, a directory, empty, unreadable, broken, several frames, or a
            mode not in `modes`; the message names the path and what was expected.
    """
    from PIL import Image, UnidentifiedImageError

    expected = expected or f"expected a {' or '.join(_MODE_NAMES.get(m, m) for m in modes)} image"
    if not os.path.exists(path):
        raise ImageFileError(f"{path}: no such file; {expected}.")
    if os.path.isdir(path):
        raise ImageFileError(f"{path}: is a directory; {expected}.")
    try:
        if os.path.getsize(path) == 0:
            raise ImageFileError(f"{path}: the file is empty; {expected}.")
        with Image.open(path) as picture:
            frames = getattr(picture, "n_frames", 1)
            if frames > 1:
                raise ImageFileError(
                    f"{path}: holds {frames} images ({picture.format} frames or pages); {expected} per file: "
                    "save each frame as its own file."
                )
            if picture.mode not in modes:
                raise ImageFileError(
                    f"{path}: got mode {picture.mode}; {expected} (nothing is converted: palette, alpha and "
                    "16-bit images are refused)."
                )
            picture.load()
            array = np.asarray(picture)
            kind = picture.format
    except ImageFileError:
        raise
    except UnidentifiedImageError:
        raise ImageFileError(f"{path}: not a readable image file (Pillow cannot identify it); {expected}.") from None
    except OSError as error:  # unreadable (permissions) or truncated
        raise ImageFileError(f"{path}: not a readable image ({error.strerror or error}); {expected}.") from None
    except Exception as error:  # Pillow reports broken files with many exception types
        raise ImageFileError(f"{path}: a broken image file ({type(error).__name__}: {error}); {expected}.") from None
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    return array.reshape(array.shape[0], array.shape[1], -1).astype(np.uint8, copy=False), kind


_MODE_NAMES = {"L": "grey (mode L)", "RGB": "RGB", "1": "bilevel (mode 1)"}


def to_pil(image):
    """A uint8 image [H, W, 1] or [H, W, 3] as a Pillow image of mode L or RGB."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in MODES:
        raise ValueError(f"expected a uint8 image [H, W, 1 or 3]; got {image.dtype} {list(image.shape)}.")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, MODES[image.shape[-1]])


def write_image(path, image, format="PNG", **options):
    """Writes a uint8 image [H, W, C] (or a Pillow image) to `path`, whole or not at all.

    `format` and `options` are Pillow's (`Image.save`); PNG by default, whatever the extension.
    """
    picture = image if hasattr(image, "save") else to_pil(image)
    with files.atomic_path(path) as temporary:
        picture.save(temporary, format=format, **options)

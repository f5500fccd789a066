"""Pixels: uint8 <-> [-1, 1] encoding, input checks and the discretized decoder p(x | z_0).

Conventions (Kingma et al. 2021, "Variational Diffusion Models", appendix A.2 / eq. 21-23):

- A pixel value `x` in {0, ..., 255} is encoded as the centre of its bin in (-1, 1):
  `f = 2 * (x + 0.5) / 256 - 1`.
- The decoder factorises over pixels; for one pixel,
  `p(x | z_0) ∝ exp(-0.5 * SNR_0 * (z_0 / alpha_0 - f_x)^2)` with `SNR_0 = exp(-gamma_0)`,
  a 256-way softmax over the bin centres.
- A data set whose pixels take only some of the 256 values (the embedded digits: 17 values)
  can give the decoder that *alphabet* (`pixel_values`): the softmax then runs over those
  values only, mixed with a floor of `ALPHABET_FLOOR` spread over all 256, so every value keeps
  a probability (bits-back coding stays lossless on any image) and a pixel inside the alphabet
  loses at most -log(1 - ALPHABET_FLOOR) = 1e-6 nats.
"""

import math

import numpy as np
import tensorflow as tf

NUM_VALUES = 256
# Probability mass a restricted decoder (`pixel_values`) leaves, uniformly, to all 256 values.
ALPHABET_FLOOR = 1e-6


def encode(x):
    """uint8 pixel values {0..255} -> float32 bin centres in (-1, 1)."""
    return 2.0 * (tf.cast(x, tf.float32) + 0.5) / NUM_VALUES - 1.0


def decode(f):
    """Inverse of `encode`: float values in [-1, 1] -> nearest uint8 pixel value (clipped)."""
    x = tf.round((f + 1.0) * NUM_VALUES / 2.0 - 0.5)
    return tf.cast(tf.clip_by_value(x, 0.0, NUM_VALUES - 1.0), tf.uint8)


def bin_centres():
    """The 256 values `encode(0..255)`, float32 [256]."""
    return encode(tf.range(NUM_VALUES))


def per_example(values, ndim):
    """Reshapes per-example values [N] (or a scalar) to broadcast against rank-`ndim` tensors."""
    values = tf.convert_to_tensor(values, tf.float32)
    if values.shape.rank == 0:
        return values
    return tf.reshape(values, [-1] + [1] * (ndim - 1))


def check_images(images, image_shape, name="images"):
    """Validates a batch of images and returns it as a uint8 tensor.

    Accepts a uint8 tensor or array, or an integer NumPy array whose values lie in 0..255.
    Anything else raises an error that names the expected form, e.g.
    `images must be uint8 with shape [N, 8, 8, 1] and values in 0..255; got float32 ...`.

    Args:
        images: the batch, [N, H, W, C].
        image_shape: expected (H, W, C).
        name: what to call the argument in error messages.
    """
    expected = f"{name} must be uint8 with shape [N, {', '.join(map(str, image_shape))}] and values in 0..255"
    if isinstance(images, np.ndarray) or not tf.is_tensor(images):
        array = np.asarray(images)
        if not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                f"{expected}; got dtype {array.dtype}. Pixel values are integers, not [0, 1] or [-1, 1] floats."
            )
        if array.size and (array.min() < 0 or array.max() > NUM_VALUES - 1):
            raise ValueError(f"{expected}; got values in {array.min()}..{array.max()}.")
        images = tf.convert_to_tensor(array.astype(np.uint8))
    elif images.dtype != tf.uint8:
        raise TypeError(
            f"{expected}; got a {images.dtype.name} tensor. Cast integer pixels with tf.cast(images, tf.uint8)."
        )
    shape = images.shape
    if shape.rank != 4 or not shape[1:].is_compatible_with(image_shape):
        raise ValueError(f"{expected}; got shape {shape}.")
    return images


def _rescale(z_0, gamma_0):
    """z_0 / alpha_0 and SNR_0, shaped to broadcast against z_0."""
    gamma_0 = per_example(gamma_0, 4)
    return z_0 / tf.sqrt(tf.sigmoid(-gamma_0)), tf.exp(-gamma_0)


def alphabet_mask(pixel_values):
    """A bool [256] vector marking the values of an alphabet (None: all of them)."""
    mask = np.zeros(NUM_VALUES, bool)
    mask[np.asarray(pixel_values if pixel_values is not None else range(NUM_VALUES), np.int64)] = True
    return mask


def decoder_logits(z_0, gamma_0, pixel_values=None):
    """Logits of p(x | z_0) for every pixel: [N, H, W, C, 256] (VDM eq. 22-23).

    Args:
        z_0: latent at t = 0, float32 [N, H, W, C].
        gamma_0: gamma(0), a scalar or per example [N].
        pixel_values: the data's alphabet (sorted uint8 values), or None for all 256. With an
            alphabet the result is log p itself: log((1 - F) softmax_alphabet + F / 256) with
            F = `ALPHABET_FLOOR`.
    """
    z_0_rescaled, snr_0 = _rescale(z_0, gamma_0)
    logits = -0.5 * snr_0[..., None] * tf.square(z_0_rescaled[..., None] - bin_centres())
    if pixel_values is None:
        return logits
    # A large finite value, not -inf: no NaN in log_softmax or its gradient.
    inside = tf.nn.log_softmax(tf.where(alphabet_mask(pixel_values), logits, -1e30))
    floor = math.log(ALPHABET_FLOOR / NUM_VALUES)
    shifted = inside + math.log1p(-ALPHABET_FLOOR)
    larger = tf.maximum(shifted, floor)
    return larger + tf.math.log1p(tf.exp(-tf.abs(shifted - floor)))  # logaddexp(shifted, floor)


# Half-widths W of the windows of bin centres that `reconstruction_nll` sums over, with the
# smallest SNR_0 at which each is exact in float32 (see there); below the last, all 256 values.
_BIN_WIDTH = 2.0 / NUM_VALUES
_NEGLECTED_NATS = 30.0  # every value outside the window is below exp(-30) of the nearest one
NLL_WINDOWS = tuple(
    (half_width, 2.0 * _NEGLECTED_NATS / (_BIN_WIDTH**2 * half_width * (half_width + 1)))
    for half_width in (2, 8, 32)
)


def _windowed_nll(x, z_0_rescaled, snr_0, half_width):
    """-log p(x | z_0) per pixel, the softmax normaliser summed over 2 W + 1 values around z_0 / alpha_0."""
    size = 2 * half_width + 1
    nearest = tf.cast(decode(z_0_rescaled), tf.float32)
    first = tf.clip_by_value(nearest - half_width, 0.0, float(NUM_VALUES - size))  # the window stays in 0..255
    values = first[..., None] + tf.range(size, dtype=tf.float32)
    logits = -0.5 * snr_0[..., None] * tf.square(z_0_rescaled[..., None] - encode(values))
    logit_x = -0.5 * snr_0 * tf.square(z_0_rescaled - encode(x))
    return tf.reduce_logsumexp(logits, axis=-1) - logit_x


def _full_nll(x, z_0, gamma_0, pixel_values):
    logits = decoder_logits(z_0, gamma_0, pixel_values)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(x, tf.int32), logits=logits)


def reconstruction_nll(x, z_0, gamma_0, pixel_values=None):
    """-log p(x | z_0) in nats, summed over pixels: float32 [N] (VDM eq. 22-23).

    The same number as the cross entropy of `decoder_logits`, computed with less work where
    the decoder is sharp: with all 256 values, the softmax normaliser of a pixel is summed
    over the 2 W + 1 bin centres around z_0 / alpha_0 only (the data's x is scored wherever it
    is). The first value outside such a window is at least (W + 1/2) bins away, the nearest
    one at most 1/2, so its term is below exp(-SNR_0 h^2 W (W + 1) / 2) of the nearest one's
    (h the bin width), and further ones fall faster. `NLL_WINDOWS` picks, per batch (the
    smallest SNR_0), the narrowest W for which that is exp(-30): the neglected terms are
    below float32 resolution, so the result and its gradient are those of the full softmax to
    rounding. At gamma_0 = -13.3 (SNR_0 = 6e5) 5 values are summed instead of 256; from
    gamma_0 = -6.8 up, all 256. Each window has a static size, so XLA compiles every branch.

    Args:
        x: uint8 [N, H, W, C].
        z_0: float32 [N, H, W, C].
        gamma_0: gamma(0), a scalar or per example [N].
        pixel_values: the data's alphabet, or None (see `decoder_logits`; an alphabet always
            takes the full softmax).
    """
    if pixel_values is not None:
        return tf.reduce_sum(_full_nll(x, z_0, gamma_0, pixel_values), axis=[1, 2, 3])
    z_0_rescaled, snr_0 = _rescale(z_0, gamma_0)
    smallest_snr = tf.reduce_min(snr_0)
    branch = tf.reduce_sum(tf.cast(smallest_snr < [min_snr for _, min_snr in NLL_WINDOWS], tf.int32))
    # branch 0: the narrowest window is exact; len(NLL_WINDOWS): none is, all 256 values
    windows = [half_width for half_width, _ in NLL_WINDOWS]
    branches = [
        (lambda w=w: _windowed_nll(x, z_0_rescaled, snr_0, w)) for w in windows
    ] + [lambda: _full_nll(x, z_0, gamma_0, None)]
    nll = tf.switch_case(branch, branches)
    return tf.reduce_sum(nll, axis=[1, 2, 3])


def decoder_sample(z_0, gamma_0, seed, pixel_values=None):
    """An exact sample of x ~ p(x | z_0): uint8, the shape of z_0."""
    logits = decoder_logits(z_0, gamma_0, pixel_values)
    flat = tf.reshape(logits, [-1, NUM_VALUES])
    samples = tf.random.stateless_categorical(flat, 1, seed=seed, dtype=tf.int32)
    return tf.cast(tf.reshape(samples, tf.shape(z_0)), tf.uint8)


def decoder_argmax(z_0, gamma_0, pixel_values=None):
    """The most likely x under p(x | z_0): the value of the alphabet nearest to z_0 / alpha_0; uint8."""
    if pixel_values is not None:
        return tf.cast(tf.argmax(decoder_logits(z_0, gamma_0, pixel_values), axis=-1), tf.uint8)
    z_0_rescaled, _ = _rescale(z_0, gamma_0)
    return decode(z_0_rescaled)


def grid(batch, columns=None, padding=1):
    """Tiles a batch of images [N, H, W, C] into one picture, row by row; uint8 [H', W', C].

    Args:
        batch: uint8 images (tensor or array).
        columns: images per row; default ceil(sqrt(N)).
        padding: pixels of black between images.
    """
    batch = np.asarray(batch)
    num, height, width, channels = batch.shape
    columns = columns or int(np.ceil(np.sqrt(num)))
    rows = int(np.ceil(num / columns))
    picture = np.zeros(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels), batch.dtype
    )
    for i, image in enumerate(batch):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        picture[top : top + height, left : left + width] = image
    return picture


def save_grid(batch, path):
    """Writes uint8 images [N, H, W, C] as one grid PNG, enlarged (sharp pixels) when small.

    The file is whole or absent (`vdm_tf.image_files.write_image`), whatever stops the write.
    """
    from PIL import Image

    from vdm_tf import image_files

    picture = image_files.to_pil(np.asarray(grid(batch)))
    zoom = max(1, 256 // max(picture.size))
    image_files.write_image(path, picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST))

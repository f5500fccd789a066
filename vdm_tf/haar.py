"""The orthonormal multi-level 2-D Haar transform of image batches.

One level maps every 2x2 block of pixels `[[p00, p01], [p10, p11]]` (each channel apart) to
four coefficients:

    low        = (p00 + p01 + p10 + p11) / 2
    horizontal = (p00 - p01 + p10 - p11) / 2      (differences along x)
    vertical   = (p00 + p01 - p10 - p11) / 2      (differences along y)
    diagonal   = (p00 - p01 - p10 + p11) / 2

The 4x4 matrix of these rows is orthogonal and symmetric, so it is its own inverse: the
transform preserves norms (white noise stays white noise of the same variance) and inverts
exactly up to float rounding. `L` levels repeat the step on the low-pass part:

    f -> (a_L, [d_1, ..., d_L]),   a_L: [N, H / 2^L, W / 2^L, C],   d_k: [N, H / 2^k, W / 2^k, 3 C],

with `d_1` the finest details. `inverse_haar(a_L, [d_{s+1}, ..., d_L])` with only the coarsest
`L - s` detail groups reassembles the level-s low-pass image `a_s` (H / 2^s by W / 2^s): an image
at a lower resolution, as `vdm_tf.multiscale` feeds its denoisers.

Example:
>>> low, details = haar(images, levels=2)       # [N, H/4, W/4, C], [[N, H/2, W/2, 3C], [N, H/4, W/4, 3C]]
>>> inverse_haar(low, details)                  # images again (relative error ~1e-7)
>>> inverse_haar(low, details[1:])              # the level-1 low-pass image, [N, H/2, W/2, C]

Reference: Mallat (1989), "A theory for multiresolution signal decomposition: the wavelet
representation"; Batzolis et al. (2022), "Non-Uniform Diffusion Models", section 4 (the
multi-scale diffusion uses this transform).
"""

import numpy as np
import tensorflow as tf

# Checked before TensorFlow starts too (a run's configuration), so it lives in the TF-free module.
from vdm_tf.run_config import check_haar_levels as check_levels

# Rows: low, horizontal, vertical, diagonal; columns: the block's pixels in space_to_depth's
# order (p00, p01, p10, p11). Orthogonal and symmetric: _MATRIX @ _MATRIX = I.
# A NumPy array: a TensorFlow constant here would start TensorFlow's runtime at import time,
# after which no one can configure devices (tf.config.set_logical_device_configuration).
_MATRIX = 0.5 * np.array([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], np.float32)


def _mix(blocks):
    """Applies the 4x4 Haar matrix along axis 3 of [N, h, w, 4, C]."""
    return tf.einsum("ij,nhwjc->nhwic", _MATRIX, blocks)


def haar_step(x):
    """One level: x [N, H, W, C] (H, W even) -> (low [N, H/2, W/2, C], detail [N, H/2, W/2, 3C])."""
    height, width, channels = x.shape[1:]
    blocks = tf.reshape(tf.nn.space_to_depth(x, 2), [-1, height // 2, width // 2, 4, channels])
    coefficients = _mix(blocks)
    return coefficients[:, :, :, 0], tf.reshape(coefficients[:, :, :, 1:], [-1, height // 2, width // 2, 3 * channels])


def inverse_haar_step(low, detail):
    """Inverse of `haar_step`: (low [N, h, w, C], detail [N, h, w, 3C]) -> [N, 2h, 2w, C]."""
    height, width, channels = low.shape[1:]
    coefficients = tf.concat([low[:, :, :, None], tf.reshape(detail, [-1, height, width, 3, channels])], axis=3)
    blocks = _mix(coefficients)  # the matrix is its own inverse
    return tf.nn.depth_to_space(tf.reshape(blocks, [-1, height, width, 4 * channels]), 2)


def haar(x, levels):
    """`levels` Haar levels of x [N, H, W, C]: (a_L, [d_1, ..., d_L]), finest details first.

    Args:
        x: float32 images with a static height and width divisible by 2^levels.
        levels: L >= 0 (0: (x, [])).

    Returns:
        (low-pass [N, H / 2^L, W / 2^L, C], list of L detail tensors, d_k [N, H / 2^k, W / 2^k, 3 C]).
    """
    check_levels(x.shape[1:], levels)
    details = []
    for _ in range(levels):
        x, detail = haar_step(x)
        details.append(detail)
    return x, details


def inverse_haar(low, details):
    """Inverse of `haar`: reassembles `low` with `details` (finest first), coarsest level first.

    With the full list it returns the image; with only the coarsest groups `details[s:]` of a
    `haar` result, the level-s low-pass image.
    """
    for detail in reversed(details):
        low = inverse_haar_step(low, detail)
    return low

"""Group normalization whose number of groups follows the channel count."""

import keras
import tensorflow as tf


def num_groups(channels, max_groups=32):
    """The number of groups used for `channels` channels.

    The rule: the largest divisor of `channels` that is at most `max_groups`. It gives flax's
    default of 32 groups whenever `channels` is a multiple of 32 (every layer of the paper's
    networks), and still works for small test networks (e.g. 24 channels -> 24 groups,
    3 channels -> 3 groups).
    """
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def group_norm(x, scale, bias, max_groups=32, epsilon=1e-6):
    """Group normalization of `x` [N, ..., C] over its spatial axes and groups of channels.

    Each of the `G = num_groups(C, max_groups)` groups of `C / G` consecutive channels is
    normalized by the mean and variance of its values (all positions, one example), then every
    channel is scaled by `scale` [C] and shifted by `bias` [C] (Wu & He 2018, eq. 1-2).

    A bfloat16 (or float16) `x` of mixed precision is normalized in float32, and the result cast
    back to its dtype: with 8 significant bits, an activation of mean 3 and spread 0.05 would
    lose 0.16 standard deviations to the rounding of its mean alone.
    """
    x_full = tf.cast(x, tf.float32) if x.dtype.size < 4 else x
    channels = x.shape[-1]
    groups = num_groups(channels, max_groups)
    group_size = channels // groups
    spatial_axes = list(range(1, x.shape.rank - 1))

    def group_mean(per_channel):
        # [N, 1, .., 1, C] -> the mean of each channel's group, repeated over the group's channels.
        means = tf.reduce_mean(tf.reshape(per_channel, [-1, groups, group_size]), axis=-1, keepdims=True)
        return tf.reshape(tf.tile(means, [1, 1, group_size]), [-1] + [1] * len(spatial_axes) + [channels])

    # Two passes. No stop_gradient on the mean (`tf.nn.moments` has one): it leaves the first
    # derivatives exact but makes the second ones wrong (11% on a small CDM classifier, whose
    # loss differentiates its input gradient; tests/test_cdm.py).
    mean = group_mean(tf.reduce_mean(x_full, spatial_axes, keepdims=True))
    squared_deviation = tf.math.squared_difference(x_full, mean)
    variance = group_mean(tf.reduce_mean(squared_deviation, spatial_axes, keepdims=True))
    # Fold normalization, scale and bias into one multiply-add over the activations.
    scale = tf.math.rsqrt(variance + epsilon) * tf.cast(scale, x_full.dtype)
    return tf.cast(x_full * scale + (tf.cast(bias, x_full.dtype) - mean * scale), x.dtype)


@keras.saving.register_keras_serializable(package="vdm_tf")
class GroupNorm(keras.layers.Layer):
    """Group normalization (Wu & He 2018) over the last (channel) axis.

    Channels are split into `num_groups(channels, max_groups)` groups; each group is
    normalized with the mean and variance over all its channels and positions of one
    example, then scaled and shifted per channel. Defaults match `flax.linen.GroupNorm`
    (32 groups, epsilon 1e-6), as used by the official VDM code.

    Args:
        max_groups: upper bound on the number of groups, see `num_groups`.
        epsilon: added to the variance before taking the square root.
        **kwargs: standard `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Example:
    >>> GroupNorm()(tf.random.normal([2, 8, 8, 64])).shape
    TensorShape([2, 8, 8, 64])

    Reference:
        Wu & He 2018, "Group Normalization", https://arxiv.org/abs/1803.08494.
    """

    def __init__(self, max_groups=32, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.max_groups = max_groups
        self.epsilon = epsilon

    def build(self, input_shape):
        channels = input_shape[-1]
        self.scale = self.add_weight(shape=(channels,), initializer="ones", name="scale")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")

    def call(self, x):
        return group_norm(x, self.scale, self.bias, self.max_groups, self.epsilon)

    def get_config(self):
        config = super().get_config()
        config.update({"max_groups": self.max_groups, "epsilon": self.epsilon})
        return config

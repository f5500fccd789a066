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
        self.groups = num_groups(channels, self.max_groups)
        self.scale = self.add_weight(shape=(channels,), initializer="ones", name="scale")
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias")

    def call(self, x):
        channels = x.shape[-1]
        group_size = channels // self.groups
        spatial_axes = list(range(1, x.shape.rank - 1))
        per_channel_shape = [-1] + [1] * len(spatial_axes) + [channels]

        def group_mean(per_channel):
            # [N, C] -> each channel's group average, shaped to broadcast against x.
            means = tf.reduce_mean(tf.reshape(per_channel, [-1, self.groups, group_size]), axis=-1)
            return tf.reshape(tf.repeat(means, group_size, axis=-1), per_channel_shape)

        # Two passes, as in `tf.nn.moments` (whose stop_gradient is exact: the variance's
        # derivative with respect to the mean is zero).
        mean = group_mean(tf.reduce_mean(x, spatial_axes))
        variance = group_mean(tf.reduce_mean(tf.math.squared_difference(x, tf.stop_gradient(mean)), spatial_axes))
        # Fold normalization, scale and bias into one multiply-add over the activations.
        scale = tf.math.rsqrt(variance + self.epsilon) * self.scale
        return x * scale + (self.bias - mean * scale)

    def get_config(self):
        config = super().get_config()
        config.update({"max_groups": self.max_groups, "epsilon": self.epsilon})
        return config

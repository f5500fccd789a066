"""Residual building blocks of the VDM score network: a conditioned ResNet block and self-attention.

Both blocks are residual and their last projection starts at zero, so at initialization each
block is the identity map (up to the ResNet block's channel-changing shortcut), as in the
official code. Kernels otherwise use flax's default initializer, LeCun normal, and zero biases.
"""

import keras
import tensorflow as tf

from vdm_tf.networks.normalization import GroupNorm


def conv3x3(filters, zero_init=False, name=None):
    """A 3x3, stride-1, 'same'-padded convolution with flax's default (or a zero) kernel init."""
    return keras.layers.Conv2D(
        filters, 3, padding="same", kernel_initializer="zeros" if zero_init else "lecun_normal", name=name
    )


@keras.saving.register_keras_serializable(package="vdm_tf")
class ResnetBlock(keras.layers.Layer):
    """Pre-activation ResNet block conditioned on a vector (the time embedding).

    `h = conv1(swish(norm1(x))) + cond_proj(cond)`, then
    `h = conv2(dropout(swish(norm2(h))))`; returns `shortcut(x) + h`, where `shortcut` is a
    1x1 projection (a `Dense` on the channel axis) when the channel count changes and the
    identity otherwise. `cond_proj` (no bias) and `conv2` start at zero.

    Call arguments: `x` [N, H, W, C_in], `cond` [N, D], `training` (enables dropout).
    Returns [N, H, W, out_channels].

    Args:
        out_channels: number of output channels.
        dropout: dropout rate before the second convolution, active only when training.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> block = ResnetBlock(64, dropout=0.1)
    >>> block(tf.zeros([2, 8, 8, 128]), tf.zeros([2, 256]), training=False).shape
    TensorShape([2, 8, 8, 64])

    Reference:
        `ResnetBlock` in https://github.com/google-research/vdm (model_vdm.py);
        Kingma et al. 2021, "Variational Diffusion Models", appendix B,
        https://arxiv.org/abs/2107.00630.
    """

    def __init__(self, out_channels, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.out_channels = out_channels
        self.dropout = dropout
        self.norm1 = GroupNorm(name="norm1")
        self.conv1 = conv3x3(out_channels, name="conv1")
        self.cond_proj = keras.layers.Dense(
            out_channels, use_bias=False, kernel_initializer="zeros", name="cond_proj"
        )
        self.norm2 = GroupNorm(name="norm2")
        self.dropout_layer = keras.layers.Dropout(dropout, name="dropout")
        self.conv2 = conv3x3(out_channels, zero_init=True, name="conv2")
        # Depends on the input's channel count, so it is created in `build`.
        self.shortcut = None

    def build(self, x_shape, cond_shape):
        out_shape = (*x_shape[:-1], self.out_channels)
        self.norm1.build(x_shape)
        self.conv1.build(x_shape)
        self.cond_proj.build(cond_shape)
        self.norm2.build(out_shape)
        self.conv2.build(out_shape)
        if x_shape[-1] != self.out_channels:
            self.shortcut = keras.layers.Dense(
                self.out_channels, kernel_initializer="lecun_normal", name="shortcut"
            )
            self.shortcut.build(x_shape)

    def call(self, x, cond, training=None):
        h = self.conv1(tf.nn.silu(self.norm1(x)))
        h += self.cond_proj(cond)[:, None, None, :]
        h = tf.nn.silu(self.norm2(h))
        h = self.conv2(self.dropout_layer(h, training=training))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h

    def compute_output_shape(self, x_shape, cond_shape):
        return (*x_shape[:-1], self.out_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"out_channels": self.out_channels, "dropout": self.dropout})
        return config


@keras.saving.register_keras_serializable(package="vdm_tf")
class AttentionBlock(keras.layers.Layer):
    """Single-head self-attention over all spatial positions, with a residual connection.

    `h = norm(x)`; `q, k, v` are per-position linear maps of `h`;
    `out = proj_out(softmax(q k^T / sqrt(C)) v)` over the H * W positions of each example;
    returns `x + out`. `proj_out` starts at zero.

    Call arguments: `x` [N, H, W, C]. Returns [N, H, W, C].

    Args:
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> AttentionBlock()(tf.zeros([2, 8, 8, 64])).shape
    TensorShape([2, 8, 8, 64])

    Reference:
        `AttnBlock` (with `num_heads=1`) in https://github.com/google-research/vdm
        (model_vdm.py); Kingma et al. 2021, "Variational Diffusion Models", appendix B,
        https://arxiv.org/abs/2107.00630.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = GroupNorm(name="norm")
        # The projections' sizes are the input's channel count, so they are created in `build`.
        self.q = self.k = self.v = self.proj_out = None

    def build(self, input_shape):
        channels = input_shape[-1]

        def dense(name, initializer="lecun_normal"):
            layer = keras.layers.Dense(channels, kernel_initializer=initializer, name=name)
            layer.build(input_shape)
            return layer

        self.norm.build(input_shape)
        self.q, self.k, self.v = dense("q"), dense("k"), dense("v")
        self.proj_out = dense("proj_out", initializer="zeros")

    def call(self, x):
        shape = tf.shape(x)
        channels = x.shape[-1]
        h = self.norm(x)
        q, k, v = (tf.reshape(layer(h), [shape[0], -1, channels]) for layer in (self.q, self.k, self.v))
        logits = tf.matmul(q * channels**-0.5, k, transpose_b=True)
        # softmax(logits) v, normalized after the product with v: one pass less over the
        # [N, HW, HW] weights. The max is subtracted for stability only; it does not change
        # the result, so its gradient is not needed.
        weights = tf.exp(logits - tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True)))
        h = tf.matmul(weights, v) / tf.reduce_sum(weights, axis=-1, keepdims=True)
        return x + self.proj_out(tf.reshape(h, shape))

    def compute_output_shape(self, input_shape):
        return input_shape

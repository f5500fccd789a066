"""Residual building blocks of the VDM score network: a conditioned ResNet block and self-attention.

Both blocks are residual and their last projection starts at zero, so at initialization each
block is the identity map (up to the ResNet block's channel-changing shortcut), as in the
official code. Kernels otherwise use flax's default initializer, LeCun normal, and zero biases.
"""

import keras
import tensorflow as tf

from vdm_tf.networks.normalization import GroupNorm, group_norm


def conv3x3(filters, zero_init=False, name=None, dtype=None):
    """A 3x3, stride-1, 'same'-padded convolution with flax's default (or a zero) kernel init."""
    return keras.layers.Conv2D(
        filters, 3, padding="same", kernel_initializer="zeros" if zero_init else "lecun_normal", name=name, dtype=dtype
    )


def traced_once(function):
    """`function` as one `tf.function` shared by all its calls inside graphs; run directly when eager.

    A U-Net calls the same block computation dozens of times, with weights of the same shapes.
    Written inline, every call adds its own copy of the block's ops, and later of their gradient,
    to the training graph, and Python spends most of the time to the first step creating them
    one by one (the paper's network has 67 blocks). Given the weights as arguments, so that it
    captures nothing, the traced function serves every call with the same argument shapes and
    Python arguments: it is traced, and its gradient built, once per distinct block. The calls
    are marked `_noinline`, so that graph optimization (grappler) also sees each distinct block
    once rather than 67 inlined copies: at the paper's size the first call of the train step
    takes about a third of the time it takes with the blocks inlined, and a step costs the same
    CPU time either way (time to the first step: bench/results/train_throughput.json). Under
    XLA (`jit_compile=True`, TPUs) the calls are compiled into one program, as inline code is.
    Eager calls run `function` op by op, as inline code does.
    """
    traced = tf.function(function, autograph=False, experimental_attributes={"_noinline": True})

    @tf.autograph.experimental.do_not_convert
    def call(*args, **kwargs):
        return function(*args, **kwargs) if tf.executing_eagerly() else traced(*args, **kwargs)

    call.traced = traced
    return call


def weights_of(layer):
    """The values of a sub-layer's weights, read (and cast to its compute dtype) by its parent.

    Called inside the parent's `call`, whose Keras autocast scope casts float32 variables to the
    parent's compute dtype: bfloat16 under a "mixed_bfloat16" policy.
    """
    return [tf.convert_to_tensor(weight) for weight in layer.weights]


def conv(x, kernel, bias):
    """`keras.layers.Conv2D`'s stride-1, 'same'-padded convolution, from its kernel and bias."""
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias)


def dense(x, kernel, bias):
    """`keras.layers.Dense` on the last axis of `x` [..., C_in], from its kernel [C_in, C_out] and bias."""
    y = tf.nn.bias_add(tf.matmul(tf.reshape(x, [-1, kernel.shape[0]]), kernel), bias)
    return tf.reshape(y, tf.concat([tf.shape(x)[:-1], kernel.shape[1:]], axis=0))


@traced_once
def resnet_block(x, cond, weights, dropout_seed=None, dropout_rate=0.0):
    """`ResnetBlock`'s computation from its weights (`ResnetBlock.block_weights`).

    With `dropout_seed` (int32 [2]) the dropout masks are those of a `keras.layers.Dropout`
    drawing that seed.
    """
    h = conv(tf.nn.silu(group_norm(x, *weights["norm1"])), *weights["conv1"])
    h += tf.matmul(cond, weights["cond_proj"][0])[:, None, None, :]
    h = tf.nn.silu(group_norm(h, *weights["norm2"]))
    if dropout_seed is not None:
        h = tf.nn.experimental.stateless_dropout(h, dropout_rate, seed=dropout_seed)
    h = conv(h, *weights["conv2"])
    if "shortcut" in weights:
        x = dense(x, *weights["shortcut"])
    return x + h


@keras.saving.register_keras_serializable(package="vdm_tf")
class ResnetBlock(keras.layers.Layer):
    """Pre-activation ResNet block conditioned on a vector (the time embedding).

    `h = conv1(swish(norm1(x))) + cond_proj(cond)`, then
    `h = conv2(dropout(swish(norm2(h))))`; returns `shortcut(x) + h`, where `shortcut` is a
    1x1 projection (a `Dense` on the channel axis) when the channel count changes and the
    identity otherwise. `cond_proj` (no bias) and `conv2` start at zero.

    Call arguments: `x` [N, H, W, C_in], `cond` [N, D], `training` (enables dropout).
    Returns [N, H, W, out_channels].

    The sub-layers hold the weights (and the dropout layer its seed generator); the block's
    computation is `resnet_block`, which all blocks of a graph share (see `traced_once`). The
    sub-layers take the block's dtype policy; under "mixed_bfloat16" the block computes in
    bfloat16 (its group normalizations' statistics in float32) with float32 weights.

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
        policy = self.dtype_policy
        self.norm1 = GroupNorm(name="norm1", dtype=policy)
        self.conv1 = conv3x3(out_channels, name="conv1", dtype=policy)
        self.cond_proj = keras.layers.Dense(
            out_channels, use_bias=False, kernel_initializer="zeros", name="cond_proj", dtype=policy
        )
        self.norm2 = GroupNorm(name="norm2", dtype=policy)
        self.dropout_layer = keras.layers.Dropout(dropout, name="dropout", dtype=policy)
        self.conv2 = conv3x3(out_channels, zero_init=True, name="conv2", dtype=policy)
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
                self.out_channels, kernel_initializer="lecun_normal", name="shortcut", dtype=self.dtype_policy
            )
            self.shortcut.build(x_shape)

    def call(self, x, cond, training=None):
        dropout_seed = None
        if training and self.dropout > 0:
            # The seed the Dropout layer would draw (advancing its generator), cast as Keras does.
            seed = self.dropout_layer.seed_generator.next()
            dropout_seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        return resnet_block(x, cond, self.block_weights(), dropout_seed, float(self.dropout))

    def block_weights(self):
        """The weight values of the sub-layers, by name, as `resnet_block` takes them."""
        layers = ("norm1", "conv1", "cond_proj", "norm2", "conv2") + (("shortcut",) if self.shortcut else ())
        return {name: weights_of(getattr(self, name)) for name in layers}

    def compute_output_shape(self, x_shape, cond_shape):
        return (*x_shape[:-1], self.out_channels)

    def get_config(self):
        config = super().get_config()
        config.update({"out_channels": self.out_channels, "dropout": self.dropout})
        return config


@traced_once
def attention_block(x, norm, q, k, v, proj_out):
    """`AttentionBlock`'s computation from its sub-layers' weights (each a list [kernel, bias])."""
    shape = tf.shape(x)
    channels = x.shape[-1]
    h = group_norm(x, *norm)
    q, k, v = (tf.reshape(dense(h, *weights), [shape[0], -1, channels]) for weights in (q, k, v))
    logits = tf.matmul(q * channels**-0.5, k, transpose_b=True)
    # softmax(logits) v, normalized after the product with v: one pass less over the
    # [N, HW, HW] weights. The max is subtracted for stability only; it does not change
    # the result, so its gradient is not needed.
    weights = tf.exp(logits - tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True)))
    h = tf.matmul(weights, v) / tf.reduce_sum(weights, axis=-1, keepdims=True)
    return x + dense(tf.reshape(h, shape), *proj_out)


@keras.saving.register_keras_serializable(package="vdm_tf")
class AttentionBlock(keras.layers.Layer):
    """Single-head self-attention over all spatial positions, with a residual connection.

    `h = norm(x)`; `q, k, v` are per-position linear maps of `h`;
    `out = proj_out(softmax(q k^T / sqrt(C)) v)` over the H * W positions of each example;
    returns `x + out`. `proj_out` starts at zero.

    Call arguments: `x` [N, H, W, C]. Returns [N, H, W, C].

    The sub-layers hold the weights and take the block's dtype policy; the computation is
    `attention_block` (see `traced_once`).

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
        self.norm = GroupNorm(name="norm", dtype=self.dtype_policy)
        # The projections' sizes are the input's channel count, so they are created in `build`.
        self.q = self.k = self.v = self.proj_out = None

    def build(self, input_shape):
        channels = input_shape[-1]

        def projection(name, initializer="lecun_normal"):
            layer = keras.layers.Dense(channels, kernel_initializer=initializer, name=name, dtype=self.dtype_policy)
            layer.build(input_shape)
            return layer

        self.norm.build(input_shape)
        self.q, self.k, self.v = projection("q"), projection("k"), projection("v")
        self.proj_out = projection("proj_out", initializer="zeros")

    def call(self, x):
        layers = (self.norm, self.q, self.k, self.v, self.proj_out)
        return attention_block(x, *(weights_of(layer) for layer in layers))

    def compute_output_shape(self, input_shape):
        return input_shape

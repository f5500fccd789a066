"""The VDM noise-prediction network: a U-Net without downsampling, conditioned on gamma_t."""

import numbers

import keras
import tensorflow as tf

from vdm_tf.networks.blocks import AttentionBlock, ResnetBlock, conv3x3
from vdm_tf.networks.embeddings import TimestepEmbedding
from vdm_tf.networks.fourier_features import FourierFeatures
from vdm_tf.networks.normalization import GroupNorm


@keras.saving.register_keras_serializable(package="vdm_tf")
class ScoreUNet(keras.layers.Layer):
    """Noise-prediction network `eps_hat = ScoreUNet(...)(z_t, gamma_t, training=...)`.

    A port of the official VDM score network. All blocks work at the full input resolution:

    1. Conditioning: `t = (gamma_t - gamma_min) / (gamma_max - gamma_min)`, a sinusoidal
       embedding of `1000 * t` (`TimestepEmbedding`), then two `Dense(4 * n_embd)` + swish
       layers give the vector `cond`.
    2. Input: `z_t`, concatenated with its Fourier features (`FourierFeatures`) when
       `fourier_features` is set, goes through a 3x3 convolution to `n_embd` channels.
    3. "Down" path: `n_layers` `ResnetBlock`s (each followed by an `AttentionBlock` when
       `attention` is set); the input and every block's output are kept as skips.
    4. Middle: `ResnetBlock`, `AttentionBlock`, `ResnetBlock`.
    5. "Up" path: `n_layers + 1` `ResnetBlock`s, each fed the concatenation of the running
       activations and the latest skip (optional attention after each).
    6. Output: GroupNorm, swish and a zero-initialized 3x3 convolution to the input's channel
       count, plus `z_t` itself (the official code's "base measure"), so that at
       initialization `eps_hat == z_t`.

    Call arguments:
        z_t: float32 [N, H, W, C], the noisy latents.
        gamma_t: float32 [N] (or a scalar, broadcast to [N]): log noise-to-signal ratio
            `gamma(t) = -log SNR(t)` of each latent.
        training: enables dropout.
        conditioning: float32 [N, conditioning_dim], only with `conditioning_dim > 0`.

    Returns float32 [N, H, W, C], the predicted noise.

    Mixed precision: built with `dtype="mixed_bfloat16"`, the conditioning dense layers, the
    blocks and the output layers compute in bfloat16, with float32 weights. What needs the
    full precision stays in the policy's variable dtype (float32): the inputs (`input_dtype`),
    the time embedding of gamma_t, the Fourier features `sin(2^n pi z_t)` (rounding z_t in
    [0.5, 1) to bfloat16's 8 significant bits would move their phase at n = 8 by up to pi / 2),
    the input convolution and the addition of z_t to the output.

    The official model also concatenates a class-conditioning scalar to the time embedding;
    this network is unconditional, so its first conditioning layer has `4 * n_embd` fewer
    weights. Otherwise its weights correspond one to one to the official ones.

    GroupNorm uses 32 groups (see `GroupNorm`). With `n_embd <= 32` every group is a single
    channel, and the GroupNorm that follows the time conditioning inside each `ResnetBlock`
    subtracts it away: such a network (like the official one) ignores `gamma_t`. Use
    `n_embd >= 64` for a network that depends on the noise level.

    Args:
        n_layers: ResNet blocks on the down path (the up path has one more).
        n_embd: channels of every block; the conditioning vector has `4 * n_embd`.
        fourier_features: whether to append Fourier features of `z_t` to the input.
        fourier_exponents: exponents `n` of the features `sin / cos(2^n * pi * z)`.
        attention: whether to add self-attention after every down and up block (the middle
            block always has one).
        dropout: dropout rate inside the ResNet blocks.
        gamma_min: gamma at t = 0; with `gamma_max`, maps gamma_t to `t` in [0, 1].
        gamma_max: gamma at t = 1.
        conditioning_dim: size of an optional conditioning vector (`conditioning=` [N, dim] at
            call time; zeros when omitted) concatenated to the time embedding, as the official
            code does with its class label; `vdm_tf.augmentation` uses it.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> net = ScoreUNet(n_layers=2, n_embd=32)
    >>> z_t = tf.random.normal([4, 32, 32, 3])
    >>> eps_hat = net(z_t, tf.fill([4], -5.0), training=False)
    >>> eps_hat.shape
    TensorShape([4, 32, 32, 3])

    Reference:
        Kingma et al. 2021, "Variational Diffusion Models", appendix B (architecture) and
        appendix C (Fourier features), https://arxiv.org/abs/2107.00630;
        `ScoreUNet` in https://github.com/google-research/vdm (model_vdm.py).
    """

    def __init__(
        self,
        n_layers=32,
        n_embd=128,
        fourier_features=True,
        fourier_exponents=(7, 8),
        attention=False,
        dropout=0.1,
        gamma_min=-13.3,
        gamma_max=5.0,
        conditioning_dim=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.conditioning_dim = int(conditioning_dim)
        self.n_layers = n_layers
        self.n_embd = n_embd
        self.fourier_features = fourier_features
        self.fourier_exponents = tuple(int(n) for n in fourier_exponents)
        self.attention = attention
        self.dropout = dropout
        self.gamma_min = gamma_min
        self.gamma_max = gamma_max

        policy, full = self.dtype_policy, self.dtype_policy.variable_dtype

        def dense(name):
            return keras.layers.Dense(
                4 * n_embd, activation="silu", kernel_initializer="lecun_normal", name=name, dtype=policy
            )

        self.time_embedding = TimestepEmbedding(n_embd, name="time_embedding", dtype=full)
        self.cond_dense0, self.cond_dense1 = dense("cond_dense0"), dense("cond_dense1")
        self.fourier = FourierFeatures(self.fourier_exponents, name="fourier", dtype=full) if fourier_features else None
        self.conv_in = conv3x3(n_embd, name="conv_in", dtype=full)
        make_unet_trunk(self, n_layers, n_embd, dropout, attention, policy)
        self.norm_out = GroupNorm(name="norm_out", dtype=policy)
        # Its size is the input's channel count, so it is created in `build`.
        self.conv_out = None

    def build(self, z_t_shape, gamma_t_shape=None):
        """Creates all weights from the shape of `z_t` (`gamma_t_shape` is not needed)."""
        *spatial, channels = z_t_shape
        cond_shape = (spatial[0], 4 * self.n_embd)
        h_shape = (*spatial, self.n_embd)
        self.cond_dense0.build((spatial[0], self.n_embd + self.conditioning_dim))
        self.cond_dense1.build(cond_shape)
        in_channels = channels * (1 + 2 * len(self.fourier_exponents)) if self.fourier_features else channels
        self.conv_in.build((*spatial, in_channels))
        build_unet_trunk(self, h_shape, cond_shape)
        self.norm_out.build(h_shape)
        self.conv_out = conv3x3(channels, zero_init=True, name="conv_out", dtype=self.dtype_policy)
        self.conv_out.build(h_shape)

    @property
    def input_dtype(self):
        """The inputs are cast to the variable dtype (float32), not to a mixed policy's bfloat16."""
        return self.variable_dtype

    def __call__(self, z_t, gamma_t, **kwargs):
        # Keras accepts only tensors as positional arguments; let gamma_t also be a number.
        if isinstance(gamma_t, numbers.Real):
            gamma_t = tf.constant(gamma_t, tf.float32)
        return super().__call__(z_t, gamma_t, **kwargs)

    def call(self, z_t, gamma_t, training=None, conditioning=None):
        gamma_t = tf.broadcast_to(tf.cast(gamma_t, z_t.dtype), tf.shape(z_t)[:1])
        t = (gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)
        cond = self.time_embedding(t)
        if self.conditioning_dim:
            if conditioning is None:
                conditioning = tf.zeros(tf.stack([tf.shape(z_t)[0], self.conditioning_dim]), z_t.dtype)
            cond = tf.concat([cond, tf.cast(conditioning, z_t.dtype)], axis=-1)
        cond = self.cond_dense1(self.cond_dense0(cond))

        h = tf.concat([z_t, self.fourier(z_t)], axis=-1) if self.fourier_features else z_t
        h = unet_trunk(self, tf.cast(self.conv_in(h), self.compute_dtype), cond, training)
        return tf.cast(self.conv_out(tf.nn.silu(self.norm_out(h))), z_t.dtype) + z_t

    def compute_output_shape(self, z_t_shape, gamma_t_shape=None):
        return z_t_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "n_layers": self.n_layers,
                "n_embd": self.n_embd,
                "fourier_features": self.fourier_features,
                "fourier_exponents": self.fourier_exponents,
                "attention": self.attention,
                "dropout": self.dropout,
                "gamma_min": self.gamma_min,
                "gamma_max": self.gamma_max,
                "conditioning_dim": self.conditioning_dim,
            }
        )
        return config


def make_unet_trunk(net, n_layers, n_embd, dropout, attention, dtype=None):
    """Creates the trunk's blocks, of dtype policy `dtype`, as attributes of `net` (the layout `unet_trunk` runs)."""

    def resnet_block(name):
        return ResnetBlock(n_embd, dropout, name=name, dtype=dtype)

    def attention_blocks(prefix, count):
        return [AttentionBlock(name=f"{prefix}_{i}", dtype=dtype) for i in range(count)] if attention else []

    net.down_blocks = [resnet_block(f"down_block_{i}") for i in range(n_layers)]
    net.down_attention = attention_blocks("down_attention", n_layers)
    net.mid_block1 = resnet_block("mid_block1")
    net.mid_attention = AttentionBlock(name="mid_attention", dtype=dtype)
    net.mid_block2 = resnet_block("mid_block2")
    net.up_blocks = [resnet_block(f"up_block_{i}") for i in range(n_layers + 1)]
    net.up_attention = attention_blocks("up_attention", n_layers + 1)


def build_unet_trunk(net, h_shape, cond_shape):
    """Creates the trunk's weights: features `h_shape` [N, H, W, n_embd], conditioning `cond_shape`."""
    skip_shape = (*h_shape[:-1], 2 * h_shape[-1])
    for block in (*net.down_blocks, net.mid_block1, net.mid_block2):
        block.build(h_shape, cond_shape)
    for block in net.up_blocks:
        block.build(skip_shape, cond_shape)
    for block in (*net.down_attention, net.mid_attention, *net.up_attention):
        block.build(h_shape)


def unet_trunk(net, h, cond, training=None):
    """The U-Net between the input and output convolutions, shared by `ScoreUNet` and CDM's classifier.

    `net` has the blocks of `ScoreUNet`: `down_blocks` (and `down_attention` when `net.attention`),
    `mid_block1`, `mid_attention`, `mid_block2`, `up_blocks` (and `up_attention`); every ResNet
    block is conditioned on `cond`, and each up block takes the matching down block's output.
    """
    skips = [h]
    for i, block in enumerate(net.down_blocks):
        h = block(h, cond, training=training)
        if net.attention:
            h = net.down_attention[i](h)
        skips.append(h)

    h = net.mid_block1(h, cond, training=training)
    h = net.mid_attention(h)
    h = net.mid_block2(h, cond, training=training)

    for i, block in enumerate(net.up_blocks):
        h = block(tf.concat([h, skips.pop()], axis=-1), cond, training=training)
        if net.attention:
            h = net.up_attention[i](h)
    return h

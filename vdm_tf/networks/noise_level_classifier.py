"""The noise-level classifier of Classification Diffusion Models: a U-Net without time input."""

import keras
import tensorflow as tf

from vdm_tf.networks.blocks import conv3x3
from vdm_tf.networks.fourier_features import FourierFeatures
from vdm_tf.networks.normalization import GroupNorm
from vdm_tf.networks.score_unet import build_unet_trunk, make_unet_trunk, unet_trunk


@keras.saving.register_keras_serializable(package="vdm_tf")
class NoiseLevelClassifier(keras.layers.Layer):
    """`logits = NoiseLevelClassifier(num_levels)(z, training=...)`: which noise level made z?

    The classifier of a `vdm_tf.cdm.CDM`: its output `logits[:, t]`, t = 0 .. T + 1, is
    log p(t | z) up to a constant per example, for the levels t = 0 (clean data), 1 .. T (the
    diffusion) and T + 1 (pure N(0, I) noise). The architecture is Yadin et al.'s: the
    denoising U-Net with its time-conditioning layers removed, then a head that pools the
    image into one vector of T + 2 logits (appendix C.1):

    1. Input: `z`, concatenated with its Fourier features when `fourier_features` is set, goes
       through a 3x3 convolution to `n_embd` channels.
    2. U-Net body, all at full resolution as in `ScoreUNet`: `n_layers` `ResnetBlock`s down,
       a middle `ResnetBlock`, `AttentionBlock`, `ResnetBlock`, and `n_layers + 1` blocks up,
       each fed the running activations and a skip (optional attention after every block).
       There is no time input: the blocks' conditioning vector is a constant 0, so their
       (zero-initialised) conditioning projections receive no gradient and stay 0.
    3. Head: GroupNorm, swish, a 3x3 convolution to `head_channels`, global average pooling
       and a `Dense(T + 2)` (zero-initialised: at first every level is equally likely).
    4. The fixed cumulative sum: the dense layer outputs `r_t`, the logits are
       `logit_t = r_0 + ... + r_t`. For the optimal classifier `r_t` is then the log ratio
       `log p(t | z) - log p(t - 1 | z)` of neighbouring levels, which are close and hard to
       tell apart (Yair and Michaeli's telescoping parametrisation, the paper's C.1). The
       last ratio, level T against pure noise, is far bigger than its neighbours' and learns
       like them, so it ends up too small: keep level T near pure noise (`vdm_tf.cdm`).

    Call arguments:
        z: float32 [N, H, W, C], an image at an unknown noise level.
        training: enables dropout.

    Returns float32 [N, num_levels + 2], the logits.

    Args:
        num_levels: T, the diffusion levels between clean data and pure noise.
        n_layers: ResNet blocks on the down path (the up path has one more).
        n_embd: channels of every block (>= 32 for GroupNorm's 32 groups to be meaningful).
        fourier_features: whether to append Fourier features of `z` to the input.
        fourier_exponents: exponents `n` of the features `sin / cos(2^n * pi * z)`.
        attention: self-attention after every down and up block (the middle always has one).
        dropout: dropout rate inside the ResNet blocks.
        head_channels: channels of the last convolution before the pooling; default `2 * n_embd`
            (the paper's 512 for CIFAR-10 with 256-channel blocks).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> classifier = NoiseLevelClassifier(num_levels=1000, n_layers=2, n_embd=64)
    >>> classifier(tf.zeros([4, 32, 32, 3])).shape
    TensorShape([4, 1002])

    Reference:
        Yadin, Elata, Michaeli 2024, "Classification Diffusion Models: Revitalizing Density
        Ratio Estimation", NeurIPS, appendix C.1, https://arxiv.org/abs/2402.10095;
        github.com/shaharYadin/CDM (models/diffusion.py, cdm.py).
    """

    def __init__(
        self,
        num_levels,
        n_layers=2,
        n_embd=64,
        fourier_features=True,
        fourier_exponents=(7, 8),
        attention=False,
        dropout=0.1,
        head_channels=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(num_levels) < 1:
            raise ValueError(f"num_levels must be a positive number of diffusion levels; got {num_levels}.")
        self.num_levels = int(num_levels)
        self.n_layers = n_layers
        self.n_embd = n_embd
        self.fourier_features = fourier_features
        self.fourier_exponents = tuple(int(n) for n in fourier_exponents)
        self.attention = attention
        self.dropout = dropout
        self.head_channels = int(head_channels or 2 * n_embd)

        self.fourier = FourierFeatures(self.fourier_exponents, name="fourier") if fourier_features else None
        self.conv_in = conv3x3(n_embd, name="conv_in")
        make_unet_trunk(self, n_layers, n_embd, dropout, attention)
        self.norm_out = GroupNorm(name="norm_out")
        self.conv_out = conv3x3(self.head_channels, name="conv_out")
        self.logits = keras.layers.Dense(self.num_levels + 2, kernel_initializer="zeros", name="logits")

    def build(self, z_shape):
        """Creates all weights from the shape of `z`."""
        *spatial, channels = z_shape
        no_time = (spatial[0], 1)
        h_shape = (*spatial, self.n_embd)
        in_channels = channels * (1 + 2 * len(self.fourier_exponents)) if self.fourier_features else channels
        self.conv_in.build((*spatial, in_channels))
        build_unet_trunk(self, h_shape, no_time)
        self.norm_out.build(h_shape)
        self.conv_out.build(h_shape)
        self.logits.build((spatial[0], self.head_channels))

    def call(self, z, training=None):
        no_time = tf.zeros(tf.stack([tf.shape(z)[0], 1]), z.dtype)  # the blocks' (constant) conditioning
        h = tf.concat([z, self.fourier(z)], axis=-1) if self.fourier_features else z
        h = unet_trunk(self, self.conv_in(h), no_time, training)
        h = self.conv_out(tf.nn.silu(self.norm_out(h)))
        log_ratios = self.logits(tf.reduce_mean(h, axis=[1, 2]))  # r_t = log p(t | z) / p(t - 1 | z)
        return tf.cumsum(log_ratios, axis=-1)

    def compute_output_shape(self, z_shape):
        return (z_shape[0], self.num_levels + 2)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_levels": self.num_levels,
                "n_layers": self.n_layers,
                "n_embd": self.n_embd,
                "fourier_features": self.fourier_features,
                "fourier_exponents": self.fourier_exponents,
                "attention": self.attention,
                "dropout": self.dropout,
                "head_channels": self.head_channels,
            }
        )
        return config

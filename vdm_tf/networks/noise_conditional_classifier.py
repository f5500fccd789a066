"""A noise-conditional image classifier: logits of p_t(y | z_t), for class guidance."""

import numbers

import keras
import tensorflow as tf

from vdm_tf.networks.blocks import ResnetBlock
from vdm_tf.networks.embeddings import TimestepEmbedding
from vdm_tf.networks.normalization import GroupNorm


@keras.saving.register_keras_serializable(package="vdm_tf")
class NoiseConditionalClassifier(keras.layers.Layer):
    """`logits = classifier(z_t, gamma_t)`: a ResNet encoder conditioned on the noise level.

    The encoder half of `ScoreUNet` (the same ResNet blocks, with the gamma embedding added in
    every block) with average-pool downsampling between resolutions, then global average
    pooling and a dense head. Trained on z_t = alpha_t f + sigma_t eps at every noise level
    (`vdm_tf.conditional.NoisyClassifier`), its input-gradient guides any sampler
    (`vdm_tf.conditional.ClassGuidedModel`; Song et al. 2021, section 5 and appendix I.4, which
    used a noise-conditional Wide-ResNet).

    Args:
        num_classes: number of logits.
        n_layers: ResNet blocks per resolution.
        n_embd: channels.
        num_resolutions: resolutions (each after the first halves height and width).
        dropout: dropout rate in the blocks.
        gamma_min, gamma_max: the range of gamma_t it is trained on (scales the embedding).
        **kwargs: forwarded to `keras.layers.Layer`.

    Example:
    >>> classifier = NoiseConditionalClassifier(num_classes=10, n_layers=1, n_embd=32)
    >>> logits = classifier(z_t, gamma_t)   # [N, 10]
    """

    def __init__(
        self, num_classes, n_layers=2, n_embd=64, num_resolutions=2, dropout=0.1, gamma_min=-13.3, gamma_max=5.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.n_layers = int(n_layers)
        self.n_embd = int(n_embd)
        self.num_resolutions = int(num_resolutions)
        self.dropout = float(dropout)
        self.gamma_min = float(gamma_min)
        self.gamma_max = float(gamma_max)
        self.time_embedding = TimestepEmbedding(n_embd, name="time_embedding")
        self.cond_dense = keras.layers.Dense(4 * n_embd, activation="silu", name="cond_dense")
        self.conv_in = keras.layers.Conv2D(n_embd, 3, padding="same", name="conv_in")
        self.blocks = [
            [ResnetBlock(n_embd, dropout, name=f"block_{level}_{i}") for i in range(n_layers)]
            for level in range(num_resolutions)
        ]
        self.norm_out = GroupNorm(name="norm_out")
        self.head = keras.layers.Dense(num_classes, name="head")

    def build(self, z_t_shape, gamma_t_shape=None):
        """Creates all weights from the shape of `z_t`."""
        batch, height, width, _ = z_t_shape
        cond_shape = (batch, 4 * self.n_embd)
        self.cond_dense.build((batch, self.n_embd))
        self.conv_in.build(z_t_shape)
        for level, blocks in enumerate(self.blocks):
            h_shape = (batch, height // 2**level, width // 2**level, self.n_embd)
            for block in blocks:
                block.build(h_shape, cond_shape)
        self.norm_out.build(h_shape)
        self.head.build((batch, self.n_embd))

    def __call__(self, z_t, gamma_t, **kwargs):
        if isinstance(gamma_t, numbers.Real):
            gamma_t = tf.constant(gamma_t, tf.float32)
        return super().__call__(z_t, gamma_t, **kwargs)

    def call(self, z_t, gamma_t, training=None):
        gamma_t = tf.broadcast_to(tf.cast(gamma_t, z_t.dtype), tf.shape(z_t)[:1])
        cond = self.cond_dense(self.time_embedding((gamma_t - self.gamma_min) / (self.gamma_max - self.gamma_min)))
        h = self.conv_in(z_t)
        for level, blocks in enumerate(self.blocks):
            if level:
                h = tf.nn.avg_pool2d(h, 2, 2, "VALID")
            for block in blocks:
                h = block(h, cond, training=training)
        h = tf.reduce_mean(tf.nn.silu(self.norm_out(h)), axis=[1, 2])
        return self.head(h)

    def compute_output_shape(self, z_t_shape, gamma_t_shape=None):
        return (z_t_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            n_layers=self.n_layers,
            n_embd=self.n_embd,
            num_resolutions=self.num_resolutions,
            dropout=self.dropout,
            gamma_min=self.gamma_min,
            gamma_max=self.gamma_max,
        )
        return config

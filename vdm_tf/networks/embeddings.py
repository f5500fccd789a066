"""Sinusoidal embedding of the diffusion time."""

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="vdm_tf")
class TimestepEmbedding(keras.layers.Layer):
    """Sinusoidal embedding of scalar times, Fairseq / tensor2tensor style.

    For times `t` of shape [N] and `half = embedding_dim // 2` it returns
    `concat([sin(scale * t * f), cos(scale * t * f)])` of shape [N, embedding_dim], with
    frequencies `f_i = exp(-log(10000) * i / (half - 1))` for `i = 0 .. half - 1`
    (so they span 1 down to 1/10000). This differs slightly from section 3.5 of
    "Attention Is All You Need" (which interleaves sin and cos and divides by `half`).
    The score network embeds `t` in [0, 1] with `scale=1000`, as the official VDM code does.

    Args:
        embedding_dim: output size; even and at least 4.
        scale: factor applied to the times before embedding.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> TimestepEmbedding(128)(tf.constant([0.0, 0.5, 1.0])).shape
    TensorShape([3, 128])

    Reference:
        `get_timestep_embedding` in https://github.com/google-research/vdm (model_vdm.py);
        Kingma et al. 2021, "Variational Diffusion Models", https://arxiv.org/abs/2107.00630.
    """

    def __init__(self, embedding_dim, scale=1000.0, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim % 2 or embedding_dim < 4:
            raise ValueError(f"embedding_dim must be even and at least 4; got {embedding_dim}.")
        self.embedding_dim = embedding_dim
        self.scale = scale
        half = embedding_dim // 2
        self._frequencies = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1)).astype(np.float32)

    def call(self, t):
        angles = (self.scale * t)[:, None] * tf.constant(self._frequencies, t.dtype)
        return tf.concat([tf.sin(angles), tf.cos(angles)], axis=1)

    def compute_output_shape(self, input_shape):
        return (*input_shape, self.embedding_dim)

    def get_config(self):
        config = super().get_config()
        config.update({"embedding_dim": self.embedding_dim, "scale": self.scale})
        return config
